"""What the store's files hold: the columns of ``trials.parquet`` and ``predictions/``, and one trial's row.

A trials row has, in this order: ``trial_id``, ``status``; one column per config field (the
hyperparameters), typed as :class:`~skinsweep.train.config.TrialConfig` declares the field; the fixed
result columns of :data:`TRIAL_COLUMNS`; then any extra columns a caller adds (``pruned_at_epoch`` and ``attempts`` as integers,
others typed by their values).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import types
import typing
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from skinsweep.errors import ConfigError
from skinsweep.train.config import TrialConfig

FORMAT_VERSION = 1
STATUSES = ("completed", "pruned", "failed", "diverged", "out_of_budget")
SPLITS = ("val", "test")

# Per-split metrics stored as val_<m> / test_<m>; skinsweep.metrics.binary_metrics returns these keys.
# (Listed here rather than imported so that reading results does not import scikit-learn.)
METRICS: tuple[str, ...] = ("auc", "ap", "accuracy", "precision", "recall", "specificity", "f1", "ece",
                            "brier", "loss", "n", "n_pos")
_COUNT_METRICS = ("n", "n_pos")
VERSION_KEYS: tuple[str, ...] = ("skinsweep", "torch", "timm", "open_clip", "python")

_I, _F, _S = pa.int64(), pa.float64(), pa.string()
_TS = pa.timestamp("us", tz="UTC")

# Columns every trials.parquet has, with fixed types, in order (hyperparameters and extras around them: see above).
TRIAL_COLUMNS: dict[str, pa.DataType] = {
    "trial_id": _S,
    "status": _S,
    "best_epoch": _I,
    "epochs_run": _I,
    **{f"{s}_{m}": (_I if m in _COUNT_METRICS else _F) for s in SPLITS for m in METRICS},
    "runtime_s": _F,
    "cpus": _F,
    "gpus": _F,
    "node": _S,
    "checkpoint": _S,
    "split_hash": _S,
    "recipe_hash": _S,
    "config_hash": _S,
    "dataset_hash": _S,
    "n_params": _I,
    "n_trainable": _I,
    "device_used": _S,   # resolved by the trial (config "device" may say "auto")
    "head_used": _S,     # resolved head kind (config "head" may say "auto")
    "augment_used": _S,  # resolved augmentation (config "augment" may say "auto")
    **{f"{k}_version": _S for k in VERSION_KEYS},
    "error": _S,
    "started_at": _TS,
    "finished_at": _TS,
}
_LEAD = ("trial_id", "status")
# Extras with a known type (so that e.g. an all-null first value does not decide it).
_EXTRA_TYPES: dict[str, pa.DataType] = {"pruned_at_epoch": _I, "attempts": _I}

# Every predictions/<trial_id>.parquet is cast to exactly this schema, so pandas, pyarrow.dataset and
# DuckDB read the folder as one table with the same types for every trial.
PREDICTIONS_SCHEMA = pa.schema([
    ("image_id", _S), ("lesion_id", _S), ("label", pa.int8()), ("dx", _S), ("logit", pa.float32()),
    ("prob", pa.float32()), ("split", _S), ("epoch", pa.int32()), ("trial_id", _S), ("backbone", _S),
    ("mode", _S), ("split_hash", _S), ("config_hash", _S), ("recipe_hash", _S), ("sweep", _S),
])
# The ``predictions`` view of :func:`skinsweep.results.query` leaves out the per-trial columns that ``trials``
# also has, so that ``predictions JOIN trials USING (trial_id)`` has no ambiguous names (the files keep them all).
QUERY_PREDICTION_COLUMNS: tuple[str, ...] = ("trial_id", "image_id", "lesion_id", "label", "dx", "logit", "prob",
                                             "split", "epoch", "sweep")

# Hyperparameters that do not apply to a trial are stored as null, so a linear probe does not look
# like it tried backbone_lr_mult=1. Each rule: param -> (deciding key, values for which it applies).
_APPLIES_WHEN: dict[str, tuple[str, tuple[str, ...]]] = {
    "backbone_lr_mult": ("mode", ("finetune",)),
    "embedding_cache": ("mode", ("linear_probe",)),
    "focal_gamma": ("loss", ("focal",)),
    "head_hidden": ("head", ("mlp",)),  # "head" resolved from summary["head"] when the config says auto
}

# Config fields whose name would clash with a predictions column in ``predictions JOIN trials``.
_RENAMED_PARAMS = {"split": "split_file"}  # the split manifest path, not val/test


def _arrow_type(annotation: Any) -> pa.DataType:
    """The column type of a TrialConfig field: int/float/bool as such, Optional[X] as X (nullable),
    str and Literal as string, anything else (list, dict) as JSON text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _arrow_type(args[0])
    return {bool: pa.bool_(), int: _I, float: _F}.get(annotation, _S)


# The hyperparameter columns and their types, from TrialConfig's field annotations.
PARAM_TYPES: dict[str, pa.DataType] = {_RENAMED_PARAMS.get(name, name): _arrow_type(field.annotation)
                                       for name, field in TrialConfig.model_fields.items()}


# --------------------------------------------------------------------------------------------------
# One trial's row
# --------------------------------------------------------------------------------------------------

def trial_row(summary: dict, status: str | None, extra: dict) -> pa.Table:
    """One trials.parquet row (a one-row table) from a trial's ``summary.json`` content and ``extra`` columns.

    Hyperparameters come first; the schema metadata lists them (``{"format": 1, "params": [...]}``).
    """
    trial_id = str(summary["trial_id"])
    status = status or summary.get("status")
    if status not in STATUSES:
        raise ConfigError(f"trial {trial_id}: status {status!r} is not one of {', '.join(STATUSES)}")
    row: dict[str, Any] = {"trial_id": trial_id, "status": status}

    # hyperparameters: one column per config field; dicts / lists as JSON text
    config = summary.get("config") or {}
    deciders = config | {"head": summary.get("head") if config.get("head") == "auto" else config.get("head")}
    params: list[str] = []
    for key, value in config.items():
        col = _RENAMED_PARAMS.get(key, key)
        if col in TRIAL_COLUMNS or col in extra or col in QUERY_PREDICTION_COLUMNS:
            col = f"param_{key}"  # never shadow a result column, nor clash in predictions JOIN trials
        rule = _APPLIES_WHEN.get(key)
        if rule is not None and deciders.get(rule[0]) not in (None, "auto", *rule[1]):  # unknown → keep the value
            value = None
        row[col] = value
        params.append(col)

    base = {
        "best_epoch": summary.get("best_epoch"),
        "epochs_run": summary.get("epochs_run"),
        **{f"{s}_{m}": None for s in SPLITS for m in METRICS},
        # the summary's metrics, including those a later skinsweep adds (they get columns of their own)
        **{f"{s}_{m}": v for s in SPLITS for m, v in (summary.get(s) or {}).items()},
        **{k: summary.get(k) for k in ("runtime_s", "split_hash", "recipe_hash", "config_hash", "dataset_hash",
                                       "n_params", "n_trainable")},
        **{f"{k}_used": summary.get(k) for k in ("device", "head", "augment")},
        **{f"{k}_version": v for k, v in (summary.get("versions") or {}).items()},
        **{k: summary.get(k) for k in ("error", "started_at", "finished_at")},
        **extra,
    }
    # Timestamps: finished_at defaults to when the trial is recorded, started_at to finished - runtime.
    finished = _to_utc(base["finished_at"], "finished_at") or dt.datetime.now(dt.timezone.utc)
    started = _to_utc(base["started_at"], "started_at")
    if started is None and _finite(base["runtime_s"]):
        started = finished - dt.timedelta(seconds=float(base["runtime_s"]))
    row |= base | {"started_at": started, "finished_at": finished}

    arrays = {}
    for col, value in row.items():
        typ = TRIAL_COLUMNS.get(col) or (PARAM_TYPES.get(col) if col in params else _EXTRA_TYPES.get(col))
        try:
            arrays[col] = pa.array([_plain(value)])
            arrays[col] = arrays[col] if typ is None else arrays[col].cast(typ)  # a safe cast: 2.5 is no int
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
            raise ConfigError(f"trial {trial_id}: column {col}: expected {typ or 'a value Arrow can store'}, "
                              f"got {_plain(value)!r}") from None
    meta = {"skinsweep": json.dumps({"format": FORMAT_VERSION, "params": params})}
    return pa.table(arrays).replace_schema_metadata(meta)


def _plain(value: Any) -> Any:
    """A Python value Arrow can store in a flat column: numpy → Python, dict/list → JSON, NaN → null."""
    if value is None:
        return None
    if isinstance(value, (dt.datetime, pd.Timestamp)):
        return _to_utc(value, "value")
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (dict, list, tuple, set)):
        return json.dumps(sorted(value) if isinstance(value, set) else value, sort_keys=True, default=str)
    if not isinstance(value, (bool, int, float, str)):
        return str(value)  # Path, enum, ...
    return value


def _to_utc(value: Any, what: str) -> dt.datetime | None:
    """datetime / pandas Timestamp / ISO string / epoch seconds → aware UTC datetime (naive = UTC)."""
    if value is None:
        return None
    try:
        ts = pd.Timestamp(value, unit="s") if isinstance(value, (int, float)) else pd.Timestamp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a time; pass a datetime, ISO string or epoch seconds") from None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.floor("us").to_pydatetime()  # Python datetimes hold microseconds (epoch floats carry ns noise)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# Appending a row to the trials table
# --------------------------------------------------------------------------------------------------

def stored_params(table: pa.Table | None) -> list[str]:
    """The hyperparameter columns of a trials table (from its schema metadata), in order."""
    raw = (table.schema.metadata or {}).get(b"skinsweep") if table is not None else None
    return json.loads(raw).get("params", []) if raw else []


def append_row(old: pa.Table | None, row: pa.Table) -> pa.Table:
    """The trials table ``old`` (rows of other trials, or None) plus the one-row table ``row``, in canonical
    column order (lead, hyperparameters, fixed result columns, extras), each column with one type."""
    params = stored_params(old)
    params += [p for p in stored_params(row) if p not in params]
    extras = [c for t in (old, row) if t is not None for c in t.column_names
              if c not in TRIAL_COLUMNS and c not in params]
    order = [*_LEAD, *params, *[c for c in TRIAL_COLUMNS if c not in _LEAD], *dict.fromkeys(extras)]
    parts = [t for t in (old, row) if t is not None]
    columns = {}
    for col in order:
        chunks = [t[col] if col in t.column_names else pa.chunked_array([pa.nulls(t.num_rows)]) for t in parts]
        typ = TRIAL_COLUMNS.get(col) or PARAM_TYPES.get(col) or _EXTRA_TYPES.get(col) or _value_type(chunks)
        try:
            chunks = [pc.cast(c, typ) for c in chunks]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # values an older file stored that do not fit
            typ, chunks = _S, [pc.cast(c, _S) for c in chunks]
        columns[col] = pa.chunked_array([piece for c in chunks for piece in c.chunks], type=typ)
    meta = {"skinsweep": json.dumps({"format": FORMAT_VERSION, "params": params})}
    return pa.table(columns).replace_schema_metadata(meta).combine_chunks()


def _value_type(chunks: list[pa.ChunkedArray]) -> pa.DataType:
    """The type of a column no one declares, from the values seen: all of one type → it; ints and floats
    → float64; otherwise string. A chunk of only nulls has no say (it has no real type yet)."""
    seen = {c.type for c in chunks if c.null_count < len(c)}
    if len(seen) == 1:
        return seen.pop()
    if seen and all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in seen):
        return _F
    return _S
