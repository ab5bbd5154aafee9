"""Geometry of preprocessing: crop + reorient + resample, then back onto the input grid, voxel by voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cardfactory import GRIDS, card_dict, grid, ras_coords
from nibabel.orientations import aff2axcodes

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.geometry import reorient
from medautolabel.image import Image
from medautolabel.labelling.preprocess import foreground_box, preprocess, resample, to_input_grid

torch.set_num_threads(1)
WINDOW = [-3000.0, 3000.0]  # wide enough that the ramps below are never clipped


def ramp(xyz: np.ndarray) -> np.ndarray:
    """A linear function of RAS position: linear interpolation reproduces it exactly."""
    return 100.0 + 2.0 * xyz[..., 0] - 3.0 * xyz[..., 1] + 4.0 * xyz[..., 2]


def make_card(spacing, threshold=None, margin=4.0, orientation="RAS", axis_order="kji") -> ModelCard:
    pre = {"orientation": orientation, "spacing": list(spacing), "axis_order": axis_order}
    if threshold is not None:
        pre["crop_foreground"] = {"threshold": threshold, "margin_mm": margin}
    d = card_dict(input={"channels": [{"name": "wide", "window": WINDOW}]}, preprocessing=pre)
    d["network"]["parameters"]["in_channels"] = 1
    return ModelCard.from_dict(d)


def not_on_border(shape):
    inner = np.zeros(shape, bool)
    inner[1:-1, 1:-1, 1:-1] = True
    return inner


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_ramp_comes_back_on_the_same_voxels(name):
    shape, m = grid(name, center=(3.0, -2.0, 5.0))
    values = ramp(ras_coords(shape, m)).astype(np.float32)
    threshold = float(np.percentile(values, 95))  # keeps a corner of the image
    card = make_card((0.8, 0.9, 0.7), threshold=threshold)
    prep = preprocess(Image(values, m), card)

    # the network grid: RAS-oriented, the card's spacing, float32 tensor of the right shape
    assert aff2axcodes(prep.net_ijk_to_ras) == ("R", "A", "S")
    np.testing.assert_allclose(prep.net_spacing, (0.8, 0.9, 0.7), rtol=1e-9)
    assert prep.tensor.dtype == torch.float32 and tuple(prep.tensor.shape) == (1, 1) + prep.net_shape
    # network voxels hold the ramp at their own RAS position (inside the input's extent)
    net = prep.tensor[0, 0].numpy()
    expected_net = (ramp(ras_coords(prep.net_shape, prep.net_ijk_to_ras)) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    in_input = Image(values, m).ras_to_ijk_points(ras_coords(prep.net_shape, prep.net_ijk_to_ras).reshape(-1, 3))
    inside = np.all((in_input > 0.5) & (in_input < np.array(shape[::-1]) - 1.5), axis=1).reshape(prep.net_shape)
    assert inside.sum() > 0.3 * inside.size
    np.testing.assert_allclose(net[inside], expected_net[inside], atol=2e-6)

    # crop: every voxel above the threshold is inside the box, and the box is smaller than the image
    box = prep.crop
    assert np.prod(prep.crop_shape) < values.size
    outside = np.ones(shape, bool)
    outside[box] = False
    assert not np.any(values[outside] > threshold)

    # back on the input grid: the same value on the same voxel (image border: edge-clamped, skipped)
    back = to_input_grid(net, prep)
    expected = (values[box] - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    keep = not_on_border(shape)[box]
    np.testing.assert_allclose(back[keep], expected[keep], atol=2e-6)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_object_round_trip_is_exact(name):
    """A sphere mask survives crop + reorient + 2x resampling + undo on exactly the same voxels."""
    shape, m = grid(name)
    xyz = ras_coords(shape, m)
    mask = np.linalg.norm(xyz - np.array([2.0, -3.0, 1.0]), axis=-1) < 9.0
    hu = np.where(mask, 1000, -1000).astype(np.int16)
    _, reoriented = reorient(hu, m, "RAS")
    half = np.linalg.norm(reoriented[:3, :3], axis=0) / 2.0  # an exact 2x upsampling of every axis
    for spacing in (half, np.linalg.norm(reoriented[:3, :3], axis=0)):
        prep = preprocess(Image(hu, m), make_card(spacing, threshold=0.0, margin=3.0))
        back = to_input_grid(prep.tensor[0, 0].numpy(), prep) > 0.5
        full = np.zeros(shape, bool)
        full[prep.crop] = back
        assert mask.sum() > 500
        np.testing.assert_array_equal(full, mask)


def test_axis_order_ijk_is_the_transposed_tensor():
    shape, m = grid("oblique-anisotropic")
    values = ramp(ras_coords(shape, m)).astype(np.float32)
    kji = preprocess(Image(values, m), make_card((1.0, 1.0, 1.0)))
    ijk = preprocess(Image(values, m), make_card((1.0, 1.0, 1.0), axis_order="ijk"))
    assert ijk.tensor.shape[2:] == kji.tensor.shape[2:][::-1]
    np.testing.assert_array_equal(ijk.tensor[0, 0].numpy(), kji.tensor[0, 0].numpy().T)
    np.testing.assert_array_equal(ijk.to_kji(ijk.tensor[0, 0].numpy()), kji.tensor[0, 0].numpy())
    assert ijk.tensor_spacing == kji.tensor_spacing[::-1]


def test_reorient_permutes_and_flips_without_interpolation():
    shape, m = grid("oblique-permuted-flipped")
    values = ramp(ras_coords(shape, m))
    for codes in ("RAS", "LPI", "SAR"):
        out, matrix = reorient(values, m, codes)
        assert "".join(aff2axcodes(matrix)) == codes
        assert np.shares_memory(out, values)  # a view
        np.testing.assert_allclose(out, ramp(ras_coords(out.shape, matrix)), atol=1e-9)


def test_resample_handles_rotated_grids():
    """The general (non axis-aligned) path: a rotated target grid samples the ramp exactly."""
    shape, m = grid("axial")
    values = ramp(ras_coords(shape, m)).astype(np.float32)
    dst_shape, dst = grid("oblique-anisotropic")
    dst = dst.copy()
    dst[:3, :3] *= 0.5  # keep the target well inside the source
    centre = m[:3, 3] + m[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)
    dst[:3, 3] = centre - dst[:3, :3] @ ((np.array(dst_shape[::-1]) - 1) / 2)
    out = resample(values, m, dst_shape, dst)
    np.testing.assert_allclose(out, ramp(ras_coords(dst_shape, dst)), atol=2e-3)


def test_foreground_box_grows_by_the_margin_and_clips():
    a = np.full((20, 30, 40), -1000, np.int16)
    a[5:8, 10:20, 1:3] = 100
    assert foreground_box(a, -500, (2, 3, 4)) == (slice(3, 10), slice(7, 23), slice(0, 7))
    assert foreground_box(a, 500, (2, 3, 4)) is None


def test_no_foreground_keeps_the_whole_image():
    shape, m = grid("axial")
    prep = preprocess(Image(np.full(shape, -1000, np.int16), m), make_card((0.8, 0.8, 0.8), threshold=0.0))
    assert prep.crop_shape == shape


def test_margin_is_in_millimetres():
    shape, m = grid("flipped-anisotropic")  # spacing i, j, k = 0.7, 0.9, 2.0 mm
    a = np.full(shape, -1000, np.int16)
    a[9, 20, 25] = 500
    prep = preprocess(Image(a, m), make_card((1, 1, 1), threshold=0.0, margin=4.0))
    # ceil(4/2.0)=2 slices in k, ceil(4/0.9)=5 rows in j, ceil(4/0.7)=6 columns in i
    assert prep.crop == (slice(7, 12), slice(15, 26), slice(19, 32))


def test_network_grid_is_monai_spacingd_grid():
    """Same shape, affine and voxel values as MONAI's Orientationd + Spacingd on an oblique, flipped grid."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    from medautolabel.geometry import image_to_ijk_array

    shape, m = grid("oblique-permuted-flipped")
    values = ramp(ras_coords(shape, m)).astype(np.float32)
    prep = preprocess(Image(values, m), make_card((0.8, 0.9, 0.7)))
    ijk, affine = image_to_ijk_array(Image(values, m))
    src = MetaTensor(torch.from_numpy(np.ascontiguousarray(ijk))[None], affine=torch.from_numpy(affine))
    out = Spacing(pixdim=(0.8, 0.9, 0.7), mode="bilinear")(Orientation(axcodes="RAS")(src))
    assert tuple(out.shape[1:])[::-1] == prep.net_shape  # MONAI (i, j, k), ours (k, j, i)
    np.testing.assert_allclose(out.affine.numpy(), prep.net_ijk_to_ras, atol=1e-5)
    ours = prep.tensor[0, 0].numpy() * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
    np.testing.assert_allclose(out[0].numpy().T, ours, atol=2e-2)


@pytest.mark.parametrize("rotated", [False, True])
def test_resample_in_parallel_slabs_equals_one_pass(monkeypatch, rotated):
    """Large outputs are sampled in slabs on several threads; the result is scipy's single pass, voxel by voxel.

    A rotated grid goes to scipy in slabs; an axis-aligned one takes the separable path (no scipy call).
    """
    from scipy import ndimage

    from medautolabel.labelling import preprocess as pre

    rng = np.random.default_rng(3)
    src = rng.normal(size=(40, 60, 70)).astype(np.float32)
    src_m = np.diag([0.7, 0.9, 2.0, 1.0])
    _, dst_m = grid("oblique-anisotropic") if rotated else (None, np.diag([0.5, 0.5, 0.6, 1.0]))
    dst_m = dst_m.copy()
    dst_shape = (150, 200, 205)  # 6.15 M voxels: three slabs on three threads
    monkeypatch.setattr(pre, "worker_threads", lambda: 3)
    calls = []
    real = ndimage.affine_transform
    monkeypatch.setattr(pre.ndimage, "affine_transform", lambda *a, **k: calls.append(k["output"].shape) or real(*a, **k))
    slabs = pre.resample(src, src_m, dst_shape, dst_m)
    assert sorted(c[0] for c in calls) == ([50, 50, 50] if rotated else [])
    monkeypatch.undo()
    m = np.linalg.inv(src_m) @ dst_m
    one = np.empty(dst_shape, np.float32)
    ndimage.affine_transform(src, m[:3, :3][::-1, ::-1], offset=m[:3, 3][::-1], output=one, order=1, mode="nearest",
                             prefilter=False)
    np.testing.assert_allclose(slabs, one, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_separable_linear_equals_scipy_on_flipped_permuted_shifted_grids(monkeypatch, threads):
    """Flips, axis permutation, scales both ways, targets beyond the edges (clamped) and a one-voxel axis."""
    from scipy import ndimage

    from medautolabel.labelling import preprocess as pre

    monkeypatch.setattr(pre, "worker_threads", lambda: threads)
    rng = np.random.default_rng(threads)
    src = rng.integers(-1000, 2000, size=(9, 1, 23)).astype(np.int16)  # HU as read, one row in j
    src_m = np.array([[0, 0, -0.7, 5.0], [0.9, 0, 0, -3.0], [0, 2.5, 0, 1.0], [0, 0, 0, 1.0]])  # permuted, flipped
    dst_m = np.diag([0.8, 0.8, 0.8, 1.0])
    dst_m[:3, 3] = [-12.0, -4.0, -2.0]  # starts outside the source on every side
    dst_shape = (40, 6, 12)
    got = pre.resample(src, src_m, dst_shape, dst_m)
    m = np.linalg.inv(src_m) @ dst_m
    expected = np.empty(dst_shape, np.float32)
    ndimage.affine_transform(src.astype(np.float64), m[:3, :3][::-1, ::-1], offset=m[:3, 3][::-1], output=expected,
                             order=1, mode="nearest", prefilter=False)
    assert got.dtype == np.float32 and got.shape == dst_shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)  # |HU| <= 2000: float32 rounding


def test_resampling_onto_whole_voxel_positions_copies_exactly():
    """Same grid, or one shifted by whole voxels: the voxels themselves (softmax ties must stay ties)."""
    rng = np.random.default_rng(5)
    values = rng.random((7, 8, 9), dtype=np.float32)
    shape, m = grid("flipped-anisotropic")
    assert np.array_equal(resample(values, m, values.shape, m), values)
    shifted = m.copy()
    shifted[:3, 3] += m[:3, :3] @ np.array([2.0, 1.0, 3.0])  # i + 2, j + 1, k + 3
    np.testing.assert_array_equal(resample(values, m, (4, 7, 7), shifted), values[3:, 1:, 2:])
