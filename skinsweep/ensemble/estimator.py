"""The one estimator contract of the ensemble stage: calibrators, combiners and the metadata encoder.

Every fitted piece of an ensemble is a :class:`SkinsweepEstimator` (scikit-learn style):

* ``__init__`` only stores keyword parameters (so ``get_params`` / ``clone`` work); ``fit`` validates
  them and sets the fitted state in trailing-underscore attributes (``temperature_``, ``weights_``);
* the fitted state named in ``state_fields`` round-trips through one JSON format,
  ``{"format": "skinsweep.<family>/<version>", "kind", "params", "state"}`` (:meth:`~SkinsweepEstimator.to_dict` /
  :meth:`~SkinsweepEstimator.from_dict`), so a bundle stores JSON, never a pickle; the one hook
  ``_check_state`` validates a loaded state;
* classes register under ``(family, kind)`` (:func:`register`) and are built by name with one-line
  errors that list the valid names and parameters (:func:`make`);
* :func:`crossfit_predict` gives out-of-fold predictions (stratified folds grouped by lesion,
  :func:`crossfit_folds`), in the spirit of scikit-learn's ``cross_val_predict``.

Input checks shared by all of them (:func:`check_logits`, :func:`check_labels`, :func:`check_groups`)
live here too, so every module words its errors the same way.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from skinsweep.errors import ConfigError, did_you_mean, short_list
from skinsweep.files import json_safe

__all__ = ["REGISTRY", "UPGRADES", "SkinsweepEstimator", "check_groups", "check_int", "check_labels",
           "check_logits", "check_positive", "crossfit_folds", "crossfit_predict", "estimator_names",
           "float_array", "make", "register"]

# ----------------------------------------------------------------------------- input validation


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


def check_int(name: str, value: Any, low: int, hint: str = "") -> int:
    """``value`` as an int >= ``low`` (bools refused), or a one-line ConfigError ending in ``hint``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}{'; ' + hint if hint else ''}")
    return int(value)


def check_positive(name: str, value: Any, hint: str) -> float:
    """``value`` as a finite float > 0, or a one-line ConfigError ending in ``hint``."""
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
    n_splits = check_int("n_splits", n_splits, 2)
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
    splitter = StratifiedKFold if g is None else StratifiedGroupKFold  # StratifiedKFold ignores groups
    folds = list(splitter(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(y.shape[0]), y, g))
    for fit_idx, _ in folds:  # mixed-label lesions can still starve a side; say so clearly
        if y[fit_idx].min() == y[fit_idx].max():
            raise ConfigError(f"a cross-fitting fold has only one class; lower n_splits (now {n_splits})")
    return folds


def crossfit_predict(estimator: SkinsweepEstimator, X: np.ndarray, y: np.ndarray, groups: Any, *, method: str,
                     n_splits: int = 5, seed: int = 0, **row_params: np.ndarray | None) -> np.ndarray:
    """Out-of-fold ``estimator.<method>`` for the fitting rows; ``estimator`` ends fitted on all rows.

    Like scikit-learn's ``cross_val_predict``, each row is predicted by a clone fitted on the other
    folds (:func:`crossfit_folds`: stratified, grouped by lesion, so neither the row's own label nor
    its lesion's is used to score it). An estimator that learns nothing from labels
    (``uses_labels`` False) has nothing to hold out: its in-sample predictions are returned.

    Args:
        estimator: an unfitted or fitted estimator; refitted on all rows before returning.
        X: shape (N, ...), validated inputs; y: shape (N,), validated labels.
        groups: shape (N,), lesion id per image, or None (each image its own lesion).
        method: the prediction method, e.g. "predict_proba" or "predict_logit".
        n_splits, seed: see :func:`crossfit_folds`.
        row_params: per-row keyword arrays (shape (N, ...) or None) passed to ``fit`` and ``method``,
            sliced with the rows (e.g. ``extra=`` metadata features).

    Returns:
        Shape (N,) float64 predictions, each from a model that never saw that row's lesion.
    """
    def rows(idx: np.ndarray | slice) -> dict[str, Any]:
        return {k: None if v is None else v[idx] for k, v in row_params.items()}

    if not estimator.uses_labels:
        check_groups(groups, X.shape[0])
        oof = getattr(estimator.fit(X, y, **row_params), method)(X, **row_params)
        return np.asarray(oof, dtype=np.float64)
    oof = np.empty(X.shape[0], dtype=np.float64)
    for fit_idx, score_idx in crossfit_folds(y, groups, n_splits=n_splits, seed=seed):
        model = clone(estimator).fit(X[fit_idx], y[fit_idx], **rows(fit_idx))
        oof[score_idx] = getattr(model, method)(X[score_idx], **rows(score_idx))
    estimator.fit(X, y, **row_params)
    return oof


# ----------------------------------------------------------------------------- registry

REGISTRY: dict[tuple[str, str], type[SkinsweepEstimator]] = {}


def register(kind: str):
    """Class decorator: register a :class:`SkinsweepEstimator` subclass as ``(cls.family, kind)``."""

    def decorator(cls: type[SkinsweepEstimator]) -> type[SkinsweepEstimator]:
        if (cls.family, kind) in REGISTRY:
            raise ValueError(f"{cls.family} {kind!r} is already registered")
        cls.kind = kind
        REGISTRY[(cls.family, kind)] = cls
        return cls

    return decorator


def estimator_names(family: str) -> list[str]:
    """Sorted kinds registered in ``family`` ("calibrator", "combiner", "metadata")."""
    return sorted(kind for fam, kind in REGISTRY if fam == family)


def _lookup(family: str, kind: Any) -> type[SkinsweepEstimator]:
    if isinstance(kind, str) and (family, kind) in REGISTRY:
        return REGISTRY[(family, kind)]
    names = estimator_names(family)
    raise ConfigError(f"unknown {family} {kind!r}{did_you_mean(kind, names, cutoff=0.5, lower=True)}; "
                      f"valid names are {short_list(names, 20)}")


def _construct(cls: type[SkinsweepEstimator], params: dict[str, Any]) -> SkinsweepEstimator:
    """``cls(**params)``, turning an unknown keyword into a ConfigError that lists the valid ones."""
    valid = sorted(cls._get_param_names())
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"{cls.family} {cls.kind!r} has no parameter {', '.join(map(repr, unknown))}; "
                          f"valid parameters are {', '.join(valid) or '(none)'}")
    return cls(**params)


def make(family: str, kind: str, **params: Any) -> SkinsweepEstimator:
    """Build the ``family`` estimator registered as ``kind``; parameters set to None keep their default."""
    return _construct(_lookup(family, kind), {k: v for k, v in params.items() if v is not None})


# ----------------------------------------------------------------------------- base class + JSON


def float_array(value: Any) -> np.ndarray:
    """State converter: a float64 array (bit-exact from JSON floats)."""
    return np.asarray(value, dtype=np.float64)


# Loaders for JSON formats older than the current one: format string -> function returning the
# current form. Registered by the module that owns the format (see skinsweep.ensemble.metadata).
UPGRADES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class SkinsweepEstimator(BaseEstimator):
    """Base of every fitted ensemble piece: name registry, JSON round trip, labels-or-not flag.

    Subclasses set ``family`` (one per base class), ``version`` (bump when ``to_dict`` changes),
    ``state_fields`` (state key -> converter; the fitted attribute is ``<key>_``) and, when a loaded
    state needs checks or derived attributes, ``_check_state()``.
    """

    family: ClassVar[str] = ""
    version: ClassVar[int] = 1
    kind: ClassVar[str] = ""  # set by @register
    uses_labels: ClassVar[bool] = True  # False: fit learns nothing from labels (one class is fine)
    state_fields: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    @classmethod
    def json_format(cls) -> str:
        """``"skinsweep.<family>/<version>"``, written into and required by the JSON form."""
        return f"skinsweep.{cls.family}/{cls.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"format", "kind", "params", "state"}`` (floats exact); each class documents its state."""
        check_is_fitted(self)
        return json_safe({"format": self.json_format(), "kind": self.kind, "params": self.get_params(),
                          "state": {k: getattr(self, f"{k}_") for k in self.state_fields}})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkinsweepEstimator:
        """Rebuild a fitted estimator from :meth:`to_dict` output (it predicts identically).

        Called on a family base class (``Calibrator.from_dict``) it accepts any kind of that family;
        on a concrete class only that kind.
        """
        if isinstance(d, dict) and d.get("format") in UPGRADES:
            d = UPGRADES[d["format"]](d)
        fmt = cls.json_format()
        if not isinstance(d, dict) or d.get("format") != fmt:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"not a {cls.family} dict: expected format {fmt!r}, found {found!r}; "
                              "pass the output of to_dict()")
        obj = _construct(_lookup(cls.family, d.get("kind")), dict(d.get("params") or {}))
        if not isinstance(obj, cls):
            base = next(c for c in cls.__mro__ if "family" in vars(c))  # e.g. Calibrator
            raise ConfigError(f"dict holds a {obj.kind!r} {cls.family}, not {cls.kind!r}; "
                              f"use {base.__name__}.from_dict()")
        state = d.get("state")
        for key, convert in obj.state_fields.items():
            if not isinstance(state, dict) or key not in state:
                raise ConfigError(f"{cls.family} dict has no state field {key!r}; load only dicts written by to_dict()")
            try:
                setattr(obj, f"{key}_", convert(state[key]))
            except (TypeError, ValueError):
                raise ConfigError(f"{cls.family} dict: state field {key!r} is malformed; rebuild it with to_dict()") from None
        obj._check_state()
        return obj

    def _check_state(self) -> None:
        """Hook: check a state loaded by :meth:`from_dict` for consistency; raise ConfigError if not."""
