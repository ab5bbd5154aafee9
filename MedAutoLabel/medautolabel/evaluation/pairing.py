"""Find prediction/reference pairs by case name and read their labelmaps, label names and classes.

Case names: a file's name without its extension and without an MSD channel suffix ``_0000``
(``case_name``); a ``<case>.tags.json`` and a ``labels.csv`` case cell follow the same rule
(``plain_case``), so ``scan_0000.nii.gz``, ``scan.tags.json`` and the cell ``scan`` are one case.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from medautolabel.errors import InputError
from medautolabel.image import Image
from medautolabel.limits import MAX_JSON_DEPTH, json_depth_exceeds

PathLike = Union[str, Path]
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TAGS_SUFFIX = ".tags.json"
CASE_LABELS = "labels.csv"  # the class reference a REF folder may hold (io/case_labels.py)


def case_name(path: PathLike) -> Optional[str]:
    """The case a labelmap file belongs to (``scan_0000.nii.gz`` -> ``scan``), or None for other files."""
    name = Path(path).name
    low = name.lower()
    for suffix in LABELMAP_SUFFIXES:
        if low.endswith(suffix):
            return _no_channel(name[: -len(suffix)])
    return None


def _no_channel(stem: str) -> str:
    return stem[:-5] if stem.endswith("_0000") else stem


def plain_case(name: str) -> str:
    """A case name as pairing compares it: a labelmap extension and an MSD ``_0000`` suffix removed."""
    return case_name(name) or _no_channel(name)


def tags_case(path: PathLike) -> Optional[str]:
    """The case of a ``<case>.tags.json`` file, or None for other files."""
    name = Path(path).name
    return plain_case(name[: -len(TAGS_SUFFIX)]) if name.lower().endswith(TAGS_SUFFIX) and \
        len(name) > len(TAGS_SUFFIX) else None


def tags_path(labelmap: Path) -> Path:
    """The ``<stem>.tags.json`` beside a prediction labelmap (it may not exist)."""
    return labelmap.parent / f"{labelmap.name[: -len(_suffix(labelmap))]}{TAGS_SUFFIX}"


def tags_files(path: PathLike) -> Dict[str, Path]:
    """Case name -> ``<case>.tags.json``, for a folder of predictions (not recursive), one tags file, or one
    prediction labelmap (its tags file beside it). For class-only evaluation: labelmaps are not needed."""
    p = Path(path)
    if p.is_file():
        tags = tags_path(p) if case_name(p) is not None else p
        name = tags_case(tags)
        if name is None or not tags.is_file():
            raise InputError("no <case>.tags.json prediction to compare with the classes of labels.csv", p)
        return {name: tags}
    return _files_by_case(p, tags_case, "tags files",
                          "no <case>.tags.json files found (predictions to compare with labels.csv)")


def class_reference_file(ref: PathLike) -> Optional[Path]:
    """The case labels table of REF: REF itself when it is a ``.csv`` file, ``REF/labels.csv`` when REF is a
    folder holding one, else None (classes then come from a dataset.json, if any)."""
    p = Path(ref)
    if p.is_file():
        return p if p.name.lower().endswith(".csv") else None
    table = p / CASE_LABELS
    return table if table.is_file() else None


def has_labelmaps(path: PathLike) -> bool:
    """True when ``path`` is a labelmap file or a folder holding one (not recursive)."""
    p = Path(path)
    if p.is_file():
        return case_name(p) is not None
    return p.is_dir() and any(case_name(f) is not None and not f.name.startswith(".") for f in p.iterdir())


def labelmap_files(path: PathLike) -> Dict[str, Path]:
    """Case name -> labelmap file, for a file or a folder (not recursive)."""
    p = Path(path)
    if p.is_file():
        name = case_name(p)
        if name is None:
            raise InputError("not a labelmap file (.seg.nrrd, .nii.gz, .nii, .nrrd, .mha)", p)
        return {name: p}
    return _files_by_case(p, case_name, "labelmaps", "no labelmap files found")


def _files_by_case(folder: Path, name_of: Callable[[Path], Optional[str]], what: str,
                   none_found: str) -> Dict[str, Path]:
    """Case name -> file of a folder (not recursive, hidden files left out) whose ``name_of`` is a case;
    two files of one case, or none at all, are refused."""
    if not folder.is_dir():
        raise InputError("no such file or folder", folder)
    out: Dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        name = name_of(f)
        if name is None or f.name.startswith("."):
            continue
        if name in out:
            raise InputError(f"two {what} for case {name!r}: {out[name].name} and {f.name}", folder)
        out[name] = f
    if not out:
        raise InputError(none_found, folder)
    return out


def pair_cases(pred: PathLike, ref: PathLike) -> Tuple[List[Tuple[str, Path, Path]], List[str]]:
    """(case, prediction, reference) for every predicted case, and the reference cases nobody predicted.

    A prediction without a reference is an error naming its file; references without a prediction
    are returned (and reported), never silently averaged away.
    """
    preds, refs = labelmap_files(pred), labelmap_files(ref)
    if Path(pred).is_file() and Path(ref).is_file():
        return [(next(iter(refs)), next(iter(preds.values())), next(iter(refs.values())))], []
    for name, p in preds.items():
        if name not in refs:
            raise InputError(f"no reference labelmap for case {name!r} in {ref}", p)
    missing = sorted(name for name in refs if name not in preds)
    return [(name, preds[name], refs[name]) for name in sorted(preds)], missing


@dataclass
class Labelmap:
    image: Image
    names: Dict[int, str] = field(default_factory=dict)  # label value -> name, when the file says


def _read_json_object(path: Path) -> dict:
    """A JSON object from ``path``; InputError for invalid JSON, absurd nesting or another top-level type."""
    try:
        text = path.read_text(encoding="utf-8")
        if json_depth_exceeds(text):
            raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", path)
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError("not valid JSON", path) from None
    except OSError as e:
        raise InputError(f"cannot be read ({type(e).__name__})", path) from None
    if not isinstance(doc, dict):
        raise InputError("expected a JSON object", path)
    return doc


def _dataset_json_path(path: Path) -> Optional[Path]:
    """The dataset.json beside a labelmap or one folder up (MSD: labelsTr/ beside dataset.json), if any."""
    return next((f / "dataset.json" for f in (path.parent, path.parent.parent) if (f / "dataset.json").is_file()),
                None)


def _dataset_json(path: Path) -> Optional[dict]:
    source = _dataset_json_path(path)
    return None if source is None else _read_json_object(source)


def read_labelmap(path: Path) -> Labelmap:
    """A labelmap with its label names: from the .seg.nrrd, ``<case>.labels.csv`` or a dataset.json nearby."""
    from medautolabel.io.images import read_image
    from medautolabel.io.segnrrd import read_seg_nrrd

    if path.name.lower().endswith(".seg.nrrd"):
        image, segments = read_seg_nrrd(path)
        return Labelmap(image, {s.label_value: s.name for s in segments})
    image = read_image(path)
    names: Dict[int, str] = {}
    table = path.parent / f"{case_name(path)}.labels.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                names[int(row["value"])] = row["name"]
    else:
        meta = _dataset_json(path) or {}
        names = {int(k): v for k, v in meta.get("labels", {}).items() if int(k) != 0}
    if image.array.dtype.kind == "f":
        if not np.all(np.isfinite(image.array)):
            raise InputError("the labelmap holds NaN or infinite values, which are no label values", path)
        image = Image(image.array.round().astype("int32"), image.ijk_to_ras, image.meta)
    return Labelmap(image, names)


def reference_classes(ref_path: Path) -> Tuple[Optional[Path], Dict[str, str]]:
    """(the dataset.json, task -> class) of a reference case from its dataset.json entry (``classes``);
    (None, {}) without a dataset.json."""
    source = _dataset_json_path(ref_path)
    if source is None:
        return None, {}
    meta = _read_json_object(source)
    case = case_name(ref_path)
    entries: list = []
    for key in ("training", "test"):
        value = meta.get(key) or []
        if not isinstance(value, list):
            raise InputError(f"'{key}' must be a list of cases", source)
        entries += value
    for entry in entries:
        if isinstance(entry, dict) and case_name(str(entry.get("label", ""))) == case:
            classes = entry.get("classes", {})
            if not isinstance(classes, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                        for k, v in classes.items()):
                raise InputError(f"case {case!r}: 'classes' must map task names to class names", source)
            return source, dict(classes)
    return source, {}


def read_tags(tags: Path) -> Dict[str, Dict[str, float]]:
    """task -> class probabilities of a ``<case>.tags.json``; InputError when they are malformed (a task twice,
    fewer than two classes, a probability that is not a number in [0, 1])."""
    doc = _read_json_object(tags)
    out: Dict[str, Dict[str, float]] = {}
    try:
        for c in doc.get("classifications", []):
            task, probabilities = str(c["task"]), c["probabilities"]
            if task in out:
                raise InputError(f"task {task!r} is given twice", tags)
            out[task] = {str(k): float(v) for k, v in probabilities.items()}
            if len(out[task]) < 2 or not all(0.0 <= v <= 1.0 for v in out[task].values()):
                raise InputError(f"task {task!r}: expected a probability in [0, 1] for each of two or more classes",
                                 tags)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError("not a medautolabel tags file: its classifications are malformed", tags) from None
    return out


def predicted_classes(pred_path: Path) -> Dict[str, Dict[str, float]]:
    """task -> class probabilities from the prediction labelmap's ``<case>.tags.json``, if present."""
    tags = tags_path(pred_path)
    return read_tags(tags) if tags.is_file() else {}


def _suffix(path: Path) -> str:
    low = path.name.lower()
    return next(s for s in LABELMAP_SUFFIXES if low.endswith(s))
