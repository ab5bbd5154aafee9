"""Cropping to the body: a table falls away, arms stay, and the kept windows give the whole image's answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medautolabel.labelling.preprocess import foreground_box, window_aligned_box, window_starts

torch.set_num_threads(1)


def body_on_table(with_arms: bool) -> np.ndarray:
    """(k, j, i) at 1 x 1 x 2 mm (i, j, k): an elliptic body in air, a table 10 mm below it, maybe arms."""
    a = np.full((30, 120, 160), -1000, np.int16)
    j, i = np.mgrid[0:120, 0:160]
    a[:, ((i - 80) / 50.0) ** 2 + ((j - 60) / 35.0) ** 2 <= 1] = 40
    a[:, 106, 5:155] = 300  # the table top: 1 mm of carbon, 10 mm below the body
    if with_arms:
        for c in (12, 148):  # 8 mm from the body
            a[:, ((i - c) / 10.0) ** 2 + ((j - 60) / 14.0) ** 2 <= 1] = 40  # 8 % of the body each
    return a


def test_the_table_is_not_body():
    a = body_on_table(with_arms=False)
    spacing_kji = (2.0, 1.0, 1.0)
    assert foreground_box(a, -500, (0, 0, 0)) == (slice(0, 30), slice(25, 107), slice(5, 155))
    assert foreground_box(a, -500, (0, 0, 0), spacing_kji, 0.05) == (slice(0, 30), slice(25, 96), slice(30, 131))


def test_arms_beside_the_body_are_kept():
    a = body_on_table(with_arms=True)
    box = foreground_box(a, -500, (0, 0, 0), (2.0, 1.0, 1.0), 0.05)
    assert box == (slice(0, 30), slice(25, 96), slice(2, 159))


def test_a_single_bright_voxel_is_found():
    a = np.full((20, 30, 40), -1000, np.int16)
    a[9, 20, 25] = 500
    assert foreground_box(a, 0, (1, 1, 1), (2.0, 0.9, 0.7), 0.05) == (slice(8, 11), slice(19, 22), slice(24, 27))


@pytest.mark.parametrize("size,roi,overlap", [(200, 96, 0.25), (96, 96, 0.5), (50, 96, 0.25), (300, 64, 0.5)])
def test_window_starts_are_monai_s(size, roi, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    if size > roi:
        interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
        expected = sorted({s[0].start for s in dense_patch_slices([size], [roi], interval)})
    else:
        expected = [0]
    assert window_starts(size, roi, overlap) == expected


def test_kept_windows_give_the_whole_image_answer():
    """A sliding window over the aligned box equals, inside the box, the one over the whole grid."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    shape, roi, overlap = (40, 90, 70), (16, 24, 20), 0.25
    x = torch.randn((1, 1) + shape)
    box = (slice(7, 21), slice(30, 51), slice(22, 40))
    aligned = window_aligned_box(box, shape, roi, overlap)
    assert all(a.start <= b.start and a.stop >= b.stop for a, b in zip(aligned, box))
    assert np.prod([s.stop - s.start for s in aligned]) < 0.5 * np.prod(shape)
    with torch.inference_mode():
        whole = sliding_window_inference(x, roi, 1, net, overlap=overlap, mode="gaussian")
        part = sliding_window_inference(x[(slice(None), slice(None)) + aligned], roi, 1, net, overlap=overlap,
                                        mode="gaussian")
    inner = tuple(slice(b.start - a.start, b.stop - a.start) for a, b in zip(aligned, box))
    torch.testing.assert_close(part[(slice(None), slice(None)) + inner], whole[(slice(None), slice(None)) + box],
                               rtol=1e-5, atol=1e-5)
    # a naive crop to the box itself gives a different answer: the alignment is what makes it exact
    naive = sliding_window_inference(x[(slice(None), slice(None)) + box], roi, 1, net, overlap=overlap,
                                     mode="gaussian")
    assert not torch.allclose(naive, whole[(slice(None), slice(None)) + box], atol=1e-4)
