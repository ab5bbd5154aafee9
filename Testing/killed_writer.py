"""A writer killed inside ``atomic_output``: what a SIGKILL during an output write leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_CODE = ("import os, sys; from medautolabel.io.atomic import atomic_output\n"
         "with atomic_output(sys.argv[1]) as tmp:\n    tmp.write_text('half'); os._exit(9)")


def kill_a_writer_of(target: Path) -> None:
    """Run a process that writes half of ``target``'s temporary and dies with no clean-up."""
    assert subprocess.run([sys.executable, "-c", _CODE, str(target)], check=False).returncode == 9
