"""Sweeps on Ray Tune + Optuna + ASHA, end to end on CPU with tiny backbones and synthetic lesions.

These start Ray, so they run inside `make test`'s loopback-only network namespace (where Ray binds to
127.0.0.1). They are the slowest tests of the suite (about a minute each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest


ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RECIPE = """
name: {name}
storage: {storage}
seed: 0
data: {{root: {data}, image_size: 32}}
trial: {{epochs: 4, batch_size: 32}}
search:
  num_samples: {n}
  space:
    backbone: {{choice: [tiny_resnet, tiny_vit, tiny_clip]}}
    mode: {{choice: [finetune, linear_probe]}}
    pos_weight: {{float: [2.0, 12.0], log: true}}
    lr:
      - {{when: {{mode: finetune}}, float: [3.0e-4, 3.0e-3], log: true}}
      - {{when: {{mode: linear_probe}}, float: [1.0e-3, 3.0e-2], log: true}}
    backbone_lr_mult: {{when: {{mode: finetune}}, float: [0.1, 1.0], log: true}}
  points_to_evaluate:
    - {{backbone: tiny_resnet, mode: finetune, lr: 1.0e-3, pos_weight: 8.0, backbone_lr_mult: 1.0}}
    - {{backbone: tiny_vit, mode: linear_probe, lr: 1.0e-2, pos_weight: 8.0}}
scheduler: {{type: asha, grace_period: 1, reduction_factor: 2}}
resources: {{cpus_per_trial: 1, max_concurrent_trials: 2}}
retries: 1
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from skinsweep.data.synth import synthesize

    root = tmp_path_factory.mktemp("sweepdata") / "isic"
    synthesize(root, 200, seed=3, size=(96, 72), workers=1, progress=False)
    return root


def write_recipe(path: Path, *, name: str, storage: Path, data: Path, n: int) -> Path:
    path.write_text(RECIPE.format(name=name, storage=storage, data=data, n=n))
    return path


def needs_loopback():
    """Ray must not bind to the machine's primary address: run only where that is arranged."""
    from skinsweep.sweep.runner import _loopback_only

    if not _loopback_only() and not os.environ.get("SKINSWEEP_ALLOW_NETWORK_RAY"):
        pytest.skip("run via `make test` (loopback-only network namespace) or set SKINSWEEP_ALLOW_NETWORK_RAY=1")


def test_sweep_end_to_end(data, tmp_path):
    needs_loopback()
    from skinsweep.results import load
    from skinsweep.sweep.runner import run_sweep

    recipe = write_recipe(tmp_path / "r.yaml", name="t", storage=tmp_path / "res", data=data, n=8)
    outcome = run_sweep(recipe)
    res = load(outcome.out_dir)
    t = res.trials
    assert len(t) == 8 and t["trial_id"].is_unique
    assert set(t["mode"]) == {"finetune", "linear_probe"}
    # conditional parameter only where it applies
    assert t.loc[t["mode"] == "finetune", "backbone_lr_mult"].notna().all()
    assert t.loc[t["mode"] == "linear_probe", "backbone_lr_mult"].isna().all()
    # the reference points ran first, exactly as given
    assert ((t["backbone"] == "tiny_resnet") & (t["mode"] == "finetune") & (t["lr"] == 1e-3)).any()
    assert set(t["status"]) <= {"completed", "pruned", "diverged", "failed"}
    assert (t["torch_threads"] == 1).all()  # each trial computed with its cpus_per_trial threads, no more
    assert (t["status"] == "pruned").sum() >= 1, t[["trial_id", "status", "val_auc"]]
    done = t[t["status"] == "completed"]
    # predictions: one row per image x completed trial x split, readable in one call
    preds = pd.read_parquet(Path(outcome.out_dir) / "predictions")
    n_val_test = len(preds) // max(1, preds["trial_id"].nunique())
    assert set(preds["trial_id"]) == set(done["trial_id"])
    assert preds.groupby("trial_id").size().nunique() == 1 and n_val_test > 0
    assert not preds.duplicated(["trial_id", "image_id", "split"]).any()
    assert ds.dataset(Path(outcome.out_dir) / "predictions").count_rows() == len(preds)
    # metrics in trials.parquet are the ones recomputed from the stored predictions
    from skinsweep.metrics import binary_metrics

    for _, row in done.iterrows():
        p = preds[(preds["trial_id"] == row["trial_id"]) & (preds["split"] == "test")]
        assert row["test_auc"] == pytest.approx(binary_metrics(p["label"], p["prob"])["auc"], abs=1e-6)
    assert (Path(outcome.out_dir) / "sweep.json").is_file()


def test_failed_first_attempt_is_retried(data, tmp_path, monkeypatch):
    needs_loopback()
    from skinsweep.results import load
    from skinsweep.sweep.runner import run_sweep

    monkeypatch.setenv("SKINSWEEP_FAIL_ONCE", str(tmp_path / "faults"))
    recipe = write_recipe(tmp_path / "r.yaml", name="retry", storage=tmp_path / "res", data=data, n=2)
    outcome = run_sweep(recipe, overrides=["scheduler.type=none", "trial.epochs=1"])
    t = load(outcome.out_dir).trials
    assert len(list((tmp_path / "faults").glob("*.failed"))) == 2  # each trial failed once...
    assert (t["status"] == "completed").all() and len(t) == 2      # ...and was retried to completion
    assert (t["attempts"] == 2).all()


def test_trial_that_keeps_failing_is_recorded_as_failed(data, tmp_path, monkeypatch):
    needs_loopback()
    from skinsweep.results import load
    from skinsweep.sweep.runner import run_sweep

    monkeypatch.setenv("SKINSWEEP_FAIL_ONCE", str(tmp_path / "faults"))
    recipe = write_recipe(tmp_path / "r.yaml", name="fail", storage=tmp_path / "res", data=data, n=2)
    outcome = run_sweep(recipe, overrides=["scheduler.type=none", "trial.epochs=1", "retries=0"])
    res = load(outcome.out_dir)
    assert len(res.trials) == 2 and (res.trials["status"] == "failed").all()
    assert res.trials["error"].str.contains("injected failure").all()
    assert len(res.predictions) == 0  # a failed trial has no predictions, and the sweep still finished


def test_resume_after_driver_killed(data, tmp_path):
    needs_loopback()
    recipe = write_recipe(tmp_path / "r.yaml", name="kill", storage=tmp_path / "res", data=data, n=6)
    out = tmp_path / "res" / "kill"
    cmd = [sys.executable, "-m", "skinsweep.cli", "sweep", str(recipe), "--set", "scheduler.type=none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # wait until some, not all, trials are consolidated
            try:
                if (out / "trials.parquet").exists() and 2 <= len(pd.read_parquet(out / "trials.parquet")) < 6:
                    break
            except OSError:  # seen once: a read racing the sweep's atomic rename of the file failed; poll again
                pass
            time.sleep(0.5)
        else:
            pytest.fail("sweep produced no partial results in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver and everything it started
        proc.wait()
    before = len(pd.read_parquet(out / "trials.parquet"))
    assert before < 6
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    t = pd.read_parquet(out / "trials.parquet")
    assert len(t) == 6 and t["trial_id"].is_unique
    preds = pd.read_parquet(out / "predictions")
    assert not preds.duplicated(["trial_id", "image_id", "split"]).any()
    assert set(preds["trial_id"]) == set(t.loc[t["status"] == "completed", "trial_id"])


class RayCluster:
    """A Ray cluster of ``ray start`` nodes on loopback, in its own temp folder, torn down by pid.

    Teardown kills exactly this cluster's processes (those whose command line names its temp folder, and
    their descendants), never ``ray stop``, which would stop every Ray process on the machine.
    """

    def __init__(self, port: int, env: dict | None = None) -> None:
        import tempfile

        self.port, self.ray = port, Path(sys.executable).parent / "ray"
        self.env = dict(os.environ if env is None else env)
        self.temp = tempfile.mkdtemp(prefix="ssray-", dir="/tmp")  # short: Unix socket paths are limited

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_head(self, *args: str) -> None:
        r = subprocess.run([str(self.ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp}", *args],
                           capture_output=True, text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        if (Path.home() / ".ray" / "auth_token").exists():
            self.env["RAY_AUTH_MODE"] = "token"

    def add_node(self, *args: str) -> None:
        r = subprocess.run([str(self.ray), "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                            "--disable-usage-stats", *args], capture_output=True, text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    @staticmethod
    def _procs() -> dict[int, tuple[int, str]]:
        """{pid: (parent pid, command line)} of the processes running now."""
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                out[int(d.name)] = (ppid, cmd)
        return out

    def pids(self, must: str = "") -> set[int]:
        """This cluster's processes (whose command line names its temp folder and ``must``) and their descendants."""
        procs = self._procs()
        found = {p for p, (_, cmd) in procs.items() if self.temp in cmd and must in cmd}
        while True:
            more = {p for p, (pp, _) in procs.items() if pp in found} - found
            if not more:
                return found
            found |= more

    def kill(self, pids: set[int]) -> None:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def node_id(self, must: str) -> str:
        """The node id of the node whose raylet's command line contains ``must`` (e.g. its custom resource)."""
        import re

        for _, cmd in self._procs().values():
            if self.temp in cmd and "raylet" in cmd and must in cmd:
                return re.search(r"--node_id=(\w+)", cmd).group(1)
        raise AssertionError(f"no raylet with {must!r}")

    def stop(self) -> None:
        import shutil

        for _ in range(20):
            left = self.pids()
            if not left:
                break
            self.kill(left)
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)


def test_two_node_cluster(data, tmp_path):
    """A Ray head and a second node on loopback (`ray start`), a sweep with --address, trials on both."""
    needs_loopback()
    cluster = RayCluster(6391)
    try:
        cluster.start_head("--num-cpus=1")
        cluster.add_node("--num-cpus=1")
        recipe = write_recipe(tmp_path / "r.yaml", name="multi", storage=tmp_path / "res", data=data, n=4)
        r = subprocess.run([sys.executable, "-m", "skinsweep.cli", "sweep", str(recipe), "--address",
                            cluster.address, "--set", "scheduler.type=none", "--set", "trial.epochs=2"],
                           cwd=ROOT, capture_output=True, text=True, env=cluster.env, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        t = pd.read_parquet(tmp_path / "res" / "multi" / "trials.parquet")
        assert len(t) == 4 and (t["status"] == "completed").all()
        assert t["node"].nunique() == 2, t[["trial_id", "node"]]  # both nodes ran trials
        preds = pd.read_parquet(tmp_path / "res" / "multi" / "predictions")
        assert preds["trial_id"].nunique() == 4
        for ck in t["checkpoint"]:
            assert Path(ck).is_file()  # every artefact reached the results store
    finally:
        cluster.stop()


@pytest.mark.parametrize("args, message", [
    (["--address", "127.0.0.1:1"], "cannot join Ray cluster at 127.0.0.1:1"),
    (["--resume"], "is not an interrupted skinsweep sweep"),
    (["--set", "storage=/proc/nope"], "not writable"),
    (["--results-dir", "/tmp/elsewhere"], "--results-dir /tmp/elsewhere: only for object-store storage"),
])
def test_sweep_bad_input(data, tmp_path, args, message):
    needs_loopback()
    from typer.testing import CliRunner

    from skinsweep.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", name="bad", storage=tmp_path / "res", data=data, n=2)
    r = CliRunner().invoke(app, ["sweep", str(recipe), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_existing_sweep_is_not_overwritten(data, tmp_path):
    """A store that holds Ray Tune state is continued with --resume or left alone: the check runs before the
    data is indexed or Ray starts, and nothing in the folder changes."""
    import ray
    from typer.testing import CliRunner

    from skinsweep.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", name="again", storage=tmp_path / "res", data=data, n=2)
    out = tmp_path / "res" / "again"
    out.mkdir(parents=True)
    (out / "tuner.pkl").write_bytes(b"state")
    r = CliRunner().invoke(app, ["sweep", str(recipe)])
    assert r.exit_code == 2, r.output
    assert f"{out} already holds a sweep named 'again'; pass --resume to continue it" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["tuner.pkl"] and not ray.is_initialized()


def test_explicit_trials_recipe(data, tmp_path):
    """A `trials:` recipe (like sweeps/paper.yaml) runs exactly the listed configurations."""
    needs_loopback()
    from skinsweep.results import load
    from skinsweep.sweep.runner import run_sweep

    recipe = tmp_path / "paper-like.yaml"
    recipe.write_text(f"""
name: fixed
storage: {tmp_path / 'res'}
data: {{root: {data}, image_size: 32}}
trial: {{backbone: tiny_resnet, mode: finetune, epochs: 1, batch_size: 32}}
trials:
  - {{lr: 1.0e-3}}
  - {{lr: 2.0e-3, backbone: tiny_vit}}
scheduler: {{type: none}}
resources: {{cpus_per_trial: 1, max_concurrent_trials: 2}}
""")
    t = load(run_sweep(recipe).out_dir).trials
    assert sorted(zip(t["backbone"], t["lr"])) == [("tiny_resnet", 1e-3), ("tiny_vit", 2e-3)]
    assert (t["status"] == "completed").all()


# ---- progress events: the Tune callback → consolidation + progress view, with made-up trials ----------

def fake_trial(trial_id: str, params: dict, **kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"trial_id": trial_id, "config": {"params": params}, "last_result": {},
                              "status": "RUNNING", "num_failures": 0, "error_file": None, "checkpoint": None, **kw})


def test_tune_events_drive_store_and_progress(data, tmp_path):
    """Tune's callback hooks, fed fake trials (no Ray started): the store gets the pruned and the failed
    trial, and the progress view prints one plain line per event."""
    import io

    from rich.console import Console

    from skinsweep.sweep.progress import SweepProgress
    from skinsweep.sweep.recipe import load_recipe
    from skinsweep.results import ResultsStore
    from skinsweep.sweep.driver import SweepDriver
    from skinsweep.sweep.runner import _Events

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"""
name: ev
storage: {tmp_path / 'res'}
data: {{root: {data}}}
trial: {{backbone: tiny_resnet, mode: finetune, epochs: 3}}
trials: [{{lr: 1.0e-3}}, {{lr: 2.0e-3, backbone: tiny_vit}}]
""")
    recipe = load_recipe(recipe_file)
    buf = io.StringIO()
    progress = SweepProgress(Console(file=buf, width=300), name="ev", total=2)
    store = ResultsStore(tmp_path / "res" / "ev")
    events = _Events()
    a = fake_trial("ev_00000", {"lr": 1e-3})
    b = fake_trial("ev_00001", {"lr": 2e-3, "backbone": "tiny_vit"})
    err = tmp_path / "error.txt"
    err.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    with SweepDriver(store, recipe, str(tmp_path / "split.parquet"), progress), progress:
        events.on_trial_start(0, [a, b], a)
        events.on_trial_start(0, [a, b], b)
        for epoch, auc in ((1, 0.6), (2, 0.55)):
            a.last_result = {"epoch": epoch, "val_auc": auc, "time_total_s": 2.0 * epoch, "node": "n1"}
            events.on_trial_result(0, [a, b], a, a.last_result)
        b.num_failures, b.error_file = 1, str(err)
        events.on_trial_recover(0, [a, b], b)
        events.on_trial_complete(0, [a, b], a)  # ended without a final report: ASHA stopped it
        b.status, b.num_failures = "ERROR", 2
        events.on_trial_error(0, [a, b], b)
    t = store.trials().set_index("trial_id")
    assert t.loc["ev_00000", "status"] == "pruned" and t.loc["ev_00000", "pruned_at_epoch"] == 2
    assert t.loc["ev_00000", "val_auc"] == pytest.approx(0.55)
    assert t.loc["ev_00001", "status"] == "failed" and t.loc["ev_00001", "error"] == "RuntimeError: out of memory"
    assert buf.getvalue().splitlines() == [
        "[start] ev_00000 tiny_resnet finetune lr=0.001",
        "[start] ev_00001 tiny_vit finetune lr=0.002",
        "[retry] ev_00001 crashed, attempt 2 next: RuntimeError: out of memory",
        "[1/2] ev_00000 PRUNED tiny_resnet finetune lr=0.001 · epoch 2/3 val_auc 0.550 — running 0, retrying 1, "
        "completed 0, pruned 1",
        "[2/2] ev_00001 FAILED tiny_vit finetune lr=0.002 — running 0, completed 0, pruned 1, failed 1",
    ]


# ---- object-store storage: a real S3 API (moto's server on 127.0.0.1) ---------------------------------

def test_sweep_on_s3_storage_and_resume_elsewhere(data, tmp_path, s3):
    """`storage: s3://…`: Tune state, checkpoints and the mirrored store land in the bucket, the local working
    copy is complete and queryable; --resume on a "machine" without the local copy rebuilds it from S3."""
    needs_loopback()
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from skinsweep.results import load, query
    from skinsweep.sweep.runner import run_sweep

    recipe = write_recipe(tmp_path / "r.yaml", name="s3sweep", storage="s3://sweeps/team/runs", data=data, n=3)
    sets = ["scheduler.type=none", "trial.epochs=1"]
    local = tmp_path / "local"
    outcome = run_sweep(recipe, overrides=sets, results_dir=local)
    assert outcome.out_dir == str(local) and outcome.storage_uri == "s3://sweeps/team/runs/s3sweep"

    # the local working copy: complete, queryable, checkpoints on local disk (what bundles are built from)
    res = load(local)
    t = res.trials
    assert len(t) == 3 and (t["status"] == "completed").all()
    assert res.predictions.groupby("trial_id").size().nunique() == 1 and set(res.predictions["trial_id"]) == set(t["trial_id"])
    assert query(local, "SELECT count(DISTINCT trial_id) AS n FROM predictions JOIN trials USING (trial_id)")["n"][0] == 3
    assert all(Path(c).is_file() and Path(c).with_name("model.json").is_file() for c in t["checkpoint"])
    assert not list(local.glob("checkpoints/*/predictions.parquet"))  # those went into predictions/
    assert t["split_file"].str.contains("/splits/").all()  # trials read the split from storage, via the node cache

    # the bucket: Ray Tune's state, every checkpoint, and a copy of the store identical to the local one
    base = "sweeps/team/runs/s3sweep"
    keys = {i.path.removeprefix(base + "/") for i in s3.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File}
    assert {"tuner.pkl", "trials.parquet", "split.parquet", "sweep.json"} <= keys
    assert {f"predictions/{i}.parquet" for i in t["trial_id"]} == {k for k in keys if k.startswith("predictions/")}
    assert not [k for k in keys if "write-test" in k or k.endswith(".tmp")]
    for uri in t["checkpoint_uri"]:
        assert uri.startswith(f"s3://{base}/") and uri.removeprefix("s3://").removeprefix(base + "/") in keys
    remote_trials = pq.read_table(f"{base}/trials.parquet", filesystem=s3).to_pandas()
    pd.testing.assert_frame_equal(remote_trials, t)

    # resume from the URI elsewhere: nothing re-runs, the new working copy is rebuilt from the bucket
    elsewhere = tmp_path / "elsewhere"
    again = run_sweep(recipe, overrides=sets, results_dir=elsewhere, resume=True)
    t2 = load(elsewhere).trials
    assert again.n_trials == 3 and sorted(t2["trial_id"]) == sorted(t["trial_id"])
    assert (t2["val_auc"].to_numpy() == t.set_index("trial_id").loc[t2["trial_id"], "val_auc"].to_numpy()).all()
    assert all(str(c).startswith(str(elsewhere)) and Path(c).is_file() for c in t2["checkpoint"])
    assert len(load(elsewhere).predictions) == len(res.predictions)


@pytest.mark.parametrize("storage, endpoint, message", [
    ("s3://no-such-bucket/runs", None, "storage s3://no-such-bucket/runs/bad is not writable"),
    ("s3://sweeps/runs", "http://127.0.0.1:1", "storage s3://sweeps/runs/bad is not writable"),
])
def test_bad_s3_storage_fails_before_any_trial(data, tmp_path, s3, monkeypatch, storage, endpoint, message):
    needs_loopback()
    import ray
    from typer.testing import CliRunner

    from skinsweep.cli import app

    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # nothing listens there
    recipe = write_recipe(tmp_path / "r.yaml", name="bad", storage=storage, data=data, n=2)
    r = CliRunner().invoke(app, ["sweep", str(recipe), "--results-dir", str(tmp_path / "local")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "AWS_ENDPOINT_URL" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not ray.is_initialized() and not (tmp_path / "local").exists()
