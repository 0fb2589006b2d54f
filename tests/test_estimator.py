"""Tests for skinsweep.ensemble.estimator: calibrators, combiners and the metadata encoder share one
registry, one JSON round trip and one cross-fitting helper."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import skinsweep.ensemble.calibrators  # noqa: F401  (registers the calibrators)
import skinsweep.ensemble.combiners  # noqa: F401  (registers the combiners)
import skinsweep.ensemble.metadata  # noqa: F401  (registers the metadata encoder)
from skinsweep.ensemble.estimator import REGISTRY, SkinsweepEstimator, crossfit_predict


def _fitted_and_predict(family: str, cls: type, rng: np.random.Generator):
    """A fitted instance of ``cls`` and a function giving its predictions on new inputs."""
    if family == "metadata":
        meta = pd.DataFrame({"age": rng.normal(50, 15, 60).round(), "sex": rng.choice(["male", "female", ""], 60),
                             "site": rng.choice(["back", "face", "scalp"], 60)})
        est = cls().fit(meta.head(40))
        return est, lambda e: e.transform(meta)
    y = (rng.random(300) < 0.3).astype(int)
    X = 1.5 * y[:, None] + rng.normal(0, 1, (300, 3)) + np.log(8)
    if family == "calibrator":
        est = cls().fit(X[:, 0], y)
        return est, lambda e: e.predict_proba(np.r_[X[:, 0], np.linspace(-60, 60, 61)])
    extra = np.column_stack([y ^ (rng.random(300) < 0.3), rng.normal(50, 10, 300)]) if cls.accepts_extra else None
    return cls().fit(X, y, extra=extra), lambda e: e.predict_logit(X, extra=extra)


@pytest.mark.parametrize("family, kind", sorted(REGISTRY))
def test_every_registered_estimator_round_trips_through_json(family: str, kind: str) -> None:
    cls = REGISTRY[(family, kind)]
    est, predict = _fitted_and_predict(family, cls, np.random.default_rng(0))
    d = json.loads(json.dumps(est.to_dict(), allow_nan=False))  # strict JSON, no numpy types
    assert d["format"] == f"skinsweep.{family}/{cls.version}" and d["kind"] == kind
    family_base = next(c for c in cls.__mro__ if "family" in vars(c))
    loaded = family_base.from_dict(d)
    assert type(loaded) is cls and loaded.to_dict() == d
    np.testing.assert_array_equal(predict(loaded), predict(est))  # bit-identical predictions


class _SeenLesion(SkinsweepEstimator):
    """Predicts 1 for rows whose lesion (column 0 of X) was among its fitting rows, else 0."""

    family = "test"

    def fit(self, X, y):
        self.seen_ = set(X[:, 0].tolist())
        return self

    def predict(self, X):
        return np.isin(X[:, 0], list(self.seen_)).astype(float)


def test_crossfit_predict_scores_every_row_without_its_lesion() -> None:
    rng = np.random.default_rng(1)
    lesion = np.repeat(np.arange(100), 2)  # two images per lesion
    y = (rng.random(100) < 0.3).astype(int)[lesion]
    X = lesion[:, None].astype(float)
    est = _SeenLesion()
    oof = crossfit_predict(est, X, y, lesion, method="predict", n_splits=5, seed=0)
    assert oof.shape == (200,) and not oof.any()  # no row was scored by a model that saw its lesion
    np.testing.assert_array_equal(est.predict(X), np.ones(200))  # ends fitted on all rows
    # grouped by image instead, a lesion's twin sits on the fitting side: the probe sees the leak
    assert crossfit_predict(_SeenLesion(), X, y, None, method="predict").mean() > 0.5


def test_crossfit_predict_of_a_label_free_estimator_is_in_sample() -> None:
    X = np.arange(8.0)[:, None]
    est = _SeenLesion()
    est.uses_labels = False
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])  # too few melanomas for folds; none are needed
    np.testing.assert_array_equal(crossfit_predict(est, X, y, None, method="predict"), np.ones(8))
