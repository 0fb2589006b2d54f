"""``search.warm_start``: earlier sweeps' trials told to the Optuna study before it samples.

A second sweep then continues where the first stopped: TPE models the earlier results as if it had run
them. Only trials that are *points of this space* are told: every searched parameter that applies to
the trial (conditions included) must have a value this space can sample, every setting this sweep
fixes (epochs, schedule, tta, ...) must have had the same value, and the trial must have been scored on
the same validation split (the metric is only comparable there). Completed trials are
told as finished with their selected epoch's metric; pruned ones as pruned, with the metric at the
epoch they were stopped (TPE treats them as worse than the completed ones, as Optuna's pruners do);
failed, diverged and out-of-budget trials are skipped. Everything skipped is counted, with why.

Ray's ``OptunaSearch.add_evaluated_point`` cannot do this for a define-by-run space (it raises), so
the trials are built with ``optuna.trial.create_trial`` and the space's own distributions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from skinsweep.errors import ConfigError
from skinsweep.results.schema import _plain  # a trials.parquet cell as a Python value (NaN → None)
from skinsweep.sweep.space import DICT_FIELDS


def distributions(recipe) -> dict[str, Any]:
    """Optuna name → ``optuna.distributions.*`` for every variant of the recipe's space."""
    import optuna.distributions as d

    class _Recorder:  # the suggest_* calls a Variant makes, answered with the distribution instead
        def suggest_categorical(self, name, choices):
            return d.CategoricalDistribution(choices)

        def suggest_int(self, name, low, high, step=1, log=False):
            return d.IntDistribution(low, high, step=step, log=log)

        def suggest_float(self, name, low, high, step=None, log=False):
            return d.FloatDistribution(low, high, step=step, log=log)

    return {p.optuna_name(k): v.suggest(_Recorder(), p.optuna_name(k))
            for p in recipe.search.params() for k, v in enumerate(p.variants)}


def _value(row, name: str) -> Any:
    """The trial's value of a searched parameter (``backbone_args.input_size`` read from the JSON column)."""
    base, dot, sub = name.partition(".")
    if dot and base in DICT_FIELDS:
        raw = _plain(row.get(base))
        try:
            return (json.loads(raw) if isinstance(raw, str) else (raw or {})).get(sub)
        except (ValueError, AttributeError):
            return None
    return _plain(row.get(name))


def point_of(recipe, row) -> dict[str, Any] | None:
    """The trial as Optuna-named params of this space, or None if it is not a point of it."""
    values: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for p in recipe.search.params():
        k = p.variant_for(values)
        if k is None:
            continue  # the parameter does not apply to this trial (its condition is not met)
        value = _value(row, p.name)
        if value is None:
            continue  # null in trials.parquet: the setting did not apply to that trial (e.g. a probe's lr mult)
        try:
            values[p.name] = params[p.optuna_name(k)] = p.variants[k].coerce(value)
        except ValueError:
            return None
    return params


def _fixed_mismatch(recipe, params: dict[str, Any], row) -> str | None:
    """The first setting this sweep fixes that the trial had with another value (e.g. ``epochs``), or None.

    Only settings the store recorded for the trial are compared (a null one did not apply to it); where a
    trial ran (data path, split file, device) and the seed do not count.
    """
    from skinsweep.results.schema import _RENAMED_PARAMS  # the column a TrialConfig field is stored in
    from skinsweep.sweep.space import SWEEP_LEVEL

    searched = {p.name.partition(".")[0] for p in recipe.search.params()}
    cfg = recipe.trial_config(recipe.params_from_optuna(params), split="-", device="cpu")
    for name, mine in cfg.model_dump().items():
        if name in searched or name in SWEEP_LEVEL or name in ("eval_batch_size", "embedding_cache"):
            continue
        col = _RENAMED_PARAMS.get(name, name)
        theirs = _plain(row.get(col)) if col in row.index else None
        if theirs is None:
            continue
        if isinstance(mine, (dict, list)):
            try:
                theirs = json.loads(theirs) if isinstance(theirs, str) else theirs
            except ValueError:
                return name
            if name in DICT_FIELDS:  # searched keys of backbone_args are not fixed settings
                keys = {p.name.partition(".")[2] for p in recipe.search.params() if p.name.startswith(name + ".")}
                mine = {k: v for k, v in mine.items() if k not in keys}
                theirs = {k: v for k, v in (theirs or {}).items() if k not in keys}
        if isinstance(mine, float) or isinstance(theirs, float):
            try:
                same = math.isclose(float(mine), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
            except (TypeError, ValueError):
                same = False
        else:
            same = mine == theirs
        if not same:
            return name
    return None


def warm_start(study, recipe, split_hash: str, console=None) -> dict[str, int]:
    """Tell ``study`` the usable trials of ``recipe.search.warm_start``; returns the counts (told, skipped by why)."""
    import optuna
    from optuna.trial import TrialState

    from skinsweep.results import ResultsStore

    metric = recipe.scheduler.metric
    dists = distributions(recipe)
    counts: Counter = Counter()
    for folder in recipe.search.warm_start:
        if not (Path(folder) / "trials.parquet").is_file():
            raise ConfigError(f"search.warm_start: {folder} is not a skinsweep results folder (no trials.parquet); "
                              "give the folder of an earlier sweep, e.g. results/<name>")
        df = ResultsStore(folder).trials()
        for _, row in df.iterrows():
            status = row.get("status")
            if status not in ("completed", "pruned"):
                counts[f"{status}"] += 1
                continue
            if split_hash and _plain(row.get("split_hash")) not in (None, split_hash):
                counts["scored on another split"] += 1
                continue
            value = _plain(row.get(metric))
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                counts[f"no {metric}"] += 1
                continue
            params = point_of(recipe, row)
            if params is None:
                counts["outside the space"] += 1
                continue
            if (field := _fixed_mismatch(recipe, params, row)) is not None:
                counts[f"with another fixed setting ({field})"] += 1
                continue
            if status == "completed":
                trial = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(value), state=TrialState.COMPLETE)
            else:
                epoch = int(_plain(row.get("epochs_run")) or 1)
                trial = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  state=TrialState.PRUNED, intermediate_values={epoch: float(value)})
            study.add_trial(trial)
            counts["told"] += 1
    told = counts.pop("told", 0)
    if console is not None:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
        console.print(f"warm start: told Optuna {told} earlier trial(s) from {', '.join(recipe.search.warm_start)}"
                      + (f"; skipped {skipped}" if skipped else ""), highlight=False)
    return {"told": told, **counts}


__all__ = ["distributions", "point_of", "warm_start"]
