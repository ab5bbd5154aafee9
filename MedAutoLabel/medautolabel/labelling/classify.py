"""Image-level classification (model card ``classification``): the segmentation network's evidence
channels ("voxel_evidence") or classifier networks ("network") on the image or on boxes around a
segment (classifier_input.py), calibrated by temperature and decided by per-class thresholds."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from medautolabel.catalog.modelcard import ClassificationTask, ModelCard
from medautolabel.errors import ModelError
from medautolabel.image import Image
from medautolabel.labelling.classifier_input import Region, classifier_inputs
from medautolabel.labelling.preprocess import Prepared, in_slabs, worker_threads
from medautolabel.result import Classification
from medautolabel.runtime.device import float32_arithmetic
from medautolabel.runtime.network import first_output
from medautolabel.text import printable


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


def evidence_scores(logits: torch.Tensor, prepared: Prepared, card: ModelCard) -> Dict[str, float]:
    """{task: probability of its second class} for the card's "voxel_evidence" tasks (logits unchanged)."""
    return {t.task: voxel_evidence(logits, t, prepared.tensor_spacing) for t in card.classification
            if t.method == "voxel_evidence"}


def decide(task: ClassificationTask, probabilities: Dict[str, float]) -> str:
    """The class a task reports for mutually exclusive ``probabilities`` (every class of the task).

    The most probable of the classes whose ``thresholds`` entry is reached; when none is reached,
    the most probable class without a threshold (all classes have one: the most probable overall).
    Without thresholds this is the most probable class; a binary task with ``{"present": 0.3}``
    says "present" from 0.3 up.
    """
    reached = [c for c in task.classes if c in task.thresholds and probabilities[c] >= task.thresholds[c]]
    pool = reached or [c for c in task.classes if c not in task.thresholds] or list(task.classes)
    return max(pool, key=lambda c: (probabilities[c], -task.classes.index(c)))


def _tag(task: ClassificationTask, name: str, probabilities: Dict[str, float], label: str,
         threshold: float) -> Classification:
    p = float(probabilities[label])
    return Classification(task=name, label=label, probability=p, probabilities=dict(probabilities),
                          low_confidence=p < threshold, method=task.method, validated=task.validated)


def calibrated(task: ClassificationTask, logits: torch.Tensor, temperature: Optional[float] = None) -> torch.Tensor:
    """(regions, classes) probabilities: the logits divided by the temperature (the task's, unless given),
    then softmax or sigmoid. Training calls it with trial temperatures while fitting one."""
    scaled = logits / float(task.temperature if temperature is None else temperature)
    return torch.softmax(scaled, dim=1) if task.activation == "softmax" else torch.sigmoid(scaled)


def network_probabilities(task: ClassificationTask, regions: Sequence[Region], network: torch.nn.Module,
                          device: torch.device) -> torch.Tensor:
    """(regions, classes) calibrated probabilities of the task's network on ``regions`` (float32, CPU)."""
    batch = torch.stack([r.tensor for r in regions]).to(device)
    with torch.inference_mode(), float32_arithmetic():
        logits = first_output(network(batch)).float().reshape(len(regions), -1)
    if logits.shape[1] != len(task.classes):
        raise ModelError(f"classifier {printable(task.task)!r} gives {logits.shape[1]} outputs for "
                         f"{len(task.classes)} classes", None)
    return calibrated(task, logits).cpu()


def combine(task: ClassificationTask, probabilities: torch.Tensor) -> torch.Tensor:
    """One probability row from a (regions, classes) tensor: their mean, or (``max``) the most abnormal region's row.

    For softmax "most abnormal" is the region least likely to be the first class (e.g. "absent"),
    so that one component with a finding makes the image's finding; for sigmoid each finding
    takes its maximum over the regions. No region at all (an absent segment): nothing to
    classify, so softmax says the first class with probability 1 and sigmoid no finding. Training
    combines the same way (``training/classifier.py``), its gradient flowing through the row chosen.
    """
    if probabilities.shape[0] == 0:
        row = torch.zeros(len(task.classes), dtype=probabilities.dtype, device=probabilities.device)
        if task.activation == "softmax":
            row[0] = 1.0
        return row
    if task.input.combine == "mean":
        return probabilities.mean(dim=0)
    if task.activation == "sigmoid":
        return probabilities.max(dim=0).values
    return probabilities[int(torch.argmin(probabilities[:, 0].detach()))]


def classify(card: ModelCard, image: Image, labelmap: Optional[Image], device: torch.device,
             evidence: Optional[Dict[str, float]] = None, low_confidence_threshold: Optional[float] = None,
             networks: Optional[Callable[[ClassificationTask], torch.nn.Module]] = None) -> List[Classification]:
    """One Classification per card task (per finding for sigmoid tasks), in the card's order.

    ``evidence``: ``evidence_scores`` of the segmentation run (voxel_evidence tasks). Network tasks
    look at ``image`` (and ``labelmap``, the model's segmentation on the image's grid, for region
    tasks); ``networks(task)`` gives a task's loaded network (default: ``runtime.network.load_classifier``).
    A region task whose segment is absent reports its first class with probability 1 (nothing to
    classify). A sigmoid task gives one tag per class, named "<task>/<class>", with classes
    absent/present.
    """
    from medautolabel.runtime.network import load_classifier

    threshold = card.low_confidence_threshold if low_confidence_threshold is None else low_confidence_threshold
    out: List[Classification] = []
    for task in card.classification:
        if task.method == "voxel_evidence":
            present = float((evidence or {})[task.task])
            probs = {task.classes[0]: 1.0 - present, task.classes[1]: present}
            out.append(_tag(task, task.task, probs, decide(task, probs), threshold))
            continue
        regions = classifier_inputs(image, labelmap, card, task)
        probs = torch.zeros((0, len(task.classes)))
        if regions:
            net = networks(task) if networks is not None else load_classifier(card, task, device)
            probs = network_probabilities(task, regions, net, device)
        out += tags(task, combine(task, probs).double().tolist(), threshold)
    return out


def tags(task: ClassificationTask, row: Sequence[float], threshold: float) -> List[Classification]:
    """The Classification(s) one probability row over ``task.classes`` makes (classifier networks, bundles).

    Softmax: one tag named ``task.task`` whose label ``decide`` picks. Sigmoid: each class an
    independent finding, one tag per class named "<task>/<class>" with classes absent/present,
    "present" from the class's threshold (default 0.5). ``threshold``: below it a tag is low-confidence.
    """
    if task.activation == "softmax":
        probs = {c: float(p) for c, p in zip(task.classes, row)}
        return [_tag(task, task.task, probs, decide(task, probs), threshold)]
    out = []
    for cls, p in zip(task.classes, row):
        probs = {"absent": 1.0 - float(p), "present": float(p)}
        cut = task.thresholds.get(cls, 0.5)
        out.append(_tag(task, f"{task.task}/{cls}", probs, "present" if p >= cut else "absent", threshold))
    return out
