"""The engine's one geometry convention: voxels in Slicer's (k, j, i) order + a 4x4 ijk->RAS matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np


@dataclass
class Image:
    """A 3D image: ``array[k, j, i]`` and ``ijk_to_ras`` (4x4, homogeneous, RAS millimetres).

    ``meta`` holds non-identifying facts only (e.g. ``modality``); never patient names or IDs.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError("ijk_to_ras must be a 4x4 matrix")
        if self.array.ndim != 3:
            raise ValueError(f"Image needs a 3D array, got shape {self.array.shape}")

    @property
    def shape_kji(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the i, j, k axes."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (i, j, k) = (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.ijk_to_ras[:3, :3]))) / 1000.0

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    def with_array(self, array: np.ndarray) -> Image:
        """A new image on the same grid (same shape, same matrix)."""
        if array.shape[-3:] != self.array.shape:
            raise ValueError(f"shape {array.shape} does not fit grid {self.array.shape}")
        return Image(array, self.ijk_to_ras.copy(), dict(self.meta))

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel coordinates in (i, j, k) order to RAS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Map (N, 3) RAS points to continuous (i, j, k) voxel coordinates."""
        m = self.ras_to_ijk
        return np.asarray(ras, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]


def make_ijk_to_ras(spacing, direction=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Build a 4x4 ijk->RAS matrix from spacing (i, j, k), direction columns and origin."""
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    m[:3, 3] = origin
    return m
