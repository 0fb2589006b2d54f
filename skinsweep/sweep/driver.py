"""The driver side of a sweep: Tune's trial events → the progress view and the results store.

:class:`SweepDriver` receives the events of the sweep running in this process (from the Tune callback
in :mod:`skinsweep.sweep.runner`, or from tests with made-up trials), draws them in the progress view
(:mod:`skinsweep.sweep.progress`) and, when a trial ends, consolidates it into the Parquet results store
(:func:`consolidate_trial`: its checkpoint's ``summary.json`` and predictions, or a pruned / failed row),
then mirrors the store to object-store storage (:mod:`skinsweep.sweep.storage`). Nothing here imports Ray:
Tune's trial and result objects are used through their attributes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from skinsweep.errors import ConfigError, StoreWriteError, first_line
from skinsweep.sweep.storage import CHECKPOINTS_DIR, Remote

FINAL_KEY = "skinsweep_final"  # set only in a trial's last report (with its checkpoint)
EPOCH_KEY = "epoch"            # ASHA's time attribute; absent from the final report so ASHA ignores it
POINT_KEY = "params"           # Tune config key holding one `trials:` entry (explicit recipes)

BUDGET_JSON = "budget.json"    # the sweep's time budget and the time used so far (kept across --resume)

_ACTIVE: list["SweepDriver"] = []  # the driver of the sweep running in this process (see active_driver)


def active_driver() -> "SweepDriver":
    """The driver of the sweep running in this process (Tune's callback forwards its events here)."""
    if not _ACTIVE:
        raise RuntimeError("skinsweep sweep callback called outside run_sweep")
    return _ACTIVE[-1]


@dataclass
class Budget:
    """A sweep's wall-time budget: ``budget_s`` in all, ``used_before`` spent by earlier runs (``--resume``),
    this run started at ``t_start`` (``time.time()``). ``budget_s`` None: no budget."""

    budget_s: float | None
    used_before: float = 0.0
    t_start: float = field(default_factory=time.time)

    saved_at: float = field(default=0.0, repr=False)

    @classmethod
    def start(cls, budget_s: float | None, store_root: Path, resume: bool, t_start: float | None = None) -> "Budget":
        """This run's budget. On ``--resume`` the time earlier runs used (``budget.json``) is already spent,
        and a sweep started with a budget keeps it when resumed without one (``budget_s`` None)."""
        used, recorded = 0.0, None
        if resume and (store_root / BUDGET_JSON).is_file():
            try:
                rec = json.loads((store_root / BUDGET_JSON).read_text())
                used, recorded = float(rec.get("used_s") or 0.0), rec.get("budget_s")
            except (OSError, ValueError, AttributeError, TypeError):
                used = 0.0  # an unreadable record: count from now rather than refuse to resume
        return cls(budget_s if budget_s is not None else recorded, used, time.time() if t_start is None else t_start)

    @property
    def deadline(self) -> float | None:
        """``time.time()`` at which the budget runs out, or None."""
        return None if self.budget_s is None else self.t_start + self.budget_s - self.used_before

    def used(self) -> float:
        return self.used_before + time.time() - self.t_start

    def spent(self) -> bool:
        return self.budget_s is not None and self.used() >= self.budget_s

    def text(self) -> str:
        """``budget 12m03s of 1h00m00s used, 47m57s left`` ('' without a budget)."""
        if self.budget_s is None:
            return ""
        from skinsweep.sweep.space import format_duration

        used = min(self.used(), self.budget_s)
        return (f"budget {format_duration(used)} of {format_duration(self.budget_s)} used, "
                f"{format_duration(self.budget_s - used)} left")

    def save(self, store_root: Path, *, every: float = 0.0) -> None:
        """Record the budget and the time used so far (what ``--resume`` counts); ``every``: skip if the last
        save is more recent than that many seconds."""
        if self.budget_s is None or time.time() - self.saved_at < every:
            return
        from skinsweep.errors import StoreWriteError
        from skinsweep.files import atomic_write_text

        try:
            atomic_write_text(store_root / BUDGET_JSON, json.dumps({"budget_s": self.budget_s, "used_s": self.used(),
                                                                    "deadline": self.deadline}))
        except OSError as e:
            raise StoreWriteError(store_root / BUDGET_JSON, e) from None
        self.saved_at = time.time()


class SweepDriver:
    """The driver side of one sweep run: progress view, consolidation into the store, mirroring.

    Args:
        store: the (local) results store.
        recipe: the sweep recipe.
        split_file: the split manifest on the driver (recorded in pruned / failed trials' configs).
        progress: the progress view (:class:`skinsweep.sweep.progress.SweepProgress`).
        remote: object-store storage to mirror the store to after each trial, or None.
    """

    def __init__(self, store, recipe, split_file: str, progress, remote: Remote | None = None,
                 budget: Budget | None = None) -> None:
        self.store, self.recipe, self.split_file = store, recipe, split_file
        self.progress, self.remote = progress, remote
        self.budget = budget or Budget(None)
        self.mirror = None  # the background mirror to object-store storage (skinsweep.sweep.storage.MirrorWorker)
        if remote is not None:
            from skinsweep.sweep.storage import MirrorWorker

            self.mirror = MirrorWorker(store.root, remote, notify=progress.note)
            progress.mirror_status = self.mirror.status_line
        self.deferred: dict[str, object] = {}  # trials whose checkpoint could not be fetched yet (storage down)
        self.started_at: dict[str, float] = {}  # trial id → time.time() of its (first) start
        self.trials: dict[str, object] = {}     # trial id → Tune's trial, as last seen in an event
        self.metric = recipe.scheduler.metric
        self.history: dict[str, list[dict]] = {}  # per-epoch results, stored for trials pruned by ASHA
        self.fatal: StoreWriteError | None = None   # why the sweep had to stop (the store cannot be written)

    def __enter__(self) -> "SweepDriver":
        """Receive the Tune events of this process (see :func:`active_driver`) until the block ends."""
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

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
        self.started_at.setdefault(trial.trial_id, time.time())
        self.trials[trial.trial_id] = trial
        params = trial_params(self.recipe, trial.config)
        cfg = self.recipe.trial_config(params, split=self.split_file)
        hparams = {k: v for k, v in params.items() if k not in ("backbone", "mode")}
        self.progress.started(trial.trial_id, cfg.backbone, cfg.mode, hparams, cfg.epochs)

    def result(self, trial, result: dict) -> None:
        if EPOCH_KEY in result and not result.get(FINAL_KEY):
            self.progress.epoch(trial.trial_id, result[EPOCH_KEY], result.get(self.metric))
            rec = {k: v for k, v in result.items() if k == "epoch" or k.startswith(("train_", "val_"))}
            self.history.setdefault(trial.trial_id, []).append(rec)
        try:
            self.budget.save(self.store.root, every=60)  # a killed driver loses at most a minute of used budget
        except StoreWriteError as e:
            self.fatal = e
            raise

    def recovering(self, trial) -> None:
        self.progress.retrying(trial.trial_id, trial.num_failures + 1, _last_error(trial))

    def finished(self, trial) -> None:
        self.trials[trial.trial_id] = trial
        fetched = self._consolidate(trial)
        if fetched and self.deferred and (self.mirror is None or self.mirror.error is None):
            for t in list(self.deferred.values()):  # the object store is back: fetch what is waiting
                self._consolidate(t)

    def _consolidate(self, trial) -> bool:
        """Add an ended trial to the store and show it; False when its checkpoint cannot be fetched from the
        object store yet (it is retried after the next trial and at the end, see :meth:`retry_deferred`)."""
        from skinsweep.sweep.storage import brief_error, storage_errors

        try:
            status = consolidate_trial(self.store, self.recipe, trial, self.split_file, remote=self.remote,
                                       history=self.history.get(trial.trial_id),
                                       started_at=self.started_at.get(trial.trial_id))
            self.budget.save(self.store.root)
        except StoreWriteError as e:
            # The store cannot be written (disk full, permissions): stop the sweep (raising out of Tune's
            # callback ends Tuner.fit) rather than run trials whose results cannot be kept. run_sweep turns
            # this into one line; the trial is added again from its checkpoint by --resume.
            self.fatal = e
            raise
        except storage_errors() as e:
            if self.remote is None:
                # Local / NFS storage whose checkpoint folder the driver cannot read (a path on a node's own
                # disk, gone with the node): record the trial as failed, saying why, and go on with the sweep.
                cfg = self.recipe.trial_config(trial_params(self.recipe, trial.config), split=self.split_file)
                where = getattr(trial.checkpoint, "path", None)
                self.store.add_failed(
                    trial.trial_id, cfg.model_dump(),
                    f"its checkpoint {where} cannot be read on the driver ({first_line(e)[:200]}); storage must be "
                    "a folder every node can reach (NFS) or an object store (s3://…)",
                    extra=_row_extra(self.recipe, trial_params(self.recipe, trial.config), trial.last_result or {})
                    | {"attempts": trial.num_failures + 1})
                self.history.pop(trial.trial_id, None)
                self.progress.finished(trial.trial_id, "failed")
                return True
            # The object store is unreachable: the checkpoint is safe there; fetch it when the store is back.
            if trial.trial_id not in self.deferred:
                self.progress.note(f"{trial.trial_id}: its checkpoint cannot be fetched from {self.remote.uri} yet "
                                   f"({brief_error(e)}); trying again after the next trial and at the end")
            self.deferred[trial.trial_id] = trial
            return False
        self.deferred.pop(trial.trial_id, None)
        self.history.pop(trial.trial_id, None)
        df = self.store.trials()
        row = df[df["trial_id"] == trial.trial_id]
        value = row[self.metric].iloc[0] if len(row) and self.metric in row else None
        epochs = row["epochs_run"].iloc[0] if len(row) else None
        self.sync()
        self.progress.finished(trial.trial_id, status, value, epoch=epochs)  # it skips a null (NaN) epoch
        return True

    def retry_deferred(self, wait_s: float) -> list[str]:
        """Consolidate the trials whose checkpoint the object store could not give yet, trying for up to
        ``wait_s`` seconds (with backoff); returns the ids still missing."""
        delay, end = 1.0, time.monotonic() + wait_s
        while self.deferred:
            for t in list(self.deferred.values()):
                self._consolidate(t)
            if not self.deferred or time.monotonic() >= end:
                break
            time.sleep(min(delay, max(0.0, end - time.monotonic())))
            delay = min(delay * 2, 30.0)
        return sorted(self.deferred)

    def sync(self, *, final: bool = False) -> None:
        """Mirror the store to object-store storage. During the sweep this asks the background mirror for a pass
        and returns at once (an unreachable store is retried with backoff and shown in the progress view);
        ``final`` mirrors now, in this thread, and a failure is an error (the sweep's start: the split
        manifest must be in storage before any trial reads it)."""
        if self.remote is None:
            return
        if not final:
            self.mirror.request()
            return
        from skinsweep.sweep.storage import brief_error, mirror, storage_errors

        try:
            with self.mirror.lock:
                mirror(self.store.root, self.remote)
        except storage_errors() as e:
            raise ConfigError(f"could not copy the results store {self.store.root} to {self.remote.uri} "
                              f"({brief_error(e)}); check the bucket, credentials and endpoint "
                              "(AWS_ENDPOINT_URL), then run the same command again (with --resume once trials "
                              "have run)") from None

    def finish_mirror(self, wait_s: float) -> list[str]:
        """End of the sweep: wait up to ``wait_s`` seconds for the background mirror to catch up, stop it, and
        return the store files still not mirrored (printing one line about them when there are any)."""
        if self.mirror is None:
            return []
        from skinsweep.sweep.storage import pending

        caught_up = self.mirror.flush(wait_s)
        self.mirror.close()
        left = [] if caught_up else pending(self.store.root)
        if left:
            self.progress.console.print(
                f"[yellow]warning[/]: {len(left)} file(s) of the results store are not yet in {self.remote.uri} "
                f"({self.mirror.error or 'timed out'}); the local store {self.store.root} is complete — copy them "
                f"with `skinsweep results sync {self.store.root}` once the object store is reachable",
                highlight=False, soft_wrap=True)
        return left

    def close(self) -> None:
        """Stop the background mirror (what it has not copied stays in the local store)."""
        if self.mirror is not None:
            self.mirror.close()


def consolidate_trial(store, recipe, trial, split_file: str, remote: Remote | None = None,
                      history: list[dict] | None = None, started_at: float | None = None) -> str:
    """Put one finished Tune trial into the store; returns the status recorded.

    ``remote``: the sweep's object-store folder when ``storage`` is one (the trial's checkpoint is then
    copied into the store's ``checkpoints/``, so that bundles can be built from the local store).
    ``history``: the per-epoch results Tune saw, stored for a pruned trial (a completed one has its own
    in summary.json). ``started_at``: ``time.time()`` when the trial started (the ``started_at`` column).
    """
    result = trial.last_result or {}
    params = trial_params(recipe, trial.config)
    base_extra = _row_extra(recipe, params, result) | ({"started_at": started_at} if started_at else {})
    if result.get(FINAL_KEY) and trial.checkpoint is not None:
        return _add_from_checkpoint(store, trial.trial_id, trial.checkpoint,
                                    base_extra | {"attempts": trial.num_failures + 1}, remote)
    cfg = recipe.trial_config(params, split=split_file)
    if trial.status == "ERROR" or trial.error_file:
        store.add_failed(trial.trial_id, cfg.model_dump(), _last_error(trial),
                         extra=base_extra | {"attempts": trial.num_failures})
        return "failed"
    # Stopped by ASHA before its last epoch: record what it reached, no predictions, no test score.
    val = {k.removeprefix("val_"): v for k, v in result.items() if k.startswith("val_")}
    summary = {"trial_id": trial.trial_id, "config": cfg.model_dump(), "config_hash": cfg.hash,
               "epochs_run": result.get(EPOCH_KEY), "val": val, "runtime_s": result.get("time_total_s"),
               "history": history or []}
    store.add_trial(summary, predictions=None, status="pruned",
                    extra=base_extra | {"pruned_at_epoch": result.get(EPOCH_KEY)})
    return "pruned"


def _last_error(trial) -> str:
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:  # the error file is gone or unreadable
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "trial failed (no error file)"


def add_if_missing(store, recipe, result, known, remote: Remote | None = None) -> None:
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
        extra = _row_extra(recipe, trial_params(recipe, result.config), metrics) | extra
        _add_from_checkpoint(store, trial_id, result.checkpoint, extra, remote)


def _add_from_checkpoint(store, trial_id: str, ckpt, extra: dict, remote: Remote | None = None) -> str:
    """Fetch a finished trial's artefact folder from Ray's storage and add it to the store; its status.

    With local / NFS storage the ``checkpoint`` column points into Ray's storage. With an object store it
    points to a local copy in ``<store>/checkpoints/<trial_id>/`` (what a bundle is built from) and
    ``checkpoint_uri`` says where the original is.
    """
    original = ckpt.path.rstrip("/") + "/checkpoint.safetensors"
    if remote is None:
        with tempfile.TemporaryDirectory(prefix="skinsweep-consolidate-") as tmp:
            folder = Path(ckpt.to_directory(tmp))
            has_model = (folder / "checkpoint.safetensors").is_file()  # none for a trial stopped by the budget
            return _add_trial_folder(store, folder, extra | {"checkpoint": original if has_model else None})
    dest = store.root / CHECKPOINTS_DIR / trial_id
    tmp = dest.with_name(f".{trial_id}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt.to_directory(str(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)  # a reader sees no checkpoint folder or a whole one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    has_model = (dest / "checkpoint.safetensors").is_file()  # none for a trial stopped by the budget
    status = _add_trial_folder(store, dest, extra | ({"checkpoint": str(dest / "checkpoint.safetensors"),
                                                      "checkpoint_uri": remote.uri_of(original)} if has_model else
                                                     {"checkpoint": None}))
    (dest / "predictions.parquet").unlink(missing_ok=True)  # now in the store's predictions/
    return status


def _add_trial_folder(store, folder: Path, extra: dict) -> str:
    """Add the trial whose artefacts (``summary.json``, ``predictions.parquet``) are in ``folder``; its status."""
    summary = json.loads((folder / "summary.json").read_text())
    preds = folder / "predictions.parquet"
    store.add_trial(summary, predictions=preds if preds.is_file() else None, extra=extra)
    return summary["status"]


def trial_params(recipe, config: dict) -> dict:
    """A Tune config → TrialConfig-named params (Optuna names mapped back; a `trials:` point unwrapped)."""
    if not recipe.search:
        return dict(config.get(POINT_KEY, {}))
    return recipe.params_from_optuna(config)


def _row_extra(recipe, params: dict, result: dict) -> dict:
    """The trials.parquet columns the sweep adds to a trial's own: where it ran, with what, for which recipe."""
    return {"node": result.get("node"), "torch_threads": result.get("torch_threads"), "recipe_hash": recipe.hash,
            **recipe.resources_for(params)}
