"""The worst cases of each label, shown where they go most wrong: one slice per case, drawn as a PNG.

For each label, the ``WORST_PER_LABEL`` cases with the lowest Dice among those whose reference or
prediction holds the label (and whose Dice is below 1: a perfect case has no error to show) are
kept while the cases are evaluated; only their slices are held, never whole volumes. The slice is
cut across the reference grid's axis with the coarsest spacing (k when no one axis is coarser) at
the index with the most wrong voxels of that label (false positives + false negatives; the lowest
index on a tie). It is drawn over the image when one is given (``--images``), else over a grey
rendering of the reference labelmap, with the reference's outline in ``REFERENCE_RGB`` and the
prediction's in ``PREDICTION_RGB``, in the usual radiological view (superior or anterior at the top;
the patient's right on the viewer's left in axial and coronal slices, anterior on the left in
sagittal ones) and with the pixels' millimetre aspect kept.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from medautolabel.image import Image

WORST_PER_LABEL = 3
REFERENCE_RGB = (0, 220, 0)  # green
PREDICTION_RGB = (255, 0, 255)  # magenta
PANEL_PX = 256  # the longer side of a drawn slice
AXIS_NAMES = ("k", "j", "i")  # array axes of Image.array


@dataclass
class ErrorSlice:
    """One worst case of one label: the slice through its largest error, and what to say about it."""

    case: str
    label: int
    name: str
    dice: float
    axis: int  # array axis of the reference grid: 0 = k, 1 = j, 2 = i
    index: int  # the slice's index along ``axis``
    errors: int  # wrong voxels (false positives + false negatives) of the label on the slice
    reference: np.ndarray  # 2D reference labelmap slice, in display orientation
    prediction: np.ndarray  # 2D prediction labelmap slice (on the reference grid), in display orientation
    pixel_mm: Tuple[float, float]  # (row, column) size of a slice pixel
    view: str  # "axial", "coronal" or "sagittal"
    orient: Tuple[bool, bool, bool]  # (transpose, flip rows, flip columns): slice -> display
    ijk_to_ras: np.ndarray  # the reference grid, to cut the same slice from an image
    shape: Tuple[int, int, int]
    image: Optional[np.ndarray] = None  # 2D image slice in display orientation, when an image was given

    def facts(self) -> Dict[str, Any]:
        """What summary.json says about the slice (no pixels)."""
        return {"case": self.case, "label": self.label, "name": self.name, "dice": self.dice,
                "axis": AXIS_NAMES[self.axis], "slice": self.index, "error_voxels": self.errors,
                "view": self.view, "over_image": self.image is not None}


def slice_axis(ijk_to_ras: np.ndarray) -> int:
    """The array axis (0 = k, 1 = j, 2 = i) with the coarsest spacing; when several share it, the first of
    them in k, j, i order (so k for an isotropic grid)."""
    spacing_kji = np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0)[::-1]
    return next(a for a in range(3) if spacing_kji[a] >= spacing_kji.max() * (1 - 1e-6))


def error_slice(pred: np.ndarray, ref: np.ndarray, value: int, axis: int) -> Tuple[int, int]:
    """(index, count): the slice along ``axis`` with the most voxels where exactly one of ``pred`` and ``ref``
    is ``value`` (the lowest index on a tie)."""
    wrong = (pred == value) != (ref == value)
    counts = wrong.sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(counts))
    return index, int(counts[index])


def _orientation(ijk_to_ras: np.ndarray, axis: int) -> Tuple[str, Tuple[bool, bool, bool], Tuple[int, int]]:
    """(view, (transpose, flip rows, flip columns), (row axis, column axis)) for slices across ``axis``."""
    direction = np.asarray(ijk_to_ras)[:3, :3]
    column_of = {a: direction[:, 2 - a] for a in range(3)}  # array axis -> its RAS direction
    normal = int(np.argmax(np.abs(column_of[axis])))  # 0 = R, 1 = A, 2 = S
    view, vertical, horizontal = {2: ("axial", 1, 0), 1: ("coronal", 2, 0), 0: ("sagittal", 2, 1)}[normal]
    first, second = (a for a in range(3) if a != axis)
    transpose = abs(column_of[second][vertical]) * abs(column_of[first][horizontal]) > \
        abs(column_of[first][vertical]) * abs(column_of[second][horizontal])
    row_axis, col_axis = (second, first) if transpose else (first, second)
    # row 0 at the top: superior / anterior; column 0 on the left: the patient's right (anterior in sagittal)
    return view, (transpose, column_of[row_axis][vertical] > 0, column_of[col_axis][horizontal] > 0), \
        (row_axis, col_axis)


def _display(plane: np.ndarray, orient: Tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_columns = orient
    out = plane.T if transpose else plane
    return np.ascontiguousarray(out[::-1 if flip_rows else 1, ::-1 if flip_columns else 1])


def _cut(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


class WorstCases:
    """Collects the worst cases of each label while cases are evaluated (``offer``), holding slices only."""

    def __init__(self, per_label: int = WORST_PER_LABEL) -> None:
        self.per_label = per_label
        self._kept: Dict[str, List[ErrorSlice]] = {}

    def offer(self, case: str, row: Dict[str, Any], pred: Image, ref: Image) -> None:
        """Keep ``row`` (a ``segment_metrics`` row of ``case``; ``pred`` already on ``ref``'s grid) if it is
        among the worst of its label so far."""
        dice = float(row["dice"])
        if row["status"] == "both empty" or not math.isfinite(dice) or dice >= 1.0 or row["label"] == "":
            return
        kept = self._kept.setdefault(row["name"], [])
        if len(kept) >= self.per_label and (dice, case) >= (kept[-1].dice, kept[-1].case):
            return
        value = int(row["label"])
        axis = slice_axis(ref.ijk_to_ras)
        index, errors = error_slice(pred.array, ref.array, value, axis)
        view, orient, (row_axis, col_axis) = _orientation(ref.ijk_to_ras, axis)
        spacing_kji = np.linalg.norm(ref.ijk_to_ras[:3, :3], axis=0)[::-1]
        kept.append(ErrorSlice(case, value, str(row["name"]), dice, axis, index, errors,
                               _display(_cut(ref.array, axis, index), orient),
                               _display(_cut(pred.array, axis, index), orient),
                               (float(spacing_kji[row_axis]), float(spacing_kji[col_axis])), view, orient,
                               ref.ijk_to_ras.copy(), tuple(ref.array.shape)))
        kept.sort(key=lambda s: (s.dice, s.case))
        del kept[self.per_label:]

    def add_images(self, images: Dict[str, Path]) -> None:
        """Cut each kept slice from its case's image (case -> image file or DICOM folder), put on the
        reference grid (``align.to_reference_grid``); cases without an image keep the labelmap background."""
        from medautolabel.evaluation.align import to_reference_grid
        from medautolabel.io.images import read_image

        for entry in self.slices():
            path = images.get(entry.case)
            if path is None:
                continue
            grid = Image(np.broadcast_to(np.uint8(0), entry.shape), entry.ijk_to_ras)
            image, _ = to_reference_grid(read_image(path), grid, path)
            entry.image = _display(_cut(image.array, entry.axis, entry.index), entry.orient).astype(np.float32)

    def slices(self) -> List[ErrorSlice]:
        """The kept slices: labels in the order first seen, each label's cases from the lowest Dice."""
        return [s for kept in self._kept.values() for s in kept]


def _grey(entry: ErrorSlice) -> np.ndarray:
    """uint8 background: the image windowed to its slice's 1st-99th percentiles, or the reference labelmap
    (background dark, each label value its own lighter grey)."""
    if entry.image is not None:
        values = entry.image[np.isfinite(entry.image)]
        low, high = (np.percentile(values, [1, 99]) if values.size else (0.0, 1.0))
        high = high if high > low else low + 1.0
        return (np.clip((np.nan_to_num(entry.image, nan=low) - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    ref = entry.reference.astype(np.int64)
    return np.where(ref == 0, 30, 90 + (ref * 53) % 140).astype(np.uint8)


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The inner band of ``width`` pixels along the edge of ``mask`` (the picture's border counts as an edge)."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def display_size(entry: ErrorSlice, longest: int = PANEL_PX) -> Tuple[int, int]:
    """(height, width) in pixels of the drawn slice: the longer side ``longest``, millimetre aspect kept."""
    rows, cols = entry.reference.shape
    h_mm, w_mm = rows * entry.pixel_mm[0], cols * entry.pixel_mm[1]
    scale = longest / max(h_mm, w_mm)
    return max(1, round(h_mm * scale)), max(1, round(w_mm * scale))


def slice_png(entry: ErrorSlice) -> bytes:
    """The PNG of ``entry``: the background in grey, the reference's outline of the label in REFERENCE_RGB and
    the prediction's in PREDICTION_RGB (drawn last, so it shows where both run along the same edge)."""
    from PIL import Image as PILImage

    height, width = display_size(entry)
    rows = np.minimum((np.arange(height) + 0.5) * entry.reference.shape[0] / height, entry.reference.shape[0] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * entry.reference.shape[1] / width, entry.reference.shape[1] - 1)
    pick = np.ix_(rows.astype(int), cols.astype(int))
    rgb = np.repeat(_grey(entry)[pick][..., None], 3, axis=2)
    for labelmap, colour in ((entry.reference, REFERENCE_RGB), (entry.prediction, PREDICTION_RGB)):
        rgb[_outline((labelmap == entry.label)[pick])] = colour
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()

