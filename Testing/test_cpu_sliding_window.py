"""The CPU blending loop against MONAI's own ``sliding_window_inference``, window for window."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.inferers import sliding_window_inference

from medautolabel.labelling.cpu_sliding_window import sliding_window_cpu, window_slices
from medautolabel.labelling.inference import window_count

torch.set_num_threads(1)


def _predictor(windows: torch.Tensor) -> torch.Tensor:
    """Three channels that depend on the whole window (its mean), so every weight and offset shows."""
    mean = windows.mean(dim=(1, 2, 3, 4), keepdim=True)
    return torch.cat([torch.sin(3 * windows), windows ** 2 - mean, mean.expand_as(windows)], dim=1)


CASES = [  # (size, roi, overlap, batch, mode)
    ((40, 37, 23), (16, 16, 16), 0.25, 1, "gaussian"),
    ((10, 37, 5), (16, 16, 16), 0.5, 3, "constant"),  # smaller than a window: padded, then cropped
    ((33, 20, 17), (16, 8, 16), 0.25, 2, "gaussian"),
    ((16, 16, 16), (16, 16, 16), 0.25, 1, "gaussian"),  # exactly one window
]


@pytest.mark.parametrize("size,roi,overlap,batch,mode", CASES)
def test_same_output_as_monai(size, roi, overlap, batch, mode):
    x = torch.rand((1, 1) + size, generator=torch.Generator().manual_seed(3)) * 4 - 1
    calls = []

    def counting(w):
        calls.append(w.shape[0])
        assert w.is_contiguous()
        return _predictor(w)

    expected = sliding_window_inference(x, roi, batch, _predictor, overlap=overlap, mode=mode)
    got = sliding_window_cpu(x, roi, batch, counting, overlap=overlap, mode=mode)
    assert got.shape == expected.shape == (1, 3) + size
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    n = window_count(size, roi, overlap)
    assert sum(calls) == n and max(calls) <= batch and len(calls) == -(-n // batch)


def test_a_predictor_that_reuses_its_output_buffer_gives_the_same_output():
    x = torch.rand((1, 1, 30, 28, 26), generator=torch.Generator().manual_seed(4))
    buffer = torch.empty(2, 3, 16, 16, 16)

    def reusing(w):
        out = buffer[: w.shape[0]]
        out.copy_(_predictor(w))
        return out

    expected = sliding_window_cpu(x, (16, 16, 16), 2, _predictor)
    assert torch.equal(sliding_window_cpu(x, (16, 16, 16), 2, reusing), expected)


def test_windows_follow_monais_grid():
    slices = window_slices((40, 37, 23), (16, 16, 16), 0.25)
    starts = sorted({s[0].start for s in slices})
    assert starts == [0, 12, 24]  # step int(16 * 0.75) = 12, the last window ends at the border
    assert all(s[2].stop <= 23 for s in slices) and max(s[2].stop for s in slices) == 23
    assert len(slices) == window_count((40, 37, 23), (16, 16, 16), 0.25) == 3 * 3 * 2


def test_a_batch_of_images_is_refused():
    with pytest.raises(ValueError, match="one image at a time"):
        sliding_window_cpu(torch.zeros(2, 1, 16, 16, 16), (16, 16, 16), 1, _predictor)


def test_compiled_network_threads_do_not_overwrite_each_other(tmp_path, monkeypatch):
    from monai.networks.nets import UNet

    from medautolabel.runtime.openvino_graph import CACHE_ENV, compiled_for_cpu

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    compiled = compiled_for_cpu(net, (1, 1, 16, 16, 16), threads=1)
    assert compiled is not None
    inputs = [torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(n)) for n in range(2)]
    with torch.no_grad():
        expected = [net(x) for x in inputs]
    results, barrier = {}, threading.Barrier(2)

    def work(n):
        barrier.wait()
        for _ in range(5):
            view = compiled.shared(inputs[n])
            results[n] = view.clone()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(2):
        torch.testing.assert_close(results[n], expected[n], rtol=0, atol=1e-3)
    assert not torch.allclose(results[0], results[1], atol=1e-2)
