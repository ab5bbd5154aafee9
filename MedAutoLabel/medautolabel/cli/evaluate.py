"""``medautolabel evaluate``: predictions against references -> metrics.csv, summary.json, report.html."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from medautolabel.cli.parsing import OneLineParser
from medautolabel.errors import MedAutoLabelError

EPILOG = """examples:
  medautolabel evaluate labels/ Dataset001/labelsTr -o report/
  medautolabel evaluate labels/case01.seg.nrrd refs/case01.nii.gz -o report/
  medautolabel evaluate --model vessel-nerve-cta --images Dataset001/imagesTr Dataset001/labelsTr -o report/
Pairs files by case name (extensions and an MSD _0000 suffix ignored). Classes are read from the
predictions' <case>.tags.json and the references' dataset.json. REPORT_DIR must be new or empty
(or hold an earlier report, with --overwrite); it is never an input. See docs/evaluation.md."""


def run(args: argparse.Namespace) -> int:
    from medautolabel.evaluation.evaluate import evaluate_cases, write_report
    from medautolabel.io.ownership import REPORT_FILES, check_new_folder

    command = "medautolabel evaluate " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    try:
        inputs = [*args.paths, *([args.images] if args.images else [])]
        check_new_folder(args.output, [args.output / name for name in REPORT_FILES], inputs, args.overwrite)
        if args.model:
            if len(args.paths) != 1 or not args.images:
                raise MedAutoLabelError("with --model give --images DIR and one REF folder")
            from medautolabel.labelling.batch import label_files

            with tempfile.TemporaryDirectory(prefix="medautolabel-eval-") as tmp:
                from medautolabel.labelling.cluster_batch import find_cases

                records = label_files(find_cases(args.images), tmp, model=args.model, device=args.device)
                failed = [r for r in records if r["status"] == "error"]
                if failed:
                    raise MedAutoLabelError(failed[0]["message"])
                evaluation = evaluate_cases(tmp, args.paths[0])
        else:
            if len(args.paths) != 2:
                raise MedAutoLabelError("give PRED and REF (or --model M --images DIR REF)")
            evaluation = evaluate_cases(args.paths[0], args.paths[1])
        out = write_report(evaluation, args.output, command)
    except MedAutoLabelError as e:
        print(f"medautolabel: error: {e}", file=sys.stderr)
        return 2
    missing = evaluation["summary"]["not_predicted"]
    if missing:
        print(f"note: {len(missing)} reference case(s) have no prediction and are not in the averages: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    for name, m in evaluation["summary"]["segmentation"].items():
        d = m["dice"]
        print(f"{name}: Dice mean {d.get('mean', float('nan')):.3f} (median {d.get('median', float('nan')):.3f}, "
              f"{d['n']} cases)")
    for task, c in evaluation["summary"]["classification"].items():
        print(f"{task}: ROC AUC {c['roc_auc']:.3f}, accuracy {c['accuracy']:.3f} ({c['n']} cases)")
    print(f"wrote {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'report.html'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PRED REF", help="prediction and reference (folders or files)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="REPORT_DIR", help="report folder")
    p.add_argument("--model", help="predict first with this model (id or folder), from --images")
    p.add_argument("--images", type=Path, help="images to predict (with --model)")
    p.add_argument("--device", default="auto", help="device for --model (auto, cpu, cuda, mps)")
    p.add_argument("--overwrite", action="store_true", help="write into a REPORT_DIR that is not empty, replacing "
                                                            "only a report medautolabel wrote there")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to the main CLI."""
    p = subparsers.add_parser("evaluate", help="measure predictions against reference labels",
                              description="Dice, HD95, mean surface distance and volume difference per case and "
                                          "label; accuracy, sensitivity, specificity, ROC AUC and confusion matrix "
                                          "per class; writes metrics.csv, summary.json and report.html.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = OneLineParser(prog="medautolabel evaluate", epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    return run(args)
