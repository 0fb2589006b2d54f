"""The Parquet results store — the system of record of a sweep — and its query API.

Layout of one sweep folder ``<storage>/<name>/``::

    trials.parquet              one row per trial: id, status, every hyperparameter as a column,
                                val_/test_ metrics at the selected epoch, runtime, resources, hashes
    predictions/<trial>.parquet one row per image x split of one trial, all files one fixed schema
    history/<trial>.parquet     one row per epoch of one trial (epoch, train_loss, val_loss, val_auc …),
                                pruned trials included (what the report's training curves are drawn from)
    sweep.json                  written by the sweep (recipe, hashes); optional here

Only the sweep driver writes (through :class:`ResultsStore`, :mod:`.store`); anyone reads, with pandas
(``pd.read_parquet("<dir>/predictions")``), pyarrow (``pyarrow.dataset.dataset(...)``), DuckDB
(``read_parquet('<dir>/predictions/*.parquet')``) or :func:`load` / :func:`show` / :func:`query`
(:mod:`.query`). The columns and their types are defined in :mod:`.schema`.
"""

from skinsweep.results.query import DEFAULT_COLUMNS, SWEEP_JSON, Results, header, load, query, show, sort_ascending, validation_noise
from skinsweep.results.schema import METRICS, PARAM_TYPES, PREDICTIONS_SCHEMA, QUERY_PREDICTION_COLUMNS, TRIAL_COLUMNS
from skinsweep.results.store import HISTORY_DIR, PREDICTIONS_DIR, TRIALS, ResultsStore

__all__ = ["DEFAULT_COLUMNS", "METRICS", "PARAM_TYPES", "PREDICTIONS_SCHEMA", "QUERY_PREDICTION_COLUMNS", "Results",
           "ResultsStore", "TRIAL_COLUMNS", "header", "load", "query", "show", "sort_ascending", "validation_noise"]
