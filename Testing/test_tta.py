"""Test-time augmentation: the mean of flipped passes, flipped back; chosen by the card or per call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from thresholdmodel import sphere_image, write_threshold_model

from medautolabel.catalog.modelcard import InferenceSpec
from medautolabel.errors import MedAutoLabelError
from medautolabel.labelling.inference import sliding_window, tta_flips
from medautolabel.labelling.pipeline import label_image


class Skewed(torch.nn.Module):
    """Not flip-equivariant: the output depends on where a voxel sits in the window."""

    def forward(self, x):
        z = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return x * (1 + z) + torch.roll(x, 1, dims=4)


@pytest.mark.parametrize("mode", ["flip", "flip-all"])
def test_flip_tta_is_the_mean_of_flipped_passes(mode):
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16)
    net = Skewed()
    spec = InferenceSpec((16, 16, 16), 0.0, 1, "constant", mode)
    got = sliding_window(net, x, spec, torch.device("cpu"))
    expected = net(x)[0]
    for dims in tta_flips(mode):
        expected = expected + torch.flip(net(torch.flip(x, dims)), dims)[0]
    expected = expected / (1 + len(tta_flips(mode)))
    torch.testing.assert_close(got, expected)
    plain = sliding_window(net, x, InferenceSpec((16, 16, 16), 0.0, 1, "constant", "none"), torch.device("cpu"))
    assert not torch.allclose(plain, got)  # the augmentation did something


def test_tta_override_per_call_and_recorded(tmp_path):
    model = write_threshold_model(tmp_path / "m")
    image = sphere_image()
    plain = label_image(image, str(model), device="cpu")
    flipped = label_image(image, str(model), device="cpu", tta="flip")
    assert plain.provenance["test_time_augmentation"] == "none"
    assert flipped.provenance["test_time_augmentation"] == "flip"
    np.testing.assert_array_equal(plain.labelmap.array, flipped.labelmap.array)  # a threshold is flip-invariant
    with pytest.raises(MedAutoLabelError, match="unknown test-time augmentation"):
        label_image(image, str(model), device="cpu", tta="rotate")
