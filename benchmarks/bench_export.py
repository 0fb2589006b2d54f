"""ONNX export vs the PyTorch bundle: CPU latency (batch 1) and throughput (batch 32) on the same images.

    python benchmarks/bench_export.py [--backbones resnet18,dino_vits16] [--tta none] [--reps 20] [--smoke-test]

Builds a bundle of random-init members at their full size (default ResNet-18 and DINO ViT-S/16 at 224 px,
stacked, temperature-calibrated: the reference study's deployment shape), exports it with
``skinsweep.ensemble.export.export_bundle_onnx`` and times, side by side in one run, on the same
pre-decoded uint8 images (decoding is the same PIL code for both and is left out):

* PyTorch: what ``Bundle.predict`` runs after decoding — each member's eval transform and forward pass
  (with its TTA views), the combiner and calibrator (numpy) — under ``torch.no_grad``;
* onnxruntime: one ``InferenceSession.run`` of the exported graph (CPU execution provider).

Both use the same number of threads (``--threads``, default all cores). Prints median seconds per call and
images/s with the ratio, and the largest difference between the two calibrated probabilities. The two
are called alternately, so on shared CPUs both see the same load (their ratio is steadier than either time).
``--smoke-test``: the tiny test backbones at 32 px, 3 repetitions (seconds, for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_bundle(folder: Path, backbones: list[str], tta: str, seed: int = 0) -> Path:
    """A loadable bundle of random-init ``backbones`` (linear heads), a stacker and a temperature calibrator
    fitted on random logits: the same files ``skinsweep ensemble build`` writes, without a sweep."""
    import torch
    from safetensors.torch import save_model

    from skinsweep.ensemble.bundle import write_manifest
    from skinsweep.ensemble.calibrators import make_calibrator
    from skinsweep.ensemble.combiners import make_combiner
    from skinsweep.train.backbones import create_backbone
    from skinsweep.train.model import Classifier, make_head

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    members = []
    for k, name in enumerate(backbones):
        bb = create_backbone(name, weights="none")
        model = Classifier(bb.model, make_head("linear", bb.num_features)).eval()
        d = folder / "members" / f"m{k}"
        d.mkdir(parents=True)
        save_model(model, str(d / "checkpoint.safetensors"))
        mj = {"backbone": bb.spec(), "head": {"kind": "linear", "hidden": 512, "dropout": 0.0}, "mode": "finetune",
              "data_config": bb.data_config.to_dict(), "image_size": bb.data_config.input_size,
              "resize_policy": "squash", "tta": tta, "positive": ["MEL"], "trial_id": f"m{k}"}
        (d / "model.json").write_text(json.dumps(mj))
        members.append({"trial_id": f"m{k}", "path": f"members/m{k}", "model": mj})
    X = rng.normal(size=(300, len(backbones)))
    y = (X.sum(1) + rng.normal(size=300) > 1.5).astype(int)
    comb = make_combiner("stacking").fit(X, y)
    cal = make_calibrator("temperature").fit(comb.predict_logit(X), y)
    meta = {"format": 1, "name": "bench", "members": members, "combiner": comb.to_dict(), "metadata": None,
            "calibrator": cal.to_dict(), "threshold": 0.2, "threshold_rule": {"target_sensitivity": 0.95}}
    (folder / "bundle.json").write_text(json.dumps(meta))
    write_manifest(folder)
    return folder


def torch_scores(bundle, arrays: dict) -> np.ndarray:
    """Bundle.predict after decoding: eval transform, members (with TTA), combiner, calibrator; (N,) probabilities."""
    import torch

    from skinsweep.data.transforms import DataConfig, eval_transform, tta_logits

    X = np.zeros((len(next(iter(arrays.values()))), len(bundle.models)))
    with torch.no_grad():
        for j, (model, mm) in enumerate(zip(bundle.models, bundle.model_meta)):
            x = eval_transform(DataConfig.from_dict(mm["data_config"]))(torch.from_numpy(arrays[int(mm["image_size"])]))
            X[:, j] = tta_logits(model, x, mm.get("tta", "none")).double().numpy()
    return bundle.calibrator.predict_proba(bundle.combiner.predict_logit(X))


def timed(fns: list, reps: int) -> list[float]:
    """Median seconds per call of each of ``fns``, calls interleaved (a, b, a, b, …) so that both see the
    same load on shared CPUs; one warm-up call each (allocations, ORT graph optimisation, oneDNN primitives)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet18,dino_vits16")
    ap.add_argument("--tta", default="none", choices=["none", "flips", "dihedral"])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per setting (batch 32: a quarter, at least 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    if args.smoke_test:
        args.backbones, args.reps = "tiny_resnet,tiny_vit", 3

    import onnxruntime as ort
    import torch

    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.ensemble.export import export_bundle_onnx

    torch.set_num_threads(args.threads)
    backbones = args.backbones.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_bundle(tmp / "bundle", backbones, args.tta)
        bundle = load_bundle(tmp / "bundle")
        info = export_bundle_onnx(tmp / "bundle", tmp / "onnx")
        export_s = time.perf_counter() - t
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp / "onnx" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        size_mb = (tmp / "onnx" / "model.onnx").stat().st_size / 2**20

        rng = np.random.default_rng(0)
        sizes = sorted({i["resize"]["size"] for i in info["inputs"]})
        images = {s: rng.integers(0, 256, size=(32, s, s, 3), dtype=np.uint8) for s in sizes}
        name = {i["resize"]["size"]: i["name"] for i in info["inputs"]}

        def run_torch(n):
            return torch_scores(bundle, {s: a[:n] for s, a in images.items()})

        def run_ort(n):
            return sess.run(["calibrated_prob"], {name[s]: a[:n] for s, a in images.items()})[0]

        diff = float(np.abs(run_torch(32) - run_ort(32)).max())
        print(f"bundle: {' + '.join(backbones)} (tta {args.tta}), stacking + temperature; {args.threads} threads, "
              f"torch {torch.__version__}, onnxruntime {ort.__version__}; export {export_s:.1f} s, model.onnx "
              f"{size_mb:,.1f} MiB; max |calibrated_prob difference| {diff:.1e} on 32 images")
        print(f"{'':24s}{'PyTorch':>12s}{'onnxruntime':>14s}{'ratio (torch/ort)':>20s}")
        for n, reps in ((1, args.reps), (32, max(3, args.reps // 4))):
            tt, to = timed([lambda: run_torch(n), lambda: run_ort(n)], reps)
            label = "latency, batch 1" if n == 1 else "throughput, batch 32"
            if n == 1:
                print(f"{label:24s}{tt * 1e3:9.1f} ms{to * 1e3:11.1f} ms{tt / to:17.2f}x")
            else:
                print(f"{label:24s}{n / tt:7.1f} img/s{n / to:9.1f} img/s{tt / to:17.2f}x")
        print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg())
              + f" on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
