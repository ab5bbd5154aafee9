"""Activation, argmax, clean-up and segment facts on a known grid (network grid = input grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cardfactory import card_dict

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.image import make_ijk_to_ras
from medautolabel.labelling.classify import classify, evidence_scores, gaussian_in_threads
from medautolabel.labelling.postprocess import postprocess
from medautolabel.labelling.preprocess import Prepared

SHAPE = (10, 12, 14)
M = make_ijk_to_ras((0.5, 1.0, 2.0), np.diag([-1.0, 1.0, 1.0]), (5.0, 0.0, -3.0))  # 1 mm3 voxels


def prepared(crop=None) -> Prepared:
    crop = crop or tuple(slice(0, n) for n in SHAPE)
    sub = M.copy()
    sub[:3, 3] = M[:3, :3] @ np.array([crop[2].start, crop[1].start, crop[0].start]) + M[:3, 3]
    net_shape = tuple(s.stop - s.start for s in crop)
    return Prepared(torch.empty(0), net_shape, sub, crop, SHAPE, M)


def card(**changes) -> ModelCard:
    d = card_dict(**changes)
    return ModelCard.from_dict(d)


def test_softmax_argmax_confidence_and_unlabelled_channels():
    d = card_dict(segmentation={"activation": "softmax", "channels": 4})
    d["labels"][0]["postprocessing"]["min_size_mm3"] = 0
    d["network"]["parameters"]["out_channels"] = 5
    d["classification"][0]["channel"] = 4
    c = ModelCard.from_dict(d)
    logits = torch.zeros((5,) + SHAPE)
    logits[1, 2:4, 2:4, 2:4] = 5.0  # vessel
    logits[3, 6:8, 6:8, 6:8] = 5.0  # channel 3 has no label: background
    lab, segs = postprocess(logits, prepared(), c)
    assert np.count_nonzero(lab.array == 1) == 8 and np.count_nonzero(lab.array) == 8
    vessel = segs[0]
    p = np.exp(5) / (np.exp(5) + 3)
    assert vessel.voxel_count == 8 and vessel.volume_ml == pytest.approx(0.008)
    assert vessel.mean_confidence == pytest.approx(p, rel=1e-5)


def test_sigmoid_labels_take_the_most_probable_above_half():
    d = card_dict(segmentation={"activation": "sigmoid"})
    d["labels"][0]["channel"], d["labels"][1]["channel"] = 0, 1
    d["classification"][0]["channel"] = 2
    for lab in d["labels"]:
        lab["postprocessing"]["min_size_mm3"] = 0
    c = ModelCard.from_dict(d)
    logits = torch.full((4,) + SHAPE, -3.0)
    logits[0, 1:5, 1:5, 1:5] = 2.0   # vessel 0.88
    logits[1, 3:7, 3:7, 3:7] = 1.0   # nerve 0.73: loses where both are present
    lab, segs = postprocess(logits, prepared(), c)
    expect = np.zeros(SHAPE, np.uint8)
    expect[3:7, 3:7, 3:7] = 2
    expect[1:5, 1:5, 1:5] = 1
    np.testing.assert_array_equal(lab.array, expect)
    assert segs[1].mean_confidence == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))), rel=1e-5)


def test_clean_up_min_size_in_mm3_and_largest_component():
    d = card_dict()
    d["labels"][0]["postprocessing"] = {"min_size_mm3": 8.5, "largest_component": False}
    d["labels"][1]["postprocessing"] = {"min_size_mm3": 0, "largest_component": True}
    c = ModelCard.from_dict(d)
    logits = torch.zeros((4,) + SHAPE)
    logits[1, 0:2, 0:2, 0:2] = 5.0      # 8 mm3: removed
    logits[1, 5:8, 5:8, 5:8] = 5.0      # 27 mm3: kept
    logits[2, 0:2, 8:10, 8:10] = 5.0    # nerve, 8 voxels
    logits[2, 6:9, 0:3, 10:13] = 5.0    # nerve, 27 voxels: the largest, kept
    lab, segs = postprocess(logits, prepared(), c)
    assert segs[0].voxel_count == 27 and segs[1].voxel_count == 27
    assert np.all(lab.array[6:9, 0:3, 10:13] == 2) and np.all(lab.array[5:8, 5:8, 5:8] == 1)
    raw, _ = postprocess(logits.clone(), prepared(), c, clean=False)
    assert np.count_nonzero(raw.array == 1) == 35 and np.count_nonzero(raw.array == 2) == 35


def test_outside_the_crop_is_background():
    crop = (slice(2, 8), slice(3, 9), slice(4, 12))
    logits = torch.zeros((4, 6, 6, 8))
    logits[1] = 5.0  # everything in the crop is vessel
    lab, _ = postprocess(logits, prepared(crop), card())
    expect = np.zeros(SHAPE, np.uint8)
    expect[crop] = 1
    np.testing.assert_array_equal(lab.array, expect)
    np.testing.assert_array_equal(lab.ijk_to_ras, M)


def tags(logits, prep, c):
    """The card's voxel_evidence tags for ``logits`` as label_image makes them."""
    return classify(c, None, None, torch.device("cpu"), evidence_scores(logits, prep, c))


def test_voxel_evidence_prefers_a_coherent_finding_to_one_hot_voxel():
    c = card()
    hot = torch.full((4,) + SHAPE, -8.0)
    hot[3, 5, 5, 5] = 8.0
    blob = torch.full((4,) + SHAPE, -8.0)
    blob[3, 2:8, 2:10, 1:13] = 8.0  # about 12 x 8 x 6 mm
    p_hot = tags(hot, prepared(), c)[0]
    p_blob = tags(blob, prepared(), c)[0]
    assert p_blob.label == "present" and p_blob.probability > 0.95
    assert p_hot.probabilities["present"] < p_blob.probabilities["present"] - 0.2
    unsmoothed = card_dict()
    unsmoothed["classification"][0]["smoothing_mm"] = 0
    assert tags(hot, prepared(), ModelCard.from_dict(unsmoothed))[0].probabilities["present"] > 0.99


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gaussian_in_threads_gives_scipys_numbers(threads):
    from scipy import ndimage

    volume = np.random.default_rng(threads).random((23, 17, 30), dtype=np.float32)
    sigma = [0.8, 2.5, 1.7]  # anisotropic, as on a resampled grid of another spacing
    expected = ndimage.gaussian_filter(volume, sigma=sigma, mode="nearest", truncate=3.0)
    got = gaussian_in_threads(volume.copy(), sigma, threads=threads)
    np.testing.assert_array_equal(got, expected)
