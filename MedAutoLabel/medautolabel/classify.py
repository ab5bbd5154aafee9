"""Image-level classification from the network's evidence channels (model card ``classification``)."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from scipy import ndimage

from .modelcard import ClassificationTask, ModelCard
from .preprocess import Prepared
from .result import Classification


def voxel_evidence(logits: torch.Tensor, task: ClassificationTask, spacing_mm) -> float:
    """P(present): the max over voxels of the task channel's sigmoid, Gaussian-smoothed by ``smoothing_mm``.

    Smoothing first makes one isolated hot voxel weigh less than a coherent finding.
    """
    evidence = torch.sigmoid(logits[task.channel]).numpy()
    if task.smoothing_mm > 0:
        sigma = [task.smoothing_mm / float(s) for s in spacing_mm]
        evidence = ndimage.gaussian_filter(evidence, sigma=sigma, mode="nearest", truncate=3.0)
    return float(np.clip(evidence.max(), 0.0, 1.0)) if evidence.size else 0.0


def classify(logits: torch.Tensor, prepared: Prepared, card: ModelCard,
             low_confidence_threshold: Optional[float] = None) -> List[Classification]:
    """One Classification per card task (``logits``: (C, *spatial) on the network grid; left unchanged)."""
    threshold = card.low_confidence_threshold if low_confidence_threshold is None else low_confidence_threshold
    out = []
    for task in card.classification:
        present = voxel_evidence(logits, task, prepared.tensor_spacing)
        absent_name, present_name = task.classes
        probs = {absent_name: 1.0 - present, present_name: present}
        label = present_name if present > 0.5 else absent_name
        out.append(Classification(task=task.task, label=label, probability=probs[label], probabilities=probs,
                                  low_confidence=probs[label] < threshold))
    return out
