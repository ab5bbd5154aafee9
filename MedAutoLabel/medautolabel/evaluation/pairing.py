"""Find prediction/reference pairs by case name and read their labelmaps, label names and classes."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from medautolabel.errors import InputError
from medautolabel.image import Image
from medautolabel.limits import MAX_JSON_DEPTH, json_depth_exceeds

PathLike = Union[str, Path]
LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_name(path: PathLike) -> Optional[str]:
    """The case a labelmap file belongs to (``scan_0000.nii.gz`` -> ``scan``), or None for other files."""
    name = Path(path).name
    low = name.lower()
    for suffix in LABELMAP_SUFFIXES:
        if low.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem[:-5] if stem.endswith("_0000") else stem
    return None


def labelmap_files(path: PathLike) -> Dict[str, Path]:
    """Case name -> labelmap file, for a file or a folder (not recursive)."""
    p = Path(path)
    if p.is_file():
        name = case_name(p)
        if name is None:
            raise InputError("not a labelmap file (.seg.nrrd, .nii.gz, .nii, .nrrd, .mha)", p)
        return {name: p}
    if not p.is_dir():
        raise InputError("no such file or folder", p)
    out: Dict[str, Path] = {}
    for f in sorted(p.iterdir()):
        name = case_name(f)
        if name is None or f.name.startswith("."):
            continue
        if name in out:
            raise InputError(f"two labelmaps for case {name!r}: {out[name].name} and {f.name}", p)
        out[name] = f
    if not out:
        raise InputError("no labelmap files found", p)
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


def _dataset_json(path: Path) -> Optional[dict]:
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "dataset.json"
        if candidate.is_file():
            return _read_json_object(candidate)
    return None


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


def reference_classes(ref_path: Path) -> Dict[str, str]:
    """Image-level classes of a reference case from its dataset.json entry (``classes``), if any."""
    meta = _dataset_json(ref_path) or {}
    case = case_name(ref_path)
    for entry in meta.get("training", []) + meta.get("test", []):
        if isinstance(entry, dict) and case_name(str(entry.get("label", ""))) == case:
            return dict(entry.get("classes", {}))
    return {}


def predicted_classes(pred_path: Path) -> Dict[str, Dict[str, float]]:
    """task -> class probabilities from the prediction's ``<case>.tags.json``, if present."""
    tags = pred_path.parent / f"{pred_path.name[: -len(_suffix(pred_path))]}.tags.json"
    if not tags.is_file():
        return {}
    doc = _read_json_object(tags)
    try:
        return {str(c["task"]): {str(k): float(v) for k, v in c["probabilities"].items()}
                for c in doc.get("classifications", [])}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InputError("not a medautolabel tags file: its classifications are malformed", tags) from None


def _suffix(path: Path) -> str:
    low = path.name.lower()
    return next(s for s in LABELMAP_SUFFIXES if low.endswith(s))
