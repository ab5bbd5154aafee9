"""Evaluate prediction labelmaps against references: per case and label, per class, and the report files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Union

from medautolabel import __version__
from medautolabel.evaluation.align import to_reference_grid
from medautolabel.evaluation.metrics import STATUSES, classification_metrics, segment_metrics
from medautolabel.evaluation.pairing import pair_cases, predicted_classes, read_labelmap, reference_classes
from medautolabel.evaluation.report import summarise, write_csv, write_html, write_summary
from medautolabel.image import Image
from medautolabel.io.atomic import atomic_outputs, make_folder
from medautolabel.io.ownership import EVALUATION_FORMAT, REPORT_FILES, check_replaceable

PathLike = Union[str, Path]


def evaluate_labelmaps(pred: Image, ref: Image, labels: Dict[int, str]) -> List[Dict[str, Any]]:
    """Metrics of one prediction against its reference, per label value in ``labels`` (value -> name).

    The prediction is compared on the reference's grid (resampled, nearest neighbour, in physical
    space when the grids differ; an InputError when they barely overlap). Each row: label, name,
    dice, hd95_mm, msd_mm, volume_pred_ml, volume_ref_ml, volume_diff_ml, volume_diff_percent, resampled.
    Labels present in either labelmap but not in ``labels`` get a row too, and every row has a
    ``status`` (see metrics.py). This is what the Slicer module's Evaluate section calls.
    """
    aligned, resampled = to_reference_grid(pred, ref)
    rows = segment_metrics(aligned, ref, labels)
    for r in rows:
        r["resampled"] = resampled
    return rows


def evaluate_cases(pred: PathLike, ref: PathLike) -> Dict[str, Any]:
    """Evaluate every (prediction, reference) pair; returns {"rows": [...], "summary": {...}}."""
    rows: List[Dict[str, Any]] = []
    truth: Dict[str, List[bool]] = {}
    scores: Dict[str, List[float]] = {}
    classes: Dict[str, List[str]] = {}
    cases = []
    pairs, missing = pair_cases(pred, ref)
    for case, pred_path, ref_path in pairs:
        p, r = read_labelmap(pred_path), read_labelmap(ref_path)
        names = {**p.names, **r.names}  # segment_metrics adds every value present in either labelmap
        aligned, resampled = to_reference_grid(p.image, r.image, pred_path)
        for row in segment_metrics(aligned, r.image, names):
            row.update(case=case, resampled=resampled)
            rows.append(row)
        cases.append(case)
        ref_classes, probs = reference_classes(ref_path), predicted_classes(pred_path)
        for task, label in ref_classes.items():
            if task in probs:
                absent, present = _class_order(task, probs[task])
                classes[task] = [absent, present]
                truth.setdefault(task, []).append(label == present)
                scores.setdefault(task, []).append(float(probs[task][present]))
    summary: Dict[str, Any] = {"format": EVALUATION_FORMAT, "medautolabel_version": __version__,
                               "cases": cases, "not_predicted": missing, "segmentation": summarise(rows),
                               "label_status": status_counts(rows), "classification": {}}
    for task in truth:
        summary["classification"][task] = dict(classification_metrics(truth[task], scores[task]),
                                               classes=classes[task])
    return {"rows": rows, "summary": summary}


def status_counts(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per label name: how many cases had it in both, only in the prediction, only in the reference, in neither."""
    out: Dict[str, Dict[str, int]] = {}
    for r in rows:
        counts = out.setdefault(r["name"], {s: 0 for s in STATUSES})
        counts[r["status"]] += 1
    return out


def _class_order(task: str, probabilities: Dict[str, float]):
    names = list(probabilities)
    if len(names) != 2:
        raise ValueError(f"task {task!r}: only two-class tasks are evaluated")
    if "present" in names:
        return [n for n in names if n != "present"][0], "present"
    return names[0], names[1]


def write_report(evaluation: Dict[str, Any], report_dir: PathLike, command: str = "") -> Path:
    """Write metrics.csv, summary.json and report.html into ``report_dir``, all three or none.

    Only these three files are written; an existing one is replaced only when medautolabel wrote
    it (ownership.py), and nothing else in ``report_dir`` is touched.
    """
    target = Path(report_dir)
    files = [target / name for name in REPORT_FILES]
    check_replaceable(files, overwrite=True)
    make_folder(target)
    summary = dict(evaluation["summary"], command=command)
    with atomic_outputs(files) as temps:
        write_csv(evaluation["rows"], temps[0])
        write_summary(summary, temps[1])
        write_html(evaluation["rows"], summary, temps[2])
    return target
