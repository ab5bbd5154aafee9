"""Class metrics against known answers: balanced accuracy, ECE and the reliability diagram, the AUC's
bootstrap interval, sensitivity at 90 % specificity (#15, item 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medautolabel.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability,
    roc_auc,
    roc_auc_interval,
    sensitivity_at_specificity,
)


def test_an_over_confident_model_has_the_ece_it_should():
    truth = [True, False] * 50  # positive half the time
    assert expected_calibration_error(truth, [0.9] * 100) == pytest.approx(0.4)
    assert expected_calibration_error(truth, [0.5] * 100) == pytest.approx(0.0)
    (point,) = reliability(truth, [0.9] * 100)
    assert point == {"mean_probability": pytest.approx(0.9), "frequency": 0.5, "n": 100}


def test_calibrated_bins_have_no_calibration_error():
    # in the 0.2 bin 1 of 5 cases is positive, in the 0.8 bin 4 of 5: both exactly as said
    truth = [True, False, False, False, False, True, True, True, True, False]
    probability = [0.2] * 5 + [0.8] * 5
    assert expected_calibration_error(truth, probability) == pytest.approx(0.0)
    assert [b["n"] for b in reliability(truth, probability)] == [5, 5]
    assert math.isnan(expected_calibration_error([], []))


def test_sensitivity_at_90_percent_specificity():
    # 10 negatives scored 0..0.9, 4 positives: two above every negative, one above 8 of them, one below all
    negatives = [n / 10 for n in range(10)]
    positives = [0.95, 0.97, 0.85, -0.1]
    truth = [False] * 10 + [True] * 4
    score = negatives + positives
    # specificity >= 0.9 allows one false positive at most (threshold 0.85 passes 0.9 only): 3 of 4 found
    assert sensitivity_at_specificity(truth, score, 0.9) == pytest.approx(0.75)
    assert sensitivity_at_specificity(truth, score, 1.0) == pytest.approx(0.5)
    assert math.isnan(sensitivity_at_specificity([True, True], [0.1, 0.2]))


def test_the_auc_interval_holds_the_auc_and_is_reproducible():
    rng = np.random.default_rng(3)
    truth = rng.random(80) < 0.5
    score = np.where(truth, rng.normal(1.0, 1.0, 80), rng.normal(0.0, 1.0, 80))
    low, high = roc_auc_interval(truth, score, resamples=300)
    assert low < roc_auc(truth, score) < high and 0.0 <= low and high <= 1.0
    assert roc_auc_interval(truth, score, resamples=300) == [low, high]
    assert all(math.isnan(v) for v in roc_auc_interval([True, True, True], [0.1, 0.5, 0.9]))


def test_classification_metrics_report_balanced_accuracy_and_calibration():
    truth = [True] * 2 + [False] * 8
    probability = [0.9, 0.2] + [0.1] * 7 + [0.6]
    m = classification_metrics(truth, probability)
    # sensitivity 1/2, specificity 7/8
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 7 / 8) / 2)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["confusion"] == [[7, 1], [1, 1]]
    assert m["ece"] == pytest.approx(expected_calibration_error(truth, probability))
    assert len(m["roc_auc_ci95"]) == 2 and m["sensitivity_at_90_specificity"] == pytest.approx(0.5)
