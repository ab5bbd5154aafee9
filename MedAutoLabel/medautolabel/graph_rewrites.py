"""Same-math forms of layers that OpenVINO compiles into faster CPU graphs (applied to a copy before conversion).

OpenVINO's CPU plugin runs a GroupNormalization as Reshape -> MVN -> Reshape in the plain
(channels-first) layout, so every normalisation between two convolutions costs two layout
reorders of the whole activation (12 % of a SegResNet-8 window on a 2-core AVX2 CPU). Written
with per-channel reductions instead (``ChannelStatsGroupNorm``), the activations stay in the
convolutions' blocked layout: 0.59 s against 0.64 s per 96^3 SegResNet-8 window (measured). The
eager network is never changed; the compiled copy is checked against it like any conversion.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

VERSION = "1"  # part of the converted-model cache key: bump when a rewrite changes


class ChannelStatsGroupNorm(torch.nn.Module):
    """``torch.nn.GroupNorm`` computed from per-channel spatial means (same results to float rounding).

    With one channel per group it is an instance normalisation (OpenVINO: one MVN over the spatial
    axes, in any layout). Otherwise the group mean is the mean of its channels' means (every channel
    has the same number of voxels), and the variance is taken the same way from the centred values.
    """

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps = int(norm.num_groups), float(norm.eps)
        self.weight = norm.weight if norm.affine else None
        self.bias = norm.bias if norm.affine else None

    def _group_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Each channel's group mean over the spatial axes, shaped (N, C, 1, ...) for broadcasting.

        The spatial reduction runs on the full-rank tensor: reshaping the activation itself to
        (N, C, -1) would force OpenVINO back into the plain layout, which is what this avoids.
        """
        per_channel = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        n, c = per_channel.shape[:2]
        g = self.num_groups
        groups = per_channel.reshape(n, g, c // g).mean(dim=2, keepdim=True).expand(n, g, c // g)
        return groups.reshape(per_channel.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if self.num_groups == c:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        centred = x - self._group_mean(x)
        variance = self._group_mean(centred * centred)
        out = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            shape = (1, c) + (1,) * (x.dim() - 2)
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def for_openvino(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` itself when nothing applies, else a copy with its GroupNorm layers rewritten."""
    if not any(isinstance(m, torch.nn.GroupNorm) for m in network.modules()):
        return network
    rewritten = copy.deepcopy(network)
    for module in list(rewritten.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, ChannelStatsGroupNorm(child))
    return rewritten.eval()
