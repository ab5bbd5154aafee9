"""The output model folder: plan the model card (labels, channels, classes), grow a base model's
output layer, and write ``model.json`` + ``model.pt`` atomically.

Channel layout of a trained model: softmax channels 0 (background) .. S-1, one per label, then
one sigmoid evidence channel per classification task (``voxel_evidence`` in the card).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.training.config import ConfigError, TrainConfig, default_channels
from medautolabel.training.data import Dataset

_STRUCTURE = {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"}
_TISSUE = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}
_ALTERED = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"}
# SNOMED-CT codes for common label names (lower case); other names get the generic "Tissue"
KNOWN_TYPES = {
    "vessel": ("59820001", "Blood vessel", [0.85, 0.25, 0.2]),
    "blood vessel": ("59820001", "Blood vessel", [0.85, 0.25, 0.2]),
    "artery": ("51114001", "Artery", [0.85, 0.2, 0.2]),
    "vein": ("29092000", "Vein", [0.2, 0.35, 0.85]),
    "nerve": ("3057000", "Nerve", [0.95, 0.85, 0.3]),
    "bone": ("272673000", "Bone", [0.95, 0.92, 0.85]),
    "liver": ("10200004", "Liver", [0.86, 0.55, 0.45]),
    "kidney": ("64033007", "Kidney", [0.73, 0.45, 0.35]),
    "spleen": ("78961009", "Spleen", [0.62, 0.3, 0.35]),
    "lung": ("39607008", "Lung", [0.77, 0.85, 0.95]),
    "heart": ("80891009", "Heart", [0.8, 0.3, 0.3]),
    "brain": ("12738006", "Brain", [0.98, 0.82, 0.75]),
}
_NEOPLASM = ("108369006", "Neoplasm", [0.55, 0.85, 0.4])
PALETTE = [[0.5, 0.68, 0.5], [0.95, 0.5, 0.1], [0.45, 0.35, 0.8], [0.2, 0.7, 0.75], [0.9, 0.45, 0.65],
           [0.6, 0.6, 0.2], [0.35, 0.55, 0.9], [0.8, 0.55, 0.35]]


@dataclass
class Plan:
    """What the trained network outputs and how dataset labels map onto it."""

    card: Dict[str, Any]  # model.json content (weights sha256 filled in at export)
    lut: np.ndarray  # dataset label value -> softmax channel (0: background)
    softmax_channels: int
    task_channels: Dict[str, int]  # classification task -> evidence channel
    label_names: List[str]  # softmax channel 1.. names, in order
    # base model channel for each new output channel (None: freshly initialised), when fine-tuning
    channel_map: Optional[List[Optional[int]]] = None
    warnings: List[str] = field(default_factory=list)


def _default_label(name: str, value: int, n: int) -> Dict[str, Any]:
    key = name.strip().lower()
    if key in KNOWN_TYPES:
        code, meaning, color = KNOWN_TYPES[key]
        category = _STRUCTURE
    elif any(w in key for w in ("tumor", "tumour", "lesion", "neoplasm", "cancer")):
        (code, meaning, color), category = _NEOPLASM, _ALTERED
    else:
        code, meaning, color, category = _TISSUE["value"], "Tissue", PALETTE[n % len(PALETTE)], _TISSUE
    return {"value": value, "name": name, "color": list(color),
            "terminology": {"category": dict(category), "type": {"scheme": "SCT", "value": code, "meaning": meaning}},
            "postprocessing": {"min_size_mm3": 0.0, "largest_component": False}}


def _sanitise_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "my-model"


def plan_model(cfg: TrainConfig, dataset: Dataset, base: Optional[ModelCard], model_dir: Path) -> Plan:
    """Assemble the output card: labels from the config/dataset/base model, channels, classes."""
    from medautolabel.training.config import classifier_specs

    notes: List[str] = []
    trained_apart = {spec.task for spec in classifier_specs(cfg)}  # tasks with a classifier network of their own
    by_name = {n.lower(): v for v, n in dataset.labels.items()}
    overrides = {str(x.get("name", "")).lower(): x for x in (cfg.labels or [])}
    for n, x in enumerate(cfg.labels or []):
        if not isinstance(x, dict) or not isinstance(x.get("name"), str):
            raise ConfigError(f"key 'labels[{n}]': expected an object with a \"name\"")
        if x["name"].lower() not in by_name:
            if not isinstance(x.get("value"), int):
                raise ConfigError(f"key 'labels[{n}]': label {x['name']!r} is not in the dataset; give its \"value\"")
            by_name[x["name"].lower()] = x["value"]
    if not by_name:
        raise ConfigError("no label names: add \"labels\" to dataset.json (e.g. {\"0\": \"background\", "
                          "\"1\": \"vessel\"}) or to the training config")
    names = {v: (dataset.labels.get(v) or next(x["name"] for x in cfg.labels or [] if x.get("value") == v))
             for v in by_name.values()}

    labels: List[Dict[str, Any]] = []
    channel_map: Optional[List[Optional[int]]] = None
    tasks: List[Dict[str, Any]] = []
    if base is not None:
        if not base.segments:
            raise ConfigError("is a classification-only model: it has no segmentation network to fine-tune "
                              "(train its classifiers with --classifiers-only)", base.path)
        base_dict = base.to_dict()
        labels = [copy.deepcopy(x) for x in base_dict["labels"]]  # keep every label of the base model
        labels.sort(key=lambda x: x["channel"])
        channel_map = [0] + [x["channel"] for x in labels]
        if base.segmentation.activation != "softmax" or [x["channel"] for x in labels] != list(
                range(1, len(labels) + 1)):
            raise ConfigError("fine-tuning needs a base model with softmax labels on channels 1..N")
        known = {x["name"].lower() for x in labels}
        for x in labels:
            if x["name"].lower() not in by_name:
                notes.append(f"label {x['name']!r} of the base model is not in the dataset: it is kept, "
                             "but its voxels in the new data count as background")
        for value, name in sorted(names.items()):
            if name.lower() not in known:
                labels.append(dict(_default_label(name, value, len(labels)), channel=len(labels) + 1))
                channel_map.append(None)
                notes.append(f"label {name!r} is new: the output layer grows by one channel")
        for t in base_dict.get("classification", []):
            if t.get("method", "voxel_evidence") != "voxel_evidence" or t["task"] in trained_apart:
                continue  # a classifier network: kept (or retrained) by the classifier phase, not a channel
            tasks.append({"task": t["task"], "classes": list(t["classes"]), "smoothing_mm": t["smoothing_mm"],
                          "base_channel": t["channel"]})
    else:
        for n, (value, name) in enumerate(sorted(names.items())):
            labels.append(dict(_default_label(name, value, n), channel=n + 1))
    for x in labels:  # the config's colours/terminology/post-processing win
        o = overrides.get(x["name"].lower())
        if o:
            x.update({k: copy.deepcopy(v) for k, v in o.items() if k != "value" or base is None})
    used_values = set()
    for x in labels:  # label values must be unique in the output labelmap
        if x["value"] in used_values:
            x["value"] = next(v for v in range(1, 256) if v not in used_values and v not in names)
        used_values.add(x["value"])
    for task, classes in dataset.classes.items():
        if task not in {t["task"] for t in tasks} and task not in trained_apart:
            tasks.append({"task": task, "classes": list(classes), "smoothing_mm": cfg.classification.smoothing_mm,
                          "base_channel": None})
    softmax = len(labels) + 1
    task_channels = {t["task"]: softmax + n for n, t in enumerate(tasks)}
    if channel_map is not None:
        channel_map += [t["base_channel"] for t in tasks]
    lut = np.zeros(max(list(names) + [0]) + 1, dtype=np.int64)
    for value, name in names.items():
        lut[value] = next(x["channel"] for x in labels if x["name"].lower() == name.lower())

    modality = (cfg.model.modality or (base.modality if base is not None else None) or dataset.modality or "CT").upper()
    if base is not None:
        base_dict = base.to_dict()
        channels = base_dict["input"]["channels"]
        pre = base_dict["preprocessing"]
        network = copy.deepcopy(base_dict["network"])
        inference = base_dict["inference"]
    else:
        channels = (cfg.input or {}).get("channels") or default_channels(modality)
        pre = copy.deepcopy(cfg.preprocessing)
        network = copy.deepcopy(cfg.network)
        roi = cfg.validation.roi_size or cfg.patch_size
        inference = {"roi_size": list(roi), "overlap": cfg.validation.overlap,
                     "sw_batch_size": cfg.validation.sw_batch_size, "blend": "gaussian"}
    network.setdefault("parameters", {})
    network["parameters"].update({"in_channels": len(channels), "out_channels": softmax + len(tasks)})
    network.update({"weights": "model.pt"})
    network.pop("sha256", None)
    card = {
        "format": "medautolabel-model/1",
        "id": _sanitise_id(cfg.model.id if cfg.model.id != "my-model" else model_dir.name),
        "name": cfg.model.name or (cfg.model.id if cfg.model.id != "my-model" else model_dir.name),
        "version": cfg.model.version,
        "description": cfg.model.description or (f"Trained with medautolabel train on {dataset.name or 'a dataset'}"),
        "modality": modality,
        "input": {"channels": channels},
        "preprocessing": pre,
        "network": network,
        "inference": inference,
        "segmentation": {"activation": "softmax", "channels": softmax},
        "labels": labels,
        "classification": [{"task": t["task"], "classes": t["classes"], "method": "voxel_evidence",
                            "channel": task_channels[t["task"]], "activation": "sigmoid",
                            "smoothing_mm": t["smoothing_mm"]} for t in tasks],
        "low_confidence_threshold": cfg.model.low_confidence_threshold,
        "provenance": {},
        "metrics": {},
    }
    ModelCard.from_dict(card, model_dir / "model.json")  # validate now, before hours of training
    return Plan(card, lut, softmax, task_channels, [x["name"] for x in labels], channel_map, notes)


def grow_state_dict(old: Dict[str, torch.Tensor], new: Dict[str, torch.Tensor],
                    channel_map: List[Optional[int]], old_out: int) -> Dict[str, torch.Tensor]:
    """Copy a base model's weights into a network with a different number of output channels.

    Tensors of equal shape are copied; a tensor whose differing dimensions are all sized
    ``old_out`` before and ``len(channel_map)`` now belongs to the output layer(s): new channel c
    takes the base model's channel ``channel_map[c]`` (None keeps the fresh initialisation).
    MONAI's networks have no generic "output layer" API, hence this shape-based rule.
    """
    out = {}
    for key, fresh in new.items():
        if key not in old:
            raise ConfigError(f"the base model's weights have no {key!r}: is it the same network?")
        src = old[key]
        if src.shape == fresh.shape:
            out[key] = src.clone()
            continue
        dims = [d for d in range(fresh.dim()) if src.dim() == fresh.dim() and src.shape[d] != fresh.shape[d]]
        if not dims or any(src.shape[d] != old_out or fresh.shape[d] != len(channel_map) for d in dims):
            raise ConfigError(f"cannot grow {key!r} from {tuple(src.shape)} to {tuple(fresh.shape)}")
        # the output channels can be on several axes (a residual unit after the last layer maps
        # out_channels -> out_channels): copy the block of kept channels on all of them at once
        new_idx = [c for c, b in enumerate(channel_map) if b is not None]
        old_idx = [channel_map[c] for c in new_idx]
        axes_new = [new_idx if d in dims else range(fresh.shape[d]) for d in range(fresh.dim())]
        axes_old = [old_idx if d in dims else range(src.shape[d]) for d in range(src.dim())]
        grown = fresh.detach().clone().numpy()
        grown[np.ix_(*axes_new)] = src.detach().cpu().numpy()[np.ix_(*axes_old)]
        if len(dims) > 1:  # no mixing between kept and new channels: kept outputs stay exactly as before
            kinds = [np.array([b is None for b in channel_map]).reshape([-1 if e == d else 1 for e in range(fresh.dim())])
                     for d in dims]
            any_new, all_new = kinds[0], kinds[0]
            for k in kinds[1:]:
                any_new, all_new = any_new | k, all_new & k
            grown[np.broadcast_to(any_new & ~all_new, grown.shape)] = 0.0
        grown = torch.from_numpy(grown)
        out[key] = grown
    return out


def state_sha256(state: Dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names and values (to compare ranks' weights)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_model(model_dir: Path, card: Dict[str, Any], state: Dict[str, torch.Tensor]) -> Path:
    """Write the weights (float32 state dict) and ``model.json`` (with their sha256) as one unit: both or neither.

    A reader never sees a card whose sha256 does not match the weights beside it.
    """
    from medautolabel.io.atomic import atomic_outputs, make_folder
    from medautolabel.runtime.network import file_sha256

    make_folder(model_dir)
    card = copy.deepcopy(card)
    with atomic_outputs([model_dir / card["network"]["weights"], model_dir / "model.json"]) as (weights, card_file):
        torch.save({k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                    for k, v in state.items()}, weights)
        card["network"]["sha256"] = file_sha256(weights)
        ModelCard.from_dict(card, model_dir / "model.json")
        card_file.write_text(json.dumps(card, indent=2, default=_json_default), encoding="utf-8")
    return model_dir / "model.json"


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
