"""Faults a sweep meets on real machines (issue #14): trials of one node needing the same cache at once,
readers of the results store while a sweep writes it, a disk that fills up or turns unwritable mid-sweep.

The concurrency tests start real processes (spawn, like Ray's workers) on a cold cache and count builds;
each would fail if the lock around the build were removed (several processes would all build).
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import make_rows, write_isic
from skinsweep.errors import DataError, StoreWriteError
from skinsweep.results import ResultsStore, query, show

N_PROCS = 4


# ----------------------------------------------------------------------------------------------------
# 1. Several trials of one node need the same cache at the same time
# ----------------------------------------------------------------------------------------------------

def _embed(batch):
    """A stand-in frozen backbone: mean colour per image (B, 3); slow enough that the builds overlap."""
    time.sleep(0.3)
    return batch.float().mean(dim=(1, 2))


def _worker(root: str, barrier, queue) -> None:
    """One 'trial': needs the default split manifest, the image cache and the embeddings, all cold."""
    from skinsweep.data.cache import build_cache
    from skinsweep.data.index import load_index
    from skinsweep.data.split import get_or_create_split
    from skinsweep.train.embeddings import cached_embeddings

    try:
        index = load_index(root, workers=1)
        barrier.wait(timeout=120)  # every process is imported and ready: the caches are asked for at once
        manifest, _, split_created = get_or_create_split(index)
        barrier.wait(timeout=120)
        cache = build_cache(index, size=16, workers=1)
        barrier.wait(timeout=120)
        ids = manifest.ids("train") + manifest.ids("val") + manifest.ids("test")
        feats, hit = cached_embeddings("k" * 20, ids, cache, _embed, batch_size=16)
        queue.put({"pid": os.getpid(), "split_created": split_created, "split_hash": manifest.hash,
                   "image_built": cache.built, "pixels": float(np.asarray(cache.images, dtype=np.float64).sum()),
                   "embed_built": not hit, "feats": float(np.asarray(feats, dtype=np.float64).sum())})
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put({"pid": os.getpid(), "error": f"{type(e).__name__}: {e}"})


@pytest.mark.timeout(300)
def test_concurrent_trials_on_a_cold_cache_build_each_cache_once(tmp_path):
    root = write_isic(tmp_path / "isic", make_rows(120), size=(120, 90))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), barrier, queue)) for _ in range(N_PROCS)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors
    # exactly one process built each cache; the other three waited on its lock and reused it
    assert sum(r["split_created"] for r in results) == 1, results
    assert sum(r["image_built"] for r in results) == 1, results
    assert sum(r["embed_built"] for r in results) == 1, results
    # and they all read the same, whole files
    for k in ("split_hash", "pixels", "feats"):
        assert len({r[k] for r in results}) == 1, (k, results)
    cache = Path(os.environ["SKINSWEEP_CACHE"])
    assert not [p.name for p in cache.rglob("*.tmp")]  # no half-written file left behind


def test_waiting_process_reuses_the_cache_built_while_it_waited(isic_dir, monkeypatch):
    """The second check under the lock: a process that found no cache, then got the lock after another
    process built it, reuses it instead of building again."""
    import skinsweep.data.cache as cache_mod
    from skinsweep.data.index import load_index

    idx = load_index(isic_dir)
    other = cache_mod.build_cache(idx, size=16, workers=1)  # "another process" finished while we waited
    assert other.built
    real_file_lock, seen = cache_mod.file_lock, []
    monkeypatch.setattr(cache_mod, "_build", lambda *a, **k: pytest.fail("built twice"))
    meta = next(Path(other.path).parent.glob("*.json"))
    text = meta.read_text()
    meta.unlink()  # the first, lock-free check misses ...

    def finish_while_waiting(path):
        seen.append(Path(path).name)
        meta.write_text(text)  # ... the builder finishes while this process waits for the lock
        return real_file_lock(path)

    monkeypatch.setattr(cache_mod, "file_lock", finish_while_waiting)
    again = cache_mod.build_cache(idx, size=16, workers=1)
    assert not again.built and seen == [".squash-16.lock"]
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(other.images))


# ----------------------------------------------------------------------------------------------------
# 2. Disk full or unwritable while the store is written
# ----------------------------------------------------------------------------------------------------

def _summary(trial_id: str) -> dict:
    from test_results import summary

    return summary(trial_id)


def _add(store: ResultsStore, trial_id: str) -> None:
    from test_results import add

    add(store, _summary(trial_id))


def _full_after(monkeypatch, n_ok: int) -> list:
    """Make pyarrow's Parquet writer (as the store calls it) fail with ENOSPC after ``n_ok`` writes."""
    import skinsweep.results.store as store_mod

    real, calls = store_mod.pq.write_table, []

    def write_table(table, where_, *a, **k):
        calls.append(str(where_))
        if len(calls) > n_ok:
            # what a full disk gives mid-write: part of the file is there, then ENOSPC
            Path(where_).write_bytes(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, where_, *a, **k)

    monkeypatch.setattr(store_mod.pq, "write_table", write_table)
    return calls


@pytest.mark.parametrize("n_ok", [0, 1, 2])  # fails at: the predictions file, the history file, trials.parquet
def test_disk_full_while_adding_a_trial_keeps_what_was_written(tmp_path, monkeypatch, n_ok):
    store = ResultsStore(tmp_path / "sweep")
    for t in ("t1", "t2"):
        _add(store, t)
    before_trials = pq.read_table(store.trials_path)
    before_preds = pd.read_parquet(store.predictions_dir)

    _full_after(monkeypatch, n_ok)
    with pytest.raises(StoreWriteError) as err:
        _add(store, "t3")
    msg = str(err.value)
    assert "\n" not in msg
    target = ["predictions/t3.parquet", "history/t3.parquet", "trials.parquet"][n_ok]
    assert f"cannot write {store.root / target}" in msg
    assert "No space left on device" in msg and "free space" in msg and "--resume" in msg
    assert f"results already written ({store.trials_path}) are intact" in msg
    monkeypatch.undo()

    # nothing already written is lost or damaged, and no half-written file is visible to readers
    assert pq.read_table(store.trials_path).equals(before_trials)
    assert store.trial_ids() == {"t1", "t2"}
    pd.testing.assert_frame_equal(pd.read_parquet(store.predictions_dir), before_preds)
    assert len(query(store.root, "SELECT * FROM predictions")) == len(before_preds)
    assert not [p.name for p in store.root.rglob("*.tmp")]
    # space is back: the trial is added again (what --resume does)
    _add(store, "t3")
    assert store.trial_ids() == {"t1", "t2", "t3"} and len(store.predictions("t3")) > 0


def test_unwritable_store_gives_one_line(tmp_path, monkeypatch):
    """A revoked permission. chmod does not stop root, so the error is injected where the store opens files."""
    store = ResultsStore(tmp_path / "sweep")
    _add(store, "t1")
    import skinsweep.results.store as store_mod

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(store.root / ".lock"))

    monkeypatch.setattr(store_mod, "_locked", denied)
    with pytest.raises(StoreWriteError, match=r"cannot write .*\.lock \(Permission denied\).*make that folder "
                                              r"writable again, then continue with .*--resume"):
        _add(store, "t2")
    monkeypatch.undo()
    assert store.trial_ids() == {"t1"}


def test_store_write_error_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    """`user_errors` prints a StoreWriteError as one red line and exit status 2, no traceback."""
    import typer

    from skinsweep.cli import user_errors

    store = ResultsStore(tmp_path / "sweep")
    _full_after(monkeypatch, 0)

    @user_errors
    def command():
        _add(store, "t1")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err and "No space left on device" in err
    assert " ".join(err.split()).count("error:") == 1


def test_sweep_driver_stops_on_a_full_disk_with_the_resume_command(tmp_path, monkeypatch):
    """The driver records why it stopped (run_sweep prints it with the exact --resume command)."""
    from skinsweep.errors import StoreWriteError as E

    e = E(tmp_path / "trials.parquet", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), kept=tmp_path / "trials.parquet")
    line = e.with_command("`skinsweep sweep sweeps/demo.yaml --resume`")
    assert line == (f"cannot write {tmp_path}/trials.parquet (No space left on device); results already written "
                    f"({tmp_path}/trials.parquet) are intact; free space on that disk (or raise the quota), then "
                    "continue with `skinsweep sweep sweeps/demo.yaml --resume`")
    assert isinstance(e, DataError)


def test_image_cache_on_a_full_disk_is_one_line(isic_dir, monkeypatch):
    import skinsweep.data.cache as cache_mod
    from skinsweep.data.index import load_index

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_mod.os, "posix_fallocate", full)
    with pytest.raises(DataError, match=r"cannot write the image cache .*No space left on device; free space"):
        cache_mod.build_cache(load_index(isic_dir), size=16, workers=1)
    assert not [p.name for p in Path(os.environ["SKINSWEEP_CACHE"]).rglob("*.tmp")]


def test_readers_never_fail_while_the_store_is_rewritten_in_a_loop(tmp_path):
    """The store replaces trials.parquet (and a re-recorded trial's files) by rename. pyarrow opens a
    path twice (footer, then data), so path reads racing a rename applied one version's footer to the
    other's bytes; the store's readers go through one handle (before the fix this test failed, on
    pyarrow's "Page was smaller than expected" and DuckDB's "don't know what type")."""
    from skinsweep.results import header

    store = ResultsStore(tmp_path / "s")
    for i in range(3):
        _add(store, f"t{i}")
    stop, errors, reads, writes = threading.Event(), [], [], [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            _add(store, f"t{i % 3}" if i % 2 else f"n{i}")  # re-record an old trial, or add a new one
            i += 1
            writes[0] = i

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    readers = {"trials": lambda: ResultsStore(store.root).trials(),
               "predictions": lambda: ResultsStore(store.root).predictions(split="val"),
               "header": lambda: header(store.root), "show": lambda: show(store.root, top=None),
               "query": lambda: query(store.root, "SELECT count(*) FROM predictions JOIN trials USING (trial_id)")}
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 4:
            for name, read in readers.items():
                try:
                    read()
                    reads.append(name)
                except Exception as e:  # noqa: BLE001 - counted, the test asserts there are none
                    errors.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert writes[0] >= 20 and len(reads) >= 50, (writes, len(reads))  # the race was really exercised
    assert not errors, (len(errors), errors[:3])


# ----------------------------------------------------------------------------------------------------
# 3. Sweeps (Ray): readers while trials are written; a disk that fills up mid-sweep, then --resume
# ----------------------------------------------------------------------------------------------------

from test_runner import data, needs_loopback, write_recipe  # noqa: E402,F401 - `data`: the fixture

FAST = ["scheduler.type=none", "trial.epochs=2", "search.points_to_evaluate=[]"]


def _read_handle(path: Path) -> pd.DataFrame:
    with open(path, "rb") as f:
        return pd.read_parquet(f)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readers_during_a_sweep_never_fail_or_see_a_partial_file(data, tmp_path):
    needs_loopback()
    from skinsweep.sweep.runner import run_sweep

    recipe = write_recipe(tmp_path / "r.yaml", name="read", storage=tmp_path / "res", data=data, n=6)
    out = tmp_path / "res" / "read"
    done, errors, reads, sizes = threading.Event(), [], [], []

    def reader() -> None:
        while not done.is_set():
            if not (out / "trials.parquet").is_file():  # nothing recorded yet: nothing to read
                time.sleep(0.05)
                continue
            for name, read in (
                ("show", lambda: show(out, top=None)),
                ("query", lambda: query(out, "SELECT trial_id, count(*) AS n FROM predictions GROUP BY trial_id")),
                # through one handle, as the README says: pandas / pyarrow given a *path* open it twice and
                # can, rarely, pair one version's footer with the next version's bytes
                ("read_parquet trials", lambda: _read_handle(out / "trials.parquet")),
                ("read_parquet predictions",
                 lambda: pd.read_parquet(out / "predictions") if (out / "predictions").is_dir() else pd.DataFrame()),
            ):
                try:
                    df = read()
                    if name == "read_parquet trials":
                        sizes.append(len(df))
                    if name == "read_parquet predictions" and len(df):
                        # whole files only: every trial read has all its rows (same count for every trial)
                        assert df.groupby("trial_id").size().nunique() == 1, df.groupby("trial_id").size()
                    reads.append(name)
                except BaseException as e:  # noqa: BLE001 - counted, the test asserts there are none
                    errors.append(f"{name}: {type(e).__name__}: {e}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        outcome = run_sweep(recipe, overrides=FAST)
    finally:
        done.set()
        thread.join(timeout=60)
    assert outcome.n_trials == 6
    assert not errors, errors[:5]
    assert len(reads) >= 20, len(reads)                   # reads really happened during the sweep ...
    assert len(set(sizes)) >= 3 and max(sizes) == 6      # ... while the store grew


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disk_full_mid_sweep_stops_with_one_line_then_resume_completes(data, tmp_path, monkeypatch):
    needs_loopback()
    import skinsweep.results.store as store_mod
    from skinsweep.sweep.runner import run_sweep

    recipe = write_recipe(tmp_path / "r.yaml", name="full", storage=tmp_path / "res", data=data, n=4)
    out = tmp_path / "res" / "full"
    real, recorded = store_mod.pq.write_table, []

    def write_table(table, where, *a, **k):  # the store's disk fills up once the first trial is recorded
        if Path(str(where)).is_relative_to(out) and "split" not in Path(str(where)).name:
            if recorded:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if ".trials.parquet" in str(where):
                recorded.append(where)
        return real(table, where, *a, **k)

    monkeypatch.setattr(store_mod.pq, "write_table", write_table)
    overrides = [*FAST, "resources.max_concurrent_trials=1"]
    with pytest.raises(DataError) as err:
        run_sweep(recipe, overrides=overrides)
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device" in msg and "free space" in msg
    assert f"cannot write {out}/" in msg
    assert f"`skinsweep sweep {recipe} --resume --set scheduler.type=none" in msg
    first = pq.read_table(out / "trials.parquet")
    assert first.num_rows == 1 and len(pd.read_parquet(out / "predictions")) > 0  # what was written is intact

    monkeypatch.undo()  # space is back
    outcome = run_sweep(recipe, overrides=overrides, resume=True)
    t = pd.read_parquet(out / "trials.parquet")
    assert outcome.n_trials == 4 and len(t) == 4 and t["trial_id"].is_unique
    assert first["trial_id"][0].as_py() in set(t["trial_id"])
    assert set(pd.read_parquet(out / "predictions")["trial_id"]) == set(t.loc[t["status"] == "completed", "trial_id"])


# ----------------------------------------------------------------------------------------------------
# 4. A worker node dies mid-sweep (Ray cluster of `ray start` nodes on loopback)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_node_dies_mid_sweep(data, tmp_path):
    """Every process of the second node is killed (SIGKILL, as if the machine went away) while one of its trials
    runs: the trial is retried on the head (recipe `retries` → Tune's max_failures), the sweep ends with exactly
    num_samples trials, and every completed trial has its predictions and checkpoint in the store."""
    import subprocess
    import sys

    from test_runner import ROOT, RayCluster

    needs_loopback()
    env = dict(os.environ, RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    cluster = RayCluster(6393, env)
    proc = None
    try:
        cluster.start_head("--num-cpus=1")
        cluster.add_node("--num-cpus=2", '--resources={"doomed": 2}')
        doomed = cluster.node_id("doomed")
        recipe = write_recipe(tmp_path / "r.yaml", name="nodeloss", storage=tmp_path / "res", data=data, n=4)
        out = tmp_path / "sweep.log"
        with open(out, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "skinsweep.cli", "sweep", str(recipe), "--address",
                                     cluster.address, "--set", "scheduler.type=none", "--set", "trial.epochs=8"],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
        # wait until a trial trains on the doomed node (a Tune trainable actor among its processes), then kill
        # every process of that node
        deadline, victims = time.time() + 240, set()
        while time.time() < deadline and proc.poll() is None:
            victims = cluster.pids("doomed")
            running = [p for p in victims if "ImplicitFunc" in cluster._procs().get(p, (0, ""))[1]]
            if running:
                time.sleep(1)  # the trial is starting or training (8 epochs: ~5 s of start-up and training here)
                break
            time.sleep(0.2)
        else:
            pytest.fail("no trial ran on the second node:\n" + out.read_text()[-3000:])
        cluster.kill(cluster.pids("doomed"))
        killed_at = time.time()
        proc.wait(timeout=420)
        log_text = out.read_text()
        assert proc.returncode == 0, log_text[-4000:]
        store = tmp_path / "res" / "nodeloss"
        t = pd.read_parquet(store / "trials.parquet")
        assert len(t) == 4 and t["trial_id"].is_unique, t[["trial_id", "status", "node"]]
        assert (t["status"] == "completed").all(), t[["trial_id", "status", "error"]]
        retried = t[t["attempts"] > 1]
        assert len(retried) >= 1 and "[retry]" in log_text, (t[["trial_id", "attempts", "node"]], log_text[-3000:])
        assert (retried["node"] != doomed).all()  # retried on the surviving node
        assert (t.loc[pd.to_datetime(t["finished_at"]).map(lambda x: x.timestamp()) > killed_at + 1, "node"]
                != doomed).all()  # nothing ran on the dead node after it died
        preds = pd.read_parquet(store / "predictions")
        assert set(preds["trial_id"]) == set(t["trial_id"])
        assert not preds.duplicated(["trial_id", "image_id", "split"]).any()
        for ck in t["checkpoint"]:
            assert Path(ck).is_file()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.stop()


# ----------------------------------------------------------------------------------------------------
# 5. The object store is slow or goes away (driver side, no Ray: Tune's events fed with made-up trials)
# ----------------------------------------------------------------------------------------------------

def _recipe(tmp_path, storage):
    from conftest import make_rows, write_isic
    from skinsweep.sweep.recipe import load_recipe

    data = write_isic(tmp_path / "isic", make_rows(20))
    f = tmp_path / "r.yaml"
    f.write_text(f"""
name: ev
storage: {storage}
data: {{root: {data}}}
trial: {{backbone: tiny_resnet, mode: finetune, epochs: 3}}
trials: [{{lr: 1.0e-3}}, {{lr: 2.0e-3}}, {{lr: 3.0e-3}}, {{lr: 4.0e-3}}]
""")
    return load_recipe(f)


class _Ckpt:
    """A Tune checkpoint stand-in: a trial folder that cannot be read the first ``fail`` times."""

    def __init__(self, folder: Path, fail: int = 0, error=OSError("AWS Error NETWORK_CONNECTION during GetObject "
                                                                   "operation: curlCode: 7, Could not connect to server")):
        self.path, self.folder, self.fail, self.error = str(folder), folder, fail, error

    def to_directory(self, dest=None):
        import shutil

        if self.fail:
            self.fail -= 1
            raise self.error
        shutil.copytree(self.folder, dest)
        return dest


def _trial_folder(root: Path, trial_id: str) -> Path:
    from test_results import preds, summary

    s = summary(trial_id)
    root.mkdir(parents=True)
    (root / "summary.json").write_text(__import__("json").dumps(s))
    preds(s).to_parquet(root / "predictions.parquet")
    (root / "checkpoint.safetensors").write_bytes(b"weights")
    return root


def _completed(trial_id: str, lr: float, ckpt) -> object:
    from test_runner import fake_trial
    from skinsweep.sweep.driver import FINAL_KEY

    return fake_trial(trial_id, {"lr": lr}, last_result={FINAL_KEY: 1, "val_auc": 0.8, "node": "n1"},
                      status="TERMINATED", checkpoint=ckpt)


def test_driver_never_waits_for_a_slow_mirror(tmp_path, monkeypatch):
    """Mirror passes that take 1 s each: every trial's end is handled at once (the next trial's events are not
    held up), the passes are folded together, and the end of the sweep waits for the last one."""
    import io

    from rich.console import Console

    import skinsweep.sweep.storage as storage
    from skinsweep.sweep.driver import SweepDriver
    from skinsweep.sweep.progress import SweepProgress
    from skinsweep.sweep.runner import _Events
    from test_runner import fake_trial

    passes = []

    def slow_mirror(local, remote, **kw):
        time.sleep(1.0)
        passes.append(sorted(p.name for p in (Path(local) / "history").glob("*.parquet")))
        return 1

    monkeypatch.setattr(storage, "mirror", slow_mirror)
    recipe = _recipe(tmp_path, "s3://sweeps/runs")
    remote = storage.Remote(uri="s3://sweeps/runs/ev", fs=None, path="sweeps/runs/ev", scheme="s3")
    progress = SweepProgress(Console(file=io.StringIO(), width=300), name="ev", total=4)
    store = ResultsStore(tmp_path / "local")
    driver = SweepDriver(store, recipe, str(tmp_path / "split.parquet"), progress, remote)
    events, handled = _Events(), []
    with driver, progress:
        for k in range(4):  # each trial ends (ASHA stopped it after one epoch): consolidated, then mirrored
            t = fake_trial(f"ev_{k}", {"lr": (k + 1) * 1e-3})
            events.on_trial_start(0, [], t)
            t.last_result = {"epoch": 1, "val_auc": 0.6, "val_loss": 0.5}
            events.on_trial_result(0, [], t, t.last_result)
            t0 = time.monotonic()
            events.on_trial_complete(0, [], t)
            handled.append(time.monotonic() - t0)
    assert max(handled) < 0.5, handled  # not one waited for a 1 s mirror pass
    assert driver.finish_mirror(10) == []
    assert 1 <= len(passes) <= 3, passes  # 4 requests folded into fewer passes; the last saw all 4 trials
    assert passes[-1] == [f"ev_{k}.parquet" for k in range(4)]
    assert len(store.trials()) == 4


def test_checkpoint_is_fetched_once_the_object_store_is_back(tmp_path, s3):
    """A trial ends while the object store is unreachable: its checkpoint is fetched after the next trial (or
    at the end) instead of the sweep failing, and its row, predictions and checkpoint copy reach the store."""
    import io

    from rich.console import Console

    from skinsweep.sweep.driver import SweepDriver
    from skinsweep.sweep.progress import SweepProgress
    from skinsweep.sweep.runner import _Events
    from skinsweep.sweep.storage import remote_sweep

    recipe = _recipe(tmp_path, "s3://sweeps/runs")
    buf = io.StringIO()
    progress = SweepProgress(Console(file=buf, width=300), name="ev", total=4)
    store = ResultsStore(tmp_path / "local")
    driver = SweepDriver(store, recipe, str(tmp_path / "split.parquet"), progress, remote_sweep("s3://sweeps/runs", "ev"))
    a = _completed("ev_0", 1e-3, _Ckpt(_trial_folder(tmp_path / "a", "ev_0"), fail=1))
    b = _completed("ev_1", 2e-3, _Ckpt(_trial_folder(tmp_path / "b", "ev_1"), fail=3))
    c = _completed("ev_2", 3e-3, _Ckpt(_trial_folder(tmp_path / "c", "ev_2")))
    events = _Events()
    with driver, progress:
        for t in (a, b, c):
            events.on_trial_start(0, [], t)
        events.on_trial_complete(0, [], a)  # unreachable: deferred, the sweep goes on
        assert store.trial_ids() == set() and set(driver.deferred) == {"ev_0"}
        events.on_trial_complete(0, [], b)  # still unreachable: deferred too, a not tried again
        assert store.trial_ids() == set() and set(driver.deferred) == {"ev_0", "ev_1"}
        events.on_trial_complete(0, [], c)  # reachable: c, then a; b's fetch fails once more
        assert store.trial_ids() == {"ev_0", "ev_2"} and set(driver.deferred) == {"ev_1"}
    assert driver.retry_deferred(10) == []  # the end of the sweep: retried with backoff until it works
    assert driver.finish_mirror(20) == []
    t = store.trials().set_index("trial_id")
    assert set(t.index) == {"ev_0", "ev_1", "ev_2"} and (t["status"] == "completed").all()
    assert all(Path(c).is_file() for c in t["checkpoint"])
    assert set(store.predictions()["trial_id"]) == {"ev_0", "ev_1", "ev_2"}
    text = buf.getvalue()
    assert "ev_0: its checkpoint cannot be fetched from s3://sweeps/runs/ev yet (Could not connect to server)" in text
    assert "Traceback" not in text


def test_unreadable_local_checkpoint_is_recorded_as_failed(tmp_path):
    """Local storage whose checkpoint folder the driver cannot read (a node's own disk, gone with the node): the
    trial is recorded as failed, saying why, and the sweep goes on."""
    import io

    from rich.console import Console

    from skinsweep.sweep.driver import SweepDriver
    from skinsweep.sweep.progress import SweepProgress
    from skinsweep.sweep.runner import _Events

    recipe = _recipe(tmp_path, tmp_path / "res")
    progress = SweepProgress(Console(file=io.StringIO(), width=300), name="ev", total=4)
    store = ResultsStore(tmp_path / "res" / "ev")
    gone = _Ckpt(tmp_path / "node2" / "checkpoint_000000", fail=1, error=FileNotFoundError(2, "No such file or directory"))
    a = _completed("ev_0", 1e-3, gone)
    with SweepDriver(store, recipe, str(tmp_path / "split.parquet"), progress), progress:
        _Events().on_trial_start(0, [], a)
        _Events().on_trial_complete(0, [], a)
    row = store.trials().iloc[0]
    assert row["status"] == "failed" and row["error"].startswith(f"its checkpoint {tmp_path}/node2/checkpoint_000000 "
                                                                 "cannot be read on the driver")
    assert "every node can reach" in row["error"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_object_store_outage_mid_sweep(data, tmp_path, s3_server, monkeypatch):
    """`storage: s3://…` and the S3 server goes away twice. The first outage starts right after the first trial
    is consolidated and lasts 20 s: trials keep training (the ones that end meanwhile wait to save their
    checkpoint), the mirror backs off and says so, then catches up. The second starts after the last trial
    and outlasts the sweep: the sweep ends with a complete local store and says what is not mirrored;
    `skinsweep results sync` sends it once the server is back."""
    import io
    import threading

    import pyarrow.fs as pafs
    from rich.console import Console
    from typer.testing import CliRunner

    import skinsweep.sweep.driver as driver_mod
    from skinsweep.cli import app
    from skinsweep.results import load
    from skinsweep.sweep.runner import run_sweep

    needs_loopback()
    monkeypatch.setenv("SKINSWEEP_MIRROR_WAIT", "5")     # the end of the sweep waits 5 s for the mirror
    monkeypatch.setenv("SKINSWEEP_STORAGE_WAIT", "300")  # trials wait up to 5 min for the object store
    real, n, events = driver_mod.consolidate_trial, [0], []

    def consolidate_then_outage(*args, **kw):
        status = real(*args, **kw)
        n[0] += 1
        if n[0] == 1:  # first trial in the store, before it is mirrored: the server goes away for 20 s
            s3_server.stop()
            events.append(("down", time.time()))
            threading.Timer(20, lambda: (s3_server.start(), events.append(("up", time.time())))).start()
        elif n[0] == 4:  # the last one: away until after the sweep
            s3_server.stop()
            events.append(("down", time.time()))
        return status

    monkeypatch.setattr(driver_mod, "consolidate_trial", consolidate_then_outage)
    recipe = write_recipe(tmp_path / "r.yaml", name="outage", storage="s3://sweeps/runs", data=data, n=4)
    local = tmp_path / "local"
    buf = io.StringIO()
    outcome = run_sweep(recipe, overrides=["scheduler.type=none", "trial.epochs=3"], results_dir=local,
                        console=Console(file=buf, width=300))
    text = buf.getvalue()
    (tmp_path / "sweep.log").write_text(text)  # what a user saw, for a failing run
    assert [e for e, _ in events] == ["down", "up", "down"], events
    # the local store is complete
    res = load(local)
    t = res.trials
    assert len(t) == 4 and (t["status"] == "completed").all(), (t[["trial_id", "status", "error"]], text[-3000:])
    assert (t["attempts"] == 1).all()  # nothing had to be trained again
    assert set(res.predictions["trial_id"]) == set(t["trial_id"])
    assert all(Path(c).is_file() for c in t["checkpoint"])
    # the first outage: reported with its backoff, then caught up
    assert "mirror: s3://sweeps/runs/outage unreachable (" in text and "files waiting, retry in " in text, text[-3000:]
    assert "mirror: s3://sweeps/runs/outage reachable again; the mirror has caught up" in text
    # the second: the sweep ends anyway and says what is left, and how to send it
    assert outcome.unmirrored and "trials.parquet" in outcome.unmirrored, outcome.unmirrored
    assert f"not yet in s3://sweeps/runs/outage" in text and f"skinsweep results sync {local}" in text
    s3_server.start()
    r = CliRunner().invoke(app, ["results", "sync", str(local)])
    assert r.exit_code == 0, r.output
    assert f"{len(outcome.unmirrored)} of " in r.output, (r.output, outcome.unmirrored)
    base = "sweeps/runs/outage"
    keys = {i.path.removeprefix(base + "/") for i in s3_server.fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File}
    assert {f"predictions/{i}.parquet" for i in t["trial_id"]} <= keys and {"trials.parquet", "sweep.json"} <= keys
    with s3_server.fs.open_input_stream(f"{base}/trials.parquet") as f:
        assert f.read() == (local / "trials.parquet").read_bytes()
