"""``medautolabel train``: the command line of the trainer (``register`` adds it to the main CLI)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from medautolabel.cli.parsing import OneLineParser, positive_int
from medautolabel.errors import MedAutoLabelError
from medautolabel.io.atomic import make_folder
from medautolabel.io.ownership import check_new_folder

EPILOG = """examples:
  medautolabel train Dataset001 -o models/my-model
  medautolabel train Dataset001 -o models/my-model --config train.json --epochs 50
  medautolabel train Dataset001 -o models/my-model --resume           (after a crash)
  medautolabel train Dataset001 -o models/tuned --from vessel-nerve-cta
  medautolabel train Cases -o models/my-classifier            (images + labels.csv: classifiers only)
  medautolabel train phantoms -o models/vessel-nerve-cta --config vessel-nerve-cta --from vessel-nerve-cta --classifiers-only
  torchrun --nproc_per_node 4 -m medautolabel.training Dataset001 -o models/my-model
See docs/training.md."""

# Command-line options that set a config key: {key: argparse dest}.
OPTIONS = {"epochs": "epochs", "iterations_per_epoch": "iterations", "classification.interval": "bag_interval",
           "train_segmentation": "train_segmentation"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="dataset folder (imagesTr/, labelsTr/, dataset.json; or images + "
                                           "labels.csv) or a MONAI datalist JSON")
    p.add_argument("-o", "--output", type=Path, required=True, dest="model_dir",
                   help="model folder to write (model.json, model.pt, training/)")
    p.add_argument("--config", help="training config file (JSON, or YAML with PyYAML) or the name of a built-in "
                                     "config (vessel-nerve-cta); default: built-in defaults")
    p.add_argument("--from", dest="base", metavar="MODEL",
                   help="fine-tune this model (id or folder; the built-in one included): keeps its labels, "
                        "adds the dataset's new ones")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--epochs", type=positive_int, help="number of epochs (overrides the config)")
    p.add_argument("--iterations", type=positive_int, metavar="N", help="optimiser steps per epoch (overrides the config's "
                                                               "iterations_per_epoch; default: 250 on a GPU, from "
                                                               "the dataset size on a CPU)")
    p.add_argument("--bag-interval", type=positive_int, metavar="N", help="a classification bag every N steps (overrides "
                                                                 "classification.interval; default: 1 on a GPU, 4 on "
                                                                 "a CPU)")
    p.add_argument("--classifiers-only", dest="train_segmentation", action="store_const", const=False,
                   help="train only the classifiers (config 'classifiers'); with --from, the base model's segmentation "
                        "network is kept as it is")
    p.add_argument("--resume", action="store_true", help="continue the run in MODEL_DIR from its last saved epoch")
    p.add_argument("--overwrite", action="store_true", help="train into a MODEL_DIR that is not empty, replacing "
                                                            "only a model medautolabel trained there")
    p.add_argument("--cache", type=Path, help="HDF5 cache file of preprocessed cases (default: in the user cache "
                                              "folder, one per dataset)")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help=argparse.SUPPRESS)  # tests: stop as if killed


def _refuse_unwritable(folder: Path) -> None:
    """A read-only or forbidden place fails first, in one line, and nothing is made for a run refused later.

    The nearest existing folder must be writable; when it is not, ``make_folder`` is left to fail
    with the system's reason (read-only file system, permission denied).
    """
    existing = folder.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        make_folder(folder)


def run(args: argparse.Namespace) -> int:
    """Run ``medautolabel train`` from parsed arguments; returns the exit status."""
    from medautolabel.training.config import load_config
    from medautolabel.training.loop import train
    from medautolabel.training.preflight import check_training

    command = "medautolabel train " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    overrides = {key: getattr(args, dest) for key, dest in OPTIONS.items()}
    try:  # the counts given as options were checked by the parser (positive_int), with the config's wording
        if not args.resume:
            load_config(args.config)  # a broken config fails before any folder is made
        if not args.resume and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 checks, before it writes
            check_new_folder(args.model_dir, [args.model_dir / "model.json", args.model_dir / "model.pt"],
                             [args.data], args.overwrite)
            _refuse_unwritable(args.model_dir)
            # the dataset, its case labels and the classifiers: a refused run makes no folder
            check_training(args.data, args.model_dir, args.config, args.base, overrides)
            make_folder(args.model_dir)
        train(args.data, args.model_dir, config=args.config, base=args.base, device=args.device,
              overrides=overrides, resume=args.resume, cache_path=args.cache, command=command,
              stop_after_epochs=args.stop_after)
    except MedAutoLabelError as e:
        print(f"medautolabel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medautolabel: error: interrupted: continue with --resume", file=sys.stderr)
        return 130
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the main CLI's subparsers; the parser's ``func(args)`` runs it."""
    p = subparsers.add_parser("train", help="train a model on your own labelled images",
                              description="Train (or fine-tune) a segmentation model; writes a model folder that "
                                          "'medautolabel label --model MODEL_DIR' and Slicer use as is.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m medautolabel.training DATA -o MODEL_DIR ...`` (also what torchrun runs)."""
    p = OneLineParser(prog="medautolabel train", description="Train a MedAutoLabel model.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    return run(args)
