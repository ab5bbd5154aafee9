"""Which files medautolabel may replace: never an input, never a file it did not write, never a whole folder.

Every command that writes files asks ``claim_outputs`` first. A file is *ours* when it carries
medautolabel's marker for its kind (one marker per kind, read by ``is_ours``):

- ``<stem>.tags.json``: ``"format": "medautolabel-tags/1"``; it names its labelmap
  (``labelmap_file``), which makes ``<stem>.seg.nrrd`` / ``<stem>.nii.gz`` / ``<stem>.labels.csv`` ours too;
- an evaluation report: ``summary.json`` with ``"format": "medautolabel-evaluation/1"``; its
  ``metrics.csv`` and ``report.html`` beside it are ours with it;
- an exported bundle: ``configs/medautolabel.json`` with ``"format": "medautolabel-bundle-sidecar/1"``;
  the bundle's other files are ours with it;
- a phantom dataset: ``dataset.json`` with ``"reference": "medautolabel.synthetic.phantoms"``; the images and
  labels it lists are ours with it;
- a trained model: ``model.json`` whose provenance says ``"trained_by": "medautolabel train"``;
  the weights it names are ours with it;
- ``summary.csv`` of ``batch``: its header row starts with ``case,input,status,``.

Files are compared by identity (device and inode, through symlinks and hard links), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Set, Tuple, Union

from medautolabel.errors import MedAutoLabelError
from medautolabel.limits import json_depth_exceeds

PathLike = Union[str, "os.PathLike[str]"]

TAGS_FORMAT = "medautolabel-tags/1"
EVALUATION_FORMAT = "medautolabel-evaluation/1"
BUNDLE_SIDECAR_FORMAT = "medautolabel-bundle-sidecar/1"
PHANTOMS_REFERENCE = "medautolabel.synthetic.phantoms"
TRAINED_BY = "medautolabel train"
SUMMARY_CSV_HEADER = "case,input,status,"
REPORT_FILES = ("metrics.csv", "summary.json", "report.html")
BUNDLE_FILES = ("configs/inference.json", "configs/metadata.json", "configs/medautolabel.json",
                "models/model.pt", "docs/README.md")


def file_id(path: PathLike) -> Optional[Tuple[int, int]]:
    """(device, inode) of what ``path`` points to (symlinks followed), or None when it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _input_ids(inputs: Iterable[PathLike]) -> Set[Tuple[int, int]]:
    """Identities of the inputs and, for input folders (DICOM series), of the files directly in them."""
    ids: Set[Tuple[int, int]] = set()
    for path in inputs:
        ident = file_id(path)
        if ident is None:
            continue
        ids.add(ident)
        if os.path.isdir(path):
            with contextlib.suppress(OSError), os.scandir(path) as entries:  # unreadable: its reader says so
                ids.update(i for i in (file_id(e.path) for e in entries) if i is not None)
    return ids


def _json(path: Path) -> Dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing, unreadable, too big, too deep or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > 50_000_000:
            return {}
        text = path.read_text(encoding="utf-8")
        doc = None if json_depth_exceeds(text) else json.loads(text)
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(4096)
    except OSError:
        return ""


def _tags_of(path: Path) -> Optional[Path]:
    """The ``<stem>.tags.json`` that would own the labelmap / label table ``path``."""
    for suffix in (".seg.nrrd", ".nii.gz", ".labels.csv"):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".tags.json")
    return None


def _our_tags(path: Path) -> Dict[str, Any]:
    """The ``<stem>.tags.json`` of ours beside the labelmap / label table ``path``, or {}."""
    tags_path = _tags_of(path)
    tags = _json(tags_path) if tags_path is not None else {}
    return tags if tags.get("format") == TAGS_FORMAT else {}


def labelmap_tags(path: PathLike) -> Optional[Path]:
    """The ``<stem>.tags.json`` of ours that names ``path`` as its labelmap (a result medautolabel wrote), or None."""
    p = Path(path)
    return _tags_of(p) if _our_tags(p).get("labelmap_file") == p.name else None


def _owned_by_tags(path: Path) -> bool:
    """A labelmap its tags.json names, or the label table beside a NIfTI labelmap its tags.json names."""
    labelmap = str(_our_tags(path).get("labelmap_file", ""))
    if not labelmap or path.name == labelmap:
        return bool(labelmap)
    return path.name.endswith(".labels.csv") and labelmap == path.name[: -len(".labels.csv")] + ".nii.gz"


def _owned_by_listing(path: Path) -> bool:
    """A report, bundle, phantom dataset or model file, owned through the marker file of its folder."""
    folder = path.parent
    if path.name in REPORT_FILES:
        return _json(folder / "summary.json").get("format") == EVALUATION_FORMAT
    for root in (folder, folder.parent):
        relative = path.relative_to(root).as_posix()
        if relative in BUNDLE_FILES and \
                _json(root / "configs" / "medautolabel.json").get("format") == BUNDLE_SIDECAR_FORMAT:
            return True
        dataset = _json(root / "dataset.json")
        if dataset.get("reference") == PHANTOMS_REFERENCE and any(
                relative in (str(c.get(k, "")).removeprefix("./") for k in ("image", "label"))
                for c in dataset.get("training", []) if isinstance(c, dict)):
            return True
    card = _json(folder / "model.json")
    provenance = card.get("provenance") if isinstance(card.get("provenance"), dict) else {}
    if provenance.get("trained_by") == TRAINED_BY:
        weights = (card.get("network") or {}).get("weights") if isinstance(card.get("network"), dict) else None
        return path.name == weights
    return False


def is_ours(path: PathLike) -> bool:
    """True when ``path`` is a file medautolabel wrote (its kind's marker, see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        return False
    name = p.name
    if name.endswith(".tags.json"):
        return _json(p).get("format") == TAGS_FORMAT
    if name == "summary.json":
        return _json(p).get("format") == EVALUATION_FORMAT
    if name == "medautolabel.json" and p.parent.name == "configs":
        return _json(p).get("format") == BUNDLE_SIDECAR_FORMAT
    if name == "dataset.json":
        return _json(p).get("reference") == PHANTOMS_REFERENCE
    if name == "model.json":
        provenance = _json(p).get("provenance")
        return isinstance(provenance, dict) and provenance.get("trained_by") == TRAINED_BY
    if name == "summary.csv":
        return _first_line(p).startswith(SUMMARY_CSV_HEADER)
    return _owned_by_tags(p) or _owned_by_listing(p)


def check_not_input(targets: Sequence[PathLike], inputs: Iterable[PathLike]) -> None:
    """Refuse any target that is one of ``inputs`` (same file by device and inode, any name or link)."""
    ids = _input_ids(inputs)
    for target in targets:
        ident = file_id(target)
        if ident is not None and ident in ids:
            raise MedAutoLabelError("is an input: refusing to replace it (choose another output location)", target)


def check_replaceable(targets: Sequence[PathLike], inputs: Iterable[PathLike] = (), overwrite: bool = True) -> None:
    """Refuse to write ``targets`` over an input, a folder, or an existing file that is not ours.

    Existing files of ours are replaced only when ``overwrite``; otherwise the message says to add
    ``--overwrite``. Nothing is written or removed here.
    """
    from medautolabel.io.atomic import output_error

    check_not_input(targets, inputs)
    for target in targets:
        p = Path(target)
        try:
            present = os.path.lexists(p)
            is_folder = p.is_dir()
        except OSError as e:  # a name too long, a file where a folder should be, ...
            raise output_error(e, p) from None
        if is_folder:
            raise MedAutoLabelError("is a folder, not a file", p)
        if not present:
            continue
        if not is_ours(p):
            raise MedAutoLabelError("exists and was not written by medautolabel: refusing to replace it "
                                    "(move it away or choose another output location)", p)
        if not overwrite:
            raise MedAutoLabelError("exists: use --overwrite to replace it", p)


def check_new_folder(folder: PathLike, targets: Sequence[PathLike], inputs: Iterable[PathLike] = (),
                     overwrite: bool = False) -> None:
    """Refuse ``folder`` as the place of a new set of ``targets`` unless it is absent or empty.

    With ``overwrite`` a non-empty folder is accepted; then only the ``targets`` that are ours are
    replaced (``check_replaceable``) and every other file in it stays as it is.
    """
    p = Path(folder)
    check_not_input([p], inputs)
    if p.exists() and not p.is_dir():
        raise MedAutoLabelError("is a file, not a folder", p)
    if p.is_dir() and any(True for _ in p.iterdir()) and not overwrite:
        raise MedAutoLabelError("folder is not empty: choose a new folder, or use --overwrite to replace "
                                "only what medautolabel wrote there before", p)
    check_replaceable(targets, inputs, overwrite=True)
