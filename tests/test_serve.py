"""The HTTP service (``skinsweep serve``): scores equal ``skinsweep predict``'s, bad requests get 4xx JSON
naming the problem and the file while the service keeps serving, the model card, the CLI's one-line
errors, and the web page in a real headless browser.

Ray Serve starts once for the module (two applications: the tiny ``stack`` bundle at ``/`` and a bundle
whose stacker uses age/sex/site at ``/meta``) and is shut down after it.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

requests = pytest.importorskip("requests")

MAX_FILES = 8
MAX_UPLOAD_MB = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundles(tiny_ensembles):
    """{"stack": bundle of conftest's stacked tiny_vit + tiny_clip (no metadata)}; see :func:`meta_bundle`."""
    return {"stack": tiny_ensembles["stack"] / "bundle"}


@pytest.fixture(scope="module")
def meta_bundle(tiny_sweep, tmp_path_factory) -> Path:
    """The same members as ``stack``, stacked with age, sex and site."""
    import os

    import yaml

    from skinsweep.ensemble.build import build_ensemble

    os.environ["SKINSWEEP_CACHE"] = str(tiny_sweep["cache"])
    base = tmp_path_factory.mktemp("serve-meta")
    (base / "meta.yaml").write_text(yaml.safe_dump({
        "name": "meta", "members": {"rule": "best_per_backbone", "backbones": ["tiny_vit", "tiny_clip"]},
        "combiner": {"type": "stacking", "metadata": ["age", "sex", "site"]}, "report": {"n_boot": 100}}))
    build_ensemble(base / "meta.yaml", tiny_sweep["results"], out=base / "meta")
    return base / "meta" / "bundle"


@pytest.fixture(scope="module")
def images(tiny_sweep) -> list[Path]:
    """Six JPEGs of the tiny sweep's dataset (96x72)."""
    return sorted((tiny_sweep["data"] / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def server(bundles, meta_bundle):
    """Serve on a free loopback port: ``stack`` at /, ``meta`` at /meta; torn down (Serve and Ray) after."""
    from skinsweep.serve.app import ServeConfig, deploy, start, stop

    cfg = ServeConfig(bundle=bundles["stack"], port=free_port(), max_files=MAX_FILES, max_upload_mb=MAX_UPLOAD_MB,
                      cpus_per_replica=0.5, max_batch=8)
    import ray

    ray_before = ray.is_initialized()
    running = start(cfg)
    try:
        deploy(ServeConfig(bundle=meta_bundle, port=cfg.port, max_files=MAX_FILES, max_upload_mb=MAX_UPLOAD_MB,
                           cpus_per_replica=0.5), name="meta", route_prefix="/meta")
        yield running.url
    finally:
        stop(running)
    assert ray.is_initialized() == ray_before  # the Ray it started is gone


def post(url: str, files: list, data=None, params=None, **kw) -> requests.Response:
    return requests.post(f"{url}/v1/predict", files=files, data=data, params=params, timeout=60, **kw)


def part(path: Path, name: str | None = None, ctype: str = "image/jpeg"):
    return ("files", (name or path.name, path.read_bytes(), ctype))


def png_bytes(size=(40, 30), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_cli_more_replicas_than_cpus_is_one_line(bundles):
    """Serve would wait forever for CPUs it cannot get; the command says so, and leaves no Ray behind.
    (First in the module: it needs a process without Ray, before the ``server`` fixture starts one.)"""
    import ray
    from typer.testing import CliRunner

    from skinsweep.cli import app

    if ray.is_initialized():
        pytest.skip("a Ray instance of another test is running in this process")
    r = CliRunner().invoke(app, ["serve", str(bundles["stack"]), "--port", str(free_port()), "--replicas", "1000"])
    line = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(line) == 1 and "--replicas 1000 × --cpus-per-replica 1 needs 1000 CPUs" in line[0]
    assert not ray.is_initialized()


# ---- scores ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scores_equal_skinsweep_predict(server, bundles, images):
    from skinsweep.ensemble.bundle import bundle_hash, load_bundle, predict_files

    b = load_bundle(bundles["stack"])
    offline = predict_files(b, images)
    r = post(server, [part(p) for p in images])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle"] == b.meta["name"] == "stack" and body["bundle_hash"] == bundle_hash(bundles["stack"])
    assert [res["file"] for res in body["results"]] == [p.name for p in images]
    for res, (_, row) in zip(body["results"], offline.iterrows()):
        assert res["calibrated_prob"] == pytest.approx(row["calibrated_prob"], abs=1e-6)
        assert res["ensemble_prob"] == pytest.approx(row["ensemble_prob"], abs=1e-6)
        assert res["decision"] == row["decision"]
        assert {m["trial_id"]: m["prob"] for m in res["members"]} == pytest.approx(
            {m: row[f"prob_{m}"] for m in b.member_ids}, abs=1e-6)
        assert res["threshold"] == b.threshold and res["threshold_rule"] == b.meta["threshold_rule"]
        assert res["bundle_hash"] == body["bundle_hash"] and (res["width"], res["height"]) == (96, 72)
    # concurrent callers (batched together on the replica) get the same numbers as one caller alone
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        many = list(pool.map(lambda p: post(server, [part(p)]).json()["results"][0], images))
    np.testing.assert_allclose([m["calibrated_prob"] for m in many], offline["calibrated_prob"], atol=1e-6)


def test_decode_bytes_is_the_file_decode(images, tmp_path):
    """The service's bytes path decodes exactly as the file path does, EXIF rotation and modes included."""
    from skinsweep.data.cache import decode_resize, resize_like_cache
    from skinsweep.ensemble.bundle import decode_bytes

    rotated = tmp_path / "rot.jpg"
    with Image.open(images[0]) as im:
        exif = im.getexif()
        exif[0x0112] = 6  # orientation: rotate 90°
        im.convert("CMYK").save(rotated, exif=exif)
    for p in [*images[:2], rotated]:
        for policy in ("squash", "center-crop"):
            np.testing.assert_array_equal(resize_like_cache(decode_bytes(p.read_bytes()), 32, policy),
                                          decode_resize(p, 32, policy))


def test_bundle_scores_bytes_and_decodes_as_it_scores_files(bundles, images):
    from skinsweep.ensemble.bundle import Decoded, decode_bytes, load_bundle

    b = load_bundle(bundles["stack"])
    cols = ["ensemble_prob", "calibrated_prob", "decision", *(f"prob_{m}" for m in b.member_ids)]
    files = b.predict([str(p) for p in images])[cols]
    pd.testing.assert_frame_equal(b.predict([p.read_bytes() for p in images])[cols], files)
    pd.testing.assert_frame_equal(b.predict([Decoded(decode_bytes(p.read_bytes())) for p in images])[cols], files)


@pytest.mark.slow
def test_metadata_bundle_over_http(server, meta_bundle, images, tiny_sweep):
    from skinsweep.ensemble.bundle import load_bundle, predict_files

    meta = pd.read_csv(tiny_sweep["data"] / "HAM10000_metadata.csv").set_index("image_id")
    rows = meta.loc[[p.stem for p in images[:3]]]
    offline = predict_files(load_bundle(meta_bundle), images[:3], metadata=rows.reset_index())
    data = {"age": [str(a) for a in rows["age"]], "sex": list(rows["sex"]), "localization": list(rows["localization"])}
    r = requests.post(f"{server}/meta/v1/predict", files=[part(p) for p in images[:3]], data=data, timeout=60)
    assert r.status_code == 200, r.text
    got = [res["calibrated_prob"] for res in r.json()["results"]]
    np.testing.assert_allclose(got, offline["calibrated_prob"], atol=1e-6)
    assert r.json()["results"][0]["metadata"]["localization"] == rows["localization"].iloc[0]
    # the metadata are needed: without them, 422 naming the field; a bad value names the file
    r = requests.post(f"{server}/meta/v1/predict", files=[part(p) for p in images[:2]], timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_metadata"
    assert "'age'" in r.json()["error"]["message"] and r.json()["error"]["file"] == images[0].name
    bad = {**{k: v[:2] for k, v in data.items()}, "age": ["40", "forty"]}
    r = requests.post(f"{server}/meta/v1/predict", files=[part(p) for p in images[:2]], data=bad, timeout=60)
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "bad_metadata", "file": images[1].name,
        "message": f"{images[1].name}: age 'forty' is not a number of years between 0 and 130 (or empty for unknown)"}
    assert requests.get(f"{server}/meta/healthz", timeout=10).json()["metadata_features"] == ["age", "sex", "site"]


# ---- bad requests ---------------------------------------------------------------------------------
def huge_png() -> bytes:
    """A few KB of PNG that would decode to 9,000 x 9,000 pixels (81 MP)."""
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _truncated(images) -> bytes:
    data = images[0].read_bytes()
    return data[: len(data) // 2]


BAD = {  # name -> (files or raw body builder, expected status, code, file named in the error)
    "not an image": (lambda im: [("files", ("notes.jpg", b"hello, not a picture", "image/jpeg"))], 400, "not_an_image", "notes.jpg"),
    "truncated JPEG": (lambda im: [("files", ("half.jpg", _truncated(im), "image/jpeg"))], 400, "corrupt_image", "half.jpg"),
    "empty upload": (lambda im: [part(im[0]), ("files", ("empty.jpg", b"", "image/jpeg"))], 400, "empty_file", "empty.jpg"),
    "over --max-upload-mb": (lambda im: [("files", ("big.png", png_bytes((300, 300)), "image/png"))], 413, "file_too_large", "big.png"),
    "too many files": (lambda im: [part(im[0])] * (MAX_FILES + 1), 413, "too_many_files", None),
    "far too many files": (lambda im: [part(im[0])] * 40, 413, "too_many_files", None),
    "too many pixels": (lambda im: [("files", ("huge.png", huge_png(), "image/png"))], 413, "image_too_large", "huge.png"),
    "text part": (lambda im: [("files", ("a.txt", b"plain text", "text/plain"))], 415, "unsupported_media_type", "a.txt"),
    "no files": (lambda im: [("age", (None, "40"))], 400, "no_files", None),
    "unknown field": (lambda im: [part(im[0]), ("colour", (None, "red"))], 400, "unknown_field", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_4xx_and_the_service_keeps_serving(server, images, case):
    build, status, code, file = BAD[case]
    r = post(server, build(images))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["file"] == file and err["message"]
    if file:
        assert file in err["message"]
    ok = post(server, [part(images[0])])
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1


@pytest.mark.slow
def test_wrong_request_content_type(server):
    r = requests.post(f"{server}/v1/predict", json={"image": "x"}, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "multipart/form-data" in r.json()["error"]["message"]
    r = requests.post(f"{server}/v1/predict?explain=maybe", files=[("files", ("a.png", png_bytes(), "image/png"))],
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_field"


@pytest.mark.slow
def test_client_file_names_are_labels_never_paths(server, images, tmp_path):
    """A file name that points at a server file is only echoed back (base name): the upload's bytes are
    what gets scored, and nothing is written where the name points."""
    target = tmp_path / "written-by-client.jpg"
    r = post(server, [part(images[0], name=str(target)), part(images[0], name="../../etc/passwd"),
                      part(images[0], name="/etc/hostname")])
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["file"] for x in res] == ["written-by-client.jpg", "passwd", "hostname"]
    probs = [x["calibrated_prob"] for x in res]
    assert max(probs) - min(probs) < 1e-6 and not target.exists()  # (batches of other sizes: float32 noise)


# ---- explain, info, health, docs, page -------------------------------------------------------------
@pytest.mark.slow
def test_explain_adds_a_heat_map_per_member(server, images):
    r = post(server, [part(images[0]), part(images[1])], params={"explain": "true"})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        maps = res["heatmaps"]
        assert [m["trial_id"] for m in maps] == [m["trial_id"] for m in res["members"]]
        import base64

        with Image.open(io.BytesIO(base64.b64decode(maps[0]["png_base64"]))) as im:
            assert im.format == "PNG" and im.size == (96, 72)
    assert "heatmaps" not in post(server, [part(images[0])]).json()["results"][0]


@pytest.mark.slow
def test_info_health_docs_and_page(server, bundles):
    from skinsweep.ensemble.bundle import bundle_hash, load_bundle

    card = requests.get(f"{server}/v1/info", timeout=10).json()
    # the tiny test bundles have cards (built by export_bundle); what a card says is tested in test_model_card
    assert card["generated_by"]["minimal"] is False and card["name"] == "stack" and len(card["members"]) == 2
    assert card["operating_point"]["threshold"] == pytest.approx(load_bundle(bundles["stack"]).threshold)
    assert card["bundle_hash"] == bundle_hash(bundles["stack"])
    h = requests.get(f"{server}/healthz", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ready" and h.json()["bundle"] == "stack"
    spec = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert "swagger" in requests.get(f"{server}/docs", timeout=10).text.lower()
    page = requests.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and "not a diagnostic device" in page.text


def test_model_card_json_is_served_when_the_bundle_has_one(bundles, tmp_path):
    from skinsweep.ensemble.bundle import bundle_hash, load_bundle, write_manifest
    from skinsweep.serve.service import Scorer

    b = tmp_path / "bundle"
    shutil.copytree(bundles["stack"], b)
    card = {"name": "stack", "intended_use": "research", "limitations": ["synthetic"]}
    (b / "model_card.json").write_text(json.dumps(card))
    write_manifest(b)
    served = Scorer(load_bundle(b)).info()
    assert served == {**card, "bundle_hash": bundle_hash(b)}
    # a bundle built before model cards: the minimal card from bundle.json
    (b / "model_card.json").unlink()
    (b / "MODEL_CARD.md").unlink(missing_ok=True)
    write_manifest(b)
    minimal = Scorer(load_bundle(b)).info()
    assert minimal["generated_by"]["minimal"] is True and minimal["name"] == "stack"


# ---- CLI --------------------------------------------------------------------------------------------
def _one_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_cli_bad_input_is_one_line(bundles, tmp_path):
    from typer.testing import CliRunner

    from skinsweep.cli import app

    run = CliRunner().invoke
    assert "no such bundle folder" in _one_line(run(app, ["serve", str(tmp_path / "nope")]))
    assert "not a skinsweep bundle" in _one_line(run(app, ["serve", str(tmp_path)]))
    with socket.socket() as s:  # a port somebody else listens on
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line(run(app, ["serve", str(bundles["stack"]), "--port", str(port)]))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    assert "--max-batch 0: must be at least 1" in _one_line(run(app, ["serve", str(bundles["stack"]), "--max-batch", "0"]))


# ---- the page in a real browser --------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium() -> str:
    """The system chromium (Debian's package), installed with apt-get when missing and we are root."""
    import os
    import subprocess

    pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):  # `make test` normally did this already
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            try:
                subprocess.run(cmd, env=env, timeout=300, check=False, capture_output=True)
            except subprocess.TimeoutExpired:
                break
            if shutil.which("chromium"):
                break
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium: install Debian's chromium package (apt-get install chromium)")
    return exe


@pytest.mark.slow
def test_page_in_a_browser_shows_the_apis_result(server, images, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    api = post(server, [part(images[2])], params={"explain": "true"}).json()["results"][0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{server}/")
            assert "not a diagnostic device" in page.inner_text("#notice")
            page.wait_for_selector("#card-table tr[data-key=intended_use]")
            page.set_input_files("#files", str(images[2]))
            page.check("#explain")
            page.click("#score")
            page.wait_for_selector(".result", timeout=60_000)
            res = page.locator(".result")
            assert res.get_attribute("data-file") == images[2].name
            value = lambda sel: res.locator(sel).get_attribute("data-value")  # noqa: E731
            assert float(value(".calibrated")) == api["calibrated_prob"]
            assert res.locator(".calibrated").inner_text() == f"{api['calibrated_prob']:.4f}"
            assert float(value(".ensemble")) == api["ensemble_prob"]
            assert float(value(".threshold")) == api["threshold"]
            assert int(value(".decision")) == api["decision"]
            assert res.locator(".decision").inner_text() == api["decision_label"]
            shown = {r.get_attribute("data-trial"): float(r.locator(".member-prob").get_attribute("data-value"))
                     for r in res.locator("tr.member").all()}
            assert shown == {m["trial_id"]: m["prob"] for m in api["members"]}
            assert res.locator("img.heatmap").count() == len(api["members"])
            # a bad file shows the service's error and the page keeps working
            bad = tmp_path / "LICENSE.txt"
            bad.write_text("not an image")
            page.set_input_files("#files", str(bad))
            page.click("#score")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "LICENSE.txt" in page.inner_text("#error")
        finally:
            browser.close()
