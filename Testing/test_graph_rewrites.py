"""Layers rewritten for OpenVINO: the same numbers as the originals, the eager network untouched."""

from __future__ import annotations

import pytest
import torch

from medautolabel.runtime import graph_rewrites, openvino_graph


def _group_norm(channels: int, groups: int, affine: bool = True, seed: int = 0) -> torch.nn.GroupNorm:
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, channels, eps=1e-5, affine=affine)
    if affine:  # away from the initial 1 / 0, so that a scale or shift applied wrongly shows
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    return norm


@pytest.mark.parametrize("channels,groups,affine,spatial", [
    (8, 8, True, (6, 7, 5)),    # one channel per group: the instance-norm form
    (16, 8, True, (6, 7, 5)),
    (12, 3, True, (4, 5, 6)),
    (16, 4, False, (4, 5, 6)),
    (6, 2, True, (9, 11)),      # 2D
])
def test_channel_stats_group_norm_equals_group_norm(channels, groups, affine, spatial):
    norm = _group_norm(channels, groups, affine)
    rewritten = graph_rewrites.ChannelStatsGroupNorm(norm)
    x = torch.randn((2, channels) + spatial, generator=torch.Generator().manual_seed(1)) * 3 + 2
    x[1] *= 10  # a second case on another scale: statistics are per case
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), norm(x), rtol=1e-5, atol=1e-5)


def _segresnet() -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1),
                     blocks_up=(1,)).eval()


def test_for_openvino_rewrites_a_copy_and_leaves_the_network_alone():
    net = _segresnet()
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    rewritten = graph_rewrites.for_openvino(net)
    assert rewritten is not net
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in rewritten.modules())
    assert sum(isinstance(m, graph_rewrites.ChannelStatsGroupNorm) for m in rewritten.modules()) == norms > 0
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) == norms
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), net(x), rtol=1e-4, atol=1e-5)


def test_a_network_without_group_norm_is_not_copied():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.InstanceNorm3d(2))
    assert graph_rewrites.for_openvino(net) is net


@pytest.mark.skipif(not openvino_graph.available(), reason="OpenVINO is not installed")
def test_the_converted_graph_has_no_group_normalization_and_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv(openvino_graph.CACHE_ENV, str(tmp_path))
    net, shape = _segresnet(), (1, 1, 16, 16, 16)
    example = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    ops = {op.get_type_name() for op in openvino_graph.convert_network(net, example).get_ordered_ops()}
    assert "Convolution" in ops and "GroupNormalization" not in ops
    compiled = openvino_graph.compiled_for_cpu(net, shape, threads=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(example), net(example), rtol=0, atol=1e-4)


def test_the_rewrite_version_is_part_of_the_cache_key(monkeypatch):
    net, shape = _segresnet(), (1, 1, 16, 16, 16)
    before = openvino_graph.network_key(net, shape)
    monkeypatch.setattr(graph_rewrites, "VERSION", graph_rewrites.VERSION + "-changed")
    assert openvino_graph.network_key(net, shape) != before


@pytest.mark.skipif(not openvino_graph.available(), reason="OpenVINO is not installed")
@pytest.mark.parametrize("layer,spatial,rewritten", [
    (torch.nn.ConvTranspose3d(6, 3, 3, stride=2, padding=1, output_padding=1), (5, 6, 7), True),
    (torch.nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1), (6, 9), True),
    (torch.nn.ConvTranspose3d(6, 12, 3, stride=2, padding=1, output_padding=1), (4, 4, 4), False),  # many outputs
    (torch.nn.ConvTranspose3d(6, 3, 2, stride=2), (4, 5, 6), False),  # another kernel
])
def test_small_transposed_convolutions_become_depth_to_space(layer, spatial, rewritten):
    ov = openvino_graph.import_openvino()
    torch.manual_seed(4)
    net = torch.nn.Sequential(layer, torch.nn.ReLU()).eval()
    x = torch.randn((1, layer.in_channels) + spatial, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model = ov.convert_model(torch.jit.trace(net, x), example_input=x)
        expected = net(x)
    graph_rewrites.rewrite_openvino_model(model)
    types = {op.get_type_name() for op in model.get_ordered_ops()}
    assert ("DepthToSpace" in types) is rewritten
    assert ("ConvolutionBackpropData" in types) is not rewritten
    compiled = openvino_graph.compile_model(model, threads=1)  # float32 on every CPU (AMX would take bf16)
    got = compiled.create_infer_request().infer({0: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-5)
