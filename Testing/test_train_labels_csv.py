"""Training from case-level labels in ``labels.csv`` (issue #15): dataset layouts, refusals, a three-class task,
and a classification-only model that ``medautolabel label`` and the Slicer glue use.

Volumes are tiny synthetic CT-like images (24^3 voxels of 1.5 mm, soft tissue ~40 HU, with or without
a bright blob); classifiers are tiny ResNets on a 16^3 whole-image input trained for 1-2 epochs.
Refusals run ``medautolabel train`` in-process and check the corpus's promises (Testing/hostile.py):
exit 2, one line naming the file and the problem, inputs untouched, and no model folder made.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
from hostile import Snapshot, assert_refused, run_inprocess
from test_io import NORMAL, _blob_volume, _write_series

from medautolabel.image import Image
from medautolabel.io.images import write_image
from medautolabel.training.config import ConfigError, load_config
from medautolabel.training.data import load_dataset, unlabelled
from medautolabel.training.preflight import segmentation_wanted

torch.set_num_threads(1)
SIZE = 24
TINY_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 16, 32], "conv1_t_size": 3,
               "conv1_t_stride": 2}
WHOLE = {"region": "whole", "shape": [16, 16, 16]}


def ct_volume(seed: int, blob_hu: Optional[float] = None) -> Image:
    """Soft tissue (~40 HU) on a 24^3 grid of 1.5 mm, with a bright sphere of ``blob_hu`` when given."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 15, (SIZE,) * 3)
    if blob_hu is not None:
        k, j, i = np.indices(hu.shape)
        centre = rng.uniform(8, SIZE - 8, 3)
        hu[(k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 < 16] = blob_hu
    return Image(hu.astype(np.int16), np.diag([1.5, 1.5, 1.5, 1.0]), {})


def mask_of(image: Image) -> Image:
    return Image((image.array > 200).astype(np.uint8), image.ijk_to_ras, {})


def write_table(path: Path, rows: Sequence[Sequence[str]], header: Sequence[str] = ("case", "task", "class")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def finding_rows(names: Sequence[str]) -> List[List[str]]:
    """Every second case has the finding (its image has the blob: see ``plain_folder``)."""
    return [[name, "finding", "present" if n % 2 else "absent"] for n, name in enumerate(names)]


def plain_folder(root: Path, n: int = 8, exts: Sequence[str] = (".nii.gz",)) -> List[str]:
    """``n`` images (extensions taken in turn) in ``root``; every second one has a bright blob. Returns case names."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for c in range(n):
        name = f"case{c:02d}"
        write_image(ct_volume(c, 600.0 if c % 2 else None), root / f"{name}{exts[c % len(exts)]}")
        names.append(name)
    return names


def msd_folder(root: Path, n: int = 8, masks: Optional[Sequence[int]] = None, dataset_json: bool = True) -> List[str]:
    """imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz for the cases in ``masks`` (default: all), dataset.json."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = []
    for c in range(n):
        name = f"p{c:02d}"
        image = ct_volume(100 + c, 600.0 if c % 2 else 300.0)
        write_image(image, root / "imagesTr" / f"{name}_0000.nii.gz")
        if masks is None or c in masks:
            write_image(mask_of(image), root / "labelsTr" / f"{name}.nii.gz")
        names.append(name)
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({
            "name": "blobs", "channel_names": {"0": "CT"}, "labels": {"background": 0, "blob": 1},
            "file_ending": ".nii.gz"}))
    return names


def write_config(path: Path, classifiers: Sequence[Dict], **extra) -> Path:
    cfg = {"model": {"id": "cls"}, "input": {"channels": [{"name": "ct", "window": [-200, 600]}]},
           "preprocessing": {"orientation": "RAS", "spacing": None, "crop_foreground": None, "axis_order": "kji"},
           "validation": {"fraction": 0.25}, "threads": 1, "seed": 3, "classifiers": list(classifiers)}
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return path


def classifier(task: str, **extra) -> Dict:
    return dict({"task": task, "epochs": 2, "batch_size": 4, "parameters": TINY_RESNET, "input": WHOLE}, **extra)


# --- layouts -------------------------------------------------------------------------------------------------

def test_msd_folder_with_dataset_json_masks_and_labels_csv(tmp_path):
    names = msd_folder(tmp_path / "d")
    write_table(tmp_path / "d" / "labels.csv", finding_rows(names))
    ds = load_dataset(tmp_path / "d")
    assert [c.name for c in ds.cases] == names
    assert all(c.label is not None and c.label.name == f"{c.name}.nii.gz" for c in ds.cases)
    assert ds.labels == {1: "blob"} and ds.classes == {"finding": ("absent", "present")}
    assert [c.classes for c in ds.cases[:2]] == [{"finding": "absent"}, {"finding": "present"}]
    assert ds.class_file == tmp_path / "d" / "labels.csv" and unlabelled(ds) == {}
    assert segmentation_wanted(load_config({}), ds)


def test_images_tr_without_dataset_json_or_masks(tmp_path):
    names = msd_folder(tmp_path / "d", masks=[], dataset_json=False)
    (tmp_path / "d" / "labelsTr").rmdir()
    # cells may carry the file's extension and _0000: they name the same case, as in evaluate
    rows = finding_rows(names)
    rows[0][0] = f"{names[0]}_0000.nii.gz"
    write_table(tmp_path / "d" / "labels.csv", rows[:-1])  # the last case has no row
    ds = load_dataset(tmp_path / "d")
    assert [c.name for c in ds.cases] == names and all(c.label is None for c in ds.cases)
    assert ds.cases[0].classes == {"finding": "absent"} and ds.cases[-1].classes == {}
    assert unlabelled(ds) == {"finding": 1} and ds.labels == {}
    assert not segmentation_wanted(load_config({}), ds)  # no masks: classifiers only
    write_image(ct_volume(7), tmp_path / "d" / "imagesTr" / f"{names[2]}_0001.nii.gz")
    with pytest.raises(ConfigError, match="p02_0001.nii.gz: several input images per case"):
        load_dataset(tmp_path / "d")


def test_images_tr_with_some_masks_and_no_dataset_json(tmp_path):
    names = msd_folder(tmp_path / "d", masks=[0, 2, 3], dataset_json=False)
    write_table(tmp_path / "d" / "labels.csv", finding_rows(names))
    ds = load_dataset(tmp_path / "d")
    assert [c.label is not None for c in ds.cases] == [c in (0, 2, 3) for c in range(len(names))]
    with pytest.raises(ConfigError, match=r"p01_0000.nii.gz: case 1 has no mask \(5 of 8 cases have none\)"):
        segmentation_wanted(load_config({}), ds)
    assert not segmentation_wanted(load_config({"train_segmentation": False}), ds)


def test_plain_folder_of_nifti_nrrd_metaimage_and_dicom(tmp_path):
    root = tmp_path / "d"
    names = plain_folder(root, 6, exts=(".nii.gz", ".nrrd", ".mha"))
    _write_series(root / "series7", _blob_volume(4, 1), [s * 2.0 * NORMAL for s in range(4)])
    rows = finding_rows(names) + [["series7", "finding", "present"], ["case00", "grade", "low"],
                                  ["case01", "grade", "mid"], ["case02", "grade", "high"]]
    write_table(root / "labels.csv", rows)
    ds = load_dataset(root)
    assert sorted(c.name for c in ds.cases) == sorted(names + ["series7"])
    dicom = next(c for c in ds.cases if c.name == "series7")
    assert dicom.image == (root / "series7").resolve() and dicom.classes == {"finding": "present"}
    assert all(c.label is None for c in ds.cases)
    assert ds.classes == {"finding": ("absent", "present"), "grade": ("low", "mid", "high")}
    assert unlabelled(ds) == {"grade": 4}


def test_dataset_json_classes_with_three_classes_and_the_binary_form(tmp_path):
    names = msd_folder(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    grades = ["low", "mid", "high"]
    meta.update(classes={"grade": grades, "finding": ["absent", "present"]}, training=[
        {"image": f"./imagesTr/{n}_0000.nii.gz", "label": f"./labelsTr/{n}.nii.gz",
         "classes": {"grade": grades[c % 3], "finding": "present" if c % 2 else "absent"}}
        for c, n in enumerate(names)])
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path / "d")
    assert ds.classes == {"grade": ("low", "mid", "high"), "finding": ("absent", "present")}
    assert ds.cases[4].classes == {"grade": "mid", "finding": "absent"} and ds.cases[4].name == "p04"
    assert ds.class_file == tmp_path / "d" / "dataset.json"
    meta["classes"]["grade"] = ["low"]
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="two or more"):
        load_dataset(tmp_path / "d")


def test_datalist_entries_without_masks_take_labels_csv_beside_the_file(tmp_path):
    names = plain_folder(tmp_path / "images", 4)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": f"images/{n}.nii.gz"} for n in names[:3]],
                                    "validation": [{"image": f"images/{names[3]}.nii.gz"}]}))
    write_table(tmp_path / "labels.csv", finding_rows(names))
    ds = load_dataset(datalist)
    assert [c.label for c in ds.all_cases()] == [None] * 4 and ds.validation[0].classes == {"finding": "present"}
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(ConfigError, match="no masks and no case labels"):
        load_dataset(datalist)


def test_a_folder_with_neither_dataset_json_nor_labels_csv_is_no_dataset(tmp_path):
    plain_folder(tmp_path / "d", 2)
    with pytest.raises(ConfigError, match="expected dataset.json .* or labels.csv"):
        load_dataset(tmp_path / "d")


# --- refusals through the command line: exit 2, one line, nothing made ----------------------------------------

def refused(tmp_path: Path, data: Path, names: Sequence[str], words: Sequence[str],
            config: Optional[Path] = None, *extra: str) -> None:
    out = tmp_path / "model"
    before = Snapshot(data, *([config] if config else []))
    args = ["train", data, "-o", out, "--device", "cpu"] + (["--config", config] if config else []) + list(extra)
    assert_refused(run_inprocess(args), names, words, untouched=before, no_files_in=[out])
    assert not out.exists()  # refused before the model folder is made


@pytest.fixture()
def plain(tmp_path):
    root = tmp_path / "d"
    return root, plain_folder(root, 8)


@pytest.mark.parametrize("rows, header, words", [
    ([["ghost", "finding", "present"]], None, ["row 10", "case 'ghost' has no image"]),
    ([["case03", "finding", "present"]], None, ["row 10", "case 'case03'", "one row per case and task"]),
    ([["case00", "other", "yes"]], None, ["task 'other'", "only one class"]),
    ([], ("case", "klass", "task"), ["row 1", "lacks the column 'class'"]),
], ids=["unknown-case", "duplicate-row", "one-class", "missing-column"])
def test_bad_labels_csv_is_refused(tmp_path, plain, rows, header, words):
    root, names = plain
    table = write_table(root / "labels.csv", finding_rows(names) + rows, header or ("case", "task", "class"))
    refused(tmp_path, root, [str(table)], words, write_config(tmp_path / "cfg.json", [classifier("finding")]))


def test_classifier_for_a_task_without_case_labels_is_refused(tmp_path, plain):
    root, names = plain
    write_table(root / "labels.csv", finding_rows(names))
    cfg = write_config(tmp_path / "cfg.json", [classifier("finding"), classifier("aneurysm")])
    refused(tmp_path, root, [str(cfg)], ["classifiers[1].task", "'aneurysm' has no case labels",
                                         "labels.csv tasks: 'finding'"], cfg)


@pytest.mark.parametrize("bad, words", [
    ({"input": {"region": "whole", "shape": [16, 16]}}, ["classifiers[1]", "classification[0].input.shape"]),
    ({"architecture": "Perceptron"}, ["classifiers[1]", "'Perceptron' cannot be trained"]),
    ({"input": {"region": "segment", "segment": "blob", "shape": [16, 16, 16]}}, ["classifiers[1]", "segment"]),
], ids=["shape", "architecture", "segment-without-masks"])
def test_classifier_card_problems_are_refused_before_any_training(tmp_path, plain, bad, words):
    root, names = plain
    write_table(root / "labels.csv", finding_rows(names) + [[n, "grade", "ab"[c % 2]] for c, n in enumerate(names)])
    cfg = write_config(tmp_path / "cfg.json", [classifier("finding"), classifier("grade", **bad)])
    refused(tmp_path, root, [str(cfg)], words, cfg)  # the good first classifier was not trained either


def test_a_segment_region_needs_masks_on_its_labelled_cases(tmp_path):
    from thresholdmodel import write_threshold_model

    base = write_threshold_model(tmp_path / "base")
    root = tmp_path / "d"
    names = msd_folder(root, masks=[0, 1, 2, 3, 4, 5])
    write_table(root / "labels.csv", finding_rows(names))
    cfg = write_config(tmp_path / "cfg.json", [classifier(
        "finding", input={"region": "segment", "segment": "Vessel", "shape": [16, 16, 16]})])
    refused(tmp_path, root, [str(cfg)], ["classifiers[0].input.region", "needs a mask for every case labelled",
                                         "2 have none"], cfg, "--from", str(base), "--classifiers-only")


def test_too_few_cases_of_a_class_are_refused_before_any_training(tmp_path, plain):
    root, names = plain
    rows = finding_rows(names) + [[n, "grade", "rare" if c == 0 else "common"] for c, n in enumerate(names)]
    table = write_table(root / "labels.csv", rows)
    cfg = write_config(tmp_path / "cfg.json", [classifier("finding"), classifier("grade")])
    refused(tmp_path, root, [str(table)], ["task 'grade'", "class 'rare' has 1 case(s)"], cfg)


def test_labels_in_both_labels_csv_and_dataset_json_are_refused(tmp_path):
    root = tmp_path / "d"
    names = msd_folder(root)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(dict(meta, classes={"finding": ["absent", "present"]})))
    write_table(root / "labels.csv", finding_rows(names))
    refused(tmp_path, root, [str(root / "dataset.json")], ["case labels in both labels.csv", "keep one"])


def test_masks_on_some_cases_only_are_refused_for_segmentation(tmp_path):
    root = tmp_path / "d"
    names = msd_folder(root, masks=[0, 1, 2, 4, 5, 6, 7])
    write_table(root / "labels.csv", finding_rows(names))
    refused(tmp_path, root, ["p03_0000.nii.gz"], ["case 3 has no mask", "1 of 8", "--classifiers-only"])


def test_more_than_two_classes_need_a_classifier_entry_when_segmenting(tmp_path):
    root = tmp_path / "d"
    names = msd_folder(root)
    table = write_table(root / "labels.csv", [[n, "grade", "abc"[c % 3]] for c, n in enumerate(names)])
    refused(tmp_path, root, [str(table)], ["task 'grade' has 3 classes", "voxel_evidence", "'classifiers' entry"])


# --- training and labelling --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classification-only model from a plain folder + labels.csv: "finding" (2 classes) and "grade" (3 classes,
    two cases without a row), trained through the command line."""
    from medautolabel.cli.app import main

    tmp = tmp_path_factory.mktemp("trained")
    names = plain_folder(tmp / "data", 12)
    grades = [[n, "grade", ("low", "mid", "high")[c % 3]] for c, n in enumerate(names[:-2])]
    write_table(tmp / "data" / "labels.csv", finding_rows(names) + grades)
    cfg = write_config(tmp / "cfg.json", [classifier("finding"), classifier("grade", epochs=1)])
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        status = main(["train", str(tmp / "data"), "-o", str(tmp / "model"), "--config", str(cfg), "--device", "cpu"])
    lines = buffer.getvalue().splitlines()
    assert status == 0, lines
    return tmp, lines


def test_labels_csv_dataset_trains_a_classification_only_model(trained):
    from medautolabel.catalog.modelcard import ModelCard

    tmp, lines = trained
    card = ModelCard.from_dict(json.loads((tmp / "model" / "model.json").read_text()), tmp / "model" / "model.json")
    assert card.network is None and card.labels == []
    assert [(t.task, t.method, list(t.classes)) for t in card.classification] == [
        ("finding", "network", ["absent", "present"]), ("grade", "network", ["low", "mid", "high"])]
    assert sorted(p.name for p in (tmp / "model").iterdir()) == [
        "classifier-finding.pt", "classifier-grade.pt", "model.json"]
    assert [line for line in lines if "no label" in line] == [
        "note: 2 case(s) have no label for task 'grade': they sit out that task"]


def test_the_model_labels_with_three_class_probabilities(trained):
    from medautolabel.cli.app import main

    tmp, _ = trained
    write_image(ct_volume(99, 600.0), tmp / "new.nii.gz")
    assert main(["label", str(tmp / "new.nii.gz"), "--model", str(tmp / "model"), "-o", str(tmp / "out"),
                 "--device", "cpu"]) == 0
    tags = json.loads((tmp / "out" / "new.tags.json").read_text())
    by_task = {c["task"]: c for c in tags["classifications"]}
    assert sorted(by_task) == ["finding", "grade"] and all(c["method"] == "network" for c in by_task.values())
    grade = by_task["grade"]["probabilities"]
    assert sorted(grade) == ["high", "low", "mid"] and sum(grade.values()) == pytest.approx(1.0, abs=1e-6)
    assert sum(by_task["finding"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_slicer_logic_labels_with_the_trained_model(trained):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from slicercore import close_scene, make_scene

    from MedAutoLabelLib.logic import MedAutoLabelLogic

    tmp, _ = trained
    write_image(ct_volume(98), tmp / "slicer-in" / "scan.nrrd")
    scene = make_scene()
    try:
        records = MedAutoLabelLogic(scene).processFiles([tmp / "slicer-in" / "scan.nrrd"], tmp / "slicer-out",
                                                        model=str(tmp / "model"), device="cpu")
    finally:
        close_scene(scene)
    assert [r["status"] for r in records] == ["ok"]
    tags = json.loads((tmp / "slicer-out" / "scan.tags.json").read_text())
    assert {c["task"]: c["method"] for c in tags["classifications"]} == {"finding": "network", "grade": "network"}


def test_masks_and_labels_csv_train_segmentation_then_a_segment_classifier(tmp_path):
    """With masks, one command trains the segmentation network, then a classifier boxed on its segment."""
    from medautolabel.catalog.modelcard import ModelCard
    from medautolabel.cli.app import main

    root = tmp_path / "d"
    names = msd_folder(root)
    write_table(root / "labels.csv", finding_rows(names))
    unet = {"architecture": "UNet", "parameters": {"spatial_dims": 3, "channels": [4, 8], "strides": [2],
                                                   "num_res_units": 1, "norm": "instance"}}
    cfg = write_config(tmp_path / "cfg.json", [classifier("finding", epochs=1, input={
        "region": "segment", "segment": "blob", "margin_mm": 3, "shape": [16, 16, 16]})], network=unet,
        patch_size=[16, 16, 16], epochs=1, iterations_per_epoch=2, cache={"path": str(tmp_path / "c.h5")})
    assert main(["train", str(root), "-o", str(tmp_path / "model"), "--config", str(cfg), "--device", "cpu"]) == 0
    card = ModelCard.load(tmp_path / "model")
    assert card.network is not None and [x.name for x in card.labels] == ["blob"]
    assert [(t.task, t.method, t.input.region) for t in card.classification] == [("finding", "network", "segment")]
    write_image(ct_volume(97, 600.0), tmp_path / "new.nii.gz")
    assert main(["label", str(tmp_path / "new.nii.gz"), "--model", str(tmp_path / "model"), "-o", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    tags = json.loads((tmp_path / "out" / "new.tags.json").read_text())
    assert [(c["task"], c["method"]) for c in tags["classifications"]] == [("finding", "network")]
