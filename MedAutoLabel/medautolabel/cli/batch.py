"""``medautolabel batch``: a folder of studies labelled on a Dask cluster, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medautolabel.cli.parsing import positive_int
from medautolabel.options import LabelOptions
from medautolabel.text import printable


def cmd_batch(args: argparse.Namespace) -> int:
    """Label the studies of a folder on Dask; print the counts and where the summary is."""
    from tqdm import tqdm

    from medautolabel.labelling.cluster_batch import SUMMARY, find_cases, run_batch

    options = LabelOptions(device=args.device, trust=args.trust)
    cases = find_cases(args.input_dir, exclude=args.output)
    bar = tqdm(total=len(cases), desc="cases", unit="case", disable=True if args.quiet else None)

    def on_done(record: dict, done: int, total: int) -> None:
        bar.update(1)
        if record["status"] == "error":
            tqdm.write(f"medautolabel: error: {printable(record['message'])}", file=sys.stderr)

    try:
        records = run_batch(cases, args.output, model=args.model, options=options, fmt=args.format,
                            workers=args.workers, scheduler=args.scheduler, on_done=on_done)
    finally:
        bar.close()
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "error")}
    print(f"{counts['ok']} labelled, {counts['skipped']} already done, {counts['error']} failed; "
          f"summary: {Path(args.output) / SUMMARY}")
    return 2 if counts["error"] else 0


def register(sub) -> argparse.ArgumentParser:
    """Add the command to ``sub`` (the sub-parsers of ``medautolabel``)."""
    p = sub.add_parser("batch", help="label a folder of studies on a Dask cluster (resumable)",
                       description="Label every image file and DICOM series folder under INPUT_DIR, in parallel "
                                   "worker processes (a local Dask cluster, or --scheduler). Finished cases are "
                                   "skipped, so rerun a killed batch to resume it; a failing case is recorded and "
                                   "the others go on. Writes OUT/summary.csv (case, status, seconds, tags with p and "
                                   "validated, segment volumes).",
                       epilog="examples:\n  medautolabel batch studies/ -o labels/ --workers 2\n"
                              "  medautolabel batch /data/studies -o /data/labels --scheduler tcp://head:8786",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input_dir", type=Path, metavar="INPUT_DIR", help="folder of images / DICOM series folders")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument("--model", default="vessel-nerve-cta", help="model id or folder (visible to every worker)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (on each worker)")
    p.add_argument("--format", default="seg.nrrd", choices=["seg.nrrd", "nii.gz"], help="labelmap format")
    p.add_argument("--workers", type=positive_int, default=1, help="local worker processes (default: %(default)s)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--trust", action="store_true", help="run a MONAI bundle given with --model (its configs can "
                                                        "execute Python code); see docs/bundles.md")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)
    return p
