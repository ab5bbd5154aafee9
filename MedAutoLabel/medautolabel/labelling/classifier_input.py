"""What a classifier network sees: the image, or boxes around a segment, resampled onto a fixed grid.

A region is boxed on the image reoriented to the card's orientation (an axis permutation/flip,
no interpolation), so its box is aligned with the network's axes on any oblique, flipped or
permuted input. The box becomes a grid of ``input.shape`` voxels: either the box squeezed into
that many voxels, or (``input.spacing``) that many voxels at that spacing centred on the box.
The image is sampled onto it once (``preprocess.resample``, linear; outside the image the edge
voxel is repeated) and normalised with the classifier's channels. Training
(``training/classifier.py``, ``build_cases``) calls the same functions with the reference
segmentation, so a classifier sees at training what it sees when labelling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from medautolabel.catalog.modelcard import ClassificationTask, ModelCard
from medautolabel.geometry import reorient
from medautolabel.image import Image
from medautolabel.labelling.preprocess import MIN_BODY_PART, Box, box_on_grid, foreground_box, normalise, resample

MAX_COMPONENTS = 32  # region "components": the largest this many are classified (a few seconds at most)


@dataclass
class Region:
    """One classifier input: the tensor and the grid it was sampled on."""

    tensor: torch.Tensor  # (C, *input.shape) float32, spatial axes in the card's axis order
    shape_kji: Tuple[int, int, int]
    ijk_to_ras: np.ndarray  # the region grid's (i, j, k) -> RAS

    def contains(self, ras: Sequence[float]) -> bool:
        """True when the RAS point (mm) lies inside the region grid (voxel centres, half a voxel around)."""
        ijk = np.linalg.inv(self.ijk_to_ras) @ np.append(np.asarray(ras, dtype=np.float64), 1.0)
        return bool(np.all(ijk[:3] >= -0.5) and np.all(ijk[:3] <= np.array(self.shape_kji[::-1]) - 0.5))


def _full(shape: Sequence[int]) -> Box:
    return tuple(slice(0, int(n)) for n in shape)


def _grow(box: Box, margin_mm: float, spacing_kji: np.ndarray, shape: Sequence[int]) -> Box:
    """``box`` widened by ``margin_mm`` on every side, kept inside the image."""
    out = []
    for sl, sp, n in zip(box, spacing_kji, shape):
        m = int(math.ceil(margin_mm / float(sp) - 1e-9)) if margin_mm > 0 else 0
        out.append(slice(max(sl.start - m, 0), min(sl.stop + m, int(n))))
    return tuple(out)


def region_boxes(image: Image, labelmap: Optional[Image], card: ModelCard, task: ClassificationTask) -> List[Box]:
    """(k, j, i) boxes of the input grid to classify: one for "whole" and "segment", one per tile or component.

    An empty segment gives no box (the caller reports the task's first class). ``labelmap`` is on
    the image's grid (the model's own output when labelling, the reference when training).
    """
    spec = task.input
    spacing_kji = np.asarray(image.spacing[::-1], dtype=np.float64)
    if not spec.needs_segment:
        crop = card.preprocessing.crop_foreground
        box = None
        if crop is not None:
            margin = [math.ceil(crop.margin_mm / s) for s in spacing_kji]
            box = foreground_box(image.array, crop.threshold, margin, spacing_kji, MIN_BODY_PART)
        box = box or _full(image.array.shape)
        return tiles(image, box, card, task) if spec.region == "tiles" else [box]
    if labelmap is None:
        return []
    value = next(lab.value for lab in card.labels if lab.name == spec.segment)
    mask = labelmap.array == value
    if spec.region == "segment":
        found = ndimage.find_objects(mask.astype(np.uint8))
        return [_grow(found[0], spec.margin_mm, spacing_kji, image.array.shape)] if found else []
    parts, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(parts.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:MAX_COMPONENTS] + 1
    found = ndimage.find_objects(parts)
    return [_grow(found[k - 1], spec.margin_mm, spacing_kji, image.array.shape) for k in sorted(keep.tolist())]


def tiles(image: Image, box: Box, card: ModelCard, task: ClassificationTask) -> List[Box]:
    """``box`` cut into equal parts, as few per axis as tiles of ``shape`` x ``spacing`` mm need to cover it.

    Cut on the image reoriented to the card's orientation (where the tile's size is known per axis)
    and mapped back: ``region_grid`` centres a tile on each part, so neighbouring tiles overlap
    wherever the box is not a whole number of tiles long.
    """
    spec = task.input
    shape_ijk = np.array(spec.shape if card.preprocessing.axis_order == "ijk" else spec.shape[::-1], dtype=float)
    tile_mm = shape_ijk * np.asarray(spec.spacing, dtype=float)
    values, matrix = reorient(image.array, image.ijk_to_ras, card.preprocessing.orientation or "RAS")
    on = box_on_grid(box, image.ijk_to_ras, values.shape, matrix)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    extent_kji = [(sl.stop - sl.start) * sp for sl, sp in zip(on, spacing[::-1])]
    counts = [max(1, int(math.ceil(e / t - 1e-6))) for e, t in zip(extent_kji, tile_mm[::-1])]
    parts = []
    for index in np.ndindex(*counts):
        sub = []
        for sl, n, i in zip(on, counts, index):
            edges = np.linspace(sl.start, sl.stop, n + 1)
            lo, hi = int(round(edges[i])), int(round(edges[i + 1]))
            sub.append(slice(lo, max(hi, lo + 1)))
        parts.append(box_on_grid(tuple(sub), matrix, image.array.shape, image.ijk_to_ras))
    return parts


def region_grid(image: Image, box: Box, card: ModelCard, task: ClassificationTask
                ) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The classifier grid ((k, j, i) shape, ijk->RAS) for a box of the input grid."""
    spec = task.input
    shape_kji = tuple(int(x) for x in (spec.shape if card.preprocessing.axis_order == "kji" else spec.shape[::-1]))
    values, matrix = reorient(image.array, image.ijk_to_ras, card.preprocessing.orientation or "RAS")
    on = box_on_grid(box, image.ijk_to_ras, values.shape, matrix)
    lo = np.array([on[2].start, on[1].start, on[0].start], dtype=np.float64)  # (i, j, k) voxel indices
    hi = np.array([on[2].stop, on[1].stop, on[0].stop], dtype=np.float64)  # exclusive
    n_out = np.array(shape_kji[::-1], dtype=np.float64)  # (i, j, k)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if spec.spacing is None:  # the box's edges onto the grid's edges
        step = (hi - lo) / n_out  # in source voxels
        start = lo - 0.5 + 0.5 * step
    else:  # a fixed physical box centred on the region
        step = np.asarray(spec.spacing, dtype=np.float64) / spacing
        start = (lo + hi - 1.0) / 2.0 - (n_out - 1.0) / 2.0 * step
    index = np.eye(4)
    index[:3, :3] = np.diag(step)
    index[:3, 3] = start
    return shape_kji, matrix @ index


def region_input(image: Image, box: Box, card: ModelCard, task: ClassificationTask) -> Region:
    """The normalised classifier tensor for one box of the input grid."""
    shape_kji, matrix = region_grid(image, box, card, task)
    values = resample(image.array, image.ijk_to_ras, shape_kji, matrix, order=1)
    if card.preprocessing.axis_order == "ijk":
        values = values.T
    channels = task.input.channels or card.input
    return Region(torch.from_numpy(normalise(values, channels)), shape_kji, matrix)


def classifier_inputs(image: Image, labelmap: Optional[Image], card: ModelCard,
                      task: ClassificationTask) -> List[Region]:
    """Every region a classifier task looks at in ``image`` (empty when its segment is absent)."""
    return [region_input(image, box, card, task) for box in region_boxes(image, labelmap, card, task)]
