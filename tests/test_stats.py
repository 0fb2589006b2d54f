"""Tests for skinsweep.ensemble.stats: the vectorised bootstrap against a slow reference, CI behaviour a user
relies on (containment, shrinking with n, lesion-level resampling), and DeLong against hand-worked
and O(n^2) references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kstest
from sklearn.metrics import average_precision_score, roc_auc_score

import skinsweep.ensemble.stats as stats_mod
from skinsweep.errors import ConfigError
from skinsweep.metrics import binary_metrics, sensitivity_at_specificity
from skinsweep.ensemble.stats import (
    BOOT_METRICS,
    ap_columns,
    auc_columns,
    bootstrap_metrics,
    bootstrap_values,
    bootstrap_weights,
    auc_se,
    delong_test,
    weighted_metrics,
)

TOL = 1e-9  # vectorised bootstrap vs binary_metrics on the materialised resample
DELONG_TOL = 1e-10  # Sun & Xu midranks vs the O(n^2) DeLong definition


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _case(n: int, seed: int, *, pos_rate: float = 0.2, n_models: int = 2, round_to: int | None = None):
    """Labels and ``n_models`` noisy, informative (and miscalibrated) probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(int)
    y[:2] = [0, 1]
    probs = {}
    for j in range(n_models):
        p = _sigmoid((1.0 + 0.3 * j) * (2 * y - 1) + rng.normal(0.0, 1.5, n))
        probs[f"m{j}"] = np.round(p, round_to) if round_to is not None else p
    return y, probs


def _reference(y, p, w, *, threshold=0.5, spec=0.9) -> dict[str, np.ndarray]:
    """Slow reference: materialise each resample and call binary_metrics on it."""
    out = {k: np.empty(w.shape[0]) for k in BOOT_METRICS}
    for b in range(w.shape[0]):
        idx = np.repeat(np.arange(y.shape[0]), w[b].astype(int))
        ref = binary_metrics(y[idx], p[idx], threshold=threshold)
        ref["sens_at_spec"] = sensitivity_at_specificity(y[idx], p[idx], spec)
        for k in BOOT_METRICS:
            out[k][b] = ref[k]
    return out


def _width(df: pd.DataFrame, model: str, metric: str) -> float:
    r = df[(df.model == model) & (df.metric == metric)].iloc[0]
    return float(r.hi - r.lo)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    "n, pos_rate, round_to, grouped, expect_nan",
    [
        (40, 0.25, None, False, False),  # distinct scores, image bootstrap
        (40, 0.25, 1, True, False),  # many tied scores, lesion bootstrap
        (24, 0.06, 2, True, True),  # rare melanoma: resamples without positives -> NaN paths
        (20, 0.97, 1, False, True),  # rare negatives: specificity / AUC undefined in some resamples
    ],
)
def test_weighted_metrics_equal_binary_metrics_on_each_resample(n, pos_rate, round_to, grouped, expect_nan):
    y, probs = _case(n, seed=n, pos_rate=pos_rate, n_models=1, round_to=round_to)
    p = probs["m0"]
    p[2:6] = [0.0, 1.0, 1 / 15, 7 / 15]  # extremes and ECE bin edges (np.histogram's bin convention)
    codes = np.arange(n) // 3 if grouped else None
    w = bootstrap_weights(n, 80, np.random.default_rng(0), codes)
    for thr, spec in [(0.5, 0.9), (0.3, 0.75), (0.99, 1.0)]:  # 0.99: often nothing predicted positive
        got = weighted_metrics(w, y, p, threshold=thr, spec=spec)
        ref = _reference(y, p, w, threshold=thr, spec=spec)
        for k in BOOT_METRICS:
            np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(ref[k]), err_msg=k)
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=TOL, equal_nan=True, err_msg=k)
    assert any(np.isnan(got[k]).any() for k in BOOT_METRICS) == expect_nan


def test_bootstrap_metrics_equal_percentiles_of_reference():
    n, n_boot, seed, alpha = 36, 120, 7, 0.1
    y, probs = _case(n, seed=1, round_to=2)
    groups = np.array([f"lesion_{i // 2}" for i in range(n)])
    thr = {"m0": 0.4, "m1": 0.6}
    df = bootstrap_metrics(y, probs, groups=groups, threshold=thr, n_boot=n_boot, seed=seed, alpha=alpha)
    # Same draws as the implementation: one sequential stream from default_rng(seed).
    codes = np.unique(groups, return_inverse=True)[1]
    w = bootstrap_weights(n, n_boot, np.random.default_rng(seed), codes)
    for m, p in probs.items():
        ref = _reference(y, p, w, threshold=thr[m])
        est = binary_metrics(y, p, threshold=thr[m]) | {"sens_at_spec": sensitivity_at_specificity(y, p, 0.9)}
        for k in BOOT_METRICS:
            row = df[(df.model == m) & (df.metric == k)].iloc[0]
            v = ref[k][~np.isnan(ref[k])]
            assert row.n_boot_valid == v.size
            assert row.estimate == pytest.approx(est[k], abs=TOL)
            assert row.lo == pytest.approx(np.quantile(v, alpha / 2), abs=TOL)
            assert row.hi == pytest.approx(np.quantile(v, 1 - alpha / 2), abs=TOL)


def test_table_layout_and_attrs():
    y, probs = _case(200, seed=2, n_models=3)
    df = bootstrap_metrics(y, probs, n_boot=100)
    assert list(df.columns) == ["model", "metric", "estimate", "lo", "hi", "n_boot_valid"]
    assert list(df.model.unique()) == ["m0", "m1", "m2"]
    assert df.groupby("model").metric.apply(tuple).tolist() == [BOOT_METRICS] * 3
    assert (df.n_boot_valid == 100).all()
    assert df.attrs == {"n_boot": 100, "seed": 0, "alpha": 0.05, "spec_for_sens": 0.9, "unit": "image"}


def test_all_undefined_metric_gives_nan_interval_not_error():
    y = np.array([0] * 20 + [1])  # one melanoma: most resamples have none
    p = np.linspace(0.0, 1.0, 21)
    df = bootstrap_metrics(y, {"m": p}, n_boot=100).set_index("metric")
    assert 0 < df.loc["auc", "n_boot_valid"] < 100  # only resamples that drew the melanoma
    assert df.loc["accuracy", "n_boot_valid"] == 100


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("metric", BOOT_METRICS)
def test_ci_contains_point_estimate(metric):
    y, probs = _case(600, seed=3)
    df = bootstrap_metrics(y, probs, n_boot=400, seed=1)
    r = df[df.metric == metric]
    assert ((r.lo <= r.estimate) & (r.estimate <= r.hi)).all(), r.to_string()
    assert (r.lo < r.hi).all()


def test_ece_interval_is_biased_upwards_for_a_calibrated_model():
    # Documented caveat: resampling adds noise to every bin, so bootstrap ECE exceeds the estimate.
    rng = np.random.default_rng(2)
    p = rng.beta(1, 6, 3000)
    y = (rng.random(3000) < p).astype(int)
    vals = bootstrap_values(y, {"cal": p}, n_boot=300)["cal"]["ece"]
    est = binary_metrics(y, p)["ece"]
    assert np.median(vals) > est


@pytest.mark.parametrize("metric", ["auc", "ap", "accuracy", "recall", "specificity", "brier", "sens_at_spec"])
def test_ci_narrows_with_ten_times_more_images(metric):
    small_y, small = _case(300, seed=4, n_models=1)
    big_y, big = _case(3000, seed=5, n_models=1)
    w_small = _width(bootstrap_metrics(small_y, small, n_boot=300), "m0", metric)
    w_big = _width(bootstrap_metrics(big_y, big, n_boot=300), "m0", metric)
    assert w_small / w_big > 2.0  # ~sqrt(10) = 3.2 expected


@pytest.mark.parametrize("metric", ["auc", "ap", "accuracy", "recall", "specificity", "brier"])
def test_lesion_bootstrap_is_wider_when_images_of_a_lesion_are_duplicates(metric):
    # 4 identical photographs per lesion carry the information of one: resampling images pretends
    # there are 4x more independent cases and understates the uncertainty by about 2x.
    y1, p1 = _case(300, seed=6, n_models=1)
    y, p = np.repeat(y1, 4), {"m0": np.repeat(p1["m0"], 4)}
    lesion = np.repeat(np.arange(300), 4)
    by_image = _width(bootstrap_metrics(y, p, n_boot=300), "m0", metric)
    by_lesion = _width(bootstrap_metrics(y, p, groups=lesion, n_boot=300), "m0", metric)
    assert by_lesion / by_image > 1.5


def test_same_seed_same_table_other_seed_other_table():
    y, probs = _case(300, seed=7)
    groups = np.arange(300) // 2
    a = bootstrap_metrics(y, probs, groups=groups, n_boot=200, seed=3)
    b = bootstrap_metrics(y, probs, groups=groups, n_boot=200, seed=3)
    c = bootstrap_metrics(y, probs, groups=groups, n_boot=200, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.lo, c.lo)


def test_chunk_size_does_not_change_results(monkeypatch):
    y, probs = _case(150, seed=8)
    groups = np.arange(150) // 3
    a = bootstrap_metrics(y, probs, groups=groups, n_boot=150)
    monkeypatch.setattr(stats_mod, "_CHUNK_ELEMS", 7 * 150)  # 7 resamples per chunk
    pd.testing.assert_frame_equal(a, bootstrap_metrics(y, probs, groups=groups, n_boot=150))


def test_models_share_resamples():
    y, probs = _case(200, seed=9, n_models=1)
    vals = bootstrap_values(y, {"a": probs["m0"], "b": probs["m0"].copy()}, n_boot=100)
    for k in BOOT_METRICS:
        np.testing.assert_array_equal(vals["a"][k], vals["b"][k])


def test_threshold_per_model():
    y, probs = _case(300, seed=10)
    thr = {"m0": 0.2, "m1": 0.8}
    df = bootstrap_metrics(y, probs, threshold=thr, n_boot=100).set_index(["model", "metric"])
    for m, t in thr.items():
        assert df.loc[(m, "recall"), "estimate"] == binary_metrics(y, probs[m], threshold=t)["recall"]
    assert df.loc[("m0", "recall"), "estimate"] > df.loc[("m1", "recall"), "estimate"]


def test_report_sized_lesion_bootstrap():
    # 3 models x 1,500 images x 2,000 lesion resamples, as the ensemble report runs it (its timing is
    # in benchmarks/bench_ensemble.py): every resample defines every metric, CIs contain the estimate
    y, probs = _case(1500, seed=11, n_models=3, pos_rate=0.11)
    df = bootstrap_metrics(y, probs, groups=np.arange(1500) // 2, n_boot=2000)
    assert len(df) == 3 * len(BOOT_METRICS) and (df["n_boot_valid"] == 2000).all()
    assert df.attrs["unit"] == "lesion"
    ranking = df[df.metric.isin(["auc", "ap", "recall", "specificity"])]
    assert ((ranking.lo <= ranking.estimate) & (ranking.estimate <= ranking.hi)).all()


@pytest.mark.parametrize("decimals", [None, 2, 1])  # rounding creates many tied scores
def test_column_metrics_match_sklearn(decimals) -> None:
    rng = np.random.default_rng(8)
    y = (rng.random(300) < 0.15).astype(int)
    S = 0.5 * y[:, None] + rng.random((300, 12))
    if decimals is not None:
        S = np.round(S, decimals)
    auc, ap = auc_columns(S, y), ap_columns(S, y)
    for j in range(S.shape[1]):
        assert auc[j] == pytest.approx(roc_auc_score(y, S[:, j]), abs=1e-12)
        assert ap[j] == pytest.approx(average_precision_score(y, S[:, j]), abs=1e-12)



_Y, _P = np.array([0, 1, 0, 1] * 30), np.linspace(0.05, 0.95, 120)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(y_true=_Y[:-1], probs={"m": _P}), r"probs\['m'\]: y_true and prob must have the same length"),
        (dict(y_true=np.where(_Y == 1, 2, 0), probs={"m": _P}), "only 0 and 1"),
        (dict(y_true=_Y, probs={"m": _P * 3}), r"\[0, 1\].*sigmoid"),
        (dict(y_true=_Y, probs={"m": _P}, n_boot=99), "n_boot must be an integer >= 100"),
        (dict(y_true=_Y, probs={"m": _P}, n_boot=500.0), "n_boot must be an integer"),
        (dict(y_true=_Y, probs={}), "non-empty dict"),
        (dict(y_true=_Y, probs={"m": _P}, groups=np.arange(5)), r"groups must have shape \(120,\)"),
        (dict(y_true=_Y, probs={"m": _P}, groups=[None] + ["a"] * 119), "missing lesion id"),
        (dict(y_true=_Y, probs={"m": _P, "n": _P}, threshold={"m": 0.5}), "no entry for model"),
        (dict(y_true=_Y, probs={"m": _P}, threshold=1.5), r"threshold must be in \[0, 1\]"),
        (dict(y_true=_Y, probs={"m": _P}, alpha=0.0), r"alpha must be in \(0, 1\)"),
        (dict(y_true=_Y, probs={"m": _P}, spec_for_sens=2.0), "spec_for_sens must be in"),
    ],
)
def test_bad_input_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        bootstrap_metrics(**kwargs)


# ----------------------------------------------------------------------------- DeLong

# Hand-worked case: 3 melanomas, 4 others.
#   a: positives X = [.9, .6, .4], negatives Y = [.7, .3, .2, .1]
#   b: positives X = [.8, .5, .3], negatives Y = [.6, .5, .4, .2]   (one tie at .5)
# Structural components (psi = 1 if x > y, 1/2 if x == y):
#   V10_a = [1, 3/4, 3/4]        V01_a = [1/3, 1, 1, 1]        AUC_a = 5/6
#   V10_b = [1, 5/8, 1/4]        V01_b = [1/3, 1/2, 2/3, 1]    AUC_b = 5/8
# Sample (co)variances, ddof = 1:
#   S10 = [[1/48, 3/64], [3/64, 9/64]]      S01 = [[1/9, 7/108], [7/108, 35/432]]
#   var(diff) = (1/48 + 9/64 - 2*3/64)/3 + (1/9 + 35/432 - 2*7/108)/4 = 13/576 + 1/64 = 11/288
HAND_Y = np.array([1, 1, 1, 0, 0, 0, 0])
HAND_A = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1])
HAND_B = np.array([0.8, 0.5, 0.3, 0.6, 0.5, 0.4, 0.2])


def test_delong_hand_worked_case():
    r = delong_test(HAND_Y, HAND_A, HAND_B)
    se = math.sqrt(11 / 288)
    assert r["auc_a"] == pytest.approx(5 / 6, abs=1e-15)
    assert r["auc_b"] == pytest.approx(5 / 8, abs=1e-15)
    assert r["diff"] == pytest.approx(5 / 24, abs=1e-15)
    assert r["se"] == pytest.approx(se, abs=1e-15)
    assert r["z"] == pytest.approx((5 / 24) / se, abs=1e-12)
    assert r["p_value"] == pytest.approx(math.erfc(r["z"] / math.sqrt(2)), abs=1e-12)
    assert r["ci_lo"] == pytest.approx(5 / 24 - 1.959963984540054 * se, abs=1e-12)
    assert (r["n_pos"], r["n_neg"]) == (3, 4)


def test_delong_against_uninformative_model_is_the_single_auc_variance():
    # A constant score has V10 = V01 = 1/2 everywhere (zero variance, zero covariance), so the
    # variance of the difference is a's own DeLong variance: 1/48 / 3 + 1/9 / 4 = 5/144.
    r = delong_test(HAND_Y, HAND_A, np.full(7, 0.3))
    assert r["auc_b"] == 0.5
    assert r["se"] == pytest.approx(math.sqrt(5) / 12, abs=1e-15)


def test_auc_se_is_the_single_auc_delong_standard_error():
    # the same 5/144 variance as above, from the one-model form
    r = auc_se(HAND_Y, HAND_A)
    assert r["auc"] == pytest.approx(5 / 6, abs=1e-15)
    assert r["se"] == pytest.approx(math.sqrt(5) / 12, abs=1e-15)
    assert (r["n_pos"], r["n_neg"]) == (3, 4)
    with pytest.raises(ConfigError, match="at least 2 melanoma"):
        auc_se([1, 0, 0], [0.9, 0.2, 0.1])


def _delong_quadratic(y, a, b):
    """Straight DeLong (1988): psi over all positive-negative pairs, then sample covariances."""
    out = []
    for s in (a, b):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = out
    s10, s01 = np.cov(np.stack([v10a, v10b])), np.cov(np.stack([v01a, v01b]))
    s = s10 / v10a.size + s01 / v01a.size
    return auc_a, auc_b, math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])


@pytest.mark.parametrize("seed, n, round_to", [(0, 50, None), (1, 400, None), (2, 300, 1), (3, 120, 2)])
def test_delong_matches_quadratic_definition(seed, n, round_to):
    y, probs = _case(n, seed=seed, round_to=round_to)
    r = delong_test(y, probs["m0"], probs["m1"])
    auc_a, auc_b, se = _delong_quadratic(y, probs["m0"], probs["m1"])
    assert r["auc_a"] == pytest.approx(auc_a, abs=DELONG_TOL)
    assert r["auc_b"] == pytest.approx(auc_b, abs=DELONG_TOL)
    assert r["se"] == pytest.approx(se, abs=DELONG_TOL)


def test_delong_identical_scores_give_p_one_without_warnings():
    y, probs = _case(200, seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = delong_test(y, probs["m0"], probs["m0"].copy())
    assert (r["diff"], r["se"], r["z"], r["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert r["ci_lo"] == r["ci_hi"] == 0.0


def test_delong_zero_se_with_a_real_difference_gives_p_zero():
    y = np.array([0] * 5 + [1] * 5)
    perfect, constant = y * 0.8 + 0.1, np.full(10, 0.5)  # AUC 1 and 0.5, both zero-variance
    r = delong_test(y, perfect, constant)
    assert r["diff"] == 0.5 and r["se"] == 0.0
    assert r["z"] == math.inf and r["p_value"] == 0.0


def test_delong_p_values_are_uniform_under_the_null():
    # Two equally good models sharing a signal (so their AUCs are correlated): no real difference.
    rng = np.random.default_rng(13)
    ps = []
    for _ in range(300):
        y = (rng.random(200) < 0.2).astype(int)
        y[:2] = [0, 1]
        shared = (2 * y - 1) + rng.normal(0.0, 1.0, 200)
        a, b = (_sigmoid(shared + rng.normal(0.0, 1.0, 200)) for _ in range(2))
        ps.append(delong_test(y, a, b)["p_value"])
    ps = np.array(ps)
    assert 0.02 <= (ps < 0.05).mean() <= 0.09
    assert kstest(ps, "uniform").pvalue > 0.01


def test_delong_detects_a_clearly_better_model():
    rng = np.random.default_rng(14)
    y = (rng.random(3000) < 0.15).astype(int)
    good = _sigmoid(2.0 * (2 * y - 1) + rng.normal(0, 1.5, 3000))
    weak = _sigmoid(0.5 * (2 * y - 1) + rng.normal(0, 1.5, 3000))
    r = delong_test(y, good, weak)
    assert r["diff"] > 0.2 and r["p_value"] < 1e-12
    assert 0.0 < r["ci_lo"] < r["diff"] < r["ci_hi"]
    flipped = delong_test(y, weak, good)
    assert flipped["z"] == pytest.approx(-r["z"]) and flipped["p_value"] == pytest.approx(r["p_value"])


@pytest.mark.parametrize(
    "y, a, b, match",
    [
        (np.zeros(10, int), np.linspace(0, 1, 10), np.linspace(0, 1, 10), "at least 2 melanoma"),
        (HAND_Y, HAND_A, HAND_B[:-1], "prob_b: y_true and prob must have the same length"),
        (HAND_Y, HAND_A * 2, HAND_B, r"\[0, 1\]"),
    ],
)
def test_delong_bad_input(y, a, b, match):
    with pytest.raises(ConfigError, match=match):
        delong_test(y, a, b)


# ----------------------------------------------------------------------------- calibration slope / intercept


def test_calibration_fit_matches_sklearn_and_covers_the_truth():
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    from skinsweep.ensemble.stats import calibration_fit

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=600)
    y = (rng.random(600) < expit(0.6 + 0.7 * z)).astype(int)  # true slope 0.7, predictions too extreme
    r = calibration_fit(y, expit(z), n_boot=300)
    lr = LogisticRegression(C=1e10, tol=1e-10, max_iter=10_000).fit(z[:, None], y)
    assert r["slope"]["estimate"] == pytest.approx(lr.coef_[0, 0], abs=1e-5)
    a = r["intercept"]["estimate"]  # slope fixed at 1: the score equation sum(y - p) = 0 holds
    assert abs(np.sum(y - expit(a + z))) < 1e-6
    assert r["slope"]["lo"] < 0.7 < r["slope"]["hi"] < 1.0  # the CI excludes 1: flagged as miscalibrated
    rng = np.random.default_rng(7)
    z = rng.normal(0, 2, size=3000)
    calibrated = (rng.random(3000) < expit(z)).astype(int)
    ok = calibration_fit(calibrated, expit(z), n_boot=300, groups=np.arange(3000) // 2)
    assert ok["slope"]["lo"] < 1.0 < ok["slope"]["hi"] and ok["intercept"]["lo"] < 0.0 < ok["intercept"]["hi"]
    assert abs(ok["slope"]["estimate"] - 1) < 0.1 and abs(ok["intercept"]["estimate"]) < 0.1
