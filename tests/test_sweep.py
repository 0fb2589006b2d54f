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
    from skinsweep.sweep import _loopback_only

    if not _loopback_only() and not os.environ.get("SKINSWEEP_ALLOW_NETWORK_RAY"):
        pytest.skip("run via `make test` (loopback-only network namespace) or set SKINSWEEP_ALLOW_NETWORK_RAY=1")


def test_sweep_end_to_end(data, tmp_path):
    needs_loopback()
    from skinsweep.results import load
    from skinsweep.sweep import run_sweep

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
    from skinsweep.sweep import run_sweep

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
    from skinsweep.sweep import run_sweep

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
            if (out / "trials.parquet").exists() and 2 <= len(pd.read_parquet(out / "trials.parquet")) < 6:
                break
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


def test_two_node_cluster(data, tmp_path):
    """A Ray head and a second node on loopback (`ray start`), a sweep with --address, trials on both."""
    needs_loopback()
    ray_bin = Path(sys.executable).parent / "ray"
    env = dict(os.environ)
    port = "6391"
    head = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                           "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                          capture_output=True, text=True, env=env, timeout=120)
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        if (Path.home() / ".ray" / "auth_token").exists():
            env["RAY_AUTH_MODE"] = "token"
        worker = subprocess.run([str(ray_bin), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                                 "--num-cpus=1", "--disable-usage-stats"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        recipe = write_recipe(tmp_path / "r.yaml", name="multi", storage=tmp_path / "res", data=data, n=4)
        r = subprocess.run([sys.executable, "-m", "skinsweep.cli", "sweep", str(recipe), "--address",
                            f"127.0.0.1:{port}", "--set", "scheduler.type=none", "--set", "trial.epochs=2"],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        t = pd.read_parquet(tmp_path / "res" / "multi" / "trials.parquet")
        assert len(t) == 4 and (t["status"] == "completed").all()
        assert t["node"].nunique() == 2, t[["trial_id", "node"]]  # both nodes ran trials
        preds = pd.read_parquet(tmp_path / "res" / "multi" / "predictions")
        assert preds["trial_id"].nunique() == 4
        for ck in t["checkpoint"]:
            assert Path(ck).is_file()  # every artefact reached the results store
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--address", "127.0.0.1:1"], "cannot join Ray cluster at 127.0.0.1:1"),
    (["--resume"], "is not an interrupted skinsweep sweep"),
    (["--set", "storage=/proc/nope"], "not writable"),
])
def test_sweep_bad_input(data, tmp_path, args, message):
    needs_loopback()
    from typer.testing import CliRunner

    from skinsweep.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", name="bad", storage=tmp_path / "res", data=data, n=2)
    r = CliRunner().invoke(app, ["sweep", str(recipe), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_explicit_trials_recipe(data, tmp_path):
    """A `trials:` recipe (like sweeps/paper.yaml) runs exactly the listed configurations."""
    needs_loopback()
    from skinsweep.results import load
    from skinsweep.sweep import run_sweep

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
