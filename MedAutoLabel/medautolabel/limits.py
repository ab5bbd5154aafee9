"""Sanity limits checked before anything is allocated or parsed: sizes against this machine's memory.

A header or a model card is a claim; a hostile or broken one claims 10^15 voxels, windows of 8 EB
or JSON nested a million deep. These limits turn such claims into one clear error before the
allocation (or the recursion) happens, instead of a MemoryError, an OOM kill or a traceback.
"""

from __future__ import annotations

import os
from typing import Iterable

# Deeper JSON than this is no model card or tags file anyone wrote by hand or by program; the
# limit is far below Python's recursion limit, so the check itself cannot overflow.
MAX_JSON_DEPTH = 64

# More output channels than this is no segmentation network (label values are 1..255).
MAX_CHANNELS = 1024


# An image with more non-finite (NaN, infinite) voxels than this share is refused rather than
# repaired: what is left is not enough of an image to label.
MAX_NON_FINITE_SHARE = 0.5


def machine_memory_bytes() -> int:
    """Physical memory of this machine (bytes); 1 TiB when the system does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 1 << 40


def human_bytes(n: float) -> str:
    """``3.2 GB``-style size (decimal units, bytes to exabytes)."""
    units = ("bytes", "kB", "MB", "GB", "TB", "PB", "EB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n /= 1000.0
        step += 1
    return f"{n:.0f} bytes" if step == 0 else f"{n:.1f} {units[step]}"


def voxel_count(shape: Iterable[int]) -> int:
    """Number of voxels of ``shape`` (a Python int: never overflows)."""
    total = 1
    for n in shape:
        total *= int(n)
    return total


def exceeds_memory(nbytes: int) -> bool:
    """True when ``nbytes`` is more than this machine's physical memory."""
    return nbytes > machine_memory_bytes()


def memory_problem(nbytes: int, what: str) -> str:
    """The message for ``what`` needing ``nbytes``, more than this machine has."""
    return f"{what} would need {human_bytes(nbytes)}, more than this machine's memory " \
           f"({human_bytes(machine_memory_bytes())})"


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON ``text`` nests objects/arrays deeper than ``limit`` (brackets in strings ignored)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False
