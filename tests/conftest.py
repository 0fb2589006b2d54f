"""Shared fixtures: small datasets written in the real release layouts, and an isolated cache."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own SKINSWEEP_CACHE, so tests never see each other's caches or the user's."""
    monkeypatch.setenv("SKINSWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_image(path: Path, seed: int, size=(60, 45), mode="RGB", fmt=None) -> None:
    """A small smooth-noise image (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert(mode).save(path, format=fmt)


def make_rows(n: int, *, n_mel: int | None = None, repeat_every: int = 3, seed: int = 0) -> list[dict]:
    """Metadata rows: ISIC ids, HAM lesion ids (every ``repeat_every``-th lesion photographed twice)."""
    rng = np.random.default_rng(seed)
    n_mel = max(1, n // 9) if n_mel is None else n_mel
    dx = ["MEL"] * n_mel + list(rng.choice(CLASSES[1:], size=n - n_mel))
    rows, lesion = [], 0
    i = 0
    while i < n:
        copies = 2 if lesion % repeat_every == 0 and i + 1 < n and dx[i] == dx[i + 1] else 1
        for _ in range(copies):
            rows.append({"image_id": f"ISIC_{24306 + i:07d}", "lesion_id": f"HAM_{lesion:07d}", "dx": dx[i],
                         "age": str(float(30 + i % 50)), "sex": ["male", "female"][i % 2], "localization": "back",
                         "dx_type": "histo"})
            i += 1
        lesion += 1
    return rows


def write_isic(root: Path, rows: list[dict], *, split="Training", metadata=True, float_labels=True,
               columns=("image",) + CLASSES, size=(60, 45)) -> Path:
    """Write rows in the ISIC 2018 Task 3 layout (images + one-hot CSV [+ HAM10000_metadata.csv])."""
    img_dir = root / f"ISIC2018_Task3_{split}_Input"
    gt_dir = root / f"ISIC2018_Task3_{split}_GroundTruth"
    gt_dir.mkdir(parents=True, exist_ok=True)
    one, zero = ("1.0", "0.0") if float_labels else ("1", "0")
    with open(gt_dir / f"ISIC2018_Task3_{split}_GroundTruth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r["image_id"] if c == "image" else (one if r["dx"] == c else zero) for c in columns])
    for k, r in enumerate(rows):
        write_image(img_dir / f"{r['image_id']}.jpg", seed=k, size=size)
    (img_dir / "LICENSE.txt").write_text("release licence file: not an image, must be ignored\n")
    if metadata:
        write_ham_metadata(root / "HAM10000_metadata.csv", rows)
    return root


def write_ham_metadata(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for r in rows:
            w.writerow([r["lesion_id"], r["image_id"], r["dx"].lower(), r["dx_type"], r["age"], r["sex"],
                        r["localization"]])


@pytest.fixture
def isic_dir(tmp_path) -> Path:
    """60 images, ISIC 2018 Training layout + HAM10000 metadata, some lesions photographed twice."""
    return write_isic(tmp_path / "isic", make_rows(60))


@pytest.fixture
def official_dir(tmp_path) -> Path:
    root = tmp_path / "official"
    rows = make_rows(90)
    for split, part in (("Training", rows[:60]), ("Validation", rows[60:72]), ("Test", rows[72:])):
        write_isic(root, part, split=split, metadata=False)
    write_ham_metadata(root / "HAM10000_metadata.csv", rows[:60])  # like the release: training only
    return root


def shared(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test when it is absent (a user's clone lacks it)."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p}")
    return p


@pytest.fixture(scope="session")
def real_labels_dir(tmp_path_factory):
    """The real ISIC 2018 label files in the release layout, with empty stand-in image files."""
    src = shared("isic2018")
    root = tmp_path_factory.mktemp("isic_real")
    for split in ("Training", "Validation", "Test"):
        gt = root / f"ISIC2018_Task3_{split}_GroundTruth"
        gt.mkdir()
        (gt / f"ISIC2018_Task3_{split}_GroundTruth.csv").symlink_to(src / f"ISIC2018_Task3_{split}_GroundTruth.csv")
        img = root / f"ISIC2018_Task3_{split}_Input"
        img.mkdir()
        with open(src / f"ISIC2018_Task3_{split}_GroundTruth.csv") as f:
            for row in csv.DictReader(f):
                (img / f"{row['image']}.jpg").touch()
    (root / "HAM10000_metadata.csv").symlink_to(src / "HAM10000_metadata.csv")
    return root


class S3Server:
    """moto's S3 server on loopback; :meth:`stop` and :meth:`start` take it away and bring it back on the same
    port with the same buckets and objects (moto keeps them in this process), like an object-store outage."""

    def __init__(self) -> None:
        import pyarrow.fs as pafs
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.url = f"http://{self.host}:{self.port}"
        self.fs = pafs.S3FileSystem(endpoint_override=f"{self.host}:{self.port}", scheme="http", access_key="testing",
                                    secret_key="testing", region="us-east-1")

    def stop(self) -> None:
        """Connections are refused from now on (the listening socket is closed, not just no longer served)."""
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()
            self.server = None

    def start(self) -> None:
        if self.server is None:
            self.server = self._cls(ip_address=self.host, port=self.port, verbose=False)
            self.server.start()


@pytest.fixture
def s3_server(monkeypatch):
    """An S3 server on loopback with an empty bucket ``sweeps``; the AWS_* environment points at it (Ray's
    workers inherit it). Returns an :class:`S3Server` (``.fs``: a pyarrow S3FileSystem on it)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import urllib.request

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = S3Server()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": server.url, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    # moto keeps its buckets in process-wide state: start every test from an empty server
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/moto-api/reset", method="POST"), timeout=10)
    boto3.client("s3").create_bucket(Bucket="sweeps")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server):
    """:func:`s3_server`'s pyarrow S3FileSystem."""
    return s3_server.fs


# ---- a tiny sweep (no Ray): the ensemble, evaluate, recalibrate and compare tests share it ---------------
TINY_MEMBERS = [("tiny_resnet", "finetune", 1e-3), ("tiny_vit", "finetune", 1e-3), ("tiny_clip", "finetune", 1e-3),
                ("tiny_vit", "linear_probe", 1e-2)]


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """A results store with four completed tiny trials on one synthetic dataset and split (300 images, 96x72,
    seed 5, ids from ISIC_0024306); ``cache`` is the SKINSWEEP_CACHE the trials used."""
    import os

    from skinsweep.data.synth import synthesize
    from skinsweep.results import ResultsStore
    from skinsweep.train.config import parse_config
    from skinsweep.train.loop import run_trial

    base = tmp_path_factory.mktemp("ens")
    os.environ["SKINSWEEP_CACHE"] = str(base / "cache")  # session-scoped: one cache for the fixture's trials
    data = base / "data"
    synthesize(data, 300, seed=5, size=(96, 72), workers=1, progress=False)
    store = ResultsStore(base / "results" / "s")
    for k, (bb, mode, lr) in enumerate(TINY_MEMBERS):
        out = base / "trials" / f"t{k}"
        cfg = parse_config(dict(data=str(data), backbone=bb, mode=mode, lr=lr, epochs=3, batch_size=32,
                                image_size=32, seed=k))
        res = run_trial(cfg, out, trial_id=f"t{k}")
        store.add_trial(res.summary, predictions=out / "predictions.parquet",
                        extra={"checkpoint": str(out / "checkpoint.safetensors")})
    return {"data": data, "results": store.root, "cache": base / "cache"}


@pytest.fixture(scope="session")
def tiny_ensembles(tiny_sweep, tmp_path_factory):
    """Two ensembles of :func:`tiny_sweep`, each with its bundle: ``stack`` (tiny_vit + tiny_clip, stacked, no
    calibrator: the stacker's own probabilities) and ``mean`` (all four members, mean of probabilities, Platt).
    Returns {name: folder}. (The tiny members barely discriminate, AUC ~0.55; a calibrator fitted on their 45
    validation images flattens every probability to the prevalence, which leaves no calibration to test.)"""
    import os

    import yaml

    from skinsweep.ensemble.build import build_ensemble

    os.environ["SKINSWEEP_CACHE"] = str(tiny_sweep["cache"])
    base = tmp_path_factory.mktemp("ensembles")
    recipes = {
        "stack": {"name": "stack", "members": {"rule": "best_per_backbone", "backbones": ["tiny_vit", "tiny_clip"]},
                  "calibration": {"method": "none"}, "report": {"n_boot": 200}},
        "mean": {"name": "mean", "members": {"rule": "top_k", "k": 2}, "combiner": {"type": "mean_prob"},
                 "calibration": {"method": "platt"}, "report": {"n_boot": 200}},
    }
    out = {}
    for name, body in recipes.items():
        (base / f"{name}.yaml").write_text(yaml.safe_dump(body))
        build_ensemble(base / f"{name}.yaml", tiny_sweep["results"], out=base / name)
        out[name] = base / name
    return out


def synth_site(root: Path, *, n: int = 200, seed: int = 21, melanoma_rate: float = 0.4, first_id: int = 200000) -> Path:
    """A second synthetic "site" like :func:`tiny_sweep`'s data (96x72) with other lesions, ids and prevalence."""
    from skinsweep.data.synth import synthesize

    synthesize(root, n, seed=seed, size=(96, 72), melanoma_rate=melanoma_rate, first_id=first_id, workers=1,
               progress=False)
    return root
