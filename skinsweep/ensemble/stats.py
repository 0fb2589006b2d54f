"""Confidence intervals and paired tests for the ensemble report.

Two tools, both about "is this difference real?" on one test split:

* :func:`bootstrap_metrics` -- percentile bootstrap CIs of every reported metric, for several models
  scored on the same images. All models share the same resamples, so their intervals are paired
  (a resample that is hard for one model is hard for all) and differences can be read off per
  resample. Resampling is by lesion (cluster bootstrap) when lesion ids are given: HAM10000 has
  several photographs of one lesion, and treating them as independent understates the uncertainty.
* :func:`delong_test` -- DeLong's paired test for the difference of two correlated ROC AUCs.

It also holds :func:`auc_columns` / :func:`ap_columns`, the AUC / AP of many score columns at once
that greedy ensemble selection needs.

Why the bootstrap is hand-written
---------------------------------
scikit-learn's metrics take one sample at a time: looping ``binary_metrics`` over 2,000 materialised
resamples of 1,500 images for 3 models takes ~30 s here. scikit-learn has no vectorised or weighted
bootstrap, so this module represents a resample as integer *multiplicity weights* ``w[b, i]`` (how many times image
``i`` was drawn in resample ``b``; for the lesion bootstrap, how many times its lesion was drawn) and
computes every metric for a chunk of resamples with array operations on a ``(B, N)`` weight matrix.
Each model's scores are sorted once (the order does not depend on the resample); the weights are
gathered into that order and summed within tied scores, and row-wise cumulative sums give the
weighted TP / FP counts at every distinct threshold. From those:

* ROC-AUC is the Mann-Whitney statistic ``sum_g neg_g * (TP_above_g + pos_g / 2) / (P * N)`` (ties
  count one half, as ``roc_auc_score``); AP is ``sum_g (pos_g / P) * precision_g`` (scikit-learn's
  step definition); sensitivity at specificity is the TPR at the last threshold whose FPR is allowed;
* threshold metrics read the counts at the last distinct score ``>= threshold``;
* ECE and Brier are weighted sums of ``prob - y`` (ECE bins are contiguous runs in score order).

Chunks of ~131k weights (1 MB temporaries) keep the work in cache: 3 models x 1,500 images x 2,000
lesion resamples take ~0.2 s on two cores. The result equals calling :func:`skinsweep.metrics.binary_metrics` on every materialised resample
(tests check agreement to 1e-9), with the same NaN / zero conventions.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.special import expit, ndtr, ndtri
from scipy.stats import rankdata

from skinsweep.ensemble.estimator import check_groups, check_int
from skinsweep.errors import ConfigError, short_list
from skinsweep.metrics import _check_fraction, _check_inputs, binary_metrics, sensitivity_at_specificity

# Rows of the bootstrap table, in this order for every model.
BOOT_METRICS: tuple[str, ...] = (
    "auc", "ap", "accuracy", "precision", "recall", "specificity", "f1", "ece", "brier", "sens_at_spec",
)
N_BINS = 15  # ECE bins, as in binary_metrics
_CHUNK_ELEMS = 131_072  # weight-matrix entries per chunk: 1 MB temporaries stay in cache (2-3x faster)

# ----------------------------------------------------------------------------- validation


def _check_probs(y_true: Any, probs: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not isinstance(probs, dict) or not probs:
        raise ConfigError("probs must be a non-empty dict {model name: prob array of shape (N,)}")
    y, out = None, {}
    for name, p in probs.items():
        try:
            y, out[str(name)] = _check_inputs(y_true, p)
        except ConfigError as e:
            raise ConfigError(f"probs[{str(name)!r}]: {e}") from None
    return y, out


def _check_thresholds(threshold: float | dict[str, float], names: list[str]) -> dict[str, float]:
    if isinstance(threshold, dict):
        missing = [m for m in names if m not in threshold]
        if missing:
            raise ConfigError(f"threshold dict has no entry for model(s) {short_list(missing)}; give one per model")
        return {m: _check_fraction(f"threshold[{m!r}]", threshold[m]) for m in names}
    t = _check_fraction("threshold", threshold)
    return {m: t for m in names}


# ----------------------------------------------------------------------------- resampling


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator, codes: np.ndarray | None = None) -> np.ndarray:
    """Multiplicity weights of ``n_boot`` bootstrap resamples, shape (n_boot, n), float64 counts.

    Without ``codes`` each resample draws ``n`` images with replacement. With ``codes`` (shape (n,),
    group index per image, 0..G-1) each resample draws ``G`` groups with replacement and every image
    of a drawn group gets that group's draw count (cluster bootstrap; the resample size varies).
    """
    k = n if codes is None else int(codes.max()) + 1
    draws = rng.integers(0, k, size=(n_boot, k))
    # Offsetting row b by b * k turns one flat bincount into the per-row counts (much faster than
    # rng.multinomial, which loops over binomials).
    counts = np.bincount((draws + np.arange(n_boot)[:, None] * k).ravel(), minlength=n_boot * k)
    counts = counts.reshape(n_boot, k).astype(np.float64)
    return counts if codes is None else np.take(counts, codes, axis=1)  # np.take: C-contiguous


# ----------------------------------------------------------------------------- weighted metrics


class _Plan(NamedTuple):
    """What does not change between resamples of one model, all in descending score order."""

    order: np.ndarray  # (N,) image indices sorted by descending prob (stable)
    y: np.ndarray  # (N,) float labels in that order
    resid: np.ndarray  # (N,) prob - y in that order
    ties: np.ndarray | None  # (G,) starts of runs of equal prob; None if all N scores are distinct
    bins: np.ndarray  # starts of the non-empty ECE bins in that order
    n_pred: int  # number of distinct scores >= threshold (the predicted-positive prefix, in groups)


def _plan(y: np.ndarray, p: np.ndarray, threshold: float) -> _Plan:
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    new_score = np.r_[True, ps[1:] != ps[:-1]]
    ties = np.flatnonzero(new_score)
    # np.histogram's bins: [e_b, e_b+1), the last one closed, as expected_calibration_error.
    b = np.minimum(np.searchsorted(np.linspace(0.0, 1.0, N_BINS + 1), ps, side="right") - 1, N_BINS - 1)
    return _Plan(
        order=order, y=y[order].astype(np.float64), resid=ps - y[order],
        ties=None if ties.shape[0] == p.shape[0] else ties,
        bins=np.flatnonzero(np.r_[True, b[1:] != b[:-1]]),
        n_pred=int(new_score[ps >= threshold].sum()),
    )


def weighted_metrics(
    w: np.ndarray, y: np.ndarray, p: np.ndarray, *, threshold: float = 0.5, spec: float = 0.9,
    plan: _Plan | None = None,
) -> dict[str, np.ndarray]:
    """All :data:`BOOT_METRICS` for each row of integer weights.

    Args:
        w: shape (B, N), multiplicity of each image in each resample (non-negative integers, float).
        y: shape (N,), labels in {0, 1}.
        p: shape (N,), probabilities in [0, 1].
        threshold: predicted positive iff ``p >= threshold``.
        spec: required specificity for ``sens_at_spec``.
        plan: ``_plan(y, p, threshold)``, to reuse across chunks.

    Returns:
        metric name -> shape (B,) values; NaN where undefined (as :func:`binary_metrics`).
    """
    pl = plan if plan is not None else _plan(y, p, threshold)
    # Weights in descending score order. np.take keeps the result C-contiguous (w[:, order] is
    # Fortran-ordered, which makes the row-wise cumsums below ~10x slower).
    ws = np.take(w, pl.order, axis=1)
    pos_g = ws * pl.y
    neg_g = ws - pos_g
    if pl.ties is not None:  # sum within tied scores: one ROC point per distinct score -> (B, G)
        pos_g = np.add.reduceat(pos_g, pl.ties, axis=1)
        neg_g = np.add.reduceat(neg_g, pl.ties, axis=1)
    ctp = np.cumsum(pos_g, axis=1)  # TP / FP when thresholding at each distinct score
    cfp = np.cumsum(neg_g, axis=1)
    pos, neg = ctp[:, -1], cfp[:, -1]
    n = pos + neg
    # Weights are integer counts, so a zero denominator has a zero numerator: max(den, 1) is exact,
    # and the undefined cases are masked to NaN explicitly.
    pos1, neg1 = np.maximum(pos, 1.0), np.maximum(neg, 1.0)
    both = (pos > 0) & (neg > 0)

    # Threshold metrics: "prob >= threshold" is a prefix of the distinct scores.
    k = pl.n_pred - 1
    tp = ctp[:, k] if k >= 0 else np.zeros_like(pos)
    fp = cfp[:, k] if k >= 0 else np.zeros_like(neg)
    fn, tn = pos - tp, neg - fp
    out = {
        "accuracy": (tp + tn) / n,
        "precision": tp / np.maximum(tp + fp, 1.0),  # 0 when nothing is predicted positive
        "recall": np.where(pos > 0, tp / pos1, math.nan),
        "specificity": np.where(neg > 0, tn / neg1, math.nan),
        "f1": 2 * tp / np.maximum(2 * tp + fp + fn, 1.0),
    }
    # ECE and Brier: weighted sums of prob - y. Bins are contiguous in score order.
    wr = ws * pl.resid
    out["ece"] = np.abs(np.add.reduceat(wr, pl.bins, axis=1)).sum(axis=1) / n
    out["brier"] = (wr @ pl.resid) / n

    # Ranking metrics.
    auc = np.einsum("bg,bg->b", neg_g, ctp - 0.5 * pos_g)  # positives above each negative, ties 1/2
    out["auc"] = np.where(both, auc / (pos1 * neg1), math.nan)
    ap = np.einsum("bg,bg->b", pos_g, ctp / np.maximum(ctp + cfp, 1.0))  # precision where recall steps
    out["ap"] = np.where(both, ap / pos1, math.nan)
    # FPR is non-decreasing along the curve, so the allowed thresholds are a prefix; TPR is largest at
    # its end. Same slack and the same float division as sensitivity_at_specificity.
    n_ok = (cfp / neg1[:, None] <= (1.0 - spec) + 1e-12).sum(axis=1)
    tp_at = np.take_along_axis(ctp, np.maximum(n_ok - 1, 0)[:, None], axis=1)[:, 0]
    sens = np.where(n_ok > 0, tp_at / pos1, 0.0)  # n_ok == 0: only the +inf threshold qualifies
    out["sens_at_spec"] = np.where(both, sens, math.nan)
    return {m: out[m] for m in BOOT_METRICS}


def _validate(
    y_true: Any, probs: Any, groups: Any, threshold: Any, n_boot: Any, spec_for_sens: Any,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None, dict[str, float], float]:
    y, ps = _check_probs(y_true, probs)
    g = check_groups(groups, y.shape[0])
    codes = None if g is None else np.unique(g, return_inverse=True)[1].ravel()  # group index 0..G-1
    thr = _check_thresholds(threshold, list(ps))
    spec = _check_fraction("spec_for_sens", spec_for_sens)
    check_int("n_boot", n_boot, 100, "a percentile CI needs at least 100 resamples; use 2000")
    return y, ps, codes, thr, spec


def bootstrap_values(
    y_true: Any, probs: dict[str, Any], *, groups: Any = None, threshold: float | dict[str, float] = 0.5,
    n_boot: int = 2000, seed: int = 0, spec_for_sens: float = 0.9,
) -> dict[str, dict[str, np.ndarray]]:
    """The raw bootstrap distribution: ``{model: {metric: shape (n_boot,) values}}``, NaN = undefined.

    Same arguments as :func:`bootstrap_metrics`. Resample ``b`` is the same for every model, so e.g.
    ``vals["ensemble"]["auc"] - vals["dino"]["auc"]`` is the bootstrap distribution of the difference.
    """
    y, ps, codes, thr, spec = _validate(y_true, probs, groups, threshold, n_boot, spec_for_sens)
    rng = np.random.default_rng(seed)
    plans = {m: _plan(y, p, thr[m]) for m, p in ps.items()}
    vals = {m: {k: np.empty(n_boot) for k in BOOT_METRICS} for m in ps}
    chunk = max(1, _CHUNK_ELEMS // y.shape[0])
    for lo in range(0, n_boot, chunk):  # draws are sequential, so results do not depend on chunk
        hi = min(n_boot, lo + chunk)
        w = bootstrap_weights(y.shape[0], hi - lo, rng, codes)
        for m, p in ps.items():
            for k, v in weighted_metrics(w, y, p, threshold=thr[m], spec=spec, plan=plans[m]).items():
                vals[m][k][lo:hi] = v
    return vals


def bootstrap_metrics(
    y_true: Any,
    probs: dict[str, Any],
    *,
    groups: Any = None,
    threshold: float | dict[str, float] = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    spec_for_sens: float = 0.9,
) -> pd.DataFrame:
    """Point estimates and percentile bootstrap CIs of every metric, paired across models.

    Args:
        y_true: shape (N,), labels in {0, 1} (1 = melanoma).
        probs: model name -> shape (N,) melanoma probabilities in [0, 1], all for the same images.
        groups: shape (N,), lesion id per image. Given: resample lesions with replacement and take all
            their images (cluster bootstrap). None: resample images.
        threshold: decision threshold (``prob >= threshold`` is positive), one for all models or a
            dict with one per model.
        n_boot: number of resamples (>= 100).
        seed: seed of the resampling; the same seed gives the same table.
        alpha: the CI is the ``[alpha/2, 1 - alpha/2]`` percentile interval (0.05 -> 95%).
        spec_for_sens: specificity at which ``sens_at_spec`` is read.

    Returns:
        One row per model x metric (:data:`BOOT_METRICS`), columns ``model, metric, estimate, lo, hi,
        n_boot_valid``. ``estimate`` is on the full data (:func:`binary_metrics`,
        :func:`sensitivity_at_specificity`); ``lo``/``hi`` are percentiles over the ``n_boot_valid``
        resamples where the metric is defined (e.g. AUC needs both classes), NaN when none is.
        ``df.attrs`` records n_boot, seed, alpha, spec_for_sens and the resampling unit.
        Note: the percentile interval of a biased statistic can exclude the point estimate; ECE is
        biased upwards under resampling, so for a well-calibrated model its whole interval can lie
        above the estimate.
    """
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}; 0.05 gives a 95% interval")
    y, ps, _, thr, spec = _validate(y_true, probs, groups, threshold, n_boot, spec_for_sens)
    vals = bootstrap_values(y, ps, groups=groups, threshold=thr, n_boot=n_boot, seed=seed, spec_for_sens=spec)
    rows = []
    for m, p in ps.items():
        est = binary_metrics(y, p, threshold=thr[m], n_bins=N_BINS)
        est["sens_at_spec"] = sensitivity_at_specificity(y, p, spec)
        for k in BOOT_METRICS:
            v = vals[m][k][~np.isnan(vals[m][k])]
            lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2]) if v.size else (math.nan, math.nan)
            rows.append({"model": m, "metric": k, "estimate": float(est[k]), "lo": float(lo), "hi": float(hi),
                         "n_boot_valid": int(v.size)})
    df = pd.DataFrame(rows, columns=["model", "metric", "estimate", "lo", "hi", "n_boot_valid"])
    df.attrs.update(n_boot=int(n_boot), seed=seed, alpha=alpha, spec_for_sens=spec,
                    unit="image" if groups is None else "lesion")
    return df


# ----------------------------------------------------------------------------- calibration slope / intercept


def _logistic_recalibration(z: np.ndarray, y: np.ndarray, w: np.ndarray, *, fix_slope: bool,
                            iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Weighted maximum-likelihood fit of ``logit P(y=1) = a + b z`` for each row of weights.

    Newton's method with step halving (the log-likelihood is concave, so each accepted step raises it and
    the iteration converges from any start), vectorised over the rows of ``w``.

    Args:
        z: shape (N,), the model's logits; y: shape (N,), labels; w: shape (B, N), weights per resample.
        fix_slope: fit ``a`` only, with ``b = 1`` (``z`` as an offset: calibration-in-the-large).

    Returns:
        ``(a, b)``, each shape (B,); NaN where the fit does not exist (one class, or a separable
        resample, whose steps never settle).
    """
    yf = y.astype(np.float64)

    def loglik(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        eta = a[:, None] + b[:, None] * z[None, :]
        return (w * (yf * eta - np.logaddexp(0.0, eta))).sum(axis=1)

    n, n_pos = w.sum(axis=1), w @ yf
    if fix_slope:
        a, b = np.zeros(w.shape[0]), np.ones(w.shape[0])
    else:  # the intercept-only fit: a sensible, finite start
        rate = np.clip(n_pos / np.maximum(n, 1e-300), 1e-6, 1 - 1e-6)
        a, b = np.log(rate) - np.log1p(-rate), np.zeros(w.shape[0])
    step = np.full(w.shape[0], np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(iters):
            mu = expit(a[:, None] + b[:, None] * z[None, :])
            r, h = w * (yf - mu), w * mu * (1.0 - mu)  # score and Fisher-information terms per image
            ga, haa = r.sum(axis=1), h.sum(axis=1)
            if fix_slope:
                da, db = ga / haa, np.zeros_like(ga)
            else:
                gb, hab, hbb = r @ z, h @ z, h @ (z * z)
                det = haa * hbb - hab ** 2
                da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
            da, db = np.where(np.isfinite(da), da, 0.0), np.where(np.isfinite(db), db, 0.0)
            t, ll0 = np.ones_like(a), loglik(a, b)
            for _ in range(40):  # halve the step where it would lower the likelihood
                worse = ~(loglik(a + t * da, b + t * db) >= ll0 - 1e-12 * np.abs(ll0))
                if not worse.any():
                    break
                t = np.where(worse, t / 2, t)
            a, b = a + t * da, b + t * db
            step = np.maximum(np.abs(t * da), np.abs(t * db))
            if not np.any(step > 1e-10):
                break
    ok = np.isfinite(a) & np.isfinite(b) & (step < 1e-6) & (n_pos > 0) & (n_pos < n)
    return np.where(ok, a, math.nan), np.where(ok, b, math.nan)


def calibration_fit(y_true: Any, prob: Any, *, groups: Any = None, n_boot: int = 2000, seed: int = 0,
                    alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """Calibration slope and intercept of ``prob`` with percentile bootstrap CIs (by lesion when ``groups``).

    * slope: ``b`` of the logistic recalibration ``logit P(y=1) = a + b logit(prob)`` (ideal 1; below 1:
      predictions too extreme, above 1: too timid);
    * intercept: calibration-in-the-large, ``a`` of ``logit P(y=1) = a + logit(prob)`` (slope fixed at 1;
      ideal 0; positive: the model underestimates melanoma risk here, negative: overestimates it).

    The point estimates are maximum-likelihood fits (the slope equals scikit-learn's unpenalised
    ``LogisticRegression`` on ``logit(prob)``; tests check it); the CI uses the resamples of
    :func:`bootstrap_metrics` for the same seed and groups. Probabilities are clipped to [1e-6, 1 - 1e-6].

    Returns:
        ``{"slope": {"estimate", "lo", "hi"}, "intercept": {...}}`` (NaN where undefined).
    """
    y, p = _check_inputs(y_true, prob)
    g = check_groups(groups, y.shape[0])
    codes = None if g is None else np.unique(g, return_inverse=True)[1].ravel()
    check_int("n_boot", n_boot, 100, "a percentile CI needs at least 100 resamples; use 2000")
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(p, 1e-6, 1 - 1e-6))
    ones = np.ones((1, y.shape[0]))
    est = {"intercept": _logistic_recalibration(z, y, ones, fix_slope=True)[0][0],
           "slope": _logistic_recalibration(z, y, ones, fix_slope=False)[1][0]}
    rng = np.random.default_rng(seed)
    vals: dict[str, list[np.ndarray]] = {"slope": [], "intercept": []}
    chunk = max(1, _CHUNK_ELEMS // y.shape[0])
    for lo in range(0, n_boot, chunk):
        w = bootstrap_weights(y.shape[0], min(n_boot, lo + chunk) - lo, rng, codes)
        vals["intercept"].append(_logistic_recalibration(z, y, w, fix_slope=True)[0])
        vals["slope"].append(_logistic_recalibration(z, y, w, fix_slope=False)[1])
    out = {}
    for k in ("slope", "intercept"):
        v = np.concatenate(vals[k])
        v = v[np.isfinite(v)]
        lo_, hi_ = np.quantile(v, [alpha / 2, 1 - alpha / 2]) if v.size else (math.nan, math.nan)
        out[k] = {"estimate": float(est[k]), "lo": float(lo_), "hi": float(hi_), "n_boot_valid": int(v.size)}
    return out


# ----------------------------------------------------------------------------- column metrics
# Greedy selection (skinsweep.ensemble.combiners) scores every candidate ensemble at every step: 200 candidates x 50 steps is
# 10,000 AUCs. sklearn.metrics.roc_auc_score validates its input and builds a full ROC curve per
# call (~2 ms each on a 2-core CI box, so ~20 s in all); sorting the whole (N, C) candidate matrix
# once gives all C values in ~12 ms for (1500, 200). The ranks come from one argsort plus tie
# bookkeeping rather than scipy.stats.rankdata(axis=0), which alone takes ~23 ms on that matrix and
# would double the loop. Both metrics reproduce sklearn's values exactly, ties included
# (tests/test_stats.py checks this), and depend only on the ordering of each column.


def _sorted_tie_blocks(S: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each column of ``S`` (N, C) in decreasing order and locate runs of tied scores.

    Returns ``(y_sorted, start, end)``, each (N, C): the labels in sorted order, and for every
    sorted position the first and last position of its tie block.
    """
    n, c = S.shape
    order = np.argsort(-S, axis=0)  # ties are handled as blocks, so no need for (slower) stable
    s_sorted = np.take_along_axis(S, order, axis=0)
    pos = np.arange(n)[:, None]
    differs = s_sorted[1:] != s_sorted[:-1]  # (N-1, C): a new block starts below
    is_start = np.vstack([np.ones((1, c), dtype=bool), differs])
    is_end = np.vstack([differs, np.ones((1, c), dtype=bool)])
    start = np.maximum.accumulate(np.where(is_start, pos, 0), axis=0)
    end = np.minimum.accumulate(np.where(is_end, pos, n - 1)[::-1], axis=0)[::-1]
    return y[order], start, end


def auc_columns(S: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column of ``S`` (N, C) against ``y`` (N,): Mann-Whitney U from ranks.

    AUC = (sum of positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with increasing
    1-based ranks averaged over ties, which counts tied pairs as half, exactly like roc_auc_score.
    """
    n = y.shape[0]
    n_pos = int(y.sum())
    y_sorted, start, end = _sorted_tie_blocks(S, y)
    # Decreasing position p has increasing rank n - p; a tie block gets the mean over its positions.
    ranks = n - (start + end) / 2.0
    return ((ranks * y_sorted).sum(axis=0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * (n - n_pos))


def ap_columns(S: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Average precision of every column of ``S`` (N, C), as sklearn's average_precision_score.

    AP = sum over thresholds of (recall step) x precision. Tied scores form one threshold, so each
    positive gets the precision at the end of its tie block.
    """
    y_sorted, _, end = _sorted_tie_blocks(S, y)
    tp = np.cumsum(y_sorted, axis=0)
    precision_at_end = np.take_along_axis(tp, end, axis=0) / (end + 1.0)
    return (precision_at_end * y_sorted).sum(axis=0) / y.sum()


COLUMN_METRICS = {"auc": auc_columns, "ap": ap_columns}


# ----------------------------------------------------------------------------- DeLong


def _delong_components(x: np.ndarray, yneg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sun & Xu (2014) midrank form of DeLong's structural components.

    Args:
        x: shape (K, m), scores of the m positives under K models.
        yneg: shape (K, n), scores of the n negatives.

    Returns:
        auc shape (K,), V10 shape (K, m) (per positive: fraction of negatives it beats, ties 1/2),
        V01 shape (K, n) (per negative: fraction of positives that beat it, ties 1/2).
    """
    m, n = x.shape[1], yneg.shape[1]
    tx = rankdata(x, axis=1)  # midranks ("average") within positives
    ty = rankdata(yneg, axis=1)
    tz = rankdata(np.concatenate([x, yneg], axis=1), axis=1)
    # Rank among all minus rank among positives = negatives below (ties 1/2).
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    return auc, v10, v01


def auc_se(y_true: Any, prob: Any) -> dict[str, float]:
    """DeLong standard error of one model's AUC (the diagonal of :func:`delong_test`'s covariance).

    Returns ``auc``, ``se``, ``n_pos``, ``n_neg``. Needs at least 2 images of each class.
    """
    y, a = _check_inputs(y_true, prob)
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ConfigError(f"auc_se needs at least 2 melanoma and 2 other images, got {m} and {n}")
    auc, v10, v01 = _delong_components(a[pos][None, :], a[~pos][None, :])
    var = float(np.var(v10[0], ddof=1) / m + np.var(v01[0], ddof=1) / n)
    return {"auc": float(auc[0]), "se": math.sqrt(max(var, 0.0)), "n_pos": m, "n_neg": n}


def delong_test(y_true: Any, prob_a: Any, prob_b: Any, *, alpha: float = 0.05) -> dict[str, float]:
    """Paired DeLong test of ``AUC(a) - AUC(b)`` for two models scored on the same images.

    DeLong, DeLong & Clarke-Pearson (1988) variance of correlated AUCs, computed with the midrank
    algorithm of Sun & Xu (2014) in O(N log N).

    Args:
        y_true: shape (N,), labels in {0, 1}; needs both classes.
        prob_a, prob_b: shape (N,), the two models' probabilities (only their ranks matter).
        alpha: the CI of the difference is the normal ``1 - alpha`` interval.

    Returns:
        ``auc_a, auc_b, diff`` (a - b), ``se`` (of diff), ``z``, ``p_value`` (two-sided), ``ci_lo, ci_hi``
        (of diff, clipped to [-1, 1]), ``n_pos, n_neg``. When ``se == 0`` (e.g. identical scores)
        ``z`` is 0 and p is 1 if ``diff == 0``, else ``z = +-inf`` and p is 0.
    """
    y, a = _check_inputs(y_true, prob_a)
    try:
        _, b = _check_inputs(y_true, prob_b)
    except ConfigError as e:
        raise ConfigError(f"prob_b: {e}") from None
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}; 0.05 gives a 95% interval")
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m < 2 or n < 2:
        raise ConfigError(f"delong_test needs at least 2 melanoma and 2 other images, got {m} and {n}")

    scores = np.stack([a, b])
    auc, v10, v01 = _delong_components(scores[:, pos], scores[:, ~pos])
    s = np.cov(v10) / m + np.cov(v01) / n  # (2, 2) covariance of the two AUCs (ddof=1, as DeLong)
    var = max(float(s[0, 0] + s[1, 1] - 2 * s[0, 1]), 0.0)  # clip -1e-17 rounding
    diff = float(auc[0] - auc[1])
    se = math.sqrt(var)
    if se > 1e-15:
        z = diff / se
    else:
        z = 0.0 if abs(diff) < 1e-15 else math.copysign(math.inf, diff)
    half = float(ndtri(1 - alpha / 2)) * se
    return {
        "auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff, "se": se, "z": z,
        "p_value": float(2 * ndtr(-abs(z))),
        "ci_lo": max(diff - half, -1.0), "ci_hi": min(diff + half, 1.0), "n_pos": m, "n_neg": n,
    }
