"""Write a labelling ``Result`` to files: a segmentation plus ``<stem>.tags.json``, all or nothing.

- ``fmt="seg.nrrd"``: ``<stem>.seg.nrrd`` (Slicer segmentation) and ``<stem>.tags.json``.
- ``fmt="nii.gz"``: ``<stem>.nii.gz`` (uint8 labelmap), ``<stem>.labels.csv`` (value, name, r, g, b
  as 0-255, terminology entry) and ``<stem>.tags.json``.

Every file is written under a hidden temporary name and renamed into place only when all of them
were written, so a failure leaves none of them behind.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, List, Sequence, Union

import numpy as np

from medautolabel import __version__
from medautolabel.errors import MedAutoLabelError
from medautolabel.io.atomic import atomic_outputs, make_folder
from medautolabel.io.images import write_image
from medautolabel.io.ownership import TAGS_FORMAT
from medautolabel.io.segnrrd import labelmap_uint8, write_seg_nrrd
from medautolabel.result import Result, SegmentInfo
from medautolabel.terminology import terminology_entry
from medautolabel.text import printable

PathLike = Union[str, Path]
FORMATS = ("seg.nrrd", "nii.gz")


def output_paths(out_dir: PathLike, stem: str, fmt: str = "seg.nrrd") -> List[Path]:
    """The files ``write_result`` writes for ``stem`` in ``out_dir`` (labelmap first, tags last)."""
    if fmt not in FORMATS:
        raise MedAutoLabelError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise MedAutoLabelError(f"invalid output name {stem!r}: a plain file name is needed")
    out = Path(out_dir)
    names = [f"{stem}.seg.nrrd"] if fmt == "seg.nrrd" else [f"{stem}.nii.gz", f"{stem}.labels.csv"]
    return [out / n for n in names + [f"{stem}.tags.json"]]


def write_result(result: Result, out_dir: PathLike, stem: str, fmt: str = "seg.nrrd") -> List[Path]:
    """Write ``result`` as ``fmt`` plus ``<stem>.tags.json`` into ``out_dir``; return the paths."""
    paths = output_paths(out_dir, stem, fmt)
    make_folder(paths[0].parent)
    try:
        labelmap = result.labelmap.with_array(labelmap_uint8(result.labelmap, result.segments))
    except ValueError as e:
        raise MedAutoLabelError(f"cannot write the result: {e}", paths[0]) from None
    # tags.json, the marker that makes the others ours (ownership.py), is renamed into place first: a
    # SIGKILL between two renames leaves a marker without its labelmap, which a rerun replaces, never
    # a labelmap without its marker, which a rerun would have to refuse as someone else's file
    with atomic_outputs([paths[-1], *paths[:-1]]) as (tags_temp, *temps):
        if fmt == "seg.nrrd":
            write_seg_nrrd(labelmap, result.segments, temps[0], atomic=False)
        else:
            write_image(labelmap, temps[0], atomic=False)
            write_label_table(result.segments, temps[1])
        write_tags(result, tags_temp, labelmap_file=paths[0].name)
    return paths


def write_label_table(segments: Sequence[SegmentInfo], path: PathLike) -> None:
    """CSV with one row per segment: value, name, r, g, b (0-255), Slicer terminology entry."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["value", "name", "r", "g", "b", "terminology"])
        for s in segments:
            rgb = [round(255 * min(max(float(c), 0.0), 1.0)) for c in s.color]
            w.writerow([int(s.label_value), printable(s.name), *rgb, terminology_entry(s.terminology)])


def tags_document(result: Result, labelmap_file: str = "") -> dict:
    """The JSON-ready content of ``<stem>.tags.json``."""
    doc = {"format": TAGS_FORMAT, "medautolabel_version": __version__}
    if labelmap_file:
        doc["labelmap_file"] = labelmap_file
    doc.update(result.facts())
    return _jsonable(doc)


def write_tags(result: Result, path: PathLike, labelmap_file: str = "") -> None:
    """Write ``tags_document(result)`` as UTF-8 JSON (strict: no NaN/Infinity)."""
    text = json.dumps(tags_document(result, labelmap_file), indent=2, ensure_ascii=False, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _jsonable(x: Any) -> Any:
    """numpy scalars/arrays, tuples and paths -> JSON types; NaN and infinities -> None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return str(x)
