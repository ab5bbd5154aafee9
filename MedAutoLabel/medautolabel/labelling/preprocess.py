"""Image -> network tensor, per model card: crop to the foreground, reorient, resample, normalise.

Order and cost: the foreground (the body, without a table) is boxed on the raw input; the whole
image's network grid is the one MONAI's Orientationd + Spacingd would make (reorientation is an
axis permutation/flip, a view); of that grid only the sliding windows that touch the box are kept,
so the network runs on the body alone yet gives there what it would give on the whole image. The
resampling onto the kept part is the one interpolation (skipped when the spacing already
matches), and normalisation writes the float32 tensor. ``Prepared`` keeps the geometry needed to
put the network's answer back on the input grid.

Grids are (k, j, i) arrays + a 4x4 (i, j, k) -> RAS matrix, as everywhere in the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from medautolabel.catalog.modelcard import InputChannel, ModelCard
from medautolabel.errors import InputError
from medautolabel.geometry import reorient
from medautolabel.image import Image
from medautolabel.labelling import normalize
from medautolabel.limits import MAX_NON_FINITE_SHARE, exceeds_memory, memory_problem, voxel_count

Box = Tuple[slice, slice, slice]  # (k, j, i) slices of the input grid
MIN_BODY_PART = 0.05  # foreground parts smaller than this fraction of the largest (a table) are not cropped to


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


def foreground_box(array: np.ndarray, threshold: float, margin_vox: Sequence[int],
                   spacing_kji: Optional[Sequence[float]] = None, min_part: float = 0.0) -> Optional[Box]:
    """The (k, j, i) bounding box of ``array > threshold``, grown by ``margin_vox`` (k, j, i); None if empty.

    With ``min_part`` > 0, only the parts of the foreground that hold at least that fraction of the
    largest part's volume count: parts are found on ~4 mm blocks (``spacing_kji`` in mm), so a
    table or a head-rest a few millimetres away from the body falls away, while arms or legs stay.
    """
    mask = array > threshold
    if min_part > 0 and spacing_kji is not None and mask.any():
        mask &= _large_parts(mask, spacing_kji, min_part)
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


def _large_parts(mask: np.ndarray, spacing_kji: Sequence[float], min_part: float, block_mm: float = 4.0) -> np.ndarray:
    """Voxels of ``mask`` in parts (connected on ~``block_mm`` blocks) holding >= min_part of the largest's voxels."""
    steps = [max(1, int(round(block_mm / float(s)))) for s in spacing_kji]
    padded = [-(-n // st) * st for n, st in zip(mask.shape, steps)]
    blocks = np.zeros(padded, bool)
    blocks[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    counts = blocks.reshape(padded[0] // steps[0], steps[0], padded[1] // steps[1], steps[1],
                            padded[2] // steps[2], steps[2]).sum(axis=(1, 3, 5), dtype=np.int64)
    parts, n = ndimage.label(counts > 0)
    if n <= 1:
        return np.ones(mask.shape, bool)
    sizes = np.bincount(parts.ravel(), weights=counts.ravel(), minlength=n + 1)  # voxels, not blocks
    sizes[0] = 0
    keep = sizes >= min_part * sizes.max()
    kept = keep[parts]
    for axis, st in enumerate(steps):
        kept = np.repeat(kept, st, axis=axis)
    return kept[: mask.shape[0], : mask.shape[1], : mask.shape[2]]


def resampled_grid(shape_kji: Sequence[int], ijk_to_ras: np.ndarray,
                   spacing_ijk: Sequence[float]) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The grid with the same directions and the new spacing, exactly as MONAI's ``Spacingd`` makes it.

    It starts on the old grid's first voxel centre and has about n x old spacing / new spacing
    voxels per axis (MONAI's ``zoom_affine`` + ``compute_shape_offset``, called here so that a model exported
    as a bundle sees the same voxels in MONAI's runner). The old grid's far voxel centres may lie
    up to half a new voxel outside it; mapping back clamps to the edge there.
    """
    from monai.data.utils import compute_shape_offset, zoom_affine

    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    m = np.array(zoom_affine(matrix, [float(s) for s in spacing_ijk], diagonal=False), dtype=np.float64)
    shape_ijk, offset = compute_shape_offset(list(shape_kji[::-1]), matrix, m)
    m[:3, 3] = offset[:3]
    return tuple(max(int(x), 1) for x in np.asarray(shape_ijk)[::-1]), m


def window_starts(size: int, roi: int, overlap: float) -> List[int]:
    """Where MONAI's sliding window starts its windows along one axis (``dense_patch_slices``)."""
    from monai.data.utils import dense_patch_slices

    if size <= roi:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    return sorted({s[0].start for s in dense_patch_slices([size], [roi], [interval])})


def window_aligned_box(box: Box, shape: Sequence[int], roi: Sequence[int], overlap: float) -> Box:
    """Grow ``box`` to the windows of the whole grid's sliding window that touch it.

    A sliding window over the returned box visits exactly those windows, so inside ``box`` it
    gives the same blended output as a sliding window over the whole grid, while windows that do
    not touch ``box`` are never computed.
    """
    out = []
    for (lo, hi), size, r in zip(((b.start, b.stop) for b in box), shape, roi):
        r = int(r)
        if size <= r:
            out.append(slice(0, size))
            continue
        touching = [s for s in window_starts(size, r, overlap) if s < hi and s + r > lo]
        out.append(slice(touching[0], touching[-1] + r))
    return tuple(out)


def box_on_grid(box: Box, src_ijk_to_ras: np.ndarray, shape: Sequence[int], dst_ijk_to_ras: np.ndarray) -> Box:
    """The (k, j, i) box of ``dst`` voxels that covers the voxel centres of ``box`` on the source grid."""
    corners = np.array([[i, j, k] for i in (box[2].start, box[2].stop - 1) for j in (box[1].start, box[1].stop - 1)
                        for k in (box[0].start, box[0].stop - 1)], dtype=np.float64)
    m = np.linalg.inv(dst_ijk_to_ras) @ src_ijk_to_ras
    ijk = corners @ m[:3, :3].T + m[:3, 3]
    lo = np.clip(np.floor(ijk.min(axis=0) + 1e-6).astype(int), 0, np.array(shape[::-1]) - 1)
    hi = np.clip(np.ceil(ijk.max(axis=0) - 1e-6).astype(int) + 1, 1, np.array(shape[::-1]))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo[::-1], hi[::-1]))


def resample(src: np.ndarray, src_ijk_to_ras: np.ndarray, dst_shape: Sequence[int],
             dst_ijk_to_ras: np.ndarray, order: int = 1, output: Optional[np.ndarray] = None) -> np.ndarray:
    """Sample a (k, j, i) array onto another grid (float32; linear for order=1; edges clamped).

    Works for any pair of matrices (scipy's ``affine_transform``). When they differ only by axis
    permutation/flip/scale/shift (as between the input and the network grid), the source is viewed
    in matching axis order and linear sampling runs as one 1-D interpolation per axis
    (``_separable_linear``): the same values to float32 rounding, in less time.
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
    if matrix.ndim == 1 and order == 1:
        return _separable_linear(src, matrix, offset, output)
    # scipy releases the GIL: slabs of the output along its first axis are sampled in parallel
    column = matrix[0] if matrix.ndim == 1 else matrix[:, 0]

    def sample(k0: int, k1: int) -> None:
        start = np.array(offset, dtype=np.float64) + (np.eye(3)[0] * column if matrix.ndim == 1 else column) * k0
        ndimage.affine_transform(src, matrix, offset=start, output=output[k0:k1], order=order, mode="nearest",
                                 prefilter=False)

    in_slabs(sample, output.shape[0], _slab_count(output.size))
    return output


def _separable_linear(src: np.ndarray, scale: np.ndarray, offset: np.ndarray, output: np.ndarray) -> np.ndarray:
    """``output[x] = src(scale * x + offset)``, linear, edges clamped: one 1-D pass per axis, in threads.

    Written by hand because scipy's ``affine_transform`` (even on its zoom/shift path) and
    SimpleITK's ``Resample`` interpolate 8 neighbours per output voxel, where three 1-D passes
    read 2 per axis: less work for the same values to float32 rounding (figures in
    docs/benchmarks.md). Axes that shrink go first, so the
    intermediate volumes stay small.
    """
    out = src
    axes = sorted(range(3), key=lambda a: output.shape[a] / max(1, src.shape[a]))
    for n, axis in enumerate(axes):
        out = _lerp_axis(out, axis, float(scale[axis]), float(offset[axis]), output.shape[axis],
                         output if n == len(axes) - 1 else None)
    return output


def _lerp_axis(a: np.ndarray, axis: int, scale: float, offset: float, size: int,
               output: Optional[np.ndarray]) -> np.ndarray:
    """Linear interpolation of ``a`` along ``axis`` at ``offset + scale * arange(size)`` (clamped)."""
    last = a.shape[axis] - 1
    pos = np.clip(offset + scale * np.arange(size, dtype=np.float64), 0.0, last)
    lo_index = np.floor(pos).astype(np.intp)  # weight 0 at whole positions: those voxels are copied exactly
    hi_index = np.minimum(lo_index + 1, last)
    weight = (pos - lo_index).astype(np.float32).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    shape = list(a.shape)
    shape[axis] = size
    result = output if output is not None else np.empty(shape, np.float32)
    cut = 1 if axis == 0 else 0  # slabs along another axis are independent

    def run(start: int, stop: int) -> None:
        part = (slice(None),) * cut + (slice(start, stop),)
        lo = np.take(a[part], lo_index, axis=axis).astype(np.float32, copy=False)
        hi = np.take(a[part], hi_index, axis=axis).astype(np.float32, copy=False)
        np.subtract(hi, lo, out=hi)
        hi *= weight
        np.add(lo, hi, out=result[part])

    in_slabs(run, result.shape[cut], _slab_count(result.size))
    return result


def in_slabs(run: Callable[[int, int], None], rows: int, parts: int) -> None:
    """Call ``run(start, stop)`` on ``parts`` even slabs of ``range(rows)``, on that many threads if more than one.

    For numpy/scipy work that releases the GIL and writes disjoint slabs of one output.
    """
    bounds = [(int(r[0]), int(r[-1]) + 1) for r in np.array_split(np.arange(rows), max(1, parts)) if r.size]
    if len(bounds) == 1:
        run(*bounds[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(bounds)) as pool:
        list(pool.map(lambda b: run(*b), bounds))


def _slab_count(voxels: int) -> int:
    """Threads worth starting for ``voxels`` output voxels: one per 2 M voxels, at most the CPU threads."""
    return min(worker_threads(), max(1, voxels // 2_000_000))


def worker_threads() -> int:
    """CPU threads to use: torch's setting (which follows OMP_NUM_THREADS), at least one."""
    return max(1, int(torch.get_num_threads()))


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


def repair_non_finite(image: Image) -> Tuple[Image, List[Dict[str, Any]]]:
    """``image`` with NaN/infinite voxels replaced by its lowest finite value, and the record of the repair.

    Some scanners export the outside of a circular field of view as NaN, and one NaN voxel would
    otherwise spread through resampling and blending into every label. The lowest finite value is
    the image's background (air or the outside-FOV padding on CT), so the repaired voxels are
    labelled as background, as they would be in a clean image. An image with no finite voxel, or
    with more than ``MAX_NON_FINITE_SHARE`` (half) of them non-finite, is refused (``InputError``):
    too little of it is an image. Integer images cannot hold NaN and are returned as they are.
    """
    array = image.array
    if array.dtype.kind != "f":
        return image, []
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(array.sum(dtype=np.float64)):  # one pass: finite exactly when every float32 voxel is
            return image, []
    finite = np.isfinite(array)
    count = int(array.size - np.count_nonzero(finite))
    if count == 0:
        return image, []
    where = image.meta.get("source_path")
    if count == array.size:
        raise InputError("every voxel is NaN or infinite: there is no image to label", where)
    if count > MAX_NON_FINITE_SHARE * array.size:
        raise InputError(f"{count / array.size:.0%} of the voxels are NaN or infinite (more than "
                         f"{MAX_NON_FINITE_SHARE:.0%}): too little of the image is usable", where)
    fill = float(array[finite].min())
    repaired = np.where(finite, array, np.asarray(fill, dtype=array.dtype))
    record = {"problem": "non-finite voxels", "count": count, "replaced_by": fill}
    return image.with_array(repaired), [record]


def check_grid_fits(shape: Sequence[int], card: ModelCard, image: Image) -> None:
    """Refuse a network grid this machine cannot hold (e.g. a card spacing far finer than the image's).

    Checked on the cropped grid before the resampled tensor and the network's output (input plus
    output channels, float32) are allocated.
    """
    channels = card.channels_per_voxel
    nbytes = voxel_count(shape) * channels * 4
    if exceeds_memory(nbytes):
        spacing = "native" if card.preprocessing.spacing is None else \
            "x".join(f"{s:g}" for s in card.preprocessing.spacing) + " mm"
        what = f"the network grid of {'x'.join(str(int(n)) for n in shape)} voxels (model spacing {spacing}) " \
               f"x {channels} channels"
        raise InputError(memory_problem(nbytes, what), image.meta.get("source_path"))


def preprocess(image: Image, card: ModelCard) -> Prepared:
    """Crop, reorient, resample and normalise ``image`` as ``card`` says; keep what undoes it."""
    array = image.array
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f"expected a 3D image, got shape {array.shape}", image.meta.get("source_path"))
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"expected real-valued voxels, got {array.dtype}", image.meta.get("source_path"))
    det = np.linalg.det(image.ijk_to_ras[:3, :3])
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise InputError("the image geometry is degenerate (zero voxel size or collinear axes)",
                         image.meta.get("source_path"))
    pre = card.preprocessing
    full: Box = (slice(0, array.shape[0]), slice(0, array.shape[1]), slice(0, array.shape[2]))
    box: Optional[Box] = None
    if pre.crop_foreground is not None:
        spacing_kji = image.spacing[::-1]
        margin = [math.ceil(pre.crop_foreground.margin_mm / s) for s in spacing_kji]
        box = foreground_box(array, pre.crop_foreground.threshold, margin, spacing_kji, MIN_BODY_PART)
    box = box or full  # nothing above the threshold: keep everything rather than guess

    # The network grid of the whole image (reoriented, then at the card's spacing, as MONAI's
    # Orientationd + Spacingd make it); only the windows that touch the crop box are kept of it.
    values, matrix = array, np.array(image.ijk_to_ras, dtype=np.float64)
    if pre.orientation:
        values, matrix = reorient(values, matrix, pre.orientation)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    resampling = pre.spacing is not None and not np.allclose(spacing, pre.spacing, rtol=1e-4, atol=0)
    whole_shape, whole_matrix = resampled_grid(values.shape, matrix, pre.spacing) if resampling else (
        values.shape, matrix)
    net_box = box_on_grid(box, image.ijk_to_ras, whole_shape, whole_matrix)
    check_grid_fits([b.stop - b.start for b in net_box], card, image)
    roi = list(card.inference.roi_size)
    net_box = window_aligned_box(net_box, whole_shape, roi if pre.axis_order == "kji" else roi[::-1],
                                 card.inference.overlap)
    net_matrix = shift_matrix(whole_matrix, net_box)
    shape = tuple(b.stop - b.start for b in net_box)
    if resampling:  # the one interpolation, straight from the input onto the kept part of the grid
        values = resample(array, image.ijk_to_ras, shape, net_matrix, order=1)
    else:
        values = values[net_box]  # a view

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
