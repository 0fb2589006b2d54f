"""Sweeps: Ray Tune schedules trials, Optuna picks what to try, ASHA stops bad trials early.

The only module that imports Ray. One pinned API (Ray ≥ 2.40): ``ray.tune.Tuner`` / ``TuneConfig`` /
``RunConfig`` / ``FailureConfig``, ``ray.tune.report(metrics, checkpoint=...)``,
``ray.tune.search.optuna.OptunaSearch`` with a define-by-run space, ``ray.tune.schedulers.ASHAScheduler``.

Flow of one sweep (``run_sweep``):

1. the driver validates the recipe, indexes the data and creates the split manifest once (every trial
   uses the same one, on every node);
2. Tune runs ``_trainable`` for each sampled configuration: it calls :func:`skinsweep.train.loop.run_trial`
   (the same code as ``skinsweep train``), reports validation metrics once per epoch (ASHA acts on
   them), and hands its artefact folder back as a Ray checkpoint — Ray copies it to ``storage`` (a
   local path, NFS or an object store such as ``s3://``), so nothing the driver needs lives only on a
   worker's disk;
3. as each trial starts, reports and ends, :class:`_Events` (a Tune callback) tells the driver's
   :class:`_Driver`, which draws the progress view (:mod:`skinsweep.sweep.progress`) and, when a trial ends,
   fetches its checkpoint and adds it to the Parquet results store (``trials.parquet``, ``predictions/``),
   so results are queryable while the sweep runs; pruned and failed trials get rows too. With an object
   store, the store is a local working copy (``results_dir``) mirrored to ``<storage>/<name>/`` after
   every trial (:mod:`skinsweep.sweep.storage`);
4. at the end, a reconciliation pass makes sure every finished trial is in the store (a driver killed
   between a trial's end and its consolidation loses nothing on ``--resume``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune  # the only module that imports Ray

from skinsweep.errors import ConfigError
from skinsweep.sweep.storage import CHECKPOINTS_DIR, Remote

FINAL_KEY = "skinsweep_final"  # set only in a trial's last report (with its checkpoint)
EPOCH_KEY = "epoch"            # ASHA's time attribute; absent from the final report so ASHA ignores it
SWEEP_JSON = "sweep.json"
POINT_KEY = "params"           # Tune config key holding one `trials:` entry (explicit recipes)


@dataclass
class SweepOutcome:
    out_dir: str                    # the (local) results store: trials.parquet, predictions/
    n_trials: int
    counts: dict[str, int]
    wall_s: float
    storage_uri: str | None = None  # where the store is mirrored, for object-store storage


# --------------------------------------------------------------------------------------------------
# The trainable (runs on a worker)
# --------------------------------------------------------------------------------------------------

def _trainable(params: dict, recipe_json: str, split_file: str, split_remote: tuple | None = None) -> None:
    """Ray Tune function trainable: one trial, reported per epoch, artefacts returned as a checkpoint.

    ``split_remote``: ``(filesystem, path)`` of the split manifest in object-store storage; the trial then
    reads it from there (through this node's cache, ``split_file`` names the cached copy) rather than from
    the driver's disk, which another node cannot see.
    """
    import ray
    from ray import tune

    from skinsweep.sweep.recipe import SweepRecipe
    from skinsweep.train.loop import run_trial

    recipe = SweepRecipe.model_validate_json(recipe_json)
    if split_remote is not None:
        from skinsweep.files import cache_dir
        from skinsweep.sweep.storage import fetch

        local_split = cache_dir() / "splits" / split_file
        if not local_split.is_file():
            fetch(*split_remote, local_split)
        split_file = str(local_split)
    values = _trial_params(recipe, params)
    cfg = recipe.trial_config(values, split=split_file)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    node = ray.get_runtime_context().get_node_id()
    _maybe_inject_fault(trial_id)
    import torch

    # A trial computes with exactly its CPU share (Ray also sets OMP_NUM_THREADS to it); the count in effect
    # is reported, and recorded in trials.parquet, so a slow trial can be told from a starved one.
    torch.set_num_threads(max(1, int(recipe.resources.cpus_per_trial)))
    where = {"node": node, "torch_threads": torch.get_num_threads()}

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
        res = run_trial(cfg, work / "trial", callback=report_epoch, trial_id=trial_id,
                        extra_columns={"recipe_hash": recipe.hash, "sweep": recipe.name})
        final = {f"final_{k}": v for k, v in res.val.items() if isinstance(v, (int, float))}
        # The searcher optimises the selected epoch's metric; the final report has no EPOCH_KEY, so ASHA
        # does not treat it as another rung result.
        metric, mode = recipe.scheduler.metric, _metric_mode(recipe)
        final[metric] = res.val.get(metric.removeprefix("val_"), float("nan")) if res.val else float("nan")
        if final[metric] is None or (isinstance(final[metric], float) and math.isnan(final[metric])):
            final[metric] = float("-inf") if mode == "max" else float("inf")
        tune.report(final | {FINAL_KEY: 1, "status_code": 0 if res.status == "completed" else 1} | where,
                    checkpoint=tune.Checkpoint.from_directory(str(work / "trial")))
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


# --------------------------------------------------------------------------------------------------
# Driver side: consolidation into the results store
# --------------------------------------------------------------------------------------------------

_ACTIVE: list["_Driver"] = []  # the driver side of the sweep running in this process (see _Events)


class _Events(tune.Callback):
    """Forwards Tune's trial events to the driver side of the sweep running in this process.

    Tune pickles its callbacks into the experiment state and, on ``--resume``, runs the restored copies. So
    this one holds nothing (no paths, no console): the results folder, storage and console of *this* run
    live in the :class:`_Driver` that :func:`run_sweep` registers while ``Tuner.fit`` runs.
    """

    def on_trial_start(self, iteration, trials, trial, **info):
        _driver().started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        _driver().result(trial, result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        _driver().recovering(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        _driver().finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        _driver().finished(trial)


def _driver() -> "_Driver":
    if not _ACTIVE:
        raise RuntimeError("skinsweep sweep callback called outside run_sweep")
    return _ACTIVE[-1]


class _Driver:
    """The driver side of one sweep run: progress view, consolidation into the store, mirroring.

    Args:
        store: the (local) results store.
        recipe: the sweep recipe.
        split_file: the split manifest on the driver (recorded in pruned / failed trials' configs).
        progress: the progress view (:class:`skinsweep.sweep.progress.SweepProgress`).
        remote: object-store storage to mirror the store to after each trial, or None.
    """

    def __init__(self, store, recipe, split_file: str, progress, remote: Remote | None = None) -> None:
        self.store, self.recipe, self.split_file = store, recipe, split_file
        self.progress, self.remote = progress, remote
        self.metric = recipe.scheduler.metric
        self.mirror_error: str | None = None
        self.history: dict[str, list[dict]] = {}  # per-epoch results, stored for trials pruned by ASHA

    def __enter__(self) -> "_Driver":
        """Receive the Tune events of this process (see :class:`_Events`) until the block ends."""
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    def _describe(self, params: dict) -> tuple[str, str, dict, int]:
        cfg = self.recipe.trial_config(params, split=self.split_file)
        hparams = {k: v for k, v in params.items() if k not in ("backbone", "mode")}
        return cfg.backbone, cfg.mode, hparams, cfg.epochs

    def preload(self) -> None:
        """Show the trials already in the store (``--resume``) as finished rows."""
        df = self.store.trials()
        names = [k for k in (self.recipe.search.space if self.recipe.search else
                             {k: 0 for p in self.recipe.trials for k in p}) if k not in ("backbone", "mode")]
        for _, row in df.iterrows():
            hp = {k: row[k] for k in names if k in row.index and row[k] is not None and row[k] == row[k]}
            self.progress.add_finished(row["trial_id"], row.get("backbone"), row.get("mode"), hp, row["status"],
                                       row.get(self.metric), epoch=row.get("epochs_run"))

    def started(self, trial) -> None:
        backbone, mode, hparams, epochs = self._describe(_trial_params(self.recipe, trial.config))
        self.progress.started(trial.trial_id, backbone, mode, hparams, epochs)

    def result(self, trial, result: dict) -> None:
        if EPOCH_KEY in result and not result.get(FINAL_KEY):
            self.progress.epoch(trial.trial_id, result[EPOCH_KEY], result.get(self.metric))
            rec = {k: v for k, v in result.items() if k == "epoch" or k.startswith(("train_", "val_"))}
            self.history.setdefault(trial.trial_id, []).append(rec)

    def recovering(self, trial) -> None:
        self.progress.retrying(trial.trial_id, trial.num_failures + 1, _last_error(trial))

    def finished(self, trial) -> None:
        status = consolidate_trial(self.store, self.recipe, trial, self.split_file, remote=self.remote,
                                   history=self.history.pop(trial.trial_id, None))
        df = self.store.trials()
        row = df[df["trial_id"] == trial.trial_id]
        value = row[self.metric].iloc[0] if len(row) and self.metric in row else None
        epochs = row["epochs_run"].iloc[0] if len(row) else None
        self.sync()
        self.progress.finished(trial.trial_id, status, value,
                               epoch=None if epochs is None or epochs != epochs else int(epochs))

    def sync(self, *, final: bool = False) -> None:
        """Mirror the store to object-store storage. During the sweep a failure is a warning (the next
        mirror catches up: it copies whatever changed); at the end it is an error."""
        if self.remote is None:
            return
        import pyarrow as pa

        from skinsweep.sweep.storage import mirror

        try:
            mirror(self.store.root, self.remote)
            self.mirror_error = None
        except (OSError, pa.ArrowException) as e:
            msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
            if final:
                raise ConfigError(f"could not copy the results store {self.store.root} to {self.remote.uri} ({msg}); "
                                  "check the bucket, credentials and endpoint (AWS_ENDPOINT_URL), then run the "
                                  "same command again (with --resume once trials have run)") from None
            if self.mirror_error != msg:
                self.progress.console.print(f"[yellow]warning[/]: could not copy results to {self.remote.uri} "
                                            f"({msg}); retrying after the next trial", highlight=False)
            self.mirror_error = msg


def consolidate_trial(store, recipe, trial, split_file: str, remote: Remote | None = None,
                      history: list[dict] | None = None) -> str:
    """Put one finished Tune trial into the store; returns the status recorded.

    ``remote``: the sweep's object-store folder when ``storage`` is one (the trial's checkpoint is then
    copied into the store's ``checkpoints/``, so that bundles can be built from the local store).
    ``history``: the per-epoch results Tune saw, stored for a pruned trial (a completed one has its own
    in summary.json).
    """
    result = trial.last_result or {}
    params = _trial_params(recipe, trial.config)
    base_extra = {"node": result.get("node"), "torch_threads": result.get("torch_threads"),
                  "recipe_hash": recipe.hash, **recipe.resources_for(params)}
    if result.get(FINAL_KEY) and trial.checkpoint is not None:
        return _add_from_checkpoint(store, trial.trial_id, trial.checkpoint,
                                    base_extra | {"attempts": trial.num_failures + 1}, remote)
    if trial.status == "ERROR" or trial.error_file:
        err = _last_error(trial)
        cfg = recipe.trial_config(params, split=split_file).model_dump()
        store.add_failed(trial.trial_id, cfg, err, extra=base_extra | {"attempts": trial.num_failures})
        return "failed"
    # Stopped by ASHA before its last epoch: record what it reached, no predictions, no test score.
    summary = _pruned_summary(recipe, params, trial, result, split_file) | {"history": history or []}
    store.add_trial(summary, predictions=None, status="pruned",
                    extra=base_extra | {"pruned_at_epoch": result.get(EPOCH_KEY)})
    return "pruned"


def _pruned_summary(recipe, params, trial, result, split_file: str) -> dict:
    cfg = recipe.trial_config(params, split=split_file)
    val = {k.removeprefix("val_"): v for k, v in result.items() if k.startswith("val_")}
    return {"trial_id": trial.trial_id, "status": "pruned", "config": cfg.model_dump(), "config_hash": cfg.hash,
            "best_epoch": None, "epochs_run": result.get(EPOCH_KEY), "val": val, "test": {},
            "runtime_s": result.get("time_total_s"), "split_hash": None}


def _last_error(trial) -> str:
    try:
        text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).exists() else ""
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "trial failed (no error file)"


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


# --------------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------------

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

    from skinsweep.data.index import load_index
    from skinsweep.data.split import SplitManifest, make_split
    from skinsweep.sweep.progress import SweepProgress
    from skinsweep.sweep.recipe import load_recipe
    from skinsweep.results import ResultsStore
    from skinsweep.sweep.storage import check_writable, pull, remote_sweep

    console = console or Console()
    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)

    # ---- where things go: checked before anything runs -----------------------------------------
    remote = remote_sweep(recipe.storage, recipe.name)  # None for a local / NFS path
    if remote is None:
        out_dir = Path(recipe.out_dir)
        if results_dir is not None and Path(results_dir).resolve() != out_dir.resolve():
            raise ConfigError(f"--results-dir {results_dir}: only for object-store storage (s3://…); with storage "
                              f"{recipe.storage} the results are written to {out_dir} (change it with --set storage=…)")
        state_exists = (out_dir / "tuner.pkl").exists() or any(out_dir.glob("experiment_state*.json"))
        where = str(out_dir)
    else:
        out_dir = Path(results_dir if results_dir is not None else Path("results") / recipe.name).resolve()
        check_writable(remote)
        state_exists = remote.exists("tuner.pkl")
        where = remote.uri
    if resume and not state_exists:
        raise ConfigError(f"--resume: {where} is not an interrupted skinsweep sweep (no Ray Tune state); "
                          f"run without --resume to start it")
    if not resume and state_exists:
        raise ConfigError(f"{where} already holds a sweep named {recipe.name!r}; pass --resume to continue it, "
                          "or --set name=… / --set storage=… to start a new one")
    if remote is not None and not resume and (out_dir / "trials.parquet").exists():
        raise ConfigError(f"--results-dir {out_dir} already holds another sweep's results; pass --results-dir DIR "
                          "(a new folder) or remove it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        fix = "--results-dir DIR" if remote is not None else "--set storage=PATH"
        raise ConfigError(f"{'results folder' if remote is not None else 'storage'} {out_dir} is not writable "
                          f"({e.strerror}); use {fix}") from None
    if remote is not None and resume and not (out_dir / "trials.parquet").exists():
        n = pull(remote, out_dir)  # resuming where the local working copy is missing: start from the mirror
        console.print(f"fetched the results store from {remote.uri} ({n} files) into {out_dir}")

    # ---- data and split: once, in the driver; every trial reuses the same manifest -----------
    split_file = out_dir / "split.parquet"
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
    (out_dir / SWEEP_JSON).write_text(json.dumps({
        "name": recipe.name, "recipe": json.loads(recipe.model_dump_json()), "recipe_hash": recipe.hash,
        "recipe_file": str(recipe_path), "split_hash": manifest.hash, "dataset": str(recipe.data.root),
        "dataset_hash": index.hash, "storage": remote.uri if remote is not None else str(out_dir)}, indent=2))
    store = ResultsStore(out_dir)
    metric, mode = recipe.scheduler.metric, _metric_mode(recipe)
    progress = SweepProgress(console, name=recipe.name, total=recipe.num_samples, metric=metric, mode=mode)
    driver = _Driver(store, recipe, str(split_file.resolve()), progress, remote)
    driver.sync(final=True)  # the split is in storage before any trial needs it

    # ---- Ray --------------------------------------------------------------------------------
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    _connect(address)
    try:
        if remote is None:
            split_args = {"split_file": str(split_file.resolve())}
            storage_path, storage_fs, experiment = str(Path(recipe.storage).resolve()), None, str(out_dir.resolve())
        else:  # trials read the split from storage (another node cannot see the driver's disk)
            split_args = {"split_file": f"{recipe.name}-{manifest.hash}.parquet",
                          "split_remote": (remote.fs, remote.join("split.parquet"))}
            storage_path, storage_fs, experiment = remote.path.rpartition("/")[0], remote.fs, remote.path
        trainable = tune.with_parameters(_trainable, recipe_json=recipe.model_dump_json(), **split_args)
        trainable = tune.with_resources(trainable, lambda config: _resources(recipe, config))
        if recipe.scheduler.type == "asha":
            scheduler = ASHAScheduler(time_attr=EPOCH_KEY, max_t=recipe.scheduler.max_t or _max_epochs(recipe, str(split_file)),
                                      grace_period=recipe.scheduler.grace_period,
                                      reduction_factor=recipe.scheduler.reduction_factor, stop_last_trials=False)
        else:
            scheduler = FIFOScheduler()
        if recipe.search:
            searcher = OptunaSearch(space=recipe.define_by_run, metric=metric, mode=mode, sampler=recipe.sampler(),
                                    points_to_evaluate=recipe.optuna_points() or None)
        else:  # `trials:` recipe: exactly the listed configurations (a grid over them), no search; Tune's
            searcher = None  # own BasicVariantGenerator then honours max_concurrent_trials
        run_config = tune.RunConfig(
            name=recipe.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=recipe.retries),
            # our progress view replaces Tune's reporter (verbose=0: no Tune status tables)
            callbacks=[_Events()], verbose=0)
        param_space = {} if recipe.search else {POINT_KEY: tune.grid_search(recipe.explicit_points())}
        tune_config = tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                      num_samples=recipe.num_samples if recipe.search else 1,
                                      max_concurrent_trials=recipe.resources.max_concurrent_trials,
                                      # a new trial reuses a finished trial's worker process (and its imported
                                      # torch/timm) when resources match: saves seconds per trial
                                      reuse_actors=True)
        if resume:
            console.print(f"resuming sweep {recipe.name} from {where}")
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage_fs)
            driver.preload()
        else:
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
        console.print(f"sweep {recipe.name}: {recipe.num_samples} trials, recipe {recipe.hash}, split {manifest.hash} "
                      f"→ {out_dir}" + (f" (mirrored to {remote.uri})" if remote is not None else ""))
        # Tune's own output engine prints a configuration box and status tables whatever `verbose` says;
        # the legacy engine honours verbose=0, so our progress view is the only one on screen.
        air_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            with driver, progress:
                grid = tuner.fit()
        except KeyboardInterrupt:
            driver.sync()
            console.print(f"[yellow]interrupted[/]: finished trials are in {out_dir}/trials.parquet; continue with "
                          f"`skinsweep sweep {recipe_path} --resume`" + "".join(f" --set {o}" for o in overrides)
                          + (f" --results-dir {out_dir}" if results_dir is not None else ""))
            raise SystemExit(130) from None
        finally:
            if air_output is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = air_output
        # ---- reconciliation: every finished trial is in the store exactly once ----------------
        known = store.trials().set_index("trial_id")
        for r in grid:
            _reconcile(store, recipe, r, known, remote)
        if resume:
            # A trial that finished (and reached the store) after Tune's last experiment snapshot is unknown
            # to the restored run, which ran a replacement: drop the orphan so the sweep has num_samples trials.
            known = {(r.metrics or {}).get("trial_id") for r in grid}
            df = store.trials()
            orphans = set(df.loc[~df["trial_id"].isin(known) & (df["status"] != "failed"), "trial_id"])
            if orphans and len(df) > recipe.num_samples:
                console.print(f"dropping {len(orphans)} trial(s) the restored Ray Tune state did not know "
                              f"({', '.join(sorted(orphans))}); their configurations were re-run")
                store.remove_trials(orphans)
                for t in orphans:
                    shutil.rmtree(out_dir / CHECKPOINTS_DIR / t, ignore_errors=True)
        driver.sync(final=True)
    finally:
        if address is None and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    df = store.trials()
    counts = df["status"].value_counts().to_dict()
    return SweepOutcome(out_dir=str(out_dir), n_trials=len(df), counts=counts, wall_s=time.perf_counter() - t0,
                        storage_uri=remote.uri if remote is not None else None)


def _reconcile(store, recipe, result, known, remote: Remote | None = None) -> None:
    """A finished trial (from Tune's ResultGrid) that the store lacks is added from its checkpoint; so is a
    completed one without a checkpoint copy in this store (object-store storage, resumed with another
    ``results_dir`` or on another machine: the pulled trials.parquet names the old copy).

    ``known``: the store's trials table indexed by ``trial_id``.
    """
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if not trial_id:
        return
    extra = {}
    if trial_id in known.index:
        row = known.loc[trial_id]
        own = store.root / CHECKPOINTS_DIR / trial_id / "checkpoint.safetensors"
        if remote is None or row["status"] != "completed" or (str(row["checkpoint"]) == str(own) and own.is_file()):
            return
        if "attempts" in row.index and row["attempts"] == row["attempts"]:
            extra["attempts"] = int(row["attempts"])
    if metrics.get(FINAL_KEY) and result.checkpoint is not None:
        params = _trial_params(recipe, result.config)
        _add_from_checkpoint(store, trial_id, result.checkpoint,
                             {"node": metrics.get("node"), "torch_threads": metrics.get("torch_threads"),
                              "recipe_hash": recipe.hash,
                              **recipe.resources_for(params)} | extra, remote)


def _add_from_checkpoint(store, trial_id: str, ckpt, extra: dict, remote: Remote | None = None) -> str:
    """Fetch a finished trial's artefact folder from Ray's storage and add it to the store; its status.

    With local / NFS storage the ``checkpoint`` column points into Ray's storage. With an object store it
    points to a local copy in ``<store>/checkpoints/<trial_id>/`` (what a bundle is built from) and
    ``checkpoint_uri`` says where the original is.
    """
    if remote is None:
        with tempfile.TemporaryDirectory(prefix="skinsweep-consolidate-") as tmp:
            local = Path(ckpt.to_directory(tmp))
            summary = json.loads((local / "summary.json").read_text())
            preds = local / "predictions.parquet"
            store.add_trial(summary, predictions=preds if preds.is_file() else None,
                            extra=extra | {"checkpoint": _join(ckpt.path, "checkpoint.safetensors")})
        return summary["status"]
    dest = store.root / CHECKPOINTS_DIR / trial_id
    tmp = dest.with_name(f".{trial_id}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt.to_directory(str(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)  # a reader sees no checkpoint folder or a whole one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = json.loads((dest / "summary.json").read_text())
    preds = dest / "predictions.parquet"
    store.add_trial(summary, predictions=preds if preds.is_file() else None,
                    extra=extra | {"checkpoint": str(dest / "checkpoint.safetensors"),
                                   "checkpoint_uri": remote.uri_of(_join(ckpt.path, "checkpoint.safetensors"))})
    preds.unlink(missing_ok=True)  # now in the store's predictions/
    return summary["status"]


def _resources(recipe, config: dict) -> dict:
    return recipe.resources(_trial_params(recipe, config))


def _trial_params(recipe, config: dict) -> dict:
    """A Tune config → TrialConfig-named params (Optuna names mapped back; a `trials:` point unwrapped)."""
    if not recipe.search:
        return dict(config.get(POINT_KEY, {}))
    return recipe.params_from_optuna(config)


def _metric_mode(recipe) -> str:
    from skinsweep.metrics import HIGHER_IS_BETTER

    if recipe.scheduler.mode:
        return recipe.scheduler.mode
    return "max" if HIGHER_IS_BETTER.get(recipe.scheduler.metric.removeprefix("val_"), False) else "min"


def _max_epochs(recipe, split_file: str) -> int:
    points = recipe.explicit_points() or [{}]
    return max(recipe.trial_config(p, split=split_file).epochs for p in points)


def _connect(address: str | None) -> None:
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
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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


__all__ = ["SweepOutcome", "consolidate_trial", "run_sweep"]
