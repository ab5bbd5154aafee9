"""write_result and atomic outputs: the right files, the right content, and nothing left after a failure."""

from __future__ import annotations

import csv
import json
import os
import stat

import numpy as np
import pytest
from killed_writer import kill_a_writer_of

from medautolabel.errors import MedAutoLabelError
from medautolabel.image import Image, make_ijk_to_ras
from medautolabel.io import outputs
from medautolabel.io.atomic import TEMP_PREFIX, atomic_output, atomic_outputs, leftover_temps
from medautolabel.io.images import read_image
from medautolabel.io.segnrrd import read_seg_nrrd
from medautolabel.result import Classification, Code, Result, SegmentInfo, Terminology
from medautolabel.terminology import parse_terminology_entry

STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
GRID = make_ijk_to_ras([0.8, 0.6, 2.5], np.diag([-1.0, 1.0, -1.0]), [10.0, -20.0, 30.0])


def _result() -> Result:
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1:3, 1:3, 1:4] = 1
    lab[3, 4, 5] = 2
    segments = [
        SegmentInfo(1, "Vessel, main", (0.85, 0.25, 0.2),
                    Terminology(STRUCTURE, Code("SCT", "59820001", "Blood vessel")),
                    voxel_count=12, volume_ml=np.float32(0.0144), mean_confidence=np.float64(0.93)),
        SegmentInfo(2, "Nerve", (0.95, 0.85, 0.3), Terminology(STRUCTURE, Code("SCT", "3057000", "Nerve")),
                    voxel_count=1, volume_ml=0.0012, mean_confidence=float("nan"), low_confidence=True),
    ]
    cls = [Classification("aneurysm", "absent", 0.8, {"absent": 0.8, "present": 0.2})]
    return Result(Image(lab, GRID.copy()), segments, cls,
                  {"model": {"id": "m", "sha256": "ab" * 32}, "device": "cpu", "timings_s": {"infer": np.float32(1.5)}})


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.startswith(TEMP_PREFIX)]


def test_seg_nrrd_output(tmp_path):
    result = _result()
    paths = outputs.write_result(result, tmp_path / "out", "case1")
    assert [p.name for p in paths] == ["case1.seg.nrrd", "case1.tags.json"]
    assert sorted(os.listdir(tmp_path / "out")) == ["case1.seg.nrrd", "case1.tags.json"]
    img, segments = read_seg_nrrd(paths[0])
    np.testing.assert_array_equal(img.array, result.labelmap.array)
    np.testing.assert_allclose(img.ijk_to_ras, GRID, atol=1e-12)
    assert [s.name for s in segments] == ["Vessel, main", "Nerve"]


def test_tags_json_content(tmp_path):
    paths = outputs.write_result(_result(), tmp_path, "case1")
    tags = json.loads(paths[-1].read_text(encoding="utf-8"))
    assert tags["format"] == outputs.TAGS_FORMAT and tags["labelmap_file"] == "case1.seg.nrrd"
    assert tags["classifications"][0]["label"] == "absent"
    assert tags["classifications"][0]["probabilities"] == {"absent": 0.8, "present": 0.2}
    seg = {s["name"]: s for s in tags["segments"]}
    assert seg["Vessel, main"]["terminology"]["type"]["value"] == "59820001"
    assert seg["Vessel, main"]["mean_confidence"] == pytest.approx(0.93)
    assert seg["Nerve"]["mean_confidence"] is None and seg["Nerve"]["low_confidence"] is True  # NaN -> null
    assert tags["provenance"]["timings_s"]["infer"] == pytest.approx(1.5)
    assert tags["medautolabel_version"]


def test_nifti_output_with_label_table(tmp_path):
    result = _result()
    paths = outputs.write_result(result, tmp_path, "case1", fmt="nii.gz")
    assert [p.name for p in paths] == ["case1.nii.gz", "case1.labels.csv", "case1.tags.json"]
    img = read_image(paths[0])
    assert img.array.dtype == np.uint8
    np.testing.assert_array_equal(img.array, result.labelmap.array)
    np.testing.assert_allclose(img.ijk_to_ras, GRID, atol=1e-5)
    with open(paths[1], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["Vessel, main", "Nerve"]
    assert (rows[0]["value"], rows[0]["r"], rows[0]["g"], rows[0]["b"]) == ("1", "217", "64", "51")
    assert parse_terminology_entry(rows[1]["terminology"]) == result.segments[1].terminology
    assert json.loads(paths[2].read_text(encoding="utf-8"))["labelmap_file"] == "case1.nii.gz"


@pytest.mark.parametrize("fmt", ["seg.nrrd", "nii.gz"])
def test_a_failure_leaves_no_file_behind(tmp_path, monkeypatch, fmt):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "write_tags", boom)  # the last file fails after the others were written
    with pytest.raises(OSError):
        outputs.write_result(_result(), tmp_path, "case1", fmt=fmt)
    assert os.listdir(tmp_path) == []


def test_a_labelmap_value_without_segment_is_refused_and_nothing_written(tmp_path):
    result = _result()
    result.labelmap.array[0, 0, 0] = 7
    with pytest.raises(MedAutoLabelError, match="without a segment"):
        outputs.write_result(result, tmp_path, "case1")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stem, fmt", [("../up", "seg.nrrd"), ("", "seg.nrrd"), (".hidden", "seg.nrrd"),
                                       ("ok", "dicom")])
def test_bad_names_and_formats(tmp_path, stem, fmt):
    with pytest.raises(MedAutoLabelError):
        outputs.write_result(_result(), tmp_path, stem, fmt=fmt)
    assert os.listdir(tmp_path) == []


# --- atomic ----------------------------------------------------------------------------------------

def test_atomic_output_temp_is_private_hidden_and_keeps_the_extension(tmp_path):
    target = tmp_path / "x.nii.gz"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith("x.nii.gz")
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600
        assert not target.exists()
        tmp.write_text("new")
    assert target.read_text(encoding="utf-8") == "new" and _no_temp_files(tmp_path)
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o600 == 0o600


def test_atomic_output_error_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text(encoding="utf-8") == "old" and _no_temp_files(tmp_path)


def test_atomic_outputs_all_or_nothing(tmp_path):
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(ValueError), atomic_outputs(targets) as temps:
        temps[0].write_text("a")
        raise ValueError("second failed")
    assert os.listdir(tmp_path) == []
    with atomic_outputs(targets) as temps:
        for t, text in zip(temps, "ab"):
            t.write_text(text)
    assert [p.read_text(encoding="utf-8") for p in targets] == ["a", "b"] and _no_temp_files(tmp_path)


def test_leftover_temps_finds_a_killed_writers_temporary_for_that_target_only(tmp_path):
    kill_a_writer_of(tmp_path / "x.seg.nrrd")
    kill_a_writer_of(tmp_path / "a-x.seg.nrrd")  # a name that ends like x's
    (left,) = leftover_temps(tmp_path / "x.seg.nrrd")
    assert left.read_text(encoding="utf-8") == "half" and not (tmp_path / "x.seg.nrrd").exists()
    assert len(leftover_temps(tmp_path / "a-x.seg.nrrd")) == 1 and leftover_temps(tmp_path / "a-x.seg.nrrd") != [left]
    assert leftover_temps(tmp_path / "y.seg.nrrd") == [] and leftover_temps(tmp_path / "no" / "x.seg.nrrd") == []
