"""Patient metadata (age, sex, anatomical site) as extra features for the stacking combiner.

At build time the metadata come from the dataset index of the sweep's data root (``age, sex, site``
columns; ``site`` is HAM10000's ``localization``), joined on ``image_id``. At predict time they come
from a table with the same columns (e.g. ``HAM10000_metadata.csv``), joined on the file stem::

    enc = MetadataEncoder(features=["age", "sex", "site"]).fit(val_meta)    # validation rows only
    E = enc.transform(meta)                  # (N, F) float features, names in enc.feature_names_
    json.dumps(enc.to_dict())                # the bundle stores this, never a pickle

=========  ==================================================  =====================================
feature    encoded columns                                     missing / not seen in validation
=========  ==================================================  =====================================
``age``    ``age`` (years), ``age_missing`` (0/1)              age = validation mean, age_missing = 1
``sex``    ``sex=female``, ``sex=male``, ``sex=unknown``       ``sex=unknown``
``site``   ``site=<s>`` per site seen in validation,           ``site=unknown``
           ``site=unknown``
=========  ==================================================  =====================================

An image with no metadata row at all (not in the table, or a dataset without metadata for it) is
encoded as missing age, unknown sex, unknown site -- it is still scored, and the count is reported.

Why this is written by hand rather than with scikit-learn's ``SimpleImputer`` / ``OneHotEncoder``:
the bundle holds JSON only, and those estimators cannot be rebuilt from JSON without setting their
private fitted attributes. The fitted state here is one mean and two category lists, and the
transform is an equality test. Scaling is left to the stacker (its ``StandardScaler``). The encoder
uses no labels, so fitting it on all validation rows before the stacker's cross-fitting leaks
nothing into the out-of-fold scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from skinsweep.ensemble.estimator import UPGRADES, SkinsweepEstimator, register
from skinsweep.errors import ConfigError, DataError, first_line, short_list

__all__ = ["METADATA_FEATURES", "MetadataEncoder", "SplitMetadata", "dataset_metadata", "join_metadata", "members_index",
           "metadata_table", "prepare_metadata", "read_metadata_csv", "trial_value",
           "without_metadata"]

METADATA_FEATURES = ("age", "sex", "site")
SEXES = ("female", "male", "unknown")
UNKNOWN = "unknown"
# A metadata table may name the site column as HAM10000_metadata.csv does.
COLUMN_ALIASES = {"localization": "site"}


def check_features(features: Sequence[str]) -> list[str]:
    """Requested features in canonical order (age, sex, site); unknown or repeated names are an error."""
    features = list(features)
    odd = [f for f in features if f not in METADATA_FEATURES]
    if odd or len(set(features)) != len(features) or not features:
        raise ConfigError(f"metadata features must be distinct names from {', '.join(METADATA_FEATURES)}, "
                          f"got {features!r}")
    return [f for f in METADATA_FEATURES if f in features]


def _category(values: pd.Series) -> np.ndarray:
    """Lower-cased, stripped strings; empty / NaN -> "unknown"."""
    s = values.astype("string").str.strip().str.lower()
    return s.fillna(UNKNOWN).replace("", UNKNOWN).to_numpy(dtype=object)


def _age(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)


def _optional(convert):
    """State converter for a field that is None when its feature is not used."""
    return lambda v: None if v is None else convert(v)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------

@register("age_sex_site")
class MetadataEncoder(SkinsweepEstimator):
    """age / sex / site -> numeric features (see the module table); fitted on validation rows only.

    Follows the contract of :mod:`skinsweep.ensemble.estimator` (JSON format
    ``skinsweep.metadata/2``; version 1 was ``skinsweep.ensemble.metadata/1``, which still loads).

    Parameters:
        features: any of ``age``, ``sex``, ``site``.

    Fitted state: ``features_`` (the features in canonical order: age, sex, site), ``age_mean_``
    (validation mean age in years; None without age), ``sites_`` (sites seen in validation, sorted,
    plus ``unknown``; None without site), ``feature_names_`` (one name per output column).
    """

    family = "metadata"
    version = 2
    uses_labels = False
    state_fields = {"features": list, "age_mean": _optional(float), "sites": _optional(list),
                    "feature_names": list}

    def __init__(self, *, features: Sequence[str] = METADATA_FEATURES) -> None:
        self.features = features

    def fit(self, meta: pd.DataFrame, y: Any = None, *, source: str = "metadata") -> MetadataEncoder:
        """Fit on validation rows: ``meta`` has the feature columns (age, sex, site), one row per image.
        ``y`` is ignored (the encoder uses no labels).

        Raises DataError naming ``source`` when a requested feature has no known value in any row.
        """
        features, n = check_features(self.features), len(meta)
        self.age_mean_ = self.sites_ = None
        if "age" in features:
            ages = _age(meta["age"])
            if not np.isfinite(ages).any():
                raise DataError(f"{source}: column age has no values for the {n} validation images; "
                                "drop age from combiner.metadata")
            self.age_mean_ = float(np.nanmean(ages))
        for f in ("sex", "site"):
            if f in features and (_category(meta[f]) == UNKNOWN).all():
                raise DataError(f"{source}: column {f}{' (localization)' if f == 'site' else ''} is empty or "
                                f"unknown for all {n} validation images; drop {f} from combiner.metadata")
        if "site" in features:
            self.sites_ = sorted(set(_category(meta["site"])) - {UNKNOWN}) + [UNKNOWN]
        self.features_ = features
        self.feature_names_ = self._names()
        return self

    def transform(self, meta: pd.DataFrame) -> np.ndarray:
        """Features, shape (N, F) float64, for ``meta`` rows (columns age / sex / site as fitted)."""
        check_is_fitted(self)
        cols: list[np.ndarray] = []
        if "age" in self.features_:
            ages = _age(meta["age"])
            missing = ~np.isfinite(ages)
            cols += [np.where(missing, self.age_mean_, ages), missing.astype(np.float64)]
        if "sex" in self.features_:
            cols += _one_hot(_category(meta["sex"]), SEXES)
        if "site" in self.features_:
            cols += _one_hot(_category(meta["site"]), self.sites_)
        return np.column_stack(cols) if cols else np.zeros((len(meta), 0))

    def _names(self) -> list[str]:
        names = ["age", "age_missing"] if "age" in self.features_ else []
        names += [f"sex={s}" for s in SEXES] if "sex" in self.features_ else []
        return names + ([f"site={s}" for s in self.sites_] if "site" in self.features_ else [])

    def _check_state(self) -> None:
        fitted = {"age": self.age_mean_, "site": self.sites_, "sex": SEXES}
        if self.features_ != check_features(self.features) or any(fitted[f] is None for f in self.features_):
            raise ConfigError("metadata encoder dict is incomplete (features / age_mean / sites); rebuild the bundle")
        if self._names() != self.feature_names_:
            raise ConfigError("metadata encoder dict: feature_names do not match its features; rebuild the bundle")


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version-1 encoder JSON (``skinsweep.ensemble.metadata/1``, bundles built before the estimator
    contract) in the current form."""
    state = d.get("state") if isinstance(d.get("state"), dict) else {}
    features = d.get("features", [])
    return {"format": MetadataEncoder.json_format(), "kind": MetadataEncoder.kind, "params": {"features": features},
            "state": {"features": features, "age_mean": state.get("age_mean"), "sites": state.get("sites"),
                      "feature_names": state.get("feature_names")}}


UPGRADES["skinsweep.ensemble.metadata/1"] = _upgrade_v1


def _one_hot(values: np.ndarray, categories: Sequence[str]) -> list[np.ndarray]:
    """One 0/1 column per category; a value not among them counts as "unknown" (the last one)."""
    values = np.where(np.isin(values, list(categories)), values, UNKNOWN)
    return [(values == c).astype(np.float64) for c in categories]


# --------------------------------------------------------------------------------------------------
# Tables: validate, read, join
# --------------------------------------------------------------------------------------------------

def metadata_table(df: pd.DataFrame, features: Sequence[str], where: str) -> pd.DataFrame:
    """A metadata table indexed by image_id with one column per feature (``localization`` -> ``site``).

    Other columns (lesion_id, dx, … as in HAM10000_metadata.csv) are ignored. ``where`` names the table
    in errors.
    """
    df = df.rename(columns={k: v for k, v in COLUMN_ALIASES.items() if v not in df.columns})
    needed = ["image_id", *features]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        def shown(cols: list[str]) -> str:
            return ", ".join("localization" if c == "site" else c for c in cols)

        raise DataError(f"{where}: missing column(s) {shown(missing)}; expected {shown(needed)} (as in "
                        "HAM10000_metadata.csv; image_id = image file name without extension; site may be "
                        f"called site), found {', '.join(map(str, df.columns)) or 'none'}")
    ids = df["image_id"].astype("string").str.strip()
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{where}: {dup.nunique()} image ids listed more than once ({short_list(dup.unique())}); "
                        "list each image once")
    return df.assign(image_id=ids).set_index("image_id")[list(features)]


def read_metadata_csv(path: str | Path, features: Sequence[str]) -> pd.DataFrame:
    """Read a metadata CSV (image_id + the features; HAM10000_metadata.csv works as is)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise DataError(f"metadata file not found: {path}; pass a CSV with image_id, age, sex, localization") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV ({first_line(e)}); check the file") from None
    df.columns = [str(c).strip() for c in df.columns]
    return metadata_table(df, features, str(path)).reset_index()


def join_metadata(table: pd.DataFrame, image_ids: Sequence[str | None]) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of ``table`` (indexed by image_id) for ``image_ids``, in order; absent ids get empty rows.

    Returns ``(rows, no_row)``: rows has the table's columns (NaN where absent), no_row (N,) bool is
    True for images that have no row in the table.
    """
    ids = pd.Index([None if i is None else str(i) for i in image_ids])
    return table.reindex(ids).reset_index(drop=True), ~ids.isin(table.index)


# --------------------------------------------------------------------------------------------------
# Build time: the sweep's dataset
# --------------------------------------------------------------------------------------------------

def dataset_metadata(results, members: Sequence[str], data: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """(table indexed by image_id with age/sex/site, dataset path) for the dataset ``members`` trained on
    (:func:`members_index`)."""
    index = members_index(results, members, data)
    return index.df.set_index("image_id")[list(METADATA_FEATURES)], str(index.root)


def members_index(results, members: Sequence[str], data: str | Path | None = None, *,
                  what: str = "combiner.metadata", verify: bool | None = None):
    """The :class:`~skinsweep.data.index.DatasetIndex` of the dataset ``members`` were trained on.

    The root is ``data`` when given, else the members' ``data`` config (trials.parquet), else the
    sweep.json ``dataset``. The index must match the members' ``dataset_hash``, so data of another
    dataset cannot be joined by accident. ``what`` starts the error messages; ``verify`` decodes every
    image (default: only when the sweep dropped bad images, so the same images and hash come out).
    """
    from skinsweep.data.index import load_index

    trials = results.trials.set_index("trial_id").loc[list(members)]
    roots = sorted(set(trials["data"].dropna().astype(str))) if "data" in trials else []
    root = str(data) if data else (roots[0] if len(roots) == 1 else results.sweep.get("dataset"))
    if not root:
        raise ConfigError(f"{what}: cannot tell which dataset the members used "
                          f"({'several: ' + ', '.join(roots) if roots else 'no data root recorded'}); pass --data DIR")
    if not Path(root).exists():
        raise DataError(f"{what}: dataset {root} (the sweep's data root) does not exist here; "
                        "pass --data DIR with the same dataset")
    positive = trial_value(trials, "positive", ["MEL"])
    skip_bad = bool(trial_value(trials, "skip_bad", False))
    index = load_index(root, positive=positive, skip_bad=skip_bad, verify=skip_bad if verify is None else verify)
    expected = set(trials["dataset_hash"].dropna()) if "dataset_hash" in trials else set()
    if expected and index.hash not in expected:
        raise DataError(f"{what}: dataset {root} (hash {index.hash}) is not the dataset the members "
                        f"were trained on (hash {', '.join(sorted(expected))}); pass --data DIR with that dataset")
    return index


def trial_value(trials: pd.DataFrame, col: str, default: Any) -> Any:
    """The first recorded value of setting ``col`` among ``trials`` (JSON lists decoded), else ``default``."""
    if col not in trials or trials[col].isna().all():
        return default
    v = trials[col].dropna().iloc[0]
    return json.loads(v) if isinstance(v, str) and v.startswith("[") else v


@dataclass
class SplitMetadata:
    """One ensemble build's metadata: the encoder (fitted on val) and, per split, raw rows and features."""

    encoder: MetadataEncoder
    source: str
    rows: dict[str, pd.DataFrame]      # split -> (N, features) raw values, aligned with the split's images
    extra: dict[str, np.ndarray]       # split -> (N, F) encoded features
    no_row: dict[str, np.ndarray]      # split -> (N,) True where the dataset has no metadata for the image

    def summary(self) -> dict[str, Any]:
        """For report.json: features, encoded columns, source, and missing counts per split."""
        missing = {s: {"no_metadata": int(self.no_row[s].sum()),
                       **{f: int(_missing(r[f], f).sum()) for f in self.encoder.features_}}
                   for s, r in self.rows.items()}
        return {"features": list(self.encoder.features_), "columns": list(self.encoder.feature_names_),
                "source": self.source, "missing": missing, "encoder": self.encoder.to_dict()}


def _missing(values: pd.Series, feature: str) -> np.ndarray:
    return ~np.isfinite(_age(values)) if feature == "age" else _category(values) == UNKNOWN


def without_metadata(rows: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """(N,) True where every one of ``features`` is missing in ``rows`` (the build's "no metadata")."""
    return np.all([_missing(rows[f], f) for f in features], axis=0)


def prepare_metadata(features: Sequence[str], results, members: Sequence[str], image_ids: dict[str, Sequence[str]],
                     data: str | Path | None = None) -> SplitMetadata:
    """Join the dataset's metadata onto each split's images; fit the encoder on ``image_ids["val"]``.

    An image whose metadata is absent or empty is encoded as missing age / unknown sex and site. A
    dataset row counts as "no metadata" when every requested feature is missing.
    """
    features = check_features(features)
    table, source = dataset_metadata(results, members, data)
    table = table[features]
    rows = {s: join_metadata(table, ids)[0] for s, ids in image_ids.items()}
    no_row = {s: without_metadata(r, features) for s, r in rows.items()}
    encoder = MetadataEncoder(features=features).fit(rows["val"], source=f"dataset {source}")
    return SplitMetadata(encoder=encoder, source=source, rows=rows,
                         extra={s: encoder.transform(r) for s, r in rows.items()}, no_row=no_row)
