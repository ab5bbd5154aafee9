"""Classifier networks (issue #15): model-card entries, the regions they look at, their decisions,
calibration by temperature, and a tiny classifier trained and used end to end.

1. A classifier card round-trips; every broken field is one line naming the file and the field,
   from ``ModelCard.load`` and from ``medautolabel label`` (exit 2, nothing written); weights
   that do not fit and a wrong sha256 are refused when loaded.
2. Regions ("whole", "tiles", "segment", "components") hold the physical place they should on oblique,
   flipped, permuted and anisotropic grids: a bright blob at a known RAS point is inside its
   region and bright at the voxel the region's matrix maps that point to.
3. Decisions: thresholds, max/mean over components, sigmoid findings, temperature, with networks
   whose logits are known.
4. Temperature scaling of an over-confident model's logits brings the ECE down, and the fitted
   temperature is the one the logits' construction implies.
5. A tiny ResNet trained by ``training.loop.train`` on small CT-like volumes with or without a
   bright blob separates held-out volumes labelled by ``label_image`` (ROC AUC > 0.8).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
from cardfactory import GRIDS, card_dict, grid, ras_coords, write_card
from hostile import Snapshot, assert_refused, run_inprocess
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import ModelError
from medautolabel.evaluation.metrics import expected_calibration_error, roc_auc
from medautolabel.image import Image, make_ijk_to_ras
from medautolabel.io.images import write_image
from medautolabel.labelling.classifier_input import classifier_inputs
from medautolabel.labelling.classify import classify, decide
from medautolabel.runtime import network

torch.set_num_threads(1)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache():
    network.clear_cache()
    yield
    network.clear_cache()


def resnet_parameters(in_channels: int, outputs: int) -> Dict[str, Any]:
    """A MONAI ResNet small enough to build and run in milliseconds."""
    return {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8], "spatial_dims": 3,
            "n_input_channels": in_channels, "num_classes": outputs}


def classifier_entry(in_channels: int = 2, **changes: Any) -> Dict[str, Any]:
    """A valid "network" classification entry: a ResNet on a box around the "Vessel" segment."""
    entry = {"task": "lesion", "classes": ["absent", "present"], "method": "network", "activation": "softmax",
             "network": {"architecture": "ResNet", "parameters": resnet_parameters(in_channels, 2),
                         "weights": "classifier-lesion.pt"},
             "input": {"region": "segment", "segment": "Vessel", "shape": [16, 16, 16], "margin_mm": 4.0,
                       "combine": "max"},
             "temperature": 1.5, "thresholds": {"present": 0.3}, "validated": True}
    entry.update(copy.deepcopy(changes))
    return entry


def classifier_card(**changes: Any) -> Dict[str, Any]:
    """The test card (cardfactory) with a classifier as its second task (``classification[1]``)."""
    d = card_dict()
    d["classification"].append(classifier_entry(**changes))
    return d


def classification_only_card(*tasks: Dict[str, Any]) -> Dict[str, Any]:
    """A card without a segmentation network: its tasks are classifier networks on the whole image."""
    d = card_dict(network=None, inference=None, segmentation=None, labels=[])
    d["classification"] = list(tasks) or [classifier_entry(input={"region": "whole", "shape": [16, 16, 16]})]
    return d


# ----------------------------------------------------------------------------- 1. card parsing


def test_classifier_cards_round_trip(tmp_path):
    sigmoid = classifier_entry(task="findings", classes=["calcified", "thrombosed", "ruptured"],
                               activation="sigmoid", thresholds={"ruptured": 0.2},
                               network={"architecture": "DenseNet121", "weights": "dn.pt",
                                        "parameters": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}},
                               input={"region": "components", "segment": "Nerve", "shape": [8, 12, 16],
                                      "spacing": [0.5, 0.6, 0.7], "margin_mm": 0.0, "combine": "mean",
                                      "channels": [{"name": "wide", "window": [-1000, 1000]}]})
    one_finding = classifier_entry(task="one", classes=["present"], activation="sigmoid", thresholds={},
                                   network={"architecture": "TorchScript", "weights": "one.ts", "parameters": {}},
                                   input={"region": "whole", "shape": [4, 4, 4]})
    for data in (classifier_card(), dict(classifier_card(), classification=[sigmoid, one_finding]),
                 classification_only_card()):
        path = write_card(tmp_path / "m", data)
        card = ModelCard.load(path)
        again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())), path)
        assert again == card
    card = ModelCard.load(write_card(tmp_path / "m", dict(classifier_card(), classification=[sigmoid, one_finding])))
    findings, one = card.classification
    assert findings.out_channels == 3 and findings.input.spacing == (0.5, 0.6, 0.7)
    assert findings.input.channels[0].window == (-1000.0, 1000.0) and findings.thresholds == {"ruptured": 0.2}
    assert one.out_channels is None and one.temperature == 1.5
    only = ModelCard.load(write_card(tmp_path / "o", classification_only_card()))
    assert not only.segments and only.labels == [] and only.inference is None
    assert only.file("classifier-lesion.pt") == tmp_path / "o" / "classifier-lesion.pt"


def _set(path: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    """An edit of the classifier entry (``classification[1]``): ``path`` like ``network.parameters.num_classes``."""
    def edit(d: Dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = d["classification"][1]
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _only_card_with_voxel_evidence(d: Dict[str, Any]) -> None:
    voxel = d["classification"][0]
    d.clear()
    d.update(classification_only_card())
    d["classification"].insert(0, voxel)


def _same_task_twice(d: Dict[str, Any]) -> None:
    d["classification"][1]["task"] = "aneurysm"


C1 = "classification[1]"
BROKEN_CLASSIFIERS = [
    # (id, edit, field named in the message, words of the problem)
    ("segment-not-a-label", _set("input.segment", "Tumour"), f"{C1}.input.segment",
     "is not one of the model's segments"),
    ("unknown-architecture", _set("network.architecture", "VGG16"), f"{C1}.network.architecture",
     "expected one of DenseNet121"),
    ("classes-vs-outputs", _set("network.parameters.num_classes", 3), f"{C1}.classes", "network has 3 output(s)"),
    ("no-output-count", lambda d: d["classification"][1]["network"]["parameters"].pop("num_classes"),
     f"{C1}.network.parameters", "expected 'out_channels' or 'num_classes'"),
    ("task-with-slash", _set("task", "lesion/size"), f"{C1}.task", "without \"/\""),
    ("temperature-0", _set("temperature", 0), f"{C1}.temperature", "expected a number > 0"),
    ("temperature-negative", _set("temperature", -1), f"{C1}.temperature", "expected a number > 0"),
    ("threshold-1", _set("thresholds", {"present": 1.0}), f"{C1}.thresholds.present", "between 0 and 1"),
    ("threshold-0", _set("thresholds", {"present": 0}), f"{C1}.thresholds.present", "between 0 and 1"),
    ("threshold-above-1", _set("thresholds", {"present": 1.5}), f"{C1}.thresholds.present", "between 0 and 1"),
    ("threshold-unknown-class", _set("thresholds", {"maybe": 0.5}), f"{C1}.thresholds.maybe",
     "is not one of the task's classes"),
    ("softmax-one-class", lambda d: d["classification"][1].update(
        classes=["present"], thresholds={}, network=dict(d["classification"][1]["network"],
                                                         parameters=resnet_parameters(2, 1))),
     f"{C1}.classes", "softmax needs at least 2 classes"),
    ("voxel-evidence-without-segmentation", _only_card_with_voxel_evidence, "classification[0].method",
     "does not have"),
    ("whole-with-a-segment", _set("input.region", "whole"), f"{C1}.input.segment", "region \"whole\""),
    ("segment-without-a-segment", lambda d: d["classification"][1]["input"].pop("segment"), f"{C1}.input.segment",
     "missing"),
    ("pretrained", _set("network.parameters.pretrained", True), f"{C1}.network.parameters.pretrained",
     "never downloaded"),
    ("in-channels", _set("network.parameters.n_input_channels", 5), f"{C1}.network.parameters.n_input_channels",
     "is 5 but the classifier gets"),
    ("spatial-dims-2", _set("network.parameters.spatial_dims", 2), f"{C1}.network.parameters.spatial_dims",
     "expected 3, got 2"),
    ("duplicate-task", _same_task_twice, f"{C1}.task", "used twice"),
    ("unknown-region", _set("input.region", "lobe"), f"{C1}.input.region", "expected one of whole"),
    ("shape-2d", _set("input.shape", [16, 16]), f"{C1}.input.shape", "expected 3 integers"),
    ("combine", _set("input.combine", "min"), f"{C1}.input.combine", "expected one of max, mean"),
    ("smoothing-on-a-network", _set("smoothing_mm", 1.0), f"{C1}.smoothing_mm", "is for method \"voxel_evidence\""),
    ("network-missing", lambda d: d["classification"][1].pop("network"), f"{C1}.network", "missing"),
    ("weights-outside", _set("network.weights", "../x.pt"), f"{C1}.network.weights", "inside the model folder"),
]
BROKEN_IDS = [b[0] for b in BROKEN_CLASSIFIERS]


@pytest.mark.parametrize("name,edit,field,problem", BROKEN_CLASSIFIERS, ids=BROKEN_IDS)
def test_broken_classifier_field_is_named_with_the_file(tmp_path, name, edit, field, problem):
    d = classifier_card()
    edit(d)
    path = write_card(tmp_path / "m", d)
    with pytest.raises(ModelError) as info:
        ModelCard.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field '{field}': "), message
    assert problem in message, message
    assert "\n" not in message


def _write_resnet(folder: Path, in_channels: int, outputs: int, name: str = "classifier-lesion.pt",
                  seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import ResNet

    torch.manual_seed(seed)
    net = ResNet(**resnet_parameters(in_channels, outputs)).eval()
    torch.save(net.state_dict(), folder / name)
    return net


def test_weights_that_do_not_fit_the_classifier_are_one_line(tmp_path):
    folder = tmp_path / "m"
    path = write_card(folder, classifier_card())
    _write_resnet(folder, 2, 3)  # three outputs where the card says two classes
    card = ModelCard.load(path)
    with pytest.raises(ModelError) as info:
        network.load_classifier(card, card.classification[1], CPU)
    message = str(info.value)
    assert message.startswith(f"{folder / 'classifier-lesion.pt'}: weights do not fit the ResNet"), message
    assert "tensor shapes differ" in message and "\n" not in message

    net = _write_resnet(folder, 2, 2)
    loaded = network.load_classifier(card, card.classification[1], CPU)
    x = torch.rand(1, 2, 16, 16, 16)
    torch.testing.assert_close(loaded(x), net(x))


def test_classifier_weights_with_another_sha256_are_refused(tmp_path):
    folder = tmp_path / "m"
    d = classifier_card()
    d["classification"][1]["network"]["sha256"] = "0" * 64
    path = write_card(folder, d)
    _write_resnet(folder, 2, 2)
    card = ModelCard.load(path)
    with pytest.raises(ModelError) as info:
        network.load_classifier(card, card.classification[1], CPU)
    message = str(info.value)
    assert message.startswith(f"{folder / 'classifier-lesion.pt'}: sha256 of the weights is "), message
    assert "not the one the card describes" in message and "\n" not in message


# --- the same refusals from `medautolabel label` (the threshold model with a classifier added)


@pytest.fixture(scope="module")
def classifier_model(tmp_path_factory):
    """The threshold model (one input channel, segments Vessel and Nerve) with a ResNet classifier on Vessel."""
    folder = write_threshold_model(tmp_path_factory.mktemp("classifier-model"))
    _write_resnet(folder, 1, 2)
    d = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    entry = classifier_entry(in_channels=1)
    entry["network"]["sha256"] = network.file_sha256(folder / "classifier-lesion.pt")
    d["classification"].append(entry)
    write_card(folder, d)
    return folder


def _label(image: Path, out: Path, model: Path):
    return run_inprocess(["label", image, "-o", out, "--model", model, "--device", "cpu", "-q"])


def test_a_valid_classifier_model_labels(classifier_model, tmp_path):
    image = write_image(sphere_image(), tmp_path / "scan.nrrd")
    outcome = _label(image, tmp_path / "out", classifier_model)
    assert outcome.status == 0, outcome.err
    tags = json.loads((tmp_path / "out" / "scan.tags.json").read_text(encoding="utf-8"))
    lesion = next(c for c in tags["classifications"] if c["task"] == "lesion")
    assert lesion["method"] == "network" and set(lesion["probabilities"]) == {"absent", "present"}
    [entry] = tags["provenance"]["classifiers"]
    assert entry["weights_sha256"] == network.file_sha256(classifier_model / "classifier-lesion.pt")


def _weights_of_another_size(folder: Path) -> None:
    """Found only when the weights are loaded: a state dict for three classes, its sha256 in the card."""
    _write_resnet(folder, 1, 3)
    d = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    d["classification"][1]["network"]["sha256"] = network.file_sha256(folder / "classifier-lesion.pt")
    write_card(folder, d)


def _damaged_weights(folder: Path) -> None:
    with open(folder / "classifier-lesion.pt", "ab") as f:
        f.write(b"\0")


AT_LOAD = {"weights-of-another-size": _weights_of_another_size, "weights-sha256": _damaged_weights}
CLI_CASES = [(name, edit, field, [problem]) for name, edit, field, problem in BROKEN_CLASSIFIERS] + [
    ("weights-of-another-size", AT_LOAD["weights-of-another-size"], "classifier-lesion.pt",
     ["weights do not fit", "ResNet"]),
    ("weights-sha256", AT_LOAD["weights-sha256"], "classifier-lesion.pt", ["sha256", "damaged"]),
]


@pytest.mark.parametrize("name,edit,field,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_label_with_a_broken_classifier_is_refused(classifier_model, tmp_path, name, edit, field, words):
    folder = tmp_path / "model"
    shutil.copytree(classifier_model, folder)
    at_load = name in AT_LOAD
    if at_load:
        edit(folder)
    else:
        d = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        edit(d)
        write_card(folder, d)
    image = write_image(sphere_image(), tmp_path / "scan.nrrd")
    snap = Snapshot(folder, image)
    out = tmp_path / "out"
    outcome = _label(image, out, folder)
    named = [field] if at_load else ["model.json", field]
    assert_refused(outcome, named, words, untouched=snap, no_temps_in=[tmp_path], no_files_in=[out])


# ----------------------------------------------------------------------------- 2. regions (ROI crops)

BLOB_A = np.array([5.0, -4.0, 3.0])  # RAS mm: the first component of the "Vessel" segment
BLOB_B = np.array([-5.0, 4.0, -4.0])  # the second one
BLOB_RADIUS = 3.5
BODY_RADIUS = 12.0
WIDE = [{"name": "wide", "window": [-1000, 1000]}]  # air 0, soft tissue 0.5, the blobs (1000 HU) 1


def blob_case(grid_name: str, blobs=(BLOB_A, BLOB_B), hu_of_blobs=(1000.0, 1000.0)):
    """(image, labelmap) on a named grid: air, a soft-tissue ball, bright blobs labelled "Vessel" (value 1)."""
    shape, m = grid(grid_name)
    xyz = ras_coords(shape, m)
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.linalg.norm(xyz, axis=-1) < BODY_RADIUS] = 0.0
    labels = np.zeros(shape, np.uint8)
    for centre, value in zip(blobs, hu_of_blobs):
        inside = np.linalg.norm(xyz - centre, axis=-1) <= BLOB_RADIUS
        hu[inside] = value
        labels[inside] = 1
    return Image(hu.astype(np.int16), m, {"modality": "CT"}), Image(labels, m, {})


def region_card(region: str, axis_order: str = "kji", orientation: str = "RAS", **inputs: Any) -> ModelCard:
    """The test card with one input channel and a classifier on ``region``."""
    d = card_dict(input={"channels": WIDE})
    d["network"]["parameters"]["in_channels"] = 1
    d["preprocessing"].update(axis_order=axis_order, orientation=orientation,
                              crop_foreground={"threshold": -500, "margin_mm": 2})
    spec = {"region": region, "shape": [16, 18, 20], "margin_mm": 1.0, **inputs}
    if region in ("segment", "components"):
        spec["segment"] = "Vessel"
    d["classification"] = [classifier_entry(in_channels=1, input=spec)]
    return ModelCard.from_dict(d)


def at(region, ras) -> float:
    """The region tensor's value at the voxel nearest to the RAS point (channel 0)."""
    ijk = np.linalg.inv(region.ijk_to_ras) @ np.append(ras, 1.0)
    i, j, k = (int(round(v)) for v in ijk[:3])
    shape_ijk = region.shape_kji[::-1]
    assert all(0 <= v < n for v, n in zip((i, j, k), shape_ijk)), (i, j, k)
    t = region.tensor[0]
    return float(t[k, j, i] if tuple(t.shape) == tuple(region.shape_kji) else t[i, j, k])


def bright_centre(region) -> np.ndarray:
    """RAS centroid of the region tensor's bright voxels (> 0.75), read through the region's matrix."""
    t = region.tensor[0].numpy()
    kji = t if t.shape == tuple(region.shape_kji) else t.T  # "ijk" tensors hold (i, j, k)
    k, j, i = np.nonzero(kji > 0.75)
    ijk = np.stack([i, j, k, np.ones_like(i)]).astype(np.float64)
    return (region.ijk_to_ras @ ijk)[:3].mean(axis=1)


def far_corner(image: Image) -> np.ndarray:
    """The RAS point of the image's first voxel (a corner, far from the blobs)."""
    return image.ijk_to_ras[:3, 3].copy()


ORIENTED = [(g, "kji", "RAS") for g in GRIDS] + [("oblique-permuted-flipped", "ijk", "RAS"),
                                                 ("oblique-anisotropic", "kji", "LPI")]
ORIENTED_IDS = [f"{g}-{order}-{o}" for g, order, o in ORIENTED]


@pytest.mark.parametrize("grid_name,axis_order,orientation", ORIENTED, ids=ORIENTED_IDS)
def test_components_each_hold_their_blob(grid_name, axis_order, orientation):
    image, labels = blob_case(grid_name)
    card = region_card("components", axis_order, orientation)
    regions = classifier_inputs(image, labels, card, card.classification[0])
    assert len(regions) == 2
    want = (16, 18, 20) if axis_order == "kji" else (20, 18, 16)
    for r in regions:
        assert tuple(r.tensor.shape) == (1, 16, 18, 20) and r.shape_kji == want
        assert r.tensor.dtype == torch.float32
    holders = [[r.contains(p) for r in regions] for p in (BLOB_A, BLOB_B)]
    assert sorted(holders) == [[False, True], [True, False]], holders  # each blob in exactly one region
    for blob in (BLOB_A, BLOB_B):
        region = regions[[r.contains(blob) for r in regions].index(True)]
        assert at(region, blob) > 0.95
        np.testing.assert_allclose(bright_centre(region), blob, atol=0.8)
        assert not region.contains(far_corner(image))


@pytest.mark.parametrize("grid_name,axis_order,orientation", ORIENTED, ids=ORIENTED_IDS)
def test_segment_region_boxes_every_component(grid_name, axis_order, orientation):
    image, labels = blob_case(grid_name)
    card = region_card("segment", axis_order, orientation)
    [region] = classifier_inputs(image, labels, card, card.classification[0])
    assert region.contains(BLOB_A) and region.contains(BLOB_B) and not region.contains(far_corner(image))
    assert at(region, BLOB_A) > 0.9 and at(region, BLOB_B) > 0.9
    assert at(region, (BLOB_A + BLOB_B) / 2) == pytest.approx(0.5, abs=0.02)  # soft tissue between them


@pytest.mark.parametrize("grid_name,axis_order,orientation", ORIENTED, ids=ORIENTED_IDS)
def test_tiles_cover_the_foreground(grid_name, axis_order, orientation):
    """Tiles of 8 x 9 x 10 voxels at 1.5 mm (12 x 13.5 x 15 mm) on the 28 mm body ball (+ 2 mm): more
    than one per axis, each at the card's spacing, together covering every point of the ball, each
    blob bright in the tiles that hold it."""
    image, _ = blob_case(grid_name)
    card = region_card("tiles", axis_order, orientation, shape=[8, 9, 10], spacing=[1.5, 1.5, 1.5])
    regions = classifier_inputs(image, None, card, card.classification[0])
    assert len(regions) >= 8
    for r in regions:
        np.testing.assert_allclose(np.linalg.norm(r.ijk_to_ras[:3, :3], axis=0), [1.5, 1.5, 1.5])
    xyz = ras_coords(image.array.shape, image.ijk_to_ras).reshape(-1, 3)
    ball = xyz[np.linalg.norm(xyz, axis=1) < BODY_RADIUS]
    pick = ball[np.random.default_rng(0).choice(len(ball), 300, replace=False)]
    assert all(any(r.contains(p) for r in regions) for p in pick)
    for blob in (BLOB_A, BLOB_B):
        holders = [r for r in regions if r.contains(blob)]
        assert holders and all(at(r, blob) > 0.9 for r in holders)
    assert not any(r.contains(far_corner(image)) for r in regions)


def test_tiles_need_a_spacing_and_no_segment(tmp_path):
    for inputs, field, problem in (({"region": "tiles", "shape": [8, 8, 8]}, "spacing", "missing"),
                                   ({"region": "tiles", "shape": [8, 8, 8], "spacing": [1, 1, 1],
                                     "segment": "Vessel"}, "segment", "looks at the whole image")):
        d = card_dict()
        d["classification"].append(classifier_entry(input=inputs))
        path = write_card(tmp_path / "m", d)
        with pytest.raises(ModelError) as info:
            ModelCard.load(path)
        assert f"field 'classification[1].input.{field}': " in str(info.value) and problem in str(info.value)


def region_centre(region) -> np.ndarray:
    """RAS of the region grid's centre."""
    return (region.ijk_to_ras @ np.append((np.array(region.shape_kji[::-1]) - 1) / 2.0, 1.0))[:3]


@pytest.mark.parametrize("grid_name,axis_order,orientation", ORIENTED, ids=ORIENTED_IDS)
def test_whole_region_is_the_foreground_squeezed_or_a_fixed_box(grid_name, axis_order, orientation):
    image, _ = blob_case(grid_name, blobs=(BLOB_A,))
    k, j, i = np.nonzero(image.array > -500)  # the body ball: the card crops to it (+ 2 mm)
    ijk = [(a.min() + a.max()) / 2.0 for a in (i, j, k)]
    foreground_centre = (image.ijk_to_ras @ np.append(ijk, 1.0))[:3]

    squeezed = region_card("whole", axis_order, orientation)
    [region] = classifier_inputs(image, None, squeezed, squeezed.classification[0])
    assert region.contains(BLOB_A) and at(region, BLOB_A) > 0.9
    np.testing.assert_allclose(bright_centre(region), BLOB_A, atol=1.0)
    np.testing.assert_allclose(region_centre(region), foreground_centre, atol=1e-6)
    xyz = ras_coords(image.array.shape, image.ijk_to_ras).reshape(-1, 3)
    rim = xyz[np.abs(np.linalg.norm(xyz, axis=1) - (BODY_RADIUS - 0.5)) < 0.5]  # the ball's surface
    assert len(rim) > 100 and all(region.contains(p) for p in rim)
    assert not region.contains(far_corner(image))

    fixed = region_card("whole", axis_order, orientation, spacing=[1.5, 1.25, 1.0])
    [box] = classifier_inputs(image, None, fixed, fixed.classification[0])
    # spacing (i, j, k) of the card's orientation, centred on the foreground
    np.testing.assert_allclose(np.linalg.norm(box.ijk_to_ras[:3, :3], axis=0), [1.5, 1.25, 1.0])
    np.testing.assert_allclose(region_centre(box), foreground_centre, atol=1e-6)
    assert box.contains(BLOB_A) and at(box, BLOB_A) > 0.9
    np.testing.assert_allclose(bright_centre(box), BLOB_A, atol=1.0)

    uncropped = ModelCard.from_dict(dict(squeezed.to_dict(), preprocessing=dict(
        squeezed.to_dict()["preprocessing"], crop_foreground=None)))
    [everything] = classifier_inputs(image, None, uncropped, uncropped.classification[0])
    assert everything.contains(far_corner(image)) and at(everything, far_corner(image)) == 0.0
    image_centre = (image.ijk_to_ras @ np.append((np.array(image.array.shape[::-1]) - 1) / 2.0, 1.0))[:3]
    np.testing.assert_allclose(region_centre(everything), image_centre, atol=1e-6)


def test_an_empty_segment_gives_no_region_and_the_first_class():
    image, labels = blob_case("oblique-anisotropic")
    empty = labels.with_array(np.zeros_like(labels.array))
    d = region_card("components").to_dict()
    sigmoid = classifier_entry(in_channels=1, task="findings", activation="sigmoid", thresholds={},
                               input={"region": "segment", "segment": "Vessel", "shape": [8, 8, 8]})
    d["classification"].append(sigmoid)
    card = ModelCard.from_dict(d)
    for task in card.classification:
        assert classifier_inputs(image, empty, card, task) == []
        assert classifier_inputs(image, None, card, task) == []  # no segmentation at all

    def no_network(task):
        raise AssertionError("nothing to classify: the network must not run")

    lesion, absent, present = classify(card, image, empty, CPU, networks=no_network)
    assert (lesion.task, lesion.label, lesion.probability) == ("lesion", "absent", 1.0)
    assert lesion.probabilities == {"absent": 1.0, "present": 0.0} and not lesion.low_confidence
    assert [(t.task, t.label, t.probabilities["present"]) for t in (absent, present)] == [
        ("findings/absent", "absent", 0.0), ("findings/present", "absent", 0.0)]


# ----------------------------------------------------------------------------- 3. decisions


class KnownLogits(torch.nn.Module):
    """Logits of class c: ``slope[c] * (brightest input voxel) + offset[c]`` per region."""

    def __init__(self, offset, slope=None) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))
        self.register_buffer("slope", torch.tensor(slope or [0.0] * len(offset), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.flatten(1).amax(dim=1, keepdim=True)
        return peak * self.slope + self.offset


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def softmax(logits) -> List[float]:
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def network_card(region: str = "whole", **changes: Any) -> ModelCard:
    """A classification-only card (one CT window) with one classifier entry; ``changes`` edit the entry."""
    spec = {"region": region, "shape": [8, 8, 8], "margin_mm": 1.0}
    entry = classifier_entry(in_channels=1, input=spec, thresholds={}, temperature=1.0)
    entry.update(copy.deepcopy(changes))
    if entry["input"]["region"] != "whole":
        d = card_dict(input={"channels": WIDE})
        d["network"]["parameters"]["in_channels"] = 1
        entry["input"].setdefault("segment", "Vessel")
        d["classification"] = [entry]
    else:
        d = classification_only_card(entry)
        d["input"] = {"channels": WIDE}
    d["preprocessing"]["crop_foreground"] = {"threshold": -500, "margin_mm": 2}
    return ModelCard.from_dict(d)


def tags(card: ModelCard, net: torch.nn.Module, grid_name: str = "axial", **blobs: Any):
    image, labels = blob_case(grid_name, **blobs)
    return classify(card, image, labels, CPU, networks=lambda task: net)


def test_decide_with_thresholds():
    binary = network_card(thresholds={"present": 0.3}).classification[0]
    assert decide(binary, {"absent": 0.75, "present": 0.25}) == "absent"
    assert decide(binary, {"absent": 0.7, "present": 0.3}) == "present"  # from the threshold up
    assert decide(binary, {"absent": 0.2, "present": 0.8}) == "present"
    plain = network_card().classification[0]
    assert decide(plain, {"absent": 0.51, "present": 0.49}) == "absent"  # no thresholds: the most probable
    assert decide(plain, {"absent": 0.5, "present": 0.5}) == "absent"  # a tie: the first class

    three = network_card(classes=["none", "small", "large"], thresholds={"small": 0.2, "large": 0.9},
                         network={"architecture": "ResNet", "parameters": resnet_parameters(1, 3),
                                  "weights": "c.pt"}).classification[0]
    assert decide(three, {"none": 0.55, "small": 0.25, "large": 0.2}) == "small"  # small reaches 0.2
    assert decide(three, {"none": 0.1, "small": 0.15, "large": 0.75}) == "none"  # none reached: the free class
    assert decide(three, {"none": 0.0, "small": 0.05, "large": 0.95}) == "large"
    assert decide(three, {"none": 0.02, "small": 0.3, "large": 0.68}) == "small"  # only small reached
    every = network_card(classes=["a", "b", "c"], thresholds={"a": 0.6, "b": 0.6, "c": 0.6},
                         network={"architecture": "ResNet", "parameters": resnet_parameters(1, 3),
                                  "weights": "c.pt"}).classification[0]
    assert decide(every, {"a": 0.2, "b": 0.45, "c": 0.35}) == "b"  # all have one, none reached: the most probable


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_temperature_divides_the_logits(temperature):
    card = network_card(temperature=temperature, thresholds={"present": 0.7})
    [tag] = tags(card, KnownLogits([0.0, 3.0]))
    p = sigmoid(3.0 / temperature)
    assert tag.probabilities["present"] == pytest.approx(p, abs=1e-6)
    assert tag.probabilities["absent"] == pytest.approx(1 - p, abs=1e-6)
    assert tag.label == ("present" if p >= 0.7 else "absent")
    assert tag.probability == pytest.approx(p if p >= 0.7 else 1 - p, abs=1e-6)
    assert tag.low_confidence == (tag.probability < card.low_confidence_threshold)
    assert tag.method == "network" and tag.validated


def test_three_classes_softmax_through_classify():
    card = network_card(classes=["none", "small", "large"], thresholds={"small": 0.2, "large": 0.9},
                        temperature=2.0, network={"architecture": "TorchScript", "weights": "c.ts",
                                                  "parameters": {}})
    [tag] = tags(card, KnownLogits([0.0, 2.0, 4.0]))
    want = softmax([0.0, 1.0, 2.0])  # 0.090, 0.245, 0.665: large is most probable but misses 0.9
    assert [tag.probabilities[c] for c in ("none", "small", "large")] == pytest.approx(want, abs=1e-6)
    assert tag.label == "small" and tag.probability == pytest.approx(want[1], abs=1e-6)


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_components_combine_by_max_or_mean(combine):
    card = network_card("components", input={"region": "components", "segment": "Vessel", "shape": [8, 8, 8],
                                             "margin_mm": 1.0, "combine": combine})
    # blob A at 1000 HU (input 1.0), blob B at 500 HU (0.75): present logits 2.5 and 0
    net = KnownLogits([0.0, -7.5], [0.0, 10.0])
    [tag] = tags(card, net, hu_of_blobs=(1000.0, 500.0))
    each = [sigmoid(2.5), sigmoid(0.0)]
    want = max(each) if combine == "max" else sum(each) / 2
    assert tag.probabilities["present"] == pytest.approx(want, abs=1e-4)
    assert tag.label == "present"


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_sigmoid_findings_are_one_tag_each(combine):
    card = network_card("components", activation="sigmoid", classes=["calcified", "ruptured"],
                        thresholds={"ruptured": 0.1},
                        input={"region": "components", "segment": "Vessel", "shape": [8, 8, 8],
                               "margin_mm": 1.0, "combine": combine})
    # calcified: 1.0 everywhere; ruptured: -2 in the bright component A, -4 in B
    net = KnownLogits([1.0, -10.0], [0.0, 8.0])
    calcified, ruptured = tags(card, net, hu_of_blobs=(1000.0, 500.0))
    r = [sigmoid(-2.0), sigmoid(-4.0)]
    want_r = max(r) if combine == "max" else sum(r) / 2  # 0.119 or 0.069
    assert (calcified.task, ruptured.task) == ("lesion/calcified", "lesion/ruptured")
    assert calcified.probabilities == pytest.approx({"absent": 1 - sigmoid(1.0), "present": sigmoid(1.0)})
    assert calcified.label == "present"  # no threshold: 0.5
    assert ruptured.probabilities["present"] == pytest.approx(want_r, abs=1e-4)
    assert ruptured.label == ("present" if want_r >= 0.1 else "absent")
    assert ruptured.probability == pytest.approx(want_r if want_r >= 0.1 else 1 - want_r, abs=1e-4)


def test_voxel_evidence_and_network_tasks_side_by_side():
    d = classifier_card()
    d["input"] = {"channels": WIDE}
    d["network"]["parameters"]["in_channels"] = 1
    d["classification"][1] = classifier_entry(in_channels=1, thresholds={"present": 0.3}, temperature=1.0,
                                              input={"region": "segment", "segment": "Vessel", "shape": [8, 8, 8]})
    card = ModelCard.from_dict(d)
    image, labels = blob_case("axial")
    evidence, lesion = classify(card, image, labels, CPU, evidence={"aneurysm": 0.8},
                                networks=lambda task: KnownLogits([0.0, math.log(0.35 / 0.65)]))
    assert (evidence.task, evidence.label, evidence.method) == ("aneurysm", "present", "voxel_evidence")
    assert evidence.probabilities == pytest.approx({"absent": 0.2, "present": 0.8})
    assert (lesion.task, lesion.label) == ("lesion", "present")  # 0.35 reaches the threshold 0.3
    assert lesion.probabilities["present"] == pytest.approx(0.35, abs=1e-6)


def test_a_classification_only_model_labels_through_label_image(tmp_path):
    from medautolabel.labelling.pipeline import label_image

    folder = tmp_path / "m"
    folder.mkdir()
    with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(KnownLogits([0.0, 1.0], [0.0, 2.0])).save(str(folder / "c.ts"))
    card = network_card(network={"architecture": "TorchScript", "weights": "c.ts", "parameters": {},
                                 "sha256": network.file_sha256(folder / "c.ts")}, temperature=2.0)
    write_card(folder, card.to_dict())
    image, _ = blob_case("oblique-permuted-flipped")
    result = label_image(image, folder, device="cpu")
    assert result.labelmap.array.shape == image.array.shape and not result.labelmap.array.any()
    np.testing.assert_array_equal(result.labelmap.ijk_to_ras, image.ijk_to_ras)
    assert result.segments == []
    [tag] = result.classifications
    assert tag.probabilities["present"] == pytest.approx(sigmoid((1.0 + 2.0 * 1.0) / 2.0), abs=1e-4)
    assert result.provenance["classifiers"] == [{
        "task": "lesion", "architecture": "TorchScript", "region": "whole", "weights": "c.ts",
        "weights_sha256": network.file_sha256(folder / "c.ts")}]
    assert "weights" not in result.provenance["model"]


# ----------------------------------------------------------------------------- 4. calibration


def test_temperature_scaling_calibrates_an_over_confident_model():
    from medautolabel.training.classifier import fit_temperature, scores

    # x = +-0.5 + N(0, 0.74^2) by class: the best decision (x > 0) is right 75% of the time, and the true
    # log-odds of "present" are 2 * 0.5 * x / 0.74^2 = 1.83 x. The model says 8 x: far too sure, and the
    # temperature that calibrates it is 8 / 1.83 = 4.4.
    rng = np.random.default_rng(15)
    n, mu, sigma = 4000, 0.5, 0.74
    targets = rng.integers(0, 2, n)
    x = np.where(targets == 1, mu, -mu) + rng.normal(0.0, sigma, n)
    logits = torch.tensor(np.stack([np.zeros(n), 8.0 * x], axis=1), dtype=torch.float32)
    counts = [1] * n
    task = network_card().classification[0]

    before = scores(logits, counts, targets, task)
    temperature = fit_temperature(logits, counts, targets, task)
    after = scores(logits, counts, targets, task, temperature)
    assert 0.72 < before["accuracy"] < 0.78 and after["accuracy"] == before["accuracy"]
    # a temperature keeps the order (but for ties where 8 x saturates float32 probabilities at 1)
    assert after["roc_auc"] == pytest.approx(before["roc_auc"], abs=1e-4)
    assert temperature == pytest.approx(8.0 / (2 * mu / sigma**2), rel=0.1)
    assert before["ece"] > 0.12 and after["ece"] < 0.03, (before["ece"], after["ece"])
    assert after["nll"] < before["nll"] - 0.2

    # the same ECE as evaluation's, from the probabilities labelling would report
    p = torch.softmax(logits / temperature, dim=1).numpy()
    predicted = p.argmax(axis=1)
    assert after["ece"] == pytest.approx(expected_calibration_error(predicted == targets, p.max(axis=1)))
    assert after["roc_auc"] == pytest.approx(roc_auc(targets == 1, p[:, 1]))


def test_a_well_calibrated_model_keeps_a_temperature_near_1():
    from medautolabel.training.classifier import fit_temperature

    rng = np.random.default_rng(16)
    n = 4000
    log_odds = rng.normal(0.0, 2.0, n)
    targets = (rng.random(n) < 1.0 / (1.0 + np.exp(-log_odds))).astype(int)
    logits = torch.tensor(np.stack([np.zeros(n), log_odds], axis=1), dtype=torch.float32)
    assert fit_temperature(logits, [1] * n, targets, network_card().classification[0]) == pytest.approx(1.0, abs=0.1)


# ----------------------------------------------------------------------------- 5. training end to end

BLOB_GRID = 16  # voxels per side, 3 mm: a 48 mm CT-like volume


def blob_volume(rng: np.random.Generator, present: bool) -> Image:
    """Air around a soft-tissue ball of random density, with noise; ``present``: a bright blob somewhere in it."""
    spacing = 3.0
    half = spacing * (BLOB_GRID - 1) / 2.0
    m = make_ijk_to_ras([spacing] * 3, np.eye(3), [-half] * 3)
    xyz = ras_coords((BLOB_GRID,) * 3, m)
    hu = np.full((BLOB_GRID,) * 3, -1000.0)
    hu[np.linalg.norm(xyz, axis=-1) < 21.0] = rng.uniform(-50, 80)
    if present:
        centre, radius = rng.uniform(-8, 8, 3), rng.uniform(6.0, 8.0)
        hu[np.linalg.norm(xyz - centre, axis=-1) <= radius] += rng.uniform(400, 700)
    hu += rng.normal(0, 25, hu.shape)
    return Image(np.rint(hu).astype(np.int16), m, {"modality": "CT"})


def write_blob_dataset(folder: Path, n: int, seed: int) -> Path:
    """An MSD dataset of ``n`` blob volumes (every other one with a blob), empty masks, case classes."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    training = []
    for c in range(n):
        present = c % 2 == 1
        image = blob_volume(rng, present)
        write_image(image, folder / "imagesTr" / f"case{c:03d}.nii.gz")
        write_image(Image(np.zeros(image.array.shape, np.uint8), image.ijk_to_ras, {}),
                    folder / "labelsTr" / f"case{c:03d}.nii.gz")
        training.append({"image": f"./imagesTr/case{c:03d}.nii.gz", "label": f"./labelsTr/case{c:03d}.nii.gz",
                         "classes": {"blob": "present" if present else "absent"}})
    (folder / "dataset.json").write_text(json.dumps({
        "name": "blobs", "modality": {"0": "CT"}, "labels": {"0": "background"},
        "classes": {"blob": ["absent", "present"]}, "training": training}), encoding="utf-8")
    return folder


BLOB_CONFIG = {
    "model": {"id": "blobs"}, "train_segmentation": False, "validation": {"fraction": 0.25}, "seed": 3,
    "input": {"channels": [{"name": "ct", "window": [-200, 600]}]},
    "preprocessing": {"orientation": "RAS", "spacing": None, "crop_foreground": None, "axis_order": "kji"},
    "classifiers": [{"task": "blob", "epochs": 6, "iterations_per_epoch": 10, "batch_size": 8, "lr": 0.003,
                     "patience": 0,
                     "parameters": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 8, 8, 8],
                                    "conv1_t_size": 3, "conv1_t_stride": 1},
                     "input": {"region": "whole", "shape": [BLOB_GRID] * 3}}],
}


def test_a_tiny_classifier_trained_on_blobs_separates_held_out_volumes(tmp_path):
    from medautolabel.labelling.pipeline import label_image
    from medautolabel.training.loop import train

    data = write_blob_dataset(tmp_path / "data", 40, seed=1)
    model = tmp_path / "model"
    lines: List[str] = []
    train(data, model, config=copy.deepcopy(BLOB_CONFIG), device="cpu", log=lines.append)

    # the model folder: the card and the classifier's weights, whose sha256 the card holds
    assert sorted(p.name for p in model.iterdir() if p.is_file()) == ["classifier-blob.pt", "model.json"]
    card = ModelCard.load(model)
    assert not card.segments and card.labels == []
    [task] = card.classification
    assert (task.task, task.classes, task.method, task.activation) == ("blob", ("absent", "present"), "network",
                                                                       "softmax")
    assert task.network.weights == "classifier-blob.pt"
    assert task.network.sha256 == network.file_sha256(model / "classifier-blob.pt")
    assert network.read_state_dict(model / "classifier-blob.pt")  # a plain state dict
    metrics = card.metrics["classifiers"]["blob"]
    assert task.temperature == metrics["temperature"] and task.temperature > 0
    assert metrics["training_cases"] == 30 and metrics["validation_cases"] == 10
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] == 6
    assert set(metrics["validation"]) >= {"roc_auc", "accuracy", "nll", "ece"}
    assert any("validation AUC" in line for line in lines)

    rng = np.random.default_rng(1_000_001)  # never seen in training
    truth, score = [], []
    for c in range(20):
        present = c % 2 == 0
        result = label_image(blob_volume(rng, present), model, device="cpu")
        [tag] = result.classifications
        truth.append(present)
        score.append(tag.probabilities["present"])
        assert tag.probability == max(tag.probabilities.values()) and tag.method == "network"
    auc = roc_auc(truth, score)
    assert auc > 0.8, (auc, score)


def test_cases_without_regions_train_and_validate():
    """A segment task whose absent cases have no segment: batches and validation chunks of such cases only."""
    from medautolabel.training.classifier import ClassifierCase, predict_logits, train_classifier
    from medautolabel.training.config import ClassifierTraining

    parameters = dict(resnet_parameters(1, 2), no_max_pool=True)
    card = network_card("segment", network={"architecture": "ResNet", "parameters": parameters, "weights": "c.pt"},
                        input={"region": "segment", "segment": "Vessel", "shape": [16, 16, 16]})
    task = card.classification[0]
    gen = torch.Generator().manual_seed(0)

    def case(target: int) -> ClassifierCase:
        n = target  # absent: no region; present: one bright region
        return ClassifierCase((0.5 + 0.5 * torch.rand(n, 1, 16, 16, 16, generator=gen)).half(), target)

    train_cases = [case(0) for _ in range(6)] + [case(1) for _ in range(6)]
    val_cases = [case(0) for _ in range(9)] + [case(1) for _ in range(3)]  # the first chunk of 8: no region
    net = network.build_from_spec(task.network)
    logits, counts = predict_logits(net, val_cases, CPU)
    assert tuple(logits.shape) == (3, 2) and counts == [0] * 9 + [1] * 3

    # batches of 2 drawn from 12 cases, half without a region: some batches hold no region at all
    spec = ClassifierTraining(task="lesion", epochs=2, iterations_per_epoch=12, batch_size=2, flip=False,
                              parameters=parameters, input={"region": "segment", "segment": "Vessel",
                                                            "shape": [16, 16, 16]})
    state, metrics = train_classifier(spec, task, train_cases, val_cases, CPU, seed=0, say=lambda m: None)
    assert set(state) == set(net.state_dict())
    assert metrics["epochs_run"] == 2 and metrics["validation"]["roc_auc"] == 1.0  # absent: probability 1
