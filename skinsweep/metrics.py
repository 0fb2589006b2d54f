"""Binary melanoma metrics: the one place skinsweep computes them.

Every number skinsweep reports (per-epoch trial metrics, ensemble reports, the final test report) is
recomputed here from per-image arrays, so all metrics of one row come from the same predictions.

Conventions used throughout:

* ``y_true`` has shape ``(N,)`` with values in {0, 1} (1 = melanoma); ``prob`` has shape ``(N,)``
  with the predicted probability of melanoma in [0, 1].
* An image is predicted positive iff ``prob >= threshold``. This is the same rule as
  :func:`sklearn.metrics.roc_curve`, so a threshold from :func:`threshold_for_sensitivity`
  reproduces the sensitivity it was chosen for when passed to :func:`binary_metrics`.
* Undefined metrics are NaN, never an exception: ROC-AUC and average precision with only one class
  present, recall (sensitivity) without positives, specificity without negatives. Precision and F1
  with no predicted positives are 0 (scikit-learn's ``zero_division=0``), because "the model never
  says melanoma" is a real, bad outcome (common in early epochs) that should rank low, not vanish.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from skinsweep.errors import ConfigError

# Direction of each metric for model selection / the scheduler's ``mode`` ("max" if True).
HIGHER_IS_BETTER: dict[str, bool] = {
    "loss": False, "auc": True, "ap": True, "accuracy": True, "precision": True, "recall": True, "specificity": True,
    "f1": True, "ece": False, "brier": False}
# Metric names reported once per epoch by a trial (and stored as trials.parquet columns): all but f1.
METRIC_KEYS: tuple[str, ...] = tuple(k for k in HIGHER_IS_BETTER if k != "f1")


def sigmoid(x: Any) -> np.ndarray:
    """Logit → probability, overflow-safe (``scipy.special.expit``); the one sigmoid in skinsweep."""
    from scipy.special import expit

    return expit(np.asarray(x, dtype=np.float64))


def format_ci(m: dict | None, missing: str = "-") -> str:
    """``{"estimate", "lo", "hi"}`` (a bootstrap CI from :mod:`skinsweep.ensemble.stats`) →
    ``"0.912 [0.880, 0.940]"``; ``missing`` when there is no estimate, the estimate alone without a CI."""
    est = None if not m else m.get("estimate")
    if est is None or (isinstance(est, float) and math.isnan(est)):
        return missing
    lo, hi = m.get("lo"), m.get("hi")
    if lo is None or hi is None or any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return f"{est:.3f}"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


# ----------------------------------------------------------------------------- input validation


def _check_inputs(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(y, p)`` as 1-D int64 / float64 arrays, or raise a one-line ConfigError."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if y.ndim != 1:
        raise ConfigError(f"y_true must be 1-D with shape (N,), got shape {y.shape}; flatten it first")
    if p.ndim != 1:
        raise ConfigError(f"prob must be 1-D with shape (N,), got shape {p.shape}; flatten it first")
    if y.shape[0] != p.shape[0]:
        raise ConfigError(f"y_true and prob must have the same length, got {y.shape[0]} and {p.shape[0]}")
    if y.shape[0] == 0:
        raise ConfigError("y_true and prob are empty; metrics need at least one image")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
        raise ConfigError(f"y_true must contain only 0 and 1 (1 = melanoma), found {bad}")
    if not np.isfinite(p).all():
        raise ConfigError(f"prob contains {int((~np.isfinite(p)).sum())} NaN/inf value(s); check the model outputs")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ConfigError(f"prob must lie in [0, 1], found range [{p.min():.4g}, {p.max():.4g}]; "
                          "pass sigmoid(logit), not the logit")
    return y.astype(np.int64), p


def _check_fraction(name: str, value: float, *, allow_zero: bool = True) -> float:
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{name} must be in {interval}, got {value}")
    return value


def _ratio(num: int, den: int, *, empty: float) -> float:
    """``num / den``, or ``empty`` when the denominator is zero (see module docstring)."""
    return float(num) / float(den) if den > 0 else empty


# ----------------------------------------------------------------------------- metrics


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the positive-class probability.

    Definition: with ``B`` equal-width bins on [0, 1],

        ECE = sum_b (n_b / N) * | mean(prob[i] for i in b) - mean(y_true[i] for i in b) |

    i.e. the bin-size-weighted gap between mean predicted probability and observed melanoma
    frequency (the reliability diagram's gap). Empty bins contribute nothing.

    Bin edges are ``np.linspace(0, 1, n_bins + 1)``; every bin is closed on the left and open on the
    right, ``[e_b, e_{b+1})``, except the last, which is closed on both sides, ``[e_{B-1}, 1]``, so
    ``prob == 1.0`` is counted. This is ``np.histogram``'s convention (which computes the bins).
    Note that ``sklearn.calibration.calibration_curve`` puts a probability lying exactly on an
    inner edge into the lower bin instead; the two agree for probabilities off the edges.

    ``n_bins`` >= 1. Returns ECE in [0, 1] (0 = perfectly calibrated on this sample).
    """
    y, p = _check_inputs(y_true, prob)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    # scikit-learn has no ECE (calibration_curve drops bin counts and empty bins), so it is computed
    # here. Three weighted histograms give per-bin counts and sums in one vectorised pass each.
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    count, _ = np.histogram(p, bins=edges)
    sum_prob, _ = np.histogram(p, bins=edges, weights=p)
    sum_true, _ = np.histogram(p, bins=edges, weights=y.astype(np.float64))
    # |mean(prob) - mean(y)| * n_b / N == |sum_prob - sum_true| / N, which also handles empty bins.
    return float(np.abs(sum_prob - sum_true).sum() / p.shape[0])


def binary_metrics(y_true: Any, prob: Any, *, threshold: float = 0.5, loss: float | None = None,
                   n_bins: int = 15) -> dict[str, float]:
    """All per-split metrics for binary melanoma classification, from one set of predictions.

    ``loss``: the split's mean loss, if the caller has it, copied into the result; ``n_bins``: bins of ``ece``.

    Returns:
        ``auc`` (ROC-AUC), ``ap`` (average precision), ``accuracy``, ``precision``, ``recall``
        (= sensitivity), ``specificity``, ``f1``, ``ece``, ``brier``, ``n`` (images, int),
        ``n_pos`` (melanomas, int), and ``loss`` when given. NaN / 0 conventions for undefined
        values are in the module docstring.
    """
    y, p = _check_inputs(y_true, prob)
    threshold = _check_fraction("threshold", threshold)

    n = int(y.shape[0])
    n_pos = int(y.sum())
    both_classes = 0 < n_pos < n
    pred = (p >= threshold).astype(np.int64)
    # labels=[0, 1] keeps the matrix 2x2 even when one class is missing from y or pred.
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())

    out: dict[str, float] = {
        # roc_auc_score raises and average_precision_score warns on one class: report NaN instead.
        "auc": float(roc_auc_score(y, p)) if both_classes else math.nan,
        "ap": float(average_precision_score(y, p)) if both_classes else math.nan,
        "accuracy": (tp + tn) / n,
        "precision": _ratio(tp, tp + fp, empty=0.0),
        "recall": _ratio(tp, tp + fn, empty=math.nan),
        "specificity": _ratio(tn, tn + fp, empty=math.nan),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty=0.0),
        "ece": expected_calibration_error(y, p, n_bins=n_bins),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "n": n,
        "n_pos": n_pos,
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


# ----------------------------------------------------------------------------- operating points


def _roc(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Full ROC curve (no dropped points, so every achievable threshold is a candidate)."""
    y, p = _check_inputs(y_true, prob)
    if not 0 < int(y.sum()) < y.shape[0]:
        return None
    return roc_curve(y, p, drop_intermediate=False)


def sensitivity_at_specificity(y_true: Any, prob: Any, spec: float = 0.9) -> float:
    """Highest sensitivity over thresholds whose specificity is at least ``spec`` (in [0, 1]); NaN when
    ``y_true`` holds only one class."""
    spec = _check_fraction("spec", spec)
    roc = _roc(y_true, prob)
    if roc is None:
        return math.nan
    fpr, tpr, _ = roc
    # fpr[0] == 0 (threshold +inf) always qualifies, so the mask is never empty. The small slack
    # keeps e.g. spec=0.9 with 10 negatives from failing on 1 - 0.9 = 0.09999999999999998.
    ok = fpr <= (1.0 - spec) + 1e-12
    return float(tpr[ok].max())


def threshold_for_sensitivity(y_true: Any, prob: Any, target: float = 0.95) -> float:
    """Highest threshold whose sensitivity (``prob >= threshold`` counted positive) is >= ``target``.

    Used to pick operating points on validation predictions: the highest such threshold gives the best
    specificity among all thresholds meeting the sensitivity target (in (0, 1]). ``y_true`` needs both
    classes. Returns one of the ``prob`` values.
    """
    target = _check_fraction("target", target, allow_zero=False)
    roc = _roc(y_true, prob)
    if roc is None:
        raise ConfigError("threshold_for_sensitivity needs both melanoma (1) and non-melanoma (0) images in "
                          "y_true; pick thresholds on a split that contains both")
    _, tpr, thresholds = roc
    # thresholds decrease and tpr increases along the curve, so the first index reaching the
    # target is the highest qualifying threshold. thresholds[0] is +inf with tpr 0 < target.
    idx = int(np.argmax(tpr >= target - 1e-12))
    return float(thresholds[idx])
