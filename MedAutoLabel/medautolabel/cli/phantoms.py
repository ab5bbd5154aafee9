"""``medautolabel phantoms``: write an MSD-style dataset of synthetic CT angiograms with labels."""

from __future__ import annotations

import argparse
from pathlib import Path

from medautolabel.cli.parsing import non_negative_int, positive_int
from medautolabel.cli.progress import fraction_bar


def cmd_phantoms(args: argparse.Namespace) -> int:
    """Write the phantom dataset."""
    from medautolabel.synthetic.phantoms import write_dataset

    progress, close = fraction_bar("phantoms", args.quiet)
    try:
        out = write_dataset(args.output, args.n, seed=args.seed, progress=progress, overwrite=args.overwrite)
    finally:
        close()
    print(f"wrote {args.n} phantoms (seeds {args.seed}-{args.seed + args.n - 1}) to {out}")
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add the command to ``sub`` (the sub-parsers of ``medautolabel``)."""
    p = sub.add_parser("phantoms", help="write a dataset of synthetic CT angiograms with labels",
                       description="Write an MSD-style dataset (imagesTr/, labelsTr/, dataset.json) of phantoms: "
                                   "vessel trees, nerves, sometimes a saccular aneurysm; random oblique, "
                                   "anisotropic grids and looks. Deterministic per seed.",
                       epilog="example:\n  medautolabel phantoms -o Dataset001 -n 20 --seed 0",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, type=Path, help="dataset folder")
    p.add_argument("-n", type=positive_int, default=10, help="number of phantoms (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="first seed; case c uses seed+c (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty, replacing "
                                                            "only the dataset files medautolabel wrote there")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantoms)
    return p
