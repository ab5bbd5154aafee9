"""What a classification bundle's output means: its classes, activation and task, and its tags.

A MONAI bundle is a classifier when its network gives one row of scores per image, ``(B, classes)``
(what MONAI's ``SimpleInferer`` passes on), where a segmentation bundle gives ``(B, C, X, Y, Z)``;
``bundle_runner.BundleModel`` tells them apart by that shape. The rest comes from the bundle:

- classes: ``metadata.json`` ``network_data_format.outputs.pred.channel_def`` (MONAI's convention,
  e.g. ``"type": "probabilities", "format": "classes", "num_channels": 2, "channel_def": {"0":
  "absent", "1": "present"}``), one name per output, numbered 0..N-1;
- activation: the postprocessing's ``Activationsd`` (or ``Activations``) on ``pred``, softmax
  (classes mutually exclusive) or sigmoid (each class an independent finding); without one the
  scores are no probabilities and the bundle is refused;
- task name: the sidecar's ``classification.task``, else the output's name when it is not MONAI's
  generic "pred", else metadata ``name``, else the bundle folder's name (metadata ``task`` is a
  sentence by MONAI's specification, too long for a tag name);
- thresholds and ``validated``: the sidecar's ``classification`` (``configs/medautolabel.json``),
  as in a model card; without it no thresholds and validated.

``AsDiscreted`` (argmax or threshold) in the postprocessing is left out: the decision is
``classify.tags``'s, as for the engine's own classifier networks, and needs the probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from medautolabel.catalog.modelcard import ClassificationTask
from medautolabel.errors import ModelError
from medautolabel.text import printable

METHOD = "bundle"
_SIDECAR_FIELDS = ("task", "thresholds", "validated")


def activation(transforms: Sequence[Any], key: str = "pred") -> Optional[str]:
    """"softmax" or "sigmoid": what the last ``Activationsd`` on ``key`` (or ``Activations``) applies; None: none."""
    from monai.transforms import Activations, Activationsd

    found = None
    for t in transforms:
        if isinstance(t, Activationsd) and key in t.keys:
            n = list(t.keys).index(key)
            flags = (bool(t.softmax[n]), bool(t.sigmoid[n]))
        elif isinstance(t, Activations):
            flags = (bool(t.softmax), bool(t.sigmoid))
        else:
            continue
        found = "softmax" if flags[0] else "sigmoid" if flags[1] else found
    return found


def probability_transforms(transforms: Sequence[Any]) -> List[Any]:
    """The postprocessing without its ``AsDiscreted``/``AsDiscrete``: what leaves probabilities in ``pred``."""
    from monai.transforms import AsDiscrete, AsDiscreted

    return [t for t in transforms if not isinstance(t, (AsDiscrete, AsDiscreted))]


def _output(metadata: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    if not isinstance(outputs, dict) or not outputs:
        return "pred", {}
    name = "pred" if "pred" in outputs else next(iter(outputs))
    spec = outputs[name]
    return str(name), spec if isinstance(spec, dict) else {}


def classes(metadata: Mapping[str, Any], count: int, where: Path) -> Tuple[str, ...]:
    """The class names of the output's ``channel_def``, by channel; it must name ``count`` classes 0..count-1."""
    name, spec = _output(metadata)
    channel_def = spec.get("channel_def")
    field = f"network_data_format.outputs.{printable(name)}.channel_def"
    if not isinstance(channel_def, dict) or not channel_def:
        raise ModelError(f"{field} is missing: a classification bundle must name its {count} classes", where)
    try:
        named = {int(k): printable(v).strip() for k, v in channel_def.items()}
    except (TypeError, ValueError):
        raise ModelError(f"{field} must number its classes 0, 1, ...", where) from None
    if sorted(named) != list(range(count)):
        raise ModelError(f"{field} names channels {sorted(named)}, but the network gives {count} outputs", where)
    out = tuple(named[n] for n in range(count))
    if not all(out) or len(set(out)) != len(out):
        raise ModelError(f"{field} must give each class a different, non-empty name", where)
    return out


def task_name(metadata: Mapping[str, Any], settings: Mapping[str, Any], folder: Path) -> str:
    """The tag's name: sidecar ``task``, else a non-generic output name, else metadata ``name``, else the folder's."""
    output, _ = _output(metadata)
    for candidate in (settings.get("task"), None if output == "pred" else output, metadata.get("name"), folder.name):
        text = printable(candidate).strip() if isinstance(candidate, str) else ""
        if text:
            return text
    return "classification"


def _settings(sidecar: Mapping[str, Any], where: Path) -> Dict[str, Any]:
    settings = sidecar.get("classification", {})
    if not isinstance(settings, dict):
        raise ModelError("\"classification\" must be an object", where)
    unknown = sorted(set(settings) - set(_SIDECAR_FIELDS))
    if unknown:
        raise ModelError(f"classification.{printable(unknown[0])} is not a field (expected: "
                         f"{', '.join(_SIDECAR_FIELDS)})", where)
    if not isinstance(settings.get("task", ""), str):
        raise ModelError("classification.task must be a text", where)
    if not isinstance(settings.get("validated", True), bool):
        raise ModelError("classification.validated must be true or false", where)
    if not isinstance(settings.get("thresholds", {}), dict):
        raise ModelError("classification.thresholds must be an object {class: probability}", where)
    return settings


def _thresholds(given: Mapping[str, Any], names: Sequence[str], where: Path) -> Dict[str, float]:
    out = {}
    for cls, value in given.items():
        if cls not in names:
            raise ModelError(f"classification.thresholds.{printable(cls)} is not one of the classes "
                             f"({', '.join(names)})", where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ModelError(f"classification.thresholds.{printable(cls)} must be a probability between 0 and 1 "
                             "(exclusive)", where)
        out[cls] = float(value)
    return out


def bundle_task(folder: Path, metadata: Mapping[str, Any], sidecar: Mapping[str, Any], act: Optional[str],
                count: int, config: Path) -> ClassificationTask:
    """The ``ClassificationTask`` a classifier bundle with ``count`` outputs and activation ``act`` amounts to."""
    side = folder / "configs" / "medautolabel.json"
    if act is None:
        raise ModelError("the network gives one score per class, but the postprocessing turns them into no "
                         "probabilities: a classification bundle needs Activationsd with softmax or sigmoid on pred",
                         config)
    names = classes(metadata, count, folder / "configs" / "metadata.json")
    if act == "softmax" and count < 2:
        raise ModelError("softmax over 1 class is always 1: a single finding needs sigmoid", config)
    settings = _settings(sidecar, side)
    return ClassificationTask(task=task_name(metadata, settings, folder), classes=names, method=METHOD,
                              activation=act, validated=settings.get("validated", True),
                              thresholds=_thresholds(settings.get("thresholds", {}), names, side))


def probability_row(pred: Any, task: ClassificationTask, config: Path) -> np.ndarray:
    """The bundle's postprocessed ``pred`` as one row of probabilities over ``task.classes``, checked."""
    row = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred, dtype=np.float64).reshape(-1)
    if row.size != len(task.classes):
        raise ModelError(f"the postprocessing gives {row.size} values for {len(task.classes)} classes", config)
    if not (np.isfinite(row).all() and (row >= -1e-6).all() and (row <= 1 + 1e-6).all()):
        raise ModelError("the postprocessing gives values outside 0..1: no probabilities", config)
    if task.activation == "softmax" and abs(row.sum() - 1.0) > 1e-3:
        raise ModelError(f"the softmax probabilities add up to {row.sum():.4f}, not 1", config)
    return np.clip(row, 0.0, 1.0)

