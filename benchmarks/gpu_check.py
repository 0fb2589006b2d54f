"""GPU training throughput: batches fed from the image cache vs synthetic tensors already on the GPU.

    python benchmarks/gpu_check.py [--backbones resnet18,dino_vits16,clip_vitb32] [--batches 32,256] [--steps 20]

For each backbone (random init, 224 px, fine-tune, bf16 autocast, channels-last for CNNs) and batch
size, times ``--steps`` training steps (forward, backward, Adam) twice, side by side:

* gpu-only: one uint8 batch already on the GPU, re-used every step (no data path at all);
* cache:    the trainer's data path — random rows sliced from the memory-mapped uint8 image cache,
            copied to the GPU, then the backbone's batched transform (ResNet augmentation for the CNN).

Prints images/s for both and the data path's share of the step time (target: under 20%).
Needs a CUDA GPU; builds a synthetic 224 px cache of ``--n`` images first.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet18,dino_vits16,clip_vitb32")
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=1024, help="synthetic images in the cache")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU")
    tmp = tempfile.TemporaryDirectory(prefix="skinsweep-gpu-")
    os.environ.setdefault("SKINSWEEP_CACHE", str(Path(tmp.name) / "cache"))
    from skinsweep.train.backbones import create_backbone
    from skinsweep.data.cache import build_cache
    from skinsweep.data.index import load_index
    from skinsweep.data.synth import synthesize
    from skinsweep.data.transforms import train_transform
    from skinsweep.train.model import Classifier, make_head

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    root = Path(tmp.name) / "synth"
    t = time.perf_counter()
    synthesize(root, args.n, seed=0, size=(600, 450), progress=False)
    cache = build_cache(load_index(root), size=224)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; cache of {len(cache)} images at 224 px "
          f"built in {time.perf_counter() - t:.0f} s")
    rng = np.random.default_rng(0)
    print(f"{'backbone':14s} {'batch':>5s} {'gpu-only img/s':>15s} {'cache img/s':>12s} {'data share':>10s}")
    for name in args.backbones.split(","):
        bb = create_backbone(name, weights="none")
        cnn = bb.family == "cnn"
        model = Classifier(bb.model, make_head(bb.default_head, bb.num_features)).to(dev)
        if cnn:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        tf = train_transform(bb.data_config, "resnet_study" if cnn else "none").to(dev)
        gen = torch.Generator().manual_seed(0)
        for bs in (int(b) for b in args.batches.split(",")):
            fixed = torch.from_numpy(np.asarray(cache.images[:bs])).to(dev)
            y = torch.zeros(bs, device=dev)
            y[: bs // 9] = 1

            def step(xu8: torch.Tensor) -> None:
                x = tf(xu8, gen)
                if cnn:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logit = model(x)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), y, pos_weight=torch.tensor(8.0, device=dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def timed(feed) -> float:
                for _ in range(3):
                    step(feed())
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(feed())
                torch.cuda.synchronize()
                return args.steps * bs / (time.perf_counter() - t0)

            gpu_only = timed(lambda: fixed)
            from_cache = timed(lambda: torch.from_numpy(np.asarray(
                cache.images[np.sort(rng.choice(len(cache), bs, replace=False))])).pin_memory().to(dev, non_blocking=True))
            share = 1 - from_cache / gpu_only
            print(f"{name:14s} {bs:5d} {gpu_only:15.0f} {from_cache:12.0f} {100 * share:9.1f}%")
        model = opt = None  # free this backbone's GPU memory before the next
        torch.cuda.empty_cache()
    tmp.cleanup()


if __name__ == "__main__":
    main()
