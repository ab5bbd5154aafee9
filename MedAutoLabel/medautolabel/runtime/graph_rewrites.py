"""Same-math forms of layers that OpenVINO compiles into faster CPU graphs; the eager network is never changed.

Before conversion, on a copy of the network (``for_openvino``): OpenVINO's CPU plugin runs a
GroupNormalization as Reshape -> MVN -> Reshape in the plain (channels-first) layout, so every
normalisation between two convolutions costs two layout reorders of the whole activation, a
visible share of a SegResNet window. Written with per-channel reductions instead
(``ChannelStatsGroupNorm``), the activations stay in the convolutions' blocked layout, which makes
the window faster (figures in docs/benchmarks.md).

After conversion, on the OpenVINO model (``rewrite_openvino_model``): small stride-2 transposed
convolutions become a convolution + DepthToSpace. The compiled model is checked against the eager
network like any conversion (openvino_graph.py).
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
import torch.nn.functional as F

VERSION = "2"  # part of the converted-model cache key: bump when a rewrite changes


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


# --- on the converted OpenVINO model ---------------------------------------------------------------

# A transposed convolution with stride 2, kernel 3, padding 1 and output padding 1 (MONAI's UNet up
# layers) writes each output phase (even/odd position per axis) from at most 2 input voxels per axis:
# y[2m] = w[1] x[m], y[2m+1] = w[2] x[m] + w[0] x[m+1]. So it equals a 2-tap convolution with one
# output channel per phase and output channel, followed by DepthToSpace. (phase, tap) -> kernel index:
_PHASE_TAP = {(0, 0): 1, (1, 0): 2, (1, 1): 0}
# Rewritten only up to this many output channels: with few outputs (the UNet's last up layer, 32 -> 4
# channels) the 2-tap form is faster, with 16 it is slower (docs/benchmarks.md).
SMALL_TRANSPOSED_OUTPUTS = 8


def _phase_weights(w):
    """(C_in, C_out, 3, ...) transposed-convolution weights -> (2^d * C_out, C_in, 2, ...) convolution weights."""
    c_in, c_out = w.shape[:2]
    dims = w.ndim - 2
    out = np.zeros((2 ** dims * c_out, c_in) + (2,) * dims, dtype=w.dtype)
    for p_index, phases in enumerate(itertools.product(range(2), repeat=dims)):  # blocks_first channel order
        for taps in itertools.product(range(2), repeat=dims):
            kernel = [_PHASE_TAP.get((p, t)) for p, t in zip(phases, taps)]
            if None not in kernel:
                out[(slice(p_index * c_out, (p_index + 1) * c_out), slice(None)) + taps] = \
                    w[(slice(None), slice(None)) + tuple(kernel)].T
    return out


def _is_small_stride2_transposed(node) -> bool:
    if node.get_type_name() != "ConvolutionBackpropData" or node.get_input_size() != 2:
        return False
    weights = node.input_value(1).get_node()
    if weights.get_type_name() != "Constant":
        return False
    shape = list(weights.get_output_shape(0))
    a = node.get_attributes()
    dims = len(shape) - 2
    return (dims >= 1 and shape[2:] == [3] * dims and shape[1] <= SMALL_TRANSPOSED_OUTPUTS
            and list(a.get("strides", [])) == [2] * dims and list(a.get("dilations", [])) == [1] * dims
            and list(a.get("pads_begin", [])) == [1] * dims and list(a.get("pads_end", [])) == [1] * dims
            and list(a.get("output_padding", [])) == [1] * dims
            and str(a.get("auto_pad", "explicit")).lower() in ("explicit", "notset"))


def rewrite_openvino_model(model):
    """Rewrite, in place, what OpenVINO runs faster in another form; returns ``model``.

    Small stride-2 transposed convolutions (the last up layer of a MONAI UNet, whose output channels
    are the classes) become a 2-tap convolution + DepthToSpace: OpenVINO's transposed convolution
    pads few output channels to a full vector block and runs at a fraction of its convolution speed.
    """
    from openvino import opset13 as ops

    for node in model.get_ordered_ops():
        if not _is_small_stride2_transposed(node):
            continue
        dims = len(node.get_output_partial_shape(0)) - 2
        weights = _phase_weights(node.input_value(1).get_node().get_data())
        conv = ops.convolution(node.input_value(0), ops.constant(weights), strides=[1] * dims,
                               pads_begin=[0] * dims, pads_end=[1] * dims, dilations=[1] * dims)
        node.output(0).replace(ops.depth_to_space(conv, "blocks_first", 2).output(0))
    model.validate_nodes_and_infer_types()
    return model
