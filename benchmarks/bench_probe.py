"""A 20-epoch linear-probe trial: embedding cache warm vs the frozen backbone run every epoch.

    python benchmarks/bench_probe.py [--backbone resnet18] [--image-size 112] [--n 800] [--epochs 20]

Both runs are the same ``run_trial`` configuration (same data, split, backbone, head, lr, epochs, seed);
the only difference is ``embedding_cache``. The cache is warmed by one untimed run first, so the timed
cached run is what every later probe trial of a sweep costs. Backbones use random weights
(``--weights none``): the cost of a forward pass does not depend on the weights' values. Prints both
wall times and the ratio (target ≥ 10×) and checks that both runs reach the same predictions.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--n", type=int, default=800, help="synthetic images")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--data", type=Path, help="use this dataset instead of synthesising one")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="skinsweep-bench-probe-")
    os.environ.setdefault("SKINSWEEP_CACHE", str(Path(tmp.name) / "cache"))
    import torch

    from skinsweep.data.synth import synthesize
    from skinsweep.train.config import parse_config
    from skinsweep.train.loop import PREDICTIONS, run_trial

    root = args.data or Path(tmp.name) / "synth"
    if args.data is None:
        synthesize(root, args.n, seed=0, size=(300, 225), progress=False)
    base = dict(data=str(root), backbone=args.backbone, weights=args.weights, mode="linear_probe",
                image_size=args.image_size, epochs=args.epochs, lr=1e-3, batch_size=32, seed=0)
    out = Path(tmp.name)

    run_trial(parse_config(base), out / "warmup")  # builds the image cache and the embedding cache
    t = time.perf_counter()
    cached = run_trial(parse_config(base), out / "cached")
    cached_s = time.perf_counter() - t
    t = time.perf_counter()
    run_trial(parse_config(dict(base, embedding_cache=False)), out / "uncached")
    uncached_s = time.perf_counter() - t
    assert cached.summary["embedding_cache"] == "hit", cached.summary["embedding_cache"]

    a = pd.read_parquet(out / "cached" / PREDICTIONS)["prob"].to_numpy()
    b = pd.read_parquet(out / "uncached" / PREDICTIONS)["prob"].to_numpy()
    n = cached.summary["n_images"]
    print(f"{args.backbone} (weights {args.weights}) at {args.image_size}px, {args.epochs} epochs, "
          f"{n['train']} train / {n['val']} val / {n['test']} test images, torch threads {torch.get_num_threads()}")
    print(f"backbone every epoch   {uncached_s:8.2f} s")
    print(f"embedding cache warm   {cached_s:8.2f} s")
    print(f"ratio: {uncached_s / cached_s:.1f}×  (target ≥ 10×); max |Δprob| between the two runs "
          f"{np.abs(a - b).max():.2e}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
