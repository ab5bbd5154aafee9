"""The OpenVINO-compiled network: equal to the eager one, cached on disk by content, rebuilt when damaged."""

from __future__ import annotations

import pytest
import torch

from medautolabel.runtime import openvino_graph

pytestmark = pytest.mark.skipif(not openvino_graph.available(), reason="OpenVINO is not installed")
SHAPE = (1, 1, 16, 16, 16)


def _net(seed: int = 0) -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1,
                norm="instance").eval()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(openvino_graph.CACHE_ENV, str(tmp_path))
    return tmp_path / "openvino"


def _window(seed: int) -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_compiled_network_equals_the_eager_one_and_is_cached(cache):
    net = _net()
    compiled = openvino_graph.compiled_for_cpu(net, SHAPE, threads=1)
    x = _window(5)
    with torch.no_grad():
        expected = net(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert got.data_ptr() != compiled(_window(6)).data_ptr()  # each call returns its own tensor
    entries = list(cache.iterdir())
    assert [e.name for e in entries] == [openvino_graph.network_key(net, SHAPE)]
    assert sorted(p.name for p in entries[0].iterdir()) == ["model.bin", "model.xml"]
    with pytest.raises(ValueError, match="compiled for windows of shape"):
        compiled(torch.rand(1, 1, 8, 8, 8))


def test_the_cache_is_read_instead_of_converting_again(cache, monkeypatch):
    openvino_graph.compiled_for_cpu(_net(), SHAPE, threads=1)

    def no_conversion(*args):
        raise AssertionError("converted again although cached")

    monkeypatch.setattr(openvino_graph, "convert_network", no_conversion)
    same_weights = _net()  # another object, same structure and weights: same key
    compiled = openvino_graph.compiled_for_cpu(same_weights, SHAPE, threads=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_window(7)), same_weights(_window(7)), rtol=0, atol=1e-4)


def test_the_key_follows_weights_structure_and_shape():
    a, b = _net(0), _net(0)
    assert openvino_graph.network_key(a, SHAPE) == openvino_graph.network_key(b, SHAPE)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert openvino_graph.network_key(a, SHAPE) != openvino_graph.network_key(b, SHAPE)
    assert openvino_graph.network_key(a, SHAPE) != openvino_graph.network_key(a, (2,) + SHAPE[1:])
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    other = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=2,
                 norm="instance").eval()
    assert openvino_graph.network_key(a, SHAPE) != openvino_graph.network_key(other, SHAPE)


def test_a_damaged_cache_entry_is_rebuilt(cache):
    net = _net()
    folder = cache / openvino_graph.network_key(net, SHAPE)
    folder.mkdir(parents=True)
    (folder / "model.xml").write_text("<not a model", "utf-8")
    compiled = openvino_graph.compiled_for_cpu(net, SHAPE, threads=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_window(8)), net(_window(8)), rtol=0, atol=1e-4)
    assert (folder / "model.xml").read_text("utf-8").startswith("<?xml")


def test_a_network_openvino_cannot_take_gives_none(cache):
    class DictOut(torch.nn.Module):
        def forward(self, x):
            return {"pred": 2 * x}

    assert openvino_graph.compiled_for_cpu(DictOut(), SHAPE, threads=1) is None
    assert not cache.exists() or not any(cache.iterdir())


def test_an_unwritable_cache_still_gives_the_compiled_network(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("", "utf-8")
    monkeypatch.setenv(openvino_graph.CACHE_ENV, str(blocker))  # <cache>/openvino cannot be created
    net = _net()
    compiled = openvino_graph.compiled_for_cpu(net, SHAPE, threads=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_window(9)), net(_window(9)), rtol=0, atol=1e-4)
    assert blocker.is_file() and not list(tmp_path.glob(".~medautolabel-*"))


TELEMETRY_PROBE = r"""
import os, socket, sys
attempts = []
real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
socket.getaddrinfo = lambda *a, **k: attempts.append(a[:2]) or real_getaddrinfo(*a, **k)
socket.socket.connect = lambda self, address, *a: attempts.append(address) or real_connect(self, address, *a)
import torch
from monai.networks.nets import UNet
from medautolabel.runtime import openvino_graph
torch.manual_seed(0)
net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1).eval()
compiled = openvino_graph.compiled_for_cpu(net, (1, 1, 16, 16, 16), threads=1)
print(compiled is not None, openvino_graph.telemetry_is_off(), attempts, os.path.exists(os.path.expanduser("~/intel")))
"""


@pytest.mark.slow
def test_converting_sends_no_telemetry_and_leaves_nothing_in_home(tmp_path):
    """Plain ``import openvino`` writes ~/intel/openvino_ga_cid and queues Google Analytics events; ours must not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    package_root = str(Path(openvino_graph.__file__).resolve().parent.parent)
    env = dict(os.environ, HOME=str(home), MEDAUTOLABEL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # compiled; the stub in place; no name looked up, no connection opened; no ~/intel (client id, stats)
    assert out.stdout.strip().splitlines()[-1] == "True True [] False"
