"""Importing MONAI without the optional packages its ``__init__`` loads and medautolabel never uses.

``import monai`` imports every MONAI submodule, and with them, through ``optional_import``,
pytorch-ignite (which pulls in torch.distributed's FSDP and tensor-parallel code), scipy.signal
(for the ultrasound confidence map) and matplotlib.pyplot (for Jupyter plots): most of the
command's start-up time (docs/benchmarks.md). Labelling, evaluating and training use none
of them. ``import_lean`` hides those packages while MONAI is first imported, so MONAI records them
as missing, exactly as on an installation without them, and un-hides them at once: a later
``import ignite`` works normally. Only MONAI's own engines, handlers and plots would then report
"optional import failed".

Only processes medautolabel owns call it (the ``medautolabel`` command, the Slicer worker
process), never code imported into someone else's process (a Slicer Python console, a notebook):
there another tool may need MONAI's full import.
"""

from __future__ import annotations

import sys
from typing import Tuple

SKIPPED = ("ignite", "scipy.signal", "matplotlib")


def import_lean(skipped: Tuple[str, ...] = SKIPPED) -> bool:
    """Import MONAI with ``skipped`` hidden; True if it did so, False if MONAI was already imported.

    A package already imported by the process is not hidden (MONAI then uses it as usual).
    """
    if "monai" in sys.modules:
        return False
    hidden = [name for name in skipped if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules: import raises ImportError
    try:
        import monai  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return True
