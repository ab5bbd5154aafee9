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


def gaussian_kernel(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """The sampled, normalised 1-D Gaussian of scipy.ndimage.gaussian_filter (radius int(truncate*sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class EvidenceMax(torch.nn.Module):
    """P(present) per sample: max over voxels of the Gaussian-smoothed sigmoid of one channel.

    Written by hand rather than with MONAI's GaussianFilter: on the CPU the backward pass of its
    separable convolutions is far slower than the forward (docs/benchmarks.md). The gradient of a
    maximum flows only through the winning voxel, so the smoothed map is computed without
    gradients to find it, and the value there is recomputed differentiably as the kernel-weighted
    sum of its neighbourhood. Edges are handled as scipy's mode="nearest" (classify.py).
    """

    def __init__(self, smoothing_mm: float, spacing: Sequence[float]) -> None:
        super().__init__()
        self.kernels = None
        if smoothing_mm > 0:
            self.kernels = [gaussian_kernel(smoothing_mm / float(s)) for s in spacing]

    def _smooth(self, p: torch.Tensor) -> torch.Tensor:  # (B, *spatial), no gradients needed
        x = p[:, None]
        for axis, k in enumerate(self.kernels):
            r = (k.numel() - 1) // 2
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)], pad[2 * (2 - axis) + 1] = r, r  # F.pad lists the last axis first
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = k.numel()
            x = torch.nn.functional.conv3d(torch.nn.functional.pad(x, pad, mode="replicate"),
                                           k.to(x).view(shape))
        return x[:, 0]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, *spatial) -> (B,)
        p = torch.sigmoid(logits.float())
        if self.kernels is None:
            return p.flatten(1).amax(dim=1).clamp(1e-6, 1.0 - 1e-6)
        with torch.no_grad():
            winner = self._smooth(p).flatten(1).argmax(dim=1)
        spatial = p.shape[1:]
        values = []
        for b in range(p.shape[0]):
            centre = [int(c) for c in torch.unravel_index(winner[b], spatial)]
            patch = p[b]
            for axis, k in enumerate(self.kernels):
                r = (k.numel() - 1) // 2
                idx = (torch.arange(-r, r + 1) + centre[axis]).clamp(0, spatial[axis] - 1).to(p.device)
                patch = patch.index_select(axis, idx)
            w = self.kernels[0].to(p)[:, None, None] * self.kernels[1].to(p)[None, :, None] \
                * self.kernels[2].to(p)[None, None, :]
            values.append((patch * w).sum())
        return torch.stack(values).clamp(1e-6, 1.0 - 1e-6)


def evidence_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of P(present) against the case's class (1 present, 0 absent)."""
    return torch.nn.functional.binary_cross_entropy(p, target.float())
