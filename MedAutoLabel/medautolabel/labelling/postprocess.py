"""Network output -> labelmap on the input's own grid, cleaned up, with per-segment facts.

Probabilities are computed on the network grid, resampled (linear) one channel at a time onto the
crop box of the input grid, and reduced at once to the winning channel and its probability, so the
input grid never holds more than two float32 volumes. Outside the crop box is background.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
from scipy import ndimage

from medautolabel.catalog.modelcard import LabelSpec, ModelCard
from medautolabel.image import Image
from medautolabel.labelling.preprocess import Prepared, to_input_grid
from medautolabel.result import SegmentInfo


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0, in place (torch.softmax would allocate a second full-size volume)."""
    logits.sub_(logits.amax(dim=0, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=0, keepdim=True))
    return logits


def winning_labels(logits: torch.Tensor, prepared: Prepared, card: ModelCard) -> Tuple[np.ndarray, np.ndarray]:
    """Label values (uint8) and winning-class probability (float32) on the input grid's crop box.

    ``logits`` is the (C, *spatial) network output on the network grid; its segmentation channels
    are overwritten with probabilities.
    """
    seg = card.segmentation
    shape = prepared.crop_shape
    best = np.empty(shape, np.float32)
    winner = np.zeros(shape, np.uint8)  # label value (0 = background)
    p = np.empty(shape, np.float32)
    if seg.activation == "softmax":
        probs = softmax_(logits[: seg.channels])
        values = {lab.channel: lab.value for lab in card.labels}
        to_input_grid(probs[0].numpy(), prepared, output=best)
        for ch in range(1, seg.channels):
            to_input_grid(probs[ch].numpy(), prepared, output=p)
            better = p > best
            np.copyto(best, p, where=better)
            winner[better] = values.get(ch, 0)  # a softmax channel without a label counts as background
        return winner, best
    # sigmoid: independent labels; a voxel takes the most probable label above 0.5, else background
    best.fill(0.5)
    top = np.zeros(shape, np.float32)
    for lab in card.labels:
        probs = torch.sigmoid_(logits[lab.channel])
        to_input_grid(probs.numpy(), prepared, output=p)
        np.maximum(top, p, out=top)
        better = p > best
        np.copyto(best, p, where=better)
        winner[better] = lab.value
    background = winner == 0
    best[background] = 1.0 - top[background]
    return winner, best


def clean_up(labels: np.ndarray, card: ModelCard, voxel_mm3: float) -> None:
    """Per label, in place: drop components under ``min_size_mm3``; keep the largest if asked."""
    structure = ndimage.generate_binary_structure(3, 3)  # 26-connectivity, as MONAI's default
    for lab in card.labels:
        pp = lab.postprocessing
        if pp.min_size_mm3 <= 0 and not pp.largest_component:
            continue
        mask = labels == lab.value
        components, n = ndimage.label(mask, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        drop = sizes * voxel_mm3 < pp.min_size_mm3
        if pp.largest_component:
            keep_id = int(np.argmax(sizes[1:])) + 1
            drop[:] = True
            drop[keep_id] = False
        drop[0] = False
        if drop[1:].any():
            labels[drop[components]] = 0


def segment_facts(labels: np.ndarray, confidence: np.ndarray, card: ModelCard, voxel_ml: float,
                  threshold: float) -> List[SegmentInfo]:
    """SegmentInfo per card label: voxel count, volume, mean winning-class probability, low-confidence flag."""
    out = []
    for lab in card.labels:
        mask = labels == lab.value
        count = int(np.count_nonzero(mask))
        mean = float(confidence[mask].mean(dtype=np.float64)) if count else 0.0
        out.append(_segment(lab, count, count * voxel_ml, mean, bool(count and mean < threshold)))
    return out


def _segment(lab: LabelSpec, count: int, volume_ml: float, mean: float, low: bool) -> SegmentInfo:
    return SegmentInfo(label_value=lab.value, name=lab.name, color=tuple(lab.color), terminology=lab.terminology,
                       voxel_count=count, volume_ml=volume_ml, mean_confidence=mean, low_confidence=low)


def postprocess(logits: torch.Tensor, prepared: Prepared, card: ModelCard, clean: bool = True,
                low_confidence_threshold: Optional[float] = None) -> Tuple[Image, List[SegmentInfo]]:
    """The uint8 labelmap on the input grid (card label values) and its segments' facts."""
    voxel_ml = Image(np.zeros((1, 1, 1), np.uint8), prepared.input_ijk_to_ras).voxel_volume_ml
    with torch.inference_mode():  # the in-place activations must not touch autograd state
        labels, confidence = winning_labels(logits, prepared, card)
    if clean:
        clean_up(labels, card, voxel_ml * 1000.0)
    threshold = card.low_confidence_threshold if low_confidence_threshold is None else low_confidence_threshold
    segments = segment_facts(labels, confidence, card, voxel_ml, threshold)
    full = np.zeros(prepared.input_shape, np.uint8)
    full[prepared.crop] = labels
    return Image(full, prepared.input_ijk_to_ras.copy(), {}), segments
