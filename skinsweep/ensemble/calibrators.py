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
    cal = Calibrator.from_dict(d)                       # any calibrator, fitted, predicts identically

Calibrators follow the estimator contract of :mod:`skinsweep.ensemble.estimator` (keyword-only
parameters, validation in ``fit``, fitted state in ``attr_``, ``clone``-able, one JSON round trip,
out-of-fold scores grouped by lesion from ``fit_crossfit``), with one deliberate difference:
``predict_proba`` returns the melanoma probability with shape ``(N,)``, not scikit-learn's ``(N, 2)``,
because every consumer here wants the positive class only.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.utils.validation import check_is_fitted

from skinsweep.ensemble.estimator import (
    SkinsweepEstimator,
    check_labels,
    check_logits,
    check_positive,
    crossfit_predict,
    estimator_names,
    float_array,
    make,
    register,
)
from skinsweep.errors import ConfigError
from skinsweep.metrics import _check_fraction, _check_inputs, threshold_for_sensitivity

__all__ = [
    "Calibrator",
    "FewPositivesWarning",
    "IsotonicCalibration",
    "NoCalibration",
    "PlattScaling",
    "TemperatureScaling",
    "choose_threshold",
    "list_calibrators",
    "make_calibrator",
]


class FewPositivesWarning(UserWarning):
    """A calibrator was fitted on too few melanomas for its probabilities to be trusted."""


class Calibrator(SkinsweepEstimator):
    """Base class: ``fit(logits, y)``, ``predict_proba(logits)``, ``fit_crossfit``, JSON round trip.

    Subclasses implement ``_fit(z, y)`` (set ``attr_`` state) and ``_predict(z)``, and list their
    fitted state in ``state_fields``; validation, cross-fitting and JSON live in the base classes.
    """

    family = "calibrator"

    def fit(self, logits: Any, y: Any) -> Calibrator:
        """Fit on validation ``logits`` (N,) and labels ``y`` (N,) in {0, 1}; returns self."""
        z = check_logits(logits)
        self._fit(z, check_labels(y, z.shape[0], both_classes=self.uses_labels))
        return self

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated melanoma probability, shape (N,), for ``logits`` of shape (N,)."""
        check_is_fitted(self)
        return self._predict(check_logits(logits))

    def fit_crossfit(self, logits: Any, y: Any, groups: Any, *, n_splits: int = 5, seed: int = 0) -> np.ndarray:
        """Out-of-fold probabilities for the fitting rows; this calibrator ends fitted on all rows.

        Use the out-of-fold probabilities (never in-sample ones) wherever the same validation rows
        are also reported or used to pick a threshold: an isotonic fit scores its own rows far
        better than new ones.

        Args:
            logits: shape (N,), validation logits.
            y: shape (N,), labels in {0, 1}.
            groups: shape (N,), lesion id per image, or None (each image its own lesion).
            n_splits, seed: see :func:`skinsweep.ensemble.estimator.crossfit_folds`.

        Returns:
            Shape (N,) probabilities, each from a calibrator that never saw that row's lesion.
            Afterwards ``self`` is fitted on all N rows, for test and deployment (like ``fit``).
        """
        z = check_logits(logits)
        y = check_labels(y, z.shape[0], both_classes=self.uses_labels)
        return crossfit_predict(self, z, y, groups, method="predict_proba", n_splits=n_splits, seed=seed)

    def torch_module(self):
        """This fitted calibrator as a ``torch.nn.Module``: float64 logits (N,) -> probabilities (N,), the
        same numbers as :meth:`predict_proba`, in ops ``torch.onnx`` exports (``skinsweep export``)."""
        check_is_fitted(self)
        return self._torch_module()

    # subclass hooks
    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        pass

    def _predict(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _torch_module(self):
        raise ConfigError(f"calibrator {self.kind!r} cannot be exported to ONNX; recalibrate the bundle with "
                          "temperature, platt or isotonic (skinsweep recalibrate)")


def _affine_sigmoid(scale: float, offset: float):
    """``sigmoid(scale * z + offset)`` as a module (temperature and Platt scaling)."""
    import torch

    class AffineSigmoid(torch.nn.Module):
        def forward(self, z):
            return torch.sigmoid(z * scale + offset)

    return AffineSigmoid()


@register("none")
class NoCalibration(Calibrator):
    """``sigmoid(logit)`` unchanged: the baseline every calibrator is compared with. Stateless."""

    uses_labels = False

    def __sklearn_is_fitted__(self) -> bool:  # nothing to fit, usable straight away
        return True

    def _predict(self, z: np.ndarray) -> np.ndarray:
        return expit(z)

    def _torch_module(self):
        return _affine_sigmoid(1.0, 0.0)


@register("temperature")
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

    state_fields = {"temperature": float, "shift": float}

    def __init__(self, *, pos_weight: float | None = None, fit_shift: bool = True) -> None:
        self.pos_weight = pos_weight
        self.fit_shift = fit_shift

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        shift0 = 0.0
        if self.pos_weight is not None:
            hint = "pass the positive weight of the training BCE (e.g. 8), or None"
            shift0 = math.log(check_positive("pos_weight", self.pos_weight, hint))
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

    def _torch_module(self):
        return _affine_sigmoid(1.0 / self.temperature_, -self.shift_ / self.temperature_)


@register("platt")
class PlattScaling(Calibrator):
    """``p = sigmoid(slope * logit + intercept)``, scikit-learn ``LogisticRegression`` on the logit.

    Parameters:
        C: inverse L2 strength; the default 1e6 makes it effectively unpenalised (Platt's method)
           while staying finite, so the parameters round-trip through strict JSON.
        max_iter: lbfgs iterations.

    Fitted state: ``slope_``, ``intercept_``.
    """

    state_fields = {"slope": float, "intercept": float}

    def __init__(self, *, C: float = 1e6, max_iter: int = 1000) -> None:
        self.C = C
        self.max_iter = max_iter

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        C = check_positive("C", self.C, "use a large value such as 1e6 for an unpenalised fit")
        lr = LogisticRegression(C=C, max_iter=int(self.max_iter)).fit(z[:, None], y)
        self.slope_ = float(lr.coef_[0, 0])
        self.intercept_ = float(lr.intercept_[0])

    def _predict(self, z: np.ndarray) -> np.ndarray:
        return expit(self.slope_ * z + self.intercept_)

    def _torch_module(self):
        return _affine_sigmoid(self.slope_, self.intercept_)


@register("isotonic")
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

    state_fields = {"X_thresholds": float_array, "y_thresholds": float_array}

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

    def _torch_module(self):
        """``np.interp`` as a sum over the knots (ONNX has no searchsorted): from ``y[0]``, each segment of
        positive width adds ``slope * (clip(p, x_k, x_k+1) - x_k)`` and each vertical step (a repeated x)
        adds its jump once ``p >= x_k`` -- np.interp's value at a repeated knot is the last one's."""
        import torch

        x, y = self.X_thresholds_, self.y_thresholds_
        dx, dy = np.diff(x), np.diff(y)
        ramp = dx > 0

        class PiecewiseLinear(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.y0 = float(y[0])
                for name, v in {"lo": x[:-1][ramp], "hi": x[1:][ramp], "slope": dy[ramp] / np.where(ramp, dx, 1)[ramp],
                                "step_at": x[:-1][~ramp], "step": dy[~ramp]}.items():
                    self.register_buffer(name, torch.tensor(v, dtype=torch.float64))

            def forward(self, z):
                p = torch.sigmoid(z)[:, None]  # (N, 1) against (K,) knots
                out = torch.full_like(z, self.y0)
                if self.slope.numel():
                    out = out + ((torch.minimum(torch.maximum(p, self.lo), self.hi) - self.lo) * self.slope).sum(1)
                if self.step.numel():
                    out = out + ((p >= self.step_at).to(z.dtype) * self.step).sum(1)
                return out

        return PiecewiseLinear()

    def _check_state(self) -> None:
        x, y = self.X_thresholds_, self.y_thresholds_
        if x.ndim != 1 or x.shape != y.shape or x.size == 0 or np.any(np.diff(x) < 0):
            raise ConfigError("isotonic calibrator dict needs equal-length, increasing X_thresholds / y_thresholds")


def list_calibrators() -> list[str]:
    """Sorted names accepted by :func:`make_calibrator`."""
    return estimator_names("calibrator")


def make_calibrator(name: str, **kwargs: Any) -> Calibrator:
    """Build calibrator ``name`` ("none", "temperature", "platt", "isotonic"); None kwargs = default."""
    return make("calibrator", name, **kwargs)


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
