"""The model card: ``model.json`` beside the weights, read into dataclasses and validated field by field.

Every problem is reported as ``ModelError("field 'labels[1].color': expected 3 numbers in 0..1", path)``
so that the user sees the file and the field at once. The format is documented in docs/model-card.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from medautolabel.errors import ModelError
from medautolabel.limits import MAX_CHANNELS, MAX_JSON_DEPTH, exceeds_memory, json_depth_exceeds, memory_problem, voxel_count
from medautolabel.options import TTA_MODES
from medautolabel.result import Code, Terminology

FORMAT = "medautolabel-model/1"
ARCHITECTURES = ("UNet", "SegResNet", "DynUNet", "BasicUNet", "TorchScript")  # TorchScript: the weights are the network
# whole-volume classifiers (MONAI, spatial_dims 3) a classification task may run
CLASSIFIER_ARCHITECTURES = ("DenseNet121", "ResNet", "SEResNet50", "EfficientNetBN", "TorchScript")
CLASSIFIER_METHODS = ("voxel_evidence", "network")
REGIONS = ("whole", "tiles", "segment", "components")  # what a classifier network looks at
SEGMENT_REGIONS = ("segment", "components")  # regions boxed around one of the model's segments
COMBINE = ("max", "mean")  # how the answers for several regions (components) become one
MODALITIES = ("CT", "MR", "PT", "US", "XA", "OTHER")
_AXIS_PAIRS = ({"R", "L"}, {"A", "P"}, {"S", "I"})


@dataclass
class InputChannel:
    """One network input channel derived from the image: a CT window (HU) or MR percentiles."""

    name: str
    window: Optional[Tuple[float, float]] = None
    percentiles: Optional[Tuple[float, float]] = None


@dataclass
class CropForeground:
    """Crop to voxels above ``threshold`` (raw intensities), plus ``margin_mm`` on every side."""

    threshold: float
    margin_mm: float = 10.0


@dataclass
class Preprocessing:
    orientation: Optional[str] = "RAS"  # nibabel/MONAI axis codes of the network grid's (i, j, k) axes
    spacing: Optional[Tuple[float, float, float]] = None  # mm along the network grid's i, j, k
    crop_foreground: Optional[CropForeground] = None
    # order of the network tensor's spatial axes: "kji" (the engine's/Slicer's array order, as the
    # built-in model is trained) or "ijk" (nibabel/MONAI order, as MONAI bundles expect)
    axis_order: str = "kji"


@dataclass
class NetworkSpec:
    architecture: str
    parameters: Dict[str, Any]
    weights: str  # file name relative to the model folder
    sha256: Optional[str] = None

    @property
    def outputs(self) -> Optional[int]:
        """The number of output channels (``out_channels`` or ``num_classes``), when the parameters say so."""
        v = self.parameters.get("out_channels", self.parameters.get("num_classes"))
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None



@dataclass
class InferenceSpec:
    roi_size: Tuple[int, int, int]
    overlap: float = 0.25
    sw_batch_size: int = 1
    blend: str = "gaussian"  # MONAI sliding-window blend mode: "gaussian" or "constant"
    tta: str = "none"  # test-time augmentation: "none", "flip" (identity + 3 axis flips) or "flip-all" (8)


@dataclass
class SegmentationSpec:
    activation: str  # "softmax" over the first ``channels`` outputs, or "sigmoid" per label channel
    channels: int


@dataclass
class LabelPostprocessing:
    min_size_mm3: float = 0.0
    largest_component: bool = False


@dataclass
class LabelSpec:
    value: int
    channel: int
    name: str
    color: Tuple[float, float, float]
    terminology: Terminology
    postprocessing: LabelPostprocessing = field(default_factory=LabelPostprocessing)


@dataclass
class ClassifierInput:
    """What a classifier network looks at, resampled to ``shape`` (k, j, i voxels of the card's orientation).

    ``region``: "whole" (the image, cropped to the foreground when the card crops), "tiles" (that
    foreground cut into overlapping boxes of ``shape`` voxels at ``spacing``, classified one by one
    and combined by ``combine``: multiple-instance learning for small findings), "segment" (a box
    around the model's own segment ``segment``) or "components" (a box around each connected
    component of it, classified one by one and combined by ``combine``); ``margin_mm`` widens a
    segment's box on every side. ``spacing`` (mm, i, j, k): a box of ``shape`` voxels at this
    spacing centred on the region instead of the region squeezed into ``shape``. ``channels``:
    the network's input channels (default: the card's ``input.channels``).
    """

    region: str
    shape: Tuple[int, int, int]
    spacing: Optional[Tuple[float, float, float]] = None
    segment: Optional[str] = None
    margin_mm: float = 10.0
    combine: str = "max"
    channels: Optional[List[InputChannel]] = None

    @property
    def needs_segment(self) -> bool:
        """True when the regions are boxed around one of the model's segments (a mask is needed)."""
        return self.region in SEGMENT_REGIONS


@dataclass
class ClassificationTask:
    """One image-level task. ``method`` "voxel_evidence": read out the segmentation network's
    ``channel``; "network": a classifier network (``network`` + ``input``) with ``activation``
    "softmax" (``classes`` mutually exclusive) or "sigmoid" (each class an independent finding).
    ``temperature`` divides the logits (calibration); ``thresholds`` are per-class decision
    thresholds on the calibrated probability (docs/model-card.md says how they decide)."""

    task: str
    classes: Tuple[str, ...]  # voxel_evidence: (absent, present)
    channel: Optional[int] = None
    method: str = "voxel_evidence"
    activation: str = "sigmoid"
    smoothing_mm: float = 1.0
    # False when the tag missed its validation targets: every output of it says "not validated"
    validated: bool = True
    network: Optional[NetworkSpec] = None
    input: Optional[ClassifierInput] = None
    temperature: float = 1.0
    thresholds: Dict[str, float] = field(default_factory=dict)

    @property
    def out_channels(self) -> Optional[int]:
        """The classifier network's number of outputs, when its parameters say so."""
        return None if self.network is None else self.network.outputs


@dataclass
class ModelCard:
    """A validated ``model.json``. ``path`` is the card file it came from (None if built in memory)."""

    id: str
    name: str
    version: str
    modality: str
    input: List[InputChannel]
    preprocessing: Preprocessing
    network: Optional[NetworkSpec]  # None: a classification-only model (labels nothing)
    inference: Optional[InferenceSpec]
    segmentation: Optional[SegmentationSpec]
    labels: List[LabelSpec]
    classification: List[ClassificationTask] = field(default_factory=list)
    low_confidence_threshold: float = 0.5
    description: str = ""
    provenance: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def folder(self) -> Optional[Path]:
        """The model folder (where ``model.json`` and the weights live)."""
        return None if self.path is None else self.path.parent

    @property
    def segments(self) -> bool:
        """True when the model has a segmentation network (False: classification only)."""
        return self.network is not None

    @property
    def weights_path(self) -> Path:
        if self.network is None:
            raise ModelError("the model has no segmentation network", self.path)
        return self.file(self.network.weights)

    def file(self, name: str) -> Path:
        """A file of the model folder (weights of the network or of a classifier)."""
        folder = self.folder if self.folder is not None else Path(".")
        return folder / name

    @classmethod
    def load(cls, path: Union[str, Path]) -> ModelCard:
        """Read and validate a ``model.json`` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.json"
        if not path.is_file():
            raise ModelError("model card not found", path)
        try:
            text = path.read_text(encoding="utf-8")
            if json_depth_exceeds(text):
                raise ModelError(f"nested deeper than {MAX_JSON_DEPTH} levels: not a model card", path)
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelError(f"cannot read model card ({type(e).__name__})", path) from None
        except RecursionError:
            raise ModelError(f"nested deeper than {MAX_JSON_DEPTH} levels: not a model card", path) from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Optional[Union[str, Path]] = None) -> ModelCard:
        """Validate a parsed ``model.json``; errors name ``path`` and the field."""
        return _parse_card(_Ctx(None if path is None else Path(path)), data)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict in the ``model.json`` format (``from_dict(to_dict())`` gives the same card)."""
        pre = self.preprocessing
        return {
            "format": FORMAT,
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "modality": self.modality,
            "input": {"channels": _channels_dict(self.input)},
            "preprocessing": {
                "orientation": pre.orientation,
                "spacing": _lst(pre.spacing),
                "crop_foreground": None if pre.crop_foreground is None else {
                    "threshold": pre.crop_foreground.threshold, "margin_mm": pre.crop_foreground.margin_mm},
                "axis_order": pre.axis_order,
            },
            "network": None if self.network is None else _network_dict(self.network),
            "inference": None if self.inference is None else {
                "roi_size": list(self.inference.roi_size), "overlap": self.inference.overlap,
                "sw_batch_size": self.inference.sw_batch_size, "blend": self.inference.blend,
                "tta": self.inference.tta},
            "segmentation": None if self.segmentation is None else {
                "activation": self.segmentation.activation, "channels": self.segmentation.channels},
            "labels": [{
                "value": lab.value, "channel": lab.channel, "name": lab.name, "color": list(lab.color),
                "terminology": _terminology_dict(lab.terminology),
                "postprocessing": {"min_size_mm3": lab.postprocessing.min_size_mm3,
                                   "largest_component": lab.postprocessing.largest_component},
            } for lab in self.labels],
            "classification": [_task_dict(t) for t in self.classification],
            "low_confidence_threshold": self.low_confidence_threshold,
            "provenance": dict(self.provenance),
            "metrics": dict(self.metrics),
        }

    @property
    def channels_per_voxel(self) -> int:
        """Input plus output channels: what one network-grid voxel costs (x 4 bytes) through inference."""
        seg = self.segmentation.channels if self.segmentation is not None else 0
        return len(self.input) + (self.out_channels or seg or 1)

    @property
    def out_channels(self) -> Optional[int]:
        """The network's number of output channels, when its parameters say so."""
        return None if self.network is None else self.network.outputs


# ----------------------------------------------------------------------------- helpers


def _lst(v: Optional[Sequence[Any]]) -> Optional[List[Any]]:
    return None if v is None else list(v)


def _drop_none(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _code_dict(c: Optional[Code]) -> Optional[Dict[str, str]]:
    return None if c is None else {"scheme": c.scheme, "value": c.value, "meaning": c.meaning}


def _network_dict(n: NetworkSpec) -> Dict[str, Any]:
    return _drop_none({"architecture": n.architecture, "parameters": dict(n.parameters), "weights": n.weights,
                       "sha256": n.sha256})


def _channels_dict(channels: Sequence[InputChannel]) -> List[Dict[str, Any]]:
    return [_drop_none({"name": c.name, "window": _lst(c.window), "percentiles": _lst(c.percentiles)})
            for c in channels]


def _task_dict(t: ClassificationTask) -> Dict[str, Any]:
    out: Dict[str, Any] = {"task": t.task, "classes": list(t.classes), "method": t.method,
                           "activation": t.activation, "validated": t.validated}
    if t.method == "voxel_evidence":
        out.update(channel=t.channel, smoothing_mm=t.smoothing_mm)
    else:
        i = t.input
        out["network"] = _network_dict(t.network)
        out["input"] = _drop_none({"region": i.region, "shape": list(i.shape), "spacing": _lst(i.spacing),
                                   "segment": i.segment, "margin_mm": i.margin_mm, "combine": i.combine,
                                   "channels": None if i.channels is None else _channels_dict(i.channels)})
        out["temperature"] = t.temperature
    if t.thresholds:
        out["thresholds"] = dict(t.thresholds)
    return out


def _terminology_dict(t: Terminology) -> Dict[str, Any]:
    return _drop_none({"category": _code_dict(t.category), "type": _code_dict(t.type),
                       "type_modifier": _code_dict(t.type_modifier),
                       "anatomic_region": _code_dict(t.anatomic_region)})


_MISSING = object()


class _Ctx:
    """Carries the card path so that every error names the file and the field."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> ModelError:
        return ModelError(f"field '{where}': {problem}", self.path)

    def obj(self, value: Any, where: str, known: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {_kind(value)}")
        if known is not None:
            for key in value:
                if key not in known:
                    raise self.fail(f"{where}.{key}", f"unknown field (expected one of: {', '.join(known)})")
        return value

    def get(self, d: Dict[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
        if key in d and d[key] is not None:
            return d[key]
        if default is _MISSING:
            raise self.fail(_join(where, key), "missing")
        return default

    def text(self, d: Dict[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
        v = self.get(d, key, where, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str) or not v.strip():
            raise self.fail(_join(where, key), f"expected a non-empty string, got {_kind(v)}")
        return v

    def number(self, d: Dict[str, Any], key: str, where: str, default: Any = _MISSING,
               lo: Optional[float] = None, hi: Optional[float] = None, positive: bool = False) -> Any:
        v = self.get(d, key, where, default)
        if v is default and default is not _MISSING:
            return v
        if not _is_number(v):
            raise self.fail(_join(where, key), f"expected a number, got {_kind(v)}")
        if positive and v <= 0:
            raise self.fail(_join(where, key), f"expected a number > 0, got {v}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.fail(_join(where, key), f"expected a number in {lo}..{hi}, got {v}")
        return float(v)

    def integer(self, d: Dict[str, Any], key: str, where: str, default: Any = _MISSING,
                lo: Optional[int] = None, hi: Optional[int] = None) -> Any:
        v = self.get(d, key, where, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(_join(where, key), f"expected an integer, got {_kind(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.fail(_join(where, key), f"expected an integer {rng}, got {v}")
        return v

    def numbers(self, d: Dict[str, Any], key: str, where: str, n: int, what: str,
                default: Any = _MISSING, check: Any = None) -> Any:
        v = self.get(d, key, where, default)
        if v is default and default is not _MISSING:
            return v
        ok = isinstance(v, list) and len(v) == n and all(_is_number(x) for x in v)
        if ok and check is not None:
            ok = all(check(x) for x in v)
        if not ok:
            raise self.fail(_join(where, key), f"expected {n} {what}, got {_short(v)}")
        return tuple(float(x) for x in v)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "true/false"
    if v == [] or v == {}:
        return "an empty list" if v == [] else "an empty object"
    return {dict: "an object", list: "a list", str: f"the string {_short(v)}"}.get(type(v), _short(v))


def _short(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict, str, int, float)) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ----------------------------------------------------------------------------- parsing


def _parse_card(c: _Ctx, data: Any) -> ModelCard:
    d = c.obj(data, "(top level)")
    fmt = c.get(d, "format", "")
    if fmt != FORMAT:
        raise c.fail("format", f"expected {FORMAT!r}, got {_short(fmt)}")
    model_id = c.text(d, "id", "")
    if any(ch in model_id for ch in "/\\ ") or model_id.startswith("."):
        raise c.fail("id", "expected a name without spaces or slashes")
    modality = c.text(d, "modality", "").upper()
    if modality not in MODALITIES:
        raise c.fail("modality", f"expected one of {', '.join(MODALITIES)}, got {_short(d['modality'])}")

    channels = _parse_input(c, c.obj(c.get(d, "input", ""), "input", ["channels"]), "input")
    pre = _parse_preprocessing(c, c.obj(c.get(d, "preprocessing", "", {}), "preprocessing",
                                        ["orientation", "spacing", "crop_foreground", "axis_order"]))
    net = inf = seg = None
    if d.get("network") is not None:
        net = _parse_network(c, c.obj(d["network"], "network", ["architecture", "parameters", "weights", "sha256"]),
                             "network", ARCHITECTURES)
        inf = _parse_inference(c, c.obj(c.get(d, "inference", ""), "inference",
                                        ["roi_size", "overlap", "sw_batch_size", "blend", "tta"]))
        seg = _parse_segmentation(c, c.obj(c.get(d, "segmentation", ""), "segmentation",
                                           ["activation", "channels"]))
    else:  # a classification-only model: no segmentation network, so nothing that describes one
        for key in ("inference", "segmentation"):
            if d.get(key) is not None:
                raise c.fail(key, "given, but the model has no 'network' (a classification-only model has "
                                  "no segmentation settings)")
    labels_raw = c.get(d, "labels", "", [] if net is None else _MISSING)
    if not isinstance(labels_raw, list) or (net is not None and not labels_raw):
        raise c.fail("labels", f"expected a non-empty list, got {_kind(labels_raw)}")
    if net is None and labels_raw:
        raise c.fail("labels", "given, but the model has no segmentation 'network' to make them")
    labels = [_parse_label(c, x, f"labels[{n}]") for n, x in enumerate(labels_raw)]
    tasks_raw = c.get(d, "classification", "", [])
    if not isinstance(tasks_raw, list):
        raise c.fail("classification", f"expected a list, got {_kind(tasks_raw)}")
    if net is None and not tasks_raw:
        raise c.fail("network", "missing (a model needs a segmentation network, classification tasks, or both)")
    tasks = [_parse_task(c, x, f"classification[{n}]") for n, x in enumerate(tasks_raw)]

    card = ModelCard(
        id=model_id,
        name=c.text(d, "name", ""),
        version=c.text(d, "version", ""),
        description=c.get(d, "description", "", ""),
        modality=modality,
        input=channels,
        preprocessing=pre,
        network=net,
        inference=inf,
        segmentation=seg,
        labels=labels,
        classification=tasks,
        low_confidence_threshold=c.number(d, "low_confidence_threshold", "", 0.5, lo=0.0, hi=1.0),
        provenance=c.obj(c.get(d, "provenance", "", {}), "provenance"),
        metrics=c.obj(c.get(d, "metrics", "", {}), "metrics"),
        path=c.path,
    )
    if not isinstance(card.description, str):
        raise c.fail("description", f"expected a string, got {_kind(card.description)}")
    _check_consistency(c, card)
    return card


def _parse_input(c: _Ctx, d: Dict[str, Any], at: str) -> List[InputChannel]:
    raw = c.get(d, "channels", at)
    if not isinstance(raw, list) or not raw:
        raise c.fail(f"{at}.channels", f"expected a non-empty list, got {_kind(raw)}")
    if len(raw) > MAX_CHANNELS:
        raise c.fail(f"{at}.channels", f"expected at most {MAX_CHANNELS} channels, got {len(raw)}")
    out = []
    for n, item in enumerate(raw):
        where = f"{at}.channels[{n}]"
        e = c.obj(item, where, ["name", "window", "percentiles"])
        window = c.numbers(e, "window", where, 2, "numbers [low, high] with low < high", None)
        pct = c.numbers(e, "percentiles", where, 2, "numbers [lower, upper] in 0..100", None,
                        check=lambda x: 0 <= x <= 100)
        if (window is None) == (pct is None):
            raise c.fail(where, "expected exactly one of 'window' (CT, HU) or 'percentiles' (MR)")
        if window is not None and not window[0] < window[1]:
            raise c.fail(f"{where}.window", f"expected low < high, got {list(window)}")
        if pct is not None and not pct[0] < pct[1]:
            raise c.fail(f"{where}.percentiles", f"expected lower < upper, got {list(pct)}")
        out.append(InputChannel(c.text(e, "name", where), window, pct))
    return out


def _parse_orientation(c: _Ctx, v: Any) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) != 3 or any(
            sum(ch in pair for ch in v.upper()) != 1 for pair in _AXIS_PAIRS):
        raise c.fail("preprocessing.orientation",
                     f"expected 3 axis codes, one of R/L, A/P and S/I each (e.g. \"RAS\"), got {_short(v)}")
    return v.upper()


def _parse_preprocessing(c: _Ctx, d: Dict[str, Any]) -> Preprocessing:
    w = "preprocessing"
    crop = None
    if d.get("crop_foreground") is not None:
        e = c.obj(d["crop_foreground"], f"{w}.crop_foreground", ["threshold", "margin_mm"])
        crop = CropForeground(c.number(e, "threshold", f"{w}.crop_foreground"),
                              c.number(e, "margin_mm", f"{w}.crop_foreground", 10.0, lo=0.0, hi=1e4))
    order = c.text(d, "axis_order", w, "kji")
    if order not in ("kji", "ijk"):
        raise c.fail(f"{w}.axis_order", f"expected \"kji\" or \"ijk\", got {_short(order)}")
    return Preprocessing(
        orientation=_parse_orientation(c, d.get("orientation", "RAS")),
        spacing=c.numbers(d, "spacing", w, 3, "numbers > 0 (mm)", None, check=lambda x: x > 0),
        crop_foreground=crop,
        axis_order=order,
    )


def _parse_network(c: _Ctx, d: Dict[str, Any], w: str, architectures: Sequence[str]) -> NetworkSpec:
    arch = c.text(d, "architecture", w)
    if arch not in architectures:
        raise c.fail(f"{w}.architecture", f"expected one of {', '.join(architectures)}, got {_short(arch)}")
    params = c.obj(c.get(d, "parameters", w, {}), f"{w}.parameters")
    weights = c.text(d, "weights", w)
    p = PurePosixPath(weights.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or ":" in weights:
        raise c.fail(f"{w}.weights", "expected a file name inside the model folder")
    sha = c.get(d, "sha256", w, None)
    if sha is not None:
        if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in sha):
            raise c.fail(f"{w}.sha256", f"expected 64 hexadecimal digits, got {_short(sha)}")
        sha = sha.lower()
    return NetworkSpec(arch, dict(params), weights, sha)


def _parse_inference(c: _Ctx, d: Dict[str, Any]) -> InferenceSpec:
    w = "inference"
    roi = c.get(d, "roi_size", w)
    if not (isinstance(roi, list) and len(roi) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in roi)):
        raise c.fail(f"{w}.roi_size", f"expected 3 integers > 0, got {_short(roi)}")
    blend = c.text(d, "blend", w, "gaussian")
    if blend not in ("gaussian", "constant"):
        raise c.fail(f"{w}.blend", f"expected \"gaussian\" or \"constant\", got {_short(blend)}")
    overlap = c.number(d, "overlap", w, 0.25, lo=0.0, hi=0.95)
    tta = c.text(d, "tta", w, "none")
    if tta not in TTA_MODES:
        raise c.fail(f"{w}.tta", f"expected one of {', '.join(TTA_MODES)}, got {_short(tta)}")
    return InferenceSpec(tuple(roi), overlap, c.integer(d, "sw_batch_size", w, 1, lo=1), blend, tta)


def _parse_segmentation(c: _Ctx, d: Dict[str, Any]) -> SegmentationSpec:
    act = c.text(d, "activation", "segmentation")
    if act not in ("softmax", "sigmoid"):
        raise c.fail("segmentation.activation", f"expected \"softmax\" or \"sigmoid\", got {_short(act)}")
    if act == "softmax":
        n = c.integer(d, "channels", "segmentation", lo=2, hi=MAX_CHANNELS)
    else:
        n = c.integer(d, "channels", "segmentation", 0, lo=0, hi=MAX_CHANNELS)
    return SegmentationSpec(act, n)


def _parse_code(c: _Ctx, v: Any, where: str) -> Code:
    e = c.obj(v, where, ["scheme", "value", "meaning"])
    return Code(c.text(e, "scheme", where), c.text(e, "value", where), c.text(e, "meaning", where))


def _parse_label(c: _Ctx, v: Any, where: str) -> LabelSpec:
    d = c.obj(v, where, ["value", "channel", "name", "color", "terminology", "postprocessing"])
    t = c.obj(c.get(d, "terminology", where), f"{where}.terminology",
              ["category", "type", "type_modifier", "anatomic_region"])
    tw = f"{where}.terminology"
    term = Terminology(
        _parse_code(c, c.get(t, "category", tw), f"{tw}.category"),
        _parse_code(c, c.get(t, "type", tw), f"{tw}.type"),
        None if t.get("type_modifier") is None else _parse_code(c, t["type_modifier"], f"{tw}.type_modifier"),
        None if t.get("anatomic_region") is None else _parse_code(c, t["anatomic_region"], f"{tw}.anatomic_region"),
    )
    pp = c.obj(c.get(d, "postprocessing", where, {}), f"{where}.postprocessing",
               ["min_size_mm3", "largest_component"])
    largest = c.get(pp, "largest_component", f"{where}.postprocessing", False)
    if not isinstance(largest, bool):
        raise c.fail(f"{where}.postprocessing.largest_component", f"expected true or false, got {_kind(largest)}")
    return LabelSpec(
        value=c.integer(d, "value", where, lo=1, hi=255),
        channel=c.integer(d, "channel", where, lo=0),
        name=c.text(d, "name", where),
        color=c.numbers(d, "color", where, 3, "numbers in 0..1", check=lambda x: 0 <= x <= 1),
        terminology=term,
        postprocessing=LabelPostprocessing(
            c.number(pp, "min_size_mm3", f"{where}.postprocessing", 0.0, lo=0.0, hi=1e12), largest),
    )


_TASK_FIELDS = ["task", "classes", "method", "channel", "activation", "smoothing_mm", "validated", "network", "input",
                "temperature", "thresholds"]


def _parse_task(c: _Ctx, v: Any, where: str) -> ClassificationTask:
    d = c.obj(v, where, _TASK_FIELDS)
    if "/" in c.text(d, "task", where):  # "/" joins a sigmoid task and its finding: "<task>/<class>"
        raise c.fail(f"{where}.task", f"expected a name without \"/\", got {_short(d['task'])}")
    method = c.text(d, "method", where, "voxel_evidence")
    if method not in CLASSIFIER_METHODS:
        raise c.fail(f"{where}.method", f"expected one of {', '.join(CLASSIFIER_METHODS)}, got {_short(method)}")
    classes = c.get(d, "classes", where)
    if method == "voxel_evidence":
        ok = isinstance(classes, list) and len(classes) == 2
        wanted = "2 different names [absent, present]"
    else:
        ok = isinstance(classes, list) and 1 <= len(classes) <= MAX_CHANNELS
        wanted = "a list of different class names"
    if not (ok and all(isinstance(x, str) and x.strip() for x in classes) and len(set(classes)) == len(classes)):
        raise c.fail(f"{where}.classes", f"expected {wanted}, got {_short(classes)}")
    validated = c.get(d, "validated", where, True)
    if not isinstance(validated, bool):
        raise c.fail(f"{where}.validated", f"expected true or false, got {_kind(validated)}")
    act = c.text(d, "activation", where, "sigmoid" if method == "voxel_evidence" else "softmax")
    thresholds = _parse_thresholds(c, c.get(d, "thresholds", where, {}), f"{where}.thresholds", classes)
    if method == "voxel_evidence":
        if act != "sigmoid":
            raise c.fail(f"{where}.activation", f"expected \"sigmoid\", got {_short(act)}")
        for key in ("network", "input", "temperature"):
            if d.get(key) is not None:
                raise c.fail(f"{where}.{key}", "is for method \"network\", not \"voxel_evidence\"")
        return ClassificationTask(
            task=c.text(d, "task", where), classes=tuple(classes),
            channel=c.integer(d, "channel", where, lo=0), method=method, activation=act,
            smoothing_mm=c.number(d, "smoothing_mm", where, 1.0, lo=0.0, hi=1e3), validated=validated,
            thresholds=thresholds)
    for key in ("channel", "smoothing_mm"):
        if d.get(key) is not None:
            raise c.fail(f"{where}.{key}", "is for method \"voxel_evidence\", not \"network\"")
    if act not in ("softmax", "sigmoid"):
        raise c.fail(f"{where}.activation", f"expected \"softmax\" or \"sigmoid\", got {_short(act)}")
    if act == "softmax" and len(classes) < 2:
        raise c.fail(f"{where}.classes", "softmax needs at least 2 classes (one finding alone: \"sigmoid\")")
    net = _parse_network(c, c.obj(c.get(d, "network", where), f"{where}.network",
                                  ["architecture", "parameters", "weights", "sha256"]),
                         f"{where}.network", CLASSIFIER_ARCHITECTURES)
    if net.parameters.get("pretrained"):
        raise c.fail(f"{where}.network.parameters.pretrained", "expected false: weights come from the model "
                                                                "folder, never downloaded")
    temperature = c.number(d, "temperature", where, 1.0)
    if temperature <= 0:
        raise c.fail(f"{where}.temperature", f"expected a number > 0, got {d['temperature']}")
    return ClassificationTask(
        task=c.text(d, "task", where), classes=tuple(classes), method=method, activation=act, validated=validated,
        network=net, input=_parse_classifier_input(c, c.obj(c.get(d, "input", where), f"{where}.input", [
            "region", "shape", "spacing", "segment", "margin_mm", "combine", "channels"]), f"{where}.input"),
        temperature=temperature, thresholds=thresholds)


def _parse_thresholds(c: _Ctx, v: Any, where: str, classes: Sequence[str]) -> Dict[str, float]:
    d = c.obj(v, where)
    out = {}
    for name in d:
        if name not in classes:
            raise c.fail(f"{where}.{name}", f"is not one of the task's classes ({', '.join(classes)})")
        value = c.number(d, name, where)
        if not 0 < value < 1:
            raise c.fail(f"{where}.{name}", f"expected a probability between 0 and 1 (exclusive), got {value}")
        out[name] = value
    return out


def _parse_classifier_input(c: _Ctx, d: Dict[str, Any], w: str) -> ClassifierInput:
    region = c.text(d, "region", w, "whole")
    if region not in REGIONS:
        raise c.fail(f"{w}.region", f"expected one of {', '.join(REGIONS)}, got {_short(region)}")
    shape = c.get(d, "shape", w)
    if not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1024 for x in shape)):
        raise c.fail(f"{w}.shape", f"expected 3 integers in 1..1024 (voxels k, j, i), got {_short(shape)}")
    segment = c.text(d, "segment", w, None)
    if region not in SEGMENT_REGIONS and segment is not None:
        raise c.fail(f"{w}.segment", f"given, but region \"{region}\" looks at the whole image")
    if region in SEGMENT_REGIONS and segment is None:
        raise c.fail(f"{w}.segment", f"missing (region {region!r} is a box around one of the model's segments)")
    if region == "tiles" and d.get("spacing") is None:
        raise c.fail(f"{w}.spacing", "missing (region \"tiles\" cuts the image into boxes of shape x spacing mm)")
    combine = c.text(d, "combine", w, "max")
    if combine not in COMBINE:
        raise c.fail(f"{w}.combine", f"expected one of {', '.join(COMBINE)}, got {_short(combine)}")
    channels = None
    if d.get("channels") is not None:
        channels = _parse_input(c, d, w)
    return ClassifierInput(
        region=region, shape=tuple(shape),
        spacing=c.numbers(d, "spacing", w, 3, "numbers > 0 (mm)", None, check=lambda x: 0 < x <= 1e3),
        segment=segment, margin_mm=c.number(d, "margin_mm", w, 10.0, lo=0.0, hi=1e3), combine=combine,
        channels=channels)


def _check_sizes(c: _Ctx, card: ModelCard) -> None:
    """Refuse channel counts no network has and windows this machine could never hold, before any allocation."""
    if card.network is None or card.inference is None:
        return
    params = card.network.parameters
    for key in ("in_channels", "out_channels", "num_classes"):
        v = params.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= MAX_CHANNELS:
            raise c.fail(f"network.parameters.{key}", f"expected an integer in 1..{MAX_CHANNELS}, got {v}")
    inf = card.inference
    channels = card.channels_per_voxel
    nbytes = voxel_count(inf.roi_size) * inf.sw_batch_size * channels * 4
    if exceeds_memory(nbytes):
        shape = "x".join(str(n) for n in inf.roi_size)
        one_window_too_big = exceeds_memory(voxel_count(inf.roi_size) * channels * 4)
        raise c.fail("inference.roi_size" if one_window_too_big else "inference.sw_batch_size", memory_problem(
            nbytes, f"{inf.sw_batch_size} window(s) of {shape} voxels x {channels} channels"))


def _check_consistency(c: _Ctx, card: ModelCard) -> None:
    """Cross-field checks: channel numbers fit the network, label values and names are unique."""
    _check_classifiers(c, card)
    if card.network is None or card.segmentation is None:
        return
    params = card.network.parameters
    in_ch = params.get("in_channels")
    if isinstance(in_ch, int) and in_ch != len(card.input):
        raise c.fail("network.parameters.in_channels",
                     f"is {in_ch} but input.channels lists {len(card.input)} channel(s)")
    out_ch = card.out_channels
    seg = card.segmentation
    _check_sizes(c, card)
    if out_ch is not None and seg.channels > out_ch:
        raise c.fail("segmentation.channels", f"is {seg.channels} but the network has {out_ch} output channels")
    seen_values, seen_names, seen_channels = set(), set(), set()
    for n, lab in enumerate(card.labels):
        w = f"labels[{n}]"
        if lab.value in seen_values:
            raise c.fail(f"{w}.value", f"label value {lab.value} used twice")
        if lab.name in seen_names:
            raise c.fail(f"{w}.name", f"name {lab.name!r} used twice")
        if lab.channel in seen_channels:
            raise c.fail(f"{w}.channel", f"channel {lab.channel} used twice")
        seen_values.add(lab.value)
        seen_names.add(lab.name)
        seen_channels.add(lab.channel)
        if seg.activation == "softmax" and not 1 <= lab.channel < seg.channels:
            raise c.fail(f"{w}.channel", f"expected 1..{seg.channels - 1} (softmax channels; 0 is background), "
                                         f"got {lab.channel}")
        if out_ch is not None and lab.channel >= out_ch:
            raise c.fail(f"{w}.channel", f"is {lab.channel} but the network has {out_ch} output channels")
    for n, t in enumerate(card.classification):
        if t.method != "voxel_evidence":
            continue
        w = f"classification[{n}].channel"
        if out_ch is not None and t.channel >= out_ch:
            raise c.fail(w, f"is {t.channel} but the network has {out_ch} output channels")
        if seg.activation == "softmax" and t.channel < seg.channels:
            raise c.fail(w, f"is {t.channel}, one of the softmax channels 0..{seg.channels - 1}")


def _check_classifiers(c: _Ctx, card: ModelCard) -> None:
    """Classifier tasks: unique names, their segment exists, channel and class counts fit the network."""
    seen = set()
    names = {lab.name for lab in card.labels}
    for n, t in enumerate(card.classification):
        w = f"classification[{n}]"
        if t.task in seen:
            raise c.fail(f"{w}.task", f"task {t.task!r} used twice")
        seen.add(t.task)
        if t.method == "voxel_evidence":
            if card.network is None:
                raise c.fail(f"{w}.method", "\"voxel_evidence\" reads the segmentation network, which this model "
                                            "does not have")
            continue
        if t.input.segment is not None and t.input.segment not in names:
            known = ", ".join(sorted(names)) or "none: the model has no segmentation"
            raise c.fail(f"{w}.input.segment", f"{t.input.segment!r} is not one of the model's segments ({known})")
        params = t.network.parameters
        channels = len(t.input.channels or card.input)
        for key in ("in_channels", "n_input_channels"):
            v = params.get(key)
            if v is not None and v != channels:
                raise c.fail(f"{w}.network.parameters.{key}", f"is {_short(v)} but the classifier gets {channels} "
                                                                 "input channel(s)")
        out = t.out_channels
        if t.network.architecture != "TorchScript" and out is None:
            raise c.fail(f"{w}.network.parameters", "expected 'out_channels' or 'num_classes' (one output per class)")
        if out is not None and out != len(t.classes):
            raise c.fail(f"{w}.classes", f"lists {len(t.classes)} class(es) but the network has {out} output(s) "
                                         f"(one per class)")
        if params.get("spatial_dims", 3) != 3:
            raise c.fail(f"{w}.network.parameters.spatial_dims", f"expected 3, got {_short(params['spatial_dims'])}")
        nbytes = voxel_count(t.input.shape) * channels * 4
        if exceeds_memory(nbytes * 8):
            raise c.fail(f"{w}.input.shape", memory_problem(nbytes * 8, f"a classifier input of {t.input.shape}"))
