"""A real model folder whose answer is known exactly, and images it should label (shared by several tests).

The network is TorchScript that thresholds its input: HU above ~150 is vessel, above ~800 is
aneurysm evidence. What it labels is then fixed by the image, so tests check the engine and the
command line (geometry, files, messages) rather than a network's skill.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from cardfactory import card_dict, grid, ras_coords, write_card

from medautolabel.image import Image
from medautolabel.runtime import network as network_module

CENTER = np.array([3.0, -2.0, 1.5])  # contrast sphere centre, RAS mm
RADIUS = 7.0


class ThresholdNet(torch.nn.Module):
    """Logits: background 0, vessel steep around HU 150, nerve never, aneurysm evidence around HU 800."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0:1]
        return torch.cat([torch.zeros_like(v), 40.0 * (v - 0.575), torch.full_like(v, -20.0),
                          40.0 * (v - 0.9)], dim=1)


def write_threshold_model(folder: Path) -> Path:
    """Write the model folder (model.json + model.ts) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(ThresholdNet()).save(str(folder / "model.ts"))
    d = card_dict(id="threshold", input={"channels": [{"name": "wide", "window": [-1000.0, 1000.0]}]})
    d["preprocessing"] = {"orientation": "RAS", "spacing": [0.8, 0.8, 0.8],
                          "crop_foreground": {"threshold": -500, "margin_mm": 2}}
    d["network"] = {"architecture": "TorchScript", "parameters": {"in_channels": 1, "out_channels": 4},
                    "weights": "model.ts", "sha256": network_module.file_sha256(folder / "model.ts")}
    d["inference"] = {"roi_size": [24, 24, 24], "overlap": 0.25, "sw_batch_size": 2, "blend": "gaussian"}
    write_card(folder, d)
    return folder


def sphere_image(name: str = "oblique-anisotropic", center=CENTER) -> Image:
    """Air around a soft-tissue ball (0 HU) holding a contrast sphere (300 HU) at ``center`` (RAS mm)."""
    shape, m = grid(name)
    xyz = ras_coords(shape, m)
    hu = np.full(shape, -1000.0, np.float32)
    hu[np.linalg.norm(xyz, axis=-1) < 12.5] = 0.0
    hu[np.linalg.norm(xyz - np.asarray(center), axis=-1) <= RADIUS] += 300.0
    return Image(np.rint(hu).astype(np.int16), m, {"modality": "CT"})
