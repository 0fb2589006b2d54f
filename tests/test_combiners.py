"""Tests for skinsweep.ensemble.combiners: combiner outputs, cross-fitting against leakage, greedy selection,
the vectorised column metrics, JSON round trips and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from skinsweep.ensemble.combiners import (
    Combiner,
    GreedyEnsemble,
    MeanLogit,
    MeanProb,
    Stacking,
    WeightedMean,
    greedy_selection,
    list_combiners,
    make_combiner,
)
from skinsweep.errors import ConfigError


def _members(n: int, strengths: list[float], seed: int, *, pos_rate: float = 0.2, shift: float = 0.0):
    """Labels and member logits ``strength * (2y - 1) + N(0, 1) + shift``, one column per strength."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(int)
    X = np.asarray(strengths)[None, :] * (2 * y - 1)[:, None] + rng.normal(0, 1, (n, len(strengths))) + shift
    return X, y


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ----------------------------------------------------------------------------- simple cases

IDENTICAL = np.repeat(np.linspace(-6, 6, 25)[:, None], 3, axis=1)  # 3 identical members
Y25 = (np.arange(25) % 3 == 0).astype(int)


@pytest.mark.parametrize(
    "combiner, X, expected",
    [
        # the mean of identical members is that member, whatever the averaging
        (MeanProb(), IDENTICAL, IDENTICAL[:, 0]),
        (MeanLogit(), IDENTICAL, IDENTICAL[:, 0]),
        (WeightedMean(weights=[5, 1, 0]), IDENTICAL, IDENTICAL[:, 0]),
        (GreedyEnsemble(), IDENTICAL, IDENTICAL[:, 0]),
        # hand-worked: logits, probabilities, given weights
        (MeanLogit(), [[1.0, 3.0], [-2.0, 0.0]], [2.0, -1.0]),
        (MeanProb(), [[2.0, -2.0], [np.log(3), np.log(3)]], [0.0, np.log(3)]),
        (MeanProb(), [[0.0, np.log(1 / 3)]], [np.log(0.375 / 0.625)]),  # mean(0.5, 0.25) = 0.375
        (WeightedMean(weights=[3, 1]), [[4.0, 0.0], [0.0, 8.0]], [3.0, 2.0]),
        # saturated members: log-space averaging keeps the logit finite and exact
        (MeanProb(), [[800.0, 800.0], [-800.0, -800.0]], [800.0, -800.0]),
    ],
)
def test_combiner_outputs_on_simple_cases(combiner: Combiner, X, expected) -> None:
    y = Y25 if len(X) == 25 else np.array([1, 0][: len(X)])
    out = combiner.fit(X, y).predict_logit(X)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


def test_weighted_mean_fitted_weights_are_a_distribution_favouring_signal() -> None:
    # shift = ln 8 as weighted BCE gives: the nuisance bias absorbs it, weights see only ranking
    X, y = _members(1500, [1.5, 0.7, 0.0, 0.0], seed=0, shift=np.log(8))
    w = WeightedMean().fit(X, y).weights_
    assert w.shape == (4,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[0] > w[1] > max(w[2], w[3])
    assert w[2] + w[3] < 0.1


def test_weighted_mean_given_weights_are_normalised_and_do_not_need_labels() -> None:
    X, _ = _members(10, [1.0, 1.0], seed=1)
    comb = WeightedMean(weights=[2.0, 6.0]).fit(X, np.zeros(10, dtype=int))  # one class is fine
    np.testing.assert_array_equal(comb.weights_, [0.25, 0.75])


def test_stacking_learns_signal_weights_and_extra_features() -> None:
    X, y = _members(2000, [0.6, 0.0], seed=2)
    rng = np.random.default_rng(2)
    age = 50 + 15 * rng.normal(size=2000) + 15 * y  # older -> more melanoma; in years, unscaled
    comb = Stacking().fit(X, y, extra=age[:, None])
    assert comb.coef_.shape == (3,) and comb.n_extra_ == 1
    # true log-odds slopes: 2 * 0.6 = 1.2 per logit unit, 15 / 15**2 = 0.067 per year
    assert comb.coef_[0] == pytest.approx(1.2, abs=0.2) and abs(comb.coef_[1]) < 0.15
    assert comb.coef_[2] == pytest.approx(0.067, abs=0.02)
    with_age = roc_auc_score(y, comb.predict_logit(X, extra=age[:, None]))
    assert with_age > roc_auc_score(y, X[:, 0]) + 0.03


# ----------------------------------------------------------------------------- leakage probes


def test_stacking_penalises_indicator_columns_in_raw_units() -> None:
    # A one-hot metadata column seen in 8 of 1,500 images, all benign: standardised before the L2 fit,
    # it would get a coefficient of about -3.6 (8 images move every future lesion of that category by
    # -3.6 logits); in raw units the penalty shrinks it, while a common informative indicator and the
    # members keep their weight.
    X, y = _members(1500, [1.0, 0.5], seed=4)
    rng = np.random.default_rng(0)
    rare = np.zeros(1500)
    rare[np.flatnonzero(y == 0)[:8]] = 1
    common = (rng.random(1500) < 0.5 + 0.2 * (2 * y - 1)).astype(float)
    comb = Stacking().fit(X, y, extra=np.column_stack([rare, common]))
    assert -1.0 < comb.coef_[2] < 0
    assert comb.coef_[3] > 1.0 and comb.coef_[0] > comb.coef_[1] > 0.5


def _lesion_key_case(seed: int, n_lesions: int = 150):
    """Two images per lesion; informative members with a weak signal; and a 'leaky' feature: a
    one-hot key per lesion. The key identifies a lesion and nothing else, so it only helps a model
    that has seen that lesion's label -- in-sample, or with the lesion split across folds."""
    rng = np.random.default_rng(seed)
    lesion = np.repeat(np.arange(n_lesions), 2)
    y = (rng.random(n_lesions) < 0.3).astype(int)[lesion]
    informative = 0.35 * (2 * y - 1)[:, None] + rng.normal(0, 1, (lesion.size, 3))
    key = np.eye(n_lesions)[lesion]
    noise_member = rng.normal(0, 1, (lesion.size, 1))
    return y, lesion, informative, key, noise_member


@pytest.mark.parametrize("seed", [0, 1])
def test_crossfit_out_of_fold_cannot_use_a_lesion_key(seed: int) -> None:
    y, lesion, informative, key, noise_member = _lesion_key_case(seed)
    stack = Stacking(C=100.0)

    in_sample = stack.fit(noise_member, y, extra=key).predict_logit(noise_member, extra=key)
    assert roc_auc_score(y, in_sample) > 0.99  # the key memorises every lesion's label

    oof = stack.fit_crossfit(noise_member, y, lesion, extra=key)
    assert oof.shape == y.shape
    # afterwards the stacker is the final model, fitted on all rows (what test/deployment use)
    np.testing.assert_allclose(stack.predict_logit(noise_member, extra=key), in_sample, rtol=0, atol=1e-12)
    # Out of fold the key is worthless. (AUC lands a little below 0.5: each fold's intercept follows
    # its fitting side's melanoma rate, which is anti-correlated with the scored side's.)
    assert abs(roc_auc_score(y, oof) - 0.5) < 0.1

    # Splitting by image puts a lesion's twin on the fitting side: the key leaks. This is what
    # grouping by lesion prevents (and shows the probe is able to detect a leak).
    oof_rows = stack.fit_crossfit(noise_member, y, None, extra=key)
    assert roc_auc_score(y, oof_rows) > 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_crossfit_leaky_key_adds_nothing_to_informative_members(seed: int) -> None:
    y, lesion, informative, key, _ = _lesion_key_case(seed)
    # Honest ceiling: the members' noise is i.i.d., so their plain mean is the best combination.
    ceiling = roc_auc_score(y, informative.mean(axis=1))
    in_sample = Stacking(C=100.0).fit(informative, y, extra=key).predict_logit(informative, extra=key)
    oof = Stacking(C=100.0).fit_crossfit(informative, y, lesion, extra=key)
    assert roc_auc_score(y, in_sample) > max(0.97, ceiling + 0.1)  # in-sample: far better than possible
    assert roc_auc_score(y, oof) <= ceiling + 0.02


@pytest.mark.parametrize("comb", [MeanProb(), MeanLogit(), WeightedMean(weights=[1, 1, 1])])
def test_crossfit_of_label_free_combiners_is_in_sample(comb: Combiner) -> None:
    X, y = _members(200, [1.0, 0.5, 0.0], seed=3)
    oof = comb.fit_crossfit(X, y, None)
    np.testing.assert_array_equal(oof, comb.predict_logit(X))


@pytest.mark.parametrize("name", ["weighted", "greedy", "stacking"])
def test_crossfit_of_fitted_combiners_differs_from_in_sample(name: str) -> None:
    X, y = _members(300, [1.0, 0.5, 0.0, 0.0], seed=4)
    comb = make_combiner(name)
    oof = comb.fit_crossfit(X, y, np.arange(300) // 2, n_splits=4, seed=1)
    assert np.isfinite(oof).all() and not np.allclose(oof, comb.predict_logit(X))


# ----------------------------------------------------------------------------- greedy selection


def test_greedy_selection_picks_informative_members_over_noise() -> None:
    strengths = [0.8, 0.6, 0.5] + [0.0] * 37  # 3 informative members among 40
    X, y = _members(1500, strengths, seed=5, shift=np.log(8))
    for metric in ("auc", "ap"):
        res = greedy_selection(X, y, metric=metric, n_iter=20)
        assert res.order[0] == 0  # starts from the best single member
        assert res.weights[:3].sum() > 0.85 and res.weights.sum() == pytest.approx(1.0)
        assert np.all(np.diff(res.scores) > 0)  # every pick strictly improved the metric
        assert res.stop_reason in {"n_iter", "no_improvement"}
        np.testing.assert_array_equal(np.bincount(res.order, minlength=40), res.counts)
        assert dict(res) == {int(i): int(res.counts[i]) for i in res.indices}  # also a count table


@pytest.mark.parametrize(
    "kwargs, check",
    [
        ({"n_iter": 1}, lambda r: len(r.order) == 1 and r.stop_reason == "n_iter"),
        ({"top_n": 2, "n_iter": 30}, lambda r: set(r.indices) <= {0, 1}),
        ({"with_replacement": False, "n_iter": 30}, lambda r: r.counts.max() == 1),
        ({"with_replacement": False, "top_n": 2, "n_iter": 30},
         lambda r: r.stop_reason in {"pool_exhausted", "no_improvement"} and len(r.order) <= 2),
    ],
)
def test_greedy_selection_options(kwargs: dict, check) -> None:
    X, y = _members(600, [1.0, 0.9, 0.8, 0.1, 0.0], seed=6)
    assert check(greedy_selection(X, y, **kwargs))


def test_greedy_ensemble_predicts_weighted_mean_probability() -> None:
    X, y = _members(400, [1.0, 0.7, 0.0], seed=7)
    comb = GreedyEnsemble(n_iter=10).fit(X, y)
    expected = _sigmoid(X) @ comb.selection_.weights
    np.testing.assert_allclose(_sigmoid(comb.predict_logit(X)), expected, rtol=1e-12)


# ----------------------------------------------------------------------------- JSON round trip


@pytest.mark.parametrize(
    "name, kwargs, use_extra",
    [
        ("mean_prob", {}, False),
        ("mean_logit", {}, False),
        ("weighted", {}, False),
        ("weighted", {"weights": [1.0, 2.0, 0.0]}, False),
        ("stacking", {"C": 0.3}, False),
        ("stacking", {}, True),
        ("greedy", {"metric": "ap", "n_iter": 7, "top_n": 2}, False),
    ],
)
def test_to_dict_round_trip_predicts_identically(name: str, kwargs: dict, use_extra: bool) -> None:
    X, y = _members(300, [1.0, 0.5, 0.0], seed=9, shift=np.log(8))
    extra = np.column_stack([np.arange(300) % 2, np.linspace(20, 80, 300)]) if use_extra else None
    comb = make_combiner(name, **kwargs).fit(X, y, extra=extra)
    loaded = Combiner.from_dict(json.loads(json.dumps(comb.to_dict(), allow_nan=False)))
    assert type(loaded) is type(comb) and loaded.get_params() == comb.get_params()
    np.testing.assert_allclose(loaded.predict_logit(X, extra=extra), comb.predict_logit(X, extra=extra),
                               rtol=0, atol=1e-12)


def test_to_dict_format() -> None:
    X, y = _members(100, [1.0, 0.0], seed=10)
    d = Stacking(C=2.0).fit(X, y).to_dict()
    assert d["format"] == "skinsweep.combiner/1" and d["kind"] == "stacking"
    assert d["params"] == {"C": 2.0, "max_iter": 1000}
    assert set(d["state"]) == {"n_members", "n_extra", "coef", "intercept"} and len(d["state"]["coef"]) == 2
    with pytest.raises(ConfigError, match="'stacking' combiner, not 'greedy'"):
        GreedyEnsemble.from_dict(d)


# ----------------------------------------------------------------------------- errors


def _fit(name: str, X=None, y=None, **kw):
    X = np.zeros((6, 2)) if X is None else X
    y = np.array([0, 1] * 3) if y is None else y
    return lambda: make_combiner(name, **kw).fit(X, y)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_combiner("stack"), r"unknown combiner 'stack' \(did you mean stacking\?\); valid names"),
        (lambda: make_combiner("stacking", alpha=1.0), "'stacking' has no parameter 'alpha'; valid parameters are C, max_iter"),
        (_fit("stacking", C=-1.0), "C must be a finite number > 0"),
        (_fit("weighted", weights=[1.0, -1.0]), "weights must be 2 finite non-negative numbers"),
        (_fit("weighted", weights=[1.0, 1.0, 1.0]), "weights must be 2"),
        (_fit("greedy", metric="f1"), r"metric must be one of \['ap', 'auc'\], got 'f1'"),
        (_fit("greedy", n_iter=0), "n_iter must be an integer >= 1"),
        (_fit("greedy", top_n=3), "top_n=3 exceeds the number of members"),
        (_fit("mean_prob", X=np.zeros(6)), r"X must be member logits of shape \(N images, M members\)"),
        (_fit("mean_prob", X=np.full((6, 2), np.inf)), "NaN/inf"),
        (_fit("stacking", y=np.zeros(6, dtype=int)), "only class 0"),
        (lambda: MeanProb().fit(np.zeros((6, 2)), [0, 1] * 3, extra=np.zeros((6, 1))), "'mean_prob' cannot use extra"),
        (lambda: Stacking().fit(np.zeros((6, 2)), [0, 1] * 3, extra=np.zeros((5, 1))), r"extra must be .* \(6, F\)"),
        (lambda: MeanLogit().fit(np.zeros((6, 2)), [0, 1] * 3).predict_logit(np.zeros((6, 3))),
         "X has 3 member columns but the 'mean_logit' combiner was fitted on 2 members"),
        (lambda: Stacking().fit(np.eye(6, 2), [0, 1] * 3, extra=np.eye(6, 1)).predict_logit(np.eye(6, 2)),
         "fitted with 1 extra feature"),
        (lambda: Stacking().fit_crossfit(np.zeros((6, 2)), [0, 1] * 3, None), "n_splits=5 needs at least 5 images of one"),
        (lambda: Stacking().fit_crossfit(np.zeros((6, 2)), [0, 0, 0, 0, 0, 1], None), "at least 2 melanoma"),
        (lambda: Combiner.from_dict({"format": "skinsweep.calibrator/1"}), "expected format 'skinsweep.combiner/1'"),
    ],
)
def test_combiner_errors(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


def test_registry_lists_every_combiner() -> None:
    assert list_combiners() == ["greedy", "greedy_meta", "mean_logit", "mean_prob", "stacking", "weighted"]


def test_none_keywords_keep_the_default_behaviour() -> None:
    # build_ensemble passes greedy top_n=None ("the candidates are already chosen"): every member is
    # in the pool, as with top_n=M, and more than the single best member ends up selected
    X, y = _members(600, [1.0, 0.9, 0.8, 0.1, 0.0], seed=6)
    every = make_combiner("greedy", top_n=None, n_iter=30).fit(X, y)
    np.testing.assert_array_equal(every.weights_, greedy_selection(X, y, n_iter=30, top_n=5).weights)
    assert np.count_nonzero(every.weights_) > 1
    # weights=None means "fit them": informative members get the weight
    fitted = make_combiner("weighted", weights=None).fit(X, y).weights_
    assert fitted[:3].sum() > 0.8
