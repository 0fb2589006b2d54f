"""Greedy ensemble selection over 200 synthetic members × 1,500 validation images, plus bootstrap CIs.

    python benchmarks/bench_ensemble.py [--members 200] [--n 1500] [--n-boot 2000]

Members are noisy views of a shared latent score (some informative, many near-noise), images come in
lesion groups, 11% positives. Times, side by side in one run: greedy selection (Caruana et al. 2004,
25 rounds with replacement from the top 200), and the report's bootstrap (2,000 lesion-grouped
resamples of every metric for the selected members + the ensemble) and DeLong test. Target: the
whole under 5 s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=200)
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()

    from skinsweep.ensemble.combiners import greedy_selection
    from skinsweep.ensemble.stats import bootstrap_metrics, delong_test
    from skinsweep.metrics import sigmoid

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(args.n), rng.integers(1, 3, args.n))[: args.n]
    y = (rng.random(args.n) < 0.111).astype(int)
    latent = 1.5 * y + rng.normal(size=args.n)
    skill = rng.uniform(0.0, 1.0, args.members)
    X = skill[None, :] * latent[:, None] + rng.normal(scale=1.5, size=(args.n, args.members))  # logits (N, M)

    t = time.perf_counter()
    sel = greedy_selection(X, y, metric="auc", n_iter=25, top_n=args.members)
    greedy_s = time.perf_counter() - t
    idx = sel.indices
    ens = sigmoid(X) @ sel.weights  # the selected mean-probability ensemble
    probs = {f"m{i}": sigmoid(X[:, i]) for i in idx[:5]} | {"ensemble": ens}

    t = time.perf_counter()
    ci = bootstrap_metrics(y, probs, groups=groups, n_boot=args.n_boot, seed=0)
    best = max(idx, key=lambda i: skill[i])
    dl = delong_test(y, ens, sigmoid(X[:, best]))
    boot_s = time.perf_counter() - t

    print(f"{args.members} members × {args.n} images ({y.sum()} positives), greedy 25 rounds → {len(idx)} distinct "
          f"members; bootstrap {args.n_boot} lesion-grouped resamples × {len(probs)} models × {ci['metric'].nunique()} metrics")
    print(f"greedy selection   {greedy_s:6.2f} s")
    print(f"bootstrap + DeLong {boot_s:6.2f} s   (ensemble AUC {dl['auc_a']:.3f} vs best member {dl['auc_b']:.3f}, p {dl['p_value']:.2g})")
    print(f"total              {greedy_s + boot_s:6.2f} s   (target < 5 s)")

    # The ensemble report's own bootstrap: 3 models x 1,500 images x 2,000 lesion resamples (~0.2 s
    # on 2 shared cores; tests/test_stats.py checks its results, this its time).
    three = dict(list(probs.items())[-3:])
    t = time.perf_counter()
    bootstrap_metrics(y, three, groups=groups, n_boot=2000, seed=0)
    print(f"report bootstrap   {time.perf_counter() - t:6.2f} s   (3 models, 2,000 lesion resamples; target < 3 s)")


if __name__ == "__main__":
    main()
