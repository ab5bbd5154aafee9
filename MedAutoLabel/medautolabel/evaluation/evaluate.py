"""Evaluate prediction labelmaps against references: per case and label, per class, and the report files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from medautolabel import __version__
from medautolabel.errors import InputError
from medautolabel.evaluation.align import to_reference_grid
from medautolabel.evaluation.classes import ClassReference, evaluate_classes
from medautolabel.evaluation.metrics import STATUSES, segment_metrics
from medautolabel.evaluation.pairing import (
    class_reference_file,
    has_labelmaps,
    labelmap_files,
    pair_cases,
    plain_case,
    predicted_classes,
    read_labelmap,
    read_tags,
    reference_classes,
    tags_files,
    tags_path,
)
from medautolabel.evaluation.report import summarise, write_csv, write_html, write_summary
from medautolabel.evaluation.worst import WorstCases
from medautolabel.image import Image
from medautolabel.io.atomic import atomic_outputs, make_folder
from medautolabel.io.case_labels import check_known_cases, read_case_labels
from medautolabel.io.ownership import EVALUATION_FORMAT, REPORT_FILES, check_replaceable

PathLike = Union[str, Path]


def evaluate_labelmaps(pred: Image, ref: Image, labels: Dict[int, str]) -> List[Dict[str, Any]]:
    """Metrics of one prediction against its reference, per label value in ``labels`` (value -> name).

    The prediction is compared on the reference's grid (resampled, nearest neighbour, in physical
    space when the grids differ; an InputError when they barely overlap). Each row: label, name,
    dice, hd95_mm, msd_mm, volume_pred_ml, volume_ref_ml, volume_diff_ml, volume_diff_percent, resampled.
    Labels present in either labelmap but not in ``labels`` get a row too, and every row has a
    ``status`` (see metrics.py). This is what the Slicer module's Evaluate section calls.
    """
    aligned, resampled = to_reference_grid(pred, ref)
    rows = segment_metrics(aligned, ref, labels)
    for r in rows:
        r["resampled"] = resampled
    return rows


def evaluate_cases(pred: PathLike, ref: PathLike, images: Optional[PathLike] = None) -> Dict[str, Any]:
    """Evaluate every (prediction, reference) pair; returns {"rows": [...], "summary": {...}, "slices": [...]}.

    REF is a folder of labelmaps, one labelmap, a folder holding labelmaps and a ``labels.csv``, or a
    ``labels.csv`` (alone, or in a folder without labelmaps: the classes are evaluated and no masks,
    and PRED needs only ``<case>.tags.json`` files). Class references come from the ``labels.csv``
    when there is one, else from the references' dataset.json. ``images`` (a folder, as ``label``
    finds images in it) gives the worst-case slices their background. A bad ``labels.csv`` is
    refused before any labelmap is read.
    """
    table_path = class_reference_file(ref)
    table = read_case_labels(table_path) if table_path is not None else None
    reference = ClassReference.from_case_labels(table) if table is not None else ClassReference()
    worst = WorstCases()
    rows: List[Dict[str, Any]] = []
    predictions: Dict[str, Tuple[Optional[Path], Dict[str, Dict[str, float]]]] = {}
    if table is not None and not has_labelmaps(ref):
        tags = tags_files(pred)
        for case, path in tags.items():
            if case not in reference.labels:
                raise InputError(f"no reference class for case {case!r} in {table_path}", path)
            predictions[case] = (path, read_tags(path))
        cases = sorted(tags)
        missing = sorted(case for case in reference.labels if case not in tags)
    else:
        pairs, missing = pair_cases(pred, ref)
        if table is not None:  # a class reference without a reference labelmap would be silently unused
            with_labelmap = set(labelmap_files(ref))
            check_known_cases(table, [c for c in table.labels if plain_case(c) in with_labelmap], table.path,
                              f"reference labelmap in {Path(ref).name} (give {table.path.name} itself as REF "
                              "to evaluate the classes alone)")
        cases = []
        for case, pred_path, ref_path in pairs:
            rows.extend(_segment_rows(case, pred_path, ref_path, worst))
            cases.append(case)
            tags_file = tags_path(pred_path)
            predictions[case] = (tags_file if tags_file.is_file() else None, predicted_classes(pred_path))
            if table is None:
                source, classes = reference_classes(ref_path)
                if source is not None:
                    reference.add(case, classes, source)
    if images is not None and worst.slices():
        worst.add_images(image_files(images))
    summary: Dict[str, Any] = {"format": EVALUATION_FORMAT, "medautolabel_version": __version__,
                               "cases": cases, "not_predicted": missing, "segmentation": summarise(rows),
                               "label_status": status_counts(rows),
                               "classification": evaluate_classes(cases, reference, predictions),
                               "worst_cases": [s.facts() for s in worst.slices()]}
    return {"rows": rows, "summary": summary, "slices": worst.slices()}


def _segment_rows(case: str, pred_path: Path, ref_path: Path, worst: WorstCases) -> List[Dict[str, Any]]:
    """The metrics rows of one case (every label of either labelmap); its worst slices offered to ``worst``."""
    p, r = read_labelmap(pred_path), read_labelmap(ref_path)
    names = {**p.names, **r.names}  # segment_metrics adds every value present in either labelmap
    aligned, resampled = to_reference_grid(p.image, r.image, pred_path)
    rows = segment_metrics(aligned, r.image, names)
    for row in rows:
        row.update(case=case, resampled=resampled)
        worst.offer(case, row, aligned, r.image)
    return rows


def image_files(folder: PathLike) -> Dict[str, Path]:
    """Case name -> image (file or DICOM series folder) of the images under ``folder``, found as ``label`` finds
    them; named as pairing names cases."""
    from medautolabel.labelling.batch import case_stem
    from medautolabel.labelling.cluster_batch import find_cases

    return {plain_case(case_stem(path)): path for path in find_cases(folder)}


def status_counts(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """Per label name: how many cases had it in both, only in the prediction, only in the reference, in neither."""
    out: Dict[str, Dict[str, int]] = {}
    for r in rows:
        counts = out.setdefault(r["name"], {s: 0 for s in STATUSES})
        counts[r["status"]] += 1
    return out


def write_report(evaluation: Dict[str, Any], report_dir: PathLike, command: str = "") -> Path:
    """Write metrics.csv, summary.json and report.html into ``report_dir``, all three or none.

    Only these three files are written; an existing one is replaced only when medautolabel wrote
    it (ownership.py), and nothing else in ``report_dir`` is touched.
    """
    target = Path(report_dir)
    files = [target / name for name in REPORT_FILES]
    check_replaceable(files, overwrite=True)
    make_folder(target)
    summary = dict(evaluation["summary"], command=command)
    with atomic_outputs(files) as temps:
        write_csv(evaluation["rows"], temps[0])
        write_summary(summary, temps[1])
        write_html(evaluation["rows"], summary, temps[2], evaluation.get("slices", ()))
    return target
