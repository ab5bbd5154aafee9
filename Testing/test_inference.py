"""Device choice, sliding-window progress/cancel, and the out-of-memory fallback."""

from __future__ import annotations

import pytest
import torch

from medautolabel.catalog.modelcard import InferenceSpec
from medautolabel.errors import Cancelled
from medautolabel.labelling.inference import constant_value, infer, sliding_window, window_count
from medautolabel.runtime.device import DeviceError, autocast, is_out_of_memory, select_device

torch.set_num_threads(1)
CPU = torch.device("cpu")


class Doubler(torch.nn.Module):
    """Counts window batches; output = 2 * input, so stitching must give back exactly 2 * input."""

    def __init__(self, oom_above: int = 0) -> None:
        super().__init__()
        self.batches = []
        self.oom_above = oom_above

    def forward(self, x):
        if self.oom_above and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.batches.append(x.shape[0])
        return torch.cat([2 * x, -x], dim=1)


def test_select_device():
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    assert select_device("CPU") == CPU
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU found"):
            select_device("cuda")
        assert select_device("auto") != torch.device("cuda")


def test_autocast_only_on_cuda():
    with autocast(CPU):
        assert not torch.is_autocast_enabled()
    with autocast(CPU, "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shapes do not match"))


@pytest.mark.parametrize("size,roi,overlap,batch", [((40, 30, 20), (16, 16, 16), 0.25, 3),
                                                    ((10, 50, 16), (16, 16, 16), 0.5, 1),
                                                    ((16, 16, 16), (16, 16, 16), 0.25, 2)])
def test_progress_counts_every_window_batch(size, roi, overlap, batch):
    net = Doubler()
    x = torch.rand((1, 1) + size)
    seen = []
    out = sliding_window(net, x, InferenceSpec(roi, overlap, batch, "gaussian"), CPU, progress=seen.append)
    torch.testing.assert_close(out, torch.cat([2 * x, -x], dim=1)[0])
    assert sum(net.batches) == window_count(size, roi, overlap)
    assert len(seen) == len(net.batches) and seen[-1] == 1.0
    assert seen == sorted(seen)


def test_cancel_is_checked_before_each_window_batch():
    net = Doubler()
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        sliding_window(net, torch.rand(1, 1, 48, 48, 48), InferenceSpec((16, 16, 16), 0.25, 2), CPU, cancel=cancel)
    assert len(net.batches) == 2


def test_out_of_memory_halves_the_window_batch_with_a_message():
    net = Doubler(oom_above=1)
    messages = []
    x = torch.rand(1, 1, 40, 20, 20)
    out, used, precision = infer(net, x, InferenceSpec((16, 16, 16), 0.25, 4), CPU, warn=messages.append,
                                 precision="float32")
    torch.testing.assert_close(out, torch.cat([2 * x, -x], dim=1)[0])
    assert used == "cpu" and set(net.batches) == {1}
    assert len(messages) == 2 and "out of memory on cpu with 4 window(s) per batch; retrying with 2" in messages[0]


def test_other_errors_are_not_retried():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    messages = []
    with pytest.raises(ValueError, match="boom"):
        infer(Broken(), torch.rand(1, 1, 16, 16, 16), InferenceSpec((16, 16, 16), 0.25, 4), CPU,
              warn=messages.append)
    assert messages == []


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_uses_bfloat16_only_where_the_cpu_has_it(monkeypatch, native):
    from medautolabel.errors import MedAutoLabelError
    from medautolabel.runtime import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: native)
    assert device_module.resolve_precision(CPU, "auto") == ("bfloat16" if native else "float32")
    assert device_module.resolve_precision(CPU, "float32") == "float32"
    assert device_module.resolve_precision(CPU, "bfloat16") == "bfloat16"
    assert device_module.resolve_precision(torch.device("cuda"), "auto") == "float16"
    with pytest.raises(MedAutoLabelError, match="float16 runs only on a CUDA GPU"):
        device_module.resolve_precision(CPU, "float16")
    with pytest.raises(MedAutoLabelError, match="unknown precision 'half'"):
        device_module.resolve_precision(CPU, "half")


def _tiny_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1,
                norm="instance").eval()


class Counting(torch.nn.Module):
    """A real network that also counts the windows it is given (side effects: never traced)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.windows = net, 0

    def forward(self, x):
        self.windows += x.shape[0]
        return self.net(x)


def _air_with_an_object(size=(48, 48, 48)):
    x = torch.zeros((1, 1) + size)
    x[0, 0, 2:14, 3:15, 4:12] = torch.rand(12, 12, 8, generator=torch.Generator().manual_seed(1))
    return x


@pytest.mark.parametrize("tta,batch", [("none", 1), ("flip", 1), ("none", 3)])
def test_constant_windows_are_computed_once_and_give_the_same_output(monkeypatch, tta, batch):
    import medautolabel.labelling.inference as inference_module

    monkeypatch.setattr(inference_module, "FROZEN_GRAPH_MIN_WINDOWS", 10**9)  # eager: exact comparison
    x = _air_with_an_object()
    spec = InferenceSpec((16, 16, 16), 0.25, batch, "gaussian", tta)
    plain, reusing = Counting(_tiny_unet()), Counting(_tiny_unet())
    expected = sliding_window(plain, x, spec, CPU)
    stats = {}
    got = sliding_window(reusing, x, spec, CPU, optimise=True, stats=stats)
    # the same network computations, reused; blended by cpu_sliding_window.py rather than MONAI's loop
    # (one fused multiply-add per voxel), and a batch of another size may round differently
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    passes = 1 if tta == "none" else 4
    n = window_count(x.shape[2:], (16, 16, 16), 0.25)
    assert plain.windows == n * passes
    assert reusing.windows < plain.windows // 4  # only windows touching the object, and one air window
    assert stats["windows"] == n and stats["network_runtime"] == "pytorch"
    assert reusing.windows == (n - stats["windows_reused"]) * passes


@pytest.mark.parametrize("runtime,kind,tta", [("torchscript", torch.jit.ScriptModule, "none"), ("openvino", None, "none"),
                                              ("auto", None, "none"), ("openvino", None, "flip")])
def test_compiled_cpu_network_matches_the_eager_network_and_is_reused(monkeypatch, runtime, kind, tta):
    from medautolabel.runtime import cpu_graph
    from medautolabel.runtime.openvino_graph import CompiledNetwork

    monkeypatch.setenv(cpu_graph.RUNTIME_ENV, runtime)
    net = _tiny_unet()
    x = _air_with_an_object((40, 40, 40)) + 0.01 * torch.rand(1, 1, 40, 40, 40, generator=torch.Generator().manual_seed(2))
    spec = InferenceSpec((16, 16, 16), 0.25, 1, "gaussian", tta)  # "flip": the compiled output buffer is reused
    assert window_count(x.shape[2:], (16, 16, 16), 0.25) >= 8
    expected = sliding_window(net, x, spec, CPU)
    stats = {}
    got = sliding_window(net, x, spec, CPU, optimise=True, precision="float32", stats=stats)
    graph, name = cpu_graph.compiled_graphs[net][(1, 1, 16, 16, 16, runtime)]
    assert isinstance(graph, kind or CompiledNetwork)
    assert stats["network_runtime"] == name == ("torchscript-frozen" if runtime == "torchscript" else "openvino")
    # OpenVINO fuses and reorders the arithmetic: equal to a few 1e-4 on these unit-scale outputs
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 if runtime == "torchscript" else 5e-4)
    if tta == "none":  # averaged flips make near-ties, where the last bits decide
        assert torch.equal(got.argmax(0), expected.argmax(0))
    assert cpu_graph.frozen_for_cpu(net, (1, 1, 16, 16, 16))[0] is graph  # built once


def test_the_pytorch_runtime_runs_the_network_itself(monkeypatch):
    from medautolabel.runtime import cpu_graph

    monkeypatch.setenv(cpu_graph.RUNTIME_ENV, "pytorch")
    net = _tiny_unet()
    assert cpu_graph.frozen_for_cpu(net, (1, 1, 16, 16, 16)) == (net, "pytorch")


def test_a_disagreeing_openvino_model_gives_way_to_torchscript(monkeypatch, tmp_path):
    from medautolabel.runtime import cpu_graph, openvino_graph

    monkeypatch.setenv(openvino_graph.CACHE_ENV, str(tmp_path))  # an empty cache: the model is built and checked
    monkeypatch.setattr(openvino_graph, "RELATIVE_TOLERANCE", -1.0)  # nothing agrees
    net = _tiny_unet()
    runner, name = cpu_graph.frozen_for_cpu(net, (1, 1, 16, 16, 16))
    assert name == "torchscript-frozen" and isinstance(runner, torch.jit.ScriptModule)
    assert not list((openvino_graph.cache_root() / "openvino").glob(openvino_graph.network_key(net, (1, 1, 16, 16, 16))))


def test_a_network_that_cannot_be_traced_runs_eagerly():
    from medautolabel.runtime import cpu_graph

    class DictOut(torch.nn.Module):
        def forward(self, x):
            return {"pred": 2 * x}

    net = DictOut()
    assert cpu_graph.build_graph(net, (1, 1, 8, 8, 8)) is None
    assert cpu_graph.frozen_for_cpu(net, (1, 1, 8, 8, 8)) == (net, "pytorch")


def test_constant_value_names_the_per_channel_constant_or_none():
    window = torch.full((2, 4, 5, 6), -1.0)
    window[1] = 0.25
    assert constant_value(window) == (-1.0, 0.25)
    window[1, 3, 4, 5] = 0.5  # one voxel of one channel differs
    assert constant_value(window) is None
    big = torch.zeros((2, 32, 32, 32))
    assert constant_value(big) == (0.0, 0.0)
    big[0, 0, 0, 1] = 1e-6  # outside the sparse sample: found by the full pass
    assert big.reshape(2, -1)[:, ::1009].abs().max() == 0
    assert constant_value(big) is None
