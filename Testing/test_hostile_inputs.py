"""Hostile inputs (issue #13, input side): bad images, labelmaps posing as images, absurd headers and
model cards, malicious weights, bad option values, hostile DICOM folders, and inputs that used to
give silently wrong results (NaN voxels, labels only in a prediction).

Every refusal is checked with ``hostile.assert_refused``: exit status 2, one line naming the file
and the problem, no output and no temporary left, inputs byte-identical. Inputs that must be
labelled (a few NaN voxels, a DICOM series with a missing slice) are checked for the labels and
for the record of what was repaired. One parametrize id per corpus case.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from cardfactory import card_dict, write_card
from hostile import Snapshot, assert_absent, assert_refused, run_inprocess, temporaries
from test_io import NORMAL, PATIENT_ID, PATIENT_NAME, _blob_volume, _write_series
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel.image import Image
from medautolabel.io.images import read_image, write_image
from medautolabel.io.outputs import TAGS_FORMAT
from medautolabel.io.segnrrd import write_seg_nrrd
from medautolabel.result import Code as TermCode
from medautolabel.result import SegmentInfo, Terminology


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_threshold_model(tmp_path_factory.mktemp("threshold-model"))


def label(inputs, out, model, *extra):
    """``medautolabel label`` in-process with the threshold model on the CPU."""
    return run_inprocess(["label", *inputs, "-o", out, "--model", model, "--device", "cpu", "-q", *extra])


def float_sphere() -> Image:
    """``sphere_image()`` as float32 (integer images cannot hold NaN)."""
    image = sphere_image()
    return image.with_array(image.array.astype(np.float32))


# --- bad image files: each builder writes one into ``folder`` and returns (path, words of the problem) ----


def _nan_share(folder: Path, share: float, value: float = np.nan):
    image = float_sphere()
    flat = image.array.reshape(-1)
    flat[: int(round(share * flat.size))] = value
    return write_image(image, folder / "scan.nrrd")


def all_nan(folder):
    return _nan_share(folder, 1.0), ["NaN", "every voxel"]


def all_infinite(folder):
    return _nan_share(folder, 1.0, np.inf), ["infinite", "every voxel"]


def mostly_nan(folder):
    return _nan_share(folder, 0.6), ["60%", "NaN"]


def mostly_nan_nifti(folder):
    path = _nan_share(folder, 0.75)
    image = read_image(path)
    path.unlink()
    return write_image(image, folder / "scan.nii.gz"), ["75%", "NaN"]


def slicer_segmentation(folder):
    image = sphere_image()
    labels = image.with_array((image.array > 100).astype(np.uint8))
    code = TermCode("SCT", "59820001", "Blood vessel")
    segment = SegmentInfo(1, "Vessel", (1.0, 0.0, 0.0), Terminology(code, code))
    return write_seg_nrrd(labels, [segment], folder / "vessels.seg.nrrd"), ["segmentation/labelmap", "Segment0_"]


def nifti_label_intent(folder):
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    img.header.set_intent("label")
    path = folder / "labels.nii.gz"
    nib.save(img, str(path))
    return path, ["segmentation/labelmap", "NIFTI_INTENT_LABEL"]


def own_labelmap(folder):
    image = sphere_image()
    path = write_image(image.with_array((image.array > 100).astype(np.uint8)), folder / "scan.nii.gz")
    doc = {"format": TAGS_FORMAT, "labelmap_file": path.name, "segments": []}
    (folder / "scan.tags.json").write_text(json.dumps(doc))
    return path, ["segmentation/labelmap", "scan.tags.json"]


def _nrrd(folder: Path, name: str, fields: str, data: bytes = b"\0" * 16) -> Path:
    path = folder / name
    header = "NRRD0004\ntype: short\ndimension: 3\nencoding: raw\nendian: little\nspace: left-posterior-superior\n"
    path.write_bytes((header + fields + "\n").encode() + data)
    return path


def huge_nrrd(folder):
    fields = "sizes: 100000 100000 100000\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
    return _nrrd(folder, "huge.nrrd", fields), ["100000x100000x100000", "memory"]


def _nifti_bytes(fields=()) -> bytes:
    """An uncompressed 4x4x4 int16 NIfTI-1 file with raw header fields overwritten: (struct format, offset, values)."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    raw = bytearray(img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.int16).tobytes())
    for fmt, offset, values in fields:
        struct.pack_into(fmt, raw, offset, *values)
    return bytes(raw)


def huge_nifti(folder):
    path = folder / "huge.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes([("<4h", 40, (3, 30000, 30000, 30000))])))
    return path, ["30000x30000x30000", "memory"]


def huge_nifti2(folder):  # NIfTI-2 dimensions are 64-bit: 100000^3 fits in its header
    img = nib.Nifti2Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    raw = bytearray(img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.int16).tobytes())
    struct.pack_into("<4q", raw, 16, 3, 100000, 100000, 100000)
    path = folder / "huge2.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    return path, ["100000x100000x100000", "memory"]


def nifti_claims_more_than_it_holds(folder):
    path = folder / "claims.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes([("<4h", 40, (3, 1000, 1000, 600))])))
    return path, ["1000x1000x600", "truncated"]


def _nifti_file(folder, name, fields):
    path = folder / name
    path.write_bytes(_nifti_bytes(fields))
    return path


def zero_voxel_size(folder):  # ITK alone would read it as 1 mm
    return _nifti_file(folder, "zero.nii", [("<f", 80, (0.0,)), ("<2h", 252, (1, 0))]), ["voxel size", "> 0"]


def negative_voxel_size(folder):
    return _nifti_file(folder, "neg.nii", [("<f", 80, (-2.0,)), ("<2h", 252, (1, 0))]), ["voxel size", "> 0"]


def nan_voxel_size(folder):
    return _nifti_file(folder, "nan.nii", [("<f", 84, (np.nan,)), ("<2h", 252, (1, 0))]), ["voxel size", "nan"]


def nan_quaternion(folder):
    return _nifti_file(folder, "quat.nii", [("<f", 256, (np.nan,)), ("<2h", 252, (1, 0))]), ["qform", "finite"]


def singular_sform(folder):
    fields = [("<3f", 280, (0.0, 0.0, 0.0)), ("<2h", 252, (0, 1))]
    return _nifti_file(folder, "flat.nii", fields), ["singular", "directions"]


def nan_sform(folder):
    fields = [("<f", 284, (np.nan,)), ("<2h", 252, (0, 1))]
    return _nifti_file(folder, "nansform.nii", fields), ["not finite", "directions"]


def zero_spacing_nrrd(folder):
    fields = "sizes: 4 4 4\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n"
    return _nrrd(folder, "zero.nrrd", fields, b"\0" * 128), ["voxel size", "> 0"]


def parallel_axes_nrrd(folder):
    fields = "sizes: 4 4 4\nspace directions: (1,0,0) (2,0,0) (0,0,1)\n"
    return _nrrd(folder, "parallel.nrrd", fields, b"\0" * 128), ["directions", "singular"]


def two_d_image(folder):
    path = folder / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.int16)), str(path))
    return path, ["2D", "3D volume"]


def rgb_image(folder):
    path = folder / "photo.nii.gz"
    img = nib.Nifti1Image(np.zeros((6, 6, 6, 1, 3), np.float32), np.eye(4))
    img.header.set_intent("vector")
    nib.save(img, str(path))
    return path, ["3 values per voxel"]


def complex_image(folder):
    path = folder / "kspace.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.complex64), np.eye(4)), str(path))
    return path, ["complex"]


def symlink_loop(folder):
    a, b = folder / "a.nii.gz", folder / "b.nii.gz"
    a.symlink_to(b)
    b.symlink_to(a)
    return a, ["symbolic link", "loop"]


def dangling_symlink(folder):
    link = folder / "gone.nii.gz"
    link.symlink_to(folder / "deleted.nii.gz")
    return link, ["symbolic link", "dangling"]


def fifo(folder):
    path = folder / "pipe.nii.gz"
    os.mkfifo(path)
    return path, ["not a regular file"]


def folder_named_like_an_image(folder):
    path = folder / "scan.nii.gz"
    path.mkdir()
    (path / "notes.txt").write_text("not an image")
    return path, ["is a folder"]


def folder_without_images(folder):
    path = folder / "study"
    path.mkdir()
    (path / "readme.txt").write_text("no images here")
    return path, ["no DICOM series"]


def empty_folder(folder):
    path = folder / "empty-study"
    path.mkdir()
    return path, ["no DICOM series"]


def leading_dot_name(folder):  # the message names the output it refuses to make: '.hidden'
    return write_image(sphere_image(), folder / ".hidden.nii.gz"), ["invalid output name", "'.hidden'"]


def nrrd_data_from_dev_zero(folder):
    path = folder / "endless.nhdr"
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 64\nencoding: raw\nendian: little\n"
                    "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                    "data file: /dev/zero\n")
    return path, ["/dev/zero", "not a regular file"]


def metaimage_data_from_a_fifo(folder):
    os.mkfifo(folder / "pipe.raw")
    path = folder / "piped.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                    "ElementSpacing = 1 1 1\nElementDataFile = pipe.raw\n")
    return path, ["pipe.raw", "not a regular file"]


def four_d_nrrd(folder):
    path = folder / "dynamic.nrrd"
    frames = [sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return path, ["4D", "single 3D volume"]


def mixed_dicom_slice_sizes(folder):
    path = folder / "Mixed"
    _write_series(path, _blob_volume(3, 1), [s * 2.0 * NORMAL for s in range(3)])
    _write_series(folder / "other", np.zeros((2, 14, 9), np.int16), [(3 + s) * 2.0 * NORMAL for s in range(2)])
    for f in sorted((folder / "other").iterdir()):
        f.rename(path / ("z-" + f.name))
    (folder / "other").rmdir()
    return path, ["DICOM series"]


def dicom_gap_too_large(folder):
    path = folder / "Gappy"
    _write_series(path, _blob_volume(5, 1), [h * NORMAL for h in (0.0, 2.0, 4.0, 14.0, 16.0)])
    return path, ["slices are missing"]


BAD_IMAGES = [all_nan, all_infinite, mostly_nan, mostly_nan_nifti, slicer_segmentation, nifti_label_intent,
              own_labelmap, huge_nrrd, huge_nifti, huge_nifti2, nifti_claims_more_than_it_holds, zero_voxel_size,
              negative_voxel_size, nan_voxel_size, nan_quaternion, singular_sform, nan_sform, zero_spacing_nrrd,
              parallel_axes_nrrd, two_d_image, rgb_image, complex_image, symlink_loop, dangling_symlink, fifo,
              folder_named_like_an_image, folder_without_images, empty_folder, leading_dot_name,
              nrrd_data_from_dev_zero, metaimage_data_from_a_fifo, four_d_nrrd, mixed_dicom_slice_sizes,
              dicom_gap_too_large]


@pytest.mark.parametrize("build", BAD_IMAGES, ids=[b.__name__ for b in BAD_IMAGES])
def test_bad_image_is_refused(build, model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    path, words = build(inputs)
    snap = Snapshot(inputs)
    out = tmp_path / "out"
    outcome = label([path], out, model_dir)
    names = [] if path.name.startswith(".") else [path.name]
    assert_refused(outcome, names, words, untouched=snap, no_temps_in=[inputs, tmp_path], no_files_in=[out])
    assert_absent(PATIENT_NAME, out, outcome=outcome)
    assert_absent(PATIENT_ID, out, outcome=outcome)


@pytest.mark.parametrize("name", ["new\nline.nii.gz", "bell\a.nii.gz"], ids=["newline-in-name", "bell-in-name"])
def test_names_with_control_characters(name, model_dir, tmp_path):
    """A file name with control characters: status 2, one line, no leftovers (the text itself is sanitised elsewhere)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = write_image(float_sphere(), inputs / "scan.nrrd")
    odd = path.with_name(name)
    path.rename(odd)
    odd.write_bytes(b"not an image at all")
    snap = Snapshot(inputs)
    out = tmp_path / "out"
    outcome = label([odd], out, model_dir)
    assert outcome.status == 2 and len([e for e in outcome.err if e.strip()]) == 1, outcome.err
    assert temporaries(inputs, tmp_path) == []
    assert not out.exists() or not any(out.iterdir())
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["scan with spaces.nii.gz", "Schädel-CT 頭部.nii.gz", "x" * 190 + ".nii.gz"],
                         ids=["spaces-in-name", "unicode-name", "long-name"])
def test_odd_but_valid_names_are_labelled(name, model_dir, tmp_path):
    """Names a user may well have (spaces, non-ASCII, long) are labelled, outputs named after them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = write_image(sphere_image(), inputs / name)
    snap = Snapshot(inputs)
    out = tmp_path / "out"
    outcome = label([path], out, model_dir, "--format", "nii.gz")
    assert outcome.status == 0, outcome.err
    stem = name[: -len(".nii.gz")]
    assert read_image(out / f"{stem}.nii.gz").array.max() >= 1
    assert json.loads((out / f"{stem}.tags.json").read_text(encoding="utf-8"))["labelmap_file"] == f"{stem}.nii.gz"
    assert temporaries(out, inputs) == []
    snap.assert_unchanged()


# --- non-finite voxels that are repaired: the labels are those of the clean image ----------------------


def _fov_mask(image: Image, radius_mm: float) -> np.ndarray:
    """Voxels outside a circular field of view (in each slice, around the grid's centre)."""
    k, j, i = np.indices(image.array.shape)
    si, sj, _ = image.spacing
    ci, cj = (image.array.shape[2] - 1) / 2, (image.array.shape[1] - 1) / 2
    return np.hypot((i - ci) * si, (j - cj) * sj) > radius_mm


def _few_nan(image):
    image.array[0, 0, :5] = np.nan
    image.array[-1, -1, -3:] = np.nan
    image.array[3, 7, 9] = np.nan
    return int(np.isnan(image.array).sum())


def _few_inf(image):
    image.array[0, :4, 0] = np.inf
    image.array[-1, 0, :2] = -np.inf
    return int(np.isinf(image.array).sum())


def _nan_outside_fov(image):
    mask = _fov_mask(image, 16.0)
    image.array[mask] = np.nan
    return int(mask.sum())


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz"], ids=["nrrd", "nifti"])  # ITK's NIfTI reader makes NaN 0
@pytest.mark.parametrize("spoil", [_few_nan, _few_inf, _nan_outside_fov],
                         ids=["few-nan-voxels", "few-infinite-voxels", "nan-outside-circular-fov"])
def test_non_finite_voxels_are_repaired_and_recorded(spoil, ext, model_dir, tmp_path):
    clean, spoiled = float_sphere(), float_sphere()
    count = spoil(spoiled)
    assert 0 < count < 0.5 * spoiled.array.size
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(clean, inputs / f"clean{ext}")
    write_image(spoiled, inputs / f"spoiled{ext}")
    snap = Snapshot(inputs)
    out = tmp_path / "out"
    outcome = label([inputs / f"clean{ext}", inputs / f"spoiled{ext}"], out, model_dir, "--format", "nii.gz")
    assert outcome.status == 0, outcome.err
    want, got = read_image(out / "clean.nii.gz").array, read_image(out / "spoiled.nii.gz").array
    assert want.max() >= 1  # the clean image has labels: the comparison means something
    np.testing.assert_array_equal(got, want)  # voxel for voxel
    tags = json.loads((out / "spoiled.tags.json").read_text(encoding="utf-8"))
    assert tags["provenance"]["input_repairs"] == [{"problem": "non-finite voxels", "count": count,
                                                    "replaced_by": -1000.0}]
    assert json.loads((out / "clean.tags.json").read_text(encoding="utf-8"))["provenance"]["input_repairs"] == []
    snap.assert_unchanged()


# --- model cards and weights -----------------------------------------------------------------------------


def _edit_card(folder: Path, edit) -> Path:
    card = folder / "model.json"
    data = json.loads(card.read_text(encoding="utf-8"))
    edit(data)
    card.write_text(json.dumps(data))
    return card


def roi_of_8_exabytes(folder):
    _edit_card(folder, lambda d: d["inference"].update(roi_size=[200000, 200000, 200000]))
    return "model.json", ["inference.roi_size", "memory"]


def absurd_window_batch(folder):
    _edit_card(folder, lambda d: d["inference"].update(sw_batch_size=10 ** 12))
    return "model.json", ["inference.sw_batch_size", "memory"]


def absurd_out_channels(folder):
    _edit_card(folder, lambda d: d["network"]["parameters"].update(out_channels=10 ** 9))
    return "model.json", ["out_channels", "1..1024"]


def deeply_nested_card(folder):
    (folder / "model.json").write_text("[" * 200000 + "]" * 200000)
    return "model.json", ["nested deeper"]


def nested_provenance(folder):
    _edit_card(folder, lambda d: d.update(provenance=json.loads('{"a":' * 500 + "1" + "}" * 500)))
    return "model.json", ["nested deeper"]


def weights_path_traversal(folder):
    _edit_card(folder, lambda d: d["network"].update(weights="../../etc/passwd"))
    return "model.json", ["network.weights", "inside the model folder"]


def weights_absolute_path(folder):
    _edit_card(folder, lambda d: d["network"].update(weights="/etc/passwd"))
    return "model.json", ["network.weights", "inside the model folder"]


def weights_with_a_drive_letter(folder):
    _edit_card(folder, lambda d: d["network"].update(weights="C:evil.pt"))
    return "model.json", ["network.weights", "inside the model folder"]


def zero_input_channels(folder):
    _edit_card(folder, lambda d: d["network"]["parameters"].update(in_channels=0))
    return "model.json", ["in_channels", "is 0"]


def absurd_softmax_channels(folder):
    _edit_card(folder, lambda d: d["segmentation"].update(channels=100000))
    return "model.json", ["segmentation.channels", "100000"]


def spacing_for_a_gigantic_grid(folder):
    _edit_card(folder, lambda d: d["preprocessing"].update(spacing=[0.001, 0.001, 0.001]))
    return "scan.nrrd", ["network grid", "memory"]


BAD_CARDS = [roi_of_8_exabytes, absurd_window_batch, absurd_out_channels, deeply_nested_card, nested_provenance,
             weights_path_traversal, weights_absolute_path, weights_with_a_drive_letter, zero_input_channels,
             absurd_softmax_channels, spacing_for_a_gigantic_grid]


@pytest.mark.parametrize("build", BAD_CARDS, ids=[b.__name__.replace("_", "-") for b in BAD_CARDS])
def test_bad_model_card_is_refused(build, model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    named, words = build(folder)
    image = write_image(sphere_image(), tmp_path / "scan.nrrd")
    snap = Snapshot(folder, image)
    out = tmp_path / "out"
    outcome = label([image], out, folder)
    assert_refused(outcome, [named], words, untouched=snap, no_temps_in=[tmp_path], no_files_in=[out])


def test_models_show_of_a_deeply_nested_card_is_one_line(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    deeply_nested_card(folder)
    snap = Snapshot(folder)
    outcome = run_inprocess(["models", "show", folder])
    assert_refused(outcome, ["model.json"], ["nested deeper"], untouched=snap, no_temps_in=[tmp_path])


class WritesAFile:
    """Unpickling this would create ``path`` (it must never be unpickled)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_malicious_pickle_weights_never_run(tmp_path):
    folder = tmp_path / "model"
    marker = tmp_path / "pwned"
    write_card(folder, card_dict(input={"channels": [{"name": "wide", "window": [-1000.0, 1000.0]}]},
                                 network={"architecture": "UNet", "weights": "model.pt",
                                          "parameters": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                                                         "channels": [4, 8], "strides": [2], "num_res_units": 0}}))
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"state_dict": WritesAFile(str(marker))}, f, protocol=2)
    image = write_image(sphere_image(), tmp_path / "scan.nrrd")
    snap = Snapshot(folder, image)
    out = tmp_path / "out"
    outcome = label([image], out, folder)
    assert_refused(outcome, ["model.pt"], ["refused", "unpickling"], untouched=snap, no_temps_in=[tmp_path],
                   no_files_in=[out])
    assert not marker.exists()


# --- option values ----------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "low-confidence-nan": (["label", "{img}", "-o", "{out}", "--low-confidence", "nan"], "--low-confidence",
                           ["finite"]),
    "low-confidence-inf": (["label", "{img}", "-o", "{out}", "--low-confidence", "inf"], "--low-confidence",
                           ["finite"]),
    "low-confidence-negative": (["label", "{img}", "-o", "{out}", "--low-confidence", "-0.5"], "--low-confidence",
                                ["0..1"]),
    "phantoms-negative-count": (["phantoms", "-o", "{out}", "-n", "-3"], "-n", [">= 1"]),
    "phantoms-zero-count": (["phantoms", "-o", "{out}", "-n", "0"], "-n", [">= 1"]),
    "phantoms-fractional-count": (["phantoms", "-o", "{out}", "-n", "2.5"], "-n", ["whole number"]),
    "phantoms-negative-seed": (["phantoms", "-o", "{out}", "--seed", "-7"], "--seed", [">= 0"]),
    "batch-zero-workers": (["batch", "{dir}", "-o", "{out}", "--workers", "0"], "--workers", [">= 1"]),
    "train-negative-epochs": (["train", "{dir}", "-o", "{out}", "--epochs", "-1"], "--epochs", [">= 1"]),
    "demo-nan-seed": (["demo", "--out", "{out}", "--seed", "nan"], "--seed", ["whole number"]),
    "evaluate-missing-output": (["evaluate", "{dir}", "{dir}"], "-o/--output", ["required"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_bad_option_is_one_line(case, tmp_path):
    args, option, words = BAD_OPTIONS[case]
    image = write_image(sphere_image(), tmp_path / "scan.nrrd")
    snap = Snapshot(image)
    out = tmp_path / "out"
    filled = [a.format(img=image, out=out, dir=tmp_path) for a in args]
    outcome = run_inprocess(filled)
    shown = option if "/" in option else f"error: {option}: "  # "required: -o/--output" names it in the text
    assert_refused(outcome, [shown], words, untouched=snap, no_temps_in=[tmp_path],
                   no_files_in=[out])


# --- DICOM folders that are labelled: repairs recorded, patient data nowhere -------------------------------


def _label_dicom(folder: Path, model_dir: Path, out: Path):
    snap = Snapshot(folder)
    outcome = label([folder], out, model_dir, "--format", "nii.gz")
    assert outcome.status == 0, outcome.err
    snap.assert_unchanged()
    for text in (PATIENT_NAME, PATIENT_ID, "Doe"):
        assert_absent(text, out, outcome=outcome)
    assert temporaries(out, folder) == []
    return json.loads((out / f"{folder.name}.tags.json").read_text(encoding="utf-8"))


def test_dicom_missing_slice_is_interpolated_and_recorded(model_dir, tmp_path):
    folder = tmp_path / "Series"
    _write_series(folder, _blob_volume(6, 2), [h * NORMAL for h in (0.0, 2.0, 4.0, 8.0, 10.0, 12.0)])
    tags = _label_dicom(folder, model_dir, tmp_path / "out")
    [repair] = tags["provenance"]["input_repairs"]
    assert repair["problem"] == "missing DICOM slices" and repair["missing_slices"] == 1
    assert repair["gaps"] == [{"after_slice": 2, "gap_mm": 4.0}] and repair["slice_spacing_mm"] == 2.0
    assert "interpolation" in repair["replaced_by"]
    assert read_image(tmp_path / "out" / "Series.nii.gz").array.shape[0] == 7  # on the regular 2 mm grid


def test_dicom_gantry_tilt_is_corrected_and_recorded(model_dir, tmp_path):
    folder = tmp_path / "Tilted"
    _write_series(folder, _blob_volume(5, 2), [np.array([0.0, 0, 3.0 * s]) for s in range(5)])
    tags = _label_dicom(folder, model_dir, tmp_path / "out")
    [repair] = tags["provenance"]["input_repairs"]
    assert repair["missing_slices"] == 0 and "tilted by 18.5 deg" in repair["detail"]


def test_dicom_series_for_a_model_of_another_modality_is_one_line(model_dir, tmp_path):
    """A tilted CT series (corrected on reading) given to an MR model: one line naming the folder, nothing else."""
    folder = tmp_path / "Tilted"
    _write_series(folder, _blob_volume(5, 2), [np.array([0.0, 0, 3.0 * s]) for s in range(5)])
    model = tmp_path / "mr-model"
    shutil.copytree(model_dir, model)
    _edit_card(model, lambda d: d.update(modality="MR"))
    snap = Snapshot(folder, model)
    out = tmp_path / "out"
    outcome = label([folder], out, model)
    assert_refused(outcome, [str(folder)], ["is CT", "expects MR"], untouched=snap, no_temps_in=[tmp_path],
                   no_files_in=[out])
    assert_absent(PATIENT_NAME, out, model, outcome=outcome)


def test_dicom_two_series_in_one_folder_reads_the_larger_one(model_dir, tmp_path):
    folder = tmp_path / "Two"
    _write_series(folder, _blob_volume(5, 1), [s * 2.0 * NORMAL for s in range(5)], uid="1.2.3.4.1")
    _write_series(tmp_path / "other", _blob_volume(3, 1), [s * 2.0 * NORMAL for s in range(3)], uid="1.2.3.4.2")
    for f in sorted((tmp_path / "other").iterdir()):
        f.rename(folder / ("b-" + f.name))
    tags = _label_dicom(folder, model_dir, tmp_path / "out")
    assert tags["provenance"]["input_repairs"] == []
    assert read_image(tmp_path / "out" / "Two.nii.gz").array.shape[0] == 5


# --- evaluate: every label of the prediction or the reference has a row ------------------------------------


def _labelmap(path: Path, values: np.ndarray) -> Path:
    image = sphere_image()
    return write_image(image.with_array(values.astype(np.uint8)), path)


def _eval_case(kind: str, pred: Path, ref: Path):
    shape = sphere_image().array.shape
    a = np.zeros(shape, np.uint8)
    a[5:10, 5:10, 5:10] = 1
    if kind == "label-only-in-prediction":
        p = a.copy()
        p[12:15, 20:25, 20:25] = 3
        _labelmap(pred / "case.nii.gz", p)
        _labelmap(ref / "case.nii.gz", a)
        return {("1", "ok"), ("3", "only in prediction")}
    if kind == "label-only-in-reference":
        r = a.copy()
        r[12:15, 20:25, 20:25] = 2
        _labelmap(pred / "case.nii.gz", a)
        _labelmap(ref / "case.nii.gz", r)
        return {("1", "ok"), ("2", "only in reference")}
    _labelmap(pred / "case.nii.gz", np.zeros(shape))
    _labelmap(ref / "case.nii.gz", np.zeros(shape))
    return {("", "both empty")}


@pytest.mark.parametrize("kind", ["label-only-in-prediction", "label-only-in-reference", "both-empty"])
def test_evaluate_reports_every_label(kind, tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    expected = _eval_case(kind, pred, ref)
    snap = Snapshot(pred, ref)
    outcome = run_inprocess(["evaluate", pred, ref, "-o", tmp_path / "report"])
    assert outcome.status == 0, outcome.err
    with open(tmp_path / "report" / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["label"], r["status"]) for r in rows} == expected
    for r in rows:
        if r["status"] == "only in prediction":
            assert float(r["dice"]) == 0.0 and float(r["volume_ref_ml"]) == 0.0 and float(r["volume_pred_ml"]) > 0
    snap.assert_unchanged()


def test_slicer_panel_shows_the_interpolated_dicom_gap(model_dir, tmp_path):
    """The glue puts the repair where the panel reads results: attribute, findings table, warnings."""
    pytest.importorskip("slicer", reason="slicer-core is not installed (CPython 3.11 wheel only)")
    from slicercore import close_scene, make_scene

    from medautolabel.labelling.pipeline import label_image
    from MedAutoLabelLib import scene as scene_io
    from MedAutoLabelLib.logic import MedAutoLabelLogic

    folder = tmp_path / "Series"
    _write_series(folder, _blob_volume(6, 2), [h * NORMAL for h in (0.0, 2.0, 4.0, 8.0, 10.0, 12.0)])
    image = read_image(folder)
    result = label_image(image, str(model_dir), device="cpu")
    scene = make_scene()
    try:
        volume = scene_io.image_to_volume(image, scene, "CTA")
        out = MedAutoLabelLogic(scene).applyResult(volume, result)
        assert out.warnings == ["1 missing DICOM slice(s) interpolated (4 mm after slice 2; slices 2 mm apart)"]
        for node in (volume, out.segmentationNode):
            assert node.GetAttribute("MedAutoLabel.InputRepairs") == out.warnings[0]
        table = out.tableNode
        rows = [[table.GetCellText(r, c) for c in range(3)] for r in range(table.GetNumberOfRows())]
        assert ["input repair", "missing DICOM slices", out.warnings[0]] in rows
    finally:
        close_scene(scene)


def nested_tags(pred, ref):
    (pred / "case.tags.json").write_text('{"classifications": ' + "[" * 100000 + "]" * 100000 + "}")
    return "case.tags.json", ["nested deeper"]


def malformed_tags(pred, ref):
    (pred / "case.tags.json").write_text(json.dumps({"classifications": [{"task": "aneurysm"}]}))
    return "case.tags.json", ["malformed"]


def nan_labelmap(pred, ref):
    image = float_sphere()
    image.array[:] = 0
    image.array[2, 2, 2] = np.nan
    write_image(image, pred / "case.nii.gz")
    return "case.nii.gz", ["NaN"]


def dataset_json_not_an_object(pred, ref):
    (ref / "dataset.json").write_text("[1, 2, 3]")
    return "dataset.json", ["JSON object"]


BAD_EVALUATIONS = [nested_tags, malformed_tags, nan_labelmap, dataset_json_not_an_object]


@pytest.mark.parametrize("build", BAD_EVALUATIONS, ids=[b.__name__.replace("_", "-") for b in BAD_EVALUATIONS])
def test_bad_evaluation_input_is_refused(build, tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    _eval_case("label-only-in-prediction", pred, ref)
    named, words = build(pred, ref)
    snap = Snapshot(pred, ref)
    report = tmp_path / "report"
    outcome = run_inprocess(["evaluate", pred, ref, "-o", report])
    assert_refused(outcome, [named], words, untouched=snap, no_temps_in=[tmp_path], no_files_in=[report])


def test_slicer_evaluate_counts_a_segment_only_in_the_prediction(model_dir):
    """Slicer's Evaluate section: a predicted segment the reference lacks is a false positive row, Dice 0."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (CPython 3.11 wheel only)")
    from slicercore import close_scene, make_scene

    from MedAutoLabelLib import scene as scene_io
    from MedAutoLabelLib.logic import MedAutoLabelLogic

    scene = make_scene()
    try:
        volume = scene_io.image_to_volume(sphere_image(), scene, "CTA")
        masks = {}
        for name in ("prediction", "reference"):
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            masks[name] = node
        vessel = np.zeros(sphere_image().array.shape, np.uint8)
        vessel[5:10, 5:10, 5:10] = 1
        extra = np.zeros_like(vessel)
        extra[12:15, 20:25, 20:25] = 1
        for node, segments in ((masks["reference"], {"Vessel": vessel}),
                               (masks["prediction"], {"Vessel": vessel, "Calcium": extra})):
            for name, mask in segments.items():
                sid = node.GetSegmentation().AddEmptySegment(name, name)
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, sid, volume)
        table, rows = MedAutoLabelLogic(scene).evaluateSegmentations(masks["prediction"], masks["reference"], volume)
        assert [(r["name"], r["status"], r["dice"]) for r in rows] == [("Vessel", "ok", 1.0),
                                                                      ("Calcium", "only in prediction", 0.0)]
        assert table.GetNumberOfRows() == 2 and table.GetCellText(1, 5) == "only in prediction"
    finally:
        close_scene(scene)


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                                                  "tried to allocate 8589934592 bytes")],
                         ids=["memory-error", "torch-cpu-allocator"])
def test_running_out_of_memory_is_one_line(failure, model_dir, tmp_path, monkeypatch):
    """The machine's memory running out while a case is labelled: one line naming the file, status 2, nothing written."""
    from medautolabel.labelling import pipeline

    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr(pipeline, "label_image", exhausted)
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = write_image(sphere_image(), inputs / "scan.nii.gz", atomic=False)
    snap = Snapshot(inputs)
    outcome = label([path], tmp_path / "out", model_dir)
    assert_refused(outcome, ["scan.nii.gz"], ["out of memory"], untouched=snap, no_temps_in=[tmp_path],
                   no_files_in=[tmp_path / "out"])
