"""Reading a sweep's results: :func:`load`, :func:`show`, :func:`query`, :func:`header`.

Queries use DuckDB: in-process (no server), reads Parquet natively with projection and predicate
pushdown, and speaks plain SQL, which is what ``--where`` filters and ad-hoc joins need.
"""

from __future__ import annotations

import itertools
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from skinsweep.errors import ConfigError, DataError, did_you_mean, short_list
from skinsweep.files import read_json, read_parquet_once, read_parquet_schema_once
from skinsweep.results.schema import PREDICTIONS_SCHEMA, QUERY_PREDICTION_COLUMNS, STATUSES
from skinsweep.results.store import TRIALS, ResultsStore

SWEEP_JSON = "sweep.json"
DEFAULT_COLUMNS: tuple[str, ...] = ("trial_id", "status", "backbone", "mode", "lr", "pos_weight", "best_epoch",
                                    "val_auc", "val_ap", "test_auc", "test_ap", "runtime_s")


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
        return read_json(self.path / SWEEP_JSON)

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


def _duckdb_views(path: Path, *, predictions: bool):
    """A DuckDB connection with views ``trials`` (and ``predictions``) over the sweep's Parquet.

    ``trials`` is one snapshot of trials.parquet read through one handle (a sweep replaces the file by
    rename after every trial; DuckDB's own ``read_parquet`` opens it once to bind and again to scan, and
    a rename in between made it read one version's footer against the other's bytes). The predictions
    files listed are those of the trials in that snapshot.
    """
    import duckdb

    con = duckdb.connect()
    trials = read_parquet_once(path / TRIALS)
    con.register("_trials", trials)
    con.execute("CREATE VIEW trials AS SELECT * FROM _trials")
    if predictions:
        cols = ", ".join(_ident(c) for c in QUERY_PREDICTION_COLUMNS)
        folder = ResultsStore(path).predictions_dir
        files = [f for t in trials["trial_id"].to_pylist() if (f := folder / f"{t}.parquet").is_file()]
        if files:
            # explicit files of recorded trials: an orphan left by a crash is not read
            listing = ", ".join(_sql_str(f) for f in files)
            con.execute(f"CREATE VIEW predictions AS SELECT {cols} FROM read_parquet([{listing}])")
        else:
            con.register("_no_predictions", PREDICTIONS_SCHEMA.empty_table())
            con.execute(f"CREATE VIEW predictions AS SELECT {cols} FROM _no_predictions")
    return con


def _with_views(path: Path, *, predictions: bool, run):
    """``run(con)`` on fresh views; retried once on fresh views when a file changed under DuckDB's scan
    (a trial re-recorded by ``--resume`` replaces its predictions file). SQL errors are not retried."""
    import duckdb

    for attempt in (1, 2):
        try:
            with _duckdb_views(path, predictions=predictions) as con:
                return run(con)
        except (duckdb.IOException, duckdb.InvalidInputException):
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _sql_str(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _duckdb_message(e: Exception) -> str:
    """DuckDB's message in one line (it spans several, with a caret diagram after 'LINE n:')."""
    lines = itertools.takewhile(lambda ln: not ln.startswith("LINE "), str(e).splitlines())
    return " ".join(ln.strip() for ln in lines if ln.strip()) or type(e).__name__


def query(path: str | Path, sql: str) -> pd.DataFrame:
    """Run DuckDB SQL over the views ``trials`` (trials.parquet) and ``predictions`` (predictions/).

    ``predictions`` has the per-image columns (:data:`QUERY_PREDICTION_COLUMNS`); per-trial columns such as
    backbone, mode or the hashes come from ``trials`` (``JOIN trials USING (trial_id)``), so names never clash.

    Example: ``query(d, "SELECT backbone, avg(prob) FROM predictions JOIN trials USING (trial_id) GROUP BY 1")``.
    """
    import duckdb

    p = _sweep_dir(path)
    def run(con):
        rel = con.sql(sql)
        if rel is None:
            raise ConfigError(f"query on {p}: the SQL returned no table; write a SELECT over trials / predictions")
        return rel.df()

    try:
        return _with_views(p, predictions=True, run=run)
    except duckdb.Error as e:
        raise ConfigError(f"query on {p} failed: {_duckdb_message(e)} (views: trials = one row per trial; "
                          f"predictions = {', '.join(QUERY_PREDICTION_COLUMNS)}, join trials USING (trial_id) "
                          "for per-trial columns)") from None


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
    available = read_parquet_schema_once(p / TRIALS).names
    if by not in available:
        raise ConfigError(f"cannot sort by {by!r}: no such column in {p / TRIALS}{did_you_mean(by, available)}; "
                          f"columns: {', '.join(available)}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"top must be a positive number of rows (or None for all), got {top!r}")
    if columns is None:
        columns = [c for c in DEFAULT_COLUMNS if c in available] + ([by] if by not in DEFAULT_COLUMNS else [])
    else:
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise ConfigError(f"unknown column(s) {', '.join(unknown)} in {p / TRIALS}"
                              f"{did_you_mean(unknown[0], available)}; columns: {', '.join(available)}")
    asc = sort_ascending(by) if ascending is None else ascending
    select = ", ".join(_ident(c) for c in columns)
    sql = (f"SELECT {select} FROM trials" + (f" WHERE ({where})" if where and where.strip() else "")
           + f" ORDER BY {_ident(by)} {'ASC' if asc else 'DESC'} NULLS LAST, trial_id"
           + (f" LIMIT {top}" if top is not None else ""))
    try:
        df = _with_views(p, predictions=False, run=lambda con: con.sql(sql).df())
    except duckdb.Error as e:
        raise ConfigError(f"--where {where!r} is not a valid filter on {p / TRIALS}: "
                          f"{_duckdb_message(e)}") from None
    df.attrs["header"] = header(p)
    return df


def validation_noise(path: str | Path, top: int = 10) -> str | None:
    """One line on how far apart trials must be on validation AUC before their order means something.

    The DeLong standard error of the best completed trial's validation AUC, from its stored validation
    predictions, against the spread of the ``top`` completed trials' validation AUCs. None when no
    completed trial has validation predictions with both classes.
    """
    from skinsweep.ensemble.stats import auc_se

    p = _sweep_dir(path)
    trials = read_parquet_once(p / TRIALS, columns=["trial_id", "status", "val_auc"]).to_pandas()
    done = trials[(trials["status"] == "completed") & trials["val_auc"].notna()]
    done = done.sort_values(["val_auc", "trial_id"], ascending=[False, True]).head(top)
    if done.empty:
        return None
    best = str(done["trial_id"].iloc[0])
    val = ResultsStore(p).predictions(best, split="val")
    try:
        est = auc_se(val["label"].to_numpy(), val["prob"].to_numpy())
    except (ConfigError, KeyError):  # no predictions kept, or one class only: nothing to say
        return None
    lo, hi = float(done["val_auc"].min()), float(done["val_auc"].max())
    spread = (f"the top {len(done)} completed trials span {lo:.3f}–{hi:.3f}" if len(done) > 1
              else "one completed trial")
    return (f"validation noise: the best trial's val AUC {est['auc']:.3f} has a DeLong standard error of "
            f"{est['se']:.3f} ({est['n_pos'] + est['n_neg']:,} images, {est['n_pos']:,} melanoma); {spread}: "
            f"trials closer than ~{2 * est['se']:.3f} (2 SE) are not told apart by this validation set")


def header(path: str | Path) -> str:
    """One line about a sweep: name, trial counts by status, recipe and split hashes."""
    p = _sweep_dir(path)
    info = read_json(p / SWEEP_JSON)
    status = read_parquet_once(p / TRIALS, columns=["status"])["status"].to_pylist()
    counts = ", ".join(f"{s} {status.count(s)}" for s in STATUSES if status.count(s))
    parts = [f"sweep {info.get('name') or p.name}: {len(status)} trials" + (f" ({counts})" if counts else "")]
    parts += [f"{k.replace('_', ' ')} {info[k]}" for k in ("recipe_hash", "split_hash") if info.get(k)]
    return " · ".join(parts)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
