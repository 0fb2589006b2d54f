"""Orchestration overhead: the same trials through `skinsweep sweep` (Ray Tune + Optuna) vs a plain loop.

    python benchmarks/bench_sweep.py [--trials 4] [--epochs 20] [--n 1200]

Both sides run the same explicit trial configurations (tiny_resnet fine-tune on synthetic lesions at
64 px, sized so one trial takes ≳ 20 s here), one at a time with the same CPU threads:

* loop:  ``run_trial`` called directly, one after the other;
* sweep: ``run_sweep`` on a recipe listing the same configurations (`trials:`), one trial at a time,
         no early stopping — Ray start-up, scheduling, per-epoch reporting, checkpoint upload and
         Parquet consolidation all included in its wall time.

Run it inside a loopback-only network namespace (``sh scripts/loopback.sh python benchmarks/bench_sweep.py``)
so Ray binds to 127.0.0.1. Prints both wall times, the mean trial time and the overhead ratio
(target ≤ 10% for trials of ≥ 20 s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n", type=int, default=1200, help="synthetic images")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skinsweep-bench-sweep-"))
    os.environ.setdefault("SKINSWEEP_CACHE", str(tmp / "cache"))
    import torch

    from skinsweep.data.synth import synthesize
    from skinsweep.recipe import load_recipe
    from skinsweep.sweep import run_sweep
    from skinsweep.trial import run_trial

    threads = os.cpu_count() or 2
    data = tmp / "data"
    synthesize(data, args.n, seed=0, size=(200, 150), progress=False)
    lrs = [1e-3 * (1.5 ** k) for k in range(args.trials)]
    recipe = {
        "name": "bench", "storage": str(tmp / "results"), "seed": 0,
        "data": {"root": str(data), "image_size": 64},
        "trial": {"backbone": "tiny_resnet", "backbone_args": {"input_size": 64}, "mode": "finetune",
                  "epochs": args.epochs, "batch_size": 32},
        "trials": [{"lr": lr} for lr in lrs],
        "scheduler": {"type": "none"},
        "resources": {"cpus_per_trial": threads, "max_concurrent_trials": 1},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rec = load_recipe(path)

    # warm the image cache and the split once, outside both timings
    run_trial(rec.trial_config({"lr": lrs[0]}).model_copy(update={"epochs": 1}), tmp / "warm")

    torch.set_num_threads(threads)
    t = time.perf_counter()
    per_trial = []
    for k, lr in enumerate(lrs):
        s = time.perf_counter()
        run_trial(rec.trial_config({"lr": lr}), tmp / "loop" / str(k))
        per_trial.append(time.perf_counter() - s)
    loop_s = time.perf_counter() - t

    t = time.perf_counter()
    sweep_t0 = time.time()
    outcome = run_sweep(path)
    sweep_s = time.perf_counter() - t
    assert outcome.n_trials == args.trials, outcome

    from skinsweep.results import load

    t = load(outcome.out_dir).trials
    first_start = (t["started_at"].min().timestamp() - sweep_t0)
    in_ray = float(t["runtime_s"].sum())
    print(f"{args.trials} trials × {args.epochs} epochs, tiny_resnet at 64 px, {args.n} images, {threads} threads")
    print(f"  of the sweep: {first_start:.1f} s before the first trial started (Ray start-up, driver indexes the data "
          f"and writes the split), trials ran {in_ray:.1f} s inside Ray (loop: {loop_s:.1f} s), "
          f"{sweep_s - first_start - in_ray:.1f} s between/after trials (scheduling, checkpoints, consolidation)")
    print(f"plain loop        {loop_s:7.1f} s   (mean trial {sum(per_trial) / len(per_trial):.1f} s)")
    print(f"skinsweep sweep   {sweep_s:7.1f} s   (Ray start-up, scheduling, reporting, checkpoints, Parquet)")
    print(f"overhead: {100 * (sweep_s - loop_s) / sweep_s:.1f}% of the sweep's wall time "
          f"(ratio sweep/loop {sweep_s / loop_s:.3f}; target ≤ 10%)")


if __name__ == "__main__":
    main()
