"""``python signal_child.py POINT MARK ARGS...``: the ``medautolabel ARGS...`` command, held at POINT.

At POINT the command touches the file MARK and then waits for a signal, so a test can send SIGINT or
SIGTERM at a known moment (an event to wait for, not a guess of how long start-up takes). Points:
``parser`` (building the argument parser), ``monai`` (importing MONAI), ``inference`` (the sliding
window), ``write`` (the labelmap's temporary written, not yet renamed into place). Everything else
is the console script itself (``cli.run``): its signal handling is what runs.
"""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

# point: (module, function, whether the function runs before the hold)
POINTS = {
    "parser": ("medautolabel.cli.app", "build_parser", False),
    "monai": ("medautolabel.runtime.monai_import", "import_lean", False),
    "inference": ("medautolabel.labelling.pipeline", "infer", False),
    "write": ("nrrd", "write", True),
}


def hold_at(point: str, mark: Path) -> None:
    """Replace POINT's function by one that (maybe runs it, then) touches ``mark`` and waits for signals."""
    module_name, name, run_first = POINTS[point]
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def held(*args, **kwargs):
        result = original(*args, **kwargs) if run_first else None
        mark.touch()
        signal.pause()  # returns once a handler ran: where signals are held, the command goes on to act on it
        return result if run_first else original(*args, **kwargs)

    setattr(module, name, held)


if __name__ == "__main__":
    hold_at(sys.argv[1], Path(sys.argv[2]))
    sys.argv = ["medautolabel", *sys.argv[3:]]
    from medautolabel.cli.app import run

    run()
