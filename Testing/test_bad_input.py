"""Errors a user can cause: one line on stderr naming the file and the problem, exit 2, nothing written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel.cli.app import main
from medautolabel.io.images import write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def run_label(capsys, inputs, out, *extra):
    status = main(["label", *[str(p) for p in inputs], "-o", str(out), "--device", "cpu", "-q", *extra])
    captured = capsys.readouterr()
    return status, captured.err.strip().splitlines()


def assert_clean_failure(status, err, out, *must_contain):
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("medautolabel: error: ")
    for text in must_contain:
        assert text in err[0], err[0]
    assert "Traceback" not in err[0]
    leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert leftovers == [], leftovers  # no partial output, no temporary files


def _nifti(path, array):
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 0.8, 1.0])), str(path))
    return path


def bad_file(kind: str, folder):
    """Write one kind of bad input into ``folder``; return (path, words the message must hold)."""
    if kind == "missing":
        return folder / "nothere.nii.gz", ["nothere.nii.gz", "no such file"]
    if kind == "empty":
        p = folder / "empty.nrrd"
        p.write_bytes(b"")
        return p, ["empty.nrrd", "empty"]
    if kind in ("truncated-nifti", "truncated-nrrd"):
        suffix = ".nii" if kind == "truncated-nifti" else ".nrrd"
        whole = folder / f"whole{suffix}"
        write_image(sphere_image(), whole)
        data = whole.read_bytes()
        p = folder / f"cut{suffix}"
        p.write_bytes(data[: len(data) // 2])
        whole.unlink()
        return p, [p.name, "truncated"]
    if kind == "unsupported":
        p = folder / "notes.txt"
        p.write_text("hello")
        return p, ["notes.txt", "unsupported"]
    if kind == "2d":
        return _nifti(folder / "slice.nii.gz", np.zeros((32, 32), np.int16)), ["slice.nii.gz", "3D"]
    if kind == "4d":
        return _nifti(folder / "series.nii.gz", np.zeros((16, 16, 16, 3), np.int16)), ["series.nii.gz", "3D"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated-nifti", "truncated-nrrd", "unsupported", "2d", "4d"])
def test_bad_image_file(kind, model_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    path, words = bad_file(kind, tmp_path / "in")
    out = tmp_path / "out"
    status, err = run_label(capsys, [path], out, "--model", str(model_dir))
    # the message names the file and says what is wrong with it (case-insensitive for the problem)
    assert status == 2 and len(err) == 1, err
    assert str(path) in err[0]
    assert words[1].lower() in err[0].lower(), err[0]
    assert_clean_failure(status, err, out)


def test_unknown_model(tmp_path, capsys):
    image = tmp_path / "scan.nii.gz"
    write_image(sphere_image(), image)
    out = tmp_path / "out"
    status, err = run_label(capsys, [image], out, "--model", "no-such-model")
    assert_clean_failure(status, err, out, "unknown model 'no-such-model'", "vessel-nerve-cta")


def test_model_folder_that_does_not_exist(tmp_path, capsys):
    image = tmp_path / "scan.nii.gz"
    write_image(sphere_image(), image)
    out = tmp_path / "out"
    status, err = run_label(capsys, [image], out, "--model", str(tmp_path / "models" / "gone"))
    assert_clean_failure(status, err, out, str(tmp_path / "models" / "gone"), "not found")


@pytest.mark.parametrize("breakage", ["not-json", "missing-field", "wrong-type"])
def test_broken_model_card(breakage, model_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "broken-model"
    shutil.copytree(model_dir, folder)
    card = folder / "model.json"
    data = json.loads(card.read_text(encoding="utf-8"))
    if breakage == "not-json":
        card.write_text(card.read_text(encoding="utf-8")[:-20])
        words = ["model.json", "JSON"]
    elif breakage == "missing-field":
        del data["labels"]
        card.write_text(json.dumps(data))
        words = ["model.json", "labels"]
    else:
        data["inference"]["roi_size"] = "large"
        card.write_text(json.dumps(data))
        words = ["model.json", "inference.roi_size"]
    image = tmp_path / "scan.nii.gz"
    write_image(sphere_image(), image)
    out = tmp_path / "out"
    status, err = run_label(capsys, [image], out, "--model", str(folder))
    assert_clean_failure(status, err, out, *words)


def test_models_show_unknown_is_one_line(capsys):
    assert main(["models", "show", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'nope'" in err[0]


def test_two_inputs_with_the_same_name_are_refused_before_any_work(model_dir, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_image(sphere_image(), tmp_path / sub / "scan.nii.gz")
    out = tmp_path / "out"
    status, err = run_label(capsys, [tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz"], out,
                            "--model", str(model_dir))
    assert_clean_failure(status, err, out, "same output name 'scan'")


def test_dicom_errors_never_show_patient_names(tmp_path, capsys):
    """A DICOM folder whose slices cannot form a volume: the message names the folder, not the patient."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = tmp_path / "PAT001"
    folder.mkdir()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "one.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.Modality = "CT"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    pydicom.dcmwrite(str(folder / "one.dcm"), ds, enforce_file_format=True)
    out = tmp_path / "out"
    status = main(["label", str(folder), "-o", str(out), "--device", "cpu", "-q"])
    captured = capsys.readouterr()
    assert status == 2
    text = captured.err + captured.out
    assert "Doe" not in text and "Jane" not in text and "SECRET-123" not in text
    assert str(folder) in text
