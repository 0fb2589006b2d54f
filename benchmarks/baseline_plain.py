"""The hand-written baseline a sweep must beat (issue #11): one sensible from-scratch config, no search.

What a careful person writes without skinsweep's sweep: a randomly initialised ResNet-18 (timm) at 96 px,
weighted BCE (pos_weight 8), AdamW with a one-cycle schedule, flips and 90° rotations, 12 epochs, the epoch
with the best validation AUC scored once on test. It shares only the data layer with skinsweep (the same
lesion-grouped split manifest and the same image cache, squash policy), so the comparison is about search,
not data handling. ``--budget`` caps the whole wall time (index, cache and training included): when it
runs out, training stops after the current batch and the best epoch so far is scored.

    .venv/bin/python benchmarks/baseline_plain.py --budget 60m            # ../shared/data/ham10000_200x150

Writes ``OUT/predictions.parquet`` (``image_id, lesion_id, label, dx, logit, prob, split``, val and test,
the same columns a trial writes) and ``OUT/summary.json``, and prints val/test AUC and AP.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F

from skinsweep.data.cache import build_cache
from skinsweep.data.index import load_index
from skinsweep.data.split import get_or_create_split
from skinsweep.metrics import binary_metrics, sigmoid
from skinsweep.sweep.space import parse_duration

ROOT = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def duration(text: str) -> float:
    """``90s`` / ``60m`` / ``1.5h`` → seconds: the parser of ``skinsweep sweep --budget``."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def to_input(u8: np.ndarray, augment: bool, g: torch.Generator | None = None) -> torch.Tensor:
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255)
    if augment:  # the dihedral group: lesions have no up, down, left or right
        k = int(torch.randint(4, (1,), generator=g))
        x = torch.rot90(x, k, dims=(2, 3))
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(3)
    return (x - MEAN) / STD


@torch.no_grad()
def logits(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([model(to_input(images[i:i + batch], False)).squeeze(1).numpy()
                           for i in range(0, len(images), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000_200x150"))
    ap.add_argument("--out", default=str(ROOT / "results" / "baseline-plain"))
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    ap.add_argument("--pos-weight", type=float, default=8.0)
    ap.add_argument("--budget", type=duration, default=None, help="wall-time cap, e.g. 60m (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget if args.budget else math.inf
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    index = load_index(args.data, progress=True)
    manifest, split_path, _ = get_or_create_split(index)  # lesion-grouped 70/15/15, seed 0: the sweep's default
    cache = build_cache(index, size=args.size, policy="squash", progress=True)
    df = manifest.df  # image_id, split, label, lesion_id, dx
    parts = {s: df[df["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    X = {s: cache.get(p["image_id"].tolist()) for s, p in parts.items()}
    y = {s: p["label"].to_numpy() for s, p in parts.items()}
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {', '.join(f'{s} {len(v):,}' for s, v in y.items())} "
          f"images; split {manifest.hash} ({split_path})")

    model = timm.create_model("resnet18", pretrained=False, num_classes=1)
    steps_per_epoch = math.ceil(len(y["train"]) / args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    pos_weight = torch.tensor(args.pos_weight)
    g = torch.Generator().manual_seed(args.seed)
    best = {"auc": -1.0}
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y["train"]), generator=g).numpy()
        losses = []
        for i in range(0, len(order), args.batch):
            if time.perf_counter() > deadline:
                break
            idx = np.sort(order[i:i + args.batch])
            xb, yb = to_input(X["train"][idx], True, g), torch.from_numpy(y["train"][idx]).float()
            loss = F.binary_cross_entropy_with_logits(model(xb).squeeze(1), yb, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if not losses:
            break
        z = logits(model, X["val"])
        m = binary_metrics(y["val"], sigmoid(z))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_auc": m["auc"], "val_ap": m["ap"],
                        "elapsed_s": round(time.perf_counter() - t0, 1), "batches": len(losses)})
        print(f"epoch {epoch}/{args.epochs}: loss {np.mean(losses):.4f}  val AUC {m['auc']:.4f}  AP {m['ap']:.4f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if m["auc"] > best["auc"]:
            best = {"auc": m["auc"], "epoch": epoch, "state": {k: v.clone() for k, v in model.state_dict().items()}}
        if time.perf_counter() > deadline:
            print(f"budget of {args.budget / 60:g} min spent after {len(losses)} batches of epoch {epoch}")
            break

    # the selected epoch scores val and test once
    model.load_state_dict(best["state"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, metrics = [], {}
    for s in ("val", "test"):
        z = logits(model, X[s])
        p = sigmoid(z)
        metrics[s] = binary_metrics(y[s], p)
        rows.append(parts[s][["image_id", "lesion_id", "label", "dx"]].assign(logit=z, prob=p, split=s))
    pd.concat(rows).to_parquet(out / "predictions.parquet", index=False)
    summary = {"config": {k: v for k, v in vars(args).items()}, "best_epoch": best["epoch"], "history": history,
               "split_hash": manifest.hash, "wall_s": round(time.perf_counter() - t0, 1),
               "val": metrics["val"], "test": metrics["test"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    for s in ("val", "test"):
        print(f"{s}: AUC {metrics[s]['auc']:.4f}  AP {metrics[s]['ap']:.4f}  (n {metrics[s]['n']}, "
              f"{metrics[s]['n_pos']} melanoma)")
    print(f"best epoch {best['epoch']} (by val AUC); wall {summary['wall_s'] / 60:.1f} min → {out}")


if __name__ == "__main__":
    main()
