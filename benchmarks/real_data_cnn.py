"""Real-data learning check: a small randomly initialised CNN on the real HAM10000 images, on CPU.

    python benchmarks/real_data_cnn.py [--data ../shared/data/ham10000_200x150] [--epochs 12] [--size 64]

Trains one ``skinsweep`` trial (``run_trial``, the same code as ``skinsweep train``) on the real
10,015 images with the default lesion-grouped 70/15/15 split: ``tiny_resnet`` (timm ResNet class,
random init) fine-tuned with the reference study's ResNet augmentation and weighted BCE
(pos_weight 8). Selection is on validation AUC; the test split is scored once with that epoch. Prints
val and test AUC / AP and the wall time; with the defaults it stays under 15 minutes on 2 cores.
Without pretrained weights and at 64 px this measures that the pipeline learns from real lesions,
not what a pretrained 224 px model reaches (that needs a GPU and the hub weights).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_200x150"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("results/real_data_cnn"))
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--size", type=int, default=64, help="cached image side and network input size")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"real data not found at {args.data}; pass --data DIR (ISIC 2018 / HAM10000 layout)")

    from skinsweep.train.config import parse_config
    from skinsweep.train.loop import run_trial

    cfg = parse_config(dict(data=str(args.data), backbone=args.backbone, backbone_args={"input_size": args.size},
                            image_size=args.size, mode="finetune", epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, schedule="cosine", warmup_epochs=1, pos_weight=8.0, seed=0))
    t = time.perf_counter()
    res = run_trial(cfg, args.out, progress=True, overwrite=True)
    wall = time.perf_counter() - t
    s = res.summary
    print(f"{args.backbone} (random init) at {args.size}px, {s['epochs_run']} epochs, split {s['split_hash']} "
          f"({s['n_images']['train']}/{s['n_images']['val']}/{s['n_images']['test']} images), {wall / 60:.1f} min")
    print(f"best epoch {res.best_epoch} by val AUC")
    for split in ("val", "test"):
        m = getattr(res, split)
        print(f"{split:4s}  AUC {m['auc']:.3f}  AP {m['ap']:.3f}  (prevalence {m['n_pos'] / m['n']:.3f})")


if __name__ == "__main__":
    main()
