"""Calibrators (ensemble logits -> melanoma probabilities) and the operating-point threshold.

Weighted BCE with ``pos_weight`` w (8 in the reference study) shifts a model's logits by about ln(w)
and fine-tuning makes them over-confident, so raw ``sigmoid(logit)`` overstates melanoma risk.
A calibrator is fitted on **validation** logits and labels and applied unchanged to test and to
deployment::

    cal = make_calibrator("temperature", pos_weight=8).fit(val_logits, val_y)     # (N,), (N,)
    prob = cal.predict_proba(test_logits)                                         # (N,) in [0, 1]
    cal = make_calibrator("isotonic")
    oof = cal.fit_crossfit(val_logits, val_y, lesion_ids)  # (N,) honest; cal ends fitted on all rows
    thr = choose_threshold(val_y, oof, target_sensitivity=0.95)
    json.dumps(cal.to_dict())                           # the bundle stores this, never a pickle

Calibrators follow the scikit-learn estimator contract (keyword-only parameters, validation in
``fit``, fitted state in ``attr_``, ``check_is_fitted`` before predicting, ``clone``-able), with
one deliberate difference: ``predict_proba`` returns the melanoma probability with shape ``(N,)``,
not scikit-learn's ``(N, 2)``, because every consumer here wants the positive class only.

Cross-fitting (:func:`crossfit_folds`, shared with :mod:`skinsweep.ensemble.combiners`): when the rows a model
is fitted on are also the rows it is scored on (validation scores of a stacker or calibrator), each
row is scored by a model fitted on the other folds. Folds are grouped by lesion, so a lesion's other
images -- which carry the same label -- never sit on the fitting side while it is scored.
"""

from __future__ import annotations

import difflib
import math
import warnings
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, clone
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from skinsweep.errors import ConfigError, short_list
from skinsweep.metrics import _check_fraction, _check_inputs, threshold_for_sensitivity

__all__ = [
    "CALIBRATOR_FORMAT",
    "Calibrator",
    "FewPositivesWarning",
    "IsotonicCalibration",
    "NoCalibration",
    "PlattScaling",
    "TemperatureScaling",
    "calibrator_from_dict",
    "choose_threshold",
    "crossfit_folds",
    "list_calibrators",
    "make_calibrator",
]

# Written into every to_dict(); from_dict() refuses anything else, so a bundle from an incompatible
# version fails loudly instead of predicting garbage.
CALIBRATOR_FORMAT = "skinsweep.calibrator/1"


class FewPositivesWarning(UserWarning):
    """A calibrator was fitted on too few melanomas for its probabilities to be trusted."""


# ----------------------------------------------------------------------------- input validation
# Shared with skinsweep.ensemble.combiners (same package), so both modules word their errors the same way.


def check_logits(logits: Any, *, name: str = "logits") -> np.ndarray:
    """``logits`` as a finite float64 array of shape (N,), N >= 1, or a one-line ConfigError."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 1:
        raise ConfigError(f"{name} must be 1-D with shape (N,), got shape {z.shape}; flatten it first")
    if z.shape[0] == 0:
        raise ConfigError(f"{name} is empty; pass at least one image's logit")
    if not np.isfinite(z).all():
        raise ConfigError(f"{name} contains {int((~np.isfinite(z)).sum())} NaN/inf value(s); check the model outputs")
    return z


def check_labels(y: Any, n: int | None, *, both_classes: bool = True, name: str = "y") -> np.ndarray:
    """``y`` as int64 of shape (n,) (any N >= 1 if n is None) with values in {0, 1};
    ``both_classes`` demands 0 and 1."""
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] == 0 or (n is not None and arr.shape[0] != n):
        want = "(N,)" if n is None else f"({n},)"
        raise ConfigError(f"{name} must have shape {want} (one label per image), got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5].tolist()
        raise ConfigError(f"{name} must contain only 0 and 1 (1 = melanoma), found {bad}")
    arr = arr.astype(np.int64)
    if both_classes and arr.min() == arr.max():
        raise ConfigError(
            f"{name} holds only class {int(arr[0])}; fitting needs melanoma (1) and non-melanoma (0) images"
        )
    return arr


def check_groups(groups: Any, n: int) -> np.ndarray | None:
    """Lesion ids of shape (n,) (any hashable dtype), or None when lesions are unknown."""
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ConfigError(f"groups must have shape ({n},) (one lesion id per image), got shape {g.shape}")
    if pd.isna(g).any():
        raise ConfigError(
            f"groups has {int(pd.isna(g).sum())} missing lesion id(s); use the image id for images "
            "without a lesion id so each forms its own group"
        )
    return g


def _check_n_splits(n_splits: Any) -> int:
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise ConfigError(f"n_splits must be an integer >= 2, got {n_splits!r}")
    return int(n_splits)


def _positive_float(name: str, value: Any, hint: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}; {hint}")
    return v


# ----------------------------------------------------------------------------- cross-fitting


def crossfit_folds(
    y: Any, groups: Any, *, n_splits: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds for out-of-fold scoring, grouped by lesion.

    Every row is in exactly one scoring fold; no group (lesion) is on both sides of a split; every
    fitting side holds both classes. ``groups=None`` treats each image as its own lesion -- only
    correct when each lesion has one image.

    Args:
        y: shape (N,), labels in {0, 1}.
        groups: shape (N,), lesion id per image, or None.
        n_splits: number of folds (>= 2).
        seed: shuffles the assignment of groups to folds.

    Returns:
        ``n_splits`` pairs ``(fit_idx, score_idx)`` of int index arrays.
    """
    n_splits = _check_n_splits(n_splits)
    y = check_labels(y, None)
    g = check_groups(groups, y.shape[0])
    units = np.arange(y.shape[0]) if g is None else g
    # Refuse up front, with the fix, what would otherwise fail inside scikit-learn or a fold: every
    # fitting side needs both classes (so >= 2 lesions of each), and n_splits non-empty folds need
    # enough lesions. With fewer melanoma lesions than folds some scoring folds hold no melanoma
    # (scikit-learn warns); each row is still scored out of fold, so that is allowed.
    n_pos_units = len(pd.unique(units[y == 1]))
    n_neg_units = len(pd.unique(units[y == 0]))
    what = "images" if g is None else "lesions"
    if min(n_pos_units, n_neg_units) < 2:
        raise ConfigError(
            f"cross-fitting needs at least 2 melanoma and 2 non-melanoma {what}, found {n_pos_units} and "
            f"{n_neg_units}; fit without cross-fitting (fit) or use a larger validation split"
        )
    if max(n_pos_units, n_neg_units) < n_splits:
        raise ConfigError(
            f"n_splits={n_splits} needs at least {n_splits} {what} of one class, found {n_pos_units} "
            f"melanoma and {n_neg_units} non-melanoma {what}; lower n_splits"
        )
    if g is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(y.shape[0]), y))
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = list(splitter.split(np.zeros(y.shape[0]), y, g))
    for fit_idx, _ in folds:  # mixed-label lesions can still starve a side; say so clearly
        if y[fit_idx].min() == y[fit_idx].max():
            raise ConfigError(f"a cross-fitting fold has only one class; lower n_splits (now {n_splits})")
    return folds


# ----------------------------------------------------------------------------- registry + JSON

_E = TypeVar("_E")


def _lookup(registry: dict[str, type], name: Any, what: str, factory: str) -> type:
    if isinstance(name, str) and name in registry:
        return registry[name]
    close = difflib.get_close_matches(str(name).lower(), list(registry), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ConfigError(f"unknown {what} {name!r}; {hint}valid names are {short_list(sorted(registry), 20)} ({factory})")


def _construct(cls: type[_E], kwargs: dict[str, Any], what: str) -> _E:
    """``cls(**kwargs)``, turning an unknown keyword into a ConfigError that lists the valid ones."""
    valid = sorted(cls._get_param_names())  # type: ignore[attr-defined]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"{what} {cls.kind!r} has no parameter {', '.join(map(repr, unknown))}; "  # type: ignore[attr-defined]
            f"valid parameters are {', '.join(valid) or '(none)'}"
        )
    return cls(**kwargs)


def _jsonable(value: Any) -> Any:
    """Plain Python scalars / lists for json.dumps; float64 -> float keeps the value exactly."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _state_field(state: dict[str, Any], key: str, what: str) -> Any:
    try:
        return state[key]
    except (KeyError, TypeError):
        raise ConfigError(f"{what} dict has no state field {key!r}; load only dicts written by to_dict()") from None


def _from_dict(registry: dict[str, type], fmt: str, d: Any, what: str, factory: str) -> Any:
    """Shared body of ``Calibrator.from_dict`` / ``Combiner.from_dict``."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"not a {what} dict: expected format {fmt!r}, found {found!r}; pass the output of to_dict()")
    cls = _lookup(registry, d.get("kind"), what, factory)
    obj = _construct(cls, dict(d.get("params", {})), what)
    obj._set_state(d.get("state", {}))
    return obj


# ----------------------------------------------------------------------------- calibrators

CALIBRATORS: dict[str, type[Calibrator]] = {}


def _registrar(registry: dict[str, type], what: str, name: str):
    """Class decorator adding a class to ``registry`` under ``name`` (shared with skinsweep.ensemble.combiners)."""

    def decorator(cls: type) -> type:
        if name in registry:
            raise ValueError(f"{what} {name!r} is already registered")
        cls.kind = name
        registry[name] = cls
        return cls

    return decorator


def register_calibrator(name: str):
    """Class decorator adding a Calibrator subclass to the registry under ``name``."""
    return _registrar(CALIBRATORS, "calibrator", name)


class Calibrator(BaseEstimator):
    """Base class: ``fit(logits, y)``, ``predict_proba(logits)``, ``fit_crossfit``, ``to_dict``.

    Subclasses implement ``_fit(z, y)`` (set ``attr_`` state), ``_predict(z)``, ``_state()`` and
    ``_set_state(state)``; validation, cross-fitting and (de)serialisation live here.
    """

    kind: ClassVar[str] = ""
    uses_labels: ClassVar[bool] = True  # False: out-of-fold = in-sample, one class is fine

    def fit(self, logits: Any, y: Any) -> Calibrator:
        """Fit on validation ``logits`` (N,) and labels ``y`` (N,) in {0, 1}; returns self."""
        z = check_logits(logits)
        self._fit(z, check_labels(y, z.shape[0], both_classes=self.uses_labels))
        return self

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated melanoma probability, shape (N,), for ``logits`` of shape (N,)."""
        check_is_fitted(self)
        return self._predict(check_logits(logits))

    def fit_crossfit(
        self, logits: Any, y: Any, groups: Any, *, n_splits: int = 5, seed: int = 0
    ) -> np.ndarray:
        """Out-of-fold probabilities for the fitting rows; this calibrator ends fitted on all rows.

        Use the out-of-fold probabilities (never in-sample ones) wherever the same validation rows
        are also reported or used to pick a threshold: an isotonic fit scores its own rows far
        better than new ones.

        Args:
            logits: shape (N,), validation logits.
            y: shape (N,), labels in {0, 1}.
            groups: shape (N,), lesion id per image, or None (each image its own lesion).
            n_splits, seed: see :func:`crossfit_folds`.

        Returns:
            Shape (N,) probabilities, each from a calibrator that never saw that row's lesion.
            Afterwards ``self`` is fitted on all N rows, for test and deployment (like ``fit``).
        """
        z = check_logits(logits)
        y = check_labels(y, z.shape[0], both_classes=self.uses_labels)
        if not self.uses_labels:  # nothing learnt from labels, so nothing to hold out
            check_groups(groups, z.shape[0])
            return self.fit(z, y).predict_proba(z)
        oof = np.empty(z.shape[0], dtype=np.float64)
        for fit_idx, score_idx in crossfit_folds(y, groups, n_splits=n_splits, seed=seed):
            oof[score_idx] = clone(self).fit(z[fit_idx], y[fit_idx]).predict_proba(z[score_idx])
        self.fit(z, y)
        return oof

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"format", "kind", "params", "state"}``; see each class for its state."""
        check_is_fitted(self)
        return {
            "format": CALIBRATOR_FORMAT,
            "kind": self.kind,
            "params": {k: _jsonable(v) for k, v in self.get_params().items()},
            "state": {k: _jsonable(v) for k, v in self._state().items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`to_dict` output (predicts identically)."""
        obj = _from_dict(CALIBRATORS, CALIBRATOR_FORMAT, d, "calibrator", "list_calibrators()")
        if cls is not Calibrator and not isinstance(obj, cls):
            raise ConfigError(f"dict holds a {obj.kind!r} calibrator, not {cls.kind!r}; use calibrator_from_dict()")
        return obj

    # subclass hooks
    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        pass


@register_calibrator("none")
class NoCalibration(Calibrator):
    """``sigmoid(logit)`` unchanged: the baseline every calibrator is compared with. Stateless."""

    uses_labels = False

    def __sklearn_is_fitted__(self) -> bool:  # nothing to fit, usable straight away
        return True

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        pass

    def _predict(self, z: np.ndarray) -> np.ndarray:
        return expit(z)


@register_calibrator("temperature")
class TemperatureScaling(Calibrator):
    """``p = sigmoid((logit - shift) / T)`` with ``T > 0``, fitted by minimising the NLL.

    Classic temperature scaling has no shift, but weighted BCE with ``pos_weight`` w moves logits by
    about ln(w) on top of any over-confidence, so a temperature alone cannot fix both. The shift is
    fitted (``fit_shift=True``; it starts at ln(pos_weight), which only speeds convergence since the
    problem is convex in ``(1/T, -shift/T)``) or fixed at ln(pos_weight) (``fit_shift=False``; 0 when
    ``pos_weight`` is None), which keeps the single-parameter character of temperature scaling.
    Unlike :class:`PlattScaling` the slope 1/T cannot turn negative.

    Parameters:
        pos_weight: the BCE positive weight the members were trained with (None: unknown).
        fit_shift: fit the logit shift (True) or fix it at ln(pos_weight).

    Fitted state: ``temperature_`` (T), ``shift_`` (in logit units).
    """

    def __init__(self, *, pos_weight: float | None = None, fit_shift: bool = True) -> None:
        self.pos_weight = pos_weight
        self.fit_shift = fit_shift

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        shift0 = 0.0
        if self.pos_weight is not None:
            hint = "pass the positive weight of the training BCE (e.g. 8), or None"
            shift0 = math.log(_positive_float("pos_weight", self.pos_weight, hint))
        yf = y.astype(np.float64)

        # Optimise u = s*z + b with s = 1/T, b = -shift/T: the mean NLL is convex in (s, b).
        def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
            s = theta[0]
            b = theta[1] if self.fit_shift else -shift0 * s
            u = s * z + b
            loss = float(np.mean(np.logaddexp(0.0, u) - yf * u))
            r = expit(u) - yf  # d loss / d u, per row
            if self.fit_shift:
                return loss, np.array([np.mean(r * z), np.mean(r)])
            return loss, np.array([np.mean(r * (z - shift0))])

        x0 = np.array([1.0, -shift0]) if self.fit_shift else np.array([1.0])
        bounds = [(1e-8, None), (None, None)][: x0.size]  # s > 0 is what makes it a temperature
        res = minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
        s = float(res.x[0])
        self.temperature_ = 1.0 / s
        self.shift_ = -float(res.x[1]) / s if self.fit_shift else shift0

    def _predict(self, z: np.ndarray) -> np.ndarray:
        return expit((z - self.shift_) / self.temperature_)

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature_, "shift": self.shift_}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.temperature_ = float(_state_field(state, "temperature", "calibrator"))
        self.shift_ = float(_state_field(state, "shift", "calibrator"))


@register_calibrator("platt")
class PlattScaling(Calibrator):
    """``p = sigmoid(slope * logit + intercept)``, scikit-learn ``LogisticRegression`` on the logit.

    Parameters:
        C: inverse L2 strength; the default 1e6 makes it effectively unpenalised (Platt's method)
           while staying finite, so the parameters round-trip through strict JSON.
        max_iter: lbfgs iterations.

    Fitted state: ``slope_``, ``intercept_``.
    """

    def __init__(self, *, C: float = 1e6, max_iter: int = 1000) -> None:
        self.C = C
        self.max_iter = max_iter

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        C = _positive_float("C", self.C, "use a large value such as 1e6 for an unpenalised fit")
        lr = LogisticRegression(C=C, max_iter=int(self.max_iter)).fit(z[:, None], y)
        self.slope_ = float(lr.coef_[0, 0])
        self.intercept_ = float(lr.intercept_[0])

    def _predict(self, z: np.ndarray) -> np.ndarray:
        return expit(self.slope_ * z + self.intercept_)

    def _state(self) -> dict[str, Any]:
        return {"slope": self.slope_, "intercept": self.intercept_}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.slope_ = float(_state_field(state, "slope", "calibrator"))
        self.intercept_ = float(_state_field(state, "intercept", "calibrator"))


@register_calibrator("isotonic")
class IsotonicCalibration(Calibrator):
    """Monotone step map of ``sigmoid(logit)``: scikit-learn ``IsotonicRegression`` (clipped).

    Non-parametric, so it fixes any monotone miscalibration, but it needs many melanomas: with few
    positives its steps are noise, and it produces ties (many images share one probability), which
    makes thresholds coarse. Fitting warns (:class:`FewPositivesWarning`) below ``min_positives``.
    Inputs outside the fitted range get the end values (``out_of_bounds="clip"``).

    Parameters:
        min_positives: warn when fitted with fewer melanomas than this.

    Fitted state: ``X_thresholds_``, ``y_thresholds_`` (the knots, in probability units);
    prediction is linear interpolation between them (``np.interp``, the same as
    ``IsotonicRegression.predict``), so a dict-loaded calibrator predicts exactly like the fitted one.
    """

    def __init__(self, *, min_positives: int = 50) -> None:
        self.min_positives = min_positives

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        n_pos = int(y.sum())
        if n_pos < self.min_positives:
            warnings.warn(
                FewPositivesWarning(
                    f"isotonic calibration fitted on {n_pos} melanoma images (< min_positives="
                    f"{self.min_positives}); its probabilities are unreliable, prefer 'temperature' or 'platt'"
                ),
                stacklevel=3,
            )
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(expit(z), y.astype(np.float64))
        self.X_thresholds_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=np.float64)

    def _predict(self, z: np.ndarray) -> np.ndarray:
        return np.interp(expit(z), self.X_thresholds_, self.y_thresholds_)

    def _state(self) -> dict[str, Any]:
        return {"X_thresholds": self.X_thresholds_, "y_thresholds": self.y_thresholds_}

    def _set_state(self, state: dict[str, Any]) -> None:
        x = np.asarray(_state_field(state, "X_thresholds", "calibrator"), dtype=np.float64)
        y = np.asarray(_state_field(state, "y_thresholds", "calibrator"), dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0 or np.any(np.diff(x) < 0):
            raise ConfigError("isotonic calibrator dict needs equal-length, increasing X_thresholds / y_thresholds")
        self.X_thresholds_, self.y_thresholds_ = x, y


def list_calibrators() -> list[str]:
    """Sorted names accepted by :func:`make_calibrator`."""
    return sorted(CALIBRATORS)


def make_calibrator(name: str, **kwargs: Any) -> Calibrator:
    """Build calibrator ``name`` ("none", "temperature", "platt", "isotonic"); None kwargs = default."""
    cls = _lookup(CALIBRATORS, name, "calibrator", "list_calibrators()")
    return _construct(cls, {k: v for k, v in kwargs.items() if v is not None}, "calibrator")


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    """Rebuild any calibrator from its :meth:`Calibrator.to_dict` output."""
    return Calibrator.from_dict(d)


# ----------------------------------------------------------------------------- operating point


def choose_threshold(
    y_val: Any,
    prob_val: Any,
    *,
    target_sensitivity: float | None = None,
    target_specificity: float | None = None,
    youden: bool = False,
) -> float:
    """Pick the decision threshold on validation probabilities; ``prob >= thr`` means melanoma.

    Exactly one criterion:

    * ``target_sensitivity``: the highest threshold whose sensitivity is >= the target
      (:func:`skinsweep.metrics.threshold_for_sensitivity`), i.e. the best specificity meeting it;
    * ``target_specificity``: the lowest threshold whose specificity is >= the target, i.e. the
      best sensitivity meeting it. If no image can be called positive without breaking the target,
      the threshold lies just above the highest probability (nothing is positive);
    * ``youden=True``: the threshold maximising ``tpr - fpr`` (ties: the highest such threshold).

    Use out-of-fold probabilities when the calibrator or stacker was fitted on these same rows.

    Args:
        y_val: shape (N,), labels in {0, 1}; needs both classes.
        prob_val: shape (N,), melanoma probabilities in [0, 1].

    Returns:
        The threshold, a float in [0, 1] (one of the ``prob_val`` values, except as noted above).
    """
    if not isinstance(youden, (bool, np.bool_)):
        raise ConfigError(f"youden must be True or False, got {youden!r}")
    given = {
        "target_sensitivity": target_sensitivity,
        "target_specificity": target_specificity,
        "youden": youden if youden else None,
    }
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise ConfigError(
            "choose_threshold needs exactly one of target_sensitivity, target_specificity, youden=True; "
            f"got {', '.join(chosen) if chosen else 'none'}"
        )
    if target_sensitivity is not None:
        return threshold_for_sensitivity(y_val, prob_val, _check_fraction("target_sensitivity", target_sensitivity,
                                                                            allow_zero=False))
    y, p = _check_inputs(y_val, prob_val)
    if target_specificity is not None:
        target = _check_fraction("target_specificity", target_specificity, allow_zero=False)
    if not 0 < int(y.sum()) < y.shape[0]:
        raise ConfigError("choose_threshold needs both melanoma (1) and non-melanoma (0) images in y_val")
    # drop_intermediate=False keeps every distinct probability as a candidate threshold.
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    if youden:
        # thr[0] is +inf (nothing positive, J = 0); argmax takes the first, i.e. highest, maximiser.
        return float(thr[1 + int(np.argmax((tpr - fpr)[1:]))])
    # fpr rises along the curve, so qualifying points form a prefix; its end is the lowest threshold.
    # The slack keeps e.g. 0.9 with 10 negatives from failing on 1 - 0.9 = 0.09999999999999998.
    idx = int(np.flatnonzero(fpr <= (1.0 - target) + 1e-12)[-1])
    if idx > 0:
        return float(thr[idx])
    top = float(p.max())
    if top >= 1.0:
        raise ConfigError(
            f"no threshold in [0, 1] reaches target_specificity={target}: a non-melanoma image has "
            "probability 1.0; lower target_specificity"
        )
    return float(np.nextafter(top, np.inf))
