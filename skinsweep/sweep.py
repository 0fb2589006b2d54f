"""Sweeps: Ray Tune schedules trials, Optuna picks what to try, ASHA stops bad trials early.

The only module that imports Ray. One pinned API (Ray ≥ 2.40): ``ray.tune.Tuner`` / ``TuneConfig`` /
``RunConfig`` / ``FailureConfig``, ``ray.tune.report(metrics, checkpoint=...)``,
``ray.tune.search.optuna.OptunaSearch`` with a define-by-run space, ``ray.tune.schedulers.ASHAScheduler``.

Flow of one sweep (``run_sweep``):

1. the driver validates the recipe, indexes the data and creates the split manifest once (every trial
   uses the same one, on every node);
2. Tune runs ``_trainable`` for each sampled configuration: it calls :func:`skinsweep.trial.run_trial`
   (the same code as ``skinsweep train``), reports validation metrics once per epoch (ASHA acts on
   them), and hands its artefact folder back as a Ray checkpoint — Ray copies it to ``storage`` (a
   local path, NFS or ``s3://``), so nothing the driver needs lives only on a worker's disk;
3. as each trial ends, :class:`_Consolidate` (a Tune callback in the driver) fetches the checkpoint
   and adds the trial to the Parquet results store (``trials.parquet``, ``predictions/``), so results
   are queryable while the sweep runs; pruned and failed trials get rows too;
4. at the end, a reconciliation pass makes sure every finished trial is in the store (a driver killed
   between a trial's end and its consolidation loses nothing on ``--resume``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune  # the only module that imports Ray

from skinsweep.errors import ConfigError

FINAL_KEY = "skinsweep_final"  # set only in a trial's last report (with its checkpoint)
EPOCH_KEY = "epoch"            # ASHA's time attribute; absent from the final report so ASHA ignores it
SWEEP_JSON = "sweep.json"
POINT_KEY = "params"           # Tune config key holding one `trials:` entry (explicit recipes)


@dataclass
class SweepOutcome:
    out_dir: str
    n_trials: int
    counts: dict[str, int]
    wall_s: float


# --------------------------------------------------------------------------------------------------
# The trainable (runs on a worker)
# --------------------------------------------------------------------------------------------------

def _trainable(params: dict, recipe_json: str, split_file: str) -> None:
    """Ray Tune function trainable: one trial, reported per epoch, artefacts returned as a checkpoint."""
    import ray
    from ray import tune

    from skinsweep.recipe import SweepRecipe
    from skinsweep.trial import run_trial

    recipe = SweepRecipe.model_validate_json(recipe_json)
    values = _trial_params(recipe, params)
    cfg = recipe.trial_config(values, split=split_file)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    node = ray.get_runtime_context().get_node_id()
    _maybe_inject_fault(trial_id)
    torch_threads = max(1, int(recipe.resources.cpus_per_trial))
    import torch

    torch.set_num_threads(torch_threads)

    def report_epoch(m: dict[str, Any]) -> None:
        tune.report({k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                    | {EPOCH_KEY: m["epoch"], "node": node})

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
        tune.report(final | {FINAL_KEY: 1, "status_code": 0 if res.status == "completed" else 1, "node": node},
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

class _Consolidate(tune.Callback):
    """Adds each trial to the results store as it ends (completed, diverged, pruned or failed).

    Tune pickles its callbacks with the experiment state, so only plain values are kept; the store,
    recipe and console are re-made lazily (also after a restore).
    """

    def __init__(self, out_dir: str, recipe_json: str, split_file: str) -> None:
        self.out_dir, self.recipe_json, self.split_file = out_dir, recipe_json, split_file
        self._live = None
        self._history: dict[str, list[dict]] = {}

    def __getstate__(self):
        return dict(self.__dict__, _live=None)

    def _parts(self):
        if self._live is None:
            from rich.console import Console

            from skinsweep.recipe import SweepRecipe
            from skinsweep.results import ResultsStore

            self._live = (ResultsStore(self.out_dir), SweepRecipe.model_validate_json(self.recipe_json),
                          Console(width=None if sys.stdout.isatty() else 120))
        return self._live

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # per-epoch records, kept for trials that end without a checkpoint (pruned): their curves
        if EPOCH_KEY in result and not result.get(FINAL_KEY):
            rec = {k: v for k, v in result.items() if k == "epoch" or k.startswith(("train_", "val_"))}
            self._history.setdefault(trial.trial_id, []).append(rec)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trials, trial)

    def _record(self, trials, trial) -> None:
        store, rec, con = self._parts()
        consolidate_trial(store, rec, trial, self.split_file,
                          history=self._history.pop(trial.trial_id, None))
        df = store.trials()
        row = df[df["trial_id"] == trial.trial_id]
        status = row["status"].iloc[0] if len(row) else "?"
        auc = row["val_auc"].iloc[0] if len(row) else float("nan")
        comp = df[df["status"] == "completed"]
        best = ""
        if len(comp) and comp["val_auc"].notna().any():
            b = comp.loc[comp["val_auc"].idxmax()]
            best = f"; best so far {b['trial_id']} ({b['backbone']}, {b['mode']}) val AUC {b['val_auc']:.3f}"
        counts = df["status"].value_counts().to_dict()
        running = sum(t.status == "RUNNING" for t in trials)
        con.print(f"[{len(df)}/{rec.num_samples}] {trial.trial_id} {status}"
                  f"{'' if auc != auc else f' val AUC {auc:.3f}'} — "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                  + f", running {running}{best}", highlight=False, markup=False)


def consolidate_trial(store, recipe, trial, split_file: str, history: list[dict] | None = None) -> str:
    """Put one finished Tune trial into the store; returns the status recorded. ``history``: the
    per-epoch results Tune saw, stored for a pruned trial (a completed one has its own in summary.json)."""
    result = trial.last_result or {}
    params = _trial_params(recipe, trial.config)
    base_extra = {"node": result.get("node"), "recipe_hash": recipe.hash,
                  **recipe.resources_for(params)}
    if result.get(FINAL_KEY) and trial.checkpoint is not None:
        return _add_from_checkpoint(store, trial.checkpoint, base_extra | {"attempts": trial.num_failures + 1})
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
) -> SweepOutcome:
    """Run (or ``resume``) the sweep described by ``recipe_path``; returns counts and where results are.

    ``address`` (or ``RAY_ADDRESS``) joins an existing Ray cluster; otherwise a local Ray instance sized
    to this machine is started and stopped.
    """
    from rich.console import Console

    from skinsweep.data.index import load_index
    from skinsweep.data.split import SplitManifest, make_split
    from skinsweep.recipe import load_recipe
    from skinsweep.results import ResultsStore

    console = console or Console()
    t0 = time.perf_counter()
    recipe = load_recipe(recipe_path, overrides)
    out_dir = Path(recipe.out_dir)
    if str(recipe.storage).startswith(("s3://", "gs://")):
        raise ConfigError(f"{recipe_path}: storage {recipe.storage!r} — object stores are not supported by the "
                          "Parquet results store yet; use a local or shared (NFS) path")
    state_exists = (out_dir / "tuner.pkl").exists() or any(out_dir.glob("experiment_state*.json"))
    if resume and not state_exists:
        raise ConfigError(f"--resume: {out_dir} is not an interrupted skinsweep sweep (no Ray Tune state); "
                          f"run without --resume to start it")
    if not resume and state_exists:
        raise ConfigError(f"{out_dir} already holds a sweep named {recipe.name!r}; pass --resume to continue it, "
                          "or --set name=… / --set storage=… to start a new one")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"storage {out_dir} is not writable ({e.strerror}); use --set storage=PATH") from None

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
        "dataset_hash": index.hash}, indent=2))
    store = ResultsStore(out_dir)

    # ---- Ray --------------------------------------------------------------------------------
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    _connect(address)
    try:
        trainable = tune.with_parameters(_trainable, recipe_json=recipe.model_dump_json(),
                                         split_file=str(split_file.resolve()))
        trainable = tune.with_resources(trainable, lambda config: _resources(recipe, config))
        metric, mode = recipe.scheduler.metric, _metric_mode(recipe)
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
            name=recipe.name, storage_path=str(Path(recipe.storage).resolve()),
            failure_config=tune.FailureConfig(max_failures=recipe.retries),
            callbacks=[_Consolidate(str(out_dir), recipe.model_dump_json(), str(split_file.resolve()))], verbose=0)
        param_space = {} if recipe.search else {POINT_KEY: tune.grid_search(recipe.explicit_points())}
        tune_config = tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                      num_samples=recipe.num_samples if recipe.search else 1,
                                      max_concurrent_trials=recipe.resources.max_concurrent_trials,
                                      # a new trial reuses a finished trial's worker process (and its imported
                                      # torch/timm) when resources match: saves seconds per trial
                                      reuse_actors=True)
        if resume:
            console.print(f"resuming sweep {recipe.name} from {out_dir}")
            tuner = tune.Tuner.restore(str(out_dir.resolve()), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
        console.print(f"sweep {recipe.name}: {recipe.num_samples} trials, recipe {recipe.hash}, split {manifest.hash} "
                      f"→ {out_dir}")
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: finished trials are in {out_dir}/trials.parquet; continue with "
                          f"`skinsweep sweep {recipe_path} --resume`" + "".join(f" --set {o}" for o in overrides))
            raise SystemExit(130) from None
        # ---- reconciliation: every finished trial is in the store exactly once ----------------
        for r in grid:
            _reconcile(store, recipe, r)
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
    finally:
        if address is None and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()
    df = store.trials()
    counts = df["status"].value_counts().to_dict()
    return SweepOutcome(out_dir=str(out_dir), n_trials=len(df), counts=counts, wall_s=time.perf_counter() - t0)


def _reconcile(store, recipe, result) -> None:
    """A finished trial (from Tune's ResultGrid) that the store lacks is added from its checkpoint."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if not trial_id or trial_id in store.trial_ids():
        return
    if metrics.get(FINAL_KEY) and result.checkpoint is not None:
        params = _trial_params(recipe, result.config)
        _add_from_checkpoint(store, result.checkpoint, {"node": metrics.get("node"), "recipe_hash": recipe.hash,
                                                        **recipe.resources_for(params)})


def _add_from_checkpoint(store, ckpt, extra: dict) -> str:
    """Fetch a finished trial's artefact folder from Ray's storage and add it to the store; its status."""
    with tempfile.TemporaryDirectory(prefix="skinsweep-consolidate-") as tmp:
        local = Path(ckpt.to_directory(tmp))
        summary = json.loads((local / "summary.json").read_text())
        preds = local / "predictions.parquet"
        store.add_trial(summary, predictions=preds if preds.is_file() else None,
                        extra=extra | {"checkpoint": _join(ckpt.path, "checkpoint.safetensors")})
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
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
        except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ... depending on the cause
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the token is in ~/.ray/auth_token on the head)"
                    if "auth" in msg.lower() else f"check that `ray start --head` is running on {host} and reachable")
            raise ConfigError(f"cannot join Ray cluster at {address}: {msg[:200]}; {hint}") from None
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 _node_ip_address="127.0.0.1" if _loopback_only() else None)


def _loopback_only() -> bool:
    """True inside a network namespace whose only interface is loopback (as `make test` runs)."""
    import socket

    try:  # if_nameindex asks the kernel about *this* network namespace (/sys/class/net may be the host's)
        return {name for _, name in socket.if_nameindex()} <= {"lo"}
    except OSError:
        return False


__all__ = ["SweepOutcome", "consolidate_trial", "run_sweep"]
