"""Training data: an MSD/nnU-Net-style folder or a MONAI datalist JSON -> a list of cases.

Accepted layouts:

- a folder with ``dataset.json`` (MSD: ``"labels": {"0": "background", "1": "vessel"}`` and a
  ``"training"`` list of ``{"image", "label"}``; nnU-Net v2: ``"labels": {"background": 0,
  "vessel": 1}`` and ``imagesTr/<case>_0000<ext>`` + ``labelsTr/<case><ext>`` found by name);
- a MONAI datalist JSON file (``"training"`` and optionally ``"validation"`` lists of
  ``{"image", "label"}``, paths relative to the file's folder; optional ``"labels"``).

Optional image-level classes: ``"classes": {"aneurysm": ["absent", "present"]}`` at the top and
``"classes": {"aneurysm": "present"}`` per case. Messages name files (the user's own paths) but
progress output names cases by their index only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from medautolabel.image import Image
from medautolabel.training.config import ConfigError


@dataclass
class Case:
    """One labelled training case."""

    index: int  # position in the dataset (used in progress output instead of file names)
    image: Path
    label: Path
    classes: Dict[str, str] = field(default_factory=dict)  # task -> class name


@dataclass
class Dataset:
    root: Path
    cases: List[Case]
    labels: Dict[int, str]  # label value -> name (background excluded)
    classes: Dict[str, Tuple[str, str]]  # task -> (absent, present)
    modality: Optional[str] = None
    validation: Optional[List[Case]] = None  # an explicit validation list (datalist), else split by seed
    name: str = ""


def _labels(raw: Any, where: Path) -> Dict[int, str]:
    """MSD ``{"1": "vessel"}`` or nnU-Net v2 ``{"vessel": 1}`` -> {1: "vessel"} (background dropped)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("key 'labels': expected an object mapping label values to names", where)
    out: Dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, str) and str(k).strip().lstrip("-").isdigit():
            value, name = int(k), v
        elif isinstance(v, int) and not isinstance(v, bool):
            value, name = v, str(k)
        else:
            raise ConfigError(f"key 'labels.{k}': expected \"value\": \"name\" (MSD) or \"name\": value "
                              "(nnU-Net; region lists are not supported)", where)
        if value == 0:
            continue
        if not 0 < value < 65536:
            raise ConfigError(f"key 'labels.{k}': label value {value} is outside 1..65535", where)
        out[value] = name
    return out


def _classes(raw: Any, where: Path) -> Dict[str, Tuple[str, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) and v[0] != v[1]
            for v in raw.values()):
        raise ConfigError("key 'classes': expected {\"task\": [\"absent\", \"present\"]}", where)
    return {str(k): (v[0], v[1]) for k, v in raw.items()}


def _modality(raw: Any) -> Optional[str]:
    if isinstance(raw, dict):
        raw = raw.get("0", next(iter(raw.values()), None)) if len(raw) == 1 else "multi"
    if not isinstance(raw, str):
        return None
    name = raw.strip().upper()
    if name == "MULTI":
        return name
    return {"MRI": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "PET": "PT"}.get(name, name)


def _entries(raw: Any, base: Path, where: Path, classes: Dict[str, Tuple[str, str]], key: str) -> List[Case]:
    if not isinstance(raw, list):
        raise ConfigError(f"key '{key}': expected a list of {{\"image\", \"label\"}}", where)
    out = []
    for n, e in enumerate(raw):
        if not isinstance(e, dict) or "image" not in e or "label" not in e:
            raise ConfigError(f"key '{key}[{n}]': expected {{\"image\": ..., \"label\": ...}}", where)
        if not isinstance(e["image"], str) or not isinstance(e["label"], str):
            raise ConfigError(f"key '{key}[{n}]': expected one image and one label file per case "
                              "(several input images per case are not supported)", where)
        case_classes = e.get("classes") or {}
        for task, value in case_classes.items():
            if task not in classes or value not in classes[task]:
                raise ConfigError(f"key '{key}[{n}].classes.{task}': {value!r} is not a class listed in "
                                  "the top-level 'classes'", where)
        out.append(Case(n, (base / e["image"]).resolve(), (base / e["label"]).resolve(), dict(case_classes)))
    return out


def _nnunet_cases(root: Path, ending: str) -> List[Case]:
    """nnU-Net v2 naming: imagesTr/<case>_0000<ending> with labelsTr/<case><ending>."""
    cases = []
    for n, img in enumerate(sorted((root / "imagesTr").glob(f"*_0000{ending}"))):
        stem = img.name[: -len(f"_0000{ending}")]
        if (root / "imagesTr" / f"{stem}_0001{ending}").exists():
            raise ConfigError("several input images per case (_0001) are not supported", img.parent)
        cases.append(Case(n, img.resolve(), (root / "labelsTr" / f"{stem}{ending}").resolve()))
    return cases


def load_dataset(path: Union[str, Path]) -> Dataset:
    """Read a dataset folder (with dataset.json) or a datalist JSON; check that every file exists."""
    path = Path(path).expanduser()
    if path.is_dir():
        json_path = path / "dataset.json"
        if not json_path.is_file():
            raise ConfigError("not a dataset: expected dataset.json (MSD/nnU-Net) in the folder", path)
    elif path.is_file():
        json_path = path
    else:
        raise ConfigError("dataset not found", path)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the dataset description ({type(e).__name__})", json_path) from None
    if not isinstance(meta, dict):
        raise ConfigError("expected a JSON object", json_path)
    base = json_path.parent.resolve()
    classes = _classes(meta.get("classes"), json_path)
    if "training" in meta:
        cases = _entries(meta["training"], base, json_path, classes, "training")
    else:
        cases = _nnunet_cases(base, str(meta.get("file_ending", ".nii.gz")))
    validation = None
    if meta.get("validation"):
        validation = _entries(meta["validation"], base, json_path, classes, "validation")
        for n, c in enumerate(validation):
            c.index = len(cases) + n
    if not cases:
        raise ConfigError("the dataset lists no training cases", json_path)
    for c in cases + (validation or []):
        for f in (c.image, c.label):
            if not f.is_file():
                raise ConfigError(f"case {c.index}: file not found", f)
    modality = _modality(meta.get("modality", meta.get("channel_names")))
    if modality == "MULTI":
        raise ConfigError("several input modalities per case are not supported", json_path)
    return Dataset(base, cases, _labels(meta.get("labels"), json_path), classes, modality, validation,
                   str(meta.get("name", "")))


def split(dataset: Dataset, fraction: float, seed: int,
          max_cases: Optional[int] = None) -> Tuple[List[Case], List[Case]]:
    """(training, validation) cases: the dataset's own validation list, else a fixed split by ``seed``."""
    if dataset.validation is not None:
        val = dataset.validation
        return list(dataset.cases), list(val[:max_cases] if max_cases else val)
    n = len(dataset.cases)
    n_val = 0 if fraction <= 0 or n < 2 else min(max(1, round(fraction * n)), n - 1)
    if max_cases is not None:
        n_val = min(n_val, max_cases)
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    return ([c for c in dataset.cases if c.index not in val_idx],
            [c for c in dataset.cases if c.index in val_idx])


def read_image(path: Path) -> Image:
    """Read an image file with the engine's reader (medautolabel.io.images), or nibabel for NIfTI without it."""
    try:
        from medautolabel.io.images import read_image as engine_read
    except ImportError:  # medautolabel.io.images is written in parallel; NIfTI needs no more than nibabel
        engine_read = None
    if engine_read is not None:
        return engine_read(path)
    import nibabel as nib

    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds of errors on bad files
        raise ConfigError(f"cannot read the image ({type(e).__name__})", path) from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ConfigError(f"expected a 3D image, got shape {array.shape}", path)
    # nibabel: array (i, j, k) with an (i, j, k) -> RAS affine; the engine holds (k, j, i)
    return Image(np.ascontiguousarray(array.T), img.affine, {})
