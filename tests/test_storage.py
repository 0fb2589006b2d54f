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
