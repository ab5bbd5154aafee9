"""A valid model card (dict) for tests, shaped like docs/model-card.md's example; override what a test needs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict

import numpy as np

from medautolabel.image import make_ijk_to_ras

SCT_STRUCTURE = {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"}

BASE: Dict[str, Any] = {
    "format": "medautolabel-model/1",
    "id": "test-model",
    "name": "Test model",
    "version": "0.0.1",
    "description": "for tests",
    "modality": "CT",
    "input": {"channels": [{"name": "soft tissue", "window": [-150, 350]},
                           {"name": "wide", "window": [-200, 1800]}]},
    "preprocessing": {"orientation": "RAS", "spacing": [0.8, 0.8, 0.8],
                      "crop_foreground": {"threshold": -500, "margin_mm": 10}},
    "network": {"architecture": "UNet",
                "parameters": {"spatial_dims": 3, "in_channels": 2, "out_channels": 4,
                               "channels": [4, 8], "strides": [2], "num_res_units": 0},
                "weights": "model.pt"},
    "inference": {"roi_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 1, "blend": "gaussian"},
    "segmentation": {"activation": "softmax", "channels": 3},
    "labels": [
        {"value": 1, "channel": 1, "name": "Vessel", "color": [0.85, 0.25, 0.2],
         "terminology": {"category": SCT_STRUCTURE,
                         "type": {"scheme": "SCT", "value": "59820001", "meaning": "Blood vessel"}},
         "postprocessing": {"min_size_mm3": 20.0, "largest_component": False}},
        {"value": 2, "channel": 2, "name": "Nerve", "color": [0.95, 0.85, 0.3],
         "terminology": {"category": SCT_STRUCTURE,
                         "type": {"scheme": "SCT", "value": "3057000", "meaning": "Nerve"}},
         "postprocessing": {"min_size_mm3": 10.0, "largest_component": False}},
    ],
    "classification": [{"task": "aneurysm", "classes": ["absent", "present"], "method": "voxel_evidence",
                        "channel": 3, "activation": "sigmoid", "smoothing_mm": 1.0}],
    "low_confidence_threshold": 0.7,
    "provenance": {"trained_by": "tests"},
    "metrics": {},
}


def card_dict(**sections: Any) -> Dict[str, Any]:
    """A deep copy of BASE with top-level sections replaced."""
    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(sections))
    return d


def write_card(folder: Path, data: Dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


# Grids named by what makes them hard: (spacing i,j,k), direction columns, shape (k, j, i)
PERMUTED = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # i->A, j->-S... a sagittal-like scan
GRIDS = {
    "axial": ((0.8, 0.8, 0.8), np.eye(3), (40, 44, 48)),
    "flipped-anisotropic": ((0.7, 0.9, 2.0), np.diag([-1.0, -1.0, 1.0]), (18, 40, 50)),
    "permuted": ((1.2, 0.6, 0.9), PERMUTED, (36, 60, 30)),
    "oblique-anisotropic": ((0.75, 1.1, 1.6), rotation("z", 25) @ rotation("x", -15), (22, 34, 46)),
    "oblique-permuted-flipped": ((1.3, 0.7, 1.0), rotation("y", 20) @ PERMUTED @ np.diag([1.0, -1.0, 1.0]),
                                 (35, 52, 28)),
}


def grid(name: str, center=(0.0, 0.0, 0.0)):
    """(shape_kji, ijk_to_ras) of a named grid whose centre voxel sits at ``center`` (RAS mm)."""
    spacing, direction, shape = GRIDS[name]
    m = make_ijk_to_ras(spacing, direction)
    mid_ijk = (np.array(shape[::-1]) - 1) / 2.0
    m[:3, 3] = np.asarray(center) - m[:3, :3] @ mid_ijk
    return shape, m


def ras_coords(shape, matrix) -> np.ndarray:
    """RAS coordinates (k, j, i, 3) of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]
