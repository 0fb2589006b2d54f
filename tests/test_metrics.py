"""Tests for skinsweep.metrics: agreement with scikit-learn, hand-worked cases, edge cases, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from skinsweep.errors import ConfigError
from skinsweep.metrics import (
    HIGHER_IS_BETTER,
    METRIC_KEYS,
    binary_metrics,
    expected_calibration_error,
    sensitivity_at_specificity,
    threshold_for_sensitivity,
)


def _random_case(seed: int, n: int, pos_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels with a given melanoma rate and noisy but informative probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(int)
    y[:2] = [0, 1]  # both classes present
    logit = 1.5 * (2 * y - 1) + rng.normal(0.0, 1.5, n)
    return y, 1.0 / (1.0 + np.exp(-logit))


# ----------------------------------------------------------------------------- agreement with sklearn


@pytest.mark.parametrize(
    "seed, n, pos_rate, threshold",
    [
        (0, 50, 0.5, 0.5),
        (1, 500, 0.111, 0.5),  # HAM10000's melanoma rate
        (2, 1000, 0.111, 0.2),
        (3, 37, 0.3, 0.8),
    ],
)
def test_binary_metrics_match_sklearn(seed: int, n: int, pos_rate: float, threshold: float) -> None:
    y, p = _random_case(seed, n, pos_rate)
    m = binary_metrics(y, p, threshold=threshold)
    pred = (p >= threshold).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["ap"] == pytest.approx(average_precision_score(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert (m["n"], m["n_pos"]) == (n, int(y.sum()))


def test_keys_are_fixed_and_loss_is_optional() -> None:
    y, p = _random_case(0, 40, 0.3)
    expected = {"auc", "ap", "accuracy", "precision", "recall", "specificity", "f1", "ece", "brier",
                "n", "n_pos"}
    assert set(binary_metrics(y, p)) == expected
    with_loss = binary_metrics(y, p, loss=0.25)
    assert set(with_loss) == expected | {"loss"} and with_loss["loss"] == 0.25
    # Every per-epoch metric is produced by binary_metrics (given a loss) and has a direction.
    assert set(METRIC_KEYS) <= set(with_loss)
    assert set(METRIC_KEYS) <= set(HIGHER_IS_BETTER)
    assert not HIGHER_IS_BETTER["loss"] and not HIGHER_IS_BETTER["ece"] and HIGHER_IS_BETTER["auc"]


# ----------------------------------------------------------------------------- hand-worked cases


def test_confusion_metrics_by_hand() -> None:
    # threshold 0.5:   y    = 1    1    1    0    0    0    0    0
    #                  prob = .9   .6   .2   .7   .4   .3   .1   .5
    #                  pred = 1    1    0    1    0    0    0    1     (0.5 >= 0.5 is positive)
    # tp=2 fn=1 fp=2 tn=3 -> specificity 3/5, recall 2/3, precision 2/4, accuracy 5/8, f1 4/7
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.4, 0.3, 0.1, 0.5]
    m = binary_metrics(y, p)
    assert m["specificity"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))


@pytest.mark.parametrize(
    "y, p, n_bins, expected",
    [
        # 5 bins with edges 0, .2, .4, .6, .8, 1:
        #   [0, .2):  p = .05, .15  y = 0, 0  -> |0.10 - 0.0| * 2/6
        #   [.2, .4): p = .35       y = 1     -> |0.35 - 1.0| * 1/6
        #   [.4, .6): empty                   -> 0
        #   [.6, .8): p = .65, .75  y = 1, 0  -> |0.70 - 0.5| * 2/6
        #   [.8, 1]:  p = .95       y = 1     -> |0.95 - 1.0| * 1/6
        #   ECE = (0.2 + 0.65 + 0.4 + 0.05) / 6 = 1.3 / 6
        ([0, 0, 1, 1, 0, 1], [0.05, 0.15, 0.35, 0.65, 0.75, 0.95], 5, 1.3 / 6),
        # Edge convention, 2 bins [0, .5) and [.5, 1]: 0.5 falls in the upper bin, so
        #   ECE = |0.3 - 0| * 1/2 + |0.5 - 1| * 1/2 = 0.4
        # (putting 0.5 in the lower bin would give |0.4 - 0.5| = 0.1).
        ([0, 1], [0.3, 0.5], 2, 0.4),
        # prob == 1.0 is counted in the last bin: |0 - 0| * 1/2 + |1 - 0| * 1/2 = 0.5
        ([0, 0], [0.0, 1.0], 2, 0.5),
        # one bin: |mean(p) - mean(y)| = |0.5 - 0.75|
        ([1, 1, 1, 0], [0.2, 0.4, 0.6, 0.8], 1, 0.25),
    ],
)
def test_ece_hand_computed(y: list[int], p: list[float], n_bins: int, expected: float) -> None:
    assert expected_calibration_error(y, p, n_bins=n_bins) == pytest.approx(expected)


def test_ece_near_zero_when_calibrated_and_large_when_logits_shifted() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.shape[0]) < p).astype(int)  # y ~ Bernoulli(p): calibrated by construction
    assert expected_calibration_error(y, p) < 0.01
    # Weighted BCE with pos_weight 8 shifts logits by about ln(8): clearly miscalibrated.
    logit = np.log(p / (1 - p)) + np.log(8.0)
    assert expected_calibration_error(y, 1 / (1 + np.exp(-logit))) > 0.2
    assert binary_metrics(y, p)["ece"] == pytest.approx(expected_calibration_error(y, p))


# ----------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize(
    "label, nan_keys, finite_keys",
    [
        (0, {"auc", "ap", "recall"}, {"accuracy", "precision", "specificity", "f1", "ece", "brier"}),
        (1, {"auc", "ap", "specificity"}, {"accuracy", "precision", "recall", "f1", "ece", "brier"}),
    ],
)
def test_single_class_gives_nan_not_exception(label: int, nan_keys: set, finite_keys: set) -> None:
    y = np.full(10, label)
    p = np.linspace(0.05, 0.95, 10)
    m = binary_metrics(y, p)
    assert all(math.isnan(m[k]) for k in nan_keys)
    assert all(math.isfinite(m[k]) for k in finite_keys)
    assert math.isnan(sensitivity_at_specificity(y, p))


def test_no_predicted_positives_gives_zero_precision() -> None:
    m = binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
    assert (m["precision"], m["recall"], m["f1"], m["specificity"]) == (0.0, 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- operating points


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_for_sensitivity_achieves_target(seed: int, target: float) -> None:
    y, p = _random_case(seed, 400, 0.15)
    thr = threshold_for_sensitivity(y, p, target=target)
    m = binary_metrics(y, p, threshold=thr)
    assert m["recall"] >= target
    # It is the highest such threshold: the next larger prediction misses the target.
    higher = p[p > thr]
    if higher.size:
        assert binary_metrics(y, p, threshold=higher.min())["recall"] < target


def test_threshold_for_sensitivity_by_hand() -> None:
    # positives at .9 .8 .3 -> to catch 2 of 3 (>= 0.6) the highest threshold is 0.8
    y = [1, 1, 1, 0, 0]
    p = [0.9, 0.8, 0.3, 0.5, 0.1]
    assert threshold_for_sensitivity(y, p, target=0.6) == pytest.approx(0.8)
    assert threshold_for_sensitivity(y, p, target=1.0) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "spec, expected",
    [
        # y = 1 1 1 0 0 0 0, p = .9 .6 .15 .7 .2 .1 .05  (negatives: .7 .2 .1 .05)
        # spec 1.0 (no false positive): threshold .9 -> catches .9 only -> 1/3
        (1.0, 1 / 3),
        # spec >= 0.75 (at most 1 false positive, the .7): threshold .6 -> catches .9, .6 -> 2/3
        (0.75, 2 / 3),
        # spec >= 0.5 (at most 2, the .7 and .2): threshold .15 -> catches all -> 1
        (0.5, 1.0),
    ],
)
def test_sensitivity_at_specificity_by_hand(spec: float, expected: float) -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.15, 0.7, 0.2, 0.1, 0.05]
    assert sensitivity_at_specificity(y, p, spec=spec) == pytest.approx(expected)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: binary_metrics([0, 1], [0.5]), "same length"),
        (lambda: binary_metrics([[0, 1]], [[0.1, 0.9]]), r"y_true must be 1-D"),
        (lambda: binary_metrics([0, 1], [[0.1, 0.9]]), r"prob must be 1-D"),
        (lambda: binary_metrics([0, 2], [0.1, 0.9]), r"only 0 and 1.*\[2\]"),
        (lambda: binary_metrics([0, 1], [-2.0, 3.0]), r"\[0, 1\].*sigmoid"),
        (lambda: binary_metrics([0, 1], [0.1, float("nan")]), "NaN"),
        (lambda: binary_metrics([], []), "empty"),
        (lambda: binary_metrics([0, 1], [0.1, 0.9], threshold=1.5), "threshold must be in"),
        (lambda: expected_calibration_error([0, 1], [0.1, 0.9], n_bins=0), "n_bins"),
        (lambda: threshold_for_sensitivity([1, 1], [0.1, 0.9]), "needs both"),
        (lambda: threshold_for_sensitivity([0, 1], [0.1, 0.9], target=0), "target must be in"),
        (lambda: sensitivity_at_specificity([0, 1], [0.1, 0.9], spec=2), "spec must be in"),
    ],
)
def test_invalid_input_raises_config_error(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()
