"""The background worker: a Python process (Slicer's PythonSlicer) that labels images on request.

Protocol, one JSON object per line. The worker prints ``{"event": "ready"}``, then for each request
read from stdin ``{"id", "image", "output", "model", "options", "modality"}`` (``options`` is
``LabelOptions.to_mapping()``) it prints ``{"id", "event": "progress", "fraction", "stage"}`` lines
and finally ``{"id", "event": "done", "segmentation", "tags"}`` or ``{"id", "event": "error",
"message", "details"}``. A request with a field the worker does not know, at the top or inside
``options``, is answered with an error, never run with the field dropped. It stays alive for the
next request, so the model is loaded once (the engine caches networks), and ends at end of input.
Run as ``python worker.py`` with the module folder on sys.path.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, TextIO

if TYPE_CHECKING:
    from medautolabel.options import LabelOptions

REQUEST_FIELDS = ("id", "image", "output", "model", "options", "modality")


def _send(stream: TextIO, message: Dict[str, Any]) -> None:
    """Write one message line; its text (error messages quote file names and card labels) made inert."""
    from medautolabel.text import printable_fields

    stream.write(json.dumps(printable_fields(message)) + "\n")
    stream.flush()


def read_options(request: Dict[str, Any]) -> LabelOptions:
    """The request's ``LabelOptions``, after refusing any field this worker does not know (one line)."""
    from medautolabel.errors import MedAutoLabelError
    from medautolabel.options import LabelOptions

    unknown = sorted(str(k) for k in request if k not in REQUEST_FIELDS)
    if unknown:
        raise MedAutoLabelError(f"unknown request field(s): {', '.join(unknown)}")
    return LabelOptions.from_mapping(request.get("options") or {})


def handle(request: Dict[str, Any], out: TextIO) -> None:
    """Label one image file and write ``result.seg.nrrd`` + ``result.tags.json`` into the request's output folder."""
    from medautolabel.errors import MedAutoLabelError
    from medautolabel.io.images import read_image
    from medautolabel.io.outputs import write_result
    from medautolabel.labelling.pipeline import label_image

    rid = request.get("id")
    try:
        options = read_options(request)
        image = read_image(request["image"])
        if request.get("modality"):
            image.meta["modality"] = request["modality"]

        def progress(fraction: float, stage: str) -> None:
            _send(out, {"id": rid, "event": "progress", "fraction": round(float(fraction), 4), "stage": stage})

        result = label_image(image, request["model"], options, progress=progress)
        seg, tags = write_result(result, Path(request["output"]), "result", "seg.nrrd")
        _send(out, {"id": rid, "event": "done", "segmentation": str(seg), "tags": str(tags)})
    except MedAutoLabelError as e:
        _send(out, {"id": rid, "event": "error", "message": str(e), "details": ""})
    except Exception as e:  # report, keep serving: the panel shows the details
        _send(out, {"id": rid, "event": "error", "message": f"{type(e).__name__}: {e}",
                    "details": traceback.format_exc()})


def serve(inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    _send(out, {"event": "ready"})
    for line in inp:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError:
            _send(out, {"event": "error", "message": "bad request line", "details": line[:200]})
            continue
        handle(request, out)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent  # the module folder: holds medautolabel/ and MedAutoLabelLib/
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    from medautolabel.runtime.monai_import import import_lean

    import_lean()  # this process is medautolabel's own: MONAI without the packages it never uses here
    serve()
