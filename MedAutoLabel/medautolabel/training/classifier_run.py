"""The classifier phase of ``medautolabel train``: case labels -> classifier networks in the model folder.

It runs after segmentation training (the model it wrote gets its classifiers), or instead of it:
for a dataset without masks (a classification-only model) and for ``train_segmentation: false``
with ``--from MODEL`` (the base model's segmentation network is kept as it is and classifiers are
trained for it, which is how the built-in model's aneurysm classifier is made). Cases are split
stratified by class (scikit-learn), fixed by the seed; a dataset's own validation list is used
when it has one.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import ModelError
from medautolabel.image import Image
from medautolabel.training.classifier import build_cases, task_entry, train_classifier
from medautolabel.training.config import ClassifierTraining, ConfigError, TrainConfig
from medautolabel.training.data import Case, Dataset, read_image

LogFn = Callable[[str], None]


def stratified_split(cases: Sequence[Case], task: str, classes: Sequence[str], fraction: float,
                     seed: int, where: Optional[Path] = None) -> Tuple[List[Case], List[Case]]:
    """(training, validation) with every class in the same proportion in both (scikit-learn), fixed by ``seed``.

    ``where`` (the case labels' file) is named when the classes have too few cases to split."""
    from sklearn.model_selection import train_test_split

    y = [list(classes).index(c.classes[task]) for c in cases]
    counts = np.bincount(y, minlength=len(classes))
    for name, n in zip(classes, counts):
        if n < 2:
            raise ConfigError(f"task {task!r}: class {name!r} has {n} case(s); a stratified split needs at least 2",
                              where)
    n_val = max(len(classes), int(round(fraction * len(cases))))
    if n_val >= len(cases) - len(classes) + 1:
        raise ConfigError(f"task {task!r}: {len(cases)} labelled cases are too few to hold out "
                          f"{n_val} for validation", where)
    train, val = train_test_split(list(cases), test_size=n_val, random_state=seed % 2**32, stratify=y)
    return sorted(train, key=lambda c: c.index), sorted(val, key=lambda c: c.index)


def classifier_plan(dataset: Dataset, specs: Sequence[ClassifierTraining], segmentation: bool,
                    config_path: Optional[Path] = None) -> List[ClassifierTraining]:
    """The classifiers a run trains: the config's ``classifiers`` (each must name a task of the case labels) and,
    when no segmentation network is trained, the default classifier for every other task.

    With segmentation, a task without an entry is read from the network's evidence channel
    (``voxel_evidence``), which tells two classes apart: a task of more classes must have an entry.
    """
    for n, spec in enumerate(specs):
        if spec.task not in dataset.classes:
            source = f"{dataset.class_file.name} " if dataset.class_file else ""
            raise ConfigError(f"key 'classifiers[{n}].task': task {spec.task!r} has no case labels in the dataset "
                              f"({source}tasks: {', '.join(map(repr, dataset.classes)) or 'none'})", config_path)
    listed = {s.task for s in specs}
    if segmentation:
        for task, classes in dataset.classes.items():
            if task not in listed and len(classes) > 2:
                raise ConfigError(f"task {task!r} has {len(classes)} classes, but the segmentation network's evidence "
                                  "channel (voxel_evidence) tells two apart: give the task a 'classifiers' entry in "
                                  "the config", dataset.class_file)
        return list(specs)
    out = list(specs) + [ClassifierTraining(task=t) for t in dataset.classes if t not in listed]
    if not out:
        raise ConfigError("nothing to train: the dataset has no masks and no case labels (labels.csv or "
                          "\"classes\" in dataset.json)", dataset.root)
    return out


def _config_key(n: int, spec: ClassifierTraining, configured: int) -> str:
    """How a message names a classifier: its config entry, or the default one a task got."""
    return f"classifiers[{n}]" if n < configured else f"classifiers (the default classifier of task {spec.task!r})"


def _task_card(spec: ClassifierTraining, key: str, dataset: Dataset, card_dict: Dict[str, Any],
               config_path: Optional[Path]) -> Tuple[Dict[str, Any], List[Dict[str, Any]], ModelCard]:
    """The classifier's card entry, the card's classification list with it, and the card checked whole
    (``ModelCard.from_dict``): a bad architecture, input or parameter is refused naming the config key."""
    try:
        entry = task_entry(spec, list(dataset.classes[spec.task]), card_dict)
        tasks = [t for t in card_dict.get("classification", []) if t["task"] != spec.task] + [entry]
        card = ModelCard.from_dict(dict(card_dict, classification=tasks))
    except (ConfigError, ModelError) as e:
        raise ConfigError(f"key '{key}': {e.problem}", config_path) from None
    task = next(t for t in card.classification if t.task == spec.task)
    needy = [c for c in dataset.all_cases() if spec.task in c.classes and c.label is None]
    if task.input.needs_segment and needy:
        raise ConfigError(f"key '{key}.input.region': task {spec.task!r} looks at segment {task.input.segment!r}, "
                          f"which needs a mask for every case labelled for the task ({len(needy)} have none)",
                          config_path)
    return entry, tasks, card


def _split_for(spec: ClassifierTraining, dataset: Dataset, cfg: TrainConfig) -> Tuple[List[Case], List[Case]]:
    """The task's labelled (training, validation) cases: the datalist's own validation list, else stratified."""
    labelled = [c for c in dataset.cases if spec.task in c.classes]
    if dataset.validation is not None:
        return labelled, [c for c in dataset.validation if spec.task in c.classes]
    fraction = spec.validation_fraction or cfg.validation.fraction
    return stratified_split(labelled, spec.task, list(dataset.classes[spec.task]), fraction, cfg.seed,
                            dataset.class_file)


def check_classifiers(dataset: Dataset, cfg: TrainConfig, specs: Sequence[ClassifierTraining],
                      card_dict: Dict[str, Any], config_path: Optional[Path] = None) -> None:
    """Everything ``train_classifiers`` would refuse, checked before any work starts (the card of every
    classifier, masks for region inputs, the split of every task)."""
    for n, spec in enumerate(specs):
        _task_card(spec, _config_key(n, spec, len(cfg.classifiers)), dataset, card_dict, config_path)
        _split_for(spec, dataset, cfg)


def _reference(case: Case, card: ModelCard, dataset: Dataset) -> Optional[Image]:
    """The case's reference labelmap with the card's label values (None without a mask)."""
    if case.label is None:
        return None
    ref = read_image(case.label)
    by_name = {lab.name.lower(): lab.value for lab in card.labels}
    lut = np.zeros(int(ref.array.max()) + 1 if ref.array.size else 1, dtype=np.uint8)
    for value, name in dataset.labels.items():
        if value < lut.size and name.lower() in by_name:
            lut[value] = by_name[name.lower()]
    return Image(lut[np.clip(ref.array, 0, lut.size - 1).astype(np.int64)], ref.ijk_to_ras, dict(ref.meta))


def _inputs(cases: Sequence[Case], card: ModelCard, task, dataset: Dataset) -> Iterator[Tuple[Image, Optional[Image], int]]:
    """(image, reference labelmap or None, class index) per case, read one at a time."""
    for c in cases:
        needs_mask = task.input.needs_segment
        yield (read_image(c.image), _reference(c, card, dataset) if needs_mask else None,
               list(task.classes).index(c.classes[task.task]))


def train_classifiers(dataset: Dataset, cfg: TrainConfig, specs: Sequence[ClassifierTraining],
                      card_dict: Dict[str, Any], dev: torch.device, say: LogFn,
                      cancel: Optional[Callable[[], bool]] = None,
                      config_path: Optional[Path] = None) -> Tuple[Dict[str, Any], Dict[str, Dict]]:
    """Train every classifier of ``specs``; returns the card (classification entries added or replaced,
    temperatures fitted, validation metrics in ``metrics.classifiers``) and {weights file name: state}.

    It refuses what ``check_classifiers`` refuses (the same functions), which a run calls first."""
    card_dict = copy.deepcopy(card_dict)
    states: Dict[str, Dict[str, torch.Tensor]] = {}
    metrics: Dict[str, Any] = {}
    for n, spec in enumerate(specs):
        entry, tasks, card = _task_card(spec, _config_key(n, spec, len(cfg.classifiers)), dataset, card_dict,
                                        config_path)
        task = next(t for t in card.classification if t.task == spec.task)
        classes = list(task.classes)
        labelled = [c for c in dataset.cases if spec.task in c.classes]
        train_cases, val_cases = _split_for(spec, dataset, cfg)
        say(f"classifier {spec.task!r} ({spec.architecture}, {task.input.region}): {len(train_cases)} training and "
            f"{len(val_cases)} validation cases; classes " + ", ".join(
                f"{name} {sum(c.classes[spec.task] == name for c in labelled)}" for name in classes))
        train_data = build_cases(_inputs(train_cases, card, task, dataset), len(train_cases), card, task, say)
        val_data = build_cases(_inputs(val_cases, card, task, dataset), len(val_cases), card, task, say)
        state, task_metrics = train_classifier(spec, task, train_data, val_data, dev, cfg.seed, say, cancel)
        entry["temperature"] = task_metrics.get("temperature", 1.0)
        states[entry["network"]["weights"]] = state
        metrics[spec.task] = task_metrics
        card_dict["classification"] = tasks
        val = task_metrics.get("validation", {})
        say(f"classifier {spec.task!r}: best epoch {task_metrics['best_epoch']}, validation AUC "
            f"{val.get('roc_auc', float('nan')):.3f}, temperature {entry['temperature']}, ECE "
            f"{task_metrics.get('validation_before_scaling', {}).get('ece', float('nan')):.3f} -> "
            f"{val.get('ece', float('nan')):.3f}")
    card_dict.setdefault("metrics", {})["classifiers"] = {
        t: {k: v for k, v in m.items() if k != "history"} for t, m in metrics.items()}
    card_dict.setdefault("provenance", {})["classifier_training"] = {
        t: {"history": m["history"]} for t, m in metrics.items()}
    return card_dict, states


def write_model_files(model_dir: Path, card: Dict[str, Any], states: Dict[str, Dict[str, torch.Tensor]],
                      copies: Dict[str, Path]) -> Path:
    """``model.json``, the weights in ``states`` (saved) and in ``copies`` (copied from another model), as one
    unit: all or none. Every network entry of the card gets its file's sha256."""
    from medautolabel.io.atomic import atomic_outputs, make_folder
    from medautolabel.runtime.network import file_sha256
    from medautolabel.training.export import _json_default

    make_folder(model_dir)
    card = copy.deepcopy(card)
    names = list(states) + [n for n in copies if n not in states]
    with atomic_outputs([model_dir / n for n in names] + [model_dir / "model.json"]) as temps:
        digests = {}
        for name, tmp in zip(names, temps):
            if name in states:
                torch.save({k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                            for k, v in states[name].items()}, tmp)
            else:
                shutil.copyfile(copies[name], tmp)
            digests[name] = file_sha256(tmp)
        networks = ([card["network"]] if card.get("network") else []) + [
            t["network"] for t in card.get("classification", []) if t.get("network")]
        for net in networks:
            if net["weights"] in digests:
                net["sha256"] = digests[net["weights"]]
        ModelCard.from_dict(card, model_dir / "model.json")
        temps[-1].write_text(json.dumps(card, indent=2, default=_json_default), encoding="utf-8")
    return model_dir / "model.json"


def classifier_only_card(cfg: TrainConfig, dataset: Dataset, base: Optional[ModelCard],
                         model_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    """The card to add classifiers to when no segmentation is trained, and the weight files it keeps.

    With a base model: the base card (its segmentation network and every classifier it has, their
    weight files copied). Without: a classification-only card (no network, no labels).
    """
    from medautolabel.training.config import default_channels
    from medautolabel.training.export import _sanitise_id

    if base is not None:
        card = base.to_dict()
        copies = {}
        if base.network is not None:
            copies[base.network.weights] = base.weights_path
        for t in base.classification:
            if t.network is not None:
                copies[t.network.weights] = base.file(t.network.weights)
        card["id"] = _sanitise_id(cfg.model.id if cfg.model.id != "my-model" else base.id)
        for key in ("name", "version", "description"):
            value = getattr(cfg.model, key)
            if value and not (key == "version" and value == "1.0.0"):
                card[key] = value
        return card, copies
    modality = (cfg.model.modality or dataset.modality or "CT").upper()
    channels = (cfg.input or {}).get("channels") or default_channels(modality)
    model_id = _sanitise_id(cfg.model.id if cfg.model.id != "my-model" else model_dir.name)
    return {
        "format": "medautolabel-model/1", "id": model_id, "name": cfg.model.name or model_id,
        "version": cfg.model.version,
        "description": cfg.model.description or f"Classifiers trained with medautolabel train on "
                                                 f"{dataset.name or 'a dataset'}",
        "modality": modality, "input": {"channels": channels}, "preprocessing": copy.deepcopy(cfg.preprocessing),
        "network": None, "labels": [], "classification": [],
        "low_confidence_threshold": cfg.model.low_confidence_threshold, "provenance": {}, "metrics": {},
    }, {}
