"""One epoch of decode + augment to 224 px: from the raw JPEGs vs from the image cache, side by side.

    python benchmarks/bench_data.py [--n 2000] [--data DIR] [--batch 64] [--workers 2]

Both paths produce the same thing the trainer consumes — float (B, 3, 224, 224) batches after the
reference study's ResNet augmentation, applied batched in the main process — and differ only in where
the uint8 batch comes from:

* raw:    a torch DataLoader whose ``--workers`` worker processes decode each JPEG and resize it to
          224×224 (PIL bicubic, the cache's own ``decode_resize``), every epoch;
* cached: slices of the memory-mapped uint8 cache, read in the main process (as the trainer does).

The cache is built (and timed) first; the epoch timings exclude it, since one build serves every epoch
of every trial. Prints images/s for both and the ratio (target: cached ≥ 5×).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="synthetic images to generate (600×450)")
    ap.add_argument("--data", type=Path, help="use this dataset instead of synthesising one")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="skinsweep-bench-")
    os.environ.setdefault("SKINSWEEP_CACHE", str(Path(tmp.name) / "cache"))
    from skinsweep.data.cache import build_cache, decode_resize
    from skinsweep.data.index import load_index
    from skinsweep.data.synth import synthesize
    from skinsweep.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DataConfig, train_transform

    root = args.data
    if root is None:
        root = Path(tmp.name) / "synth"
        t = time.perf_counter()
        synthesize(root, args.n, seed=0, size=(600, 450), workers=args.workers, progress=False)
        print(f"synthesised {args.n} images at 600×450 in {time.perf_counter() - t:.1f} s")
    index = load_index(root, workers=args.workers)
    paths = index.df["path"].tolist()
    n = len(paths)
    aug = train_transform(DataConfig(input_size=args.size, mean=IMAGENET_MEAN, std=IMAGENET_STD), "resnet_study")

    order = np.random.default_rng(0).permutation(n)
    batches = [np.sort(order[s:s + args.batch]) for s in range(0, n, args.batch)]

    class RawBatches(torch.utils.data.Dataset):
        """Item k = uint8 batch k, decoded and resized from the JPEG files (in a worker process)."""

        def __len__(self):
            return len(batches)

        def __getitem__(self, k):
            return torch.from_numpy(load_raw(batches[k]))

    def epoch(source) -> float:
        t = time.perf_counter()
        total = 0.0
        for k, xb in enumerate(source):
            total += float(aug(xb, torch.Generator().manual_seed(k))[0, 0, 0, 0])  # consume the batch
        return time.perf_counter() - t

    def load_raw(rows):  # decode + resize every image, every epoch
        return np.stack([decode_resize(paths[i], args.size, "squash") for i in rows])

    raw_s = epoch(torch.utils.data.DataLoader(RawBatches(), batch_size=None, num_workers=args.workers))

    t = time.perf_counter()
    cache = build_cache(index, size=args.size, workers=args.workers)  # once; every later epoch reads it
    build_s = time.perf_counter() - t

    cached_s = epoch(torch.from_numpy(np.asarray(cache.images[rows])) for rows in batches)
    t = time.perf_counter()
    for rows in batches:
        np.asarray(cache.images[rows])
    read_s = time.perf_counter() - t

    print(f"images: {n} ({index.df['width'].iloc[0]}×{index.df['height'].iloc[0]} JPEG) → {args.size}×{args.size}, "
          f"batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"raw epoch     {raw_s:7.2f} s  {n / raw_s:8.1f} images/s   (decode + resize in {args.workers} workers, augment)")
    print(f"cached epoch  {cached_s:7.2f} s  {n / cached_s:8.1f} images/s   (memmap slice + augment)")
    print(f"cache reads   {read_s:7.2f} s  {n / read_s:8.1f} images/s   (memmap slices alone, no augmentation)")
    print(f"cache build   {build_s:7.2f} s  (once per dataset/size/policy; not in the epoch times)")
    print(f"ratio cached/raw: {raw_s / cached_s:.1f}×  (target ≥ 5×)")
    sys.stdout.flush()
    tmp.cleanup()


if __name__ == "__main__":
    main()
