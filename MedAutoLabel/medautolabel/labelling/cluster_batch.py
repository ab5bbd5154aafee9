"""``medautolabel batch``: a folder of studies labelled on a Dask cluster, resumable, with a summary CSV.

Each case runs ``batch.label_files`` for one input on a Dask worker (a local cluster of worker
processes by default, or the cluster at ``scheduler``). Finished cases (both output files present)
are skipped and never rewritten, so a killed batch is resumed by running it again (the temporaries
a kill left behind for unfinished cases go when those are written, see atomic.py). The output
folder may lie inside the input folder: its outputs, temporaries and summary.csv are never taken
for studies. A case that fails is recorded in the summary and the others go on. Workers keep their
loaded network between cases.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from medautolabel.errors import InputError, MedAutoLabelError
from medautolabel.io.atomic import atomic_output, leftover_temps, make_folder
from medautolabel.io.outputs import output_paths
from medautolabel.io.ownership import check_replaceable, file_id, is_ours
from medautolabel.labelling.batch import case_stem, check_outputs
from medautolabel.options import LabelOptions, make_options
from medautolabel.text import printable, printable_fields

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
SUMMARY = "summary.csv"


def find_cases(input_dir: PathLike, exclude: Optional[PathLike] = None) -> List[Path]:
    """Image files (by extension, any depth) and DICOM series folders (folders holding .dcm files) under ``input_dir``.

    Never a study: the folder ``exclude`` (the output folder, when it lies inside ``input_dir``) and
    what is in it, hidden files (temporaries), segmentations and files medautolabel wrote.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError("not a folder", root)
    skip = file_id(exclude) if exclude is not None else None
    cases: List[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if skip is None or file_id(here / d) != skip)  # not into the outputs
        if any(f.lower().endswith(DICOM_SUFFIXES) for f in files):
            cases.append(here)
            continue
        for name in sorted(files):
            low = name.lower()
            if low.endswith(IMAGE_SUFFIXES) and not low.endswith(".seg.nrrd") and not name.startswith(".") \
                    and not is_ours(here / name):
                cases.append(here / name)
    if not cases:
        raise InputError("no images found (NIfTI, NRRD, MetaImage files or DICOM series folders)", root)
    return cases


def _finished(case: Path, out_dir: Path, fmt: str) -> bool:
    return all(p.exists() for p in output_paths(out_dir, case_stem(case), fmt))


def _facts_from_tags(case: Path, out_dir: Path, fmt: str) -> Dict[str, Any]:
    tags = output_paths(out_dir, case_stem(case), fmt)[-1]
    try:
        return json.loads(tags.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def remove_temps(case: Path, out_dir: Path, fmt: str) -> None:
    """Remove the temporaries a killed or stopped worker left beside ``case``'s outputs."""
    for target in output_paths(out_dir, case_stem(case), fmt):
        for temp in leftover_temps(target):
            temp.unlink(missing_ok=True)


def label_case(path: str, out_dir: str, model: str, options: Mapping[str, Any], fmt: str,
               threads: int) -> Dict[str, Any]:
    """Label one case on a worker: the task Dask runs (also callable directly).

    ``options`` is ``LabelOptions.to_mapping()``: plain data travels to any worker, and a field the
    worker's medautolabel does not know fails the case instead of being dropped.
    """
    import torch

    from medautolabel.labelling.batch import label_files

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    record = label_files([path], out_dir, model=model, options=LabelOptions.from_mapping(options), fmt=fmt)[0]
    try:
        from distributed import get_worker

        record["worker"] = get_worker().name
    except (ImportError, ValueError):
        record["worker"] = "local"
    return record


def check_model(model_ref: str, options: LabelOptions) -> None:
    """Fail now, in one line, on a model the workers could not run: unknown, broken, or an untrusted bundle."""
    from medautolabel.catalog.bundle import is_bundle
    from medautolabel.catalog.registry import resolve_model
    from medautolabel.labelling.bundle_runner import BundleModel

    if is_bundle(Path(model_ref)):
        BundleModel(model_ref, device=options.device, trust=options.trust)
    else:
        resolve_model(model_ref)


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that started it ends (Linux ``prctl``).

    Dask's worker already exits when its parent's pipe closes, but only once one of its threads can
    take the GIL; a worker busy in a long native call would live on as an orphan, finish its case
    and write outputs after the batch was killed. (The kernel acts when the parent *thread* that
    started the worker ends; Dask starts each worker from a thread that lives as long as the worker.)
    Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid != os.getppid():  # the parent died before prctl took effect
        os._exit(1)


def dask_setup(worker: Any) -> None:
    """Dask preload hook (``preload=["medautolabel.labelling.cluster_batch"]``): runs in each local worker at start."""
    die_with_parent()


def _client(workers: int, scheduler: Optional[str]):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise MedAutoLabelError("'medautolabel batch' needs Dask: pip install 'medautolabel[cluster]'") from None

    if scheduler:
        return Client(scheduler), None
    with warnings.catch_warnings():  # a second batch on this machine: its scheduler's HTTP port moves, silently
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=40, preload=[__name__])
    return Client(cluster), cluster


def run_batch(cases: Sequence[PathLike], out_dir: PathLike, model: str = "vessel-nerve-cta",
              options: Optional[LabelOptions] = None, fmt: str = "seg.nrrd", workers: int = 1,
              scheduler: Optional[str] = None, threads_per_worker: Optional[int] = None,
              on_done: Optional[Callable[[Dict[str, Any], int, int], None]] = None,
              **changes: Any) -> List[Dict[str, Any]]:
    """Label ``cases`` into ``out_dir`` on Dask; write ``out_dir/summary.csv``; return one record per case.

    ``options`` (keyword ``changes`` such as ``device="cpu"`` amend it) go to every case as data.
    ``model`` is a model id, a model folder or a MONAI bundle folder (run only when ``options.trust``,
    as ``label --trust`` does). Outputs that are inputs or files medautolabel did not write are
    refused before anything runs.
    """
    options = make_options(options, **changes)
    out = Path(out_dir)
    paths = [Path(c) for c in cases]
    check_outputs(paths, out, fmt)
    check_replaceable([out / SUMMARY], paths, overwrite=True)
    model_ref = str(Path(model).resolve()) if Path(model).exists() else str(model)  # workers may run elsewhere
    check_model(model_ref, options)  # a bad model fails here, once, before any cluster starts
    make_folder(out)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, workers))

    records: Dict[Path, Dict[str, Any]] = {}
    todo = []
    for p in paths:
        if _finished(p, out, fmt):
            records[p] = {"input": str(p), "stem": case_stem(p), "status": "skipped",
                          "message": "outputs already exist", "seconds": 0.0, "worker": "",
                          "facts": _facts_from_tags(p, out, fmt)}
        else:
            todo.append(p)  # the temporaries a killed run left for it go when it is written (atomic.py)
    done = len(records)
    if todo:
        client, cluster = _client(workers, scheduler)
        from distributed import as_completed

        try:
            futures = {client.submit(label_case, str(p), str(out), model_ref, options.to_mapping(), fmt, threads,
                                     pure=False): p for p in todo}
            for future in as_completed(futures):
                p = futures[future]
                try:
                    records[p] = future.result()
                except Exception as e:  # a crash inside one case (not a user error) must not stop the batch
                    records[p] = {"input": str(p), "stem": case_stem(p), "status": "error",
                                  "message": f"{p}: {type(e).__name__}: {e}", "seconds": 0.0, "worker": ""}
                done += 1
                if on_done is not None:
                    on_done(records[p], done, len(paths))
        except BaseException:  # interrupted: the command says so in one line; Dask's shutdown complaints stay quiet
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
            raise
        finally:
            client.close()
            if cluster is not None:
                cluster.close()  # its workers have ended: what an interrupted one was writing goes too
                for p in todo:
                    remove_temps(p, out, fmt)
    ordered = [records[p] for p in paths]
    write_summary(ordered, out / SUMMARY)
    return ordered


def summary_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One flat row per case: case, status, seconds, message, worker, each tag's class, p and whether it is
    validated ("no": it missed its validation targets), each segment's mL (none for a classification-only
    model). A sigmoid task's findings are tags of their own ("<task>/<class>")."""
    rows = []
    for r in records:
        facts = r.get("facts") or {}
        row: Dict[str, Any] = {"case": r["stem"], "input": r["input"], "status": r["status"],
                               "seconds": r.get("seconds", 0.0), "message": r.get("message", ""),
                               "worker": r.get("worker", "")}
        for c in facts.get("classifications", []):
            row[c["task"]] = c["label"]
            row[f"{c['task']} p"] = round(float(c["probability"]), 4)
            row[f"{c['task']} validated"] = "yes" if c.get("validated", True) else "no"
        for s in facts.get("segments", []):
            row[f"{s['name']} mL"] = round(float(s["volume_ml"]), 4)
        rows.append(row)
    return rows


def write_summary(records: Sequence[Dict[str, Any]], path: PathLike) -> Path:
    """Write the summary CSV atomically (columns: the union over cases, in first-seen order); its text
    (file names, labels and classes from model cards, messages) made inert by ``text.printable``."""
    rows = [printable_fields({printable(k): v for k, v in row.items()}) for row in summary_rows(records)]
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    target = Path(path)
    with atomic_output(target) as tmp:
        Path(tmp).write_text(buffer.getvalue(), encoding="utf-8")
    return target
