"""The ``medautolabel`` command's frame: the parser (each command's module registers itself), ``main``
and the console script ``run``.

Errors a user can cause print one line ``medautolabel: error: <file>: <problem>`` and exit with 2;
Ctrl-C and SIGTERM print one line and exit with 130 / 143 after every ``finally`` ran; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import signal
import sys
from typing import Any, Iterator, List, Optional

from medautolabel import __version__
from medautolabel.cli.parsing import OneLineParser
from medautolabel.errors import MedAutoLabelError, Terminated

# Commands that use MONAI: their process imports it without the optional packages it never needs
# (runtime/monai_import.py), which makes the command start faster.
MONAI_COMMANDS = frozenset({"label", "demo", "batch", "train", "evaluate"})

# One module per command, each adding its sub-command with ``register(subparsers)``; the parser's
# ``func(args)`` runs it and returns the exit status. The order is the order of ``--help``.
COMMAND_MODULES = (
    "medautolabel.cli.label",
    "medautolabel.cli.demo",
    "medautolabel.cli.phantoms",
    "medautolabel.cli.batch",
    "medautolabel.cli.models",
    "medautolabel.cli.train",
    "medautolabel.cli.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``medautolabel`` parser with every command of ``COMMAND_MODULES``."""
    parser = OneLineParser(
        prog="medautolabel", description="Label medical images automatically (segments + classification tags).",
        epilog="Run 'medautolabel COMMAND --help' for each command. Nothing is downloaded.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medautolabel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    with signals_held():  # the commands' modules, torch, MONAI, scipy, SimpleITK: imported whole or not at all
        args = build_parser().parse_args(argv)
        args.argv = argv
        if args.command in MONAI_COMMANDS:
            from medautolabel.runtime.monai_import import import_lean

            import_lean()
            for name in PRELOAD.get(args.command, ()):
                importlib.import_module(name)
    if getattr(args, "seed", 0) is None:
        from medautolabel.synthetic.phantoms import DEMO_SEED

        args.seed = DEMO_SEED
    return int(args.func(args) or 0)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# The packages a command imports anyway, imported at start-up while signals are held (``signals_held``).
PRELOAD = {"label": ("medautolabel.labelling.batch", "medautolabel.labelling.pipeline", "SimpleITK"),
           "demo": ("medautolabel.synthetic.demo", "medautolabel.labelling.pipeline", "SimpleITK"),
           "batch": ("medautolabel.labelling.cluster_batch",),
           "train": ("medautolabel.training.loop",),
           "evaluate": ("medautolabel.evaluation.evaluate",)}

_held: List[BaseException] = []  # while signals are held: the interrupt to raise once they are let go
_holding = [False]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Act on SIGINT/SIGTERM only when the block has ended (in a process whose handlers ``run`` installed).

    An import cut short by an exception leaves half-made modules behind (numpy, torch and scipy then
    fail later in odd ways, or exit by the signal instead of with one line), and some imports swallow
    the exception in callbacks, so Ctrl-C is lost. The block runs whole; the interrupt follows it.
    """
    _holding[0] = True
    try:
        yield
    finally:
        _holding[0] = False
    if _held:
        raise _held.pop()


def _stop(signum: int, frame: Any) -> None:
    """Signal handler: the first SIGINT or SIGTERM becomes an exception in the main thread (held while
    ``signals_held``); later ones are ignored, so a second Ctrl-C cannot interrupt the clean-up (the
    ``finally`` blocks) it started."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    interrupt = KeyboardInterrupt() if signum == signal.SIGINT else Terminated()
    if _holding[0]:
        _held.append(interrupt)
        return
    raise interrupt


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
    _holding[0] = True  # from the first moment the handlers are armed until the start-up imports are done
    for s in STOP_SIGNALS:
        signal.signal(s, _stop)
    status = main()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
