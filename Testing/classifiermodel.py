"""A classification-only model folder (no segmentation network) whose tags are known exactly (shared by tests).

Two classifier networks, tiny MONAI ResNets with seeded random weights, whose last layer is zeroed
but for its bias: their logits are the bias whatever the image, so the tags' probabilities are
known in closed form (``EXPECTED``) and tests check the engine, the files and the Slicer glue
rather than a network's skill.

- "aneurysm": softmax over (absent, present), logits (0, 2), temperature 2, ``"validated": false``
  -> present, p = 1 / (1 + e^-1) = 0.7311.
- "findings": sigmoid, one tag per class, logits (3, -3, 0.5), a threshold of 0.7 for occlusion
  -> findings/stenosis present p = 0.9526; findings/calcification absent p = 0.9526;
  findings/occlusion absent (0.6225 < 0.7) p = 0.3775, below the card's low-confidence 0.7.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Tuple

import torch
from cardfactory import card_dict, write_card

from medautolabel.runtime.network import file_sha256

RESNET = {"spatial_dims": 3, "n_input_channels": 1, "block": "basic", "layers": [1, 1, 1, 1],
          "block_inplanes": [4, 8, 8, 8], "conv1_t_size": 3, "conv1_t_stride": 2}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# tag -> (label, probability of the label, low confidence, validated)
EXPECTED: Dict[str, Tuple[str, float, bool, bool]] = {
    "aneurysm": ("present", _sigmoid(2.0 / 2.0), False, False),
    "findings/stenosis": ("present", _sigmoid(3.0), False, True),
    "findings/calcification": ("absent", 1.0 - _sigmoid(-3.0), False, True),
    "findings/occlusion": ("absent", 1.0 - _sigmoid(0.5), True, True),
}


def _save_resnet(path: Path, bias, seed: int) -> None:
    """A ResNet with seeded random weights whose output is ``bias`` for every input."""
    from monai.networks.nets import ResNet

    torch.manual_seed(seed)
    net = ResNet(num_classes=len(bias), **RESNET)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    torch.save(net.state_dict(), path)


def write_classifier_model(folder: Path) -> Path:
    """Write the model folder (model.json, aneurysm.pt, findings.pt) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    _save_resnet(folder / "aneurysm.pt", [0.0, 2.0], seed=0)
    _save_resnet(folder / "findings.pt", [3.0, -3.0, 0.5], seed=1)
    d = card_dict(id="classifier-only", name="Classifier-only test model",
                  input={"channels": [{"name": "wide", "window": [-1000.0, 1000.0]}]})
    for key in ("network", "inference", "segmentation"):
        del d[key]
    d["labels"] = []
    d["preprocessing"] = {"orientation": "RAS", "crop_foreground": {"threshold": -500, "margin_mm": 2}}
    d["classification"] = [
        {"task": "aneurysm", "classes": ["absent", "present"], "method": "network", "activation": "softmax",
         "network": {"architecture": "ResNet", "parameters": dict(RESNET, num_classes=2), "weights": "aneurysm.pt",
                     "sha256": file_sha256(folder / "aneurysm.pt")},
         "input": {"region": "whole", "shape": [16, 16, 16]}, "temperature": 2.0, "validated": False},
        {"task": "findings", "classes": ["stenosis", "calcification", "occlusion"], "method": "network",
         "activation": "sigmoid",
         "network": {"architecture": "ResNet", "parameters": dict(RESNET, num_classes=3), "weights": "findings.pt"},
         "input": {"region": "whole", "shape": [16, 16, 16]}, "thresholds": {"occlusion": 0.7}},
    ]
    write_card(folder, d)
    return folder
