"""Object-store storage: URI checks, and mirroring the local results store to S3 (a local moto server)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from skinsweep.errors import ConfigError
from skinsweep.sweep.storage import check_writable, mirror, pull, remote_sweep


@pytest.mark.parametrize("storage, message", [
    ("s3://", "names no bucket; use s3://BUCKET[/prefix]"),
    ("nosuch://bucket/x", "is not a usable filesystem URI"),
    ("file:///data/runs", "write a local path without file:// (e.g. --set storage=/data/runs)"),
])
def test_bad_storage_uri(storage, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        remote_sweep(storage, "s")


def test_local_path_is_not_remote():
    assert remote_sweep("/data/results", "s") is None and remote_sweep("results", "s") is None


def test_uri_query_sets_the_endpoint_and_is_dropped_from_the_path():
    r = remote_sweep("s3://bkt/pre?endpoint_override=127.0.0.1:9000&scheme=http", "s")
    assert (r.uri, r.path) == ("s3://bkt/pre/s", "bkt/pre/s")
    assert r.fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9000"  # travels to Ray workers


def files(fs, base: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path.removeprefix(base + "/")] = f.read()
    return out


def write_store(root: Path, trials: list[str]) -> None:
    (root / "predictions").mkdir(parents=True, exist_ok=True)
    for t in trials:
        pd.DataFrame({"image_id": ["a", "b"], "prob": [0.1, 0.9]}).to_parquet(root / "predictions" / f"{t}.parquet")
    pd.DataFrame({"trial_id": trials}).to_parquet(root / "trials.parquet")
    (root / "sweep.json").write_text('{"name": "s"}')


def test_mirror_copies_what_changed_and_pull_restores_it(tmp_path, s3):
    remote = remote_sweep("s3://sweeps/runs", "s")
    local = tmp_path / "store"
    write_store(local, ["t1", "t2"])
    (local / ".lock").touch()  # not part of the store
    assert mirror(local, remote) == 4
    assert set(files(s3, remote.path)) == {"trials.parquet", "sweep.json", "predictions/t1.parquet",
                                           "predictions/t2.parquet"}
    assert mirror(local, remote) == 0  # nothing changed: nothing copied
    # t2 removed (a resumed sweep dropped it), t3 added: t3 and trials.parquet go up, t2 goes away
    (local / "predictions" / "t2.parquet").unlink()
    write_store(local, ["t1", "t3"])
    assert mirror(local, remote) == 4  # t1 rewritten by write_store, t3, trials.parquet, sweep.json
    got = files(s3, remote.path)
    assert set(got) == {"trials.parquet", "sweep.json", "predictions/t1.parquet", "predictions/t3.parquet"}
    assert got["trials.parquet"] == (local / "trials.parquet").read_bytes()
    # another machine: pull rebuilds the same store
    other = tmp_path / "other"
    assert pull(remote, other) == 4
    for rel, data in got.items():
        assert (other / rel).read_bytes() == data


def test_check_writable(s3):
    check_writable(remote_sweep("s3://sweeps/runs", "s"))
    assert not files(s3, "sweeps/runs/s")  # the marker object is gone
    with pytest.raises(ConfigError, match=r"storage s3://missing-bucket/runs/s is not writable \(.*\); check the bucket"):
        check_writable(remote_sweep("s3://missing-bucket/runs", "s"))


def test_mirror_and_pull_carry_the_per_epoch_history(tmp_path, s3):
    remote = remote_sweep("s3://sweeps/runs", "h")
    local = tmp_path / "store"
    write_store(local, ["t1"])
    (local / "history").mkdir()
    pd.DataFrame({"trial_id": ["t1", "t1"], "epoch": [1, 2], "val_auc": [0.6, 0.7]}).to_parquet(
        local / "history" / "t1.parquet")
    assert mirror(local, remote) == 4
    assert "history/t1.parquet" in files(s3, remote.path)
    assert pull(remote, tmp_path / "other") == 4
    assert pd.read_parquet(tmp_path / "other" / "history" / "t1.parquet")["val_auc"].tolist() == [0.6, 0.7]
    (local / "history" / "t1.parquet").unlink()  # the trial's history went away locally: and remotely
    mirror(local, remote)
    assert "history/t1.parquet" not in files(s3, remote.path)


# ---- the background mirror: never blocks the sweep, backs off while the object store is down ---------------

class FakeRemote:
    uri = "s3://fake/runs/s"


def test_background_mirror_does_not_block_and_coalesces_requests(tmp_path):
    """A mirror pass that takes 1 s: request() returns at once, requests made meanwhile are folded into one more
    pass, and flush() waits until everything asked for is mirrored."""
    import threading
    import time

    from skinsweep.sweep.storage import MirrorWorker

    calls, started = [], threading.Event()

    def slow_mirror(local, remote):
        started.set()
        time.sleep(1.0)
        calls.append(time.monotonic())
        return 1

    w = MirrorWorker(tmp_path, FakeRemote(), mirror_fn=slow_mirror)
    try:
        t0 = time.monotonic()
        for _ in range(20):
            w.request()
        assert time.monotonic() - t0 < 0.2  # 20 requests while a 1 s pass runs: none waited for it
        assert started.wait(5)
        assert w.flush(timeout=10)
        assert 1 <= len(calls) <= 2, calls  # one pass for the first request, at most one more for the other 19
        assert w.status_line() == "" and w.uploaded == len(calls)
    finally:
        w.close()


def test_background_mirror_backs_off_reports_and_catches_up(tmp_path):
    """The object store fails three passes: each retry waits twice as long as the one before, the status line
    says what is waiting and when the next try is, and the mirror catches up when the store is back."""
    import time

    from skinsweep.sweep.storage import MirrorWorker

    write_store(tmp_path, ["t1", "t2"])  # 4 files, none mirrored yet
    calls, lines, statuses = [], [], []

    def flaky(local, remote):
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise OSError("When uploading part: Connection refused")
        return 4

    w = MirrorWorker(tmp_path, FakeRemote(), first_delay=0.2, max_delay=10, mirror_fn=flaky, notify=lines.append)
    try:
        w.request()
        deadline = time.monotonic() + 5
        while not w.status_line() and time.monotonic() < deadline:
            time.sleep(0.01)
        statuses.append(w.status_line())
        assert w.flush(timeout=10)
    finally:
        w.close()
    assert len(calls) == 4 and w.failures == 3 and w.uploaded == 4  # (backoff timing: the next test)
    assert statuses[0].startswith("mirror: s3://fake/runs/s unreachable (When uploading part: Connection refused), "
                                  "4 files waiting, retry in "), statuses
    assert lines[0].startswith("mirror: s3://fake/runs/s unreachable") and len(lines) == 4
    assert lines[-1] == "mirror: s3://fake/runs/s reachable again; the mirror has caught up"
    assert w.status_line() == ""


def test_background_mirror_backoff_doubles(tmp_path):
    """Without flush() cutting it short, the waits between failed passes double (0.1, 0.2, 0.4 s)."""
    import time

    from skinsweep.sweep.storage import MirrorWorker

    calls = []

    def down(local, remote):
        calls.append(time.monotonic())
        raise OSError("Connection refused")

    w = MirrorWorker(tmp_path, FakeRemote(), first_delay=0.1, max_delay=0.4, mirror_fn=down)
    try:
        w.request()
        time.sleep(1.45)
    finally:
        w.close()
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[:4] == pytest.approx([0.1, 0.2, 0.4, 0.4], abs=0.06), gaps  # capped at max_delay


def test_flush_gives_up_after_its_bound(tmp_path):
    import time

    from skinsweep.sweep.storage import MirrorWorker

    def down(local, remote):
        raise OSError("Connection refused")

    w = MirrorWorker(tmp_path, FakeRemote(), first_delay=5, mirror_fn=down)
    try:
        t0 = time.monotonic()
        assert w.flush(timeout=0.5) is False
        assert time.monotonic() - t0 < 1.5
        assert "unreachable (Connection refused)" in w.status_line()
    finally:
        w.close()


def test_mirror_records_a_partial_pass(tmp_path, s3, monkeypatch):
    """A pass that fails part-way records what it uploaded; the next pass sends only the rest."""
    import skinsweep.sweep.storage as storage

    remote = remote_sweep("s3://sweeps/runs", "p")
    write_store(tmp_path, ["t1", "t2", "t3"])
    real, sent = pafs.copy_files, []

    def fail_third(src, dst, **kw):
        if len(sent) == 2:
            raise OSError("Connection refused")
        sent.append(dst)
        return real(src, dst, **kw)

    monkeypatch.setattr(pafs, "copy_files", fail_third)
    with pytest.raises(OSError):
        storage.mirror(tmp_path, remote)
    assert len(storage.pending(tmp_path)) == 3  # 5 files, 2 sent
    monkeypatch.setattr(pafs, "copy_files", real)
    assert storage.mirror(tmp_path, remote) == 3 and storage.pending(tmp_path) == []


# ---- skinsweep results sync ------------------------------------------------------------------------------

def test_results_sync_cli(tmp_path, s3, monkeypatch):
    import json

    from typer.testing import CliRunner

    from skinsweep.cli import app

    local = tmp_path / "store"
    write_store(local, ["t1", "t2"])
    (local / "sweep.json").write_text(json.dumps({"name": "s", "storage": "s3://sweeps/runs/s"}))
    r = CliRunner().invoke(app, ["results", "sync", str(local)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"synced {local} → s3://sweeps/runs/s: 4 of 4 files copied, 0 already there"
    assert set(files(s3, "sweeps/runs/s")) == {"trials.parquet", "sweep.json", "predictions/t1.parquet",
                                               "predictions/t2.parquet"}
    r = CliRunner().invoke(app, ["results", "sync", str(local)])
    assert "0 of 4 files copied, 4 already there" in r.output
    # a file lost in the bucket is sent again (sync compares with what the bucket holds)
    s3.delete_file("sweeps/runs/s/predictions/t2.parquet")
    r = CliRunner().invoke(app, ["results", "sync", str(local)])
    assert "1 of 4 files copied" in r.output and "predictions/t2.parquet" in files(s3, "sweeps/runs/s")
    # another bucket / prefix: the sweep's name is appended
    r = CliRunner().invoke(app, ["results", "sync", str(local), "--storage", "s3://sweeps/elsewhere"])
    assert r.exit_code == 0 and "→ s3://sweeps/elsewhere/s: 4 of 4 files copied" in r.output, r.output


@pytest.mark.parametrize("case, message", [
    ("unreachable", "cannot copy {local} to s3://sweeps/runs/s ("),
    ("not-a-sweep", "is not a sweep's results folder (no trials.parquet or sweep.json)"),
    ("local-sweep", "was not run with object-store storage (its sweep.json records /data/res/s); pass --storage"),
    ("local-storage", "--storage /tmp/x: give an object-store URI"),
])
def test_results_sync_bad_input(tmp_path, s3, monkeypatch, case, message):
    import json

    from typer.testing import CliRunner

    from skinsweep.cli import app

    local = tmp_path / "store"
    write_store(local, ["t1"])
    (local / "sweep.json").write_text(json.dumps({"name": "s", "storage": "s3://sweeps/runs/s"}))
    args = ["results", "sync", str(local)]
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
        message += ""
    elif case == "not-a-sweep":
        args = ["results", "sync", str(tmp_path)]
    elif case == "local-sweep":
        (local / "sweep.json").write_text(json.dumps({"name": "s", "storage": "/data/res/s"}))
    else:
        args += ["--storage", "/tmp/x"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message.format(local=local) in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    if case == "unreachable":
        assert "3 of 3 files not copied" in r.output and "results sync" in r.output


def test_retry_storage_waits_for_the_object_store_then_gives_up():
    from skinsweep.sweep.storage import retry_storage

    calls, lines = [], []

    def twice_down():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("AWS Error NETWORK_CONNECTION: curlCode: 7, Could not connect to server")
        return "saved"

    assert retry_storage(twice_down, "saving", wait_s=5, first_delay=0.05, log=lines.append) == "saved"
    assert lines == ["skinsweep: saving failed (Could not connect to server); retrying in 0 s"] * 2
    with pytest.raises(OSError):  # still down after wait_s: the last error is raised (Tune retries the trial)
        retry_storage(lambda: (_ for _ in ()).throw(OSError("down")), "saving", wait_s=0.2, first_delay=0.05,
                      log=lines.append)
    calls.clear()

    def bug():
        calls.append(1)
        raise RuntimeError("Unable to set up cluster storage")

    with pytest.raises(RuntimeError):  # not an outage (storage this node cannot see): not retried
        retry_storage(bug, "saving", wait_s=5, log=lines.append)
    assert len(calls) == 1
