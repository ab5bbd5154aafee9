"""metrics.csv, summary.json and a self-contained report.html (inline SVG and PNG, no scripts, opens offline)."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np

from medautolabel.evaluation.worst import (
    AXIS_NAMES,
    PREDICTION_RGB,
    REFERENCE_RGB,
    WORST_PER_LABEL,
    ErrorSlice,
    slice_png,
)
from medautolabel.text import printable

COLUMNS = ["case", "label", "name", "status", "dice", "hd95_mm", "msd_mm", "volume_pred_ml", "volume_ref_ml",
           "volume_diff_ml", "volume_diff_percent", "resampled"]
METRICS = ["dice", "hd95_mm", "msd_mm", "volume_diff_ml"]


def _text(value: Any) -> str:
    """Untrusted text (case and label names, classes) for the HTML page: inert, then escaped."""
    return html.escape(printable(value))


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{digits}f}")
    return str(x)


def summarise(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per label name and metric: n, mean, median, std, min, max over cases (NaN values left out, counted)."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        out[name] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows if r["name"] == name], dtype=float)
            finite = values[np.isfinite(values)]
            stats = {"n": int(len(values)), "n_undefined": int(len(values) - len(finite))}
            if len(finite):
                stats.update(mean=float(finite.mean()), median=float(np.median(finite)), std=float(finite.std()),
                             min=float(finite.min()), max=float(finite.max()))
            out[name][metric] = stats
    return out


def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _num(r[k], 6) if isinstance(r.get(k), float) else r.get(k, "") for k in COLUMNS})


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_summary(summary: Dict[str, Any], path: Path) -> None:
    """JSON with NaN/inf written as null (strict JSON)."""
    path.write_text(json.dumps(_json_safe(summary), indent=2) + "\n", encoding="utf-8")


# --- SVG plots -------------------------------------------------------------------------------------

def dice_plot(rows: Sequence[Dict[str, Any]], width: int = 520, height: int = 260) -> str:
    """Dice of every case per label: dots plus a median bar."""
    names = list(dict.fromkeys(r["name"] for r in rows))
    left, bottom, top = 50, 30, 15
    plot_h = height - bottom - top
    col_w = (width - left - 10) / max(1, len(names))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="Dice per label">']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:.2f}</text>')
    for n, name in enumerate(names):
        values = [r["dice"] for r in rows if r["name"] == name and math.isfinite(r["dice"])]
        cx = left + col_w * (n + 0.5)
        for m, v in enumerate(values):
            jitter = ((m * 37) % 21 - 10) / 10 * col_w * 0.15
            parts.append(f'<circle cx="{cx + jitter:.1f}" cy="{top + plot_h * (1 - v):.1f}" r="3.5" '
                         f'fill="#3b6ea8" fill-opacity="0.7"><title>{_text(name)}: {v:.3f}</title></circle>')
        if values:
            ym = top + plot_h * (1 - float(np.median(values)))
            parts.append(f'<line x1="{cx - col_w * 0.3:.1f}" y1="{ym:.1f}" x2="{cx + col_w * 0.3:.1f}" y2="{ym:.1f}" '
                         f'stroke="#c0392b" stroke-width="2"/>')
        parts.append(f'<text x="{cx:.1f}" y="{height - 10}" font-size="12" text-anchor="middle">'
                     f'{_text(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _unit_square_plot(content: str, aria: str, x_label: str, y_label: str, note: str, note_at: str,
                      size: int, pad: int = 35) -> str:
    """An SVG of a 0..1 x 0..1 plot: frame, the dashed diagonal, axis labels, ``content`` (drawn by the caller
    in the square ``pad``..``size - pad``) and ``note`` in the corner ``note_at`` ("bottom-right" or "top-left")."""
    s = size - 2 * pad
    x, y, anchor = (pad + s - 4, pad + s - 8, ' text-anchor="end"') if note_at == "bottom-right" else (pad + 4, pad + 14, "")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" aria-label="{aria}">'
            f'<rect x="{pad}" y="{pad}" width="{s}" height="{s}" fill="none" stroke="#888"/>'
            f'<line x1="{pad}" y1="{pad + s}" x2="{pad + s}" y2="{pad}" stroke="#ccc" stroke-dasharray="4"/>{content}'
            f'<text x="{size / 2}" y="{size - 8}" font-size="11" text-anchor="middle">{x_label}</text>'
            f'<text x="12" y="{size / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {size / 2})">{y_label}</text>'
            f'<text x="{x}" y="{y}" font-size="12"{anchor}>{note}</text></svg>')


CURVE_COLOURS = ("#3b6ea8", "#c0392b", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#2c3e50")


def roc_plot(curves: Union[Sequence[Sequence[float]], Mapping[str, Sequence[Sequence[float]]]], auc: float,
             size: int = 260) -> str:
    """The ROC curve (a list of points), or one one-vs-rest curve per class (class -> points) with a legend."""
    pad = 35
    s = size - 2 * pad
    named = dict(curves) if isinstance(curves, Mapping) else {"": curves}
    content = []
    for n, (name, points) in enumerate(named.items()):
        colour = CURVE_COLOURS[n % len(CURVE_COLOURS)]
        xy = " ".join(f"{pad + x * s:.1f},{pad + (1 - y) * s:.1f}" for x, y in points)
        content.append(f'<polyline points="{xy}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if name:
            content.append(f'<text x="{pad + 4}" y="{pad + 14 + 13 * n}" font-size="11" fill="{colour}">'
                           f'{_text(name)}</text>')
    label = "AUC n/a" if not math.isfinite(auc) else f"{'macro ' if len(named) > 1 else ''}AUC {auc:.3f}"
    return _unit_square_plot("".join(content), "ROC curve", "false-positive rate", "true-positive rate", label,
                             "bottom-right", size, pad)


def reliability_plot(points: Sequence[Dict[str, float]], ece: float, size: int = 260) -> str:
    """The reliability diagram: observed frequency against mean predicted probability per bin (a dot
    whose area grows with the bin's cases), the diagonal a calibrated classifier would follow, and the ECE."""
    pad = 35
    s = size - 2 * pad
    most = max((b["n"] for b in points), default=1)
    dots = "".join(f'<circle cx="{pad + b["mean_probability"] * s:.1f}" cy="{pad + (1 - b["frequency"]) * s:.1f}" '
                   f'r="{2 + 5 * math.sqrt(b["n"] / most):.1f}" fill="#3b6ea8"/>' for b in points)
    label = "ECE n/a" if not math.isfinite(ece) else f"ECE {ece:.3f}"
    return _unit_square_plot(dots, "reliability diagram", "mean predicted probability", "observed frequency", label,
                             "top-left", size, pad)


def confusion_plot(confusion: Sequence[Sequence[int]], classes: Sequence[str], size: int = 220) -> str:
    """The confusion matrix: rows = reference class, columns = predicted class, counts shaded by their share."""
    pad = 60
    k = len(classes)
    cell = (size - pad) / k
    total = max(1, sum(sum(r) for r in confusion))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 10}" height="{size + 10}" role="img" '
             f'aria-label="Confusion matrix">']
    for t in range(k):
        for p in range(k):
            count = int(confusion[t][p])
            shade = int(255 - 180 * count / total)
            x, y = pad + p * cell, pad + t * cell
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                         f'fill="rgb({shade},{shade},255)" stroke="#555"/>'
                         f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 5:.1f}" font-size="{16 if k <= 4 else 11}" '
                         f'text-anchor="middle">{count}</text>')
        parts.append(f'<text x="{pad - 6}" y="{pad + t * cell + cell / 2 + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{_text(classes[t])}</text>')
        parts.append(f'<text x="{pad + t * cell + cell / 2:.1f}" y="{pad - 8}" font-size="11" '
                     f'text-anchor="middle">{_text(classes[t])}</text>')
    middle = pad + (size - pad) / 2
    parts.append(f'<text x="{middle:.1f}" y="14" font-size="11" text-anchor="middle">predicted</text>'
                 f'<text x="10" y="{middle:.1f}" font-size="11" transform="rotate(-90 10 {middle:.1f})" '
                 f'text-anchor="middle">reference</text></svg>')
    return "".join(parts)


def _table(header: List[str], body: List[List[Any]]) -> str:
    head = "".join(f"<th>{_text(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{_text(_num(v, 3))}</td>" for v in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _interval(ci: Any) -> str:
    low, high = ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else (math.nan, math.nan)
    return f"{_num(low, 3)}-{_num(high, 3)}"


def _probabilities(probabilities: Mapping[str, float]) -> str:
    return ", ".join(f"{printable(c)} {p:.3f}" for c, p in probabilities.items())


def _classification(task: str, c: Dict[str, Any]) -> List[str]:
    """The report section of one task: plots, the task's numbers, per class, misclassified and unpredicted cases."""
    body = [f"<h2>Classification: {_text(task)}</h2>"]
    classes = c["classes"]
    if c.get("n"):
        body.append('<div class="row">' + roc_plot(c["roc"], c["roc_auc"]) +
                    reliability_plot(c.get("reliability", []), c.get("ece", math.nan)) +
                    confusion_plot(c["confusion"], classes) + "</div>")
        if len(classes) == 2:
            body.append(_table(["n", "positives", "accuracy", "balanced accuracy", "sensitivity", "specificity",
                                "ROC AUC", "AUC 95 % CI", "sensitivity at 90 % specificity", "ECE"],
                               [[c["n"], c["positives"], c["accuracy"], c.get("balanced_accuracy", math.nan),
                                 c["sensitivity"], c["specificity"], c["roc_auc"], _interval(c.get("roc_auc_ci95")),
                                 c.get("sensitivity_at_90_specificity", math.nan), c.get("ece", math.nan)]]))
        else:
            body.append(_table(["n", "accuracy", "balanced accuracy", "macro ROC AUC (one-vs-rest)",
                                "ECE (of the predicted class)"],
                               [[c["n"], c["accuracy"], c["balanced_accuracy"], c["roc_auc"], c["ece"]]]))
        per_class = c.get("per_class", {})
        body.append(_table(["class (one-vs-rest)", "reference cases", "sensitivity", "specificity", "ROC AUC",
                            "AUC 95 % CI"],
                           [[name, v["n"], v["sensitivity"], v["specificity"], v["roc_auc"],
                             _interval(v["roc_auc_ci95"])] for name, v in per_class.items()]))
        wrong = c.get("misclassified", [])
        body.append(f"<h3>Misclassified cases ({len(wrong)})</h3>")
        if wrong:
            body.append(_table(["case", "reference", "predicted", "probabilities"],
                               [[m["case"], m["reference"], m["predicted"], _probabilities(m["probabilities"])]
                                for m in wrong]))
    missing = c.get("not_predicted", [])
    if missing:
        body.append(f"<p>{len(missing)} case(s) whose reference has this task but whose prediction does not, "
                    f"not counted: {_text(', '.join(missing))}</p>")
    return body


def _worst_cases(slices: Sequence[ErrorSlice]) -> List[str]:
    """The worst cases per label: each a PNG (inline, base64) of the slice through its largest error."""
    if not slices:
        return []
    body = ["<h2>Worst cases</h2>",
            f"<p>Per label, the {WORST_PER_LABEL} lowest Dice among the cases whose reference or prediction "
            "holds it, each on the slice with the most wrong voxels of the label: reference outline "
            f'<span style="color:rgb{REFERENCE_RGB}">green</span>, prediction outline '
            f'<span style="color:rgb{PREDICTION_RGB}">magenta</span>.</p><div class="row wrap">']
    for s in slices:
        png = base64.b64encode(slice_png(s)).decode("ascii")
        caption = (f"case {_text(s.case)}, label {_text(s.name)} ({s.label}), {s.view} slice "
                   f"{AXIS_NAMES[s.axis]} = {s.index}, Dice {s.dice:.3f}, {s.errors} wrong voxels"
                   + ("" if s.image is not None else " (over the reference labelmap)"))
        body.append(f'<figure><img src="data:image/png;base64,{png}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>")
    body.append("</div>")
    return body


def write_html(rows: Sequence[Dict[str, Any]], summary: Dict[str, Any], path: Path,
               slices: Sequence[ErrorSlice] = ()) -> None:
    """report.html: self-contained (inline SVG and PNG, no scripts); every name from a file made inert and escaped."""
    per_label = summary["segmentation"]
    missing = summary.get("not_predicted", [])
    body = [f"<h1>MedAutoLabel evaluation</h1><p>{len(summary['cases'])} cases"
            + (f" ({len(missing)} reference cases without a prediction, not counted: "
               f"{_text(', '.join(missing))})" if missing else "")
            + (f"; {sum(bool(r['resampled']) for r in rows)} label rows from predictions resampled onto their "
               "reference grid" if rows else "; classes only (no reference labelmaps)") + ".</p>"]
    if rows:
        body += ["<h2>Segmentation</h2>", dice_plot(rows)]
        stats = [[name, m["dice"].get("mean", math.nan), m["dice"].get("median", math.nan),
                  m["hd95_mm"].get("mean", math.nan), m["msd_mm"].get("mean", math.nan),
                  m["volume_diff_ml"].get("mean", math.nan), m["dice"]["n"]] for name, m in per_label.items()]
        body.append(_table(["label", "Dice mean", "Dice median", "HD95 mean (mm)", "MSD mean (mm)",
                            "volume diff mean (mL)", "cases"], stats))
    body += _worst_cases(slices)
    for task, c in summary.get("classification", {}).items():
        body += _classification(task, c)
    if rows:
        body.append("<h2>Per case</h2>")
        body.append(_table(["case", "label", "Dice", "HD95 (mm)", "MSD (mm)", "pred mL", "ref mL", "resampled"],
                           [[r["case"], r["name"], r["dice"], r["hd95_mm"], r["msd_mm"], r["volume_pred_ml"],
                             r["volume_ref_ml"], "yes" if r["resampled"] else "no"] for r in rows]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
             ".row{display:flex;gap:2em;align-items:center}.wrap{flex-wrap:wrap}figure{margin:0}"
             "figcaption{font-size:12px;max-width:256px}")
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>MedAutoLabel evaluation</title>'
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    path.write_text(doc, encoding="utf-8")
