"""Case-level class references (``labels.csv``), two- and three-class tasks in ``evaluate``, and the report's
worst-case slices and misclassified cases (#15, item 4). Numbers are worked out by hand in the comments."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hostile import Snapshot, assert_refused, run_inprocess

from medautolabel.errors import InputError
from medautolabel.evaluation.worst import PREDICTION_RGB, REFERENCE_RGB
from medautolabel.image import Image, make_ijk_to_ras
from medautolabel.io import case_labels
from medautolabel.io.case_labels import check_known_cases, read_case_labels
from medautolabel.io.images import write_image

# --- labels.csv: what is read --------------------------------------------------------------------------


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_labels_csv_is_read_with_its_classes_in_order(tmp_path):
    path = _csv(tmp_path, "\ufeffnote,Task, case ,class\n"  # a BOM, columns in any order and case, an extra one
                          "x,aneurysm,c1,present\n"
                          "\n"
                          "y,aneurysm,c2,absent\n"
                          "z,type,c1,vein\n"
                          "w,type,c2,artery\n"
                          ",type,c3, nerve \n")
    t = read_case_labels(path)
    assert t.labels == {"c1": {"aneurysm": "present", "type": "vein"}, "c2": {"aneurysm": "absent", "type": "artery"},
                        "c3": {"type": "nerve"}}
    # a negative/positive pair: negative first whatever came first; other tasks: order of first appearance
    assert t.classes == {"aneurysm": ["absent", "present"], "type": ["vein", "artery", "nerve"]}
    assert t.rows[("c2", "aneurysm")] == 4 and t.rows[("c3", "type")] == 7  # file lines: header 1, blank line 3
    assert t.path == path


@pytest.mark.parametrize("pair", [["No", "Yes"], ["absent", "present"], ["0", "1"], ["benign", "malignant"]])
def test_binary_order_puts_a_known_negative_first(pair):
    assert case_labels.binary_order(pair[::-1]) == (pair if pair[0] != "benign" else pair[::-1])
    assert case_labels.binary_order(pair) == pair


# --- labels.csv: what is refused, one line naming the file, the row and the field --------------------------

REFUSED = {
    "duplicate": ("case,task,class\na,t,x\nb,t,y\na,t,x\n", ["row 4", "'a'", "'t'", "again", "row 2"]),
    "conflicting": ("case,task,class\na,t,x\nb,t,y\na,t,y\n", ["row 4", "'y'", "row 2 says 'x'"]),
    "one-class": ("case,task,class\na,aneurysm,present\nb,aneurysm,present\n",
                  ["task 'aneurysm': only one class ('present') in labels.csv; a classifier needs at least two"]),
    "missing-column": ("case,task,label\na,t,x\n", ["row 1", "lacks the column 'class'"]),
    "missing-columns": ("id,task\n", ["row 1", "'case', 'class'"]),
    "empty-class": ("case,task,class\na,t,x\nb,t,  \n", ["row 3", "class cell is empty"]),
    "empty-case": ("case,task,class\na,t,x\n,t,y\n", ["row 3", "case cell is empty"]),
    "short-row": ("case,task,class\na,t,x\nb,t\n", ["row 3", "class cell is empty"]),
    "empty-file": ("", ["empty"]),
    "not-utf8": (b"case,task,class\na,t,x\nb,t,\xe9t\xe9\n", ["row 3", "not UTF-8", "0xe9"]),
    "long-line": ("case,task,class\n" + "a," * 6000 + "\n", ["row 2", "longer than 10,000 bytes"]),
    "bad-quoting": ('case,task,class\na,"t"x,y\n', ["not a CSV table"]),
    "hostile-text": ("case,task,class\na\x1b[2J,t,x\na\x1b[2J,t,y\n", ["row 3", "case 'a',"]),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_bad_labels_csv_is_refused_in_one_line(kind, tmp_path):
    text, words = REFUSED[kind]
    path = _csv(tmp_path, text)
    with pytest.raises(InputError) as caught:
        read_case_labels(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "\x1b" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_too_many_rows_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(case_labels, "MAX_ROWS", 3)
    path = _csv(tmp_path, "case,task,class\n" + "".join(f"c{n},t,{n % 2}\n" for n in range(4)))
    with pytest.raises(InputError, match="row 5: more than 3 rows"):
        read_case_labels(path)


def test_a_missing_file_or_a_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_case_labels(tmp_path / "labels.csv")
    with pytest.raises(InputError, match="is a folder"):
        read_case_labels(tmp_path)


def test_check_known_cases_names_the_first_unknown_row(tmp_path):
    t = read_case_labels(_csv(tmp_path, "case,task,class\na,t,x\nb,t,y\nzz,t,x\nyy,t,y\n"))
    check_known_cases(t, ["a", "b", "zz", "yy"], t.path)
    with pytest.raises(InputError) as caught:
        check_known_cases(t, ["a", "b"], t.path)
    assert str(caught.value) == f"{t.path}: row 4: case 'zz' has no image (and 1 more row(s))"


# --- evaluate with a labels.csv: a two-class and a three-class task, numbers by hand -----------------------

# case: (aneurysm reference, P(present), type reference, P(artery, vein, nerve) or None when not predicted)
CASES = {
    "c1": ("present", 0.9, "artery", (0.7, 0.2, 0.1)),
    "c2": ("present", 0.7, "artery", (0.3, 0.5, 0.2)),  # type: called vein
    "c3": ("present", 0.2, "vein", (0.1, 0.8, 0.1)),  # aneurysm: missed
    "c4": ("absent", 0.6, "vein", (0.2, 0.3, 0.5)),  # aneurysm: false alarm; type: called nerve
    "c5": ("absent", 0.1, "nerve", (0.1, 0.2, 0.7)),
    "c6": ("absent", 0.3, "nerve", (0.2, 0.1, 0.7)),
    "c7": ("absent", 0.05, "artery", None),  # its prediction has no type task
}


def _tags(folder: Path, case: str, p_present: float, types) -> None:
    tasks = [{"task": "aneurysm", "label": "present" if p_present >= 0.5 else "absent", "probability": 0.0,
              # the positive class first on purpose: the order is "absent", "present" whatever the file says
              "probabilities": {"present": p_present, "absent": 1 - p_present}}]
    if types is not None:
        tasks.append({"task": "type", "label": "", "probability": 0.0,
                      "probabilities": dict(zip(["artery", "vein", "nerve"], types))})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{case}.tags.json").write_text(json.dumps({"classifications": tasks}), encoding="utf-8")


def _class_inputs(tmp_path: Path):
    pred = tmp_path / "pred"
    for case, (_, p, _, types) in CASES.items():
        _tags(pred, case, p, types)
    rows = [f"{case},aneurysm,{a}\n{case},type,{t}\n" for case, (a, _, t, _) in CASES.items()]
    labels = _csv(tmp_path, "case,task,class\n" + "".join(rows) + "c8,aneurysm,present\nc8,type,nerve\n")
    return pred, labels


def test_class_only_evaluation_against_hand_counted_numbers(tmp_path):
    pred, labels = _class_inputs(tmp_path)
    out = tmp_path / "report"
    snap = Snapshot(pred, labels)
    outcome = run_inprocess(["evaluate", pred, labels, "-o", out])
    assert outcome.status == 0, outcome.err
    snap.assert_unchanged()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == [f"c{n}" for n in range(1, 8)] and summary["not_predicted"] == ["c8"]
    assert summary["segmentation"] == {} and (out / "metrics.csv").read_text().startswith("case,label,name,")

    a = summary["classification"]["aneurysm"]
    assert a["classes"] == ["absent", "present"]
    # rows = reference (absent, present), columns = predicted: c4 false alarm, c3 missed
    assert a["confusion"] == [[3, 1], [1, 2]]
    assert a["accuracy"] == pytest.approx(5 / 7)
    assert a["sensitivity"] == pytest.approx(2 / 3) and a["specificity"] == pytest.approx(3 / 4)
    assert a["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert a["per_class"]["present"]["sensitivity"] == pytest.approx(2 / 3)
    assert a["per_class"]["absent"]["sensitivity"] == pytest.approx(3 / 4)
    assert a["per_class"]["absent"]["specificity"] == pytest.approx(2 / 3)
    # positives 0.9, 0.7, 0.2 against negatives 0.6, 0.1, 0.3, 0.05: 4 + 4 + 2 of 12 pairs
    assert a["roc_auc"] == pytest.approx(10 / 12) and a["per_class"]["present"]["roc_auc"] == pytest.approx(10 / 12)
    low, high = a["roc_auc_ci95"]
    assert low <= 10 / 12 <= high
    assert {(m["case"], m["reference"], m["predicted"]) for m in a["misclassified"]} == \
        {("c3", "present", "absent"), ("c4", "absent", "present")}
    assert a["not_predicted"] == []

    t = summary["classification"]["type"]
    assert t["classes"] == ["artery", "vein", "nerve"] and t["n"] == 6 and t["not_predicted"] == ["c7"]
    assert t["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert t["accuracy"] == pytest.approx(4 / 6)
    assert t["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    expected = {"artery": (1 / 2, 1.0, 1.0), "vein": (1 / 2, 3 / 4, 7 / 8), "nerve": (1.0, 3 / 4, 1.0)}
    for klass, (sensitivity, specificity, auc) in expected.items():
        got = t["per_class"][klass]
        assert (got["sensitivity"], got["specificity"], got["roc_auc"]) == \
            (pytest.approx(sensitivity), pytest.approx(specificity), pytest.approx(auc)), klass
        assert got["n"] == 2
    assert t["roc_auc"] == pytest.approx((1 + 7 / 8 + 1) / 3)
    # confidence of the called class: 0.5 twice (both wrong), 0.7 three times (right), 0.8 once (right)
    assert t["ece"] == pytest.approx((2 * 0.5 + 3 * 0.3 + 1 * 0.2) / 6)
    assert [(b["n"], b["frequency"]) for b in t["reliability"]] == [(2, 0.0), (3, 1.0), (1, 1.0)]
    assert {(m["case"], m["reference"], m["predicted"]) for m in t["misclassified"]} == \
        {("c2", "artery", "vein"), ("c4", "vein", "nerve")}

    assert any("type: macro ROC AUC 0.958" in line for line in outcome.out)
    assert any("task type: 1 case(s) whose prediction lacks it" in line and "c7" in line for line in outcome.err)
    page = (out / "report.html").read_text(encoding="utf-8")
    tables = _tables(page)
    wrong = [t for t in tables if t[0] == ["case", "reference", "predicted", "probabilities"]]
    assert len(wrong) == 2
    assert ["c3", "present", "absent", "absent 0.800, present 0.200"] in wrong[0]
    assert ["c2", "artery", "vein", "artery 0.300, vein 0.500, nerve 0.200"] in wrong[1]
    assert "c7" in page.split("Classification: type")[1]  # the unpredicted case is named


def test_a_labels_csv_inside_the_reference_folder_is_the_class_reference(tmp_path):
    pred, labels = _class_inputs(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    labels.rename(ref / "labels.csv")
    out = tmp_path / "report"
    assert run_inprocess(["evaluate", pred, ref, "-o", out]).status == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["classification"]["type"]["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]


def test_a_reference_class_the_model_does_not_know_is_refused(tmp_path):
    pred, labels = _class_inputs(tmp_path)
    labels.write_text(labels.read_text().replace("c5,type,nerve", "c5,type,capillary"))
    outcome = run_inprocess(["evaluate", pred, labels, "-o", tmp_path / "report"])
    assert_refused(outcome, [str(labels), "row 11", "'capillary'"], ["not one the predictions give"],
                   no_files_in=[tmp_path / "report"])


@pytest.mark.parametrize("place", ["file", "folder"])
@pytest.mark.parametrize("problem", ["duplicate", "one-class"])
def test_a_bad_labels_csv_exits_2_with_one_line_and_no_report(problem, place, tmp_path):
    pred, labels = _class_inputs(tmp_path)
    text = labels.read_text()
    labels.write_text(text + "c1,type,artery\n" if problem == "duplicate" else text + "c9,extra,yes\n")
    ref = labels
    if place == "folder":
        ref = tmp_path / "ref"
        ref.mkdir()
        labels = labels.rename(ref / "labels.csv")
    snap = Snapshot(pred, labels)
    out = tmp_path / "report"
    outcome = run_inprocess(["evaluate", pred, ref, "-o", out])
    words = ["row 18", "one row per case and task"] if problem == "duplicate" else ["only one class ('yes')"]
    assert_refused(outcome, [str(labels)], words, untouched=snap, no_temps_in=[tmp_path], no_files_in=[out])
    assert not out.exists()


# --- the worst-case slices ---------------------------------------------------------------------------------

SHAPE = (12, 24, 24)  # k, j, i
SPACING = (0.5, 0.5, 2.0)  # i, j, k mm: k is the coarsest axis
ERROR_SLICE = 7


def _box() -> np.ndarray:
    a = np.zeros(SHAPE, np.uint8)
    a[2:10, 8:16, 8:16] = 1
    return a


def _segmentation_inputs(tmp_path: Path, n_cases: int = 4):
    """References: the same box; predictions: the box with a false-positive patch on slice 7 (wider the later
    the case, so the Dice falls case by case) and three voxels missed on slice 3 (fewer wrong voxels)."""
    m = make_ijk_to_ras(SPACING)
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    for n in range(n_cases):
        case = f"case{n}"
        write_image(Image(_box(), m), ref / f"{case}.nii.gz")
        p = _box()
        p[ERROR_SLICE, 8:16, 16:18 + 2 * n] = 1  # right of the box (higher i)
        p[3, 8, 8:11] = 0
        write_image(Image(p, m), pred / f"{case}.nii.gz")
    (ref / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "Vessel"}}))
    return pred, ref


class _Page(HTMLParser):
    """The figures of report.html: (PNG bytes, caption) each, read by an HTML parser."""

    def __init__(self):
        super().__init__()
        self.figures, self._caption = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.figures.append([base64.b64decode(attrs["src"].split(",", 1)[1]), ""])
        self._caption = tag == "figcaption"

    def handle_data(self, data):
        if self._caption and self.figures:
            self.figures[-1][1] += data


def _tables(page: str):
    """Every <table> of the page as a list of rows of cell texts."""
    tables = []
    for table in re.findall(r"<table>(.*?)</table>", page):
        rows = re.findall(r"<tr>(.*?)</tr>", table)
        tables.append([[re.sub("<[^>]+>", "", c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", r)] for r in rows])
    return tables


def _pixels(png: bytes, colour) -> np.ndarray:
    from PIL import Image as PILImage

    rgb = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"))
    return np.argwhere(np.all(rgb == np.asarray(colour, dtype=np.uint8), axis=-1))


def test_the_worst_cases_are_shown_on_the_slice_of_their_largest_error(tmp_path):
    pred, ref = _segmentation_inputs(tmp_path)
    out = tmp_path / "report"
    assert run_inprocess(["evaluate", pred, ref, "-o", out]).status == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    worst = summary["worst_cases"]
    # the three lowest Dice of four: the widest patches, lowest Dice first; on k = 7, not k = 3
    assert [w["case"] for w in worst] == ["case3", "case2", "case1"]
    assert all(w["axis"] == "k" and w["slice"] == ERROR_SLICE and w["name"] == "Vessel" for w in worst)
    box = 8 * 8 * 8
    for w in worst:
        n = int(w["case"][-1])
        extra = 8 * (2 + 2 * n)
        assert w["error_voxels"] == extra
        assert w["dice"] == pytest.approx(2 * (box - 3) / (2 * box - 3 + extra))
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(page.figures) == 3
    png, caption = page.figures[0]
    assert "case case3" in caption and "Vessel" in caption and f"k = {ERROR_SLICE}" in caption
    assert f"Dice {worst[0]['dice']:.3f}" in caption
    green, magenta = _pixels(png, REFERENCE_RGB), _pixels(png, PREDICTION_RGB)
    assert len(green) and len(magenta)
    # axial view, the patient's right (low i here: i points to R) on the right: the false-positive patch at
    # higher i is drawn to the LEFT of the box. 24 voxels of 0.5 mm across 256 pixels: 10.67 pixels a voxel.
    px = 256 / 24
    assert green[:, 1].min() == pytest.approx((24 - 16) * px, abs=1.5)  # the box's edge i = 15 at column 8
    # where both outlines run along the same edge the prediction's is drawn last: only the reference's own
    # edge (i = 15, inside the predicted patch) stays green, a 2-pixel band
    assert green[:, 1].max() <= green[:, 1].min() + 2
    assert magenta[:, 1].min() == pytest.approx((23 - 23) * px, abs=1.5)  # case3's patch reaches i = 23
    assert magenta[:, 1].max() == pytest.approx((24 - 8) * px - 1, abs=1.5)  # the shared edge i = 8
    assert magenta[:, 0].min() == pytest.approx(8 * px, abs=1.5)  # rows: j 15..8 shown top to bottom
    assert magenta[:, 0].max() == pytest.approx(16 * px - 1, abs=1.5)


def test_the_worst_slices_are_drawn_over_the_image_when_images_are_given(tmp_path):
    pred, ref = _segmentation_inputs(tmp_path, n_cases=1)
    images = tmp_path / "images"
    images.mkdir()
    ramp = np.broadcast_to(np.arange(24, dtype=np.float32)[None, None, :] * 10.0, SHAPE).copy()
    write_image(Image(ramp, make_ijk_to_ras(SPACING)), images / "case0_0000.nii.gz")
    out = tmp_path / "report"
    assert run_inprocess(["evaluate", pred, ref, "-o", out, "--images", images]).status == 0
    (w,) = json.loads((out / "summary.json").read_text(encoding="utf-8"))["worst_cases"]
    assert w["over_image"] is True
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    (png, caption), = page.figures
    assert "over the reference labelmap" not in caption
    from PIL import Image as PILImage

    rgb = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")).astype(int)
    grey = rgb[(rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])]
    assert len(np.unique(grey[:, 0])) > 10  # the ramp, not the two greys of a labelmap
    row = rgb[5, :, 0]  # top row, outside every outline: brighter on the left (higher i, flipped)
    assert row[0] > row[-1]


def test_labels_csv_beside_reference_labelmaps_must_name_cases_that_have_one(tmp_path):
    pred, ref = _segmentation_inputs(tmp_path, n_cases=2)
    _csv(ref, "case,task,class\ncase0,aneurysm,absent\ncase1,aneurysm,present\nghost,aneurysm,absent\n")
    outcome = run_inprocess(["evaluate", pred, ref, "-o", tmp_path / "report"])
    assert_refused(outcome, ["labels.csv", "row 4", "'ghost'"], ["has no reference labelmap"],
                   no_files_in=[tmp_path / "report"])
    (ref / "labels.csv").write_text("case,task,class\ncase0_0000,aneurysm,absent\ncase1,aneurysm,present\n")
    out = tmp_path / "report"
    outcome = run_inprocess(["evaluate", pred, ref, "-o", out])
    assert outcome.status == 0, outcome.err
    a = json.loads((out / "summary.json").read_text(encoding="utf-8"))["classification"]["aneurysm"]
    assert a["n"] == 0 and a["not_predicted"] == ["case0", "case1"]  # labelmaps without tags.json: no classes


@pytest.mark.parametrize("spacing,axis", [((0.5, 0.5, 2.0), 0), ((0.5, 3.0, 1.0), 1), ((4.0, 1.0, 1.0), 2),
                                          ((1.0, 1.0, 1.0), 0), ((1.0, 2.0, 2.0), 0), ((2.0, 2.0, 1.0), 1)])
def test_the_slice_axis_is_the_coarsest_else_k(spacing, axis):
    from medautolabel.evaluation.worst import slice_axis

    # spacing is (i, j, k); axes are array axes (0 = k, 1 = j, 2 = i); ties go to k, then j
    assert slice_axis(make_ijk_to_ras(spacing)) == axis
