"""Geometry conversions: SimpleITK (LPS, (k, j, i)) and nibabel/MONAI ((i, j, k), RAS) <-> Image.

Every grid kind (oblique, flipped, permuted, anisotropic) goes both ways through every conversion,
and independent readers (nibabel, pynrrd, SimpleITK's own index<->point mapping) confirm that a
voxel at a known physical position lands where it should.
"""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from medautolabel import geometry as g
from medautolabel.image import Image, make_ijk_to_ras


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


GRIDS = {
    "oblique": make_ijk_to_ras([0.7, 1.3, 2.9], _rotation([1, 2, 3], 37), [12.5, -40.25, 7.0]),
    "flipped": make_ijk_to_ras([0.8, 1.1, 2.0], np.diag([-1.0, 1.0, -1.0]), [30.0, -5.0, 60.0]),
    # i -> posterior, j -> superior, k -> right (like the spine MRI's PSR axes)
    "permuted": make_ijk_to_ras([1.0, 0.6, 3.0], np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float),
                                [-20.0, 31.0, -19.0]),
    "anisotropic": make_ijk_to_ras([0.4, 0.4, 5.0], np.eye(3), [-3.0, 2.0, 1.0]),
}
SHAPE_KJI = (5, 6, 7)


@pytest.fixture(params=sorted(GRIDS))
def image(request):
    rng = np.random.default_rng(0)
    return Image(rng.integers(-1000, 2000, SHAPE_KJI).astype(np.int16), GRIDS[request.param].copy())


def test_lps_flip_is_its_own_inverse_and_flips_only_x_y():
    m = GRIDS["oblique"]
    lps = g.ras_affine_to_lps(m)
    np.testing.assert_allclose(lps[:2], -m[:2])
    np.testing.assert_allclose(lps[2:], m[2:])
    np.testing.assert_allclose(g.lps_affine_to_ras(lps), m)
    np.testing.assert_allclose(g.ras_affine_to_lps(m[:3, :3]), lps[:3, :3])


def test_sitk_round_trip_both_ways(image):
    s = g.image_to_sitk(image)
    back = g.image_from_sitk(s)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == image.array.dtype
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-12)
    again = g.image_to_sitk(back)
    assert again.GetSize() == s.GetSize() == SHAPE_KJI[::-1]
    np.testing.assert_allclose(again.GetSpacing(), s.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(again.GetDirection(), s.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(again.GetOrigin(), s.GetOrigin(), atol=1e-12)


def test_sitk_index_to_point_matches_image_matrix(image):
    """SimpleITK's own mapping of index (i, j, k) to LPS equals Image's ijk->RAS with x, y negated."""
    s = g.image_to_sitk(image)
    for ijk in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1)]:
        lps = np.array(s.TransformIndexToPhysicalPoint(ijk))
        ras = image.ijk_to_ras_points(np.array([ijk]))[0]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-9)
        assert s[ijk] == image.array[ijk[2], ijk[1], ijk[0]]


def test_point_placed_by_sitk_is_found_at_its_ras_position(image):
    """A point object put at a known RAS position by SimpleITK is found there through Image."""
    s = g.image_to_sitk(image.with_array(np.zeros(SHAPE_KJI, np.uint8)))
    target_ras = image.ijk_to_ras_points(np.array([[4.2, 3.1, 2.4]]))[0]
    index = s.TransformPhysicalPointToIndex(tuple(target_ras * [-1, -1, 1]))
    s[index] = 1
    found = g.image_from_sitk(s)
    k, j, i = np.argwhere(found.array == 1)[0]
    assert (i, j, k) == (4, 3, 2)
    centre = found.ijk_to_ras_points(np.array([[i, j, k]]))[0]
    half_diagonal = 0.5 * np.linalg.norm(found.spacing)
    assert np.linalg.norm(centre - target_ras) <= half_diagonal


def test_nibabel_round_trip_both_ways(image):
    array_ijk, affine = g.image_to_ijk_array(image)
    assert array_ijk.shape == SHAPE_KJI[::-1]
    assert array_ijk[6, 1, 3] == image.array[3, 1, 6]
    back = g.image_from_ijk_array(array_ijk, affine)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras)
    assert back.array.flags["C_CONTIGUOUS"]
    nimg = g.image_to_nibabel(image)
    again = g.image_from_nibabel(nimg)
    np.testing.assert_array_equal(again.array, image.array)
    np.testing.assert_allclose(again.ijk_to_ras, image.ijk_to_ras)


def test_nifti_written_by_sitk_read_by_nibabel(image, tmp_path):
    path = tmp_path / "x.nii.gz"
    sitk.WriteImage(g.image_to_sitk(image), str(path))
    nimg = nib.load(str(path))
    np.testing.assert_allclose(nimg.affine, image.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(nimg.dataobj).transpose(2, 1, 0), image.array)


def test_nifti_written_by_nibabel_read_by_sitk(image, tmp_path):
    path = tmp_path / "x.nii.gz"
    nib.save(g.image_to_nibabel(image), str(path))
    back = g.image_from_sitk(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-4)


def test_nrrd_written_by_sitk_read_by_pynrrd(image, tmp_path):
    path = tmp_path / "x.nrrd"
    sitk.WriteImage(g.image_to_sitk(image), str(path))
    data, header = nrrd.read(str(path), index_order="C")
    assert header["space"] == "left-posterior-superior"
    lps = g.ras_affine_to_lps(image.ijk_to_ras)
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps[:3, :3], atol=1e-9)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3], atol=1e-9)
    np.testing.assert_array_equal(data, image.array)


def test_permuted_axes_codes_seen_by_nibabel():
    img = Image(np.zeros(SHAPE_KJI, np.uint8), GRIDS["permuted"])
    assert nib.aff2axcodes(g.image_to_nibabel(img).affine) == ("P", "S", "R")
    direction = np.array(g.image_to_sitk(img).GetDirection()).reshape(3, 3)
    # LPS columns: i -> posterior (+y in LPS), j -> superior (+z), k -> right (-x in LPS)
    np.testing.assert_allclose(direction, [[0, 0, -1], [1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_monai_metatensor_converts(image, tmp_path):
    monai_transforms = pytest.importorskip("monai.transforms")
    path = tmp_path / "x.nii.gz"
    nib.save(g.image_to_nibabel(image), str(path))
    loaded = monai_transforms.LoadImage(image_only=True, reader="NibabelReader")(str(path))
    back = g.image_from_ijk_array(loaded, loaded.affine)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-4)


def test_bool_and_float16_arrays_are_written_as_sitk_safe_types():
    img = Image(np.ones(SHAPE_KJI, bool), GRIDS["flipped"])
    assert g.image_to_sitk(img).GetPixelID() == sitk.sitkUInt8
    img = Image(np.ones(SHAPE_KJI, np.float16), GRIDS["flipped"])
    assert g.image_to_sitk(img).GetPixelID() == sitk.sitkFloat32


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="degenerate"):
        g.image_to_sitk(Image(np.zeros(SHAPE_KJI), np.diag([1.0, 0.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="3D scalar"):
        g.image_from_sitk(sitk.Image(4, 4, sitk.sitkUInt8))
    with pytest.raises(ValueError, match="3D scalar"):
        g.image_from_sitk(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3))
    with pytest.raises(ValueError, match="3D"):
        g.image_from_ijk_array(np.zeros((3, 3)), np.eye(4))
