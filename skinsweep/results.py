"""The Parquet results store — the system of record of a sweep — and its query API.

Layout of one sweep folder ``<storage>/<name>/``::

    trials.parquet              one row per trial: id, status, every hyperparameter as a column,
                                val_/test_ metrics at the selected epoch, runtime, resources, hashes
    predictions/<trial>.parquet one row per image x split of one trial, all files one fixed schema
    history/<trial>.parquet     one row per epoch of one trial (epoch, train_loss, val_loss, val_auc …),
                                pruned trials included (what the report's training curves are drawn from)
    sweep.json                  written by the sweep (recipe, hashes); optional here

Only the sweep driver writes (through :class:`ResultsStore`); anyone reads, with pandas
(``pd.read_parquet("<dir>/predictions")``), pyarrow (``pyarrow.dataset.dataset(...)``), DuckDB
(``read_parquet('<dir>/predictions/*.parquet')``) or :func:`load` / :func:`show` / :func:`query`.

Write rules, so that a reader never trips and a crash never loses a finished trial:

* every file is written to a temporary sibling and renamed over the target (``atomic_path``), so a
  reader sees the old file or the new one, never half of one;
* ``trials.parquet`` is read-modify-written under an exclusive ``flock`` on ``<dir>/.lock``;
* a trial's predictions file is written *before* its row: a crash in between leaves a predictions
  file without a row (ignored by :meth:`ResultsStore.predictions` and :func:`query`, deleted by the
  next write, replaced when the trial is added again on resume), never a row whose predictions are
  missing;
* adding a trial id that is already present replaces its row and its predictions file.

Queries use DuckDB: in-process (no server), reads Parquet natively with projection and predicate
pushdown, and speaks plain SQL, which is what ``--where`` filters and ad-hoc joins need.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skinsweep.errors import ConfigError, DataError, short_list
from skinsweep.files import atomic_path

TRIALS = "trials.parquet"
PREDICTIONS_DIR = "predictions"
HISTORY_DIR = "history"
SWEEP_JSON = "sweep.json"
LOCK = ".lock"
FORMAT_VERSION = 1
STATUSES = ("completed", "pruned", "failed", "diverged")
SPLITS = ("val", "test")

# Per-split metrics stored as val_<m> / test_<m>; skinsweep.metrics.binary_metrics returns these keys.
# (Listed here rather than imported so that reading results does not import scikit-learn.)
METRICS: tuple[str, ...] = ("auc", "ap", "accuracy", "precision", "recall", "specificity", "f1", "ece",
                            "brier", "loss", "n", "n_pos")
_COUNT_METRICS = ("n", "n_pos")
VERSION_KEYS: tuple[str, ...] = ("skinsweep", "torch", "timm", "open_clip", "python")

_I, _F, _S = pa.int64(), pa.float64(), pa.string()
_TS = pa.timestamp("us", tz="UTC")

# Columns every trials.parquet has, with fixed types, in order. Hyperparameters (one column per
# TrialConfig field, whatever the config holds) go between "status" and "best_epoch"; extra columns
# (``extra=`` keys such as pruned_at_epoch, attempts) go after "finished_at".
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
# Optional extras with a known type (so that e.g. an all-null first value does not decide it).
_EXTRA_TYPES: dict[str, pa.DataType] = {"pruned_at_epoch": _I, "attempts": _I}

# Every predictions/<trial_id>.parquet is cast to exactly this schema, so pandas, pyarrow.dataset and
# DuckDB read the folder as one table with the same types for every trial.
PREDICTIONS_SCHEMA = pa.schema([
    ("image_id", _S), ("lesion_id", _S), ("label", pa.int8()), ("dx", _S), ("logit", pa.float32()),
    ("prob", pa.float32()), ("split", _S), ("epoch", pa.int32()), ("trial_id", _S), ("backbone", _S),
    ("mode", _S), ("split_hash", _S), ("config_hash", _S), ("recipe_hash", _S), ("sweep", _S),
])
# The ``predictions`` view of :func:`query` leaves out the per-trial columns that ``trials`` also has, so
# that ``predictions JOIN trials USING (trial_id)`` has no ambiguous names (the files keep them all).
QUERY_PREDICTION_COLUMNS: tuple[str, ...] = ("trial_id", "image_id", "lesion_id", "label", "dx", "logit", "prob",
                                             "split", "epoch", "sweep")
_REQUIRED_PREDICTION_COLUMNS = ("image_id", "label", "logit", "prob", "split")

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

DEFAULT_COLUMNS: tuple[str, ...] = ("trial_id", "status", "backbone", "mode", "lr", "pos_weight", "best_epoch",
                                    "val_auc", "val_ap", "test_auc", "test_ap", "runtime_s")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


# --------------------------------------------------------------------------------------------------
# Writing: the store
# --------------------------------------------------------------------------------------------------

class ResultsStore:
    """Read-write access to one sweep folder (created on the first write).

    Args:
        root: the sweep folder, ``<storage>/<name>``; a local or shared (NFS) path.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"results folder {self.root} is a file; pass a folder (e.g. results/<sweep>)")

    @property
    def trials_path(self) -> Path:
        return self.root / TRIALS

    @property
    def predictions_dir(self) -> Path:
        return self.root / PREDICTIONS_DIR

    def predictions_path(self, trial_id: str) -> Path:
        return self.predictions_dir / f"{_check_id(trial_id)}.parquet"

    # ---- writing ----------------------------------------------------------------------------------

    def add_trial(
        self,
        summary: dict,
        *,
        predictions: pd.DataFrame | str | Path | None,
        status: str | None = None,
        extra: dict | None = None,
    ) -> None:
        """Record one trial (replacing any earlier row and predictions file with the same id).

        Args:
            summary: the trial's ``summary.json`` content (``trial_id`` required; ``config``, ``val``,
                ``test``, hashes, versions ... used when present).
            predictions: per-image predictions (a DataFrame, a ``predictions.parquet`` path, or the
                trial folder holding one), or None when the trial produced none (pruned, diverged).
            status: overrides ``summary["status"]`` (e.g. ``"pruned"``).
            extra: more columns for the row: node, cpus, gpus, checkpoint, recipe_hash, error,
                started_at / finished_at (datetime, ISO string or epoch seconds), pruned_at_epoch, ...
        """
        if not isinstance(summary, dict) or not summary.get("trial_id"):
            raise ConfigError("add_trial: summary must be a dict with a 'trial_id' (the trial's summary.json)")
        trial_id = _check_id(str(summary["trial_id"]))
        extra = dict(extra or {})
        for k in ("trial_id", "status"):
            if k in extra:
                raise ConfigError(f"add_trial({trial_id}): extra may not set {k!r}; pass status= instead")
        table = moved = None
        if predictions is not None:
            table, moved, source = _prediction_table(predictions, summary, extra)
            if "checkpoint" not in extra and source is not None:
                ckpt = (summary.get("artefacts") or {}).get("checkpoint")
                if ckpt and (source.parent / ckpt).is_file():
                    extra["checkpoint"] = str((source.parent / ckpt).resolve())
        row, hints = _trial_row(summary, status, {**(moved or {}), **extra})
        self._write(trial_id, row, hints, table, _history_table(summary.get("history"), trial_id))

    def add_failed(self, trial_id: str, config: dict, error: str, extra: dict | None = None) -> None:
        """Record a trial that crashed: status ``failed``, its config, the error text, no predictions."""
        self.add_trial({"trial_id": trial_id, "status": "failed", "config": dict(config or {})},
                       predictions=None, extra={**(extra or {}), "error": str(error)})

    def remove_trials(self, trial_ids: Iterable[str]) -> None:
        """Drop these trials' rows and predictions files (a resumed sweep discards trials that its
        restored Ray Tune state never knew of, so that it ends with exactly ``num_samples`` trials)."""
        ids = set(trial_ids)
        if not ids or not self.trials_path.is_file():
            return
        with _locked(self.root / LOCK):
            old = self._read_trials_table()
            keep = old.filter(pc.invert(pc.is_in(old["trial_id"], value_set=pa.array(sorted(ids)))))
            with atomic_path(self.trials_path) as tmp:
                pq.write_table(keep, tmp)
            self._tidy(set(keep["trial_id"].to_pylist()))

    def _write(self, trial_id: str, row: dict, hints: dict, table: pa.Table | None,
               history: pa.Table | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / LOCK):
            # 1. the per-trial files first (see the module docstring for why this order)
            for target, content in ((self.predictions_path(trial_id), table),
                                    (self.root / HISTORY_DIR / f"{trial_id}.parquet", history)):
                if content is not None:
                    target.parent.mkdir(exist_ok=True)
                    with atomic_path(target) as tmp:
                        pq.write_table(content, tmp)
                elif target.exists():
                    target.unlink()
            # 2. then the row: read, drop the old row with this id, append, rewrite atomically
            old = self._read_trials_table()
            if old is not None:
                old = old.filter(pc.not_equal(old["trial_id"], trial_id))
            new = _merge(old, row, hints)
            with atomic_path(self.trials_path) as tmp:
                pq.write_table(new, tmp)
            self._tidy(set(new["trial_id"].to_pylist()))

    def _tidy(self, ids: set[str]) -> None:
        """Remove what an earlier crashed write left (we hold the lock, so no write is in flight):
        predictions files without a row, which raw readers of predictions/ would otherwise see, and
        temporary files of a killed process."""
        history = self.root / HISTORY_DIR
        leftovers = [*self.root.glob(f".{TRIALS}.*.tmp"), *self.predictions_dir.glob(".*.parquet.*.tmp"),
                     *history.glob(".*.parquet.*.tmp")]
        leftovers += [f for d in (self.predictions_dir, history) for f in d.glob("*.parquet") if f.stem not in ids]
        for f in leftovers:
            f.unlink(missing_ok=True)

    # ---- reading ----------------------------------------------------------------------------------

    def _read_trials_table(self) -> pa.Table | None:
        if not self.trials_path.is_file():
            return None
        try:
            return pq.read_table(self.trials_path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.trials_path} is unreadable ({_first_line(e)}); restore it from a backup "
                            "or re-create it with `skinsweep sweep --resume`") from None

    def trial_ids(self) -> set[str]:
        """Ids of the trials recorded so far (what a resumed sweep must not repeat)."""
        if not self.trials_path.is_file():
            return set()
        return set(pq.read_table(self.trials_path, columns=["trial_id"])["trial_id"].to_pylist())

    def trials(self) -> pd.DataFrame:
        """The trials table (one row per trial); empty with the fixed columns before the first trial."""
        table = self._read_trials_table()
        if table is None:
            return pa.schema(list(TRIAL_COLUMNS.items())).empty_table().to_pandas()
        return table.to_pandas()

    def prediction_files(self, trial_ids: set[str] | None = None) -> list[Path]:
        """Predictions files of recorded trials (in trials.parquet order), optionally only ``trial_ids``."""
        if not self.trials_path.is_file():
            return []
        ids = pq.read_table(self.trials_path, columns=["trial_id"])["trial_id"].to_pylist()
        files = [self.predictions_dir / f"{t}.parquet" for t in ids if trial_ids is None or t in trial_ids]
        return [f for f in files if f.is_file()]

    def history(self, trial_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Per-epoch records (``trial_id, epoch, train_loss, val_loss, val_auc, …``) of recorded trials;
        trials recorded without a history (failed before an epoch, or by an older skinsweep) have none."""
        ids = self.trial_ids() if trial_ids is None else set(trial_ids) & self.trial_ids()
        frames = [pd.read_parquet(f) for t in sorted(ids) if (f := self.root / HISTORY_DIR / f"{t}.parquet").is_file()]
        if not frames:
            return pd.DataFrame({"trial_id": pd.Series(dtype=str), "epoch": pd.Series(dtype="int64")})
        return pd.concat(frames, ignore_index=True)

    def predictions(self, trial_ids: str | Iterable[str] | None = None, split: str | None = None) -> pd.DataFrame:
        """Per-image predictions of the recorded trials, with :data:`PREDICTIONS_SCHEMA` columns.

        Args:
            trial_ids: a trial id or an iterable of ids (default: all). Ids not in trials.parquet are
                an error; recorded trials without predictions (failed, pruned) contribute no rows.
            split: ``"val"`` or ``"test"`` (default: both).
        """
        import pyarrow.dataset as ds

        wanted = None
        if trial_ids is not None:
            wanted = {trial_ids} if isinstance(trial_ids, str) else {str(t) for t in trial_ids}
            unknown = sorted(wanted - self.trial_ids())
            if unknown:
                raise DataError(f"{self.trials_path} has no trial(s) {short_list(unknown)}; "
                                "list them with `skinsweep results show`")
        if split is not None and split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        files = self.prediction_files(wanted)
        if not files:
            return PREDICTIONS_SCHEMA.empty_table().to_pandas()
        dataset = ds.dataset([str(f) for f in files], schema=PREDICTIONS_SCHEMA, format="parquet")
        table = dataset.to_table(filter=(ds.field("split") == split) if split else None)
        return table.to_pandas()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock) held for one read-modify-write of the store."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_id(trial_id: str) -> str:
    # The id names a file that pyarrow / DuckDB globs must pick up: no separators, no leading . or _
    # (pyarrow.dataset skips files starting with those).
    if not isinstance(trial_id, str) or not _SAFE_ID.match(trial_id):
        raise ConfigError(f"trial id {trial_id!r} cannot name a predictions file; use letters, digits and "
                          "_ . = + - (not starting with _ or .)")
    return trial_id


# --------------------------------------------------------------------------------------------------
# Building one trial row
# --------------------------------------------------------------------------------------------------

def _trial_row(summary: dict, status: str | None, extra: dict) -> tuple[dict, dict]:
    """One trials.parquet row from a trial summary, plus Arrow type hints for columns whose value is null.

    Returns ``(row, hints)``; ``row`` maps column -> Python value, in column order (params first).
    """
    trial_id = str(summary["trial_id"])
    status = status or summary.get("status")
    if status not in STATUSES:
        raise ConfigError(f"trial {trial_id}: status {status!r} is not one of {', '.join(STATUSES)}")
    row: dict[str, Any] = {"trial_id": trial_id, "status": status}
    hints: dict[str, pa.DataType] = {}

    # hyperparameters: one column per config field; dicts / lists as JSON text
    config = summary.get("config") or {}
    resolved = {"head": summary.get("head") if config.get("head") == "auto" else config.get("head")}
    params: list[str] = []
    for key, value in config.items():
        col = _RENAMED_PARAMS.get(key, key)
        if col in TRIAL_COLUMNS or col in extra or col in QUERY_PREDICTION_COLUMNS:
            col = f"param_{key}"  # never shadow a result column, nor clash in predictions JOIN trials
        value = _plain(value)
        rule = _APPLIES_WHEN.get(key)
        if rule is not None:
            decider = resolved[rule[0]] if rule[0] in resolved else config.get(rule[0])
            if decider not in (None, "auto") and decider not in rule[1]:  # unknown → keep the value
                if value is not None:
                    hints[col] = _infer_type(value)
                value = None
        row[col] = value
        params.append(col)

    metrics = {"val": summary.get("val") or {}, "test": summary.get("test") or {}}
    versions = summary.get("versions") or {}
    base = {
        "best_epoch": summary.get("best_epoch"),
        "epochs_run": summary.get("epochs_run"),
        **{f"{s}_{m}": metrics[s].get(m) for s in SPLITS for m in METRICS},
        # metrics a later skinsweep adds still get their columns
        **{f"{s}_{m}": v for s in SPLITS for m, v in metrics[s].items() if m not in METRICS},
        "runtime_s": summary.get("runtime_s"),
        "split_hash": summary.get("split_hash"),
        "recipe_hash": summary.get("recipe_hash"),
        "config_hash": summary.get("config_hash"),
        "dataset_hash": summary.get("dataset_hash"),
        "n_params": summary.get("n_params"),
        "n_trainable": summary.get("n_trainable"),
        "device_used": summary.get("device"),
        "head_used": summary.get("head"),
        "augment_used": summary.get("augment"),
        **{f"{k}_version": v for k, v in versions.items()},
        "error": summary.get("error"),
        "started_at": summary.get("started_at"),
        "finished_at": summary.get("finished_at"),
    }
    base.update(extra)
    # Timestamps: finished_at defaults to when the trial is recorded, started_at to finished - runtime.
    if base.get("finished_at") is None:
        base["finished_at"] = dt.datetime.now(dt.timezone.utc)
    base["finished_at"] = _to_utc(base["finished_at"], "finished_at")
    if base.get("started_at") is None and _finite(base.get("runtime_s")):
        base["started_at"] = base["finished_at"] - dt.timedelta(seconds=float(base["runtime_s"]))
    base["started_at"] = _to_utc(base["started_at"], "started_at")

    for col, value in base.items():
        typ = TRIAL_COLUMNS.get(col) or _EXTRA_TYPES.get(col)
        row[col] = _coerce(value, typ, f"trial {trial_id}: column {col}") if typ is not None else _plain(value)
    row["_params"] = params
    return row, hints


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
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, (bool, int, float, str)):
        return str(value)
    return value


def _coerce(value: Any, typ: pa.DataType, what: str) -> Any:
    value = _plain(value)
    if value is None:
        return None
    try:
        if typ == _I:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ == _F:
            return float(value)
        if typ == _S:
            return str(value)
        return _to_utc(value, what)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{what}: expected {typ}, got {value!r}") from None


def _to_utc(value: Any, what: str) -> dt.datetime | None:
    """datetime / pandas Timestamp / ISO string / epoch seconds → aware UTC datetime (naive = UTC)."""
    if value is None:
        return None
    try:
        ts = pd.Timestamp(value, unit="s") if isinstance(value, (int, float)) else pd.Timestamp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a time; pass a datetime, ISO string or epoch seconds") from None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _infer_type(value: Any) -> pa.DataType | None:
    if value is None:
        return None
    typ = pa.array([value]).type
    return _TS if pa.types.is_timestamp(typ) else typ


def _unify(types: list[pa.DataType]) -> pa.DataType:
    """One column type for values seen with ``types``: equal → it; ints + floats → float64; else string."""
    types = [t for t in types if t is not None and not pa.types.is_null(t)]
    if not types:
        return _S
    if all(t == types[0] for t in types):
        return types[0]
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return _F
    return _S


def _merge(old: pa.Table | None, row: dict, hints: dict) -> pa.Table:
    """``old`` (rows of other trials) plus ``row``, with unified types and canonical column order."""
    row = dict(row)
    new_params = row.pop("_params")
    meta = _meta(old)
    params = list(meta.get("params", []))
    params += [p for p in new_params if p not in params]
    n_old = 0 if old is None else old.num_rows
    old_cols = [] if old is None else old.column_names

    extras = [c for c in old_cols if c not in TRIAL_COLUMNS and c not in params]
    extras += [c for c in row if c not in TRIAL_COLUMNS and c not in params and c not in extras]
    order = list(_LEAD) + params + [c for c in TRIAL_COLUMNS if c not in _LEAD] + extras

    arrays, fields = [], []
    for col in order:
        old_arr = old[col] if old is not None and col in old_cols else None
        value = row.get(col)
        if col in TRIAL_COLUMNS:
            typ = TRIAL_COLUMNS[col]
        else:
            # a column that held only nulls so far has no real type yet
            old_t = old_arr.type if old_arr is not None and old_arr.null_count < len(old_arr) else None
            typ = _unify([old_t, _infer_type(value) or hints.get(col) or _EXTRA_TYPES.get(col)])
        if old_arr is None:
            old_arr = pa.nulls(n_old, typ)
        elif old_arr.type != typ:
            old_arr = pc.cast(old_arr, typ)
        if value is not None and typ == _S and not isinstance(value, str):
            value = str(value)
        chunks = old_arr.chunks if isinstance(old_arr, pa.ChunkedArray) else [old_arr]
        arrays.append(pa.chunked_array([*chunks, pa.array([value], type=typ)], type=typ))
        fields.append(pa.field(col, typ))
    meta = {"skinsweep": json.dumps({"format": FORMAT_VERSION, "params": params})}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta)).combine_chunks()


def _meta(table: pa.Table | None) -> dict:
    raw = (table.schema.metadata or {}).get(b"skinsweep") if table is not None else None
    return json.loads(raw) if raw else {}


# --------------------------------------------------------------------------------------------------
# Predictions: one fixed schema
# --------------------------------------------------------------------------------------------------

def _history_table(history: Any, trial_id: str) -> pa.Table | None:
    """A trial's per-epoch records as a table (numeric columns only; ``trial_id`` first), or None."""
    if not history:
        return None
    rows = [{k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for rec in history if isinstance(rec, dict) and "epoch" in rec]
    if not rows:
        return None
    # a retried trial reports its epochs again: keep the last attempt's record of each epoch
    df = pd.DataFrame(rows).drop_duplicates("epoch", keep="last").sort_values("epoch")
    df["epoch"] = df["epoch"].astype("int64")
    df.insert(0, "trial_id", trial_id)
    return pa.Table.from_pandas(df, preserve_index=False)


def _prediction_table(predictions: pd.DataFrame | str | Path, summary: dict,
                      extra: dict) -> tuple[pa.Table, dict, Path | None]:
    """Cast a trial's predictions to :data:`PREDICTIONS_SCHEMA`.

    Missing identity columns are filled from the summary; other constant columns are returned (to
    become columns of the trial's row); a non-constant unknown column is an error. Returns
    ``(table, moved, source_file_or_None)``.
    """
    trial_id = str(summary["trial_id"])
    source = None
    if isinstance(predictions, pd.DataFrame):
        table = pa.Table.from_pandas(predictions, preserve_index=False)
        where = f"predictions of trial {trial_id}"
    else:
        source = Path(predictions)
        if source.is_dir():
            source = source / "predictions.parquet"
        if not source.is_file():
            raise DataError(f"predictions file {source} does not exist; pass the trial's predictions.parquet "
                            "or predictions=None")
        try:
            table = pq.read_table(source)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{source} is not a readable Parquet file ({_first_line(e)}); re-run the trial") from None
        where = str(source)
    table = table.replace_schema_metadata(None)

    missing = [c for c in _REQUIRED_PREDICTION_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{where} lacks column(s) {', '.join(missing)}; it must have "
                        f"{', '.join(_REQUIRED_PREDICTION_COLUMNS)} (as written by skinsweep.train.loop)")
    if "trial_id" in table.column_names:
        ids = set(pc.unique(table["trial_id"]).to_pylist()) - {None}
        if ids - {trial_id}:
            raise DataError(f"{where} holds rows of trial(s) {short_list(sorted(ids - {trial_id}))}, not "
                            f"{trial_id}; pass that trial's own predictions")
    config = summary.get("config") or {}
    fill = {"trial_id": trial_id, "epoch": summary.get("best_epoch"), "backbone": config.get("backbone"),
            "mode": config.get("mode"), "split_hash": summary.get("split_hash"),
            "config_hash": summary.get("config_hash"),
            "recipe_hash": extra.get("recipe_hash", summary.get("recipe_hash"))}

    n = table.num_rows
    columns = []
    for field in PREDICTIONS_SCHEMA:
        if field.name in table.column_names:
            col = table[field.name]
            try:
                col = pc.cast(col, field.type) if col.type != field.type else col
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{where}: column {field.name} cannot be stored as {field.type} "
                                f"({_first_line(e)}); fix the predictions") from None
            if field.name == "trial_id":
                col = pc.fill_null(col, trial_id)
        else:
            col = pa.array([fill.get(field.name)] * n, type=field.type)
        columns.append(col)
    out = pa.Table.from_arrays(columns, schema=PREDICTIONS_SCHEMA)

    moved = {}
    if "recipe_hash" in table.column_names:  # the trials row carries it too, when nothing else gives it
        hashes = set(pc.unique(table["recipe_hash"]).to_pylist()) - {None}
        if len(hashes) == 1:
            moved["recipe_hash"] = hashes.pop()
    for name in table.column_names:
        if name in PREDICTIONS_SCHEMA.names:
            continue
        col = table[name]
        if n and pc.count_distinct(col, mode="all").as_py() > 1:
            raise DataError(f"{where}: column {name!r} varies between rows; predictions files share one fixed "
                            f"schema ({', '.join(PREDICTIONS_SCHEMA.names)}); drop {name!r} or make it constant")
        moved[name] = col[0].as_py() if n else None  # a per-trial constant: it becomes a trials column
    return out, moved, source


# --------------------------------------------------------------------------------------------------
# Reading: load / show / query
# --------------------------------------------------------------------------------------------------

class Results:
    """A sweep's results: ``.trials`` (read now) and ``.predictions`` (read on first access)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = ResultsStore(path)
        self.trials: pd.DataFrame = self.store.trials()

    @cached_property
    def predictions(self) -> pd.DataFrame:
        return self.store.predictions()

    @cached_property
    def sweep(self) -> dict:
        """``sweep.json`` (recipe, hashes) when the sweep wrote one, else ``{}``."""
        return _sweep_json(self.path)

    def show(self, **kwargs: Any) -> pd.DataFrame:
        return show(self.path, **kwargs)

    def query(self, sql: str) -> pd.DataFrame:
        return query(self.path, sql)

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r}, {len(self.trials)} trials)"


def load(path: str | Path) -> Results:
    """Open a sweep folder (or its trials.parquet) for reading."""
    return Results(_sweep_dir(path))


def _sweep_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.name == TRIALS and p.is_file():
        p = p.parent
    if not p.is_dir():
        raise DataError(f"results folder {p} does not exist; pass a sweep folder such as results/<sweep>")
    if not (p / TRIALS).is_file():
        inside = sorted(str(d) for d in p.glob(f"*/{TRIALS}"))
        hint = (f"did you mean {short_list([str(Path(d).parent) for d in inside], 3)}?" if inside
                else "pass the folder a sweep wrote (results/<sweep>), or run `skinsweep sweep` first")
        raise DataError(f"{p} is not a skinsweep sweep folder (no {TRIALS}); {hint}")
    return p


def _sweep_json(path: Path) -> dict:
    try:
        return json.loads((path / SWEEP_JSON).read_text())
    except (OSError, ValueError):
        return {}


def _connect(path: Path, *, predictions: bool):
    """A DuckDB connection with views ``trials`` (and ``predictions``) over the sweep's Parquet."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"CREATE VIEW trials AS SELECT * FROM read_parquet({_sql_str(path / TRIALS)})")
    if predictions:
        cols = ", ".join(_ident(c) for c in QUERY_PREDICTION_COLUMNS)
        files = ResultsStore(path).prediction_files()
        if files:
            # explicit files of recorded trials: an orphan left by a crash is not read
            listing = ", ".join(_sql_str(f) for f in files)
            con.execute(f"CREATE VIEW predictions AS SELECT {cols} FROM read_parquet([{listing}])")
        else:
            con.register("_no_predictions", PREDICTIONS_SCHEMA.empty_table())
            con.execute(f"CREATE VIEW predictions AS SELECT {cols} FROM _no_predictions")
    return con


def _sql_str(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _duckdb_message(e: Exception) -> str:
    """DuckDB's message in one line (it spans several, with a caret diagram after 'LINE n:')."""
    lines = []
    for ln in str(e).splitlines():
        if ln.startswith("LINE "):
            break
        if ln.strip():
            lines.append(ln.strip())
    return " ".join(lines) or type(e).__name__


def query(path: str | Path, sql: str) -> pd.DataFrame:
    """Run DuckDB SQL over the views ``trials`` (trials.parquet) and ``predictions`` (predictions/).

    ``predictions`` has the per-image columns (:data:`QUERY_PREDICTION_COLUMNS`); per-trial columns such as
    backbone, mode or the hashes come from ``trials`` (``JOIN trials USING (trial_id)``), so names never clash.

    Example: ``query(d, "SELECT backbone, avg(prob) FROM predictions JOIN trials USING (trial_id) GROUP BY 1")``.
    """
    import duckdb

    p = _sweep_dir(path)
    con = _connect(p, predictions=True)
    try:
        rel = con.sql(sql)
        if rel is None:
            raise ConfigError(f"query on {p}: the SQL returned no table; write a SELECT over trials / predictions")
        return rel.df()
    except duckdb.Error as e:
        raise ConfigError(f"query on {p} failed: {_duckdb_message(e)} (views: trials = one row per trial; "
                          f"predictions = {', '.join(QUERY_PREDICTION_COLUMNS)}, join trials USING (trial_id) "
                          "for per-trial columns)") from None
    finally:
        con.close()


def sort_ascending(column: str) -> bool:
    """Sort direction for ``show``: metrics by their direction (loss, ece, brier ascending; the rest
    descending), with a ``val_`` / ``test_`` prefix stripped; any other column ascending."""
    from skinsweep.metrics import HIGHER_IS_BETTER

    metric = re.sub(r"^(val|test)_", "", column)
    return not HIGHER_IS_BETTER[metric] if metric in HIGHER_IS_BETTER else True


def show(
    path: str | Path,
    *,
    top: int | None = 10,
    by: str = "val_auc",
    where: str | None = None,
    columns: list[str] | None = None,
    ascending: bool | None = None,
) -> pd.DataFrame:
    """The best trials: filtered by ``where``, sorted by ``by``, the first ``top``.

    Args:
        path: sweep folder.
        top: rows to return (None = all).
        by: column to sort by; metrics sort best first (see :func:`sort_ascending`); nulls last.
        where: SQL boolean expression over trials columns, e.g. ``"backbone = 'dino_vits16' AND lr < 1e-3"``.
        columns: columns to return (default :data:`DEFAULT_COLUMNS` that exist, plus ``by``).
        ascending: override the sort direction.

    Returns:
        A DataFrame; ``df.attrs["header"]`` holds a one-line description of the sweep.
    """
    import duckdb

    p = _sweep_dir(path)
    available = pq.read_schema(p / TRIALS).names
    if by not in available:
        raise ConfigError(f"cannot sort by {by!r}: no such column in {p / TRIALS}{_did_you_mean(by, available)}; "
                          f"columns: {', '.join(available)}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"top must be a positive number of rows (or None for all), got {top!r}")
    if columns is None:
        columns = [c for c in DEFAULT_COLUMNS if c in available] + ([by] if by not in DEFAULT_COLUMNS else [])
    else:
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise ConfigError(f"unknown column(s) {', '.join(unknown)} in {p / TRIALS}"
                              f"{_did_you_mean(unknown[0], available)}; columns: {', '.join(available)}")
    asc = sort_ascending(by) if ascending is None else ascending
    select = ", ".join(_ident(c) for c in columns)
    sql = (f"SELECT {select} FROM trials" + (f" WHERE ({where})" if where and where.strip() else "")
           + f" ORDER BY {_ident(by)} {'ASC' if asc else 'DESC'} NULLS LAST, trial_id"
           + (f" LIMIT {top}" if top is not None else ""))
    con = _connect(p, predictions=False)
    try:
        df = con.sql(sql).df()
    except duckdb.Error as e:
        raise ConfigError(f"--where {where!r} is not a valid filter on {p / TRIALS}: {_duckdb_message(e)}") from None
    finally:
        con.close()
    df.attrs["header"] = header(p)
    return df


def header(path: str | Path) -> str:
    """One line about a sweep: name, trial counts by status, recipe and split hashes."""
    p = _sweep_dir(path)
    info = _sweep_json(p)
    status = pq.read_table(p / TRIALS, columns=["status"])["status"].to_pylist()
    counts = ", ".join(f"{s} {status.count(s)}" for s in STATUSES if status.count(s))
    parts = [f"sweep {info.get('name') or p.name}: {len(status)} trials" + (f" ({counts})" if counts else "")]
    parts += [f"{k.replace('_', ' ')} {info[k]}" for k in ("recipe_hash", "split_hash") if info.get(k)]
    return " · ".join(parts)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["DEFAULT_COLUMNS", "METRICS", "PREDICTIONS_SCHEMA", "QUERY_PREDICTION_COLUMNS", "Results", "ResultsStore", "TRIAL_COLUMNS",
           "header", "load", "query", "show", "sort_ascending"]
