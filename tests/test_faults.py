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
    other's bytes; the store's readers go through one handle (measured before the fix: this test saw
    dozens of "Page was smaller than expected" errors in 3 s)."""
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
