"""The extension's files: widget names the panel uses exist in the .ui, CMake lists every file, metadata."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "MedAutoLabel"
sys.path.insert(0, str(ROOT / "tools"))

import cmake_file_lists  # noqa: E402  (tools/ is not a package)


def ui_widgets():
    tree = ET.parse(MODULE / "Resources" / "UI" / "MedAutoLabel.ui")
    return {w.get("name"): w for w in tree.iter("widget")}


def test_every_widget_the_panel_uses_is_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "MedAutoLabel.py").read_text(encoding="utf-8")))
    assert len(used) >= 12
    missing = used - set(ui_widgets())
    assert not missing, missing


def test_parameter_names_in_the_ui_match_the_parameter_node():
    source = (MODULE / "MedAutoLabelLib" / "parameters.py").read_text(encoding="utf-8")
    declared = set(re.findall(r"^\s{8}(\w+): ", source, re.M))
    bound = set()
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.add(prop.find("string").text)
    assert bound and bound <= declared, (bound, declared)


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert cmake_file_lists.listed("SCRIPTS", text) == cmake_file_lists.scripts(), \
        "run: python tools/cmake_file_lists.py"
    assert cmake_file_lists.listed("RESOURCES", text) == cmake_file_lists.resources()
    assert "medautolabel/catalog/models/vessel-nerve-cta/model.pt" in cmake_file_lists.resources()
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in text
        assert (MODULE / resource.replace("${MODULE_NAME}", "MedAutoLabel")).is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_metadata():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(MedAutoLabel)" in top and "add_subdirectory(MedAutoLabel)" in top
    entry = json.loads((ROOT / "MedAutoLabel.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier", "dicom_support_rule"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == "Segmentation"
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "MedAutoLabel.s4ext").read_text(encoding="utf-8").splitlines()
                 if line and not line.startswith("#") and " " in line)
    assert s4ext["category"] == "Segmentation" and s4ext["scmurl"] == entry["scm_url"]


def test_glue_never_imports_qt():
    for path in (MODULE / "MedAutoLabelLib").glob("*.py"):
        assert not re.search(r"^\s*(import qt|from qt\b|import ctk)", path.read_text(encoding="utf-8"), re.M), path.name
    engine = "\n".join(p.read_text(encoding="utf-8") for p in (MODULE / "medautolabel").rglob("*.py"))
    assert not re.search(r"^\s*(import|from) (slicer|qt|vtk)\b", engine, re.M)
