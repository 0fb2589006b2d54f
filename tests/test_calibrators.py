"""Tests for skinsweep.ensemble.calibrators: calibrators on miscalibrated logits, JSON round trips,
cross-fitting, threshold choice, and errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss, roc_curve

from skinsweep.ensemble.calibrators import (
    Calibrator,
    FewPositivesWarning,
    IsotonicCalibration,
    NoCalibration,
    PlattScaling,
    TemperatureScaling,
    choose_threshold,
    list_calibrators,
    make_calibrator,
)
from skinsweep.ensemble.estimator import crossfit_folds
from skinsweep.errors import ConfigError
from skinsweep.metrics import binary_metrics, expected_calibration_error

LN8 = math.log(8.0)


def _weighted_bce_case(n: int, seed: int, *, temperature: float = 3.0, shift: float = LN8):
    """Labels drawn from a known true logit, and the logits a weighted-BCE model would output:
    over-confident by ``temperature`` and shifted by ln(pos_weight). Returns (true_logit, logit, y)."""
    rng = np.random.default_rng(seed)
    true = rng.normal(-2.2, 1.6, n)  # ~15% melanoma, like HAM10000
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-true))).astype(int)
    return true, temperature * true + shift, y


@pytest.fixture(scope="module")
def case():
    return _weighted_bce_case(6000, seed=0)


# ----------------------------------------------------------------------------- calibration quality


@pytest.mark.parametrize("name", ["temperature", "platt", "isotonic"])
def test_calibration_fixes_weighted_bce_logits(case, name: str) -> None:
    _, logit, y = case
    raw = NoCalibration().predict_proba(logit)
    prob = make_calibrator(name).fit(logit, y).predict_proba(logit)
    ece_raw, ece = expected_calibration_error(y, raw), expected_calibration_error(y, prob)
    brier_raw, brier = brier_score_loss(y, raw), brier_score_loss(y, prob)
    assert ece_raw > 0.1  # the case really is miscalibrated
    assert ece < 0.03 and ece < ece_raw
    assert brier < brier_raw


@pytest.mark.parametrize("temperature, shift", [(3.0, LN8), (0.5, -1.0), (1.0, 0.0)])
def test_temperature_recovers_known_temperature_and_shift(temperature: float, shift: float) -> None:
    _, logit, y = _weighted_bce_case(20000, seed=1, temperature=temperature, shift=shift)
    cal = TemperatureScaling().fit(logit, y)
    assert cal.temperature_ == pytest.approx(temperature, rel=0.05)
    assert cal.shift_ == pytest.approx(shift, abs=0.15 * max(1.0, temperature))


def test_temperature_with_fixed_shift_uses_ln_pos_weight(case) -> None:
    _, logit, y = case
    cal = TemperatureScaling(pos_weight=8, fit_shift=False).fit(logit, y)
    assert cal.shift_ == LN8
    assert cal.temperature_ == pytest.approx(3.0, rel=0.05)
    # pos_weight only warm-starts the free fit: the convex optimum is the same
    free = TemperatureScaling(pos_weight=8).fit(logit, y)
    ref = TemperatureScaling().fit(logit, y)
    assert free.temperature_ == pytest.approx(ref.temperature_, rel=1e-4)


def test_platt_matches_temperature_family(case) -> None:
    """Platt's slope/intercept describe the same map as T/shift when the slope is positive."""
    _, logit, y = case
    platt, temp = PlattScaling().fit(logit, y), TemperatureScaling().fit(logit, y)
    assert platt.slope_ == pytest.approx(1.0 / temp.temperature_, rel=1e-3)
    assert platt.intercept_ == pytest.approx(-temp.shift_ / temp.temperature_, abs=1e-3)


def test_isotonic_predicts_like_sklearn(case) -> None:
    _, logit, y = case
    cal = IsotonicCalibration().fit(logit, y)
    ref = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(1 / (1 + np.exp(-logit)), y)
    new = np.linspace(-40, 40, 501)  # includes logits outside the fitted range
    np.testing.assert_allclose(cal.predict_proba(new), ref.predict(1 / (1 + np.exp(-new))), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- few positives


def test_isotonic_warns_with_few_positives() -> None:
    _, logit, y = _weighted_bce_case(400, seed=2)
    keep = np.flatnonzero(y == 0)[:300].tolist() + np.flatnonzero(y == 1)[:20].tolist()
    with pytest.warns(FewPositivesWarning, match="20 melanoma images"):
        IsotonicCalibration().fit(logit[keep], y[keep])


def test_isotonic_is_silent_with_enough_positives(case) -> None:
    _, logit, y = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewPositivesWarning)
        IsotonicCalibration().fit(logit, y)


# ----------------------------------------------------------------------------- JSON round trip


@pytest.mark.parametrize(
    "name, kwargs",
    [("none", {}), ("temperature", {"pos_weight": 8.0}), ("temperature", {"fit_shift": False}),
     ("platt", {"C": 10.0}), ("isotonic", {"min_positives": 5})],
)
def test_to_dict_round_trip_predicts_identically(case, name: str, kwargs: dict) -> None:
    _, logit, y = case
    cal = make_calibrator(name, **kwargs).fit(logit, y)
    text = json.dumps(cal.to_dict(), allow_nan=False)  # strict JSON: no NaN/inf, no numpy types
    loaded = Calibrator.from_dict(json.loads(text))
    assert type(loaded) is type(cal) and loaded.get_params() == cal.get_params()
    new = np.concatenate([logit[:500], np.linspace(-50, 50, 101)])
    np.testing.assert_allclose(loaded.predict_proba(new), cal.predict_proba(new), rtol=0, atol=1e-12)


def test_from_dict_refuses_other_kinds_and_formats(case) -> None:
    _, logit, y = case
    d = PlattScaling().fit(logit, y).to_dict()
    with pytest.raises(ConfigError, match="'platt' calibrator, not 'isotonic'"):
        IsotonicCalibration.from_dict(d)
    with pytest.raises(ConfigError, match="expected format 'skinsweep.calibrator/1'"):
        Calibrator.from_dict({**d, "format": "skinsweep.combiner/1"})
    with pytest.raises(ConfigError, match="no state field 'slope'"):
        Calibrator.from_dict({**d, "state": {}})


# ----------------------------------------------------------------------------- cross-fitting


def test_crossfit_folds_keep_lesions_together_and_cover_every_row() -> None:
    rng = np.random.default_rng(3)
    lesion = np.repeat(np.arange(120), rng.integers(1, 4, 120))  # 1-3 images per lesion
    y = (rng.random(120) < 0.2).astype(int)[lesion]
    folds = crossfit_folds(y, lesion, n_splits=5, seed=0)
    scored = np.concatenate([score for _, score in folds])
    assert np.array_equal(np.sort(scored), np.arange(lesion.shape[0]))  # each row scored exactly once
    for fit_idx, score_idx in folds:
        assert not set(lesion[fit_idx]) & set(lesion[score_idx])
        assert set(y[fit_idx]) == {0, 1}


def test_crossfit_isotonic_does_not_flatter_noise() -> None:
    """In-sample isotonic 'learns' pure-noise logits; out-of-fold it cannot beat the base rate."""
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.2).astype(int)
    logit = rng.normal(0, 1, n)
    base = brier_score_loss(y, np.full(n, y.mean()))
    cal = IsotonicCalibration(min_positives=0)
    in_sample = cal.fit(logit, y).predict_proba(logit)
    oof = cal.fit_crossfit(logit, y, None, n_splits=5, seed=0)
    assert oof.shape == (n,)
    np.testing.assert_array_equal(cal.predict_proba(logit), in_sample)  # ends fitted on all rows
    assert brier_score_loss(y, in_sample) < base - 0.002  # its own rows look better than chance
    assert brier_score_loss(y, oof) > base  # honest: no better than predicting the base rate


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_is_highest_meeting_target(case, target: float) -> None:
    true, _, y = case
    prob = 1 / (1 + np.exp(-true))
    thr = choose_threshold(y, prob, target_sensitivity=target)
    assert binary_metrics(y, prob, threshold=thr)["recall"] >= target
    higher = np.unique(prob[prob > thr])
    if higher.size:  # the next distinct probability up already misses the target
        assert binary_metrics(y, prob, threshold=higher[0])["recall"] < target


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_threshold_for_specificity_is_lowest_meeting_target(case, target: float) -> None:
    true, _, y = case
    prob = 1 / (1 + np.exp(-true))
    thr = choose_threshold(y, prob, target_specificity=target)
    assert binary_metrics(y, prob, threshold=min(thr, 1.0))["specificity"] >= target
    lower = np.unique(prob[prob < thr])
    assert binary_metrics(y, prob, threshold=lower[-1])["specificity"] < target


def test_specificity_one_when_top_image_is_negative() -> None:
    y = np.array([0, 1, 0, 1, 0])
    prob = np.array([0.9, 0.8, 0.5, 0.4, 0.1])
    thr = choose_threshold(y, prob, target_specificity=1.0)
    assert 0.9 < thr < 0.9 + 1e-12  # just above the top score: nothing positive, specificity 1


def test_youden_maximises_tpr_minus_fpr(case) -> None:
    true, _, y = case
    prob = np.round(1 / (1 + np.exp(-true)), 3)  # rounded: ties must not matter
    thr = choose_threshold(y, prob, youden=True)
    fpr, tpr, thresholds = roc_curve(y, prob)
    m = binary_metrics(y, prob, threshold=thr)
    assert m["recall"] - (1 - m["specificity"]) == pytest.approx(np.max(tpr - fpr))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_sensitivity": 0.9, "youden": True}, "exactly one of .* got target_sensitivity, youden"),
        ({"target_sensitivity": 0.9, "target_specificity": 0.9}, "exactly one of"),
        ({}, "exactly one of .* got none"),
        ({"target_sensitivity": 0.0}, r"target_sensitivity must be in \(0, 1\]"),
        ({"target_sensitivity": 1.5}, r"target_sensitivity must be in \(0, 1\]"),
        ({"target_specificity": -0.1}, r"target_specificity must be in \(0, 1\]"),
        ({"youden": "yes"}, "youden must be True or False"),
    ],
)
def test_choose_threshold_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        choose_threshold([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6], **kwargs)


@pytest.mark.parametrize(
    "build, args, match",
    [
        (lambda: make_calibrator("isotonc"), None, r"unknown calibrator 'isotonc' \(did you mean isotonic\?\); valid names"),
        (lambda: make_calibrator("beta"), None, "valid names are isotonic, none, platt, temperature"),
        (lambda: make_calibrator("platt", T=2.0), None, "'platt' has no parameter 'T'; valid parameters are C, max_iter"),
        (lambda: make_calibrator("temperature", pos_weight=-8), ([0.0, 1.0], [0, 1]), "pos_weight must be"),
        (lambda: make_calibrator("platt", C=0), ([0.0, 1.0], [0, 1]), "C must be a finite number > 0"),
        (lambda: make_calibrator("platt"), ([0.0, 1.0], [1, 1]), "only class 1"),
        (lambda: make_calibrator("platt"), ([0.0, 1.0], [0, 2]), r"only 0 and 1 .* found \[2\]"),
        (lambda: make_calibrator("platt"), ([0.0, 1.0, 2.0], [0, 1]), r"y must have shape \(3,\)"),
        (lambda: make_calibrator("platt"), ([[0.0, 1.0]], [0, 1]), r"logits must be 1-D"),
        (lambda: make_calibrator("platt"), ([0.0, np.nan], [0, 1]), "NaN/inf"),
    ],
)
def test_calibrator_errors(build, args, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cal = build()
        cal.fit(*args)


@pytest.mark.parametrize(
    "groups, n_splits, match",
    [
        (None, 1, "n_splits must be an integer >= 2"),
        (None, 13, "n_splits=13 needs at least 13 images of one class, found 8 melanoma and 12"),
        (np.repeat(np.arange(5), 4), 5, "n_splits=5 needs at least 5 lesions of one class, found 2 melanoma and 3"),
        (np.arange(19), 5, r"groups must have shape \(20,\)"),
        (np.array([0] * 8 + list(range(1, 13))), 2, "at least 2 melanoma and 2 non-melanoma lesions, found 1 and 12"),
        (np.array(["a"] * 19 + [None], dtype=object), 2, "missing lesion id"),
    ],
)
def test_crossfit_errors(groups, n_splits: int, match: str) -> None:
    y = np.array([1] * 8 + [0] * 12)
    with pytest.raises(ConfigError, match=match):
        PlattScaling().fit_crossfit(np.linspace(-1, 1, 20), y, groups, n_splits=n_splits)


def test_crossfit_with_fewer_melanoma_lesions_than_folds_still_scores_out_of_fold() -> None:
    logit = np.linspace(-2, 2, 40)
    y = np.zeros(40, dtype=int)
    y[[5, 30, 35]] = 1  # 3 melanomas, 5 folds: some scoring folds have none (scikit-learn warns)
    cal = PlattScaling()
    with pytest.warns(UserWarning, match="least populated class"):
        oof = cal.fit_crossfit(logit, y, None, n_splits=5)
    assert oof.shape == (40,) and not np.allclose(oof, cal.predict_proba(logit))


def test_no_calibration_crossfit_needs_no_folds() -> None:
    y = np.array([0, 0, 0, 1])  # too few melanomas for folds, but nothing is learnt from labels
    np.testing.assert_array_equal(NoCalibration().fit_crossfit([-1.0, 0.0, 1.0, 2.0], y, None),
                                  1 / (1 + np.exp(-np.array([-1.0, 0.0, 1.0, 2.0]))))


def test_registry_lists_every_calibrator() -> None:
    assert list_calibrators() == ["isotonic", "none", "platt", "temperature"]
    assert isinstance(make_calibrator("none", pos_weight=None), NoCalibration)  # None kwargs are dropped
