"""Writing a sweep's results: :class:`ResultsStore`, the only writer of a sweep folder.

Write rules, so that a reader never trips and a crash never loses a finished trial:

* every file is written to a temporary sibling and renamed over the target (``atomic_path``), so a
  reader sees the old file or the new one, never half of one;
* ``trials.parquet`` is read-modify-written under an exclusive ``flock`` on ``<dir>/.lock``;
* a trial's predictions file is written *before* its row: a crash (a killed process; a failed write
  takes its files back) in between leaves a predictions file without a row (ignored by :meth:`ResultsStore.predictions` and :func:`skinsweep.results.query`,
  deleted by the next write, replaced when the trial is added again on resume), never a row whose
  predictions are missing;
* adding a trial id that is already present replaces its row and its predictions file;
* a write that fails (disk full, quota, revoked permission) raises :class:`~skinsweep.errors.StoreWriteError`
  (one line naming the file, what to do, and ``--resume``) and leaves every file written before as it was.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skinsweep.errors import ConfigError, DataError, StoreWriteError, first_line, short_list
from skinsweep.files import atomic_path, read_parquet_once
from skinsweep.results.schema import PREDICTIONS_SCHEMA, SPLITS, TRIAL_COLUMNS, append_row, trial_row

TRIALS = "trials.parquet"
PREDICTIONS_DIR = "predictions"
HISTORY_DIR = "history"
LOCK = ".lock"
_REQUIRED_PREDICTION_COLUMNS = ("image_id", "label", "logit", "prob", "split")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


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
        row = trial_row(summary, status, {**(moved or {}), **extra})
        self._write(trial_id, row, table, _history_table(summary.get("history"), trial_id))

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
        try:
            with _locked(self.root / LOCK):
                old = self._read_trials_table()
                self._replace_trials(old.filter(pc.invert(pc.is_in(old["trial_id"],
                                                                   value_set=pa.array(sorted(ids))))))
        except OSError as e:
            raise StoreWriteError(self.trials_path, e, kept=self.trials_path) from None

    def _write(self, trial_id: str, row: pa.Table, table: pa.Table | None, history: pa.Table | None) -> None:
        target, written = self.root / LOCK, []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked(target):
                try:
                    # 1. the per-trial files first (see the module docstring for why this order)
                    for target, content in ((self.predictions_dir / f"{trial_id}.parquet", table),
                                            (self.root / HISTORY_DIR / f"{trial_id}.parquet", history)):
                        if content is not None:
                            target.parent.mkdir(exist_ok=True)
                            with atomic_path(target) as tmp:
                                pq.write_table(content, tmp)
                            written.append(target)
                        elif target.exists():
                            target.unlink()
                    # 2. then the row: read, drop the old row with this id, append, rewrite atomically
                    old = self._read_trials_table()
                    if old is not None:
                        old = old.filter(pc.not_equal(old["trial_id"], trial_id))
                    target = self.trials_path
                    self._replace_trials(append_row(old, row))
                except OSError:
                    # a failed write of a new trial: take back its files, so that raw readers of predictions/
                    # see no rows of a trial trials.parquet lacks (a re-added trial's files stay: its row too)
                    if trial_id not in set(self._ids_in_order()):
                        for f in written:
                            f.unlink(missing_ok=True)
                    raise
        except OSError as e:  # disk full, quota, revoked permission: nothing written before is lost
            raise StoreWriteError(target, e, kept=self.trials_path if self.trials_path.is_file() else None) from None

    def _replace_trials(self, table: pa.Table) -> None:
        """Write ``table`` as trials.parquet (atomically; under the lock), then remove what an earlier crashed
        write left (no write is in flight): predictions / history files without a row, which raw readers of
        predictions/ would otherwise see, and temporary files of a killed process."""
        with atomic_path(self.trials_path) as tmp:
            pq.write_table(table, tmp)
        ids = set(table["trial_id"].to_pylist())
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
            return read_parquet_once(self.trials_path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.trials_path} is unreadable ({first_line(e)}); restore it from a backup "
                            "or re-create it with `skinsweep sweep --resume`") from None

    def trial_ids(self) -> set[str]:
        """Ids of the trials recorded so far (what a resumed sweep must not repeat)."""
        return set(self._ids_in_order())

    def _ids_in_order(self) -> list[str]:
        if not self.trials_path.is_file():
            return []
        return read_parquet_once(self.trials_path, columns=["trial_id"])["trial_id"].to_pylist()

    def trials(self) -> pd.DataFrame:
        """The trials table (one row per trial); empty with the fixed columns before the first trial."""
        table = self._read_trials_table()
        if table is None:
            return pa.schema(TRIAL_COLUMNS).empty_table().to_pandas()
        return table.to_pandas()

    def prediction_files(self, trial_ids: set[str] | None = None) -> list[Path]:
        """Predictions files of recorded trials (in trials.parquet order), optionally only ``trial_ids``."""
        files = [self.predictions_dir / f"{t}.parquet" for t in self._ids_in_order()
                 if trial_ids is None or t in trial_ids]
        return [f for f in files if f.is_file()]

    def history(self, trial_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Per-epoch records (``trial_id, epoch, train_loss, val_loss, val_auc, …``) of recorded trials;
        trials recorded without a history (failed before an epoch, or by an older skinsweep) have none."""
        ids = self.trial_ids() if trial_ids is None else set(trial_ids) & self.trial_ids()
        files = [f for t in sorted(ids) if (f := self.root / HISTORY_DIR / f"{t}.parquet").is_file()]
        if not files:
            return pd.DataFrame({"trial_id": pd.Series(dtype=str), "epoch": pd.Series(dtype="int64")})
        # one Arrow concat, one conversion (not a DataFrame per file: 2,000 trials took 3 s that way);
        # files of trials with other per-epoch columns are unified, the missing values null
        tables = [read_parquet_once(f).replace_schema_metadata(None) for f in files]
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()

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
        for attempt in (1, 2):
            files = self.prediction_files(wanted)
            if not files:
                return PREDICTIONS_SCHEMA.empty_table().to_pandas()
            # a dataset scan opens each file twice (footer, then data); a trial re-recorded in between
            # (``--resume``) replaces its file, so a failed scan is retried once on a fresh listing
            try:
                dataset = ds.dataset([str(f) for f in files], schema=PREDICTIONS_SCHEMA, format="parquet")
                return dataset.to_table(filter=(ds.field("split") == split) if split else None).to_pandas()
            except (OSError, pa.ArrowException) as e:
                if attempt == 2:
                    raise DataError(f"predictions under {self.predictions_dir} are unreadable ({first_line(e)}); "
                                    "re-record the trial with `skinsweep sweep --resume`") from None
        raise AssertionError("unreachable")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock) held for one read-modify-write of the store."""
    import fcntl

    with open(path, "a") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _check_id(trial_id: str) -> str:
    # The id names a file that pyarrow / DuckDB globs must pick up: no separators, no leading . or _
    # (pyarrow.dataset skips files starting with those).
    if not _SAFE_ID.match(trial_id):
        raise ConfigError(f"trial id {trial_id!r} cannot name a predictions file; use letters, digits and "
                          "_ . = + - (not starting with _ or .)")
    return trial_id


def _history_table(history: Any, trial_id: str) -> pa.Table | None:
    """A trial's per-epoch records as a table (numeric columns only; ``trial_id`` first), or None."""
    rows = [{k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for rec in history or [] if isinstance(rec, dict) and "epoch" in rec]
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
            raise DataError(f"{source} is not a readable Parquet file ({first_line(e)}); re-run the trial") from None
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
        # trial_id: filled in, as its column may hold only this trial's id or null (checked above)
        if field.name in table.column_names and field.name != "trial_id":
            try:
                col = pc.cast(table[field.name], field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"{where}: column {field.name} cannot be stored as {field.type} "
                                f"({first_line(e)}); fix the predictions") from None
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


