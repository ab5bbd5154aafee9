"""Classification MONAI bundles: a zoo-style classifier bundle (ResNet, SimpleInferer, Activationsd) runs
trusted only, agrees with MONAI's own runner, and gives tags and an empty labelmap."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import nrrd
import numpy as np
import pytest
import torch

from medautolabel.cli.app import main
from medautolabel.errors import ModelError
from medautolabel.io.images import read_image, write_image
from medautolabel.labelling.bundle_runner import BundleModel
from medautolabel.synthetic.phantoms import render, training_grid

NETWORK = {"_target_": "ResNet", "block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64],
           "spatial_dims": 3, "n_input_channels": 2, "num_classes": 2, "conv1_t_size": 5, "conv1_t_stride": 2}
WINDOWS = {"vessels": [100.0, 700.0], "soft": [-100.0, 300.0]}  # two CT windows: two input channels


def preprocessing() -> Dict[str, Any]:
    """The model zoo's usual 3D classifier preprocessing, resized to a small fixed shape, two CT windows."""
    steps: List[Dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": False},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},
        {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32, 32], "mode": "trilinear"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        {"_target_": "CopyItemsd", "keys": "image", "times": 2, "names": list(WINDOWS)},
    ]
    steps += [{"_target_": "ScaleIntensityRanged", "keys": name, "a_min": lo, "a_max": hi, "b_min": 0.0,
               "b_max": 1.0, "clip": True} for name, (lo, hi) in WINDOWS.items()]
    steps += [{"_target_": "ConcatItemsd", "keys": list(WINDOWS), "name": "image", "dim": 0},
              {"_target_": "DeleteItemsd", "keys": list(WINDOWS)}]
    return {"_target_": "Compose", "transforms": steps}


def inference_config(post: List[Dict[str, Any]]) -> Dict[str, Any]:
    """configs/inference.json as the zoo writes one; the ClassificationSaver writes the probabilities
    (copied to "probabilities" before any argmax) to predictions.csv."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cpu')",
        "network_def": NETWORK,
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing(),
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "ClassificationSaver", "output_dir": "@output_dir",
             "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
             "output_transform": "$lambda x: [xx['probabilities'] for xx in x]"},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "run": ["$@evaluator.run()"],
    }


def metadata(channel_def: Dict[str, str]) -> Dict[str, Any]:
    """metadata.json in MONAI's convention for a classifier's output (no "name": the folder names the task)."""
    return {
        "version": "0.1.0", "monai_version": "1.4.0", "pytorch_version": "2.4.0",
        "task": "Presence of an intracranial aneurysm in a CT angiogram",
        "description": "test classifier with random weights", "authors": "test", "copyright": "",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(channel_def),
                                 "spatial_shape": [1, len(channel_def)], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": channel_def}},
        },
    }


SOFTMAX = [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
           {"_target_": "CopyItemsd", "keys": "pred", "times": 1, "names": "probabilities"},
           {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
SIGMOID = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
           {"_target_": "CopyItemsd", "keys": "pred", "times": 1, "names": "probabilities"}]


def write_bundle(folder: Path, post: List[Dict[str, Any]], channel_def=None, sidecar=None) -> Path:
    """A classifier bundle with seeded random weights; the last layer scaled so that the
    probabilities are far from 1/2 and differ between images."""
    from monai.networks.nets import ResNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    channel_def = channel_def or {"0": "absent", "1": "present"}
    (folder / "configs" / "inference.json").write_text(json.dumps(inference_config(post), indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata(channel_def), indent=2))
    if sidecar is not None:
        (folder / "configs" / "medautolabel.json").write_text(json.dumps(sidecar))
    torch.manual_seed(1234)
    net = ResNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    with torch.no_grad():
        net.fc.weight.mul_(40.0)
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small phantoms, one with an aneurysm, as the zoo's dataset_dir/imagesTs/."""
    data = tmp_path_factory.mktemp("data")
    (data / "imagesTs").mkdir()
    for n, (seed, sac) in enumerate([(2_000_001, True), (2_000_002, False)]):
        write_image(render(seed, *training_grid(40, 1.2), with_aneurysm=sac).image,
                    data / "imagesTs" / f"case{n}.nii.gz")
    return data


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundles") / "aneurysm_classification", SOFTMAX)


@pytest.fixture
def no_trusted(tmp_path, monkeypatch):
    """An empty trusted-bundles file: the user's own list plays no part."""
    monkeypatch.setenv("MEDAUTOLABEL_TRUSTED_BUNDLES", str(tmp_path / "trusted.txt"))


def test_untrusted_classifier_bundle_is_refused_in_one_line(bundle, images, tmp_path, capsys, no_trusted):
    out = tmp_path / "out"
    status = main(["label", str(images / "imagesTs" / "case0.nii.gz"), "-o", str(out), "--model", str(bundle),
                   "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "--trust" in err[0] and str(bundle) in err[0]
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ModelError, match="runs only when trusted"):
        BundleModel(bundle, device="cpu")


def test_label_with_trust_writes_the_tag_and_an_empty_labelmap(bundle, images, tmp_path, no_trusted):
    out = tmp_path / "out"
    image = images / "imagesTs" / "case0.nii.gz"
    assert main(["label", str(image), "-o", str(out), "--model", str(bundle), "--trust", "--device", "cpu",
                 "-q"]) == 0
    tags = json.loads((out / "case0.tags.json").read_text(encoding="utf-8"))
    assert tags["segments"] == []
    [tag] = tags["classifications"]
    assert tag["task"] == "aneurysm_classification" and tag["method"] == "bundle" and tag["validated"] is True
    probs = tag["probabilities"]
    assert set(probs) == {"absent", "present"} and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-6)
    assert tag["label"] == max(probs, key=probs.get) and tag["probability"] == probs[tag["label"]]
    assert tags["provenance"]["model"]["format"] == "MONAI bundle"
    labels, header = nrrd.read(str(out / "case0.seg.nrrd"))  # pynrrd, not medautolabel's reader
    source = read_image(image)
    assert labels.dtype == np.uint8 and not labels.any()
    assert labels.shape[-3:] == source.array.shape[::-1]  # on the image's grid ((i, j, k) in the file)


@pytest.mark.slow
def test_probabilities_agree_with_monai_runner(bundle, images, tmp_path):
    """MONAI's own runner (``python -m monai.bundle run``) writes predictions.csv; ours match to 1e-4."""
    pytest.importorskip("ignite", reason="MONAI's bundle runner needs pytorch-ignite")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                          "--dataset_dir", str(images), "--output_dir", str(tmp_path / "monai")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "monai" / "predictions.csv", newline="") as f:
        theirs = {Path(row[0]).name: [float(x) for x in row[1:]] for row in csv.reader(f)}
    assert sorted(theirs) == ["case0.nii.gz", "case1.nii.gz"]
    model = BundleModel(bundle, device="cpu", trust=True)
    ours = {}
    for name in theirs:
        [tag] = model.label(read_image(images / "imagesTs" / name)).classifications
        ours[name] = [tag.probabilities["absent"], tag.probabilities["present"]]
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-4)
    assert abs(ours["case0.nii.gz"][1] - ours["case1.nii.gz"][1]) > 1e-3  # the image matters
    assert max(abs(p[1] - 0.5) for p in ours.values()) > 0.05  # not a coin toss


def test_sigmoid_bundle_gives_one_tag_per_class_and_reads_its_sidecar(bundle, images, tmp_path):
    """Sigmoid: tags "<task>/<class>", absent/present, decided by the sidecar's thresholds. Same network
    as the softmax bundle, so logit(p1) - logit(p0) is the softmax log-odds log(s1 / s0)."""
    sidecar = {"classification": {"task": "aneurysm", "validated": False, "thresholds": {"present": 0.3}},
               "low_confidence_threshold": 0.9}
    sig = write_bundle(tmp_path / "sigmoid", SIGMOID, {"0": "absent", "1": "present"}, sidecar)
    image = read_image(images / "imagesTs" / "case0.nii.gz")
    tags = BundleModel(sig, device="cpu", trust=True).label(image).classifications
    [soft] = BundleModel(bundle, device="cpu", trust=True).label(image).classifications
    assert [t.task for t in tags] == ["aneurysm/absent", "aneurysm/present"]
    p = [t.probabilities["present"] for t in tags]
    for t, cut in zip(tags, (0.5, 0.3)):
        assert t.method == "bundle" and t.validated is False
        assert t.label == ("present" if t.probabilities["present"] >= cut else "absent")
        assert t.low_confidence == (t.probability < 0.9)
    log_odds = math.log(p[1] / (1 - p[1])) - math.log(p[0] / (1 - p[0]))
    assert log_odds == pytest.approx(math.log(soft.probabilities["present"] / soft.probabilities["absent"]),
                                     abs=1e-4)


@pytest.mark.parametrize("post, channel_def, message", [
    ([{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}], None, "needs Activationsd"),
    (SOFTMAX, {"0": "absent", "1": "present", "2": "unsure"}, "network gives 2 outputs"),
    (SOFTMAX, {"0": "sac", "1": "sac"}, "different, non-empty name"),
])
def test_a_classifier_bundle_it_cannot_read_is_refused(tmp_path, images, post, channel_def, message):
    folder = write_bundle(tmp_path / "bad", post, channel_def)
    model = BundleModel(folder, device="cpu", trust=True)
    with pytest.raises(ModelError, match=message) as caught:
        model.label(read_image(images / "imagesTs" / "case0.nii.gz"))
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)
