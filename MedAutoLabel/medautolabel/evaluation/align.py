"""Put a prediction on its reference's grid, or refuse: never compare misaligned voxels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from medautolabel.errors import InputError
from medautolabel.image import Image

TOLERANCE_MM = 1e-3


def same_grid(a: Image, b: Image, tolerance_mm: float = TOLERANCE_MM) -> bool:
    return a.array.shape == b.array.shape and bool(np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=tolerance_mm))


def overlap_fraction(pred: Image, ref: Image) -> float:
    """Share of the reference's voxel centres that fall inside the prediction's grid."""
    inv = np.linalg.inv(pred.ijk_to_ras)
    ref_to_pred = inv @ ref.ijk_to_ras
    kk, jj, ii = (np.arange(0, n, max(1, n // 16)) for n in ref.array.shape)  # a sample is enough
    grid = np.stack(np.meshgrid(ii, jj, kk, indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    ijk = grid @ ref_to_pred[:3, :3].T + ref_to_pred[:3, 3]
    size = np.array(pred.array.shape[::-1], dtype=float)
    inside = np.all((ijk >= -0.5) & (ijk <= size - 0.5), axis=1)
    return float(inside.mean())


def to_reference_grid(pred: Image, ref: Image, pred_path: Optional[Union[str, Path]] = None,
                      min_overlap: float = 0.5) -> Tuple[Image, bool]:
    """``pred`` on ``ref``'s grid: as is when the grids agree, else nearest-neighbour resampled in physical space.

    Reference voxels outside the prediction's grid count as background. Returns (image, resampled?).
    Raises InputError naming ``pred_path`` when less than ``min_overlap`` of the reference is covered.
    """
    if same_grid(pred, ref):
        return pred, False
    covered = overlap_fraction(pred, ref)
    if covered < min_overlap:
        raise InputError(f"prediction grid covers {covered:.0%} of its reference's field of view: "
                         "not the same image?", pred_path)
    m = np.linalg.inv(pred.ijk_to_ras) @ ref.ijk_to_ras  # ref (i,j,k) -> pred (i,j,k)
    matrix = m[:3, :3][::-1, ::-1]  # in (k, j, i) order
    offset = m[:3, 3][::-1]
    out = ndimage.affine_transform(pred.array, matrix, offset=offset, output_shape=ref.array.shape, order=0,
                                   mode="constant", cval=0)
    return Image(out.astype(pred.array.dtype), ref.ijk_to_ras.copy(), dict(pred.meta)), True
