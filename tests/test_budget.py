"""Budgeted sweeps, warm starts and the journal study (issue #11).

The unit tests need no Ray; the end-to-end ones start it, so they run inside `make test`'s
loopback-only network namespace like tests/test_runner.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinsweep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ---- durations and the recipe field ---------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("60m", 3600), ("1.5h", 5400), ("2d", 172800),
                                           ("45", 45), (" 8h ", 28800)])
def test_parse_duration(text, seconds):
    from skinsweep.sweep.space import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0m", "5 minutes", ""])
def test_bad_duration_is_rejected(text):
    from skinsweep.sweep.space import parse_duration

    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_duration():
    from skinsweep.sweep.space import format_duration

    assert [format_duration(s) for s in (9, 65, 3725, -3)] == ["9s", "1m05s", "1h02m05s", "0s"]


SPACE_RECIPE = """
name: w
data: {{root: {data}}}
trial: {{backbone: tiny_resnet, epochs: 3}}
search:
  num_samples: 4
  space:
    lr: {{float: [1.0e-5, 1.0e-1], log: true}}
    mode: {{choice: [finetune, linear_probe]}}
    backbone_lr_mult: {{when: {{mode: finetune}}, float: [0.1, 1.0], log: true}}
{extra}
"""


def recipe(tmp_path, extra="", sets=()):
    from skinsweep.sweep.recipe import load_recipe

    (tmp_path / "data").mkdir(exist_ok=True)
    p = tmp_path / "r.yaml"
    p.write_text(SPACE_RECIPE.format(data=tmp_path / "data", extra=extra))
    return load_recipe(p, list(sets))


def test_time_budget_field_and_override(tmp_path):
    assert recipe(tmp_path).search.time_budget is None
    assert recipe(tmp_path, "  time_budget: 60m").search.time_budget == 3600
    assert recipe(tmp_path, sets=["search.time_budget=1.5h"]).search.time_budget == 5400
    with pytest.raises(ConfigError, match=r"r.yaml: \[search.time_budget\].*not a duration.*60m"):
        recipe(tmp_path, "  time_budget: soon")
    with pytest.raises(ConfigError, match=r"\[search.study\]"):
        recipe(tmp_path, "  study: sqlite")


def test_warm_start_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = recipe(tmp_path, "  warm_start: results/first")
    assert r.search.warm_start == [str(tmp_path / "results" / "first")]


# ---- the budget clock -----------------------------------------------------------------------------

def test_budget_counts_earlier_runs_on_resume(tmp_path):
    from skinsweep.sweep.driver import BUDGET_JSON, Budget

    b = Budget(100.0, t_start=time.time() - 30)
    assert 29 < b.used() < 32 and not b.spent() and "budget 30s of 1m40s used, 1m10s left" in b.text()
    b.save(tmp_path)
    assert json.loads((tmp_path / BUDGET_JSON).read_text())["budget_s"] == 100
    again = Budget.start(100.0, tmp_path, resume=True)
    assert 29 < again.used_before < 32 and abs(again.deadline - (time.time() + 100 - again.used_before)) < 1
    assert Budget.start(100.0, tmp_path, resume=False).used_before == 0
    spent = Budget(10.0, t_start=time.time() - 11)
    assert spent.spent() and "0s left" in spent.text()
    assert Budget(None).deadline is None and Budget(None).text() == "" and not Budget(None).spent()


def test_resume_without_budget_keeps_the_recorded_one(tmp_path):
    from skinsweep.sweep.driver import Budget

    Budget(600.0, t_start=time.time() - 100).save(tmp_path)
    b = Budget.start(None, tmp_path, resume=True)
    assert b.budget_s == 600 and 99 < b.used_before < 102
    assert Budget.start(None, tmp_path, resume=False).budget_s is None
    assert Budget.start(1200.0, tmp_path, resume=True).budget_s == 1200  # a new --budget on resume wins


def test_searcher_stops_at_the_budget_and_tells_optuna_a_stopped_trial_as_pruned(tmp_path, monkeypatch):
    from ray.tune.search import Searcher

    import skinsweep.sweep.driver as drv
    from skinsweep.sweep.driver import Budget
    from skinsweep.sweep.runner import BUDGET_KEY, _Searcher

    r = recipe(tmp_path)
    driver = type("D", (), {"budget": Budget(100.0)})()
    monkeypatch.setattr(drv, "_ACTIVE", [driver])
    s = _Searcher(space=r.define_by_run, metric="val_auc", mode="max", sampler=r.sampler(), study_name="w")
    assert isinstance(s.suggest("a"), dict) and isinstance(s.suggest("b"), dict)
    s.on_trial_complete("a", {"val_auc": 0.7, BUDGET_KEY: 1})
    s.on_trial_complete("b", {"val_auc": 0.8, BUDGET_KEY: 0})
    assert [(t.state.name, t.value) for t in s._ot_study.trials] == [("PRUNED", None), ("COMPLETE", 0.8)]
    driver.budget = Budget(10.0, t_start=time.time() - 11)
    assert s.suggest("c") == Searcher.FINISHED


def test_progress_shows_budget(tmp_path):
    from rich.console import Console

    from skinsweep.sweep.driver import Budget
    from skinsweep.sweep.progress import SweepProgress

    out = Console(record=True, width=200, force_terminal=False)
    p = SweepProgress(out, name="s", total=3, live=False, budget=Budget(600.0, t_start=time.time() - 120))
    p.started("t1", "tiny_resnet", "finetune", {"lr": 1e-3}, 4)
    p.finished("t1", "out_of_budget", 0.7, epoch=2)
    text = out.export_text()
    assert "t1 OUT_OF_BUDGET" in text and "out_of_budget 1" in text and "budget 2m00s of 10m00s used, 8m00s left" in text


# ---- a trial stopped by the deadline --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from skinsweep.data.synth import synthesize

    root = tmp_path_factory.mktemp("budgetdata") / "isic"
    synthesize(root, 120, seed=5, size=(64, 48), workers=1, progress=False)
    return root


def test_trial_stops_at_the_deadline_with_its_best_epoch_so_far(tiny_data, tmp_path, monkeypatch):
    import skinsweep.train.loop as loop
    from skinsweep.train.config import TrialConfig

    clock = {"now": 1000.0}
    monkeypatch.setattr(loop.time, "time", lambda: clock["now"])

    def after_epoch(m):  # the budget runs out during epoch 3
        if m["epoch"] == 2:
            clock["now"] = 2000.0

    cfg = TrialConfig(data=str(tiny_data), backbone="tiny_resnet", image_size=32, epochs=5, batch_size=32, device="cpu")
    res = loop.run_trial(cfg, tmp_path / "t", callback=after_epoch, deadline=1500.0)
    s = res.summary
    assert res.status == "out_of_budget" and s["epochs_run"] == 2 and len(s["history"]) == 2
    best = max(s["history"], key=lambda h: h["val_auc"])
    assert res.best_epoch == best["epoch"] and res.val["auc"] == best["val_auc"]
    assert res.test == {} and not (tmp_path / "t" / "predictions.parquet").exists()
    assert not (tmp_path / "t" / "checkpoint.safetensors").exists()


def test_trial_started_after_the_deadline_trains_nothing(tiny_data, tmp_path):
    from skinsweep.train.config import TrialConfig
    from skinsweep.train.loop import run_trial

    cfg = TrialConfig(data=str(tiny_data), backbone="tiny_resnet", image_size=32, epochs=5, device="cpu")
    res = run_trial(cfg, tmp_path / "t", deadline=time.time() - 1)
    assert res.status == "out_of_budget" and res.summary["epochs_run"] == 0 and res.best_epoch is None


# ---- warm start: earlier trials told to Optuna ----------------------------------------------------

def _earlier_sweep(root: Path, n: int = 30, best_lr: float = 1e-3, split_hash: str = "s1") -> Path:
    """A results store whose val AUC peaks at lr = best_lr (finetune), as an earlier sweep would leave."""
    from skinsweep.results import ResultsStore

    store = ResultsStore(root)
    rng = np.random.default_rng(0)
    for i in range(n):
        mode = "finetune" if i % 3 else "linear_probe"
        lr = float(10 ** rng.uniform(-5, -1))
        auc = 0.9 - 0.08 * abs(math.log10(lr) - math.log10(best_lr)) - (0.1 if mode == "linear_probe" else 0)
        cfg = {"data": "/d", "backbone": "tiny_resnet", "mode": mode, "lr": lr, "epochs": 3,
               "backbone_lr_mult": 0.5 if mode == "finetune" else 1.0}
        store.add_trial({"trial_id": f"t{i:02d}", "status": "completed", "config": cfg, "split_hash": split_hash,
                         "val": {"auc": auc}, "epochs_run": 3}, predictions=None)
    # not points of the space, or not usable: skipped with a count
    store.add_trial({"trial_id": "far", "status": "completed", "split_hash": split_hash, "val": {"auc": 0.99},
                     "config": {"data": "/d", "mode": "finetune", "lr": 0.5, "backbone_lr_mult": 0.5}}, predictions=None)
    store.add_trial({"trial_id": "other", "status": "completed", "split_hash": "s2", "val": {"auc": 0.99},
                     "config": {"data": "/d", "mode": "finetune", "lr": 1e-3, "backbone_lr_mult": 0.5}}, predictions=None)
    store.add_trial({"trial_id": "bad", "status": "failed", "config": {"data": "/d", "lr": 1e-3}}, predictions=None)
    store.add_trial({"trial_id": "cut", "status": "pruned", "split_hash": split_hash, "val": {"auc": 0.6},
                     "epochs_run": 1, "config": {"data": "/d", "mode": "linear_probe", "lr": 1e-2}},
                    predictions=None)
    return root


def _suggested_lrs(r, warm: bool, n: int = 25) -> list[float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from skinsweep.sweep.warm import warm_start

    study = optuna.create_study(direction="maximize", sampler=r.sampler())
    counts = warm_start(study, r, "s1") if warm else None
    lrs = []
    for _ in range(n):
        t = study.ask()
        r.define_by_run(t)
        lrs.append(t.params["lr"])
        study.tell(t, state=optuna.trial.TrialState.PRUNED)  # no new information: what the earlier sweep taught
    return lrs, counts


def test_warm_start_tells_points_of_the_space_and_counts_the_rest(tmp_path):
    import optuna

    from skinsweep.sweep.warm import warm_start

    first = _earlier_sweep(tmp_path / "first")
    r = recipe(tmp_path, f"  warm_start: {first}\n  sampler: {{n_startup_trials: 5}}")
    study = optuna.create_study(direction="maximize")
    counts = warm_start(study, r, "s1")
    assert counts == {"told": 31, "outside the space": 1, "scored on another split": 1, "failed": 1}
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 30 and states.count("PRUNED") == 1
    fin = next(t for t in study.trials if t.state.name == "COMPLETE" and "backbone_lr_mult" in t.params)
    assert set(fin.params) == {"lr", "mode", "backbone_lr_mult"} and fin.params["backbone_lr_mult"] == 0.5


def test_warm_started_suggestions_differ_from_cold_and_concentrate_near_the_earlier_best(tmp_path):
    first = _earlier_sweep(tmp_path / "first")
    r_warm = recipe(tmp_path, f"  warm_start: {first}\n  sampler: {{n_startup_trials: 5}}")
    r_cold = recipe(tmp_path, "  sampler: {n_startup_trials: 5}")
    warm, counts = _suggested_lrs(r_warm, True)
    cold, _ = _suggested_lrs(r_cold, False)
    assert counts["told"] == 31 and warm != cold
    dist = lambda lrs: float(np.median([abs(math.log10(x) + 3) for x in lrs]))  # decades from the earlier best
    assert dist(warm) < 0.75 < dist(cold), (dist(warm), dist(cold))


def test_warm_start_skips_trials_run_with_other_fixed_settings(tmp_path):
    import optuna

    from skinsweep.sweep.warm import warm_start

    first = _earlier_sweep(tmp_path / "first")  # its trials ran 3 epochs
    r = recipe(tmp_path, f"  warm_start: {first}", sets=["trial.epochs=10"])
    counts = warm_start(optuna.create_study(direction="maximize"), r, "s1")
    # the pruned one records no epochs (nothing to compare), the 30 completed ones ran 3
    assert counts["told"] == 1 and counts["with another fixed setting (epochs)"] == 30


def test_warm_start_from_a_folder_that_is_not_a_sweep(tmp_path):
    import optuna

    from skinsweep.sweep.warm import warm_start

    r = recipe(tmp_path, f"  warm_start: {tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match=r"search.warm_start: .*nothing is not a skinsweep results folder"):
        warm_start(optuna.create_study(direction="maximize"), r, "s1")


# ---- end to end: a budgeted sweep, then a warm-started one with a journal study -------------------

E2E_RECIPE = """
name: {name}
storage: {storage}
seed: 0
data: {{root: {data}, image_size: 32}}
trial: {{backbone: tiny_resnet, epochs: 40, batch_size: 16}}
search:
  num_samples: {n}
  space:
    lr: {{float: [3.0e-4, 3.0e-3], log: true}}
    pos_weight: {{float: [2.0, 12.0], log: true}}
  sampler: {{n_startup_trials: 4}}
{extra}
scheduler: {{type: none}}
resources: {{cpus_per_trial: 1, max_concurrent_trials: 2}}
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_budgeted_sweep_stops_launching_at_the_budget_and_leaves_a_complete_store(tiny_data, tmp_path):
    from tests.test_runner import needs_loopback

    needs_loopback()
    import optuna

    from skinsweep.results import load
    from skinsweep.sweep.driver import BUDGET_JSON

    storage = tmp_path / "res"
    r1 = tmp_path / "first.yaml"
    r1.write_text(E2E_RECIPE.format(name="first", storage=storage, data=tiny_data, n=1000, extra=""))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "skinsweep.cli", "sweep", str(r1), "--budget", "1m"],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    wall = time.time() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    assert "time budget 1m00s: used 1m" in run.stdout and "the budget ended the sweep" in run.stdout, run.stdout[-3000:]
    res = load(storage / "first")
    t = res.trials
    assert 2 <= len(t) < 1000 and t["trial_id"].is_unique  # ≥ 2: on a loaded machine a minute holds only two
    assert set(t["status"]) <= {"completed", "pruned", "out_of_budget"}, t["status"].value_counts()
    started = pd.to_datetime(t["started_at"], utc=True).map(lambda x: x.timestamp())
    budget = json.loads((storage / "first" / BUDGET_JSON).read_text())
    assert t0 + 60 < budget["deadline"] < t0 + 90 and budget["budget_s"] == 60 and budget["used_s"] >= 60  # clock: after CLI import
    assert started.max() <= budget["deadline"] + 1, "a trial started after the budget was spent"
    assert wall < 60 + 45, f"the sweep ran {wall:.0f} s on a 60 s budget"  # + CLI import before the clock, shutdown
    done = t[t["status"] == "completed"]
    assert len(done) >= 1 and set(done["trial_id"]) == set(res.predictions["trial_id"].unique())
    cut = t[t["status"] == "out_of_budget"]
    assert cut["test_auc"].isna().all() and not set(cut["trial_id"]) & set(res.predictions["trial_id"])

    # a second sweep continues from the first: its trials are told to Optuna, and the study is a journal
    r2 = tmp_path / "second.yaml"
    r2.write_text(E2E_RECIPE.format(name="second", storage=storage, data=tiny_data, n=2,
                                    extra=f"  warm_start: {storage / 'first'}\n  study: journal"))
    run2 = subprocess.run([sys.executable, "-m", "skinsweep.cli", "sweep", str(r2)], capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    assert run2.returncode == 0, run2.stderr[-2000:]
    usable = int(t["status"].isin(["completed", "pruned"]).sum())
    assert f"warm start: told Optuna {usable} earlier trial(s)" in run2.stdout
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="second", storage=JournalStorage(JournalFileBackend(
        str(storage / "second" / "optuna.journal"))))
    assert len(study.trials) == usable + 2
    assert len(load(storage / "second").trials) == 2


def test_budget_on_a_fixed_trials_recipe_is_one_clear_line():
    run = subprocess.run([sys.executable, "-m", "skinsweep.cli", "sweep", "sweeps/paper.yaml", "--budget", "10m"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and "Traceback" not in run.stderr + run.stdout
    assert "--budget: sweeps/paper.yaml lists fixed trials: (no search:)" in run.stderr + run.stdout
