"""Classifier networks trained from case-level labels (config ``classifiers``; docs/training.md).

One network per task: each case's regions (classifier_input.py, the same code that labelling
runs; region tasks are boxed on the reference segmentation) are computed once and held in memory
as float16. Training draws cases class-balanced (every class equally often), augments them with
MONAI's random flips, intensity scaling/shift and noise, and scores the validation cases after
every epoch: ROC AUC (binary: of the second class; several classes: the mean one-vs-rest AUC)
picks the best epoch and stops the run after ``patience`` epochs without a better one. Finally
one temperature is fitted on the validation cases (the value that minimises their negative
log-likelihood, found on a grid of 400 values from 0.25 to 20: one parameter needs no optimiser)
and written to the card, so the reported probabilities are calibrated.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from medautolabel.catalog.modelcard import ClassificationTask, ModelCard
from medautolabel.evaluation.metrics import expected_calibration_error, roc_auc
from medautolabel.image import Image
from medautolabel.labelling.classifier_input import classifier_inputs
from medautolabel.labelling.classify import calibrated, combine
from medautolabel.runtime.device import float32_arithmetic
from medautolabel.runtime.network import build_from_spec, first_output
from medautolabel.training.config import ClassifierTraining, ConfigError

LogFn = Callable[[str], None]
# Not below 0.25: on validation cases the model happens to separate perfectly the likelihood keeps
# rising as the temperature falls, which would make every later answer nearly 0 or 1.
TEMPERATURES = np.exp(np.linspace(math.log(0.25), math.log(20.0), 400))


@dataclass
class ClassifierCase:
    """One case's classifier inputs and its class (index into the task's classes)."""

    regions: torch.Tensor  # (R, C, *shape) float16; R = 0 when the case has no region (empty segment)
    target: int


@dataclass
class ClassifierResult:
    task: Dict[str, Any]  # the card's classification entry (weights sha256 filled in at export)
    state: Dict[str, torch.Tensor]
    metrics: Dict[str, Any] = field(default_factory=dict)


def complete_parameters(architecture: str, parameters: Dict[str, Any], in_channels: int,
                        outputs: int) -> Dict[str, Any]:
    """The MONAI constructor arguments with the channel counts and ``spatial_dims`` filled in."""
    p = dict(parameters)
    p["spatial_dims"] = 3
    if architecture == "ResNet":
        p.update(n_input_channels=in_channels, num_classes=outputs)
    elif architecture == "DenseNet121":
        p.update(in_channels=in_channels, out_channels=outputs)
    elif architecture in ("SEResNet50", "EfficientNetBN"):
        p.update(in_channels=in_channels, num_classes=outputs, pretrained=False)
    else:
        raise ConfigError(f"classifier architecture {architecture!r} cannot be trained here (expected ResNet, "
                          "DenseNet121, SEResNet50 or EfficientNetBN)")
    return p


def task_entry(spec: ClassifierTraining, classes: Sequence[str], card: Dict[str, Any]) -> Dict[str, Any]:
    """The card's ``classification`` entry for a classifier about to be trained (temperature 1 until fitted)."""
    channels = spec.input.get("channels") or card["input"]["channels"]
    return {
        "task": spec.task, "classes": list(classes), "method": "network", "activation": "softmax",
        "network": {"architecture": spec.architecture,
                    "parameters": complete_parameters(spec.architecture, spec.parameters, len(channels), len(classes)),
                    "weights": f"classifier-{spec.task}.pt"},
        "input": copy.deepcopy(spec.input), "temperature": 1.0, "validated": True,
    }


def build_cases(cases: Iterable[Tuple[Image, Optional[Image], int]], total: int, card: ModelCard,
                task: ClassificationTask, say: LogFn) -> List[ClassifierCase]:
    """Each (image, reference labelmap in the card's label values or None, class index) -> its regions.

    ``cases`` may be a generator: one image is in memory at a time, only the small inputs are kept."""
    out = []
    t0 = time.perf_counter()
    for n, (image, labelmap, target) in enumerate(cases):
        regions = classifier_inputs(image, labelmap, card, task)
        stacked = torch.stack([r.tensor for r in regions]).half() if regions else torch.zeros(
            (0, len(task.input.channels or card.input), *task.input.shape), dtype=torch.float16)
        out.append(ClassifierCase(stacked, target))
        if (n + 1) % 50 == 0 or n + 1 == total:
            say(f"classifier inputs for {task.task!r}: {n + 1}/{total} cases ({time.perf_counter() - t0:.0f} s)")
    return out


def _augment(spec: ClassifierTraining, seed: int):
    """MONAI's random transforms for one classifier input (C, *shape)."""
    from monai.transforms import Compose, RandFlip, RandGaussianNoise, RandScaleIntensity, RandShiftIntensity

    steps: List[Any] = []
    if spec.flip:
        steps += [RandFlip(prob=0.5, spatial_axis=a) for a in range(3)]
    if spec.intensity_scale > 0:
        steps.append(RandScaleIntensity(factors=spec.intensity_scale, prob=0.5))
    if spec.intensity_shift > 0:
        steps.append(RandShiftIntensity(offsets=spec.intensity_shift, prob=0.5))
    if spec.noise_std > 0:
        steps.append(RandGaussianNoise(prob=0.2, std=spec.noise_std))
    chain = Compose(steps)
    chain.set_random_state(seed=seed % 2**32)
    return chain


def case_probabilities(logits: torch.Tensor, counts: Sequence[int], task: ClassificationTask,
                       temperature: float = 1.0) -> torch.Tensor:
    """(cases, classes) probabilities from the logits of every case's regions, calibrated and combined
    exactly as labelling does (``classify.calibrated`` and ``classify.combine``).

    One softmax over every region, and a Python step only for cases without or with several regions
    (``fit_temperature`` calls this for each of its 400 temperatures).
    """
    every = calibrated(task, logits, temperature)
    if all(n == 1 for n in counts):  # whole image or one segment: a case's row is its region's
        return every
    rows = []
    start = 0
    for n in counts:
        rows.append(combine(task, every[start:start + n]))
        start += n
    return torch.stack(rows)


def _forward(net: torch.nn.Module, cases: Sequence[ClassifierCase], device: torch.device,
             transform: Optional[Callable] = None) -> Tuple[torch.Tensor, List[int]]:
    chunks = [c.regions for c in cases if c.regions.shape[0]]
    counts = [int(c.regions.shape[0]) for c in cases]
    if not chunks:
        return torch.zeros((0, 1), device=device), counts
    x = torch.cat(chunks).float()
    if transform is not None:
        x = torch.stack([_plain(transform(v)) for v in x])
    return first_output(net(x.to(device))).float(), counts


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def auc_of(probabilities: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> float:
    """Binary: AUC of the second class; several classes: the mean one-vs-rest AUC of those present."""
    if len(classes) == 2:
        return roc_auc(targets == 1, probabilities[:, 1])
    values = [roc_auc(targets == k, probabilities[:, k]) for k in range(len(classes))]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def predict_logits(net: torch.nn.Module, cases: Sequence[ClassifierCase], device: torch.device,
                   batch: int = 8) -> Tuple[torch.Tensor, List[int]]:
    """Every case's region logits (concatenated) and region counts, in evaluation mode, float32."""
    was = net.training
    net.eval()
    outs, counts = [], []
    with float32_arithmetic():
        for start in range(0, len(cases), batch):
            logits, n = _forward(net, cases[start:start + batch], device)
            if logits.shape[0]:  # a chunk of cases without regions has no logits (and a placeholder shape)
                outs.append(logits.cpu())
            counts += n
    net.train(was)
    return torch.cat(outs) if outs else torch.zeros((0, 1)), counts


def fit_temperature(logits: torch.Tensor, counts: Sequence[int], targets: np.ndarray,
                    task: ClassificationTask) -> float:
    """The temperature minimising the validation cases' negative log-likelihood (grid search, 0.25..20)."""
    best, best_nll = 1.0, math.inf
    t = torch.as_tensor(targets, dtype=torch.long)
    for temperature in TEMPERATURES:
        probs = case_probabilities(logits, counts, task, float(temperature))
        nll = float(-torch.log(probs[torch.arange(len(t)), t].clamp_min(1e-12)).mean())
        if nll < best_nll - 1e-12:
            best, best_nll = float(temperature), nll
    return round(best, 4)


def scores(logits: torch.Tensor, counts: Sequence[int], targets: np.ndarray, task: ClassificationTask,
           temperature: float = 1.0) -> Dict[str, float]:
    """Validation numbers: AUC, accuracy, NLL and ECE (of the predicted class's probability)."""
    probs = case_probabilities(logits, counts, task, temperature).numpy().astype(np.float64)
    predicted = probs.argmax(axis=1)
    top = probs[np.arange(len(targets)), predicted]
    nll = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    return {"roc_auc": auc_of(probs, targets, task.classes), "accuracy": float(np.mean(predicted == targets)),
            "nll": nll, "ece": expected_calibration_error(predicted == targets, top)}


def train_classifier(spec: ClassifierTraining, task: ClassificationTask, train_cases: List[ClassifierCase],
                     val_cases: List[ClassifierCase], device: torch.device, seed: int, say: LogFn,
                     cancel: Optional[Callable[[], bool]] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Train one classifier; returns the best epoch's weights and the validation metrics (temperature fitted)."""
    from medautolabel.errors import Cancelled

    torch.manual_seed(seed)
    net = build_from_spec(task.network, None, f"classifiers[{spec.task}]").to(device)
    targets = np.array([c.target for c in train_cases])
    counts = np.bincount(targets, minlength=len(task.classes)).astype(np.float64)
    weights = 1.0 / counts[targets] if spec.balanced else np.ones(len(targets))
    its = spec.iterations_per_epoch or max(1, math.ceil(len(train_cases) / spec.batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    total = spec.epochs * its
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(1.0, i / total))))
    rng = np.random.default_rng(seed)
    transform = _augment(spec, seed)
    val_targets = np.array([c.target for c in val_cases])
    best: Optional[Dict[str, torch.Tensor]] = None
    best_key, best_epoch, bad, history = (-math.inf, -math.inf), 0, 0, []
    t0 = time.perf_counter()
    for epoch in range(spec.epochs):
        net.train()
        losses = []
        for _ in range(its):
            if cancel is not None and cancel():
                raise Cancelled()
            pick = rng.choice(len(train_cases), size=spec.batch_size, replace=True, p=weights / weights.sum())
            batch = [train_cases[i] for i in pick]
            with float32_arithmetic():
                logits, n = _forward(net, batch, device, transform)
                probs = case_probabilities(logits, n, task)
                t = torch.as_tensor([c.target for c in batch], device=device)
                loss = -torch.log(probs[torch.arange(len(batch)), t].clamp_min(1e-7)).mean()
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:  # else every case drawn has no region (empty segment): nothing to learn
                    loss.backward()
            if loss.requires_grad:
                opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        logits, n = predict_logits(net, val_cases, device)
        val = scores(logits, n, val_targets, task) if len(val_cases) else {"roc_auc": float("nan"), "nll": 0.0}
        auc = val["roc_auc"] if not np.isnan(val["roc_auc"]) else -1.0
        key = (round(auc, 6), -val["nll"])
        row = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 5),
               **{f"val_{k}": round(float(v), 5) for k, v in val.items()}}
        history.append(row)
        say(f"classifier {spec.task!r} epoch {epoch + 1}/{spec.epochs}: loss {row['loss']:.4f}, "
            f"validation AUC {auc:.3f}, NLL {val['nll']:.3f} ({time.perf_counter() - t0:.0f} s)")
        if key > best_key:
            best_key, best_epoch, bad = key, epoch + 1, 0
            best = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if spec.patience and bad >= spec.patience:
                say(f"classifier {spec.task!r}: no better validation AUC for {bad} epochs: stopping")
                break
    assert best is not None
    net.load_state_dict(best)
    metrics: Dict[str, Any] = {"best_epoch": best_epoch, "epochs_run": len(history),
                               "training_cases": len(train_cases), "validation_cases": len(val_cases),
                               "seconds": round(time.perf_counter() - t0, 1), "history": history}
    if len(val_cases):
        logits, n = predict_logits(net, val_cases, device)
        before = scores(logits, n, val_targets, task)
        temperature = fit_temperature(logits, n, val_targets, task) if spec.temperature_scaling else 1.0
        after = scores(logits, n, val_targets, task, temperature)
        metrics.update(temperature=temperature, validation_before_scaling=before, validation=after)
    return best, metrics
