"""Search efficiency on real lesions: TPE + ASHA against random search + FIFO at equal wall time (issue #11).

    sh scripts/loopback.sh .venv/bin/python benchmarks/bench_search.py                # 3 seeds × 2 arms × 15 min
    sh scripts/loopback.sh .venv/bin/python benchmarks/bench_search.py --budget 5m --seeds 0   # a quick look

Each arm is a real ``skinsweep sweep`` (Ray Tune, the same trial code) with the same time budget, space and
seed, differing only in how it searches:

* ``tpe+asha``:    Optuna TPE (multivariate, 4 random start-up trials), ASHA on val AUC (rungs at epochs 1
                   and 3 of 6, the best third goes on);
* ``random+fifo``: Optuna's sampler with every trial a start-up trial (= uniform random search), every trial
                   trained to its end (no early stopping).

The proxy (why it is cheap and still real): the HAM10000 images themselves (``--data``, lesion-grouped
split, the ham-cpu split), at 32 px, with random-init ``timm:resnet10t`` / ``timm:resnet18`` trained 6
epochs, so a trial takes about a minute on one CPU and an arm sees ~25–40 trials in 15 minutes on
2 CPUs. The space is ham-cpu's (lr, class weight, weight decay, augmentation, label smoothing,
architecture) minus the input size. What it measures is the searcher and scheduler, not a model.

Per arm and seed it prints the best validation AUC of a completed trial, the trial-epochs spent in all,
and the trial-epochs spent until the arm first reached random search's final best (trials ordered by
when they finished; a pruned trial costs the epochs it ran). Then, per seed and in total, the ratio
``compute(tpe+asha) / compute(random+fifo)`` to reach random search's best: the goal is ≤ 0.6
(≥ 40% less compute). A seed where TPE + ASHA never reaches it counts as its whole compute (and is
flagged). Validation only: no test number is read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = """
name: {name}
storage: {storage}
seed: {seed}
data: {{root: {data}, positive: [MEL], resize_policy: squash}}
split: {{mode: grouped, fractions: [0.70, 0.15, 0.15], seed: 0}}
trial:
  weights: none
  backbone_args: {{input_size: 32, crop_pct: 1.0}}
  mode: finetune
  optimizer: adamw
  batch_size: 64
  epochs: 6
  schedule: onecycle
  select_metric: auc
search:
  num_samples: 1000
  time_budget: {budget}
  space:
    backbone: {{choice: ["timm:resnet10t", "timm:resnet18"]}}
    lr: {{float: [3.0e-4, 3.0e-2], log: true}}
    pos_weight: {{float: [1.0, 16.0], log: true}}
    weight_decay: {{float: [1.0e-5, 1.0e-1], log: true}}
    augment: {{choice: [none, flips, light]}}
    label_smoothing: {{choice: [0.0, 0.1]}}
  sampler: {{n_startup_trials: {startup}}}
scheduler: {scheduler}
resources: {{cpus_per_trial: 1, max_concurrent_trials: {concurrency}}}
retries: 0
"""
ARMS = {
    "tpe+asha": {"startup": 4, "scheduler": "{type: asha, metric: val_auc, grace_period: 1, reduction_factor: 3}"},
    "random+fifo": {"startup": 1000, "scheduler": "{type: none, metric: val_auc}"},
}


def run_arm(arm: str, seed: int, args, storage: Path) -> pd.DataFrame:
    from rich.console import Console

    from skinsweep.results import ResultsStore
    from skinsweep.sweep.runner import run_sweep

    name = f"{arm.replace('+', '-')}-s{seed}"
    recipe = storage / f"{name}.yaml"
    recipe.write_text(RECIPE.format(name=name, storage=storage, seed=seed, data=args.data, budget=args.budget,
                                    concurrency=args.concurrency, **ARMS[arm]))
    t0 = time.time()
    run_sweep(recipe, console=Console(quiet=not args.verbose))
    df = ResultsStore(storage / name).trials().sort_values("finished_at").reset_index(drop=True)
    print(f"  {arm:12s} seed {seed}: {len(df)} trials ({', '.join(f'{k} {v}' for k, v in df['status'].value_counts().items())}) "
          f"in {(time.time() - t0) / 60:.1f} min", flush=True)
    return df


def curve(df: pd.DataFrame) -> pd.DataFrame:
    """Cumulative trial-epochs and the best completed val AUC so far, in the order trials finished."""
    epochs = df["epochs_run"].fillna(0).astype(float)
    value = df["val_auc"].where(df["status"] == "completed")
    return pd.DataFrame({"epochs": epochs.cumsum(), "best": value.cummax().ffill()})


def compute_to_reach(c: pd.DataFrame, target: float) -> float | None:
    hit = c[c["best"] >= target - 1e-12]
    return float(hit["epochs"].iloc[0]) if len(hit) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000_200x150")
    ap.add_argument("--budget", default="15m", help="wall time per arm and seed (default 15m)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 2, help="trials at a time (1 CPU each)")
    ap.add_argument("--out", type=Path, help="keep the sweeps here (default: a temporary folder)")
    ap.add_argument("--verbose", action="store_true", help="show the sweeps' progress")
    args = ap.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: {args.data} not found; pass --data DIR (HAM10000 / ISIC 2018 images)")
    args.data = args.data.resolve()

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="skinsweep-bench-search-")
    storage = (args.out or Path(tmp.name)).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SKINSWEEP_CACHE", str(storage / "cache"))  # one 32 px cache, built by the first arm
    print(f"bench_search: {len(args.seeds)} seed(s) × 2 arms × {args.budget} on {args.data}, "
          f"{args.concurrency} trials at a time; sweeps in {storage}", flush=True)
    t0 = time.time()
    rows, total = [], {"tpe": 0.0, "random": 0.0}
    for seed in args.seeds:
        # alternate the order so the arm that builds the image cache (inside its budget) changes with the seed
        order = ["random+fifo", "tpe+asha"] if seed % 2 == 0 else ["tpe+asha", "random+fifo"]
        runs = {arm: run_arm(arm, seed, args, storage) for arm in order}
        c_rand, c_tpe = curve(runs["random+fifo"]), curve(runs["tpe+asha"])
        target = float(c_rand["best"].max())
        if target != target:  # NaN: no random trial completed within the budget
            print(f"  seed {seed}: random search completed no trial within {args.budget}; raise --budget")
            continue
        need_rand = compute_to_reach(c_rand, target)
        need_tpe = compute_to_reach(c_tpe, target)
        reached = need_tpe is not None
        spent_tpe = need_tpe if reached else float(c_tpe["epochs"].iloc[-1])
        total["tpe"] += spent_tpe
        total["random"] += need_rand
        rows.append({"seed": seed, "random best val AUC": target, "tpe best val AUC": float(c_tpe["best"].max()),
                     "random epochs to its best": need_rand, "tpe epochs to that": spent_tpe,
                     "reached": reached, "ratio": spent_tpe / need_rand,
                     "random trials": len(runs["random+fifo"]), "tpe trials": len(runs["tpe+asha"]),
                     "random epochs": float(c_rand["epochs"].iloc[-1]), "tpe epochs": float(c_tpe["epochs"].iloc[-1])})
    if not rows:
        sys.exit("error: no seed gave a comparison; raise --budget")
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    ratio = total["tpe"] / total["random"]
    print(f"\ncompute to reach random search's best val AUC, TPE+ASHA / random+FIFO: {ratio:.2f} over all seeds "
          f"(per seed: {', '.join(f'{r:.2f}' for r in table['ratio'])}); "
          f"{abs(1 - ratio) * 100:.0f}% {'less' if ratio <= 1 else 'more'} compute (goal: ≥ 40% less); {int((~table['reached']).sum())} seed(s) where TPE+ASHA never reached it "
          f"(counted at its whole compute). Wall time {(time.time() - t0) / 60:.1f} min.")
    if args.out:
        (storage / "bench_search.json").write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
