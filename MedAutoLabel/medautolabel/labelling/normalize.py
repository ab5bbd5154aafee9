"""Intensity normalisation shared by inference and training: raw intensities -> network channels."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def ct_windows(hu: np.ndarray, windows: Sequence[Tuple[float, float]]) -> np.ndarray:
    """One float32 channel per (low, high) HU window, each mapped linearly to [0, 1] and clipped.

    Two windows let a network tell dense contrast from bone and still see soft tissue.
    """
    out = np.empty((len(windows),) + hu.shape, dtype=np.float32)
    for c, (low, high) in enumerate(windows):
        np.subtract(hu, low, out=out[c], casting="unsafe")
        out[c] *= 1.0 / float(high - low)
        np.clip(out[c], 0.0, 1.0, out=out[c])
    return out


def mr_percentiles(values: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """One float32 channel: the [lower, upper] percentile range of nonzero voxels mapped to [0, 1]."""
    v = values[values != 0]
    if v.size == 0:
        v = values.ravel()
    lo, hi = np.percentile(v, [lower, upper])
    scale = 1.0 / max(float(hi - lo), 1e-6)
    out = (values.astype(np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(out, 0.0, 1.0)[None]
