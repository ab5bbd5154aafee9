"""A classification-only model (classifier networks, no segmentation network) through every door of the
engine (#15 item 1): ``label``, ``label_files``, ``batch`` and its summary.csv, ``models list/show``, the PNG
overview, the demo; and the commands that need a segmentation network refuse it in one line.

The model's tags are known in closed form (classifiermodel.py); files are read back with independent
readers (slicerio, nibabel, csv, json, PIL).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re

import nibabel
import numpy as np
import pytest
from classifiermodel import EXPECTED, write_classifier_model
from hostile import run_inprocess
from thresholdmodel import sphere_image

from medautolabel.catalog.registry import resolve_model
from medautolabel.geometry import ijk_to_lps
from medautolabel.image import Image
from medautolabel.io.images import write_image
from medautolabel.labelling.batch import label_files
from medautolabel.labelling.cluster_batch import label_case, write_summary
from medautolabel.options import LabelOptions

slicerio = pytest.importorskip("slicerio")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_classifier_model(tmp_path_factory.mktemp("classifier-only"))


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return write_image(sphere_image(), tmp_path_factory.mktemp("in") / "scan.nrrd")


def check_tags(facts: dict) -> None:
    """The known tags, in the card's order, each made by a network and carrying its validation."""
    tags = facts["classifications"]
    assert [t["task"] for t in tags] == list(EXPECTED)
    for t in tags:
        label, p, low, validated = EXPECTED[t["task"]]
        assert (t["label"], t["low_confidence"], t["validated"], t["method"]) == (label, low, validated, "network")
        assert t["probability"] == pytest.approx(p, abs=1e-5)
        assert sum(t["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert facts["segments"] == []


def test_label_command_writes_the_tags_and_a_segmentation_without_segments(model_dir, scan, tmp_path):
    out = tmp_path / "out"
    outcome = run_inprocess(["label", scan, "-o", out, "--model", model_dir, "--device", "cpu", "-q"])
    assert outcome.status == 0, outcome.err
    assert sorted(p.name for p in out.iterdir()) == ["scan.seg.nrrd", "scan.tags.json"]

    seg = slicerio.read_segmentation(str(out / "scan.seg.nrrd"))
    image = sphere_image()
    assert seg["segments"] == []
    assert seg["voxels"].shape == image.array.shape[::-1] and not seg["voxels"].any()  # slicerio: (i, j, k)
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps(image), atol=1e-6)  # on the input's own grid

    facts = json.loads((out / "scan.tags.json").read_text(encoding="utf-8"))
    check_tags(facts)
    prov = facts["provenance"]
    assert "weights" not in prov["model"] and prov["model"]["id"] == "classifier-only"
    assert [(c["task"], c["architecture"], c["region"]) for c in prov["classifiers"]] == [
        ("aneurysm", "ResNet", "whole"), ("findings", "ResNet", "whole")]
    for c in prov["classifiers"]:
        assert c["weights_sha256"] == hashlib.sha256((model_dir / c["weights"]).read_bytes()).hexdigest()

    (line,) = outcome.out
    assert re.fullmatch(r"scan: scan\.seg\.nrrd \(\d+\.\d s\) "
                        r"aneurysm: present p=0\.73 \(not validated\); findings/stenosis: present p=0\.95; "
                        r"findings/calcification: absent p=0\.95; findings/occlusion: absent p=0\.38", line), line


def test_label_command_as_nifti_writes_an_empty_labelmap_and_label_table(model_dir, scan, tmp_path):
    out = tmp_path / "out"
    outcome = run_inprocess(["label", scan, "-o", out, "--model", model_dir, "--device", "cpu", "--format",
                             "nii.gz", "-q"])
    assert outcome.status == 0, outcome.err
    labelmap = nibabel.load(str(out / "scan.nii.gz"))
    assert labelmap.shape == sphere_image().array.shape[::-1] and not np.asarray(labelmap.dataobj).any()
    with open(out / "scan.labels.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["value", "name", "r", "g", "b", "terminology"]]
    check_tags(json.loads((out / "scan.tags.json").read_text(encoding="utf-8")))


def test_label_files_labels_several_inputs_and_skips_finished_ones(model_dir, scan, tmp_path):
    second = write_image(sphere_image("flipped-anisotropic"), tmp_path / "in" / "other.nii.gz")
    records = label_files([scan, second], tmp_path / "out", model=model_dir, device="cpu")
    assert [r["status"] for r in records] == ["ok", "ok"]
    for r in records:
        check_tags(r["facts"])
    again = label_files([scan, second], tmp_path / "out", model=model_dir, device="cpu")
    assert [r["status"] for r in again] == ["skipped", "skipped"]


def read_summary(path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_summary_row(row: dict) -> None:
    assert row["status"] == "ok"
    for tag, (label, p, _low, validated) in EXPECTED.items():
        assert row[tag] == label and float(row[f"{tag} p"]) == pytest.approx(p, abs=1e-4)
        assert row[f"{tag} validated"] == ("yes" if validated else "no")
    assert not [k for k in row if k.endswith(" mL")]  # no segments, no volume columns


def test_a_batch_case_and_its_summary_row_carry_every_tag(model_dir, scan, tmp_path):
    """What one Dask task does (``label_case``), then the summary the batch writes from its records."""
    out = tmp_path / "out"
    record = label_case(str(scan), str(out), str(model_dir), LabelOptions(device="cpu").to_mapping(), "seg.nrrd", 0)
    check_tags(record["facts"])
    (row,) = read_summary(write_summary([record], out / "summary.csv"))
    assert row["case"] == "scan"
    check_summary_row(row)


@pytest.mark.slow
def test_batch_command_on_dask(model_dir, tmp_path):
    pytest.importorskip("distributed")
    from medautolabel.cli.app import main

    for n, grid_name in enumerate(["axial", "permuted"]):
        write_image(sphere_image(grid_name), tmp_path / "in" / f"case{n}.nii.gz")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "-o", str(out), "--model", str(model_dir), "--device", "cpu",
                 "--workers", "1", "-q"]) == 0
    rows = read_summary(out / "summary.csv")
    assert sorted(r["case"] for r in rows) == ["case0", "case1"]
    for row in rows:
        check_summary_row(row)
        assert slicerio.read_segmentation(str(out / f"{row['case']}.seg.nrrd"))["segments"] == []


def test_models_list_and_show_describe_a_classification_only_model(model_dir, monkeypatch):
    monkeypatch.setenv("MEDAUTOLABEL_MODEL_PATH", str(model_dir))
    listed = run_inprocess(["models", "list"])
    assert listed.status == 0, listed.err
    (row,) = [line for line in listed.out if line.startswith("classifier-only ")]
    assert re.search(r"- \(classification only\)\s+aneurysm, findings\s+" + re.escape(str(model_dir)), row), row

    shown = run_inprocess(["models", "show", model_dir])
    assert shown.status == 0, shown.err
    text = "\n".join(shown.out)
    assert "network: none (classification only: labels nothing, gives tags)" in text and "labels:" not in text
    card = resolve_model(model_dir)
    assert ("  classification: aneurysm (absent / present) by network, NOT VALIDATED\n"
            f"    network: ResNet (aneurysm.pt, sha256 {card.classification[0].network.sha256})\n"
            "    looks at: whole, resampled to 16 x 16 x 16 voxels\n"
            "    softmax, temperature 2; decides: most probable class") in text
    assert ("  classification: findings (stenosis, calcification, occlusion; independent findings, one tag each "
            "as task/class (absent / present)) by network\n"
            "    network: ResNet (findings.pt, sha256 not given)\n"
            "    looks at: whole, resampled to 16 x 16 x 16 voxels\n"
            "    sigmoid, temperature 1; decides: present from p 0.5 (occlusion from p 0.7)") in text


def test_overview_png_draws_no_overlay_for_no_segments_and_a_line_per_tag(tmp_path):
    from PIL import Image as PILImage

    from medautolabel.io.render import PANEL_PX, overview_png

    image = sphere_image()
    empty = Image(np.zeros(image.array.shape, np.uint8), image.ijk_to_ras.copy())
    lines = ["model classifier-only"] + [f"{tag}: {label}, p={p:.2f}" for tag, (label, p, _, _) in EXPECTED.items()]
    path = overview_png(image, empty, {}, lines, tmp_path / "overview.png")
    png = np.asarray(PILImage.open(path).convert("RGB")).astype(int)
    assert png.shape[0] == PANEL_PX + 20 + 22 * len(lines) + 10
    panels = png[10:10 + PANEL_PX]
    assert (panels[..., 0] == panels[..., 1]).all()  # grey slices and yellow captions only: no label colour
    for n in range(len(lines)):  # every line is written in its own band
        band = png[PANEL_PX + 20 + 22 * n: PANEL_PX + 20 + 22 * (n + 1)]
        assert (band.min(axis=-1) > 200).sum() > 20


def test_export_bundle_refuses_a_classification_only_model_in_one_line(model_dir, tmp_path):
    outcome = run_inprocess(["models", "export-bundle", model_dir, tmp_path / "bundle"])
    assert outcome.status == 2 and outcome.out == []
    assert outcome.err == [f"medautolabel: error: {model_dir / 'model.json'}: is a classification-only model (no "
                           "segmentation network): exporting it as a MONAI bundle is not supported"]
    assert not (tmp_path / "bundle").exists()


def test_fine_tuning_refuses_a_classification_only_base_model(model_dir, tmp_path):
    from medautolabel.training.config import ConfigError, load_config
    from medautolabel.training.data import Dataset
    from medautolabel.training.export import plan_model

    with pytest.raises(ConfigError, match="is a classification-only model: it has no segmentation network to "
                                          r"fine-tune \(train its classifiers with --classifiers-only\)"):
        plan_model(load_config(None), Dataset(tmp_path, [], {1: "vessel"}, {}), resolve_model(model_dir),
                   tmp_path / "model")


def test_demo_with_a_classification_only_model(model_dir, tmp_path):
    from medautolabel.synthetic.demo import run_demo

    report = run_demo(tmp_path / "demo", device="cpu", model=model_dir)
    assert report.dice == {} and report.result.segments == []
    assert report.lines[1].startswith("aneurysm: present, p=0.73 NOT VALIDATED (truth: ")
    assert report.lines[2:] == ["findings/stenosis: present, p=0.95 (truth: ?)",
                                "findings/calcification: absent, p=0.95 (truth: ?)",
                                "findings/occlusion: absent, p=0.38 (truth: ?)"]
    reference = slicerio.read_segmentation(str(report.files["reference"]))  # the phantom's own labels
    assert [s["name"] for s in reference["segments"]] == ["Vessel", "Nerve"]
    assert slicerio.read_segmentation(str(report.files["segmentation"]))["segments"] == []
