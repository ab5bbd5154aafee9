"""MONAI's sliding-window inference for the CPU, each window's output blended in one pass.

The windows (MONAI's ``dense_patch_slices`` on MONAI's scan interval), their order and batches,
the importance map (MONAI's ``compute_importance_map``), the zero padding of images smaller than a
window and the normalisation are those of ``monai.inferers.sliding_window_inference``, so the
output is the same to float32 rounding (tested). Written here because MONAI's loop makes three
passes over every window's output: the predictor's copy out of the network's buffer, the weighting
(``*= importance``) and the strided add into the image; here one ``addcmul_`` reads straight
from the network's buffer, one pass instead of three (figures in docs/benchmarks.md).
inference.py uses it on the CPU only; CUDA runs keep MONAI's function, with its separate window
and output devices.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

Predictor = Callable[[torch.Tensor], torch.Tensor]


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> List[int]:
    """MONAI's step between windows per axis (monai.inferers.utils._get_scan_interval, private, restated)."""
    return [r if r == s else max(int(r * (1 - overlap)), 1) for s, r in zip(image_size, roi_size)]


def _padding(spatial: Sequence[int], roi_size: Sequence[int]) -> List[int]:
    """``F.pad`` amounts (last axis first) that grow each axis to at least the window, half before, as MONAI."""
    pad: List[int] = []
    for size, roi in zip(reversed(list(spatial)), reversed(list(roi_size))):
        diff = max(int(roi) - int(size), 0)
        pad += [diff // 2, diff - diff // 2]
    return pad


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> List[Tuple[slice, ...]]:
    """The spatial slices of every window, in MONAI's order, on an image at least one window large."""
    from monai.data.utils import dense_patch_slices

    return dense_patch_slices(list(image_size), list(roi_size), scan_interval(image_size, roi_size, overlap))


def sliding_window_cpu(inputs: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int, predictor: Predictor,
                       overlap: float = 0.25, mode: str = "gaussian") -> torch.Tensor:
    """(1, C_in, *spatial) float32 -> (1, C_out, *spatial) float32, as MONAI's sliding window on the CPU.

    ``predictor`` gets (B, C_in, *roi) contiguous windows and returns (B, C_out, *roi) float32
    outputs, which are read before it is called again (it may return a buffer it reuses).
    """
    from monai.data.utils import compute_importance_map

    if inputs.shape[0] != 1:
        raise ValueError(f"one image at a time, got a batch of {inputs.shape[0]}")
    roi = [int(r) for r in roi_size]
    spatial = list(inputs.shape[2:])
    pad = _padding(spatial, roi)
    if any(pad):
        inputs = F.pad(inputs, pad, mode="constant", value=0.0)
    image_size = list(inputs.shape[2:])
    slices = window_slices(image_size, roi, overlap)
    weights = compute_importance_map(tuple(roi), mode=mode, device="cpu", dtype=torch.float32)
    out = None
    count = torch.zeros([1, 1, *image_size], dtype=torch.float32)
    for start in range(0, len(slices), sw_batch_size):
        group = slices[start:start + sw_batch_size]
        windows = torch.cat([inputs[(slice(None), slice(None), *s)] for s in group])  # a contiguous copy
        result = predictor(windows)
        if out is None:
            out = torch.zeros([1, int(result.shape[1]), *image_size], dtype=torch.float32)
        for s, window_out in zip(group, result):
            out[(0, slice(None), *s)].addcmul_(window_out, weights)
            count[(0, 0, *s)] += weights
    assert out is not None  # an image at least one window large has at least one window
    out /= count
    if any(pad):  # back to the input's extent
        before = pad[0::2][::-1]  # per spatial axis, first axis first
        out = out[(slice(None), slice(None), *(slice(b, b + n) for b, n in zip(before, spatial)))]
    return out
