"""The training config: a JSON (or YAML, if PyYAML is installed) file merged over defaults.

Every section is a dataclass; unknown keys are errors naming the file and the key, so that a typo
is never silently ignored. A few keys default to null: ``device_defaults`` fills them for the
device the run uses (a CPU gets shorter epochs and lighter classification bags than a GPU). What
the model card needs (labels, input channels, preprocessing, network) is validated once more by
``ModelCard.from_dict`` when the output card is assembled (``medautolabel.training.export.build_card``).
The format is documented in docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from medautolabel.errors import MedAutoLabelError

# Two CT windows: soft tissue, and a wide one that keeps dense contrast distinct from bone.
DEFAULT_CT_CHANNELS = [{"name": "soft tissue", "window": [-150.0, 350.0]},
                       {"name": "wide", "window": [-200.0, 1800.0]}]
DEFAULT_MR_CHANNELS = [{"name": "intensity", "percentiles": [0.5, 99.5]}]


class ConfigError(MedAutoLabelError):
    """A training config (or a dataset description) that cannot be used as written."""


@dataclass
class ModelInfo:
    """Identity of the trained model (model.json top level)."""

    id: str = "my-model"
    name: Optional[str] = None  # default: the id
    version: str = "1.0.0"
    description: str = ""
    modality: Optional[str] = None  # default: dataset.json modality, else the base model's, else CT
    low_confidence_threshold: float = 0.5


@dataclass
class Optimizer:
    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass
class Schedule:
    name: str = "cosine"  # "cosine" (after a linear warm-up) or "constant"
    warmup_iterations: Optional[int] = None  # null: 200, or a tenth of the run when that is shorter (device_defaults)
    min_lr: float = 0.0


@dataclass
class Validation:
    interval: int = 1  # epochs between validations
    fraction: float = 0.2  # share of cases held out (at least one), fixed by the seed
    max_cases: Optional[int] = None
    roi_size: Optional[List[int]] = None  # sliding window; default: the patch size
    overlap: float = 0.25
    sw_batch_size: int = 1


@dataclass
class Augmentation:
    crop: str = "pos_neg"  # "pos_neg" (RandCropByPosNegLabel-style) or "classes" (RandCropByLabelClasses-style)
    pos: float = 1.0  # pos_neg: relative weight of crops centred on foreground
    neg: float = 1.0
    class_ratios: Optional[List[float]] = None  # classes: one weight per channel, background first
    flip: bool = True  # random flips along each axis
    rotate90: bool = True  # random quarter turns in the tensor's last two axes
    rotate_degrees: float = 15.0  # random small rotations (0: off)
    rotate_prob: float = 0.2
    intensity_scale: float = 0.1  # channel values * (1 + U(-s, s))
    intensity_shift: float = 0.05  # channel values + U(-s, s)
    intensity_prob: float = 0.5
    noise_std: float = 0.02  # Gaussian noise on the normalised channels (0: off)
    noise_prob: float = 0.2
    bias_field: bool = True  # smooth multiplicative bias field (MR-like shading)
    bias_field_prob: float = 0.15


@dataclass
class Classification:
    """How image-level classes are trained (multiple-instance learning; docs/training.md)."""

    weight: float = 0.5  # classification loss weight
    interval: Optional[int] = None  # one positive + one negative case every this many iterations (null: by device)
    crop_size: Optional[List[int]] = None  # largest bag (whole case if smaller; null: by device)
    smoothing_mm: float = 1.0  # written to the card; the same Gaussian is used in the training loss


@dataclass
class ClassifierTraining:
    """One classifier network trained from case-level labels (an entry of ``classifiers``)."""

    task: str = ""  # a task of the dataset's classes (labels.csv or dataset.json "classes")
    architecture: str = "ResNet"  # ResNet, DenseNet121, SEResNet50 or EfficientNetBN (MONAI, 3D)
    # MONAI constructor arguments; channel counts, classes and spatial_dims are filled in
    parameters: Dict[str, Any] = field(default_factory=lambda: {
        "block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [16, 32, 64, 128], "conv1_t_size": 3,
        "conv1_t_stride": 1, "no_max_pool": False, "norm": "batch"})
    # what the classifier looks at (model card "input": region whole/segment/components, shape, ...)
    input: Dict[str, Any] = field(default_factory=lambda: {"region": "whole", "shape": [64, 64, 64]})
    epochs: int = 40
    iterations_per_epoch: Optional[int] = None  # null: one pass over the training cases
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10  # epochs without a better validation AUC before stopping; 0: never stop early
    balanced: bool = True  # draw every class equally often
    flip: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.05
    noise_std: float = 0.02
    temperature_scaling: bool = True  # fit the card's temperature on the validation cases
    validation_fraction: Optional[float] = None  # share of labelled cases held out (null: validation.fraction)


@dataclass
class Cache:
    path: Optional[str] = None  # default: <user cache>/medautolabel/training/<dataset hash>.h5
    in_memory: str = "auto"  # "auto" (if it fits in memory_gb), "yes" or "no" (stream crops from disk)
    memory_gb: float = 4.0
    compression: str = "gzip"  # "gzip", "lzf" or "none"
    max_indices_per_class: int = 20000  # crop centres remembered per class and case


@dataclass
class TrainConfig:
    model: ModelInfo = field(default_factory=ModelInfo)
    # labels: [{"name", "value"?, "color"?, "terminology"?, "postprocessing"?}]; matched by name to the
    # dataset's labels; null: the dataset's labels (and the base model's, when fine-tuning)
    labels: Optional[List[Dict[str, Any]]] = None
    input: Optional[Dict[str, Any]] = None  # {"channels": [...]} as in model.json; null: by modality
    preprocessing: Dict[str, Any] = field(default_factory=lambda: {
        "orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "crop_foreground": None, "axis_order": "kji"})
    network: Dict[str, Any] = field(default_factory=lambda: {
        "architecture": "UNet",
        "parameters": {"spatial_dims": 3, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
                       "num_res_units": 2, "norm": "instance"}})
    patch_size: List[int] = field(default_factory=lambda: [64, 64, 64])
    batch_size: int = 2
    epochs: int = 100
    iterations_per_epoch: Optional[int] = None  # null: 250 on a GPU, from the dataset size on a CPU
    optimizer: Optimizer = field(default_factory=Optimizer)
    schedule: Schedule = field(default_factory=Schedule)
    validation: Validation = field(default_factory=Validation)
    early_stopping_patience: int = 20  # validations without a better mean Dice; 0: never stop early
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)
    classification: Classification = field(default_factory=Classification)
    cache: Cache = field(default_factory=Cache)
    workers: int = 0  # data-loading processes per rank (0: in the training process)
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    threads: Optional[int] = None  # torch CPU threads (null: torch's default)
    # classifier networks trained from case-level labels after (or, without masks, instead of) segmentation
    classifiers: List[Dict[str, Any]] = field(default_factory=list)
    train_segmentation: bool = True  # false: keep the --from model's segmentation network, train classifiers only

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, default: Any, where: str, path: Optional[Path]) -> Any:
    """Loose type check against the default's type (ints are accepted where floats are expected)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"key '{where}': expected {type(default).__name__}, got {json.dumps(value)[:40]}", path)
    return value


def _printable(text: str, limit: int = 60) -> str:
    """A config key as it may be shown: control and other unprintable characters as "?", cut at ``limit``."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:limit]


def _build(cls: Any, data: Any, where: str, path: Optional[Path]) -> Any:
    """A dataclass instance from a dict: defaults for missing keys, errors for unknown ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"key '{where or '(top level)'}': expected an object", path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"key '{(where + '.') if where else ''}{_printable(key)}': unknown (expected one of: "
                              f"{', '.join(fields)})", path)
    default = cls()
    kwargs = {}
    for name in fields:
        sub = f"{where}.{name}" if where else name
        dflt = getattr(default, name)
        if name not in data:
            continue
        if dataclasses.is_dataclass(dflt):
            kwargs[name] = _build(type(dflt), data[name], sub, path)
        else:
            kwargs[name] = _check_type(data[name], dflt, sub, path)
    return cls(**kwargs)


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Parse a JSON or YAML config file into a dict."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the config ({type(e).__name__})", path) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("a YAML config needs PyYAML (pip install pyyaml); or write it as JSON", path) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML ({' '.join(str(e).split())[:200]})", path) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path) from None
    return data if data is not None else {}


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def builtin_configs() -> List[str]:
    """Names of the configs shipped with the package (``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config(source: Union[str, Path]) -> Path:
    """A config file path, or the path of a built-in config named ``source`` (e.g. "vessel-nerve-cta")."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    builtin = CONFIG_DIR / f"{source}.json"
    if "/" not in str(source) and "\\" not in str(source) and builtin.is_file():
        return builtin
    raise ConfigError(f"config not found (built-in configs: {', '.join(builtin_configs()) or 'none'})", path)


def load_config(source: Union[None, str, Path, Dict[str, Any]] = None,
                overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The config from a file path, a dict, or None (all defaults); ``overrides`` are top-level keys."""
    path = None
    if source is None:
        data: Dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = resolve_config(source)
        data = read_config_file(path)
    data.pop("$schema", None)
    data.pop("comment", None)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = _build(TrainConfig, data, "", path)
    validate(cfg, path)
    return cfg


def classifier_specs(cfg: TrainConfig, path: Optional[Path] = None) -> List[ClassifierTraining]:
    """The ``classifiers`` entries as checked dataclasses (unknown keys and wrong types refused)."""
    out = []
    for n, entry in enumerate(cfg.classifiers):
        spec = _build(ClassifierTraining, entry, f"classifiers[{n}]", path)
        where = f"classifiers[{n}]"
        if not spec.task.strip():
            raise ConfigError(f"key '{where}.task': expected the name of a task of the dataset", path)
        if spec.task in {s.task for s in out}:
            raise ConfigError(f"key '{where}.task': task {spec.task!r} listed twice", path)
        for key in ("epochs", "batch_size"):
            problem = count_problem(getattr(spec, key), 1)
            if problem:
                raise ConfigError(f"key '{where}.{key}': {problem}", path)
        for key, lo in (("iterations_per_epoch", 1), ("patience", 0)):
            problem = count_problem(getattr(spec, key), lo)
            if problem:
                raise ConfigError(f"key '{where}.{key}': {problem}", path)
        if spec.lr <= 0:
            raise ConfigError(f"key '{where}.lr': expected a number > 0", path)
        if spec.validation_fraction is not None and not 0.0 < spec.validation_fraction < 1.0:
            raise ConfigError(f"key '{where}.validation_fraction': expected a number in 0..1 (exclusive)", path)
        out.append(spec)
    return out


# Whole-number settings and their smallest allowed value (null, where allowed, means "choose for me").
COUNTS = {"batch_size": 1, "epochs": 1, "iterations_per_epoch": 1, "validation.interval": 1,
          "classification.interval": 1, "early_stopping_patience": 0, "workers": 0, "schedule.warmup_iterations": 0}


def count_problem(value: Any, lo: int) -> Optional[str]:
    """Why ``value`` is not a whole number >= ``lo`` (None when it is one, or is null)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= lo):
        return None
    return f"expected an integer >= {lo}, got {json.dumps(value)[:40]}"


def _slot(cfg: TrainConfig, key: str) -> Tuple[Any, str]:
    """The section object holding the dotted ``key`` and the attribute name within it."""
    *parents, name = key.split(".")
    owner: Any = cfg
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def _get(cfg: TrainConfig, key: str) -> Any:
    owner, name = _slot(cfg, key)
    return getattr(owner, name)


def validate(cfg: TrainConfig, path: Optional[Path] = None) -> None:
    """Range checks the dataclasses cannot express."""
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"key '{key}': {problem}", path)

    if not (isinstance(cfg.patch_size, list) and len(cfg.patch_size) == 3
            and all(isinstance(x, int) and x > 0 for x in cfg.patch_size)):
        raise fail("patch_size", "expected 3 integers > 0")
    strides = cfg.network.get("parameters", {}).get("strides")
    if cfg.network.get("architecture") == "UNet" and isinstance(strides, list):
        factor = 1
        for s in strides:
            factor *= int(s) if isinstance(s, int) else max(s)
        if any(p % factor for p in cfg.patch_size):
            raise fail("patch_size", f"each size must be a multiple of {factor} (the UNet's total stride)")
    for key, lo in COUNTS.items():
        problem = count_problem(_get(cfg, key), lo)
        if problem:
            raise fail(key, problem)
    crop = cfg.classification.crop_size
    if crop is not None and not (isinstance(crop, list) and len(crop) == 3
                                 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in crop)):
        raise fail("classification.crop_size", "expected 3 integers > 0 or null")
    if not 0.0 <= cfg.validation.fraction < 1.0:
        raise fail("validation.fraction", "expected a number in 0..1 (exclusive)")
    if cfg.optimizer.lr <= 0:
        raise fail("optimizer.lr", "expected a number > 0")
    if cfg.schedule.name not in ("cosine", "constant"):
        raise fail("schedule.name", "expected \"cosine\" or \"constant\"")
    if cfg.augmentation.crop not in ("pos_neg", "classes"):
        raise fail("augmentation.crop", "expected \"pos_neg\" or \"classes\"")
    if cfg.cache.in_memory not in ("auto", "yes", "no"):
        raise fail("cache.in_memory", "expected \"auto\", \"yes\" or \"no\"")
    if cfg.cache.compression not in ("gzip", "lzf", "none"):
        raise fail("cache.compression", "expected \"gzip\", \"lzf\" or \"none\"")
    classifier_specs(cfg, path)
    spacing = cfg.preprocessing.get("spacing")
    if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3
                                    and all(isinstance(x, (int, float)) and x > 0 for x in spacing)):
        raise fail("preprocessing.spacing", "expected 3 numbers > 0 (mm) or null")


def default_channels(modality: str) -> List[Dict[str, Any]]:
    """Input channels when the config names none: two CT windows, or MR percentiles."""
    return [dict(c) for c in (DEFAULT_CT_CHANNELS if modality == "CT" else DEFAULT_MR_CHANNELS)]


# What ``device_defaults`` picks for the keys a config leaves null (docs/training.md, "CPU defaults").
GPU_DEFAULTS = {"iterations_per_epoch": 250, "classification.interval": 1,
                "classification.crop_size": [128, 128, 128], "schedule.warmup_iterations": 200}
CPU_ITERATIONS_PER_CASE = 4  # optimiser steps per training case and epoch (batch_size crops each)
CPU_ITERATIONS = (10, 100)  # fewest and most iterations per epoch on a CPU
CPU_BAG_INTERVAL = 4  # a classification bag (2 whole cases) every 4 iterations instead of every one
CPU_BAG_CROP = [96, 96, 96]  # largest bag on a CPU (0.42x the voxels of 128^3)
WARMUP_SHARE = 10  # on a CPU, warm-up is at most a tenth of the run so that short runs leave it


def device_defaults(cfg: TrainConfig, device_type: str, training_cases: int) -> Dict[str, Any]:
    """Fill the keys the config left null with values for the device; returns them ({dotted key: value}).

    A GPU gets the long-standing defaults (``GPU_DEFAULTS``). A CPU is far slower per voxel, so there
    an epoch is sized by the dataset (``CPU_ITERATIONS_PER_CASE`` steps per training case, within
    ``CPU_ITERATIONS``), classification bags are smaller and come every ``CPU_BAG_INTERVAL`` steps, and
    the warm-up is at most a tenth of the run. Values given in the config (or on the command line)
    are never changed.
    """
    if device_type in ("cuda", "mps"):
        chosen: Dict[str, Any] = dict(GPU_DEFAULTS)
    else:
        lo, hi = CPU_ITERATIONS
        chosen = {"iterations_per_epoch": min(hi, max(lo, CPU_ITERATIONS_PER_CASE * max(1, training_cases))),
                  "classification.interval": CPU_BAG_INTERVAL, "classification.crop_size": list(CPU_BAG_CROP)}
        its = cfg.iterations_per_epoch or chosen["iterations_per_epoch"]
        chosen["schedule.warmup_iterations"] = min(GPU_DEFAULTS["schedule.warmup_iterations"],
                                                   max(1, cfg.epochs * its // WARMUP_SHARE))
    applied: Dict[str, Any] = {}
    for key, value in chosen.items():
        owner, name = _slot(cfg, key)
        if getattr(owner, name) is None:
            setattr(owner, name, value)
            applied[key] = value
    return applied


def apply_overrides(cfg: TrainConfig, overrides: Dict[str, Any]) -> None:
    """Set ``{dotted key: value}`` on the config (None: not given); counts are checked as in a config file."""
    for key, value in overrides.items():
        if value is None:
            continue
        problem = count_problem(value, COUNTS[key]) if key in COUNTS else None
        if problem:
            raise ConfigError(f"key '{key}': {problem}")
        owner, name = _slot(cfg, key)
        setattr(owner, name, value)
