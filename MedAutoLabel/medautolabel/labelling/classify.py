"""Image-level classification from the network's evidence channels (model card ``classification``)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from medautolabel.catalog.modelcard import ClassificationTask, ModelCard
from medautolabel.labelling.preprocess import Prepared, in_slabs, worker_threads
from medautolabel.result import Classification


def gaussian_in_threads(volume: np.ndarray, sigma: Sequence[float], threads: Optional[int] = None) -> np.ndarray:
    """``ndimage.gaussian_filter(volume, sigma, mode="nearest", truncate=3.0)`` in place, same numbers, in threads.

    The filter is separable: each axis's 1-D pass runs on slabs cut along another axis, so slabs are
    independent, and scipy releases the GIL while it filters, so the threads run at once.
    """
    n = max(1, threads or worker_threads())
    for axis in range(volume.ndim):
        cut = 1 if axis == 0 else 0

        def run(start: int, stop: int, axis: int = axis, cut: int = cut) -> None:
            part = volume[(slice(None),) * cut + (slice(start, stop),)]
            ndimage.gaussian_filter1d(part, sigma[axis], axis=axis, output=part, mode="nearest", truncate=3.0)

        in_slabs(run, volume.shape[cut], n)
    return volume


def voxel_evidence(logits: torch.Tensor, task: ClassificationTask, spacing_mm) -> float:
    """P(present): the max over voxels of the task channel's sigmoid, Gaussian-smoothed by ``smoothing_mm``.

    Smoothing first makes one isolated hot voxel weigh less than a coherent finding.
    """
    evidence = torch.sigmoid(logits[task.channel]).numpy()
    if task.smoothing_mm > 0:
        sigma = [task.smoothing_mm / float(s) for s in spacing_mm]
        evidence = gaussian_in_threads(evidence, sigma)
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
                                  low_confidence=probs[label] < threshold, method=task.method,
                                  validated=task.validated))
    return out
