"""Training models on the user's own labelled images (``medautolabel train``; docs/training.md).

Importing this package is cheap; the heavy parts (torch, MONAI, h5py) load when training starts.
"""

from __future__ import annotations

from typing import Any


def train(*args: Any, **kwargs: Any):
    """See :func:`medautolabel.training.loop.train`."""
    from medautolabel.training.loop import train as _train

    return _train(*args, **kwargs)
