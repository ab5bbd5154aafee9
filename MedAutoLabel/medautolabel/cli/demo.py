"""``medautolabel demo``: label a held-out synthetic CT angiogram and score it against its reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from medautolabel.cli.parsing import non_negative_int
from medautolabel.cli.progress import fraction_bar


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo and print its Dice lines and the files it wrote."""
    from medautolabel.synthetic.demo import run_demo

    progress, close = fraction_bar("demo", args.quiet)
    try:
        report = run_demo(args.out, device=args.device, seed=args.seed, progress=progress)
    finally:
        close()
    for line in report.lines:
        print(line)
    print(f"wrote {', '.join(str(p) for p in report.files.values())}")
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add the command to ``sub`` (the sub-parsers of ``medautolabel``)."""
    p = sub.add_parser("demo", help="label a synthetic CT angiogram and score it against its reference",
                       description="Make one held-out phantom, label it with the built-in model, write "
                                   "phantom.nrrd, phantom-reference.seg.nrrd, phantom.seg.nrrd, phantom.tags.json "
                                   "and phantom.png, and print each segment's Dice.",
                       epilog="example:\n  medautolabel demo --out out/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--seed", type=non_negative_int, default=None, help="phantom seed outside the training seeds "
                                                          "(default: the fixed demo seed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return p
