"""Load test of ``skinsweep serve`` on loopback: requests/s, latency percentiles and errors, with dynamic
batching off (``--max-batch 1``) and on (``--max-batch 32``), against offline ``predict_files`` on the
same images.

    sh scripts/loopback.sh .venv/bin/python benchmarks/bench_serve.py [--bundle DIR] [--images DIR]
        [--duration 20] [--concurrency 16] [--replicas 1]

Without ``--bundle`` it builds a small synthetic one first (two tiny random-init members, ViT and CLIP
stand-ins, stacked; 240 synthetic lesions at 600×450, the ISIC size): the numbers then measure the
service's overhead around small models, not a real backbone. Each client thread sends one image per
request (JPEG, 600×450), back to back, for ``--duration`` seconds, then stops; the load is bounded in time
and concurrency. Clients and server share this machine's CPUs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bundle(root: Path, image_size: int) -> tuple[Path, Path]:
    """(bundle, image folder): a tiny synthetic sweep of two members, stacked and exported."""
    import yaml

    from skinsweep.data.synth import synthesize
    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.results import ResultsStore
    from skinsweep.train.config import parse_config
    from skinsweep.train.loop import run_trial

    data = root / "data"
    synthesize(data, 240, seed=3, size=(600, 450), workers=2, progress=False)
    store = ResultsStore(root / "results" / "bench")
    for k, bb in enumerate(("tiny_vit", "tiny_clip")):
        out = root / "trials" / f"t{k}"
        cfg = parse_config(dict(data=str(data), backbone=bb, mode="finetune", lr=1e-3, epochs=2, batch_size=32,
                                image_size=image_size, seed=k))
        res = run_trial(cfg, out, trial_id=f"t{k}")
        store.add_trial(res.summary, predictions=out / "predictions.parquet",
                        extra={"checkpoint": str(out / "checkpoint.safetensors")})
    (root / "e.yaml").write_text(yaml.safe_dump({"name": "bench", "members": {"rule": "top_k", "k": 2},
                                                 "report": {"n_boot": 100}}))
    build_ensemble(root / "e.yaml", store.root, out=root / "ens")
    return root / "ens" / "bundle", data / "ISIC2018_Task3_Training_Input"


def load(url: str, images: list[bytes], *, duration: float, concurrency: int) -> dict:
    """``concurrency`` threads, each posting one image per request back to back for ``duration`` s."""
    import requests

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(k: int) -> None:
        s = requests.Session()
        i = k
        mine, bad = [], []
        while time.perf_counter() < stop_at:
            data = images[i % len(images)]
            i += concurrency
            t = time.perf_counter()
            try:
                r = s.post(f"{url}/v1/predict", files=[("files", (f"{i}.jpg", data, "image/jpeg"))], timeout=60)
                ok = r.status_code == 200 and len(r.json()["results"]) == 1
                (mine if ok else bad).append(time.perf_counter() - t if ok else f"HTTP {r.status_code}")
            except Exception as e:  # noqa: BLE001 - count, do not stop the load
                bad.append(type(e).__name__)
        with lock:
            lat.extend(mine)
            errors.extend(bad)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "rps": len(lat) / wall, "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99), "errors": len(errors), "error_kinds": sorted(set(errors))[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: build a tiny synthetic one)")
    ap.add_argument("--images", type=Path, help="folder of images to send (default: the synthetic ones)")
    ap.add_argument("--n-images", type=int, default=64, help="distinct images cycled through")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per setting")
    ap.add_argument("--concurrency", type=int, default=16, help="client threads")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--batches", default="1,32", help="--max-batch settings to compare")
    ap.add_argument("--image-size", type=int, default=128, help="input size of the synthetic bundle's members")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="skinsweep-bench-serve-")
    os.environ.setdefault("SKINSWEEP_CACHE", str(Path(tmp.name) / "cache"))
    from skinsweep.ensemble.bundle import expand_inputs, load_bundle, predict_files
    import requests

    from skinsweep.serve.app import ServeConfig, deploy, start, stop

    bundle, folder = args.bundle, args.images
    if bundle is None:
        t = time.perf_counter()
        bundle, synth = build_bundle(Path(tmp.name), args.image_size)
        folder = folder or synth
        print(f"built a tiny synthetic bundle in {time.perf_counter() - t:.0f} s: {bundle}")
    if folder is None:
        sys.exit("--images DIR is needed with --bundle")
    files = expand_inputs([folder])[: args.n_images]
    images = [f.read_bytes() for f in files]
    print(f"{len(files)} images, {np.mean([len(b) for b in images]) / 1024:.0f} KiB each on average; "
          f"{args.concurrency} clients × {args.duration:g} s per setting; {os.cpu_count()} CPUs shared by clients "
          "and server")

    # offline: the same images through predict_files (what `skinsweep predict` does), in this process with
    # torch's default threads, after one warm-up pass; measured before and after the load (the CPUs are shared)
    b = load_bundle(bundle)
    predict_files(b, files[:4])

    def offline_rate() -> float:
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < args.duration / 2:
            predict_files(b, files)
            n += len(files)
        return n / (time.perf_counter() - t)

    offline_before = offline_rate()
    print(f"offline predict_files: {offline_before:.1f} images/s")

    rows = []
    running = None
    try:
        for k, mb in enumerate(int(x) for x in args.batches.split(",")):
            cfg = ServeConfig(bundle=bundle, port=free_port() if running is None else running.config.port,
                              max_batch=mb, replicas=args.replicas)
            t = time.perf_counter()
            if running is None:
                running = start(cfg)
            else:
                deploy(cfg)  # the same Serve instance, the application replaced with the new setting
            print(f"--max-batch {mb}: ready in {time.perf_counter() - t:.1f} s")
            load(running.url, images[:4], duration=2.0, concurrency=2)  # warm up
            before = requests.get(f"{running.url}/healthz", timeout=10).json()["replica"]
            r = load(running.url, images, duration=args.duration, concurrency=args.concurrency)
            after = requests.get(f"{running.url}/healthz", timeout=10).json()["replica"]  # one replica's view
            r["mean_batch"] = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
            rows.append((mb, r))
            print(f"--max-batch {mb:>2}: {r['requests']} requests, {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, "
                  f"p95 {r['p95']:.0f} ms, p99 {r['p99']:.0f} ms, errors {r['errors']} {r['error_kinds'] or ''}, "
                  f"mean batch {r['mean_batch']:.1f} images")
    finally:
        if running is not None:
            stop(running)
    offline_after = offline_rate()
    offline = (offline_before + offline_after) / 2
    print(f"offline predict_files: {offline_after:.1f} images/s after the load (mean {offline:.1f})")

    print("\n| --max-batch | requests | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | serve / offline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mb, r in rows:
        print(f"| {mb} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
              f"{r['errors']} | {r['mean_batch']:.1f} | {r['rps'] / offline:.2f} |")
    print(f"| offline `predict_files` (before / after) | | {offline_before:.1f} / {offline_after:.1f} images/s | | | | | | 1 |")
    if len(rows) >= 2:
        print(f"batching: {rows[-1][1]['rps'] / rows[0][1]['rps']:.2f}× the requests/s of --max-batch {rows[0][0]}")
    if any(r["errors"] for _, r in rows):
        sys.exit("errors under load")


if __name__ == "__main__":
    main()
