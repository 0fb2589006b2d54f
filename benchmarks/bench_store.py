"""The results store at scale: 2,000 trials × 10,000 val+test images (20 M prediction rows) by default.

    python benchmarks/bench_store.py [--trials 2000] [--images 10000] [--top-n 50] [--out DIR]
                                     [--mem-limit-gb 12] [--keep]

Writes a synthetic sweep through the store's own API (``ResultsStore.add_trial``, one trial at a time,
as a sweep does) and prints the write time (trials/s); then runs each step as the user would, in a
fresh process of its own (so that one step's memory does not mask another's), and prints its wall
time and peak RSS (``os.wait4``'s ``ru_maxrss`` of that process) against the goal:

* ``skinsweep results show DIR --top 20``                               goal < 5 s
* ``skinsweep results query DIR`` joining predictions and trials (per backbone: rows, mean prob,
  mean label) over all 20 M rows                                        goal < 5 s
* ``skinsweep ensemble build ensembles/best.yaml --set members.top_n=50 --no-bundle``  goal < 60 s
* ``skinsweep report DIR --ensemble <that> --no-gradcam``                goal < 120 s

A step whose RSS passes ``--mem-limit-gb`` is killed (and reported so) to protect a shared machine.
Synthetic predictions: one fixed image list (``--images``, half val, half test), ~11% melanoma, 1-3
images per lesion; every trial's logits are ``q · latent + noise`` with a shared latent score
(correlated members) and a per-trial quality ``q`` (so val AUC varies, ~0.55-0.9), three backbones,
two modes, log-uniform lr. Every trial is completed (so the store holds trials × images rows) and has
a 3-epoch history. ``--out`` keeps the store there (default: a temporary folder, deleted after).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
BACKBONES = ["resnet18", "dino_vits16", "clip_vitb32"]
MODES = ["finetune", "linear_probe"]


def _metrics(y: np.ndarray, logit: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    p = 1 / (1 + np.exp(-logit))
    flagged = p >= 0.5
    pos = y == 1
    return {"auc": float(roc_auc_score(y, p)), "ap": float(average_precision_score(y, p)),
            "accuracy": float((flagged == pos).mean()), "recall": float(flagged[pos].mean()),
            "specificity": float(1 - flagged[~pos].mean()), "n": int(len(y)), "n_pos": int(pos.sum()),
            "loss": float(np.mean(np.logaddexp(0, logit) - y * logit))}


def write_store(root: Path, n_trials: int, n_images: int, seed: int = 0) -> tuple[float, int]:
    """Write the synthetic sweep through ResultsStore.add_trial; returns (seconds, prediction rows)."""
    from skinsweep.results import ResultsStore

    rng = np.random.default_rng(seed)
    lesion = np.repeat(np.arange(n_images), rng.integers(1, 4, n_images))[:n_images]
    lesion_pos = rng.random(lesion.max() + 1) < 0.111
    y = lesion_pos[lesion].astype("int8")
    split = np.where(np.arange(n_images) < n_images // 2, "val", "test")
    latent = 1.8 * y + rng.normal(size=n_images)
    dx = np.where(y == 1, "MEL", rng.choice(["NV", "BKL", "BCC", "AKIEC", "DF", "VASC"], n_images,
                                              p=[0.75, 0.12, 0.06, 0.04, 0.015, 0.015]))
    base = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(n_images)],
                         "lesion_id": [f"HAM_{j:07d}" for j in lesion], "label": y, "dx": dx, "split": split})
    is_val = split == "val"
    store = ResultsStore(root)
    t0 = time.perf_counter()
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = 0
    for i in range(n_trials):
        tid = f"t{i:05d}"
        q = rng.uniform(0.05, 1.2)
        logit = (q * latent + rng.normal(scale=1.0, size=n_images) - 2.0).astype("float32")
        backbone, mode = BACKBONES[i % 3], MODES[(i // 3) % 2]
        lr = float(10 ** rng.uniform(-5, -2))
        mv, mt = _metrics(y[is_val], logit[is_val]), _metrics(y[~is_val], logit[~is_val])
        summary = {
            "trial_id": tid, "status": "completed", "config_hash": f"c-{tid}", "split_hash": "s-bench",
            "config": {"backbone": backbone, "mode": mode, "lr": lr, "pos_weight": float(rng.choice([1.0, 4.0, 8.0])),
                       "epochs": 3, "seed": i},
            "best_epoch": 3, "epochs_run": 3, "val": mv, "test": mt, "runtime_s": 60.0,
            "history": [{"epoch": e, "train_loss": 0.7 - 0.1 * e, "val_loss": 0.7 - 0.05 * e,
                         "val_auc": mv["auc"] - 0.03 * (3 - e)} for e in (1, 2, 3)],
        }
        pred = base.assign(logit=logit, prob=(1 / (1 + np.exp(-logit))).astype("float32"))
        finished = start + dt.timedelta(seconds=30 * i + 60)
        store.add_trial(summary, predictions=pred,
                        extra={"node": f"node{i % 4}", "cpus": 2, "gpus": 0.0, "recipe_hash": "r-bench",
                               "started_at": finished - dt.timedelta(seconds=60), "finished_at": finished})
        rows += len(pred)
        if (i + 1) % max(1, n_trials // 10) == 0:
            el = time.perf_counter() - t0
            print(f"  wrote {i + 1:,}/{n_trials:,} trials, {el:6.1f} s ({(i + 1) / el:5.1f} trials/s)", flush=True)
    return time.perf_counter() - t0, rows


def run_step(cmd: list[str], mem_limit_mb: float, cwd: Path) -> tuple[float, float, int, str]:
    """Run ``cmd`` in a fresh process; (seconds, peak RSS MB, exit code, output tail). Killed above the limit."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = threading.Event()

    def watch() -> None:  # RSS above the limit: stop it before it takes the shared machine down
        while proc.poll() is None:
            try:
                kb = next(int(ln.split()[1]) for ln in open(f"/proc/{proc.pid}/status") if ln.startswith("VmRSS"))
            except (OSError, StopIteration, ValueError):
                return
            if kb / 1024 > mem_limit_mb:
                killed.set()
                os.kill(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    log.seek(0)
    tail = log.read()[-1500:]
    rc = -9 if killed.is_set() else proc.returncode
    return seconds, usage.ru_maxrss / 1024, rc, tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--images", type=int, default=10000, help="val + test images per trial (half each)")
    ap.add_argument("--top-n", type=int, default=50, help="greedy ensemble candidates (members.top_n)")
    ap.add_argument("--out", type=Path, help="keep the store here (default: a temporary folder, deleted after)")
    ap.add_argument("--reuse", action="store_true", help="--out already holds a store of this size: skip the write")
    ap.add_argument("--mem-limit-gb", type=float, default=12.0, help="kill a step whose RSS passes this")
    args = ap.parse_args()

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="skinsweep-bench-store-")
        work = Path(tmp.name)
    else:
        work = args.out
        work.mkdir(parents=True, exist_ok=True)
    root, ens_out, rep_out = work / "sweep", work / "ens_best", work / "report"
    try:
        print(f"store: {args.trials:,} trials × {args.images:,} val+test images = {args.trials * args.images:,} "
              f"prediction rows, in {root}", flush=True)
        if args.reuse and (root / "trials.parquet").is_file():
            print("write: skipped (--reuse)")
            write_s = None
        else:
            shutil.rmtree(root, ignore_errors=True)
            write_s, rows = write_store(root, args.trials, args.images)
            size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            print(f"write: {write_s:.1f} s ({args.trials / write_s:.1f} trials/s, {rows / write_s / 1e6:.2f} M rows/s) "
                  f"through ResultsStore.add_trial; {size / 2**20:,.0f} MiB on disk", flush=True)

        cli = [sys.executable, "-c", "from skinsweep.cli import app; app()"]
        sql = ("SELECT t.backbone, count(*) AS n, avg(p.prob) AS mean_prob, avg(p.label) AS pos_rate "
               "FROM predictions p JOIN trials t USING (trial_id) WHERE p.split = 'test' GROUP BY 1 ORDER BY 1")
        steps = [
            ("results show --top 20", cli + ["results", "show", str(root), "--top", "20"], 5),
            ("results query (join)", cli + ["results", "query", str(root), sql], 5),
            (f"ensemble build best.yaml (top {args.top_n})",
             cli + ["ensemble", "build", str(REPO / "ensembles" / "best.yaml"), "--results", str(root),
                    "--out", str(ens_out), "--set", f"members.top_n={args.top_n}", "--no-bundle"], 60),
            ("report", cli + ["report", str(root), "--ensemble", str(ens_out), "--out", str(rep_out), "--no-gradcam"], 120),
        ]
        table = []
        for name, cmd, goal in steps:
            print(f"-- {name}", flush=True)
            s, mb, rc, tail = run_step(cmd, args.mem_limit_gb * 1024, work)
            if rc != 0:
                why = f"killed above {args.mem_limit_gb:g} GB RSS" if rc == -9 else f"exit {rc}"
                print(f"   FAILED ({why}):\n{tail}", flush=True)
            table.append((name, s, mb, goal, rc))
        if (rep_out / "index.html").is_file():
            print(f"report page: {(rep_out / 'index.html').stat().st_size / 1024:,.0f} KiB")

        print()
        print(f"{args.trials:,} trials × {args.images:,} images ({args.trials * args.images / 1e6:g} M prediction rows), "
              f"{os.cpu_count()} CPUs")
        if write_s is not None:
            print(f"{'write (ResultsStore.add_trial × ' + format(args.trials, ',') + ')':<38} {write_s:8.1f} s   "
                  f"({args.trials / write_s:.1f} trials/s)")
        print(f"{'step':<38} {'seconds':>8} {'peak RSS MB':>12} {'goal':>8}  met?")
        for name, s, mb, goal, rc in table:
            met = "yes" if rc == 0 and s < goal else ("no (failed)" if rc else "no")
            print(f"{name:<38} {s:8.1f} {mb:12,.0f} {'< ' + str(goal) + ' s':>8}  {met}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
