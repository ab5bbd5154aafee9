"""Real volumes from ``<repo>/../shared/data`` (never copied into this repository).

Sources and licences (see each folder's LICENSE file):
- ``ct_gantry_tilt_dicom/``: github.com/neurolabusc/dcm_qa_ct @ d03e30e4c5c8ad07bf16422b96efc3e91e233dc5,
  folder In/GE; BSD-2-Clause, (c) 2019 Chris Rorden. A GE head CT, 28 slices, 18.5 deg gantry tilt,
  uneven slice gaps.
- ``sct_spine_mri/``: github.com/spinalcordtoolbox/sct_testing_data @
  af4c7e8783c9dcf8bcfc6c53b190af46260bb875; MIT, (c) 2014 NeuroPoly. Cervical spine MRI ``t2.nii.gz``
  with permuted (PSR) axes and its manual spinal-cord label ``t2_seg-manual.nii.gz``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medautolabel.image import Image
from medautolabel.io.images import read_image, write_image
from medautolabel.io.segnrrd import read_seg_nrrd, write_seg_nrrd
from medautolabel.result import Code, SegmentInfo, Terminology

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared test data folder <repo>/../shared/data is absent")
TILT = DATA / "ct_gantry_tilt_dicom"
SPINE = DATA / "sct_spine_mri"


# --- gantry-tilted CT ------------------------------------------------------------------------------

def _source_slices():
    """Every slice read independently with pydicom: (IPP, row dir, col dir, spacing (i, j), HU array)."""
    slices = []
    for f in sorted(TILT.glob("*.dcm")):
        d = pydicom.dcmread(str(f))
        iop = np.array(d.ImageOrientationPatient, float)
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        spacing = (float(d.PixelSpacing[1]), float(d.PixelSpacing[0]))  # along columns (i), along rows (j)
        slices.append((np.array(d.ImagePositionPatient, float), iop[:3], iop[3:], spacing, hu))
    normal = np.cross(slices[0][1], slices[0][2])
    return sorted(slices, key=lambda s: s[0] @ normal), normal


def _bone_centroid_lps(hu, ipp, row, col, spacing):
    r, c = np.nonzero(hu > 300)
    return ipp + c.mean() * spacing[0] * row + r.mean() * spacing[1] * col


@pytest.fixture(scope="module")
def tilted():
    return read_image(TILT), _source_slices()


def test_gantry_tilt_is_detected_and_corrected(tilted):
    img, (slices, _) = tilted
    assert len(slices) == 28 and img.meta["number_of_slices"] == 28
    assert img.meta["modality"] == "CT"
    assert abs(img.meta["gantry_tilt_deg"] - 18.5) < 0.05
    assert "resampled" in img.meta["geometry_corrected"]
    np.testing.assert_allclose(img.direction.T @ img.direction, np.eye(3), atol=1e-6)  # a regular grid


def test_gantry_tilt_slices_land_at_their_true_positions(tilted):
    """Bone in source slices (placed by pydicom from each slice's own position) is found at the same
    physical place in the corrected volume."""
    img, (slices, normal) = tilted
    step = img.spacing[2]
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    checked = 0
    for s, (ipp, row, col, spacing, hu) in enumerate(slices):
        height = (ipp - slices[0][0]) @ normal
        k = round(float(height / step))
        if abs(height - k * step) > 0.01 or k >= img.array.shape[0]:
            continue  # this slice falls between planes of the regular grid
        plane = img.array[k].astype(float)
        j, i = np.nonzero(plane > 300)
        ours = img.ijk_to_ras_points(np.array([[i.mean(), j.mean(), k]]))[0] * lps_to_ras
        theirs = _bone_centroid_lps(hu, ipp, row, col, spacing)
        assert np.linalg.norm(ours - theirs) < 0.5, f"slice {s}"
        assert abs(len(i) - np.count_nonzero(hu > 300)) < 0.05 * len(i)
        checked += 1
    assert checked >= 10


def test_naive_reading_would_misplace_the_tilted_slices(tilted):
    """Why the correction is needed: ITK's plain series geometry puts slice 13 several mm off."""
    _, (slices, _) = tilted
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(TILT))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    naive = reader.Execute()
    ipp, row, col, spacing, hu = slices[13]
    r, c = np.nonzero(hu > 300)
    naive_point = np.array(naive.TransformContinuousIndexToPhysicalPoint((c.mean(), r.mean(), 13.0)))
    assert np.linalg.norm(naive_point - _bone_centroid_lps(hu, ipp, row, col, spacing)) > 5.0


# --- spine MRI with permuted axes -------------------------------------------------------------------

def test_spine_mri_matches_nibabel_and_has_psr_axes():
    img = read_image(SPINE / "t2.nii.gz")
    n = nib.load(str(SPINE / "t2.nii.gz"))
    assert nib.aff2axcodes(img.ijk_to_ras) == ("P", "S", "R")
    np.testing.assert_allclose(img.ijk_to_ras, n.affine, atol=1e-4)
    np.testing.assert_array_equal(img.array, np.asanyarray(n.dataobj).transpose(2, 1, 0))


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_spine_mri_round_trips_voxel_for_voxel(tmp_path, ext):
    img = read_image(SPINE / "t2.nii.gz")
    back = read_image(write_image(img, tmp_path / f"t2{ext}"))
    assert back.array.dtype == img.array.dtype
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-6)


def test_spine_cord_label_round_trips_through_seg_nrrd(tmp_path):
    label = read_image(SPINE / "t2_seg-manual.nii.gz")
    mask = (label.array > 0).astype(np.uint8)
    assert mask.sum() > 100
    cord = SegmentInfo(1, "Spinal cord", (1.0, 0.9, 0.5),
                       Terminology(Code("SCT", "123037004", "Anatomical Structure"),
                                   Code("SCT", "2748008", "Spinal cord")))
    back, segments = read_seg_nrrd(write_seg_nrrd(Image(mask, label.ijk_to_ras), [cord], tmp_path / "c.seg.nrrd"))
    np.testing.assert_array_equal(back.array, mask)
    np.testing.assert_allclose(back.ijk_to_ras, label.ijk_to_ras, atol=1e-9)
    assert segments[0].name == "Spinal cord" and segments[0].terminology == cord.terminology
    assert segments[0].voxel_count == int(mask.sum())
