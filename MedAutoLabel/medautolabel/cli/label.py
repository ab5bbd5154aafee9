"""``medautolabel label``: label image files and DICOM series folders with a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medautolabel.cli.parsing import probability
from medautolabel.cli.progress import CaseBars, say
from medautolabel.options import PRECISIONS, TTA_MODES, LabelOptions
from medautolabel.text import printable

LABEL_EPILOG = """examples:
  medautolabel label scan.nii.gz -o labels/
  medautolabel label dicom/series1/ dicom/series2/ -o labels/ --device cuda
  medautolabel label scans/*.nrrd -o labels/ --model ~/models/my-model --format nii.gz
Outputs per input: <stem>.seg.nrrd (or <stem>.nii.gz + <stem>.labels.csv) and <stem>.tags.json.
Inputs whose outputs exist are skipped unless --overwrite. A failing input leaves no file; the
others go on and the exit status is 2. An output that would replace an input, or a file that
medautolabel did not write, is refused before anything runs (even with --overwrite)."""




def _summary(facts: dict) -> str:
    parts = [f"{s['name']} {s['volume_ml']:.2f} mL" + (" (low confidence)" if s["low_confidence"] else "")
             for s in facts.get("segments", [])]
    parts += [f"{c['task']}: {c['label']} p={c['probability']:.2f}"
              + ("" if c.get("validated", True) else " (not validated)") for c in facts.get("classifications", [])]
    return "; ".join(parts)


def cmd_label(args: argparse.Namespace) -> int:
    """Label every input; one line per input, status 2 when any failed."""
    from medautolabel.labelling.batch import case_stem, label_files

    options = LabelOptions(device=args.device, precision=args.precision, tta=args.tta,
                           postprocess=not args.no_postprocess, low_confidence_threshold=args.low_confidence,
                           trust=args.trust)
    bars = CaseBars([case_stem(p) for p in args.inputs], args.quiet)
    try:
        records = label_files(args.inputs, args.output, model=args.model, options=options, fmt=args.format,
                              overwrite=args.overwrite, progress=bars, fail_fast=args.fail_fast)
    finally:
        bars.close()
    failed = 0
    for r in records:
        if r["status"] == "error":
            failed += 1
            print(f"medautolabel: error: {printable(r['message'])}", file=sys.stderr)
        elif r["status"] == "skipped":
            say(f"{r['stem']}: skipped, outputs already exist (use --overwrite)")
        else:
            say(f"{r['stem']}: {Path(r['outputs'][0]).name} ({r['seconds']:.1f} s) {_summary(r['facts'])}")
    return 2 if failed else 0


def register(sub) -> argparse.ArgumentParser:
    """Add the command to ``sub`` (the sub-parsers of ``medautolabel``)."""
    p = sub.add_parser("label", help="label image files or DICOM series folders",
                       description="Label images with a model; writes a segmentation and tags per input.",
                       epilog=LABEL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI, NRRD or MetaImage file, or DICOM series folder")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    p.add_argument("--model", default="vessel-nerve-cta", help="model id or model folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--format", default="seg.nrrd", choices=["seg.nrrd", "nii.gz"], help="labelmap format")
    p.add_argument("--no-postprocess", action="store_true", help="skip the per-label clean-up of the model card")
    p.add_argument("--low-confidence", type=probability, metavar="T", help="flag segments whose mean confidence is below T")
    p.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation (default: the model "
                   "card's; flip = 4 passes, flip-all = 8): more accurate, slower")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="the network's arithmetic: auto = float16 on CUDA, bfloat16 on CPUs that compute it natively "
                        "(about 2x faster), float32 otherwise (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="relabel inputs whose outputs already exist")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")
    p.add_argument("--trust", action="store_true", help="run a MONAI bundle given with --model (its configs can "
                                                        "execute Python code); see docs/bundles.md")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_label)
    return p
