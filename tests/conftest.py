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


@pytest.fixture
def s3(monkeypatch):
    """An S3 server on loopback with an empty bucket ``sweeps``; the AWS_* environment points at it (Ray's
    workers inherit it). Returns a pyarrow S3FileSystem on it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import urllib.request

    import boto3
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    # moto keeps its buckets in process-wide state: start every test from an empty server
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=10)
    boto3.client("s3").create_bucket(Bucket="sweeps")
    yield pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                            secret_key="testing", region="us-east-1")
    server.stop()
