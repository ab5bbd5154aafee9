"""Training losses: DiceCE on the softmax channels, and multiple-instance BCE on evidence channels.

The classification loss mirrors the engine's ``voxel_evidence`` classifier (classify.py): the
evidence map is the channel's sigmoid, Gaussian-smoothed by ``smoothing_mm``; P(present) of a
region is its maximum. A case-level label says only whether a finding is *somewhere* in the case,
so the max is taken over a bag that holds (nearly) the whole case for positive cases, and over any
crop for negative cases (nothing is present anywhere in them).
"""

from __future__ import annotations

from typing import Sequence

import torch


def segmentation_loss():
    """MONAI DiceCE over the softmax channels (background excluded from the Dice term).

    ``batch=True`` computes Dice over the whole batch, so a crop without foreground does not
    give a noisy per-sample Dice of an empty target.
    """
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True, batch=True)


class EvidenceMax(torch.nn.Module):
    """P(present) per sample: max over voxels of the Gaussian-smoothed sigmoid of one channel."""

    def __init__(self, smoothing_mm: float, spacing: Sequence[float]) -> None:
        super().__init__()
        self.smooth = None
        if smoothing_mm > 0:
            from monai.networks.layers import GaussianFilter

            # sampled kernel, 3 sigma: the same Gaussian as scipy.ndimage.gaussian_filter in classify.py
            self.smooth = GaussianFilter(3, sigma=[smoothing_mm / float(s) for s in spacing], truncated=3.0,
                                         approx="sampled")

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, *spatial) -> (B,)
        p = torch.sigmoid(logits.float())[:, None]
        if self.smooth is not None:
            p = self.smooth(p)
        return p.flatten(1).amax(dim=1).clamp(1e-6, 1.0 - 1e-6)


def evidence_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of P(present) against the case's class (1 present, 0 absent)."""
    return torch.nn.functional.binary_cross_entropy(p, target.float())
