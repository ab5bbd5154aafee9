"""``medautolabel train``: a tiny run that learns and whose model folder labels images, resume after an
interruption, the HDF5 cache (hit, partial rebuild, full rebuild on a new spacing, streaming),
fine-tuning ``--from`` a model, 2-process DistributedDataParallel with gloo, and the config format.

Datasets are tiny synthetic CT-like volumes (24^3 voxels of 1.5 mm, trained on an 18^3 grid of 2 mm): a bright
sphere ("vessel"), a small dark blob ("nerve") and, in every second case, a very bright dot
(image-level class "finding": present). Networks are tiny UNets; the whole file runs in well under
a minute on 2 cores.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import MedAutoLabelError
from medautolabel.evaluation.metrics import dice
from medautolabel.training import cache as cache_module
from medautolabel.training.config import ConfigError, load_config
from medautolabel.training.data import load_dataset, read_image, split
from medautolabel.training.export import grow_state_dict, plan_model, state_sha256
from medautolabel.training.loop import train

torch.set_num_threads(1)
ENGINE = Path(__file__).resolve().parents[1] / "MedAutoLabel"
TINY = {
    "model": {"id": "tiny"},
    "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0]},
    "input": {"channels": [{"name": "ct", "window": [-200, 600]}]},
    "network": {"architecture": "UNet", "parameters": {"spatial_dims": 3, "channels": [8, 16], "strides": [2],
                                                       "num_res_units": 1, "norm": "instance"}},
    "patch_size": [16, 16, 16], "batch_size": 2, "epochs": 4, "iterations_per_epoch": 10,
    "optimizer": {"lr": 0.01}, "schedule": {"warmup_iterations": 5},
    "validation": {"fraction": 0.25}, "threads": 1,
}


def write_spheres(root: Path, n: int, seed: int = 0, size: int = 24, spacing: float = 1.5) -> Path:
    """An MSD-style dataset of ``n`` synthetic cases (labels 1 vessel, 2 nerve; class "finding")."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    training = []
    for c in range(n):
        hu = rng.normal(40, 15, (size,) * 3)
        lab = np.zeros((size,) * 3, np.uint8)
        cen, r = rng.uniform(8, size - 8, 3), rng.uniform(3, 5)
        sphere = (k - cen[0]) ** 2 + (j - cen[1]) ** 2 + (i - cen[2]) ** 2 < r * r
        hu[sphere] += 300
        lab[sphere] = 1
        cen2 = rng.uniform(5, size - 5, 3)
        blob = ((k - cen2[0]) ** 2 + (j - cen2[1]) ** 2 + (i - cen2[2]) ** 2 < 6) & ~sphere
        hu[blob] -= 150
        lab[blob] = 2
        present = bool(c % 2)
        if present:
            cen3 = rng.uniform(4, size - 4, 3)
            hu[(k - cen3[0]) ** 2 + (j - cen3[1]) ** 2 + (i - cen3[2]) ** 2 < 3] = 900
        affine = np.diag([spacing] * 3 + [1.0])
        affine[:3, 3] = -spacing * size / 2
        name = f"case{c:03d}"
        nib.save(nib.Nifti1Image(hu.astype(np.int16).T, affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lab.T, affine), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz",
                         "classes": {"finding": "present" if present else "absent"}})
    (root / "dataset.json").write_text(json.dumps({
        "name": "spheres", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "vessel", "2": "nerve"},
        "classes": {"finding": ["absent", "present"]}, "training": training}))
    return root


def last_weights_hash(model_dir: Path) -> str:
    state = torch.load(model_dir / "training" / "last.pt", map_location="cpu", weights_only=True)
    return state_sha256(state["model"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_spheres(tmp_path_factory.mktemp("data") / "spheres", 8)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One uninterrupted tiny run (the reference for the tests below)."""
    root = tmp_path_factory.mktemp("run")
    messages = []
    result = train(dataset, root / "model", config=copy.deepcopy(TINY), device="cpu",
                   cache_path=root / "cache.h5", log=messages.append)
    return result, root, messages


def test_tiny_run_loss_falls_and_label_image_uses_the_model(trained, dataset):
    from medautolabel.labelling.pipeline import label_image

    result, _, messages = trained
    model_dir = result.model_dir
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 4 and losses[-1] < 0.75 * losses[0], losses
    card = ModelCard.load(model_dir)  # valid card, weights checked by sha256 when loaded
    assert [(lab.name, lab.value, lab.channel) for lab in card.labels] == [("vessel", 1, 1), ("nerve", 2, 2)]
    assert [(t.task, t.channel, t.method) for t in card.classification] == [("finding", 3, "voxel_evidence")]
    assert card.preprocessing.spacing == (2.0, 2.0, 2.0) and card.input[0].window == (-200.0, 600.0)
    prov = card.provenance
    assert prov["config"]["seed"] == 0 and len(prov["dataset"]["sha256"]) == 64 and prov["duration_s"] > 0
    assert prov["dataset"]["training_cases"] == 6 and prov["dataset"]["validation_cases"] == 2
    assert card.metrics["validation"]["dice"]["vessel"] > 0.5
    assert (model_dir / "training" / "log.csv").read_text(encoding="utf-8").count("\n") == 5  # header + 4 epochs
    assert any("TensorBoard" in m for m in messages) or (model_dir / "training" / "tensorboard").exists()
    # state dict only: loadable with weights_only=True
    assert all(isinstance(v, torch.Tensor) for v in torch.load(model_dir / "model.pt", weights_only=True).values())

    _, val = split(load_dataset(dataset), 0.25, 0, None)
    case = val[0]
    out = label_image(read_image(case.image), model_dir, device="cpu")
    ref = read_image(case.label).array
    assert out.labelmap.array.shape == ref.shape
    assert dice(out.labelmap.array == 1, ref == 1) > 0.5
    assert [c.task for c in out.classifications] == ["finding"]


@pytest.mark.skipif(importlib.util.find_spec("medautolabel.cli.app") is None, reason="medautolabel.cli.app not there yet")
def test_label_command_uses_the_trained_model_folder(trained, dataset, tmp_path):
    result, _, _ = trained
    image = min((dataset / "imagesTr").glob("*.nii.gz"))
    env = dict(os.environ, PYTHONPATH=str(ENGINE))
    run = subprocess.run([sys.executable, "-m", "medautolabel", "label", str(image), "--model", str(result.model_dir),
                          "-o", str(tmp_path / "out"), "--device", "cpu"],
                         check=False, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert any((tmp_path / "out").iterdir())


def test_resume_after_interruption_continues_exactly(trained, dataset, tmp_path):
    reference, root, _ = trained
    cfg = copy.deepcopy(TINY)
    cfg["cache"] = {"in_memory": "no"}  # the resumed run streams crops from the HDF5 file: same numbers
    part = train(dataset, tmp_path / "m", config=cfg, device="cpu", cache_path=root / "cache.h5",
                 log=lambda m: None, stop_after_epochs=2)
    assert part.epochs_run == 2
    saved = torch.load(tmp_path / "m" / "training" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["optimizer"]["state"]  # optimiser moments are saved
    with pytest.raises(MedAutoLabelError, match="--resume"):
        train(dataset, tmp_path / "m", config=cfg, device="cpu", cache_path=root / "cache.h5", log=lambda m: None)
    messages = []
    resumed = train(dataset, tmp_path / "m", device="cpu", resume=True, cache_path=root / "cache.h5",
                    log=messages.append)
    assert any("resuming after epoch 2" in m for m in messages)
    assert [r["epoch"] for r in resumed.history] == [3, 4]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history[2:]]
    assert last_weights_hash(tmp_path / "m") == last_weights_hash(reference.model_dir)
    rows = (tmp_path / "m" / "training" / "log.csv").read_text(encoding="utf-8").strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    with pytest.raises(MedAutoLabelError, match="nothing to resume"):
        train(dataset, tmp_path / "other", device="cpu", resume=True, cache_path=root / "cache.h5")


def _plan_card(dataset: Path, model_dir: Path, overrides=None):
    cfg = load_config(dict(copy.deepcopy(TINY), **(overrides or {})))
    plan = plan_model(cfg, load_dataset(dataset), None, model_dir)
    return ModelCard.from_dict(plan.card), plan.card, cfg


def test_cache_hit_partial_update_and_rebuild_when_spacing_changes(dataset, tmp_path):
    import shutil

    dataset = Path(shutil.copytree(dataset, tmp_path / "data"))  # this test edits a file
    cases = load_dataset(dataset).cases
    card, card_dict, cfg = _plan_card(dataset, tmp_path / "model")
    path = tmp_path / "cache.h5"
    first = cache_module.build_cache(path, cases, card, card_dict, cfg.cache)
    assert (first.built, first.reused, first.rebuilt_all) == (8, 0, True)
    stamp = path.stat().st_mtime_ns
    second = cache_module.build_cache(path, cases, card, card_dict, cfg.cache)
    assert second.hit and second.reused == 8 and path.stat().st_mtime_ns == stamp  # not rewritten
    assert second.case_keys == first.case_keys

    store = cache_module.CaseStore(path, first.case_keys, in_memory=False)
    image, label = store.read(0)
    # MONAI Spacingd's grid: 24 voxels x 1.5 mm = 36 mm -> 18 voxels of 2 mm
    assert image.shape == (1, 18, 18, 18) and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}
    assert store.spacing == (2.0, 2.0, 2.0)
    in_mem = cache_module.CaseStore(path, first.case_keys, in_memory=True)
    box = (slice(3, 11), slice(0, 18), slice(5, 9))
    assert np.array_equal(store.read(1, box)[0], in_mem.read(1, box)[0])
    store.close()

    # a file rewritten with the same content (new mtime) is recognised by its sha256: nothing to do
    lab_path = cases[3].label
    img = nib.load(str(lab_path))
    data = np.asanyarray(img.dataobj).copy()
    os.utime(lab_path, ns=(stamp + 10**9, stamp + 10**9))
    again = cache_module.build_cache(path, cases, card, card_dict, cfg.cache)
    assert (again.built, again.reused) == (0, 8)
    # one case's label changes: only that case is preprocessed again
    data[10:14, 10:14, 10:14] = 2
    nib.save(nib.Nifti1Image(data, img.affine), str(lab_path))
    third = cache_module.build_cache(path, cases, card, card_dict, cfg.cache)
    assert (third.built, third.reused, third.rebuilt_all) == (1, 7, False)

    card2, card_dict2, cfg2 = _plan_card(dataset, tmp_path / "model", {
        "preprocessing": {"orientation": "RAS", "spacing": [3.0, 3.0, 3.0]}})
    fourth = cache_module.build_cache(path, cases, card2, card_dict2, cfg2.cache)
    assert (fourth.built, fourth.rebuilt_all) == (8, True)
    assert cache_module.CaseStore(path, fourth.case_keys, True).read(0)[0].shape == (1, 12, 12, 12)  # 36 mm / 3 mm


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(trained, dataset, tmp_path):
    _, root, _ = trained
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    cfg = copy.deepcopy(TINY)
    cfg.update(epochs=2, iterations_per_epoch=4)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(ENGINE), MEDAUTOLABEL_TRAIN_HASH_DIR=str(tmp_path / "hashes"))
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29400 + os.getpid() % 500),
                          "-m", "medautolabel.training", str(dataset), "-o", str(tmp_path / "ddp"),
                          "--config", str(tmp_path / "cfg.json"), "--cache", str(root / "cache.h5"),
                          "--device", "cpu"], check=False, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    hashes = [(tmp_path / "hashes" / f"rank{r}.sha256").read_text(encoding="utf-8") for r in (0, 1)]
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]
    assert hashes[0] == last_weights_hash(tmp_path / "ddp")
    card = ModelCard.load(tmp_path / "ddp")
    assert card.provenance["processes"] == 2
    assert run.stdout.count("epoch 2/2") == 1  # only rank 0 prints


def test_fine_tune_from_a_model_keeps_its_labels_and_grows_for_new_ones(trained, dataset, tmp_path):
    reference, root, _ = trained
    base = ModelCard.load(reference.model_dir)
    cfg = dict(copy.deepcopy(TINY), epochs=1, iterations_per_epoch=2)
    same = train(dataset, tmp_path / "same", config=cfg, base=str(reference.model_dir), device="cpu",
                 cache_path=root / "cache.h5", log=lambda m: None)
    card = ModelCard.load(same.model_dir)
    assert card.to_dict()["labels"] == base.to_dict()["labels"]
    assert card.classification == base.classification and card.provenance["base_model"]["id"] == "tiny"

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    meta = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    meta["labels"] = {"0": "background", "1": "Vessel", "2": "calcification"}
    for e in meta["training"]:
        e["image"], e["label"] = str(dataset / e["image"]), str(dataset / e["label"])
    (renamed / "dataset.json").write_text(json.dumps(meta))
    notes = []
    grown = train(renamed, tmp_path / "grown", config=cfg, base=str(reference.model_dir), device="cpu",
                  cache_path=root / "cache.h5", log=notes.append)
    card = ModelCard.load(grown.model_dir)
    assert [(x.name, x.value, x.channel) for x in card.labels] == [("vessel", 1, 1), ("nerve", 2, 2),
                                                                  ("calcification", 3, 3)]
    assert card.classification[0].channel == 4 and card.network.parameters["out_channels"] == 5
    assert any("'nerve' of the base model is not in the dataset" in m for m in notes)


@pytest.mark.parametrize("res_units", [0, 2])
def test_growing_the_output_layer_leaves_kept_outputs_unchanged(res_units):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    old = UNet(3, 1, 4, channels=[4, 8], strides=[2], num_res_units=res_units, norm="instance")
    new = UNet(3, 1, 6, channels=[4, 8], strides=[2], num_res_units=res_units, norm="instance")
    mapping = [0, 1, 2, None, None, 3]  # two new labels before the evidence channel
    new.load_state_dict(grow_state_dict(old.state_dict(), new.state_dict(), mapping, 4))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        a, b = old(x), new(x)
    assert torch.allclose(a, b[:, [0, 1, 2, 5]], atol=1e-5)
    assert b[:, 3].abs().mean() > 1e-3  # the new channels are not copies of anything


def test_evidence_loss_matches_the_engine_classifier():
    from medautolabel.catalog.modelcard import ClassificationTask
    from medautolabel.labelling.classify import voxel_evidence
    from medautolabel.training.losses import EvidenceMax

    logits = torch.full((1, 20, 22, 24), -6.0)
    logits[0, 9:12, 10:13, 11:14] = 4.0
    spacing = (0.8, 1.0, 1.2)
    p_train = float(EvidenceMax(1.5, spacing)(logits))
    p_engine = voxel_evidence(logits, ClassificationTask("x", ("a", "b"), channel=0, smoothing_mm=1.5), spacing)
    assert abs(p_train - p_engine) < 1e-5 and 0.3 < p_engine < 0.99
    edge = torch.full((1, 12, 12, 12), -6.0)
    edge[0, :2, 4:7, 10:] = 5.0  # a finding at the border: both handle edges like scipy's "nearest"
    task = ClassificationTask("x", ("a", "b"), channel=0, smoothing_mm=1.5)
    assert abs(float(EvidenceMax(1.5, (1, 1, 1))(edge)) - voxel_evidence(edge, task, (1, 1, 1))) < 1e-5
    logits.requires_grad_(True)
    EvidenceMax(1.5, spacing)(logits).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_config_errors_name_the_key_and_the_builtin_recipe_loads(tmp_path):
    with pytest.raises(ConfigError, match="'augmentation.flipp'"):
        load_config({"augmentation": {"flipp": True}})
    with pytest.raises(ConfigError, match="'batch_size': expected int"):
        load_config({"batch_size": "2"})
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_config({"patch_size": [40, 40, 40]})
    bad = tmp_path / "bad.json"
    bad.write_text("{\"epochs\": 3,}")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_config(bad)

    cfg = load_config("vessel-nerve-cta")  # the built-in model's recipe (docs/builtin-model.md)
    assert [tuple(c["window"]) for c in cfg.input["channels"]] == [(-150, 350), (-200, 1800)]
    assert cfg.preprocessing["spacing"] == [0.8] * 3
    params = cfg.network["parameters"]
    assert {k: params[k] for k in ("channels", "strides", "num_res_units", "norm")} == {
        "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "instance"}
    assert cfg.patch_size == [64] * 3 and cfg.batch_size == 2 and cfg.optimizer.lr == 2e-3


def test_builtin_recipe_config_runs(dataset, tmp_path):
    """The vessel-nerve-cta config trains (one iteration) and gives a card shaped like the built-in one."""
    cfg = load_config("vessel-nerve-cta").to_dict()
    cfg.update(epochs=1, iterations_per_epoch=1, threads=1)
    cfg["validation"]["fraction"] = 0.0
    cfg["classification"]["crop_size"] = [48, 48, 48]
    cfg["classifiers"] = []  # the recipe's aneurysm classifier needs "aneurysm" case labels; these cases have "finding"
    result = train(dataset, tmp_path / "vnc", config=cfg, device="cpu", cache_path=tmp_path / "c.h5",
                   log=lambda m: None)
    card = ModelCard.load(result.model_dir)
    assert card.id == "vessel-nerve-cta" and card.network.parameters["out_channels"] == 4
    assert [(x.name, x.channel, x.postprocessing.min_size_mm3) for x in card.labels] == [
        ("Vessel", 1, 20.0), ("Nerve", 2, 10.0)]
    assert card.inference.roi_size == (96, 96, 96) and card.low_confidence_threshold == 0.7


def test_datasets_in_nnunet_and_datalist_form(tmp_path, dataset):
    nn = tmp_path / "Dataset001_X"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for n in range(3):
        (nn / "imagesTr" / f"c{n}_0000.nii.gz").write_bytes(b"x")
        (nn / "labelsTr" / f"c{n}.nii.gz").write_bytes(b"x")
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                 "numTraining": 3, "file_ending": ".nii.gz"}))
    ds = load_dataset(nn)
    assert len(ds.cases) == 3 and ds.labels == {1: "liver"} and ds.modality == "CT"
    _, val_cases = split(ds, 0.34, seed=5)
    assert len(val_cases) == 1 and split(ds, 0.34, seed=5)[1][0].index == val_cases[0].index

    meta = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"labels": meta["labels"], "classes": meta["classes"],
                                    "training": [dict(e, image=str(dataset / e["image"]), label=str(dataset / e["label"]))
                                                 for e in meta["training"][:5]],
                                    "validation": [{"image": str(dataset / e["image"]), "label": str(dataset / e["label"])}
                                                   for e in meta["training"][5:]]}))
    ds = load_dataset(datalist)
    t, v = split(ds, 0.5, 0)
    assert len(t) == 5 and len(v) == 3 and ds.classes == {"finding": ("absent", "present")}
    (nn / "labelsTr" / "c1.nii.gz").unlink()
    with pytest.raises(ConfigError, match="c1.nii.gz: case 1: file not found"):
        load_dataset(nn)
