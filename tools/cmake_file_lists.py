"""Rewrite the generated file lists in MedAutoLabel/CMakeLists.txt from the files on disk.

Slicer packages only the files a scripted module's CMakeLists.txt names; the test
Testing/test_slicer_packaging.py fails when the lists and the disk disagree. Run after adding or
removing a file:  python tools/cmake_file_lists.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Tuple

MODULE = Path(__file__).resolve().parent.parent / "MedAutoLabel"
CMAKE = MODULE / "CMakeLists.txt"
PACKAGES = ("MedAutoLabelLib", "medautolabel")
RESOURCE_PATTERNS = ("medautolabel/catalog/models/*/model.json", "medautolabel/catalog/models/*/*.pt",
                     "medautolabel/training/configs/*.json")


def scripts() -> List[str]:
    out = []
    for package in PACKAGES:
        out += sorted(p.relative_to(MODULE).as_posix() for p in (MODULE / package).rglob("*.py")
                      if "__pycache__" not in p.parts)
    return out


def resources() -> List[str]:
    out: List[str] = []
    for pattern in RESOURCE_PATTERNS:
        out += sorted(p.relative_to(MODULE).as_posix() for p in MODULE.glob(pattern))
    return out


def _block(text: str, name: str) -> Tuple[int, int]:
    begin = re.search(rf"^\s*# BEGIN GENERATED {name}.*$", text, re.M)
    end = re.search(rf"^\s*# END GENERATED {name}\s*$", text, re.M)
    if not begin or not end:
        raise SystemExit(f"{CMAKE}: markers for {name} not found")
    return begin.end(), end.start()


def listed(name: str, text: str = "") -> List[str]:
    text = text or CMAKE.read_text(encoding="utf-8")
    a, b = _block(text, name)
    return [line.strip() for line in text[a:b].splitlines() if line.strip()]


def rewrite() -> None:
    text = CMAKE.read_text(encoding="utf-8")
    for name, files in (("SCRIPTS", scripts()), ("RESOURCES", resources())):
        a, b = _block(text, name)
        text = text[:a] + "\n" + "".join(f"  {f}\n" for f in files) + text[b:]
    CMAKE.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    rewrite()
    sys.exit(0)
