"""Sweeps: Ray Tune schedules trials, Optuna picks what to try, ASHA stops bad trials early.

The only module that imports Ray. One pinned API (Ray ≥ 2.40): ``ray.tune.Tuner`` / ``TuneConfig`` /
``RunConfig`` / ``FailureConfig``, ``ray.tune.report(metrics, checkpoint=...)``,
``ray.tune.search.optuna.OptunaSearch`` with a define-by-run space, ``ray.tune.schedulers.ASHAScheduler``.

``run_sweep`` reads top to bottom in phases, each a function whose docstring says what it does: store
(``_prepare_store``), split (``_prepare_split``), Tune (``_tuner``), run (``_run``), reconcile (``_reconcile``).
Each trial runs :func:`_trainable` on a worker: :func:`skinsweep.train.loop.run_trial` (the same code as
``skinsweep train``), validation metrics reported once per epoch (ASHA acts on them), its artefact folder handed
back as a Ray checkpoint, which Ray copies to ``storage``, so nothing the driver needs lives only on a worker's
disk. :class:`_Events` (a Tune callback) tells the :class:`~skinsweep.sweep.driver.SweepDriver` as trials start,
report and end; it draws the progress view and adds each ended trial (pruned and failed ones too) to the Parquet
results store, so results are queryable while the sweep runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune  # the only module that imports Ray
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from skinsweep.errors import ConfigError, DataError, StoreWriteError, first_line
from skinsweep.results import SWEEP_JSON
from skinsweep.sweep.driver import (EPOCH_KEY, FINAL_KEY, POINT_KEY, Budget, SweepDriver, active_driver,
                                    add_if_missing, trial_params)
from skinsweep.sweep.storage import CHECKPOINTS_DIR, MIRROR_WAIT_ENV, Remote, env_seconds, storage_errors


OPTUNA_JOURNAL = "optuna.journal"  # search.study: journal — the Optuna study, next to the results
BUDGET_KEY = "skinsweep_out_of_budget"  # set in the final report of a trial the time budget stopped


@dataclass
class SweepOutcome:
    out_dir: str                    # the (local) results store: trials.parquet, predictions/
    n_trials: int
    counts: dict[str, int]
    wall_s: float
    storage_uri: str | None = None  # where the store is mirrored, for object-store storage
    budget_s: float | None = None   # search.time_budget
    budget_used_s: float = 0.0      # wall time used, earlier runs (--resume) included
    budget_spent: bool = False      # the budget, not num_samples, ended the sweep
    unmirrored: list[str] = field(default_factory=list)  # store files not yet copied to object-store storage


# --------------------------------------------------------------------------------------------------
# The trainable (runs on a worker)
# --------------------------------------------------------------------------------------------------

def _trainable(params: dict, recipe_json: str, split_file: str, split_remote: tuple | None = None,
               deadline: float | None = None) -> None:
    """Ray Tune function trainable: one trial, reported per epoch, artefacts returned as a checkpoint.

    ``split_remote``: ``(filesystem, path)`` of the split manifest in object-store storage; the trial then
    reads it from there (through this node's cache, ``split_file`` names the cached copy) rather than from
    the driver's disk, which another node cannot see. ``deadline``: ``time.time()`` at which the sweep's time
    budget runs out (the trial stops there, status ``out_of_budget``; nodes' clocks are assumed in sync).
    """
    import ray
    import torch

    from skinsweep.sweep.recipe import SweepRecipe
    from skinsweep.train.loop import run_trial

    recipe = SweepRecipe.model_validate_json(recipe_json)
    if split_remote is not None:
        from skinsweep.files import cache_dir, file_lock
        from skinsweep.sweep.storage import fetch, retry_storage

        local_split = cache_dir() / "splits" / split_file
        if not local_split.is_file():
            with file_lock(local_split.with_name(f".{local_split.name}.lock")):  # one fetch per node
                if not local_split.is_file():  # an object store that is down is waited for (with backoff)
                    retry_storage(lambda: fetch(*split_remote, local_split), "reading the split manifest")
        split_file = str(local_split)
    cfg = recipe.trial_config(trial_params(recipe, params), split=split_file)
    trial_id = tune.get_context().get_trial_id()
    _maybe_inject_fault(trial_id)
    # A trial computes with exactly its CPU share (Ray also sets OMP_NUM_THREADS to it); the count in effect
    # is reported, and recorded in trials.parquet, so a slow trial can be told from a starved one.
    torch.set_num_threads(max(1, int(recipe.resources.cpus_per_trial)))
    where = {"node": ray.get_runtime_context().get_node_id(), "torch_threads": torch.get_num_threads()}

    def report_epoch(m: dict[str, Any]) -> None:
        if m["epoch"] >= cfg.epochs:
            # The last epoch is not a rung result: ASHA (stop_last_trials=False) still has a rung at max_t and
            # would stop a trial that has already trained in full, before its final report sends the
            # predictions and checkpoint. The final report right after carries the selected epoch's metrics.
            return
        tune.report({k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                    | {EPOCH_KEY: m["epoch"]} | where)

    work = Path(tempfile.mkdtemp(prefix=f"skinsweep-{trial_id}-"))
    try:
        res = run_trial(cfg, work / "trial", callback=report_epoch, trial_id=trial_id, deadline=deadline,
                        extra_columns={"recipe_hash": recipe.hash, "sweep": recipe.name})
        final = {f"final_{k}": v for k, v in res.val.items() if isinstance(v, (int, float))}
        # The searcher optimises the selected epoch's metric; the final report has no EPOCH_KEY, so ASHA
        # does not treat it as another rung result.
        metric = recipe.scheduler.metric
        value = res.val.get(metric.removeprefix("val_")) if res.val else None
        worst = float("-inf") if recipe.scheduler.mode == "max" else float("inf")
        final[metric] = worst if value is None or value != value else value  # None or NaN: the worst
        final |= {FINAL_KEY: 1, "status_code": 0 if res.status == "completed" else 1,
                  BUDGET_KEY: int(res.status == "out_of_budget")} | where
        # Ray copies the checkpoint to storage inside report(); an object store that is down then fails it. The
        # trial has done its work: wait for the store (backoff, $SKINSWEEP_STORAGE_WAIT s) rather than fail and
        # train again. (A failed report() has sent nothing; calling it again is safe.)
        from skinsweep.sweep.storage import retry_storage

        retry_storage(lambda: tune.report(dict(final), checkpoint=tune.Checkpoint.from_directory(str(work / "trial"))),
                      f"trial {trial_id}: saving its checkpoint to storage",
                      wait_s=None if split_remote is not None else 0)  # object stores only: a local disk is not waited for
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _maybe_inject_fault(trial_id: str) -> None:
    """Test hook: ``SKINSWEEP_FAIL_ONCE=<dir>`` makes each trial raise on its first attempt.

    Used by the fault-tolerance tests (a crashed trial is retried); a marker file per trial in <dir>
    records that the first attempt already failed. Unset in normal use.
    """
    folder = os.environ.get("SKINSWEEP_FAIL_ONCE")
    if not folder:
        return
    marker = Path(folder) / f"{trial_id}.failed"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("first attempt failed on purpose\n")
        raise RuntimeError(f"injected failure for {trial_id} (SKINSWEEP_FAIL_ONCE)")


class _Searcher(OptunaSearch):
    """Ray's OptunaSearch that stops suggesting once the sweep's time budget is spent.

    The budget is read from the driver of the sweep running in this process, not stored here: Tune pickles
    the searcher into its experiment state, and a ``--resume`` must use the budget as it stands then.
    Returning ``FINISHED`` ends the search; Tune then waits for the running trials, which stop themselves
    at the same deadline (see :func:`_trainable`).
    """

    def suggest(self, trial_id: str):
        if active_driver().budget.spent():
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        # A trial the budget stopped did not finish: Optuna records it as pruned (no value), not as complete
        # with a partial score; Ray's OptunaSearch does that for a result without the metric.
        if result and result.get(BUDGET_KEY):
            result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result, error)


# --------------------------------------------------------------------------------------------------
# Tune's trial events → the sweep's driver (skinsweep.sweep.driver)
# --------------------------------------------------------------------------------------------------

class _Events(tune.Callback):
    """Forwards Tune's trial events to the driver of the sweep running in this process.

    Tune pickles its callbacks into the experiment state and, on ``--resume``, runs the restored copies. So
    this one holds nothing (no paths, no console): the results folder, storage and console of *this* run
    live in the :class:`~skinsweep.sweep.driver.SweepDriver` that :func:`run_sweep` registers while
    ``Tuner.fit`` runs.
    """

    def on_trial_start(self, iteration, trials, trial, **info):
        active_driver().started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        active_driver().result(trial, result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        active_driver().recovering(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        active_driver().finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        active_driver().finished(trial)


# --------------------------------------------------------------------------------------------------
# Running a sweep: the phases, in order
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Place:
    """Where a sweep's results go: the local store and its object-store mirror (or None)."""

    out_dir: Path          # the (local) results store
    remote: Remote | None  # object-store storage, mirrored after every trial

    @property
    def where(self) -> str:
        """The sweep folder in messages and sweep.json: the object-store URI, else the local path."""
        return self.remote.uri if self.remote is not None else str(self.out_dir)

    @property
    def split_file(self) -> Path:
        """The sweep's split manifest (in the store, so that it is mirrored with it)."""
        return self.out_dir / "split.parquet"


def run_sweep(
    recipe_path: str | Path,
    *,
    overrides: list[str] = (),
    address: str | None = None,
    resume: bool = False,
    console=None,
    results_dir: str | Path | None = None,
) -> SweepOutcome:
    """Run (or ``resume``) the sweep described by ``recipe_path``; returns counts and where results are.

    ``address`` (or ``RAY_ADDRESS``) joins an existing Ray cluster; otherwise a local Ray instance sized
    to this machine is started and stopped.

    ``results_dir`` (object-store ``storage`` only): the local working copy of the results store, default
    ``results/<name>``; it is mirrored to ``<storage>/<name>/``. With a local / NFS ``storage`` the store is
    ``<storage>/<name>`` itself.
    """
    from rich.console import Console

    from skinsweep.results import ResultsStore
    from skinsweep.sweep.progress import SweepProgress
    from skinsweep.sweep.recipe import load_recipe

    console = console or Console()
    t0, t_wall = time.perf_counter(), time.time()  # the budget counts from here: index, split, caches included
    recipe = load_recipe(recipe_path, overrides)
    place = _prepare_store(recipe, resume=resume, results_dir=results_dir, console=console)
    manifest = _prepare_split(recipe, recipe_path, place)
    store = ResultsStore(place.out_dir)
    budget = Budget.start(recipe.search.time_budget if recipe.search else None, place.out_dir, resume, t_start=t_wall)
    progress = SweepProgress(console, name=recipe.name, total=recipe.num_samples, metric=recipe.scheduler.metric,
                             mode=recipe.scheduler.mode, budget=budget)
    driver = SweepDriver(store, recipe, str(place.split_file.resolve()), progress, place.remote, budget=budget)
    driver.sync(final=True)  # the split is in storage before any trial needs it

    _connect_ray(address)
    try:
        tuner = _tuner(recipe, place, manifest, resume=resume, console=console, deadline=budget.deadline)
        if resume:
            driver.preload()
        console.print(f"sweep {recipe.name}: {recipe.num_samples} trials, recipe {recipe.hash}, split {manifest.hash} "
                      f"→ {place.out_dir}" + (f" (mirrored to {place.remote.uri})" if place.remote is not None else ""))
        # the store cannot be written (disk full, permissions): one line naming the file, the fix and the
        # command that continues the sweep; everything recorded before is intact
        resume_cmd = (f"`skinsweep sweep {recipe_path} --resume" + "".join(f" --set {o}" for o in overrides)
                      + (f" --results-dir {place.out_dir}" if results_dir is not None else "") + "`")
        try:
            grid = _run(tuner, driver, progress)
        except storage_errors() as e:
            if driver.fatal is not None:
                raise DataError(driver.fatal.with_command(resume_cmd)) from None
            if place.remote is None or any(t.status not in ("TERMINATED", "ERROR") for t in driver.trials.values()):
                raise  # not the end of a finished run: a real error
            grid = _results_after_outage(driver, place, e, console)
            resume = False  # the grid holds this run's trials only: no trial of an earlier run is an orphan
        except Exception:
            if driver.fatal is None:
                raise
            raise DataError(driver.fatal.with_command(resume_cmd)) from None
        except KeyboardInterrupt:
            budget.save(place.out_dir)
            driver.finish_mirror(min(10.0, env_seconds(MIRROR_WAIT_ENV, 60.0)))
            console.print(f"[yellow]interrupted[/]: finished trials are in {place.out_dir}/trials.parquet; continue "
                          f"with `skinsweep sweep {recipe_path} --resume`" + "".join(f" --set {o}" for o in overrides)
                          + (f" --results-dir {place.out_dir}" if results_dir is not None else ""))
            raise SystemExit(130) from None
        wait = env_seconds(MIRROR_WAIT_ENV, 60.0)
        try:
            # trials whose checkpoint the object store could not give while it was unreachable
            late = driver.retry_deferred(wait)
            late = sorted(set(late) | set(_reconcile(store, recipe, grid, place, resume=resume, console=console)))
            budget.save(place.out_dir)
        except StoreWriteError as e:
            raise DataError(e.with_command(resume_cmd)) from None
        if late:
            console.print(f"[yellow]warning[/]: the checkpoints of {', '.join(late)} are in {place.where} but could "
                          f"not be fetched (the object store is unreachable); add them with {resume_cmd} once it is "
                          "reachable", highlight=False, soft_wrap=True)
        unmirrored = driver.finish_mirror(wait)
    finally:
        driver.close()
        if address is None and not os.environ.get("RAY_ADDRESS"):
            import ray

            ray.shutdown()
    df = store.trials()
    return SweepOutcome(out_dir=str(place.out_dir), n_trials=len(df), counts=df["status"].value_counts().to_dict(),
                        wall_s=time.perf_counter() - t0,
                        storage_uri=place.remote.uri if place.remote is not None else None,
                        budget_s=budget.budget_s, budget_used_s=budget.used(),
                        budget_spent=budget.spent() and len(df) < recipe.num_samples, unmirrored=unmirrored)


def _prepare_store(recipe, *, resume: bool, results_dir, console) -> _Place:
    """Phase 1 — where things go, checked before anything runs: the store folder is writable, and it holds
    a sweep to resume exactly when ``resume`` says so. Resuming without the local working copy of an
    object-store sweep fetches it from the mirror."""
    from skinsweep.sweep.storage import check_writable, pull, remote_sweep

    remote = remote_sweep(recipe.storage, recipe.name)  # None for a local / NFS path
    if remote is None:
        out_dir = Path(recipe.out_dir)
        if results_dir is not None and Path(results_dir).resolve() != out_dir.resolve():
            raise ConfigError(f"--results-dir {results_dir}: only for object-store storage (s3://…); with storage "
                              f"{recipe.storage} the results are written to {out_dir} (change it with --set storage=…)")
        state_exists = (out_dir / "tuner.pkl").exists() or any(out_dir.glob("experiment_state*.json"))
    else:
        out_dir = Path(results_dir if results_dir is not None else Path("results") / recipe.name).resolve()
        check_writable(remote)
        state_exists = remote.exists("tuner.pkl")
    place = _Place(out_dir, remote)
    if resume and not state_exists:
        raise ConfigError(f"--resume: {place.where} is not an interrupted skinsweep sweep (no Ray Tune state); "
                          f"run without --resume to start it")
    if not resume and state_exists:
        raise ConfigError(f"{place.where} already holds a sweep named {recipe.name!r}; pass --resume to continue it, "
                          "or --set name=… / --set storage=… to start a new one")
    if remote is not None and not resume and (out_dir / "trials.parquet").exists():
        raise ConfigError(f"--results-dir {out_dir} already holds another sweep's results; pass --results-dir DIR "
                          "(a new folder) or remove it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # a file can be created (and is deleted)
    except OSError as e:
        fix = "--results-dir DIR" if remote is not None else "--set storage=PATH"
        raise ConfigError(f"{'results folder' if remote is not None else 'storage'} {out_dir} is not writable "
                          f"({e.strerror}); use {fix}") from None
    if remote is not None and resume and not (out_dir / "trials.parquet").exists():
        n = pull(remote, out_dir)  # resuming where the local working copy is missing: start from the mirror
        console.print(f"fetched the results store from {remote.uri} ({n} files) into {out_dir}")
    return place


def _prepare_split(recipe, recipe_path, place: _Place):
    """Phase 2 — data and split, once, in the driver: index the dataset, then reuse the store's split
    manifest, copy the recipe's ``split.file`` or make a new one; every trial reads this one. Records the
    sweep (recipe, hashes, storage) in ``sweep.json``. Returns the manifest."""
    from skinsweep.data.index import load_index
    from skinsweep.data.split import SplitManifest, make_split
    from skinsweep.files import atomic_write_text

    split_file = place.split_file
    index = load_index(recipe.data.root, positive=recipe.data.positive, skip_bad=recipe.data.skip_bad,
                       progress=True)
    if recipe.split.file:
        manifest = SplitManifest.load(recipe.split.file)
        manifest.check_matches(index, recipe.split.file)
        if not split_file.exists():
            manifest.save(split_file)
    elif split_file.exists():
        manifest = SplitManifest.load(split_file)
        manifest.check_matches(index, split_file)
    else:
        manifest = make_split(index, mode=recipe.split.mode, fractions=recipe.split.fractions, seed=recipe.split.seed)
        manifest.save(split_file)
    try:
        atomic_write_text(place.out_dir / SWEEP_JSON, json.dumps({
            "name": recipe.name, "recipe": json.loads(recipe.model_dump_json()), "recipe_hash": recipe.hash,
            "recipe_file": str(recipe_path), "split_hash": manifest.hash, "dataset": str(recipe.data.root),
            "dataset_hash": index.hash, "storage": place.where},
            indent=2))
    except OSError as e:
        raise DataError(StoreWriteError(place.out_dir / SWEEP_JSON, e).with_command("the same command")) from None
    return manifest


def _tuner(recipe, place: _Place, manifest, *, resume: bool, console, deadline: float | None = None):
    """Phase 3 — Tune wiring: the trainable with its split and resources, the scheduler (ASHA on
    ``EPOCH_KEY`` up to the recipe's resolved ``max_t``, or FIFO), the Optuna searcher (or, for a
    ``trials:`` recipe, a grid over the listed points) and our callback; restored from storage on resume.
    With a time budget, trials get its ``deadline`` and the searcher stops suggesting once it has passed."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sch = recipe.scheduler
    if place.remote is None:
        split_args = {"split_file": str(place.split_file.resolve())}
        storage_path, storage_fs, experiment = str(Path(recipe.storage).resolve()), None, str(place.out_dir.resolve())
    else:  # trials read the split from storage (another node cannot see the driver's disk)
        split_args = {"split_file": f"{recipe.name}-{manifest.hash}.parquet",
                      "split_remote": (place.remote.fs, place.remote.join("split.parquet"))}
        storage_path, storage_fs, experiment = place.remote.path.rpartition("/")[0], place.remote.fs, place.remote.path
    trainable = tune.with_parameters(_trainable, recipe_json=recipe.model_dump_json(), deadline=deadline, **split_args)
    trainable = tune.with_resources(trainable, lambda config: recipe.resources(trial_params(recipe, config)))
    if resume:
        console.print(f"resuming sweep {recipe.name} from {place.where}")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage_fs)
    if sch.type == "asha":
        scheduler = ASHAScheduler(time_attr=EPOCH_KEY, max_t=sch.max_t, grace_period=sch.grace_period,
                                  reduction_factor=sch.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    if recipe.search:
        storage = None
        if recipe.search.study == "journal":  # Optuna's own file storage: optuna-dashboard opens it
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            storage = JournalStorage(JournalFileBackend(str(place.out_dir / OPTUNA_JOURNAL)))
        searcher = _Searcher(space=recipe.define_by_run, metric=sch.metric, mode=sch.mode, sampler=recipe.sampler(),
                             points_to_evaluate=recipe.optuna_points() or None, study_name=recipe.name,
                             storage=storage)
        if recipe.search.warm_start:
            from skinsweep.sweep.warm import warm_start

            warm_start(searcher._ot_study, recipe, manifest.hash, console)
    else:  # `trials:` recipe: exactly the listed configurations (a grid over them), no search; Tune's
        searcher = None  # own BasicVariantGenerator then honours max_concurrent_trials
    run_config = tune.RunConfig(
        name=recipe.name, storage_path=storage_path, storage_filesystem=storage_fs,
        failure_config=tune.FailureConfig(max_failures=recipe.retries),
        # our progress view replaces Tune's reporter (verbose=0: no Tune status tables)
        callbacks=[_Events()], verbose=0)
    tune_config = tune.TuneConfig(metric=sch.metric, mode=sch.mode, search_alg=searcher, scheduler=scheduler,
                                  num_samples=recipe.num_samples if recipe.search else 1,
                                  max_concurrent_trials=recipe.resources.max_concurrent_trials,
                                  # a new trial reuses a finished trial's worker process (and its imported
                                  # torch/timm) when resources match: saves seconds per trial
                                  reuse_actors=True)
    param_space = {} if recipe.search else {POINT_KEY: tune.grid_search(recipe.explicit_points())}
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _run(tuner, driver: SweepDriver, progress):
    """Phase 4 — ``Tuner.fit`` with the driver receiving Tune's events and the progress view on screen.

    Tune's own output engine prints a configuration box and status tables whatever ``verbose`` says; the
    legacy engine (``RAY_AIR_NEW_OUTPUT=0``, restored afterwards) honours verbose=0, so our view is the only one.
    """
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Tune logs a crashed trial (a lost node included) as an ERROR with a traceback; the progress view already
    # shows it as one [retry] / FAILED line, and its error is recorded in trials.parquet.
    # An object store that is down makes Tune log a traceback every time it saves its state; the progress view
    # shows one line about it instead (the mirror's status), and Tune saves its state again once it is back.
    quiet = [logging.getLogger(name) for name in ("ray.tune.execution.tune_controller",
                                                  "ray.tune.execution.experiment_state", "ray.train._internal.storage",
                                                  "ray.train._internal.syncer")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        with driver, progress:
            return tuner.fit()
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def _results_after_outage(driver: SweepDriver, place: _Place, error: BaseException, console) -> list:
    """``Tuner.fit`` ran every trial but could not read Ray Tune's final state back from the object store (it
    was unreachable as the sweep ended). The trials Tune reported to the driver carry the same results (last
    report, checkpoint, config): reconcile from those. Every trial that ended is in the local store already."""
    from types import SimpleNamespace

    from skinsweep.sweep.storage import brief_error

    console.print(f"[yellow]warning[/]: {place.remote.uri} was unreachable as the sweep ended ({brief_error(error)}): "
                  f"the trials are all in the local store {place.out_dir}, but Ray Tune's state in the object store "
                  "is from before the outage (a later --resume may run the trials that ended during it again)",
                  highlight=False, soft_wrap=True)
    return [SimpleNamespace(metrics=t.last_result or {}, checkpoint=t.checkpoint, config=t.config)
            for t in driver.trials.values()]


def _reconcile(store, recipe, grid, place: _Place, *, resume: bool, console) -> list[str]:
    """Phase 5 — every finished trial is in the store exactly once: a trial Tune finished that the store
    lacks (the driver died between its end and its consolidation) is added from its checkpoint; on resume,
    trials the restored Tune state did not know (their configurations were re-run) are dropped. Returns the
    ids of trials left out because the object store holding their checkpoints is unreachable."""
    known = store.trials().set_index("trial_id")
    unreachable = []
    for result in grid:
        try:
            add_if_missing(store, recipe, result, known, place.remote)
        except storage_errors():
            if place.remote is None:
                raise
            # the object store is unreachable: the trial stays in Ray's state there; run_sweep says to --resume
            unreachable.append((result.metrics or {}).get("trial_id"))
    if resume:
        # A trial that finished (and reached the store) after Tune's last experiment snapshot is unknown
        # to the restored run, which ran a replacement: drop the orphan so the sweep has num_samples trials.
        in_grid = {(r.metrics or {}).get("trial_id") for r in grid}
        df = store.trials()
        orphans = set(df.loc[~df["trial_id"].isin(in_grid) & (df["status"] != "failed"), "trial_id"])
        if orphans and len(df) > recipe.num_samples:
            console.print(f"dropping {len(orphans)} trial(s) the restored Ray Tune state did not know "
                          f"({', '.join(sorted(orphans))}); their configurations were re-run")
            store.remove_trials(orphans)
            for t in orphans:
                shutil.rmtree(place.out_dir / CHECKPOINTS_DIR / t, ignore_errors=True)
    return unreachable


def _connect_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS), or start a local Ray sized to this machine, on loopback."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        token = Path.home() / ".ray" / "auth_token"
        # `ray start --head` (Ray ≥ 2.5x) turns on token authentication; a driver must then run in token mode
        if (token.exists() or os.environ.get("RAY_AUTH_TOKEN")) and not os.environ.get("RAY_AUTH_MODE"):
            os.environ["RAY_AUTH_MODE"] = "token"
        host, _, port = address.split("://")[-1].rpartition(":")
        if "://" not in address and port.isdigit():
            # ray.init retries an unreachable GCS for minutes; fail in seconds with a clear line instead
            import socket

            try:
                socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
            except OSError as e:
                raise ConfigError(f"cannot join Ray cluster at {address}: {e.strerror or e}; check that "
                                  f"`ray start --head --port={port}` is running on {host} and reachable") from None
        try:
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True, logging_level=logging.WARNING)
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ... depending on the cause
            msg = first_line(e)
            hint = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the token is in ~/.ray/auth_token on the head)"
                    if "auth" in msg.lower() else f"check that `ray start --head` is running on {host} and reachable")
            raise ConfigError(f"cannot join Ray cluster at {address}: {msg[:200]}; {hint}") from None
    else:
        # address="local": a new instance even when `ray start` registered another cluster on this machine
        # (ray.init() would try to join that one, and fail because num_cpus is given)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True,
                 logging_level=logging.WARNING,  # Ray's INFO lines would break up the progress view
                 _node_ip_address="127.0.0.1" if _loopback_only() else None)


def _loopback_only() -> bool:
    """True inside a network namespace whose only interface is loopback (as `make test` runs)."""
    import socket

    try:  # if_nameindex asks the kernel about *this* network namespace (/sys/class/net may be the host's)
        return {name for _, name in socket.if_nameindex()} <= {"lo"}
    except OSError:
        return False


__all__ = ["SweepOutcome", "run_sweep"]
