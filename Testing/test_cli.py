"""One test per ``medautolabel`` command, run in-process through ``cli.main`` (and once as a process)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicerio
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel import __version__
from medautolabel.cli.app import build_parser, main
from medautolabel.io.images import read_image, write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


@pytest.fixture()
def scan(tmp_path):
    path = tmp_path / "in" / "case01.nii.gz"
    path.parent.mkdir()
    write_image(sphere_image(), path)
    return path


def test_label_writes_a_segmentation_slicer_reads_and_tags(model_dir, scan, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["label", str(scan), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case01.seg.nrrd", "case01.tags.json"]
    seg = slicerio.read_segmentation(str(out / "case01.seg.nrrd"))
    names = {s["name"]: s for s in seg["segments"]}
    assert set(names) == {"Vessel", "Nerve"}
    assert names["Vessel"]["terminology"]["type"] == ["SCT", "59820001", "Blood vessel"]
    assert int((seg["voxels"] == names["Vessel"]["labelValue"]).sum()) > 1000
    tags = json.loads((out / "case01.tags.json").read_text(encoding="utf-8"))
    assert tags["format"] == "medautolabel-tags/1" and tags["labelmap_file"] == "case01.seg.nrrd"
    assert tags["classifications"][0]["task"] == "aneurysm" and tags["classifications"][0]["label"] == "absent"
    assert tags["provenance"]["model"]["id"] == "threshold"
    printed = capsys.readouterr().out
    assert printed.startswith("case01: case01.seg.nrrd") and "Vessel 1.4" in printed  # 4/3 pi 7^3 = 1.44 mL


def test_label_nifti_format_with_label_table(model_dir, scan, tmp_path):
    out = tmp_path / "out"
    assert main(["label", str(scan), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q",
                 "--format", "nii.gz", "--precision", "float32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case01.labels.csv", "case01.nii.gz", "case01.tags.json"]
    provenance = json.loads((out / "case01.tags.json").read_text(encoding="utf-8"))["provenance"]
    assert provenance["precision"] == "float32" and provenance["amp"] is False
    img = nib.load(str(out / "case01.nii.gz"))
    np.testing.assert_allclose(img.affine, nib.load(str(scan)).affine, atol=1e-4)
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) == {0, 1}
    rows = list(csv.reader((out / "case01.labels.csv").open()))
    assert [r[:2] for r in rows[1:]] == [["1", "Vessel"], ["2", "Nerve"]]


def test_label_skips_finished_outputs_and_overwrites_on_request(model_dir, scan, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["label", str(scan), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q"]
    assert main(args) == 0
    seg = out / "case01.seg.nrrd"
    before = seg.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "case01: skipped" in capsys.readouterr().out and seg.stat().st_mtime_ns == before
    assert main(args + ["--overwrite"]) == 0
    assert seg.stat().st_mtime_ns != before


def test_label_several_inputs_one_bad_goes_on_and_exits_2(model_dir, scan, tmp_path, capsys):
    bad = scan.parent / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    status = main(["label", str(bad), str(scan), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "-q"])
    assert status == 2
    assert sorted(p.name for p in out.iterdir()) == ["case01.seg.nrrd", "case01.tags.json"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


@pytest.mark.slow
def test_demo_writes_five_files_and_prints_dice(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phantom-reference.seg.nrrd", "phantom.nrrd", "phantom.png",
                                                      "phantom.seg.nrrd", "phantom.tags.json"]
    printed = capsys.readouterr().out
    dice = {m[0]: float(m[1]) for m in re.findall(r"^(\w+): Dice ([0-9.]+)", printed, re.M)}
    assert set(dice) == {"Vessel", "Nerve"}
    assert dice["Vessel"] > 0.6 and dice["Nerve"] > 0.5, printed  # a floor: a broken model scores ~0
    # the built-in aneurysm tag missed its validation targets (#15): the demo says so beside it
    assert re.search(r"^aneurysm: (present|absent), p=[01]\.\d\d NOT VALIDATED \(truth: (present|absent)\)$", printed, re.M)
    ref = slicerio.read_segmentation(str(out / "phantom-reference.seg.nrrd"))
    image = read_image(out / "phantom.nrrd")
    assert ref["voxels"].shape == image.array.shape[::-1]  # slicerio: (i, j, k)
    from PIL import Image as PILImage

    png = PILImage.open(out / "phantom.png")
    assert png.width > 600 and png.height > 300


def test_phantoms_writes_an_msd_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["phantoms", "-o", str(out), "-n", "2", "--seed", "1000500", "-q"]) == 0
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 2 and meta["labels"] == {"0": "background", "1": "vessel", "2": "nerve"}
    assert [c["seed"] for c in meta["training"]] == [1000500, 1000501]
    for case in meta["training"]:
        image = read_image(out / case["image"])
        label = read_image(out / case["label"])
        assert image.array.shape == label.array.shape
        np.testing.assert_allclose(image.ijk_to_ras, label.ijk_to_ras, atol=1e-4)
        assert case["classes"]["aneurysm"] in ("present", "absent")
        assert (label.array == 1).sum() > 100 and (label.array == 2).sum() > 10
    assert "wrote 2 phantoms" in capsys.readouterr().out


def test_models_list_shows_the_builtin_model(capsys):
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "VERSION", "MODALITY", "LABELS", "CLASSES", "SOURCE"]
    row = next(line for line in lines if line.startswith("vessel-nerve-cta"))
    assert "Vessel, Nerve" in row and "aneurysm" in row and row.rstrip().endswith("built-in")


def test_models_show_gives_labels_codes_and_provenance(model_dir, capsys):
    assert main(["models", "show", "vessel-nerve-cta"]) == 0
    text = capsys.readouterr().out
    assert "SCT:59820001 Blood vessel" in text and "SCT:3057000 Nerve" in text
    assert "0.8 x 0.8 x 0.8 mm" in text and "command: python tools/builtin_recipe.py" in text
    assert main(["models", "show", str(model_dir)]) == 0
    assert capsys.readouterr().out.startswith("threshold 0.0.1")


@pytest.mark.parametrize("command", [[], ["label"], ["demo"], ["phantoms"], ["models"], ["models", "list"],
                                     ["models", "show"], ["train"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main(command + ["--help"])
    assert stop.value.code == 0
    assert "usage: medautolabel" in capsys.readouterr().out


def test_train_is_registered():
    actions = {a.dest: a for a in build_parser()._actions}
    assert {"label", "demo", "phantoms", "models", "train"} <= set(actions["command"].choices)


def test_python_dash_m_runs_the_command():
    run = subprocess.run([sys.executable, "-m", "medautolabel", "--version"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0 and run.stdout.strip() == f"medautolabel {__version__}"


def test_the_console_script_freezes_the_collector_before_exiting_with_mains_status(monkeypatch):
    import gc
    from importlib import metadata

    from medautolabel.cli import app as cli

    events = []
    monkeypatch.setattr(cli, "main", lambda: events.append("main") or 2)
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    assert exit_info.value.code == 2 and events == ["main", "freeze"]
    scripts = {e.name: e.value for e in metadata.distribution("medautolabel").entry_points
               if e.group == "console_scripts"}
    assert scripts["medautolabel"] == "medautolabel.cli:run"


@pytest.mark.slow
def test_a_labelling_process_ends_with_complete_files_slicerio_reads(model_dir, scan, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "medautolabel", "label", str(scan), "-o", str(out), "-q",
                          "--model", str(model_dir), "--device", "cpu"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    seg = slicerio.read_segmentation(str(out / "case01.seg.nrrd"))
    vessel = next(s for s in seg["segments"] if s["name"] == "Vessel")
    assert int((seg["voxels"] == vessel["labelValue"]).sum()) > 1000
    tags = json.loads((out / "case01.tags.json").read_text(encoding="utf-8"))
    assert tags["labelmap_file"] == "case01.seg.nrrd"


def test_label_files_reads_the_next_input_while_labelling(model_dir, scan, tmp_path, monkeypatch):
    """Inputs are read on a reader thread, one ahead; a bad one in the middle is still that case's error."""
    import threading

    from medautolabel.io import images as io_module
    from medautolabel.labelling.batch import label_files

    inputs = []
    for name in ("a", "b", "c"):
        target = scan.parent / f"{name}.nii.gz"
        target.write_bytes(scan.read_bytes() if name != "b" else b"not an image")
        inputs.append(target)
    seen = []
    real = io_module.read_image
    monkeypatch.setattr(io_module, "read_image", lambda p: seen.append((Path(p).name, threading.current_thread().name))
                        or real(p))
    records = label_files(inputs, tmp_path / "out", model=str(model_dir), device="cpu")
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "b.nii.gz" in records[1]["message"]
    assert [name for name, _ in seen] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert all(thread.startswith("medautolabel-read") for _, thread in seen)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.seg.nrrd", "a.tags.json", "c.seg.nrrd",
                                                                    "c.tags.json"]
