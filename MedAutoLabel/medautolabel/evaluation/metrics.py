"""Segmentation and classification metrics with known conventions for empty masks.

``dice`` and ``roc_auc`` here are the engine's only Dice and ROC AUC: evaluation, training
validation, the demo and the tools all call them, so every number called "Dice" follows one rule.
HD95 and mean symmetric surface distance come from MONAI
(``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(symmetric=True)``)
with the voxel spacing in millimetres. Empty masks: both empty -> Dice 1, distances 0; exactly
one empty -> Dice 0, distances NaN ("n/a" in reports). Every row says which case it is in
``status``: "ok" (in both), "only in prediction" (a false positive), "only in reference" (missed)
or "both empty"; every label value present in the prediction or the reference gets a row.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch

from medautolabel.image import Image


def _spacing_kji(image: Image) -> List[float]:
    return [float(s) for s in np.linalg.norm(image.ijk_to_ras[:3, :3], axis=0)[::-1]]


def _masks(pred: np.ndarray, ref: np.ndarray):
    return (torch.from_numpy(np.ascontiguousarray(pred))[None, None].float(),
            torch.from_numpy(np.ascontiguousarray(ref))[None, None].float())


STATUSES = ("ok", "only in prediction", "only in reference", "both empty")
NO_LABELS = "(no labels)"  # the name of the one row of a case whose prediction and reference are both empty


def presence(n_pred: int, n_ref: int) -> str:
    """Which of ``STATUSES`` a label is in, from its voxel counts in the prediction and the reference."""
    if n_pred and n_ref:
        return "ok"
    if n_pred:
        return "only in prediction"
    return "only in reference" if n_ref else "both empty"


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice 2|P & R| / (|P| + |R|) of two masks (non-zero = inside), counted exactly in integers.

    The one rule for empty masks: both empty -> 1.0 (they agree perfectly), exactly one empty -> 0.0.
    Callers that want to leave out cases without the label (training validation averages a label
    over the cases whose reference holds it) skip those cases themselves.
    """
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(p & r)) / total


def roc_auc(truth: Sequence[bool], score: Sequence[float]) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``truth`` (MONAI ``compute_roc_auc``).

    NaN when ``truth`` holds only one class: the area is not defined without both positives and negatives.
    """
    from monai.metrics import compute_roc_auc

    t = np.asarray(truth, dtype=bool)
    if not 0 < int(t.sum()) < t.size:
        return math.nan
    return float(compute_roc_auc(torch.from_numpy(np.asarray(score, dtype=np.float64)),
                                 torch.from_numpy(t.astype(np.float64))))


def labels_to_report(pred: np.ndarray, ref: np.ndarray, names: Mapping[int, str]) -> Dict[int, str]:
    """Label value -> name for every value named, or present (non-zero) in the prediction or the reference.

    A value only the prediction holds is a false positive: it gets a row (Dice 0) rather than
    being left out because the reference never names it.
    """
    present = set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())
    out = {int(v): str(n) for v, n in names.items() if int(v) != 0}
    for value in sorted(int(v) for v in present if int(v) != 0):
        out.setdefault(value, f"label {value}")
    return dict(sorted(out.items()))


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing_kji: Sequence[float], voxel_ml: float) -> Dict[str, Any]:
    """Dice, HD95 (mm), mean symmetric surface distance (mm), volumes (mL) and status of two boolean masks."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    out: Dict[str, Any] = {"volume_pred_ml": n_pred * voxel_ml, "volume_ref_ml": n_ref * voxel_ml,
                           "status": presence(n_pred, n_ref)}
    out["volume_diff_ml"] = out["volume_pred_ml"] - out["volume_ref_ml"]
    out["volume_diff_percent"] = 100.0 * out["volume_diff_ml"] / out["volume_ref_ml"] if n_ref else math.nan
    out["dice"] = dice(pred, ref)
    if n_pred == 0 and n_ref == 0:
        out.update(hd95_mm=0.0, msd_mm=0.0)
        return out
    if n_pred == 0 or n_ref == 0:
        out.update(hd95_mm=math.nan, msd_mm=math.nan)
        return out
    p, r = _masks(pred, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["hd95_mm"] = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                          spacing=list(spacing_kji)))
        out["msd_mm"] = float(compute_average_surface_distance(p, r, include_background=True, symmetric=True,
                                                               spacing=list(spacing_kji)))
    return out


def segment_metrics(pred: Image, ref: Image, labels: Dict[int, str]) -> List[Dict[str, Any]]:
    """Per label value: name, status, dice, hd95_mm, msd_mm, volumes. ``pred`` must already be on ``ref``'s grid.

    Every value of ``labels`` and every value present in either labelmap gets a row
    (``labels_to_report``); when there is none at all, one row named ``NO_LABELS`` (label "")
    says that both are empty instead of the case silently having no row.
    """
    if pred.array.shape != ref.array.shape:
        raise ValueError("prediction and reference must be on the same grid (see evaluation.align)")
    spacing = _spacing_kji(ref)
    voxel_ml = float(abs(np.linalg.det(ref.ijk_to_ras[:3, :3]))) / 1000.0
    rows = []
    for value, name in labels_to_report(pred.array, ref.array, labels).items():
        row: Dict[str, Any] = {"label": int(value), "name": name}
        row.update(mask_metrics(pred.array == value, ref.array == value, spacing, voxel_ml))
        rows.append(row)
    if not rows:
        empty = np.zeros((1, 1, 1), dtype=bool)
        rows.append(dict({"label": "", "name": NO_LABELS}, **mask_metrics(empty, empty, spacing, voxel_ml)))
    return rows


def roc_points(truth: Sequence[bool], score: Sequence[float]) -> List[List[float]]:
    """ROC curve as [false-positive rate, true-positive rate] points, from (0, 0) to (1, 1)."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(score, dtype=float)
    pos, neg = int(t.sum()), int((~t).sum())
    points = [[0.0, 0.0]]
    for threshold in sorted(set(s.tolist()), reverse=True):
        chosen = s >= threshold
        points.append([float((chosen & ~t).sum()) / max(neg, 1), float((chosen & t).sum()) / max(pos, 1)])
    if points[-1] != [1.0, 1.0]:
        points.append([1.0, 1.0])
    return points


def sensitivity_at_specificity(truth: Sequence[bool], score: Sequence[float], specificity: float = 0.9) -> float:
    """The highest sensitivity of any threshold whose specificity is at least ``specificity`` (NaN without both classes)."""
    t = np.asarray(truth, dtype=bool)
    if t.all() or not t.any():
        return math.nan
    return max(tpr for fpr, tpr in roc_points(t, score) if 1.0 - fpr >= specificity - 1e-12)


def reliability(truth: Sequence[bool], probability: Sequence[float], bins: int = 10) -> List[Dict[str, float]]:
    """The reliability diagram's points: per equal-width probability bin that holds cases, the mean
    predicted probability, the observed frequency of the positive class and the number of cases."""
    t = np.asarray(truth, dtype=bool)
    p = np.clip(np.asarray(probability, dtype=float), 0.0, 1.0)
    which = np.minimum((p * bins).astype(int), bins - 1)  # p == 1.0 goes to the last bin
    return [{"mean_probability": float(p[which == b].mean()), "frequency": float(t[which == b].mean()),
             "n": int((which == b).sum())} for b in range(bins) if (which == b).any()]


def expected_calibration_error(truth: Sequence[bool], probability: Sequence[float], bins: int = 10) -> float:
    """ECE: the mean |observed frequency - mean probability| over equal-width bins, weighted by their cases.

    0 for a calibrated classifier; a model that says 0.9 for cases that are positive half the time
    has 0.4. NaN without cases.
    """
    points = reliability(truth, probability, bins)
    n = sum(b["n"] for b in points)
    if not n:
        return math.nan
    return float(sum(b["n"] * abs(b["frequency"] - b["mean_probability"]) for b in points) / n)


def roc_auc_interval(truth: Sequence[bool], score: Sequence[float], resamples: int = 1000, level: float = 0.95,
                     seed: int = 0) -> List[float]:
    """A percentile bootstrap interval [low, high] of ``roc_auc`` (cases resampled with replacement; resamples
    with one class only are skipped); [NaN, NaN] without both classes. Seeded: the same data give the same interval."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(score, dtype=float)
    if t.all() or not t.any():
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(t), len(t))
        if t[pick].any() and not t[pick].all():
            values.append(roc_auc(t[pick], s[pick]))
    tail = (1.0 - level) / 2.0 * 100.0
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]


def classification_metrics(truth: Sequence[bool], probability: Sequence[float],
                           threshold: float = 0.5) -> Dict[str, Any]:
    """Of one two-class task (``truth``: the positive class?; ``probability``: P(positive)): accuracy,
    balanced accuracy (``balanced_accuracy``), sensitivity, specificity, ROC AUC (``roc_auc``; NaN with one class
    only) with its 95 % bootstrap interval, sensitivity at 90 % specificity, the confusion matrix
    [[TN, FP], [FN, TP]] at ``threshold``, the ROC points, and calibration (ECE and the reliability
    diagram's points)."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(probability, dtype=float)
    called = p >= threshold
    tp, tn = int((called & t).sum()), int((~called & ~t).sum())
    fp, fn = int((called & ~t).sum()), int((~called & t).sum())
    auc = roc_auc(t, p)
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    return {"n": int(len(t)), "positives": int(t.sum()), "threshold": threshold,
            "accuracy": (tp + tn) / len(t) if len(t) else math.nan,
            "balanced_accuracy": balanced_accuracy([[tn, fp], [fn, tp]]),
            "sensitivity": sensitivity, "specificity": specificity,
            "roc_auc": auc, "roc_auc_ci95": roc_auc_interval(t, p),
            "sensitivity_at_90_specificity": sensitivity_at_specificity(t, p, 0.9),
            "ece": expected_calibration_error(t, p), "reliability": reliability(t, p),
            "confusion": [[tn, fp], [fn, tp]], "roc": roc_points(t, p)}


# --- tasks with named classes (two or more) --------------------------------------------------------

def confusion_matrix(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> List[List[int]]:
    """Counts of (reference class, predicted class): rows = reference, columns = predicted, both in ``classes``
    order. For two classes [negative, positive] it is [[TN, FP], [FN, TP]]."""
    index = {c: n for n, c in enumerate(classes)}
    out = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, predicted):
        out[index[t]][index[p]] += 1
    return out


def balanced_accuracy(confusion: Sequence[Sequence[int]]) -> float:
    """The mean sensitivity (recall) of the classes that have reference cases (rows of ``confusion`` with
    cases); NaN without cases. With two classes and both present it is (sensitivity + specificity) / 2;
    a class no reference case has is left out rather than counted as 0 or 1."""
    recalls = [row[n] / sum(row) for n, row in enumerate(confusion) if sum(row)]
    return float(np.mean(recalls)) if recalls else math.nan


def one_vs_rest(confusion: Sequence[Sequence[int]], index: int) -> Dict[str, float]:
    """Sensitivity and specificity of class ``index`` against all the others (NaN when undefined)."""
    m = np.asarray(confusion, dtype=np.int64)
    tp = int(m[index, index])
    fn = int(m[index].sum()) - tp
    fp = int(m[:, index].sum()) - tp
    tn = int(m.sum()) - tp - fn - fp
    return {"sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan}


def predicted_class(probabilities: Mapping[str, float], classes: Sequence[str], threshold: float = 0.5) -> str:
    """The class a prediction calls: with two classes the second (positive) one when its probability is at
    least ``threshold`` (as ``classification_metrics``); with more, the most probable (the first listed on a tie)."""
    if len(classes) == 2:
        return classes[1] if probabilities[classes[1]] >= threshold else classes[0]
    return max(classes, key=lambda c: (probabilities[c], -classes.index(c)))


def task_metrics(truth: Sequence[str], probabilities: Sequence[Mapping[str, float]],
                 classes: Sequence[str]) -> Dict[str, Any]:
    """Metrics of one task whose cases have the reference classes ``truth`` and the predicted ``probabilities``
    (class -> probability, every class of ``classes``).

    Always: ``classes``, ``n``, ``accuracy``, ``balanced_accuracy``, ``confusion`` (rows = reference,
    columns = predicted, ``confusion_matrix``), ``per_class`` (class -> reference cases ``n``,
    ``sensitivity``, ``specificity``, one-vs-rest ``roc_auc`` of the class's probability and its
    ``roc_auc_ci95``), ``ece`` and ``reliability``, and ``roc_auc``.
    Two classes [negative, positive]: everything ``classification_metrics`` gives for P(positive)
    (``roc_auc`` is the positive class's; ECE and reliability of P(positive)).
    More classes: ``roc_auc`` is the macro mean of the per-class AUCs that are defined (``roc_auc_macro``
    too), ``roc`` the one-vs-rest curve of each class, and ECE and reliability are of the predicted
    class's probability (its confidence) against whether the call was right.
    """
    classes = list(classes)
    called = [predicted_class(p, classes) for p in probabilities]
    confusion = confusion_matrix(truth, called, classes)
    per_class: Dict[str, Dict[str, Any]] = {}
    for n, c in enumerate(classes):
        is_c = [t == c for t in truth]
        score = [float(p[c]) for p in probabilities]
        per_class[c] = dict({"n": int(sum(is_c))}, **one_vs_rest(confusion, n),
                            roc_auc=roc_auc(is_c, score), roc_auc_ci95=roc_auc_interval(is_c, score))
    if len(classes) == 2:
        positive = classes[1]
        out = classification_metrics([t == positive for t in truth], [float(p[positive]) for p in probabilities])
    else:
        aucs = [v["roc_auc"] for v in per_class.values() if math.isfinite(v["roc_auc"])]
        correct = [t == c for t, c in zip(truth, called)]
        confidence = [float(p[c]) for p, c in zip(probabilities, called)]
        out = {"n": len(truth), "accuracy": sum(correct) / len(correct) if correct else math.nan,
               "balanced_accuracy": balanced_accuracy(confusion),
               "roc_auc": float(np.mean(aucs)) if aucs else math.nan,
               "ece": expected_calibration_error(correct, confidence), "reliability": reliability(correct, confidence),
               "roc": {c: roc_points([t == c for t in truth], [float(p[c]) for p in probabilities])
                       for c in classes}}
        out["roc_auc_macro"] = out["roc_auc"]
    out.update(classes=classes, confusion=confusion, per_class=per_class)
    return out
