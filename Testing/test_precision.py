"""Every path computes in the precision it was asked for, whatever the CPU offers (AVX2 or AVX-512/AMX).

OpenVINO computes in bfloat16 on CPUs with AMX unless told ``f32``; cuDNN takes TF32 for float32
convolutions by default; oneDNN can be told to compute float32 in bfloat16. These tests set the
worst defaults a machine could have and check what each path actually used.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from medautolabel.catalog.modelcard import InferenceSpec
from medautolabel.labelling.inference import sliding_window
from medautolabel.runtime import device, openvino_graph
from medautolabel.runtime.cpu_graph import build_graph


class PrecisionProbe(torch.nn.Module):
    """Records the arithmetic torch is set to while it runs: autocast state and float32 precisions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_autocast = torch.is_autocast_enabled("cpu")
        self.seen.append((cpu_autocast, torch.get_autocast_dtype("cpu") if cpu_autocast else None,
                          device.float32_precisions()))
        return self.conv(x)


@pytest.fixture()
def worst_defaults():
    """oneDNN told to compute float32 in bfloat16, cuDNN in TF32: what an AMX machine's settings could be."""
    backends = device.fp32_backends()
    if not backends:
        pytest.skip("this torch has no per-backend float32 precision settings")
    saved = {n: b.fp32_precision for n, b in backends.items()}
    for name, b in backends.items():
        b.fp32_precision = "bf16" if name.startswith("mkldnn") else "tf32" if name.startswith("cud") else "none"
    yield
    for name, b in backends.items():
        b.fp32_precision = saved[name]


def _spec() -> InferenceSpec:
    return InferenceSpec(roi_size=(8, 8, 8), overlap=0.25, sw_batch_size=1, blend="gaussian")


def test_float32_inference_runs_in_ieee_float32_and_restores_the_settings(worst_defaults):
    before = device.float32_precisions()
    probe = PrecisionProbe().eval()
    with torch.no_grad():
        sliding_window(probe, torch.rand(1, 1, 12, 12, 12), _spec(), torch.device("cpu"), precision="float32")
    assert probe.seen
    for autocast_on, _, precisions in probe.seen:
        assert not autocast_on
        assert set(precisions.values()) == {"ieee"}, precisions
    assert device.float32_precisions() == before  # the caller's settings are back


def test_bfloat16_inference_runs_under_bfloat16_autocast():
    probe = PrecisionProbe().eval()
    with torch.no_grad():
        sliding_window(probe, torch.rand(1, 1, 12, 12, 12), _spec(), torch.device("cpu"), precision="bfloat16")
    assert probe.seen and all(on and dtype == torch.bfloat16 for on, dtype, _ in probe.seen)


def test_auto_precision_is_float32_exactly_where_the_cpu_has_no_native_bfloat16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: False)
    assert device.resolve_precision(cpu, "auto") == "float32"
    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: True)
    assert device.resolve_precision(cpu, "auto") == "bfloat16"
    assert device.resolve_precision(cpu, "float32") == "float32"  # an explicit choice is kept on every CPU


def test_the_frozen_graph_is_checked_in_ieee_float32(worst_defaults, monkeypatch):
    seen = []
    real = torch.jit.freeze

    def spy(*args, **kwargs):
        seen.append(device.float32_precisions())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "freeze", spy)
    assert build_graph(torch.nn.Conv3d(1, 2, 3, padding=1).eval(), (1, 1, 8, 8, 8)) is not None
    assert seen and set(seen[0].values()) == {"ieee"}


@pytest.mark.skipif(not openvino_graph.available(), reason="OpenVINO is not installed")
def test_openvino_computes_in_f32_on_every_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(openvino_graph.CACHE_ENV, str(tmp_path))
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    compiled = openvino_graph.compiled_for_cpu(net, (1, 1, 16, 16, 16), threads=1)
    assert compiled is not None and compiled.precision == "f32"
    # from the cache as well
    again = openvino_graph.compiled_for_cpu(net, (1, 1, 16, 16, 16), threads=1)
    assert again is not None and again.precision == "f32"
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), device.float32_arithmetic():
        expected = net(x)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=1e-4)
