"""Held-out evaluation of a model on phantoms it never saw, through the full labelling pipeline.

Each case is a phantom from the held-out seed range rendered on a random oblique, flipped,
anisotropic grid; the model labels it exactly as ``medautolabel label`` would, and the labels are
compared with the phantom's reference on the phantom's own grid::

    python tools/builtin_eval.py --model vessel-nerve-cta --cases 50 --out metrics.json

``--classes-only --cases 200``: the model's image-level tags alone (its classifier networks on the
whole image, as ``label`` runs them; no segmentation) on phantoms chosen so that exactly half
show an aneurysm: held-out seeds are taken in order, asking for an aneurysm in every other one,
and a seed whose sac falls outside its image (no aneurysm after all) is passed over. Reports
accuracy, ROC AUC with its bootstrap interval, sensitivity at 90 % specificity and calibration::

    python tools/builtin_eval.py --model vessel-nerve-cta --classes-only --cases 200 --out docs/builtin-aneurysm-eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from medautolabel.evaluation.metrics import dice, roc_auc
from medautolabel.synthetic.phantoms import HELD_OUT_SEEDS, NERVE, VESSEL, make_phantom


def evaluate(model: str, seeds: List[int], device: str = "cpu", progress: bool = True) -> Dict:
    from medautolabel.labelling.pipeline import label_image

    cases = []
    iterator = seeds
    if progress:
        from tqdm import tqdm

        iterator = tqdm(seeds, desc="held-out phantoms", unit="case")
    for seed in iterator:
        ph = make_phantom(seed)
        t0 = time.perf_counter()
        result = label_image(ph.image, model, device=device)
        seconds = time.perf_counter() - t0
        pred, ref = result.labelmap.array, ph.labels.array
        tags = {c.task: c for c in result.classifications}
        p_aneurysm = tags["aneurysm"].probabilities.get("present") if "aneurysm" in tags else None
        cases.append({
            "seed": seed,
            "shape_kji": list(ref.shape),
            "spacing_ijk": [round(float(s), 3) for s in ph.image.spacing],
            "vessel_dice": dice(pred == VESSEL, ref == VESSEL),
            "nerve_dice": dice(pred == NERVE, ref == NERVE),
            "aneurysm": ph.aneurysm,
            "aneurysm_probability": p_aneurysm,
            "seconds": round(seconds, 2),
        })
    return {"model": model, "cases": cases, "summary": summarise(cases)}


def balanced_phantoms(first_seed: int, cases: int):
    """(seed, phantom) pairs, half with a visible aneurysm, alternating, from ``first_seed`` on."""
    want, seed = True, first_seed
    for _ in range(cases):
        while True:
            ph = make_phantom(seed, aneurysm=want)
            seed += 1
            if ph.aneurysm == want:
                break
        yield seed - 1, ph
        want = not want


def evaluate_classes(model: str, first_seed: int, cases: int, device: str = "cpu", progress: bool = True) -> Dict:
    """The model's image-level tags on ``cases`` balanced held-out phantoms (classifier networks only)."""
    import torch

    from medautolabel.catalog.registry import resolve_model
    from medautolabel.evaluation.metrics import classification_metrics
    from medautolabel.labelling.classify import classify
    from medautolabel.runtime.device import select_device

    card = resolve_model(model)
    if any(t.method != "network" or t.input.needs_segment for t in card.classification):
        raise SystemExit("--classes-only needs classifier networks that look at the image, not at a segment")
    dev = select_device(device)
    rows = []
    iterator = balanced_phantoms(first_seed, cases)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=cases, desc="held-out phantoms", unit="case")
    for seed, ph in iterator:
        t0 = time.perf_counter()
        with torch.inference_mode():
            tags = {c.task: c for c in classify(card, ph.image, None, dev)}
        sac_mm3 = float(ph.aneurysm_mask.sum()) * float(np.prod(ph.image.spacing))
        rows.append({"seed": seed, "aneurysm": ph.aneurysm, "sac_mm3": round(sac_mm3, 1),
                     "spacing_ijk": [round(float(s), 3) for s in ph.image.spacing],
                     "aneurysm_probability": tags["aneurysm"].probabilities["present"],
                     "label": tags["aneurysm"].label, "seconds": round(time.perf_counter() - t0, 3)})
    truth = [r["aneurysm"] for r in rows]
    probs = [r["aneurysm_probability"] for r in rows]
    m = classification_metrics(truth, probs)
    summary = {k: v for k, v in m.items() if k != "roc"}
    summary["seeds"] = [rows[0]["seed"], rows[-1]["seed"]] if rows else []
    small = [r for r in rows if r["aneurysm"] and r["sac_mm3"] < 65.0]  # sacs below about 5 mm across
    if small:
        summary["sensitivity_small_sacs"] = {"n": len(small), "value": float(np.mean(
            [r["label"] == "present" for r in small]))}
    return {"model": model, "cases": rows, "summary": summary}


def summarise(cases: List[Dict]) -> Dict:
    out: Dict = {"n": len(cases)}
    for key in ("vessel_dice", "nerve_dice", "seconds"):
        v = np.array([c[key] for c in cases], dtype=float)
        out[key] = {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4),
                    "median": round(float(np.median(v)), 4), "min": round(float(v.min()), 4)}
    scored = [c for c in cases if c["aneurysm_probability"] is not None]
    if scored:
        probs = [c["aneurysm_probability"] for c in scored]
        truth = [bool(c["aneurysm"]) for c in scored]
        auc = roc_auc(truth, probs)
        out["aneurysm_auc"] = None if np.isnan(auc) else round(auc, 4)  # JSON has no NaN: one class only
        predicted = [p >= 0.5 for p in probs]
        out["aneurysm_accuracy"] = round(float(np.mean([p == t for p, t in zip(predicted, truth)])), 4)
        out["aneurysm_sensitivity"] = round(float(np.mean([p for p, t in zip(predicted, truth) if t]) if any(truth)
                                                  else float("nan")), 4)
        out["aneurysm_specificity"] = round(float(np.mean([not p for p, t in zip(predicted, truth) if not t])
                                                  if not all(truth) else float("nan")), 4)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vessel-nerve-cta", help="model id or folder")
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--first-seed", type=int, default=HELD_OUT_SEEDS.start)
    p.add_argument("--device", default="cpu")
    p.add_argument("--classes-only", action="store_true", help="image-level tags only, on balanced phantoms")
    p.add_argument("--out", type=Path, help="write per-case metrics and the summary as JSON")
    a = p.parse_args(argv)
    if not HELD_OUT_SEEDS.start <= a.first_seed and a.first_seed + a.cases <= HELD_OUT_SEEDS.stop:
        p.error(f"seeds must lie in the held-out range {HELD_OUT_SEEDS.start}..{HELD_OUT_SEEDS.stop - 1}")
    if a.classes_only:
        report = evaluate_classes(a.model, a.first_seed, a.cases, a.device)
    else:
        report = evaluate(a.model, list(range(a.first_seed, a.first_seed + a.cases)), a.device)
    print(json.dumps(report["summary"], indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
