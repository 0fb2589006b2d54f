"""Orchestration overhead: the same trials through `skinsweep sweep` (Ray Tune + Optuna) vs a plain loop.

    python benchmarks/bench_sweep.py [--trials 4] [--epochs 20] [--n 1200] [--rounds 2]

Both sides run the same explicit trial configurations (tiny_resnet fine-tune on synthetic lesions at
64 px, sized so one trial takes ≳ 20 s here), one at a time, with the same thread budget — every core,
``cpus_per_trial`` = ``torch.set_num_threads`` = ``os.cpu_count()`` — checked inside the trials (the loop's
callback reads ``torch.get_num_threads()``; the sweep records it per trial in ``trials.parquet``):

* loop:  ``run_trial`` called directly, one after the other, in this (warmed-up) process;
* sweep: ``run_sweep`` on a recipe listing the same configurations (`trials:`), one trial at a time,
         no early stopping — Ray start-up, worker start-up, scheduling, per-epoch reporting, checkpoint
         upload and Parquet consolidation all included in its wall time.

On a shared machine epoch times drift by ±15% over minutes, which is as large as the effect measured; so
the sides alternate (round 1 loop then sweep, round 2 sweep then loop, …) and the ratio is of the sums.
Per-epoch times (the loop's callback; Tune's ``time_this_iter_s`` in the sweep) split a slower sweep into
"epochs run slower inside Ray" and "time between epochs and trials".

Run it inside a loopback-only network namespace (``sh scripts/loopback.sh python benchmarks/bench_sweep.py``)
so Ray binds to 127.0.0.1. Prints both wall times, the epoch-time comparison and the overhead ratio
(target ≤ 10% for trials of ≥ 20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n", type=int, default=1200, help="synthetic images")
    ap.add_argument("--rounds", type=int, default=2, help="loop/sweep pairs, alternating which runs first")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="skinsweep-bench-sweep-"))
    os.environ.setdefault("SKINSWEEP_CACHE", str(tmp / "cache"))
    import torch

    from skinsweep.data.synth import synthesize
    from skinsweep.sweep.recipe import load_recipe
    from skinsweep.results import load
    from skinsweep.sweep.runner import run_sweep
    from skinsweep.train.loop import run_trial

    threads = os.cpu_count() or 2
    data = tmp / "data"
    synthesize(data, args.n, seed=0, size=(200, 150), progress=False)
    lrs = [1e-3 * (1.5 ** k) for k in range(args.trials)]

    def write_recipe(k: int) -> Path:
        recipe = {
            "name": "bench", "storage": str(tmp / f"results-{k}"), "seed": 0,
            "data": {"root": str(data), "image_size": 64},
            "trial": {"backbone": "tiny_resnet", "backbone_args": {"input_size": 64}, "mode": "finetune",
                      "epochs": args.epochs, "batch_size": 32},
            "trials": [{"lr": lr} for lr in lrs],
            "scheduler": {"type": "none"},
            "resources": {"cpus_per_trial": threads, "max_concurrent_trials": 1},
        }
        path = tmp / f"bench-{k}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    rec = load_recipe(write_recipe(0))
    # warm the image cache and the split once, outside both timings
    run_trial(rec.trial_config({"lr": lrs[0]}).model_copy(update={"epochs": 1}), tmp / "warm")
    torch.set_num_threads(threads)

    def loop(k: int) -> tuple[float, list[list[float]], set[int]]:
        epochs, seen = [], set()
        t = time.perf_counter()
        for j, lr in enumerate(lrs):
            times, last = [], [time.perf_counter()]

            def on_epoch(m: dict) -> None:
                now = time.perf_counter()
                times.append(now - last[0])
                last[0] = now
                seen.add(torch.get_num_threads())

            run_trial(rec.trial_config({"lr": lr}), tmp / f"loop-{k}" / str(j), callback=on_epoch)
            epochs.append(times)
        return time.perf_counter() - t, epochs, seen

    def sweep(k: int) -> tuple[float, list[list[float]], set[int], float, float]:
        path = write_recipe(k)
        t0, t = time.time(), time.perf_counter()
        outcome = run_sweep(path)
        wall = time.perf_counter() - t
        assert outcome.n_trials == args.trials and outcome.counts == {"completed": args.trials}, outcome
        trials = load(outcome.out_dir).trials
        first_start = trials["started_at"].min().timestamp() - t0
        # Tune's per-report timings: one row per epoch report (the final report has no "epoch")
        epochs = []
        for f in sorted(Path(outcome.out_dir).glob("*/result.json")):
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            epochs.append([r["time_this_iter_s"] for r in rows if "epoch" in r])
        return wall, epochs, set(trials["torch_threads"].astype(int)), first_start, float(trials["runtime_s"].sum())

    loop_s = sweep_s = in_ray = first_total = 0.0
    loop_epochs, ray_epochs, loop_threads, ray_threads = [], [], set(), set()
    for k in range(args.rounds):
        order = ("loop", "sweep") if k % 2 == 0 else ("sweep", "loop")
        for side in order:
            if side == "loop":
                wall, ep, th = loop(k)
                loop_s += wall
                loop_epochs += ep
                loop_threads |= th
                print(f"round {k + 1}: loop  {wall:6.1f} s", flush=True)
            else:
                wall, ep, th, first, runtime = sweep(k)
                sweep_s += wall
                ray_epochs += ep
                ray_threads |= th
                first_total += first
                in_ray += runtime
                print(f"round {k + 1}: sweep {wall:6.1f} s", flush=True)

    def later(eps: list[list[float]]) -> float:
        return statistics.median(x for e in eps for x in e[1:])

    def firsts(eps: list[list[float]]) -> float:
        return statistics.mean(e[0] for e in eps)

    n = args.rounds * args.trials
    print(f"\n{args.trials} trials × {args.epochs} epochs × {args.rounds} rounds, tiny_resnet at 64 px, {args.n} images; "
          f"torch threads in the trials: loop {sorted(loop_threads)}, sweep {sorted(ray_threads)} (budget {threads})")
    print(f"  epoch time (median, epochs 2+): loop {later(loop_epochs):.3f} s, inside Ray {later(ray_epochs):.3f} s "
          f"(×{later(ray_epochs) / later(loop_epochs):.3f}); first epoch (mean): loop {firsts(loop_epochs):.2f} s, "
          f"inside Ray {firsts(ray_epochs):.2f} s")
    print(f"  of the sweeps: {first_total:.1f} s before the first trials started (Ray start-up, driver indexes the "
          f"data and writes the split), trials ran {in_ray:.1f} s inside Ray (loop: {loop_s:.1f} s), "
          f"{sweep_s - first_total - in_ray:.1f} s between/after trials (scheduling, checkpoints, consolidation)")
    print(f"plain loop        {loop_s:7.1f} s   (mean trial {loop_s / n:.1f} s)")
    print(f"skinsweep sweep   {sweep_s:7.1f} s   (Ray start-up, scheduling, reporting, checkpoints, Parquet)")
    print(f"overhead: {100 * (sweep_s - loop_s) / sweep_s:.1f}% of the sweep's wall time "
          f"(ratio sweep/loop {sweep_s / loop_s:.3f}; target ≤ 10%)")


if __name__ == "__main__":
    main()
