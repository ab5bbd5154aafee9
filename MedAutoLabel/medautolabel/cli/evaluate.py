"""``medautolabel evaluate``: predictions against references -> metrics.csv, summary.json, report.html."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from medautolabel.cli.parsing import OneLineParser
from medautolabel.errors import MedAutoLabelError
from medautolabel.text import printable

EPILOG = """examples:
  medautolabel evaluate labels/ Dataset001/labelsTr -o report/
  medautolabel evaluate labels/case01.seg.nrrd refs/case01.nii.gz -o report/
  medautolabel evaluate --model vessel-nerve-cta --images Dataset001/imagesTr Dataset001/labelsTr -o report/
  medautolabel evaluate labels/ Dataset001/labels.csv -o report/        (classes only)
Pairs files by case name (extensions and an MSD _0000 suffix ignored). Classes are read from the
predictions' <case>.tags.json and from REF's labels.csv (columns case,task,class), else from the
references' dataset.json. --images puts the worst cases' slices over their images. REPORT_DIR must
be new or empty (or hold an earlier report, with --overwrite); it is never an input.
See docs/evaluation.md."""


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
                evaluation = evaluate_cases(tmp, args.paths[0], images=args.images)
        else:
            if len(args.paths) != 2:
                raise MedAutoLabelError("give PRED and REF (or --model M --images DIR REF)")
            evaluation = evaluate_cases(args.paths[0], args.paths[1], images=args.images)
        out = write_report(evaluation, args.output, command)
    except MedAutoLabelError as e:
        print(f"medautolabel: error: {e}", file=sys.stderr)
        return 2
    _print_summary(evaluation["summary"])
    print(f"wrote {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'report.html'}")
    return 0


def _listing(names) -> str:
    """The first five names (made inert), then '...' when there are more."""
    return printable(", ".join(names[:5])) + (" ..." if len(names) > 5 else "")


def _print_summary(summary) -> None:
    """One line per label and per task on stdout; cases left out of the averages on stderr."""
    if summary["not_predicted"]:
        print(f"note: {len(summary['not_predicted'])} reference case(s) have no prediction and are not in the "
              f"averages: {_listing(summary['not_predicted'])}", file=sys.stderr)
    for name, m in summary["segmentation"].items():
        d = m["dice"]
        print(f"{printable(name)}: Dice mean {d.get('mean', float('nan')):.3f} "
              f"(median {d.get('median', float('nan')):.3f}, {d['n']} cases)")
    for task, c in summary["classification"].items():
        if c["not_predicted"]:
            print(f"note: task {printable(task)}: {len(c['not_predicted'])} case(s) whose prediction lacks it are "
                  f"not counted: {_listing(c['not_predicted'])}", file=sys.stderr)
        if not c["n"]:
            print(f"{printable(task)}: no prediction has this task")
            continue
        auc = "ROC AUC" if len(c["classes"]) == 2 else "macro ROC AUC"
        print(f"{printable(task)}: {auc} {c['roc_auc']:.3f}, accuracy {c['accuracy']:.3f}, balanced accuracy "
              f"{c['balanced_accuracy']:.3f} ({c['n']} cases, {len(c['misclassified'])} misclassified)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PRED REF", help="prediction and reference (folders or files; REF "
                                                               "may be or hold a labels.csv of classes)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="REPORT_DIR", help="report folder")
    p.add_argument("--model", help="predict first with this model (id or folder), from --images")
    p.add_argument("--images", type=Path, help="images to predict (with --model); also the background of the "
                                               "worst cases' slices in report.html")
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
