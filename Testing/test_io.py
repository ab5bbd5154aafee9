"""read_image / write_image: every format, DICOM series geometry, and one clear InputError per bad input."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medautolabel.errors import InputError, MedAutoLabelError
from medautolabel.geometry import image_to_nibabel, image_to_sitk
from medautolabel.image import Image, make_ijk_to_ras
from medautolabel.io.atomic import TEMP_PREFIX
from medautolabel.io.images import read_image, write_image

OBLIQUE = make_ijk_to_ras([0.7, 1.3, 2.9], np.linalg.qr(np.array([[2.0, 1, 0], [1, 3, 1], [0, 1, 4]]))[0],
                          [12.5, -40.25, 7.0])
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "SECRET-1234"


def _image(dtype=np.int16) -> Image:
    rng = np.random.default_rng(1)
    return Image(rng.integers(-1000, 2000, (5, 6, 7)).astype(dtype), OBLIQUE.copy())


def _assert_one_clear_line(error: MedAutoLabelError, path, *words):
    text = str(error)
    assert str(path) in text and "\n" not in text and "Traceback" not in text
    for w in words:
        assert w in text.lower()
    assert error.__suppress_context__ or error.__cause__ is None  # no chained library traceback


# --- formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_write_read_round_trip(tmp_path, ext, dtype):
    img = _image(dtype)
    path = write_image(img, tmp_path / f"sub/x{ext}")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, img.array)
    assert back.array.dtype == img.array.dtype
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-5)
    assert back.meta["source_name"] == f"x{ext}" and back.meta["modality"] is None
    assert sorted(os.listdir(path.parent)) == [f"x{ext}"]  # no temporary file left


@pytest.mark.parametrize("ext", [".mhd", ".nhdr"])
def test_two_file_formats_are_read(tmp_path, ext):
    img = _image()
    sitk.WriteImage(image_to_sitk(img), str(tmp_path / f"x{ext}"))
    back = read_image(tmp_path / f"x{ext}")
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.ijk_to_ras, img.ijk_to_ras, atol=1e-6)


def test_nifti_geometry_matches_nibabel(tmp_path):
    path = write_image(_image(), tmp_path / "x.nii.gz")
    n = nib.load(str(path))
    back = read_image(path)
    np.testing.assert_allclose(back.ijk_to_ras, n.affine, atol=1e-5)
    np.testing.assert_array_equal(back.array, np.asanyarray(n.dataobj).transpose(2, 1, 0))


def test_3d_volume_stored_as_4d_with_one_volume_is_read(tmp_path):
    img = _image()
    n = image_to_nibabel(img)
    nib.save(nib.Nifti1Image(np.asanyarray(n.dataobj)[..., None], n.affine), str(tmp_path / "x.nii.gz"))
    back = read_image(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(back.array, img.array)


def test_write_refuses_unknown_extension(tmp_path):
    with pytest.raises(MedAutoLabelError, match="cannot write"):
        write_image(_image(), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


# --- bad inputs ----------------------------------------------------------------------------------

def _truncated(tmp_path: Path, ext: str, compress: bool) -> Path:
    path = tmp_path / f"t{ext}"
    sitk.WriteImage(image_to_sitk(Image(np.ones((20, 20, 20), np.int16), np.eye(4))), str(path), compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _bad_inputs(tmp_path: Path):
    """(path, words expected in the message) for every kind of bad input."""
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "garbage.nii").write_bytes(b"this is not an image" * 30)
    (tmp_path / "garbage.nrrd").write_bytes(b"NRRD0004\nnonsense: yes\n\n")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(tmp_path / "flat2d.nrrd"))
    sitk.WriteImage(sitk.Image([8, 9, 1], sitk.sitkInt16), str(tmp_path / "oneslice.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), str(tmp_path / "series4d.nii.gz"))
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.mha"))
    (tmp_path / "emptyfolder").mkdir()
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "a.txt").write_text("x")
    gz = tmp_path / "badgz.nii.gz"
    gz.write_bytes(gzip.compress(b"\x00" * 100))
    return [
        (tmp_path / "missing.nii.gz", ["no such file"]),
        (tmp_path / "empty.nii.gz", ["empty"]),
        (tmp_path / "garbage.nii", ["not a readable nifti"]),
        (tmp_path / "garbage.nrrd", ["not a readable nrrd"]),
        (gz, ["not a readable nifti"]),
        (_truncated(tmp_path, ".nii.gz", True), ["truncated"]),
        (_truncated(tmp_path, ".nii", False), ["truncated"]),
        (_truncated(tmp_path, ".nrrd", False), ["truncated"]),
        (_truncated(tmp_path, ".mha", False), ["truncated"]),
        (tmp_path / "notes.txt", ["unsupported", ".txt"]),
        (tmp_path / "photo.png", ["unsupported"]),
        (tmp_path / "flat2d.nrrd", ["2d"]),
        (tmp_path / "oneslice.nii.gz", ["2d"]),
        (tmp_path / "series4d.nii.gz", ["4d"]),
        (tmp_path / "rgb.mha", ["3 values per voxel"]),
        (tmp_path / "emptyfolder", ["no dicom series"]),
        (tmp_path / "notdicom", ["no dicom series"]),
    ]


def test_every_bad_input_gives_one_clear_input_error(tmp_path):
    for path, words in _bad_inputs(tmp_path):
        with pytest.raises(InputError) as info:
            read_image(path)
        _assert_one_clear_line(info.value, path, *words)
        assert info.value.path == str(path)


# --- DICOM ---------------------------------------------------------------------------------------

ROW, COL = np.array([1.0, 0, 0]), np.array([0, np.cos(np.radians(18.5)), -np.sin(np.radians(18.5))])
NORMAL = np.cross(ROW, COL)
SPACING_IJ = (0.5, 0.7)  # along i (columns), along j (rows)


def _write_series(folder: Path, volume: np.ndarray, positions, uid="1.2.826.0.1.3680043.2.1125.77"):
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    iop = "\\".join(f"{x:.9f}" for x in list(ROW) + list(COL))
    for s, pos in enumerate(positions):
        sl = sitk.GetImageFromArray(volume[s])
        sl.SetSpacing(SPACING_IJ)
        for key, value in [("0010|0010", PATIENT_NAME), ("0010|0020", PATIENT_ID), ("0008|0060", "CT"),
                           ("0020|000e", uid), ("0020|000d", uid + ".1"), ("0020|0037", iop),
                           ("0020|0032", "\\".join(f"{x:.6f}" for x in pos)), ("0020|0013", str(s + 1)),
                           ("0008|0018", f"{uid}.{s + 100}"), ("0008|0008", "ORIGINAL\\PRIMARY\\AXIAL")]:
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{s:03d}.dcm"))
        writer.Execute(sl)


def _blob_volume(n_slices: int, slice_with_blob: int, rc=(4, 6)) -> np.ndarray:
    vol = np.zeros((n_slices, 10, 12), np.int16)
    r, c = rc
    vol[slice_with_blob, r - 1:r + 2, c - 1:c + 2] = 1000
    return vol


def _centroid_lps(img: Image) -> np.ndarray:
    """LPS centroid of the blob in the brightest plane (neighbouring planes may hold interpolated parts)."""
    w = img.array.astype(float)
    brightest = np.argmax(w.sum(axis=(1, 2)))
    w[np.arange(len(w)) != brightest] = 0
    k, j, i = np.indices(w.shape)
    ijk = np.array([(i * w).sum(), (j * w).sum(), (k * w).sum()]) / w.sum()
    return img.ijk_to_ras_points(ijk[None])[0] * [-1, -1, 1]


def _expected_lps(position, rc=(4, 6)) -> np.ndarray:
    r, c = rc
    return np.asarray(position) + c * SPACING_IJ[0] * ROW + r * SPACING_IJ[1] * COL


def test_regular_dicom_series(tmp_path):
    origin = np.array([-10.0, 20.0, 30.0])
    positions = [origin + 2.5 * s * NORMAL for s in range(4)]
    _write_series(tmp_path / "ser", _blob_volume(4, 2), positions)
    img = read_image(tmp_path / "ser")
    assert img.array.shape == (4, 10, 12)
    assert img.meta["modality"] == "CT" and img.meta["format"] == "DICOM" and "geometry_corrected" not in img.meta
    expected = np.eye(4)
    expected[:3, :3] = np.stack([ROW * 0.5, COL * 0.7, NORMAL * 2.5], axis=1)
    expected[:3, 3] = origin
    np.testing.assert_allclose(img.ijk_to_ras, np.diag([-1, -1, 1, 1]) @ expected, atol=1e-4)
    np.testing.assert_allclose(_centroid_lps(img), _expected_lps(positions[2]), atol=1e-3)


def test_gantry_tilted_series_keeps_true_positions(tmp_path):
    origin = np.array([-10.0, 20.0, 30.0])
    positions = [origin + np.array([0, 0, 3.0 * s]) for s in range(6)]  # table moves along z, slices tilted
    _write_series(tmp_path / "tilt", _blob_volume(6, 5), positions)
    img = read_image(tmp_path / "tilt")
    assert abs(img.meta["gantry_tilt_deg"] - 18.5) < 0.1 and "resampled" in img.meta["geometry_corrected"]
    np.testing.assert_allclose(np.abs(np.linalg.det(img.direction)), 1.0, atol=1e-6)
    np.testing.assert_allclose(_centroid_lps(img), _expected_lps(positions[5]), atol=0.05)


def test_uneven_gaps_are_resampled_to_true_positions(tmp_path):
    origin = np.array([5.0, -3.0, 12.0])
    heights = [0.0, 2.0, 4.0, 7.0, 10.0]
    positions = [origin + h * NORMAL for h in heights]
    _write_series(tmp_path / "gaps", _blob_volume(5, 4), positions)
    img = read_image(tmp_path / "gaps")
    np.testing.assert_allclose(img.spacing, [0.5, 0.7, 2.5], atol=1e-4)  # median gap
    np.testing.assert_allclose(_centroid_lps(img), _expected_lps(positions[4]), atol=0.05)


@pytest.mark.parametrize("heights, words", [([0, 2, 4, 12, 14], ["missing"]),
                                            ([0, 2, 2, 4, 6], ["share a position"])])
def test_inconsistent_stacks_are_refused(tmp_path, heights, words):
    positions = [np.array([0.0, 0, 0]) + h * NORMAL for h in heights]
    _write_series(tmp_path / "bad", _blob_volume(5, 1), positions)
    with pytest.raises(InputError) as info:
        read_image(tmp_path / "bad")
    _assert_one_clear_line(info.value, tmp_path / "bad", *words)


def test_largest_series_or_the_series_of_a_given_file(tmp_path):
    _write_series(tmp_path / "mix", _blob_volume(4, 0), [s * 2.0 * NORMAL for s in range(4)], uid="1.2.3.4.1")
    _write_series(tmp_path / "mix2", _blob_volume(3, 0), [s * 2.0 * NORMAL for s in range(3)], uid="1.2.3.4.2")
    for f in (tmp_path / "mix2").iterdir():
        f.rename(tmp_path / "mix" / ("b-" + f.name))
    assert read_image(tmp_path / "mix").array.shape[0] == 4
    assert read_image(tmp_path / "mix" / "b-slice000.dcm").array.shape[0] == 3


def test_patient_data_never_leaks(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    positions = [np.array([0.0, 0, 3.0 * s]) for s in range(4)]  # tilted: the warning path runs too
    _write_series(tmp_path / "Series", _blob_volume(4, 1), positions)
    img = read_image(tmp_path / "Series")
    seen = [repr(img.meta), caplog.text]
    broken = tmp_path / "Broken"
    _write_series(broken, _blob_volume(4, 1), positions)
    victim = sorted(broken.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-150])  # header intact, pixel data cut short
    with pytest.raises(InputError) as info:
        read_image(broken)
    out, err = capfd.readouterr()
    seen += [str(info.value), out, err, caplog.text]
    for text in seen:
        for secret in ("Doe", "Jane", PATIENT_ID):
            assert secret not in text


def test_no_temporary_file_survives_a_failed_write(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(MedAutoLabelError, match="cannot write"):
        write_image(_image(), tmp_path / "x.nrrd")
    assert [p for p in os.listdir(tmp_path) if p.startswith(TEMP_PREFIX) or p == "x.nrrd"] == []
