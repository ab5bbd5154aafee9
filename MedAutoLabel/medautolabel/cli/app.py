"""The ``medautolabel`` command: label, demo, phantoms, models, train (and the commands registered below).

Errors a user can cause print one line ``medautolabel: error: <file>: <problem>`` and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional

from medautolabel import __version__
from medautolabel.cli.parsing import OneLineParser, non_negative_int, positive_int, probability
from medautolabel.errors import MedAutoLabelError, Terminated
from medautolabel.text import printable

# Commands that use MONAI: their process imports it without the optional packages it never needs
# (monai_import.py; 3.4 s of a 7.4 s start on a 2-core CPU).
MONAI_COMMANDS = frozenset({"label", "demo", "batch", "train", "evaluate"})

# Modules that add their own sub-command with ``register(subparsers)``; the parser's ``func(args)``
# runs it and returns the exit status.
COMMAND_MODULES = (
    "medautolabel.cli.train",
    "medautolabel.cli.evaluate",
)

LABEL_EPILOG = """examples:
  medautolabel label scan.nii.gz -o labels/
  medautolabel label dicom/series1/ dicom/series2/ -o labels/ --device cuda
  medautolabel label scans/*.nrrd -o labels/ --model ~/models/my-model --format nii.gz
Outputs per input: <stem>.seg.nrrd (or <stem>.nii.gz + <stem>.labels.csv) and <stem>.tags.json.
Inputs whose outputs exist are skipped unless --overwrite. A failing input leaves no file; the
others go on and the exit status is 2. An output that would replace an input, or a file that
medautolabel did not write, is refused before anything runs (even with --overwrite)."""


def _bar(desc: str):
    """A tqdm bar over 0..100 % (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=100, desc=desc, unit="%", leave=False, disable=None,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")


class _CaseBars:
    """Progress of one case after another, created lazily so that an early error prints nothing else."""

    def __init__(self, names: List[str], quiet: bool) -> None:
        self.names, self.quiet = names, quiet
        self.bar: Any = None
        self.index = -1

    def __call__(self, index: int, count: int, fraction: float, stage: str) -> None:
        if self.quiet:
            return
        if index != self.index:
            self.close()
            self.index = index
            self.bar = _bar(f"[{index + 1}/{count}] {self.names[index]}")
        self.bar.n = round(100 * fraction)
        self.bar.set_postfix_str(stage, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(line: str) -> None:
    """Print one line of output that quotes untrusted text (card names, labels, file names) inertly."""
    print(printable(line))


def _summary(facts: dict) -> str:
    parts = [f"{s['name']} {s['volume_ml']:.2f} mL" + (" (low confidence)" if s["low_confidence"] else "")
             for s in facts.get("segments", [])]
    parts += [f"{c['task']}: {c['label']} p={c['probability']:.2f}" for c in facts.get("classifications", [])]
    return "; ".join(parts)


def cmd_label(args: argparse.Namespace) -> int:
    from medautolabel.labelling.batch import case_stem, label_files

    bars = _CaseBars([case_stem(p) for p in args.inputs], args.quiet)
    try:
        records = label_files(args.inputs, args.output, model=args.model, device=args.device, fmt=args.format,
                              overwrite=args.overwrite, postprocess=not args.no_postprocess,
                              low_confidence_threshold=args.low_confidence, progress=bars,
                              fail_fast=args.fail_fast, trust=args.trust, tta=args.tta,
                              precision=args.precision)
    finally:
        bars.close()
    failed = 0
    for r in records:
        if r["status"] == "error":
            failed += 1
            print(f"medautolabel: error: {printable(r['message'])}", file=sys.stderr)
        elif r["status"] == "skipped":
            _say(f"{r['stem']}: skipped, outputs already exist (use --overwrite)")
        else:
            _say(f"{r['stem']}: {Path(r['outputs'][0]).name} ({r['seconds']:.1f} s) {_summary(r['facts'])}")
    return 2 if failed else 0


def _fraction_bar(desc: str, quiet: bool):
    """(progress(fraction, stage) callback, close) for one long step; silent when ``quiet``."""
    bar = None if quiet else _bar(desc)

    def progress(fraction: float, stage: str) -> None:
        if bar is not None:
            bar.n = round(100 * fraction)
            bar.set_postfix_str(stage, refresh=False)
            bar.refresh()

    return progress, (bar.close if bar is not None else (lambda: None))


def cmd_demo(args: argparse.Namespace) -> int:
    from medautolabel.synthetic.demo import run_demo

    progress, close = _fraction_bar("demo", args.quiet)
    try:
        report = run_demo(args.out, device=args.device, seed=args.seed, progress=progress)
    finally:
        close()
    for line in report.lines:
        print(line)
    print(f"wrote {', '.join(str(p) for p in report.files.values())}")
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from medautolabel.synthetic.phantoms import write_dataset

    progress, close = _fraction_bar("phantoms", args.quiet)
    try:
        out = write_dataset(args.output, args.n, seed=args.seed, progress=progress, overwrite=args.overwrite)
    finally:
        close()
    print(f"wrote {args.n} phantoms (seeds {args.seed}-{args.seed + args.n - 1}) to {out}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medautolabel.labelling.cluster_batch import SUMMARY, find_cases, run_batch

    cases = find_cases(args.input_dir, exclude=args.output)
    bar = tqdm(total=len(cases), desc="cases", unit="case", disable=True if args.quiet else None)

    def on_done(record: dict, done: int, total: int) -> None:
        bar.update(1)
        if record["status"] == "error":
            tqdm.write(f"medautolabel: error: {printable(record['message'])}", file=sys.stderr)

    try:
        records = run_batch(cases, args.output, model=args.model, device=args.device, fmt=args.format,
                            workers=args.workers, scheduler=args.scheduler, on_done=on_done, trust=args.trust)
    finally:
        bar.close()
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "error")}
    print(f"{counts['ok']} labelled, {counts['skipped']} already done, {counts['error']} failed; "
          f"summary: {Path(args.output) / SUMMARY}")
    return 2 if counts["error"] else 0


def _source(card) -> str:
    from medautolabel.catalog.registry import BUILTIN_DIR

    folder = Path(card.path).parent if card.path else None
    if folder is None:
        return "in memory"
    return "built-in" if folder.parent == BUILTIN_DIR else str(folder)


def cmd_models_list(args: argparse.Namespace) -> int:
    from medautolabel.catalog.registry import list_models

    cards = list_models()
    if not cards:
        print("no models found")
        return 0
    rows = [("ID", "VERSION", "MODALITY", "LABELS", "CLASSES", "SOURCE")]
    for c in cards:
        rows.append(tuple(printable(v) for v in (c.id, c.version, c.modality, ", ".join(lab.name for lab in c.labels),
                                                 ", ".join(t.task for t in c.classification) or "-", _source(c))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from medautolabel.catalog.registry import resolve_model

    c = resolve_model(args.model)
    pre = c.preprocessing
    _say(f"{c.id} {c.version}: {c.name}")
    _say(f"  source: {_source(c)}")
    if c.description:
        _say(f"  {c.description}")
    _say(f"  modality: {c.modality}; input channels: " + ", ".join(ch.name for ch in c.input))
    _say(f"  network: {c.network.architecture} ({c.network.weights}, sha256 {c.network.sha256 or 'not given'})")
    spacing = "native" if pre.spacing is None else " x ".join(f"{s:g}" for s in pre.spacing) + " mm"
    _say(f"  grid: {pre.orientation or 'native'} orientation, {spacing}; "
         f"window {' x '.join(str(r) for r in c.inference.roi_size)}, overlap {c.inference.overlap:g}")
    _say("  labels:")
    for lab in c.labels:
        rgb = "#" + "".join(f"{round(255 * v):02x}" for v in lab.color)
        t = lab.terminology
        _say(f"    {lab.value}  {lab.name}  {rgb}  {t.category.scheme}:{t.category.value} {t.category.meaning} / "
             f"{t.type.scheme}:{t.type.value} {t.type.meaning}")
    for task in c.classification:
        _say(f"  classification: {task.task} ({' / '.join(task.classes)}) by {task.method}")
    _say(f"  low-confidence threshold: {c.low_confidence_threshold:g}")
    for key in ("command", "training_data", "training_time", "seeds", "date"):
        if key in c.provenance:
            _say(f"  {key.replace('_', ' ')}: {c.provenance[key]}")
    for key, value in c.metrics.items():
        _say(f"  metric {key}: {value}")
    return 0


def cmd_models_export_bundle(args: argparse.Namespace) -> int:
    from medautolabel.catalog.bundle import bundle_sha256
    from medautolabel.catalog.bundle_export import export_bundle

    out = export_bundle(args.model, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (bundle sha256 {bundle_sha256(out)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="medautolabel", description="Label medical images automatically (segments + classification tags).",
        epilog="Run 'medautolabel COMMAND --help' for each command. Nothing is downloaded.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medautolabel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument("--tta", choices=["none", "flip", "flip-all"], help="test-time augmentation (default: the model "
                   "card's; flip = 4 passes, flip-all = 8): more accurate, slower")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the network's arithmetic: auto = float16 on CUDA, bfloat16 on CPUs that compute it natively "
                        "(about 2x faster), float32 otherwise (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="relabel inputs whose outputs already exist")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")
    p.add_argument("--trust", action="store_true", help="run a MONAI bundle given with --model (its configs can "
                                                        "execute Python code); see docs/bundles.md")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_label)

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

    p = sub.add_parser("batch", help="label a folder of studies on a Dask cluster (resumable)",
                       description="Label every image file and DICOM series folder under INPUT_DIR, in parallel "
                                   "worker processes (a local Dask cluster, or --scheduler). Finished cases are "
                                   "skipped, so rerun a killed batch to resume it; a failing case is recorded and "
                                   "the others go on. Writes OUT/summary.csv (case, status, seconds, classes, "
                                   "segment volumes).",
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

    p = sub.add_parser("models", help="list the available models or show one",
                       description="Models: built-in ones, folders on MEDAUTOLABEL_MODEL_PATH, or a folder path.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser("list", help="list the models that can be found")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser("show", help="describe a model (labels, codes, classes, grid, provenance, metrics)")
    q.add_argument("model", metavar="ID|PATH")
    q.set_defaults(func=cmd_models_show)
    q = msub.add_parser("export-bundle", help="write a model as a MONAI model-zoo bundle",
                        description="Write model ID as a MONAI bundle that `python -m monai.bundle run "
                                    "--config_file DIR/configs/inference.json --bundle_root DIR --dataset_dir D "
                                    "--output_dir O` runs on D/imagesTs/*.nii.gz.")
    q.add_argument("model", metavar="ID|PATH")
    q.add_argument("out", type=Path, metavar="DIR")
    q.add_argument("--overwrite", action="store_true", help="replace a bundle medautolabel exported to DIR before")
    q.set_defaults(func=cmd_models_export_bundle)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``medautolabel`` console script; returns the exit status.

    Everything, the parser's construction and MONAI's import included, runs inside the handlers:
    a user error is one line and status 2, Ctrl-C one line and 130, SIGTERM (as ``Terminated``,
    see ``run``) one line and 143; the ``finally`` blocks of atomic writes have run by then.
    """
    try:
        return _dispatch(sys.argv[1:] if argv is None else list(argv))
    except MedAutoLabelError as e:
        print(f"medautolabel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medautolabel: error: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("medautolabel: error: terminated", file=sys.stderr)
        return 143


def _dispatch(argv: List[str]) -> int:
    """Parse ``argv``, prepare the process for the command (MONAI, demo seed) and run it."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command in MONAI_COMMANDS:
        from medautolabel.runtime.monai_import import import_lean

        import_lean()
    if getattr(args, "seed", 0) is None:
        from medautolabel.synthetic.phantoms import DEMO_SEED

        args.seed = DEMO_SEED
    return int(args.func(args) or 0)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum: int, frame: Any) -> None:
    """Signal handler: the first SIGINT or SIGTERM becomes an exception in the main thread; later ones
    are ignored, so a second Ctrl-C cannot interrupt the clean-up (the ``finally`` blocks) it started."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


def run() -> None:
    """The ``medautolabel`` console script (and ``python -m medautolabel``): ``main``, then a short exit.

    SIGINT and SIGTERM are first turned into exceptions (``_stop``): SIGTERM's default action would
    end the process without running any ``finally``, leaving ``.~medautolabel-*`` temporaries behind.
    Once ``main`` has returned they are ignored, so the exit's own work is not interrupted.

    At exit CPython's last garbage collection walks every object torch and MONAI created, most of the
    exit's time. ``gc.freeze()`` leaves them to the operating system; atexit handlers (logging's
    flush) still run, and every file medautolabel writes is closed before ``main`` returns. Only for
    a process of its own: in-process callers use ``main``.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, _stop)
    status = main()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
