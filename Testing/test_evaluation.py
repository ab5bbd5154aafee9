"""``evaluate``: metrics against analytic answers, grids, classification, and the report files."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
from cardfactory import ras_coords

from medautolabel.cli.app import main
from medautolabel.errors import InputError
from medautolabel.evaluation import classification_metrics, evaluate_labelmaps
from medautolabel.evaluation.metrics import dice, roc_auc
from medautolabel.image import Image, make_ijk_to_ras
from medautolabel.io.images import write_image

SPACING = (0.4, 0.5, 0.6)  # i, j, k mm: anisotropic
SHAPE = (60, 70, 80)  # k, j, i


def grid_matrix(direction=None):
    m = make_ijk_to_ras(SPACING, direction)
    mid = (np.array(SHAPE[::-1]) - 1) / 2.0
    m[:3, 3] = -m[:3, :3] @ mid
    return m


def ball(center, radius, m=None, value=1) -> Image:
    m = grid_matrix() if m is None else m
    inside = np.linalg.norm(ras_coords(SHAPE, m) - np.asarray(center), axis=-1) <= radius
    return Image((inside * value).astype(np.uint8), m)


def sphere_overlap_dice(r: float, d: float) -> float:
    """Dice of two spheres of radius r whose centres are d apart (d < 2r)."""
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    return lens / (4 / 3 * math.pi * r ** 3)


@pytest.mark.parametrize("shift_mm", [1.2, 3.0, 6.0])
def test_shifted_spheres_match_the_analytic_dice_and_hausdorff(shift_mm):
    r = 7.0
    ref = ball([0, 0, 0], r)
    pred = ball([shift_mm, 0, 0], r)  # along R: the i axis (0.4 mm)
    (row,) = evaluate_labelmaps(pred, ref, {1: "Vessel"})
    assert row["dice"] == pytest.approx(sphere_overlap_dice(r, shift_mm), abs=0.02)
    # the farthest surface points are shift_mm apart; the 95th percentile a little closer
    assert 0.75 * shift_mm - 0.6 <= row["hd95_mm"] <= shift_mm + 0.6
    assert row["volume_diff_ml"] == pytest.approx(0.0, abs=0.02)


def test_concentric_spheres_give_the_gap_as_every_distance():
    ref, pred = ball([0, 0, 0], 6.0), ball([0, 0, 0], 8.0)
    (row,) = evaluate_labelmaps(pred, ref, {1: "Vessel"})
    assert row["hd95_mm"] == pytest.approx(2.0, abs=0.6)
    assert row["msd_mm"] == pytest.approx(2.0, abs=0.5)
    assert row["dice"] == pytest.approx(2 * 6 ** 3 / (6 ** 3 + 8 ** 3), abs=0.02)


def test_identical_and_empty_masks():
    a = ball([1, 2, 3], 5.0)
    (same,) = evaluate_labelmaps(a, a, {1: "Vessel"})
    assert same["dice"] == 1.0 and same["hd95_mm"] == 0.0 and same["msd_mm"] == 0.0
    empty = Image(np.zeros_like(a.array), a.ijk_to_ras)
    (both,) = evaluate_labelmaps(empty, empty, {1: "Vessel"})
    assert both["dice"] == 1.0 and both["hd95_mm"] == 0.0
    (one,) = evaluate_labelmaps(empty, a, {1: "Vessel"})
    assert one["dice"] == 0.0 and math.isnan(one["hd95_mm"]) and math.isnan(one["msd_mm"])
    assert one["volume_diff_percent"] == pytest.approx(-100.0)


def test_volume_difference_is_exact_for_boxes():
    m = grid_matrix()
    ref = np.zeros(SHAPE, np.uint8)
    ref[10:20, 10:30, 10:40] = 2
    pred = np.zeros(SHAPE, np.uint8)
    pred[10:20, 10:30, 10:50] = 2
    (row,) = evaluate_labelmaps(Image(pred, m), Image(ref, m), {2: "Nerve"})
    voxel_ml = 0.4 * 0.5 * 0.6 / 1000
    assert row["volume_ref_ml"] == pytest.approx(10 * 20 * 30 * voxel_ml)
    assert row["volume_diff_ml"] == pytest.approx(10 * 20 * 10 * voxel_ml)
    assert row["dice"] == pytest.approx(2 * 30 / 70)


def test_a_prediction_on_a_flipped_permuted_grid_gives_the_same_numbers():
    ref = ball([0, 0, 0], 7.0)
    pred = ball([3.0, 0, 0], 7.0)
    (direct,) = evaluate_labelmaps(pred, ref, {1: "Vessel"})
    # the same physical voxels stored with the i axis flipped and k/j swapped
    arr = pred.array[:, :, ::-1].transpose(1, 0, 2).copy()
    m = pred.ijk_to_ras.copy()
    m[:3, 3] = m[:3, :3] @ np.array([SHAPE[2] - 1, 0, 0]) + m[:3, 3]
    m[:3, 0] *= -1
    m[:3, [1, 2]] = m[:3, [2, 1]]
    moved = Image(arr, m)
    (row,) = evaluate_labelmaps(moved, ref, {1: "Vessel"})
    assert row["resampled"] and not direct["resampled"]
    for key in ("dice", "hd95_mm", "msd_mm", "volume_pred_ml"):
        assert row[key] == pytest.approx(direct[key], abs=1e-9), key


def test_grids_that_do_not_overlap_are_refused():
    ref = ball([0, 0, 0], 7.0)
    far = ref.ijk_to_ras.copy()
    far[:3, 3] += 500.0
    with pytest.raises(InputError, match="covers 0%"):
        from medautolabel.evaluation.align import to_reference_grid

        to_reference_grid(Image(ref.array, far), ref, "pred.nii.gz")


def test_dice_counts_and_its_one_rule_for_empty_masks():
    a = np.zeros((4, 5), dtype=bool)
    b = a.copy()
    assert dice(a, b) == 1.0  # both empty: perfect agreement
    a[0, :3] = True  # 3 voxels
    assert dice(a, b) == 0.0 and dice(b, a) == 0.0  # one empty
    b[0, 1:5] = True  # 4 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / 7)
    assert dice(a.astype(np.uint8) * 3, b) == dice(a, b)  # any non-zero value is inside


def test_roc_auc_is_nan_with_one_class_only():
    assert math.isnan(roc_auc([True, True], [0.2, 0.9])) and math.isnan(roc_auc([False], [0.1]))
    assert roc_auc([False, True, False, True], [0.1, 0.8, 0.9, 0.95]) == pytest.approx(3 / 4)


def test_classification_metrics_on_a_hand_made_example():
    truth = [True, True, True, False, False, False, False]
    prob = [0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4]
    c = classification_metrics(truth, prob)
    # pairs (pos > neg): 0.9 beats all 4; 0.6 beats 3 (not 0.7); 0.3 beats 2 -> 9 of 12
    assert c["roc_auc"] == pytest.approx(9 / 12)
    assert c["confusion"] == [[3, 1], [1, 2]]
    assert c["sensitivity"] == pytest.approx(2 / 3) and c["specificity"] == pytest.approx(3 / 4)
    assert c["accuracy"] == pytest.approx(5 / 7)
    assert c["roc"][0] == [0.0, 0.0] and c["roc"][-1] == [1.0, 1.0]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def _dataset(folder, cases):
    (folder / "labelsTr").mkdir(parents=True)
    entries = []
    for name, image, klass in cases:
        write_image(image, folder / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz",
                        "classes": {"aneurysm": klass}})
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "vessel"},
                                                     "training": entries}))
    return folder / "labelsTr"


def _prediction(folder, name, image, p_present):
    folder.mkdir(parents=True, exist_ok=True)
    write_image(image, folder / f"{name}.nii.gz")
    (folder / f"{name}.tags.json").write_text(json.dumps({"classifications": [
        {"task": "aneurysm", "label": "present" if p_present > 0.5 else "absent", "probability": 0.0,
         "probabilities": {"absent": 1 - p_present, "present": p_present}}]}))


def test_command_writes_csv_summary_and_an_offline_html_report(tmp_path, capsys):
    refs = _dataset(tmp_path / "ds", [("a", ball([0, 0, 0], 6.0), "present"), ("b", ball([2, 0, 0], 6.0), "absent")])
    _prediction(tmp_path / "pred", "a", ball([0, 0, 0], 6.0), 0.8)
    _prediction(tmp_path / "pred", "b", ball([3.5, 0, 0], 6.0), 0.3)
    out = tmp_path / "report"
    assert main(["evaluate", str(tmp_path / "pred"), str(refs), "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [(r["case"], r["name"]) for r in rows] == [("a", "vessel"), ("b", "vessel")]
    assert float(rows[0]["dice"]) == 1.0 and float(rows[1]["dice"]) == pytest.approx(sphere_overlap_dice(6, 1.5),
                                                                                     abs=0.02)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == ["a", "b"]
    assert summary["segmentation"]["vessel"]["dice"]["n"] == 2
    cls = summary["classification"]["aneurysm"]
    assert cls["roc_auc"] == 1.0 and cls["confusion"] == [[1, 0], [0, 1]]
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    assert parser.tags.count("svg") == 4 and "script" not in parser.tags  # Dice, ROC, reliability, confusion
    assert 'aria-label="reliability diagram"' in page and f"ECE {cls['ece']:.3f}" in page
    diagram = page.split('aria-label="reliability diagram"')[1].split("</svg>")[0]
    assert diagram.count("<circle") == len(cls["reliability"]) == 2  # p 0.8 and 0.3: two bins
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch
    assert "vessel: Dice mean" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing-reference", "unreadable"])
def test_bad_input_exits_2_without_a_report(problem, tmp_path, capsys):
    refs = _dataset(tmp_path / "ds", [("a", ball([0, 0, 0], 6.0), "absent")])
    _prediction(tmp_path / "pred", "a", ball([0, 0, 0], 6.0), 0.2)
    if problem == "missing-reference":
        _prediction(tmp_path / "pred", "zzz", ball([0, 0, 0], 6.0), 0.2)
        culprit = "zzz.nii.gz"
    else:
        (tmp_path / "pred" / "a.nii.gz").write_bytes(b"garbage")
        culprit = "a.nii.gz"
    out = tmp_path / "report"
    assert main(["evaluate", str(tmp_path / "pred"), str(refs), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit in err[0]
    assert not out.exists() and not any(p.name.startswith(".~") for p in tmp_path.iterdir())


def test_references_without_a_prediction_are_reported_not_averaged(tmp_path, capsys):
    refs = _dataset(tmp_path / "ds", [("a", ball([0, 0, 0], 6.0), "absent"), ("b", ball([0, 0, 0], 6.0), "absent")])
    _prediction(tmp_path / "pred", "a", ball([0, 0, 0], 6.0), 0.2)
    out = tmp_path / "report"
    assert main(["evaluate", str(tmp_path / "pred"), str(refs), "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["cases"] == ["a"] and summary["not_predicted"] == ["b"]
    assert "1 reference case(s) have no prediction" in capsys.readouterr().err
    assert "without a prediction" in (out / "report.html").read_text(encoding="utf-8")
