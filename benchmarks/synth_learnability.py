"""How learnable is the synthetic dataset? Train a small CNN from scratch on CPU and print ROC-AUC / AP.

The synthetic data (skinsweep.data.synth) is meant to be learnable but not trivial: a small,
randomly initialised CNN on 64x64 images should land between ROC-AUC 0.75 and 0.97 for melanoma
vs rest. Much higher means the generator's classes barely overlap (every model looks perfect and
sweeps cannot tell backbones apart); much lower means there is little to learn.

    python benchmarks/synth_learnability.py                      # 3,000 images at 600x450, 4 min
    python benchmarks/synth_learnability.py --data /tmp/synth    # reuse a synthesized folder
    python benchmarks/synth_learnability.py --n 600 --size 200x150 --minutes 0.5   # smoke test

Self-contained on purpose (plain torch, PIL, sklearn): it checks the generator, not the rest of
skinsweep. The split is by lesion, ~70/15/15, stratified on "lesion has a melanoma".
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from skinsweep.data.synth import synthesize


def load(root: Path, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 3, side, side) uint8, labels (N,) 0/1 melanoma, lesion ids (N,) from a synth folder."""
    paths = {p.stem: p for p in root.glob("ISIC2018_Task3_*_Input/*.jpg")}
    with (root / "HAM10000_metadata.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["image_id"] in paths]
    images = np.empty((len(rows), 3, side, side), np.uint8)
    for i, r in enumerate(rows):
        with Image.open(paths[r["image_id"]]) as im:
            im.draft("RGB", (side * 2, side * 2))  # JPEG DCT scaling: decode at ~1/4 size, fast
            images[i] = np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR)).transpose(2, 0, 1)
    labels = np.array([r["dx"] == "mel" for r in rows], np.float32)
    lesions = np.array([r["lesion_id"] for r in rows])
    return images, labels, lesions


def split_by_lesion(labels: np.ndarray, lesions: np.ndarray, seed: int) -> np.ndarray:
    """'train' / 'val' / 'test' per image; whole lesions, ~70/15/15 within mel and non-mel lesions."""
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), object)
    for positive in (True, False):
        ids = np.unique(lesions[(labels == 1) == positive])
        ids = ids[rng.permutation(len(ids))]
        cut1, cut2 = int(0.7 * len(ids)), int(0.85 * len(ids))
        for part, chosen in (("train", ids[:cut1]), ("val", ids[cut1:cut2]), ("test", ids[cut2:])):
            split[np.isin(lesions, chosen)] = part
    return split


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 1))


@torch.no_grad()
def scores(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)]).squeeze(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an existing synthesize() output to reuse")
    ap.add_argument("--n", type=int, default=3000, help="images to synthesize (without --data)")
    ap.add_argument("--size", default="600x450", help="WxH of synthesized images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", type=int, default=64, help="images are resized to side x side")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # Data: synthesize (or reuse), load at 64x64, split by lesion.
    t0 = time.perf_counter()
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="synth-learnability-")
        args.data = Path(tmp.name) / "synth"
        w, h = (int(v) for v in args.size.lower().split("x"))
        s = synthesize(args.data, args.n, seed=args.seed, size=(w, h), progress=False)
        print(f"synthesized {s.n_images} images ({s.n_melanoma} mel, {s.n_lesions} lesions) at "
              f"{w}x{h} in {s.seconds:.0f}s = {s.n_images / s.seconds:.1f} images/s")
    images, labels, lesions = load(args.data, args.side)
    split = split_by_lesion(labels, lesions, args.seed)
    x = torch.from_numpy(images).float().div_(255)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    y = torch.from_numpy(labels)
    part = {k: torch.from_numpy(np.flatnonzero(split == k)) for k in ("train", "val", "test")}
    for k, idx in part.items():
        assert len(np.unique(labels[idx.numpy()])) == 2, f"{k} split has one class; use more images"
    print(f"loaded {len(x)} images in {time.perf_counter() - t0:.0f}s; " + ", ".join(
        f"{k} {len(i)} ({int(labels[i.numpy()].sum())} mel)" for k, i in part.items()))

    # Model and loss: weighted BCE as in the reference study (pos_weight = benign / melanoma).
    model = small_cnn()
    ytr = y[part["train"]]
    pos_weight = (len(ytr) - ytr.sum()) / ytr.sum()  # ~8 at HAM10000's 11.1% melanoma
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)

    # Train until the time budget is spent; keep the epoch with the best validation AUC.
    deadline = time.perf_counter() + 60 * args.minutes
    best, best_state, epoch = -1.0, None, 0
    while time.perf_counter() < deadline:
        model.train()
        order = part["train"][torch.randperm(len(part["train"]))]
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            xb = x[idx]
            if torch.rand(()) < 0.5:  # flips and 90-degree turns: a lesion has no up or left
                xb = xb.flip(3)
            xb = torch.rot90(xb, int(torch.randint(4, ())), (2, 3))
            loss = loss_fn(model(xb).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch += 1
        val_auc = roc_auc_score(labels[part["val"]], scores(model, x[part["val"]]))
        if val_auc > best:
            best, best_state = val_auc, {k: v.clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch:3d}  loss {loss.item():.3f}  val AUC {val_auc:.3f}", flush=True)

    # Report: the test split is scored once, with the epoch chosen on validation.
    model.load_state_dict(best_state)
    for k in ("val", "test"):
        s, t = scores(model, x[part[k]]), labels[part[k]]
        print(f"{k:5s} ROC-AUC {roc_auc_score(t, s):.3f}  AP {average_precision_score(t, s):.3f}  "
              f"(n={len(t)}, mel={int(t.sum())}, prevalence {t.mean():.3f})")
    print(f"target band: ROC-AUC 0.75-0.97 ({epoch} epochs, {args.minutes} min, "
          f"{args.threads} threads, {args.side}x{args.side} px)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
