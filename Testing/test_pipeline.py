"""label_image end to end with a real model folder whose answer is known exactly.

The model is a TorchScript network that thresholds its input (HU 150 <-> vessel, HU 800 <->
aneurysm evidence): what it should label is then fixed by the phantom, so the test checks the
engine's geometry, post-processing, facts and callbacks rather than a network's skill.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cardfactory import GRIDS, card_dict, grid, ras_coords, write_card
from thresholdmodel import write_threshold_model

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import Cancelled, InputError
from medautolabel.evaluation.metrics import dice
from medautolabel.image import Image
from medautolabel.labelling.pipeline import check_modality, label_image
from medautolabel.runtime import network as network_module
from medautolabel.runtime.device import DeviceError

torch.set_num_threads(1)
CENTER = np.array([3.0, -2.0, 1.5])  # sphere centre, RAS mm
RADIUS = 7.0
WINDOW = [-1000.0, 1000.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def partial_volume_sphere(shape, m, center, radius, n=3) -> np.ndarray:
    """Fraction of each voxel inside the sphere (n^3 subsamples per voxel)."""
    frac = np.zeros(shape, np.float32)
    offsets = (np.arange(n) + 0.5) / n - 0.5
    for di in offsets:
        for dj in offsets:
            for dk in offsets:
                mm = m.copy()
                mm[:3, 3] = m[:3, :3] @ np.array([di, dj, dk]) + m[:3, 3]
                frac += np.linalg.norm(ras_coords(shape, mm) - center, axis=-1) <= radius
    return frac / n ** 3


SPECK = np.array([-6.0, -6.0, 6.0])  # RAS mm, inside the soft-tissue ball


def speck_box(shape, m, grow: int):
    k, j, i = np.rint(np.linalg.inv(m)[:3, :3] @ SPECK + np.linalg.inv(m)[:3, 3])[::-1].astype(int)
    return slice(k - grow, k + 2 + grow), slice(j - grow, j + 2 + grow), slice(i - grow, i + 2 + grow)


def phantom(aneurysm: bool = False, speck: bool = True, name: str = "oblique-anisotropic") -> Image:
    """Air around a soft-tissue ball (0 HU) holding a contrast sphere (300 HU), a speck, maybe a bright blob."""
    shape, m = grid(name)
    xyz = ras_coords(shape, m)
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.linalg.norm(xyz, axis=-1) < 12.5] = 0.0
    hu += 300.0 * partial_volume_sphere(shape, m, CENTER, RADIUS)
    if speck:  # a 2x2x2-voxel bright speck (~10 mm3): below the card's 20 mm3 minimum vessel size
        hu[speck_box(shape, m, 0)] = 600.0
    if aneurysm:
        hu[np.linalg.norm(xyz - np.array([-5.0, 4.0, -4.0]), axis=-1) < 4.0] = 1000.0
    return Image(np.rint(hu).astype(np.int16), m, {"modality": "CT"})


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_sphere_lands_on_the_right_voxels(model_dir, grid_name):
    image = phantom(name=grid_name)
    result = label_image(image, str(model_dir), device="cpu")
    lab = result.labelmap
    assert lab.array.dtype == np.uint8 and lab.array.shape == image.array.shape
    np.testing.assert_array_equal(lab.ijk_to_ras, image.ijk_to_ras)

    truth = partial_volume_sphere(image.shape_kji, image.ijk_to_ras, CENTER, RADIUS) >= 0.5
    vessel = lab.array == 1
    assert dice(vessel, truth) > 0.97, dice(vessel, truth)
    assert np.all(vessel[truth & (partial_volume_sphere(image.shape_kji, image.ijk_to_ras, CENTER, RADIUS - 1.5) > 0)])
    assert not np.any(lab.array == 2)
    centroid = image.ijk_to_ras_points(np.argwhere(vessel)[:, ::-1]).mean(axis=0)
    np.testing.assert_allclose(centroid, CENTER, atol=0.15)

    crop = result.provenance["network_grid"]["crop_kji"]
    assert all(hi - lo < n for (lo, hi), n in zip(crop, image.shape_kji))  # cropped on every axis

    seg = {s.name: s for s in result.segments}
    analytic_ml = 4 / 3 * math.pi * RADIUS ** 3 / 1000
    assert seg["Vessel"].voxel_count == int(vessel.sum())
    assert seg["Vessel"].volume_ml == pytest.approx(vessel.sum() * image.voxel_volume_ml)
    assert seg["Vessel"].volume_ml == pytest.approx(analytic_ml, rel=0.04)
    assert 0.85 < seg["Vessel"].mean_confidence < 1.0 and not seg["Vessel"].low_confidence
    assert seg["Nerve"].voxel_count == 0 and seg["Nerve"].volume_ml == 0.0
    assert seg["Vessel"].color == (0.85, 0.25, 0.2) and seg["Vessel"].terminology.type.value == "59820001"

    cls = result.classifications[0]
    assert (cls.task, cls.label) == ("aneurysm", "absent") and cls.probability > 0.99

    prov = result.provenance
    assert prov["model"]["id"] == "threshold" and prov["model"]["version"] == "0.0.1"
    assert prov["model"]["weights_sha256"] == network_module.file_sha256(model_dir / "model.ts")
    assert prov["device"] == "cpu"
    assert set(prov["timings_s"]) >= {"load_model", "preprocess", "inference", "postprocess", "total"}
    assert {"medautolabel", "torch", "monai", "SimpleITK", "numpy"} <= set(prov["software"])


def test_clean_up_removes_small_components_and_can_be_skipped(model_dir):
    image = phantom()
    speck = np.zeros(image.shape_kji, bool)
    speck[speck_box(image.shape_kji, image.ijk_to_ras, 2)] = True
    cleaned = label_image(image, model_dir, device="cpu").labelmap.array
    raw = label_image(image, model_dir, device="cpu", postprocess=False).labelmap.array
    assert np.any(raw[speck] == 1)
    assert not np.any(cleaned[speck])
    assert np.array_equal(cleaned[~speck], raw[~speck])


def test_aneurysm_evidence_is_classified(model_dir):
    result = label_image(phantom(aneurysm=True), model_dir, device="cpu")
    cls = result.classifications[0]
    assert cls.label == "present" and cls.probability > 0.9
    assert cls.probabilities["absent"] == pytest.approx(1 - cls.probability)


def test_low_confidence_threshold_flags_segments(model_dir):
    card = ModelCard.load(model_dir)
    strict = label_image(phantom(), card, device="cpu", low_confidence_threshold=0.95)
    vessel = next(s for s in strict.segments if s.name == "Vessel")
    assert vessel.mean_confidence < 0.95 and vessel.low_confidence
    assert strict.classifications[0].probability > 0.95 and not strict.classifications[0].low_confidence
    assert strict.provenance["low_confidence_threshold"] == 0.95
    lenient = label_image(phantom(), card, device="cpu", low_confidence_threshold=0.5)
    assert not any(s.low_confidence for s in lenient.segments)


def test_progress_is_monotone_from_0_to_1(model_dir):
    calls = []
    label_image(phantom(), model_dir, device="cpu", progress=lambda f, stage: calls.append((f, stage)))
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert sum(stage == "inference" for _, stage in calls) > 3  # reported per window batch
    stages = [s for _, s in calls]
    assert stages.index("preprocessing") < stages.index("inference") < stages.index("postprocessing")


def test_cancel_stops_within_one_window_batch(model_dir):
    reports = []  # inference-stage progress: one report at the stage start, then one per window batch

    def progress(fraction, stage):
        if stage == "inference":
            reports.append(fraction)

    with pytest.raises(Cancelled):
        label_image(phantom(), model_dir, device="cpu", progress=progress, cancel=lambda: len(reports) >= 3)
    assert len(reports) == 3  # two window batches ran; none started after cancel() said yes
    assert reports[-1] < 0.9  # the inference stage (up to 0.92) was not finished


def test_forced_cuda_without_gpu_is_a_clear_error(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU found"):
        label_image(phantom(), model_dir, device="cuda")


def test_modality_must_not_contradict_the_card(model_dir):
    card = ModelCard.load(model_dir)
    image = phantom()
    image.meta["modality"] = "MR"
    with pytest.raises(InputError, match="image is MR, but model 'threshold' expects CT"):
        label_image(image, card, device="cpu")
    for ok in (None, "", "CT", "ct", "OT"):
        image.meta["modality"] = ok
        check_modality(image, card)


def test_state_dict_unet_model_runs_and_is_cached(tmp_path, monkeypatch):
    """The ordinary route: a MONAI UNet built from the card, weights from a state dict."""
    torch.manual_seed(0)
    d = card_dict(id="tiny-unet")
    d["preprocessing"]["spacing"] = [1.5, 1.5, 1.5]
    folder = tmp_path / "tiny-unet"
    write_card(folder, d)
    card = ModelCard.load(folder)
    torch.save(network_module.build_network(card).state_dict(), folder / "model.pt")
    monkeypatch.setenv("MEDAUTOLABEL_MODEL_PATH", str(tmp_path))
    network_module.clear_cache()
    first = label_image(phantom(speck=False), "tiny-unet", device="cpu")
    loaded = []
    monkeypatch.setattr(network_module, "_load_uncached", lambda *a: loaded.append(a))
    second = label_image(phantom(speck=False), "tiny-unet", device="cpu")
    assert loaded == []  # the second run reused the cached network
    np.testing.assert_array_equal(first.labelmap.array, second.labelmap.array)
    assert first.provenance["model"]["weights_sha256"] == network_module.file_sha256(folder / "model.pt")
