"""``medautolabel demo``: one held-out phantom through the built-in model, scored against its reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.catalog.registry import resolve_model
from medautolabel.errors import MedAutoLabelError
from medautolabel.evaluation.metrics import dice
from medautolabel.io.atomic import make_folder
from medautolabel.io.ownership import check_new_folder, is_ours
from medautolabel.result import Result, SegmentInfo
from medautolabel.synthetic.phantoms import DEMO_SEED, HELD_OUT_SEEDS, TRAINING_SEEDS, make_phantom

DEMO_MODEL = "vessel-nerve-cta"


@dataclass
class DemoReport:
    seed: int
    files: Dict[str, Path]
    dice: Dict[str, float]  # segment name -> Dice against the phantom's reference
    aneurysm_truth: bool
    result: Result
    lines: List[str] = field(default_factory=list)  # what the command prints (and the PNG shows)


def reference_segments(card: ModelCard, labels: np.ndarray, voxel_mm3: float) -> List[SegmentInfo]:
    """The model's segments (names, colours, terminology) with the reference's voxel counts."""
    out = []
    for lab in card.labels:
        count = int((labels == lab.value).sum())
        out.append(SegmentInfo(label_value=lab.value, name=lab.name, color=tuple(lab.color), terminology=lab.terminology,
                               voxel_count=count, volume_ml=count * voxel_mm3 / 1000.0, mean_confidence=1.0))
    return out


DEMO_FILES = ("phantom.nrrd", "phantom-reference.seg.nrrd", "phantom.seg.nrrd", "phantom.tags.json", "phantom.png")


def check_demo_folder(out: Path) -> None:
    """Refuse ``out`` unless it is new, empty, or an earlier demo's folder (its ``phantom.tags.json`` is ours).

    In an earlier demo's folder only the five demo files are replaced; anything else there stays.
    """
    if is_ours(out / "phantom.tags.json"):
        for name in DEMO_FILES:
            if (out / name).is_dir():
                raise MedAutoLabelError("is a folder, not a file", out / name)
        return
    check_new_folder(out, [])


def run_demo(out_dir: Union[str, Path], device: str = "auto", seed: int = DEMO_SEED,
             model: Union[str, Path, ModelCard] = DEMO_MODEL, progress=None) -> DemoReport:
    """Make the phantom of ``seed``, label it, write the five demo files into ``out_dir`` and score it."""
    from medautolabel.io.images import write_image
    from medautolabel.io.outputs import write_result
    from medautolabel.io.render import overview_png
    from medautolabel.io.segnrrd import write_seg_nrrd
    from medautolabel.labelling.pipeline import label_image

    if seed in TRAINING_SEEDS:
        raise ValueError(f"seed {seed} is a training seed; the demo must use a held-out one")
    out = Path(out_dir)
    check_demo_folder(out)
    make_folder(out)
    card = resolve_model(model)
    ph = make_phantom(seed)
    voxel_mm3 = float(abs(np.linalg.det(ph.image.ijk_to_ras[:3, :3])))
    files = {"image": out / "phantom.nrrd", "reference": out / "phantom-reference.seg.nrrd"}
    write_image(ph.image, files["image"])
    # the phantom's label values are the built-in model's labels; a classification-only model has none
    named_by = card if card.labels else resolve_model(DEMO_MODEL)
    write_seg_nrrd(ph.labels, reference_segments(named_by, ph.labels.array, voxel_mm3), files["reference"])

    result = label_image(ph.image, card, device=device, progress=progress)
    seg, tags = write_result(result, out, "phantom", "seg.nrrd")
    files.update(segmentation=seg, tags=tags)

    scores = {s.name: dice(result.labelmap.array == s.label_value, ph.labels.array == s.label_value)
              for s in result.segments}
    where = "held-out" if seed in HELD_OUT_SEEDS else "outside the training seeds"
    lines = [f"phantom seed {seed} ({where}), model {card.id} {card.version} on {result.provenance.get('device', device)}"]
    for s in result.segments:
        flag = "  LOW CONFIDENCE" if s.low_confidence else ""
        lines.append(f"{s.name}: Dice {scores[s.name]:.3f} against the reference; {s.volume_ml:.2f} mL, "
                     f"mean confidence {s.mean_confidence:.2f}{flag}")
    for c in result.classifications:
        truth = ("present" if ph.aneurysm else "absent") if c.task == "aneurysm" else "?"
        lines.append(f"{c.task}: {c.label}, p={c.probability:.2f}{'' if c.validated else ' NOT VALIDATED'} "
                     f"(truth: {truth})")
    files["png"] = overview_png(ph.image, result.labelmap, {s.label_value: s.color for s in result.segments}, lines,
                                out / "phantom.png")
    return DemoReport(seed, files, scores, bool(ph.aneurysm), result, lines)

