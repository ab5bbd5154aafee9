"""Label many files with one model: the code behind ``medautolabel label`` and Slicer's ``processFiles``.

Each input gets ``<stem>.seg.nrrd`` (or ``.nii.gz``) and ``<stem>.tags.json`` in the output folder,
written atomically. Inputs whose outputs already exist are skipped (never rewritten) unless
``overwrite``; one input's error is recorded and the others go on. Before anything is labelled,
every output is checked (``ownership.check_replaceable``): an output that is an input, or an
existing file medautolabel did not write, stops the whole run, even with ``overwrite``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.catalog.registry import resolve_model
from medautolabel.errors import Cancelled, InputError, MedAutoLabelError
from medautolabel.io.outputs import output_paths, write_result
from medautolabel.io.ownership import check_replaceable
from medautolabel.options import LabelOptions, make_options

PathLike = Union[str, Path]
# progress(case_index, case_count, fraction_of_this_case, stage)
BatchProgress = Callable[[int, int, float, str], None]

_IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_stem(path: PathLike) -> str:
    """The output name of an input: its file name without the image extension; a DICOM folder's own name.

    Never anything read from inside the file (DICOM headers hold patient names).
    """
    p = Path(path)
    name = p.name
    if p.is_dir():
        return name
    low = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def check_unique_stems(inputs: Sequence[PathLike]) -> None:
    """Refuse two inputs that would write the same output files."""
    seen: Dict[str, Path] = {}
    for path in inputs:
        stem = case_stem(path)
        if stem in seen:
            raise InputError(f"same output name {stem!r} as {seen[stem]}: rename one of them", path)
        seen[stem] = Path(path)


def check_outputs(inputs: Sequence[PathLike], out_dir: PathLike, fmt: str) -> List[List[Path]]:
    """Each input's output paths, after refusing any that is an input or a file medautolabel did not write."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MedAutoLabelError("is a file, not a folder", out)
    check_unique_stems(inputs)
    planned = [output_paths(out, case_stem(path), fmt) for path in inputs]
    check_replaceable([p for paths in planned for p in paths], inputs, overwrite=True)
    return planned


def label_files(inputs: Sequence[PathLike], out_dir: PathLike, model: Union[str, Path, ModelCard] = "vessel-nerve-cta",
                options: Optional[LabelOptions] = None, fmt: str = "seg.nrrd", overwrite: bool = False,
                progress: Optional[BatchProgress] = None, fail_fast: bool = False,
                cancel: Optional[Callable[[], bool]] = None, **changes: Any) -> List[Dict[str, Any]]:
    """Label every input; return one record per input (input, stem, status, message, seconds, outputs, result facts).

    ``options`` (a ``LabelOptions``; keyword ``changes`` such as ``device="cpu"`` amend it, as for
    ``label_image``) go unchanged to every case. ``status`` is "ok", "skipped" (outputs already
    there) or "error" (``message`` says why). The model is resolved once and its network stays
    cached between cases. ``model`` may also be a MONAI bundle folder, run only when
    ``options.trust`` (or listed as trusted, see bundle.py). ``fail_fast`` re-raises the first error;
    ``Cancelled`` always propagates. An output that would replace an input or a file medautolabel
    did not write raises ``MedAutoLabelError`` before any work.
    """
    options = make_options(options, **changes)
    from medautolabel.catalog.bundle import is_bundle
    from medautolabel.io.images import read_image  # SimpleITK import deferred: `medautolabel --help` stays fast
    from medautolabel.labelling.bundle_runner import BundleModel
    from medautolabel.labelling.pipeline import label_image

    bundle = BundleModel(model, device=options.device, trust=options.trust) if not isinstance(model, ModelCard) and \
        is_bundle(Path(str(model)).expanduser()) else None
    card = None if bundle else resolve_model(model)
    planned = check_outputs(inputs, out_dir, fmt)
    records: List[Dict[str, Any]] = []
    todo = []  # (index, path, stem, record) of the inputs to label
    for index, (path, outputs) in enumerate(zip(inputs, planned)):
        stem = case_stem(path)
        record: Dict[str, Any] = {"input": str(path), "stem": stem, "status": "ok", "message": "",
                                  "seconds": 0.0, "outputs": [str(p) for p in outputs]}
        records.append(record)
        if not overwrite and all(p.exists() for p in outputs):
            record["status"] = "skipped"
            record["message"] = "outputs already exist"
        else:
            todo.append((index, path, stem, record))
    n = len(inputs)
    # The next input is read on a second thread while this one is labelled (file I/O and decompression
    # overlap the network, on a GPU especially); at most two images are in memory.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medautolabel-read") as reader:
        upcoming = reader.submit(read_image, todo[0][1]) if todo else None
        for position, (index, _path, stem, record) in enumerate(todo):
            t0 = time.perf_counter()
            reading = upcoming
            upcoming = reader.submit(read_image, todo[position + 1][1]) if position + 1 < len(todo) else None

            def case_progress(fraction: float, stage: str, index: int = index) -> None:
                if progress is not None:
                    progress(index, n, fraction, stage)

            try:
                image = reading.result()
                if bundle is not None:
                    result = bundle.label(image, progress=case_progress)
                else:
                    result = label_image(image, card, options, progress=case_progress, cancel=cancel)
                del image
                write_result(result, out_dir, stem, fmt)
                record["facts"] = result.facts()
            except Cancelled:
                if upcoming is not None:
                    upcoming.cancel()
                raise
            except (MedAutoLabelError, MemoryError, RuntimeError) as e:
                error = e if isinstance(e, MedAutoLabelError) else _out_of_memory_error(e, _path)
                record["status"] = "error"
                record["message"] = str(error)
                if fail_fast:
                    if upcoming is not None:
                        upcoming.cancel()
                    raise error from None
            finally:
                record["seconds"] = round(time.perf_counter() - t0, 3)
    return records


def _out_of_memory_error(error: BaseException, path: PathLike) -> MedAutoLabelError:
    """The one-line user error for the machine's memory running out while ``path`` was labelled; other
    errors are bugs and are raised again as they are."""
    from medautolabel.runtime.device import is_host_out_of_memory

    if not is_host_out_of_memory(error):
        raise error
    return MedAutoLabelError("out of memory while labelling it: close other programs or use a machine with more "
                             "memory", path)
