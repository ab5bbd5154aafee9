"""Image -> network tensor, per model card: crop to the foreground, reorient, resample, normalise.

Order and cost: the foreground box is found on the raw input and cropped first (a view), the
reorientation is an axis permutation/flip (a view), the resampling to the card's spacing is the one
interpolation (skipped when the spacing already matches), and normalisation writes the float32
tensor. ``Prepared`` keeps the geometry needed to put the network's answer back on the input grid.

Grids are (k, j, i) arrays + a 4x4 (i, j, k) -> RAS matrix, as everywhere in the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from . import normalize
from .errors import InputError
from .image import Image
from .modelcard import InputChannel, ModelCard

Box = Tuple[slice, slice, slice]  # (k, j, i) slices of the input grid


@dataclass
class Prepared:
    """The network-grid tensor and the geometry that maps it back onto the input grid."""

    tensor: torch.Tensor  # (1, C, *spatial) float32, spatial axes in ``axis_order``
    net_shape: Tuple[int, int, int]  # (k, j, i) shape of the network grid
    net_ijk_to_ras: np.ndarray  # network grid (i, j, k) -> RAS
    crop: Box  # the part of the input grid that was processed; outside it is background
    input_shape: Tuple[int, int, int]  # (k, j, i)
    input_ijk_to_ras: np.ndarray
    axis_order: str = "kji"

    @property
    def net_spacing(self) -> np.ndarray:
        """Network grid voxel size along i, j, k (mm)."""
        return np.linalg.norm(self.net_ijk_to_ras[:3, :3], axis=0)

    @property
    def tensor_spacing(self) -> Tuple[float, float, float]:
        """Voxel size (mm) along the tensor's spatial axes."""
        s = self.net_spacing
        return tuple(float(x) for x in (s[::-1] if self.axis_order == "kji" else s))

    @property
    def crop_ijk_to_ras(self) -> np.ndarray:
        """ijk -> RAS of the cropped part of the input grid."""
        return shift_matrix(self.input_ijk_to_ras, self.crop)

    @property
    def crop_shape(self) -> Tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.crop)

    def to_kji(self, volume: np.ndarray) -> np.ndarray:
        """View a network-grid array (..., *tensor axes) in (k, j, i) order."""
        if self.axis_order == "kji":
            return volume
        return np.swapaxes(volume, -1, -3)


def shift_matrix(ijk_to_ras: np.ndarray, box: Box) -> np.ndarray:
    """The ijk->RAS matrix of the sub-grid starting at ``box`` (k, j, i slices)."""
    m = np.array(ijk_to_ras, dtype=np.float64)
    start_ijk = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
    m[:3, 3] = m[:3, :3] @ start_ijk + m[:3, 3]
    return m


def foreground_box(array: np.ndarray, threshold: float, margin_vox: Sequence[int]) -> Optional[Box]:
    """The (k, j, i) bounding box of ``array > threshold``, grown by ``margin_vox`` (k, j, i); None if empty."""
    mask = array > threshold
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        lo = max(int(hit[0]) - int(margin_vox[axis]), 0)
        hi = min(int(hit[-1]) + int(margin_vox[axis]) + 1, array.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def reorient(array: np.ndarray, ijk_to_ras: np.ndarray, codes: str) -> Tuple[np.ndarray, np.ndarray]:
    """Permute/flip the axes (a view, no interpolation) so that i, j, k point along ``codes`` (e.g. "RAS").

    Axis codes follow nibabel/MONAI: "RAS" means i increases towards Right, j towards Anterior,
    k towards Superior. For oblique grids each axis goes to the closest direction.
    """
    from nibabel import orientations as ornt

    shape_ijk = array.shape[::-1]
    current = ornt.io_orientation(ijk_to_ras)
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(tuple(codes)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, np.array(ijk_to_ras, dtype=np.float64)
    out_ijk = ornt.apply_orientation(array.T, transform)  # .T views (k, j, i) as (i, j, k)
    matrix = np.asarray(ijk_to_ras, dtype=np.float64) @ ornt.inv_ornt_aff(transform, shape_ijk)
    return out_ijk.T, matrix


def resampled_grid(shape_kji: Sequence[int], ijk_to_ras: np.ndarray,
                   spacing_ijk: Sequence[float]) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """A grid with the same directions and the new spacing that covers the old grid's voxel centres.

    Along each axis the new grid is centred on the old extent and at least as long, so every
    old voxel centre lies inside the new grid (mapping back never extrapolates).
    """
    old_sp = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    new_sp = np.asarray(spacing_ijk, dtype=np.float64)
    n_old = np.asarray(shape_kji[::-1], dtype=np.float64)  # i, j, k
    extent = (n_old - 1) * old_sp
    n_new = np.array([math.ceil(e / s - 1e-6) + 1 for e, s in zip(extent, new_sp)])
    start_mm = (extent - (n_new - 1) * new_sp) / 2.0  # <= 0: the new grid starts before the old one
    m = np.eye(4)
    m[:3, :3] = (ijk_to_ras[:3, :3] / old_sp) * new_sp
    m[:3, 3] = ijk_to_ras[:3, :3] @ (start_mm / old_sp) + ijk_to_ras[:3, 3]
    return tuple(int(x) for x in n_new[::-1]), m


def resample(src: np.ndarray, src_ijk_to_ras: np.ndarray, dst_shape: Sequence[int],
             dst_ijk_to_ras: np.ndarray, order: int = 1, output: Optional[np.ndarray] = None) -> np.ndarray:
    """Sample a (k, j, i) array onto another grid (float32; linear for order=1; edges clamped).

    Works for any pair of matrices; when they differ only by axis permutation/flip/scale (as
    between the input and the network grid) the source is viewed in matching axis order so that
    scipy's fast separable zoom/shift path does the work.
    """
    # dst (i,j,k) -> src (i,j,k), then both in (k,j,i) index order
    m = np.linalg.inv(np.asarray(src_ijk_to_ras, dtype=np.float64)) @ np.asarray(dst_ijk_to_ras, dtype=np.float64)
    a = m[:3, :3][::-1, ::-1]
    b = m[:3, 3][::-1]
    rows = np.argmax(np.abs(a), axis=0)
    off_axis = np.abs(a).sum(axis=0) - np.abs(a[rows, range(3)])
    if len(set(rows.tolist())) == 3 and np.all(off_axis < 1e-9 * np.abs(a[rows, range(3)])):
        src = np.transpose(src, rows)  # a view: dst axis c reads src axis rows[c]
        matrix: np.ndarray = a[rows, range(3)]
        offset = b[rows]
    else:
        matrix, offset = a, b
    if output is None:
        output = np.empty(tuple(int(x) for x in dst_shape), dtype=np.float32)
    ndimage.affine_transform(src, matrix, offset=offset, output=output, order=order, mode="nearest",
                             prefilter=False)
    return output


def normalise(values: np.ndarray, channels: Sequence[InputChannel]) -> np.ndarray:
    """(C, *values.shape) float32 network channels from raw intensities (normalize.py)."""
    windows = [(n, c.window) for n, c in enumerate(channels) if c.window is not None]
    if len(windows) == len(channels):
        return normalize.ct_windows(values, [w for _, w in windows])
    out = np.empty((len(channels),) + values.shape, dtype=np.float32)
    if windows:
        out[[n for n, _ in windows]] = normalize.ct_windows(values, [w for _, w in windows])
    for n, c in enumerate(channels):
        if c.percentiles is not None:
            out[n] = normalize.mr_percentiles(values, c.percentiles[0], c.percentiles[1])[0]
    return out


def preprocess(image: Image, card: ModelCard) -> Prepared:
    """Crop, reorient, resample and normalise ``image`` as ``card`` says; keep what undoes it."""
    array = image.array
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f"expected a 3D image, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"expected real-valued voxels, got {array.dtype}")
    det = np.linalg.det(image.ijk_to_ras[:3, :3])
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise InputError("the image geometry is degenerate (zero voxel size or collinear axes)")
    pre = card.preprocessing
    full: Box = (slice(0, array.shape[0]), slice(0, array.shape[1]), slice(0, array.shape[2]))
    box: Optional[Box] = None
    if pre.crop_foreground is not None:
        margin = [math.ceil(pre.crop_foreground.margin_mm / s) for s in image.spacing[::-1]]
        box = foreground_box(array, pre.crop_foreground.threshold, margin)
    box = box or full  # nothing above the threshold: keep everything rather than guess
    values = array[box]
    matrix = shift_matrix(image.ijk_to_ras, box)

    if pre.orientation:
        values, matrix = reorient(values, matrix, pre.orientation)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if pre.spacing is not None and not np.allclose(spacing, pre.spacing, rtol=1e-4, atol=0):
        shape, net_matrix = resampled_grid(values.shape, matrix, pre.spacing)
        # sample the whole input, not the crop: the network grid reaches slightly past the crop
        # box, and real voxels there keep the interpolation exact up to the box's faces
        values = resample(array, image.ijk_to_ras, shape, net_matrix, order=1)
    else:
        shape, net_matrix = values.shape, matrix

    if pre.axis_order == "ijk":
        values = values.T  # a view; normalise() writes the tensor in this order
    tensor = torch.from_numpy(normalise(values, card.input))[None]
    return Prepared(tensor=tensor, net_shape=tuple(int(x) for x in shape), net_ijk_to_ras=net_matrix,
                    crop=box, input_shape=tuple(array.shape), input_ijk_to_ras=image.ijk_to_ras.copy(),
                    axis_order=pre.axis_order)


def to_input_grid(volume: np.ndarray, prepared: Prepared, order: int = 1,
                  output: Optional[np.ndarray] = None) -> np.ndarray:
    """Resample one network-grid volume (tensor axis order) onto the crop box of the input grid."""
    return resample(prepared.to_kji(volume), prepared.net_ijk_to_ras, prepared.crop_shape,
                    prepared.crop_ijk_to_ras, order=order, output=output)
