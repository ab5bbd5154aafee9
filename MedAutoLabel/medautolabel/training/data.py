"""Training data: a dataset folder or a MONAI datalist JSON -> a list of cases, with or without masks.

Accepted layouts (docs/training.md, "The data"):

- a folder with ``dataset.json`` (MSD: ``"labels": {"0": "background", "1": "vessel"}`` and a
  ``"training"`` list of ``{"image", "label"}``; nnU-Net v2: ``"labels": {"background": 0,
  "vessel": 1}`` and ``imagesTr/<case>_0000<ext>`` + ``labelsTr/<case><ext>`` found by name);
- a MONAI datalist JSON file (``"training"`` and optionally ``"validation"`` lists of
  ``{"image", "label"}``, paths relative to the file's folder; optional ``"labels"``);
- a folder with case labels in ``labels.csv`` (columns ``case,task,class``, read by
  ``io.case_labels``) and no dataset.json: its images are ``imagesTr/`` (masks, where there are
  some, ``labelsTr/<case><ext>``) or, without ``imagesTr/``, every image file and DICOM series
  folder in it (``cluster_batch.find_cases``; no masks).

Image-level classes (case labels) come from ``labels.csv`` beside the dataset description (or in
the folder), or from dataset.json: ``"classes": {"aneurysm": ["absent", "present"]}`` (two or more
classes per task) at the top and ``"classes": {"aneurysm": "present"}`` per case. Both at once are
refused: there is no rule that says which one to believe. A case's name (what a ``labels.csv`` row
names) is its image file name without the extension and an nnU-Net ``_0000`` suffix, or its DICOM
folder's name (``evaluation.pairing.plain_case``, the rule ``evaluate`` uses). In a dataset with case
labels masks are optional (``Case.label`` None); without case labels every listed mask must exist.
Messages name files (the user's own paths) but progress output names cases by their index only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from medautolabel.evaluation.classes import ClassReference
from medautolabel.evaluation.pairing import plain_case
from medautolabel.image import Image
from medautolabel.io.case_labels import check_known_cases, read_case_labels
from medautolabel.labelling.batch import case_stem
from medautolabel.labelling.cluster_batch import IMAGE_SUFFIXES, find_cases
from medautolabel.training.config import ConfigError

CASE_LABELS = "labels.csv"


@dataclass
class Case:
    """One training case: an image, its mask (None without one) and its case labels."""

    index: int  # position in the dataset (used in progress output instead of file names)
    image: Path
    label: Optional[Path]  # the mask; None: this case has case labels only
    classes: Dict[str, str] = field(default_factory=dict)  # task -> class name
    name: str = ""  # the case name a labels.csv row gives (plain_case of the image's name)


@dataclass
class Dataset:
    root: Path
    cases: List[Case]
    labels: Dict[int, str]  # label value -> name (background excluded)
    classes: Dict[str, Tuple[str, ...]]  # task -> its classes (two or more; a two-class task: negative, positive)
    modality: Optional[str] = None
    validation: Optional[List[Case]] = None  # an explicit validation list (datalist), else split by seed
    name: str = ""
    class_file: Optional[Path] = None  # where the case labels came from (labels.csv or dataset.json), for messages

    def all_cases(self) -> List[Case]:
        """The training cases and the datalist's own validation cases, if any."""
        return self.cases + (self.validation or [])


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


def _classes(raw: Any, where: Path) -> Dict[str, Tuple[str, ...]]:
    """dataset.json's top-level ``classes``: task -> two or more distinct class names, in the file's order."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
            isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v)
            for v in raw.values()):
        raise ConfigError("key 'classes': expected {\"task\": [\"absent\", \"present\", ...]} (two or more "
                          "distinct class names per task)", where)
    return {str(k): tuple(v) for k, v in raw.items()}


def _modality(raw: Any) -> Optional[str]:
    if isinstance(raw, dict):
        raw = raw.get("0", next(iter(raw.values()), None)) if len(raw) == 1 else "multi"
    if not isinstance(raw, str):
        return None
    name = raw.strip().upper()
    if name == "MULTI":
        return name
    return {"MRI": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "PET": "PT"}.get(name, name)


def case_of(image: Path) -> str:
    """The case name of an image file or DICOM folder: ``scan_0000.nii.gz`` -> ``scan`` (as ``evaluate`` pairs)."""
    return plain_case(case_stem(image))


def _entries(raw: Any, base: Path, where: Path, classes: Dict[str, Tuple[str, ...]], key: str) -> List[Case]:
    if not isinstance(raw, list):
        raise ConfigError(f"key '{key}': expected a list of {{\"image\", \"label\"}}", where)
    out = []
    for n, e in enumerate(raw):
        if not isinstance(e, dict) or "image" not in e:
            raise ConfigError(f"key '{key}[{n}]': expected {{\"image\": ..., \"label\": ...}}", where)
        if not isinstance(e["image"], str) or not isinstance(e.get("label", ""), (str, type(None))):
            raise ConfigError(f"key '{key}[{n}]': expected one image and one label file per case "
                              "(several input images per case are not supported)", where)
        case_classes = e.get("classes") or {}
        for task, value in case_classes.items():
            if task not in classes or value not in classes[task]:
                raise ConfigError(f"key '{key}[{n}].classes.{task}': {value!r} is not a class listed in "
                                  "the top-level 'classes'", where)
        image = (base / e["image"]).resolve()
        label = (base / e["label"]).resolve() if e.get("label") else None
        out.append(Case(n, image, label, dict(case_classes), case_of(image)))
    return out


def _nnunet_cases(root: Path, ending: str, masks_optional: bool) -> List[Case]:
    """nnU-Net v2 naming: imagesTr/<case>_0000<ending> with labelsTr/<case><ending>."""
    cases = []
    for n, img in enumerate(sorted((root / "imagesTr").glob(f"*_0000{ending}"))):
        stem = img.name[: -len(f"_0000{ending}")]
        if (root / "imagesTr" / f"{stem}_0001{ending}").exists():
            raise ConfigError("several input images per case (_0001) are not supported", img.parent)
        label: Optional[Path] = (root / "labelsTr" / f"{stem}{ending}").resolve()
        if masks_optional and not label.is_file():
            label = None
        cases.append(Case(n, img.resolve(), label, name=stem))
    return cases


def _folder_cases(root: Path) -> List[Case]:
    """The cases of a folder without dataset.json: ``imagesTr/`` (+ ``labelsTr/``), else every image in ``root``."""
    images_dir = root / "imagesTr"
    images = find_cases(images_dir if images_dir.is_dir() else root)
    by_name: Dict[str, Path] = {}
    for image in images:
        name = case_of(image)
        if name in by_name:
            raise ConfigError(f"two images for case {name!r}: {by_name[name].name} and {image.name}", image.parent)
        by_name[name] = image
    for name, image in by_name.items():  # c_0001 beside c_0000: a second input channel of case c
        channel = re.fullmatch(r"(.+)_\d{4}", name)
        if channel and channel.group(1) in by_name and "_0000" in by_name[channel.group(1)].name:
            raise ConfigError("several input images per case (_0001) are not supported", image)
    cases = []
    for n, (name, image) in enumerate(by_name.items()):
        label = None
        if images_dir.is_dir():
            label = next((root / "labelsTr" / f"{name}{ext}" for ext in IMAGE_SUFFIXES
                          if (root / "labelsTr" / f"{name}{ext}").is_file()), None)
        cases.append(Case(n, image.resolve(), None if label is None else label.resolve(), name=name))
    return cases


def _read_meta(json_path: Path) -> Dict[str, Any]:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the dataset description ({type(e).__name__})", json_path) from None
    if not isinstance(meta, dict):
        raise ConfigError("expected a JSON object", json_path)
    return meta


def _apply_case_labels(table_path: Path, cases: List[Case]) -> Dict[str, Tuple[str, ...]]:
    """Give every case its classes from ``labels.csv`` (``io.case_labels``: bad tables refused naming the row);
    a row whose case has no image is refused. Returns task -> classes."""
    table = read_case_labels(table_path)
    by_case = ClassReference.from_case_labels(table).labels  # cells compared as case names, as evaluate does
    names = {c.name for c in cases}
    check_known_cases(table, [cell for cell in table.labels if plain_case(cell) in names], table_path)
    for c in cases:
        c.classes = dict(by_case.get(c.name, {}))
    return {task: tuple(order) for task, order in table.classes.items()}


def _unique_names(cases: List[Case], where: Path) -> None:
    """Case labels find their case by name: two images with one name would share a row."""
    seen: Dict[str, Case] = {}
    for c in cases:
        if c.name in seen:
            raise ConfigError(f"cases {seen[c.name].index} and {c.index} have the same case name "
                              f"({seen[c.name].image.name}, {c.image.name}): a labels.csv row could not tell them "
                              "apart", where)
        seen[c.name] = c


def load_dataset(path: Union[str, Path]) -> Dataset:
    """Read a dataset (folder or datalist JSON, see the module docstring); check that every file exists."""
    path = Path(path).expanduser()
    if path.is_dir():
        json_path: Optional[Path] = path / "dataset.json" if (path / "dataset.json").is_file() else None
        base = path.resolve()
        if json_path is None and not (base / CASE_LABELS).is_file():
            raise ConfigError("not a dataset: expected dataset.json (MSD/nnU-Net) or labels.csv (case labels) "
                              "in the folder", path)
    elif path.is_file():
        json_path, base = path, path.parent.resolve()
    else:
        raise ConfigError("dataset not found", path)
    table = base / CASE_LABELS if (base / CASE_LABELS).is_file() else None
    meta = _read_meta(json_path) if json_path is not None else {}
    where = json_path or base
    classes = _classes(meta.get("classes"), where)
    validation = None
    if json_path is None:
        cases = _folder_cases(base)
    elif "training" in meta:
        cases = _entries(meta["training"], base, where, classes, "training")
    else:
        cases = _nnunet_cases(base, str(meta.get("file_ending", ".nii.gz")), masks_optional=table is not None)
    if meta.get("validation"):
        validation = _entries(meta["validation"], base, where, classes, "validation")
        for n, c in enumerate(validation):
            c.index = len(cases) + n
    if not cases:
        raise ConfigError("the dataset lists no training cases", where)
    every = cases + (validation or [])
    for c in every:  # an image may be a DICOM series folder; a mask is a file
        for f, found in ((c.image, c.image.exists()), (c.label, c.label is None or c.label.is_file())):
            if not found:
                raise ConfigError(f"case {c.index}: file not found", f)
    class_file = json_path if classes else None
    if table is not None:
        if classes or any(c.classes for c in every):
            raise ConfigError(f"case labels in both {CASE_LABELS} and dataset.json's \"classes\"; keep one", where)
        _unique_names(every, base)
        classes, class_file = _apply_case_labels(table, every), table
    elif all(c.label is None for c in every) and not classes:
        raise ConfigError("no masks and no case labels: add labelsTr/ masks, or case labels in labels.csv (case,task,"
                          "class) or dataset.json's \"classes\"", where)
    modality = _modality(meta.get("modality", meta.get("channel_names")))
    if modality == "MULTI":
        raise ConfigError("several input modalities per case are not supported", where)
    return Dataset(base, cases, _labels(meta.get("labels"), where), classes, modality, validation,
                   str(meta.get("name", "")), class_file)


def unlabelled(dataset: Dataset) -> Dict[str, int]:
    """Task -> how many cases (validation list included) have no class for it: they sit out that task."""
    every = dataset.all_cases()
    return {task: n for task in dataset.classes if (n := sum(task not in c.classes for c in every))}


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
