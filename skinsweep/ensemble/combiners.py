"""Combiners: several members' logits -> one ensemble logit, fitted on validation predictions.

Input is a member-logit matrix ``X`` of shape (N, M) -- one row per image, one column per member,
always in the same member order -- and the output is an ensemble **logit** of shape (N,), which
:mod:`skinsweep.ensemble.calibrators` then turns into a probability::

    comb = make_combiner("stacking", C=1.0)
    oof = comb.fit_crossfit(X_val, y_val, lesion_val)        # honest val logits; comb ends fitted on all
    test_logit = comb.predict_logit(X_test)                  # (N_test,)
    json.dumps(comb.to_dict())                               # the bundle stores this, never a pickle

===============  ============================================================  ===============
name             ensemble logit                                                fitted on labels
===============  ============================================================  ===============
``mean_prob``    logit(mean_j sigmoid(x_j))                                    no
``mean_logit``   mean_j x_j                                                    no
``weighted``     sum_j w_j x_j, w >= 0, sum w = 1 (given, or min. log-loss)    unless given
``stacking``     logistic regression on [x, extra] (extra: (N, F) metadata)    yes
``greedy``       logit(sum_j w_j sigmoid(x_j)), w from Caruana selection       yes
``greedy_meta``  logistic regression on [greedy logit, extra]                  yes
===============  ============================================================  ===============

Every combiner has the same API (``fit``, ``predict_logit``, ``fit_crossfit``, ``to_dict`` /
``Combiner.from_dict``: the contract of :mod:`skinsweep.ensemble.estimator`) so callers treat them
uniformly. ``fit`` records the member count, so predicting with a different member set fails
loudly. Only ``stacking`` and ``greedy_meta`` accept ``extra``.

Honest validation scores: ``fit_crossfit`` returns out-of-fold logits, each row scored by a copy
fitted without its lesion (:func:`skinsweep.ensemble.estimator.crossfit_predict`). This protects
against the *combiner's* overfitting only: a member that itself saw validation labels (e.g. was
early-stopped on them) leaks in a way no cross-fitting of the combiner can detect.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logsumexp, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from skinsweep.ensemble.estimator import (
    SkinsweepEstimator,
    check_int,
    check_labels,
    check_positive,
    crossfit_predict,
    estimator_names,
    float_array,
    make,
    register,
)
from skinsweep.ensemble.stats import COLUMN_METRICS
from skinsweep.errors import ConfigError

__all__ = [
    "Combiner",
    "GreedyEnsemble",
    "GreedyMeta",
    "GreedyResult",
    "MeanLogit",
    "MeanProb",
    "Stacking",
    "WeightedMean",
    "greedy_selection",
    "list_combiners",
    "make_combiner",
]


# ----------------------------------------------------------------------------- helpers


def check_members(X: Any, *, name: str = "X") -> np.ndarray:
    """Member logits as a finite float64 array of shape (N, M), N, M >= 1."""
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(
            f"{name} must be member logits of shape (N images, M members), got shape {arr.shape}; "
            "stack one column per member (a single member is X[:, None])"
        )
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN/inf logit(s); check the members' predictions")
    return arr


def _logit_of_mean_prob(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``logit(sum_j w_j sigmoid(X[:, j]))`` for weights summing to 1, shape (N,).

    Computed as log(sum w sigmoid(x)) - log(sum w sigmoid(-x)) in log space, so members with
    saturated probabilities (|logit| > ~37 in float64) give a finite, exact logit instead of
    logit(1.0) = inf.
    """
    keep = w > 0  # log of zero weights is -inf; dropping them is exact
    Xk, wk = X[:, keep], w[keep]
    return logsumexp(log_expit(Xk), axis=1, b=wk) - logsumexp(log_expit(-Xk), axis=1, b=wk)


def _check_weights(weights: Any, m: int) -> np.ndarray:
    """Validated weights, shape (m,), normalised to sum 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (m,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights must be {m} finite non-negative numbers, not all zero (one per member), got {weights!r}")
    return w / w.sum()


# ----------------------------------------------------------------------------- greedy selection


class GreedyResult(dict):
    """Outcome of :func:`greedy_selection`: a dict ``{member index: times picked}`` over the selected
    members (so ``dict(result)`` / ``result.items()`` work like a plain count table), with the
    details as attributes -- a dict with attributes, like scikit-learn's ``Bunch``.

    Attributes:
        counts: shape (M,), times each member was picked (0 = not in the ensemble).
        weights: shape (M,), ``counts / counts.sum()``: the mean-probability ensemble's weights.
        order: member indices in the order they were added (repeats possible).
        scores: the ensemble's validation metric after each addition (strictly increasing).
        stop_reason: "n_iter" (size limit reached), "no_improvement" (no candidate strictly improved
            the metric) or "pool_exhausted" (without replacement, every candidate was used).
    """

    def __init__(self, counts: np.ndarray, order: list[int], scores: list[float], stop_reason: str) -> None:
        super().__init__({int(i): int(counts[i]) for i in np.flatnonzero(counts)})
        self.counts = counts
        self.weights = counts / counts.sum()
        self.order = order
        self.scores = scores
        self.stop_reason = stop_reason

    @property
    def indices(self) -> np.ndarray:
        """Selected member indices (sorted), shape (K,)."""
        return np.flatnonzero(self.counts)

    def __repr__(self) -> str:
        return f"GreedyResult({dict(self)}, score={self.scores[-1]:.4g}, stop_reason={self.stop_reason!r})"


def greedy_selection(
    X_val: Any,
    y_val: Any,
    *,
    metric: Literal["auc", "ap"] = "auc",
    n_iter: int = 50,
    top_n: int | None = None,
    with_replacement: bool = True,
) -> GreedyResult:
    """Forward ensemble selection with replacement (Caruana et al., ICML 2004).

    The candidate pool is the ``top_n`` members by single-member ``metric`` (all when None). The
    ensemble starts as the best member; each step adds the candidate (already-picked ones again
    when ``with_replacement``) whose addition gives the best metric of the mean-probability
    ensemble. It stops after ``n_iter`` picks in total (the first included) or, earlier, at the first
    step where no candidate strictly improves the metric. Picking a member k times gives it weight
    k / n_picks. Ties go to the better single member.

    The selection overfits the rows it is run on; use ``GreedyEnsemble.fit_crossfit`` for honest
    validation scores.

    Args:
        X_val: shape (N, M), member logits on validation.
        y_val: shape (N,), labels in {0, 1}; needs both classes.
        metric: "auc" (ROC-AUC) or "ap" (average precision).
        n_iter: maximum number of picks (ensemble size), >= 1.
        top_n: size of the candidate pool, 1..M, or None for all members.
        with_replacement: allow a member to be picked repeatedly (Caruana's default).

    Returns:
        A :class:`GreedyResult`: ``{member index: count}`` for the picked members, plus
        ``counts`` / ``weights`` (M,), the pick ``order``, ``scores`` and ``stop_reason``.
    """
    X = check_members(X_val, name="X_val")
    y = check_labels(y_val, X.shape[0], name="y_val")
    if metric not in COLUMN_METRICS:
        raise ConfigError(f"metric must be one of {sorted(COLUMN_METRICS)}, got {metric!r}")
    score_columns = COLUMN_METRICS[metric]
    n_iter = check_int("n_iter", n_iter, 1)
    m = X.shape[1]
    top_n = m if top_n is None else check_int("top_n", top_n, 1)
    if top_n > m:
        raise ConfigError(f"top_n={top_n} exceeds the number of members ({m}); use at most {m} or None")

    P = expit(X)
    single = score_columns(P, y)
    pool = np.argsort(-single, kind="stable")[:top_n]  # best first, so argmax ties favour it

    counts = np.zeros(m, dtype=np.int64)
    first = int(pool[0])
    counts[first] = 1
    # Metrics depend only on each column's ordering, so the running *sum* of probabilities stands in
    # for the mean (dividing every candidate by the same k + 1 changes no ranks).
    total = P[:, first].copy()
    order, scores = [first], [float(single[first])]
    stop_reason = "n_iter"
    while len(order) < n_iter:
        cand = pool if with_replacement else pool[counts[pool] == 0]
        if cand.size == 0:
            stop_reason = "pool_exhausted"
            break
        cand_scores = score_columns(total[:, None] + P[:, cand], y)
        best = int(np.argmax(cand_scores))
        # Strict improvement (beyond float noise; real AUC steps are >= 1 / (n_pos n_neg)).
        if not cand_scores[best] > scores[-1] + 1e-12:
            stop_reason = "no_improvement"
            break
        j = int(cand[best])
        counts[j] += 1
        total += P[:, j]
        order.append(j)
        scores.append(float(cand_scores[best]))
    return GreedyResult(counts, order, scores, stop_reason)


# ----------------------------------------------------------------------------- combiners

class Combiner(SkinsweepEstimator):
    """Base class. Subclasses implement ``_fit(X, y, E)`` and ``_predict(X, E)`` and list their fitted
    state in ``state_fields`` (``n_members_`` is recorded by ``fit`` and stored for every combiner)."""

    family = "combiner"
    accepts_extra: ClassVar[bool] = False
    state_fields = {"n_members": int}

    def fit(self, X: Any, y: Any, *, extra: Any = None) -> Combiner:
        """Fit on validation member logits ``X`` (N, M), labels ``y`` (N,), optional ``extra`` (N, F)."""
        X = check_members(X)
        y = check_labels(y, X.shape[0], both_classes=self.uses_labels)
        E = self._check_extra(extra, X.shape[0])
        self.n_members_ = X.shape[1]
        self._fit(X, y, E)
        return self

    def predict_logit(self, X: Any, *, extra: Any = None) -> np.ndarray:
        """Ensemble logit, shape (N,), for member logits ``X`` (N, M) in the fitted member order."""
        check_is_fitted(self)
        X = check_members(X)
        if X.shape[1] != self.n_members_:
            raise ConfigError(
                f"X has {X.shape[1]} member columns but the {self.kind!r} combiner was fitted on "
                f"{self.n_members_} members; pass the same members in the same order"
            )
        return self._predict(X, self._check_extra(extra, X.shape[0], fitted=True))

    def fit_crossfit(
        self, X: Any, y: Any, groups: Any, *, n_splits: int = 5, seed: int = 0, extra: Any = None
    ) -> np.ndarray:
        """Out-of-fold ensemble logits for the validation rows; this combiner ends fitted on all rows.

        Args:
            X: shape (N, M), member logits on validation.
            y: shape (N,), labels in {0, 1}.
            groups: shape (N,), lesion id per image, or None (each image its own lesion).
            n_splits, seed: see :func:`skinsweep.ensemble.estimator.crossfit_folds`.
            extra: shape (N, F), extra features (``stacking`` only).

        Returns:
            Shape (N,) logits, each from a copy fitted without that row's lesion (for combiners that
            do not use labels: the in-sample logits). Afterwards ``self`` is fitted on all N rows,
            for test and deployment (like ``fit``).
        """
        X = check_members(X)
        y = check_labels(y, X.shape[0], both_classes=self.uses_labels)
        E = self._check_extra(extra, X.shape[0])
        return crossfit_predict(self, X, y, groups, method="predict_logit", n_splits=n_splits, seed=seed, extra=E)

    def _check_extra(self, extra: Any, n: int, *, fitted: bool = False) -> np.ndarray | None:
        if extra is None:
            if fitted and getattr(self, "n_extra_", 0):
                raise ConfigError(f"this combiner was fitted with {self.n_extra_} extra feature(s); pass extra=")
            return None
        if not self.accepts_extra:
            raise ConfigError(f"combiner {self.kind!r} cannot use extra (metadata) features; use 'stacking'")
        E = np.asarray(extra, dtype=np.float64)
        if E.ndim != 2 or E.shape[0] != n or not np.isfinite(E).all():
            raise ConfigError(f"extra must be finite features of shape ({n}, F), got shape {E.shape}; one-hot encode categories")
        if fitted and E.shape[1] != self.n_extra_:
            raise ConfigError(f"extra has {E.shape[1]} columns but the combiner was fitted on {self.n_extra_}")
        return E

    def torch_module(self):
        """This fitted combiner as a ``torch.nn.Module``: ``forward(X (N, M) float64[, E (N, F)]) -> (N,)``
        ensemble logits, the same numbers as :meth:`predict_logit`, in ops ``torch.onnx`` exports."""
        check_is_fitted(self)
        return self._torch_module()

    # subclass hooks
    def _fit(self, X: np.ndarray, y: np.ndarray, E: np.ndarray | None) -> None:
        pass

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _torch_module(self):
        raise ConfigError(f"combiner {self.kind!r} cannot be exported to ONNX; rebuild the ensemble with "
                          f"one of {', '.join(k for k in list_combiners() if k != self.kind)}")


def _torch_combiner(kind: str, weights: np.ndarray | None = None, intercept: float = 0.0):
    """The torch form of the combiners: ``logit_of_mean_prob`` (mean_prob, greedy), ``linear`` (mean_logit,
    weighted, stacking: ``[X, E] @ weights + intercept``)."""
    import torch

    class TorchCombiner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = np.asarray(weights, dtype=np.float64)
            if kind == "logit_of_mean_prob":  # zero weights dropped, as _logit_of_mean_prob does
                self.register_buffer("keep", torch.tensor(np.flatnonzero(w > 0), dtype=torch.int64))
                w = w[w > 0]
                self.register_buffer("log_w", torch.tensor(np.log(w), dtype=torch.float64))
            else:
                self.register_buffer("w", torch.tensor(w, dtype=torch.float64))

        def forward(self, X, E=None):
            if kind == "logit_of_mean_prob":
                Xk = X.index_select(1, self.keep)
                log_w = self.log_w
                return (torch.logsumexp(torch.nn.functional.logsigmoid(Xk) + log_w, dim=1)
                        - torch.logsumexp(torch.nn.functional.logsigmoid(-Xk) + log_w, dim=1))
            Z = X if E is None else torch.cat([X, E], dim=1)
            return Z @ self.w + intercept

    return TorchCombiner()


@register("mean_prob")
class MeanProb(Combiner):
    """``logit(mean_j sigmoid(x_j))``: the classic probability-averaging ensemble. No parameters."""

    uses_labels = False

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        return _logit_of_mean_prob(X, np.full(X.shape[1], 1.0 / X.shape[1]))

    def _torch_module(self):
        return _torch_combiner("logit_of_mean_prob", np.full(self.n_members_, 1.0 / self.n_members_))


@register("mean_logit")
class MeanLogit(Combiner):
    """``mean_j x_j``: geometric mean of odds; less swayed by one over-confident member. No parameters."""

    uses_labels = False

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        return X.mean(axis=1)

    def _torch_module(self):
        return _torch_combiner("linear", np.full(self.n_members_, 1.0 / self.n_members_))


@register("weighted")
class WeightedMean(Combiner):
    """``sum_j w_j x_j`` with ``w >= 0``, ``sum w = 1``: given, or fitted by minimising log-loss.

    Fitting parametrises ``w = softmax(theta)`` (so the constraints hold by construction) and
    minimises the mean log-loss of ``a * (X @ w) + b`` with L-BFGS. The scale ``a > 0`` and bias ``b``
    are nuisance parameters that are *not* applied to the output: members trained with weighted BCE
    are shifted and over-confident, and fixing that is the calibrator's job, so the weights should
    reflect how well members rank, not how well their raw probabilities happen to be calibrated.

    Parameters:
        weights: shape (M,) non-negative, normalised to sum 1; None = fit them on validation.
        max_iter: L-BFGS iterations when fitting.

    Fitted state: ``weights_`` (M,).
    """

    state_fields = {**Combiner.state_fields, "weights": float_array}

    def __init__(self, *, weights: Any = None, max_iter: int = 500) -> None:
        self.weights = weights
        self.max_iter = max_iter

    @property
    def uses_labels(self) -> bool:  # type: ignore[override]
        return self.weights is None

    def _fit(self, X: np.ndarray, y: np.ndarray, E: np.ndarray | None) -> None:
        m = X.shape[1]
        if self.weights is not None:
            self.weights_ = _check_weights(self.weights, m)
            return
        max_iter = check_int("max_iter", self.max_iter, 1)
        yf = y.astype(np.float64)

        def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
            theta, log_a, b = params[:m], params[m], params[m + 1]
            w, a = softmax(theta), math.exp(log_a)
            s = X @ w
            u = a * s + b
            r = (expit(u) - yf) / X.shape[0]  # d mean-loss / d u
            g_w = a * (X.T @ r)
            grad = np.concatenate([w * (g_w - w @ g_w), [a * (r @ s), r.sum()]])  # softmax Jacobian
            return float(np.mean(np.logaddexp(0.0, u) - yf * u)), grad

        # Start from equal weights, unit scale, zero bias: a deterministic, symmetric start.
        res = minimize(loss, np.zeros(m + 2), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
        self.weights_ = softmax(res.x[:m])

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        return X @ self.weights_

    def _torch_module(self):
        return _torch_combiner("linear", self.weights_)

    def _check_state(self) -> None:
        _check_weights(self.weights_, self.n_members_)  # validation only: loaded weights stay bit-exact


@register("stacking")
class Stacking(Combiner):
    """Logistic regression on member logits (and optional extra features such as age, sex, site).

    Columns are standardised before the L2-penalised fit (scikit-learn ``StandardScaler`` +
    ``LogisticRegression``) so that ``C`` means the same for logits and for age in years; the
    scaling is then folded into the coefficients, so prediction is one dot product in raw units.
    The output is the regression's logit, ``[X, extra] @ coef_ + intercept_``.

    Extra columns holding only 0 and 1 (one-hot sex / site, missing indicators) are left unscaled.
    Standardising a rare indicator divides it by its small standard deviation (a site seen in 8 of
    1,500 validation images: by ~0.07), which weakens its penalty ~200-fold, so a handful of images
    with no melanoma set a logit offset of -4 for every future lesion at that site (seen on HAM10000).
    Penalised in raw units, an indicator is shrunk the more the rarer it is.

    Parameters:
        C: inverse L2 strength (smaller = stronger shrinkage toward equal-nothing weights).
        max_iter: lbfgs iterations.

    Fitted state: ``coef_`` (M + F,), member columns first, then extra; ``intercept_``; ``n_extra_``.
    """

    accepts_extra = True
    state_fields = {**Combiner.state_fields, "coef": float_array, "intercept": float, "n_extra": int}

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000) -> None:
        self.C = C
        self.max_iter = max_iter

    def _fit(self, X: np.ndarray, y: np.ndarray, E: np.ndarray | None) -> None:
        C = check_positive("C", self.C, "e.g. 1.0; smaller values regularise more")
        max_iter = check_int("max_iter", self.max_iter, 1)
        Z = X if E is None else np.hstack([X, E])
        scaled = np.ones(Z.shape[1], dtype=bool)
        if E is not None:
            scaled[X.shape[1]:] = ~np.all((E == 0) | (E == 1), axis=0)  # 0/1 indicators: raw units (see above)
        mean, scale = np.zeros(Z.shape[1]), np.ones(Z.shape[1])
        scaler = StandardScaler().fit(Z[:, scaled])  # a constant column gets scale 1 (and so coefficient 0)
        mean[scaled], scale[scaled] = scaler.mean_, scaler.scale_
        lr = LogisticRegression(C=C, max_iter=max_iter).fit((Z - mean) / scale, y)
        self.coef_ = lr.coef_[0] / scale
        self.intercept_ = float(lr.intercept_[0] - self.coef_ @ mean)
        self.n_extra_ = 0 if E is None else E.shape[1]

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        Z = X if E is None else np.hstack([X, E])
        return Z @ self.coef_ + self.intercept_

    def _torch_module(self):
        return _torch_combiner("linear", self.coef_, self.intercept_)

    def _check_state(self) -> None:
        if self.coef_.shape != (self.n_members_ + self.n_extra_,):
            raise ConfigError("stacking combiner dict: coef needs n_members + n_extra entries")


@register("greedy")
class GreedyEnsemble(Combiner):
    """Caruana-style selected ensemble: ``logit(sum_j w_j sigmoid(x_j))``, ``w`` from
    :func:`greedy_selection` (members never picked get weight 0).

    Parameters: ``metric``, ``n_iter``, ``top_n``, ``with_replacement`` as in :func:`greedy_selection`.

    Fitted state: ``weights_`` (M,). ``selection_`` (the :class:`GreedyResult`) is kept after
    ``fit`` for inspection but is not part of ``to_dict``.
    """

    state_fields = WeightedMean.state_fields  # weights_, checked the same way on loading
    _check_state = WeightedMean._check_state

    def __init__(
        self,
        *,
        metric: Literal["auc", "ap"] = "auc",
        n_iter: int = 50,
        top_n: int | None = None,
        with_replacement: bool = True,
    ) -> None:
        self.metric = metric
        self.n_iter = n_iter
        self.top_n = top_n
        self.with_replacement = with_replacement

    def _fit(self, X: np.ndarray, y: np.ndarray, E: np.ndarray | None) -> None:
        self.selection_ = greedy_selection(X, y, metric=self.metric, n_iter=self.n_iter, top_n=self.top_n,
                                           with_replacement=self.with_replacement)
        self.weights_ = self.selection_.weights

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        return _logit_of_mean_prob(X, self.weights_)

    def _torch_module(self):
        return _torch_combiner("logit_of_mean_prob", self.weights_)


@register("greedy_meta")
class GreedyMeta(GreedyEnsemble):
    """Greedy selection, then patient metadata: ``[g, extra] @ coef_ + intercept_`` with ``g`` the
    :class:`GreedyEnsemble` logit.

    Caruana selection weighs the members (robust with many correlated members, where a stacker's
    member weights are noisy); a :class:`Stacking` regression on two blocks -- the one greedy logit and
    the metadata columns -- then learns how much age, sex and site add. In ``fit_crossfit`` both steps
    are re-run in every fold, so the out-of-fold scores include the selection's and the regression's
    overfitting. Without ``extra`` the regression is fitted on ``g`` alone.

    Parameters: those of :class:`GreedyEnsemble`, and ``C`` of :class:`Stacking`.

    Fitted state: ``weights_`` (M,), ``coef_`` (1 + F,), ``intercept_``, ``n_extra_``.
    """

    accepts_extra = True
    state_fields = {**GreedyEnsemble.state_fields, "coef": float_array, "intercept": float, "n_extra": int}

    def __init__(self, *, metric: Literal["auc", "ap"] = "auc", n_iter: int = 50, top_n: int | None = None,
                 with_replacement: bool = True, C: float = 1.0) -> None:
        super().__init__(metric=metric, n_iter=n_iter, top_n=top_n, with_replacement=with_replacement)
        self.C = C

    def _fit(self, X: np.ndarray, y: np.ndarray, E: np.ndarray | None) -> None:
        super()._fit(X, y, E)
        g = super()._predict(X, None)[:, None]
        stack = Stacking(C=self.C).fit(g, y, extra=E)
        self.coef_, self.intercept_, self.n_extra_ = stack.coef_, stack.intercept_, stack.n_extra_

    def _predict(self, X: np.ndarray, E: np.ndarray | None) -> np.ndarray:
        g = super()._predict(X, None)[:, None]
        return (g if E is None else np.hstack([g, E])) @ self.coef_ + self.intercept_

    def _torch_module(self):
        import torch

        greedy, linear = _torch_combiner("logit_of_mean_prob", self.weights_), _torch_combiner("linear", self.coef_, self.intercept_)

        class TorchGreedyMeta(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.greedy, self.linear = greedy, linear

            def forward(self, X, E=None):
                return self.linear(self.greedy(X).unsqueeze(1), E)

        return TorchGreedyMeta()

    def _check_state(self) -> None:
        GreedyEnsemble._check_state(self)
        if self.coef_.shape != (1 + self.n_extra_,):
            raise ConfigError("greedy_meta combiner dict: coef needs 1 + n_extra entries")


def list_combiners() -> list[str]:
    """Sorted names accepted by :func:`make_combiner`."""
    return estimator_names("combiner")


def make_combiner(name: str, **kwargs: Any) -> Combiner:
    """Build combiner ``name`` (see the module table); keyword arguments set to None keep the default."""
    return make("combiner", name, **kwargs)
