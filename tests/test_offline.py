"""Tests for skinsweep.train.offline and `skinsweep weights`: pretrained weights on clusters without internet.

Nothing is downloaded: the tests write a Hugging Face cache (models--org--name/{blobs,snapshots,refs}) with
random weights saved the way timm and open_clip publish them, then build the backbones from it offline
with weights="hub"; `fetch` runs against a stand-in for hf_hub_download that serves files from a folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from skinsweep.cli import app
from skinsweep.errors import BackboneError
from skinsweep.train.backbones import create_backbone
from skinsweep.train.offline import check_weights, fetch_weights, hub_cache_dir, hub_weights

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def put_in_cache(hub: Path, repo_id: str, filename: str, src: Path) -> Path:
    """Place ``src`` in hub cache ``hub`` as huggingface_hub does: a blob named by its hash, a snapshot
    entry linking to it under a commit, and refs/main naming that commit."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    with open(src, "rb") as f:
        blob = repo / "blobs" / hashlib.file_digest(f, "sha256").hexdigest()
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # 40 hex digits, like a git commit
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, blob)
    entry = repo / "snapshots" / commit / filename
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.unlink(missing_ok=True)
    entry.symlink_to(os.path.relpath(blob, entry.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return entry


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def published_weights(name: str) -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes of what the hub repo of ``name`` holds."""
    torch.manual_seed(123)
    if name == "resnet18":  # timm/resnet18.tv_in1k: the full ImageNet classifier, fc included
        import timm

        return timm.create_model("resnet18").state_dict()
    if name == "dino_vits16":  # timm/vit_small_patch16_224.dino: timm keys, no head
        import timm

        return timm.create_model("vit_small_patch16_224", num_classes=0).state_dict()
    if name == "clip_vitb32":  # open_clip's checkpoint: the whole CLIP model, image tower under visual.
        import open_clip
        from open_clip.model import _build_vision_tower

        cfg = open_clip.get_model_config("ViT-B-32")
        visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=True)
        text = {"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.randn(16, 512),
                "text_projection": torch.randn(512, 512)}  # (a stand-in for the text tower: ignored)
        return {**{f"visual.{k}": v for k, v in visual.state_dict().items()}, **text}
    raise ValueError(name)


def write_cache(hub: Path, name: str, filename: str, tmp: Path) -> dict[str, torch.Tensor]:
    """Random published weights of backbone ``name`` as ``filename`` in hub cache ``hub``; returns them."""
    state = published_weights(name)
    src = _save(state, tmp / "src" / name / filename)
    put_in_cache(hub, hub_weights(name).repo_id, filename, src)
    return state


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty HF_HOME, as on a cluster node started with them; yields HF_HOME."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub reads HF_HOME at import; this is what it derives from it
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


# ----------------------------------------------------------------------------- where the weights live


@pytest.mark.parametrize("name, repo_id, first", [
    ("resnet18", "timm/resnet18.tv_in1k", "model.safetensors"),
    ("dino_vits16", "timm/vit_small_patch16_224.dino", "model.safetensors"),
    ("clip_vitb32", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
    ("timm:resnet10t.c3_in1k", "timm/resnet10t.c3_in1k", "model.safetensors"),
    ("open_clip:ViT-B-32@openai", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
])
def test_hub_weights_names_the_repo_and_files_the_libraries_use(name, repo_id, first):
    w = hub_weights(name)
    assert (w.repo_id, w.filenames[0]) == (repo_id, first)
    assert w.filenames[-1] in ("pytorch_model.bin", "open_clip_pytorch_model.bin")


@pytest.mark.parametrize("name, message", [
    ("resnet81", r"unknown backbone 'resnet81' \(did you mean resnet18"),
    ("tiny_vit", r"random-init test model without hub weights"),
    ("open_clip:ViT-B-32", r"needs a pretrained tag of ViT-B-32"),
])
def test_hub_weights_errors(name, message):
    with pytest.raises(BackboneError, match=message):
        hub_weights(name)


def test_hub_cache_dir_is_home_hub_unless_given_a_hub_cache(tmp_path):
    assert hub_cache_dir(tmp_path / "new") == tmp_path / "new" / "hub"
    (tmp_path / "cache" / "models--timm--x").mkdir(parents=True)
    assert hub_cache_dir(tmp_path / "cache") == tmp_path / "cache"


# ----------------------------------------------------------------------------- success path: load offline


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, filename, prefix", [
    ("resnet18", "model.safetensors", ""),
    ("dino_vits16", "pytorch_model.bin", ""),  # no safetensors in the cache: timm falls back to the .bin
    ("clip_vitb32", "open_clip_pytorch_model.bin", "visual."),  # ViT-B/32 image tower, 88M: ~4-11 s
])
def test_weights_hub_loads_the_cached_files_offline(offline, tmp_path, name, filename, prefix):
    written = write_cache(offline / "hub", name, filename, tmp_path)
    bb = create_backbone(name, weights="hub")
    loaded = bb.model.state_dict()
    assert len(loaded) > 40
    for key, value in loaded.items():
        assert torch.equal(value, written[prefix + key]), key
    # and the cache is what `weights check` finds
    [row] = check_weights([name], offline, load=False)
    assert (row.file, row.loads) == (filename, None) and row.path.endswith(filename)


def test_weights_hub_without_the_cache_still_fails_in_one_line(offline):
    with pytest.raises(BackboneError, match=r"backbone 'resnet18' .*HF_HUB_OFFLINE is set"):
        create_backbone("resnet18", weights="hub")


# ----------------------------------------------------------------------------- check


def test_check_reports_present_missing_and_broken(offline, tmp_path):
    hub = offline / "hub"
    write_cache(hub, "resnet18", "model.safetensors", tmp_path)
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"not a safetensors file")
    put_in_cache(hub, hub_weights("efficientnet_b0").repo_id, "model.safetensors", bad)

    r = runner.invoke(app, ["weights", "check", "resnet18", "--cache", str(offline)])
    assert r.exit_code == 0, r.output
    assert re.search(r"resnet18 .*timm/resnet18\.tv_in1k .*model\.safetensors .*yes", r.output)

    r = runner.invoke(app, ["weights", "check", "resnet18", "dino_vits16", "--cache", str(offline)])
    assert r.exit_code == 1
    assert re.search(r"dino_vits16 .*missing", r.output)
    assert "skinsweep weights fetch dino_vits16 --to DIR" in r.output

    rows = {row.backbone: row for row in check_weights(None, offline)}  # every registered backbone
    assert {"resnet18", "dino_vits16", "clip_vitb32"} <= set(rows) and "tiny_vit" not in rows
    assert rows["resnet18"].ok and rows["resnet18"].loads
    assert not rows["dino_vits16"].ok and rows["dino_vits16"].loads is None
    assert rows["efficientnet_b0"].loads is False and rows["efficientnet_b0"].error
    r = runner.invoke(app, ["weights", "check", "--cache", str(offline)])
    assert r.exit_code == 1 and "does not load: efficientnet_b0" in r.output


def test_check_unknown_backbone_is_one_line_with_a_suggestion(offline):
    r = runner.invoke(app, ["weights", "check", "resnet81", "--cache", str(offline)])
    assert r.exit_code == 2
    assert "error: unknown backbone 'resnet81' (did you mean resnet18" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow  # a fresh interpreter: ~5 s of imports
@pytest.mark.timeout(120)
def test_documented_env_vars_work_in_a_fresh_process(tmp_path):
    """`HF_HUB_OFFLINE=1 HF_HOME=DIR skinsweep weights check`: huggingface_hub reads them at import."""
    home = tmp_path / "hf-home"
    write_cache(home / "hub", "resnet18", "model.safetensors", tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "COLUMNS": "200"}
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run([sys.executable, "-m", "skinsweep.cli", "weights", "check", "resnet18"], env=env,
                       capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"resnet18 .*model\.safetensors .*yes", p.stdout)


# ----------------------------------------------------------------------------- fetch


def serve_from(folder: Path):
    """A stand-in for huggingface_hub.hf_hub_download that serves ``folder/<repo_id>/<filename>`` into the
    cache, and says 404 (RemoteEntryNotFoundError, as the hub does) for files the folder lacks."""
    from huggingface_hub.errors import RemoteEntryNotFoundError, Response

    http = sys.modules[Response.__module__.partition(".")[0]]  # the HTTP client huggingface_hub uses
    calls = []

    def download(repo_id: str, filename: str, *, revision=None, cache_dir=None, **kw) -> str:
        calls.append((repo_id, filename))
        src = folder / repo_id / filename
        if not src.is_file():
            raise RemoteEntryNotFoundError(f"404 Client Error: Entry Not Found for {repo_id}/{filename}",
                                           response=Response(404, request=http.Request("HEAD", f"https://huggingface.co/{repo_id}/resolve/main/{filename}")))
        return str(put_in_cache(Path(cache_dir), repo_id, filename, src))

    download.calls = calls
    return download


def test_fetch_then_check_offline(offline, tmp_path, monkeypatch):
    import huggingface_hub

    remote = tmp_path / "remote"  # resnet18's repo with only the .bin, as some older repos
    _save(published_weights("resnet18"), remote / "timm/resnet18.tv_in1k" / "pytorch_model.bin")
    download = serve_from(remote)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    dest = tmp_path / "to-copy"

    r = runner.invoke(app, ["weights", "fetch", "resnet18", "--to", str(dest)])
    assert r.exit_code == 0, r.output
    assert download.calls == [("timm/resnet18.tv_in1k", "model.safetensors"),
                              ("timm/resnet18.tv_in1k", "pytorch_model.bin")]
    assert "HF_HUB_OFFLINE=1 HF_HOME=" in r.output
    copied = tmp_path / "cluster" / "hf-home"  # the folder, copied to a cluster node
    shutil.copytree(dest, copied, symlinks=True)

    r = runner.invoke(app, ["weights", "check", "resnet18", "--cache", str(copied)])
    assert r.exit_code == 0, r.output
    assert re.search(r"resnet18 .*pytorch_model\.bin .*yes", r.output)


def test_fetch_names_are_checked_before_downloading(tmp_path):
    download = serve_from(tmp_path)
    with pytest.raises(BackboneError, match=r"unknown backbone 'dino_vit16' \(did you mean dino_vits16"):
        fetch_weights(["resnet18", "dino_vit16"], tmp_path / "to", download=download)
    assert download.calls == []


def test_fetch_repo_without_the_files_says_so(tmp_path):
    with pytest.raises(BackboneError, match=r"timm/resnet18\.tv_in1k of backbone 'resnet18' has none of "
                                            r"model\.safetensors, pytorch_model\.bin"):
        fetch_weights(["resnet18"], tmp_path / "to", download=serve_from(tmp_path / "empty"))


@pytest.mark.timeout(120)
def test_fetch_from_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    """The real hf_hub_download against an endpoint nobody listens on (connection refused)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    dead = "http://127.0.0.1:9"  # hf_hub_download builds its URLs from these two, set at import from HF_ENDPOINT
    monkeypatch.setattr(hf_constants, "ENDPOINT", dead)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # its 5 retries would wait ~23 s
    r = runner.invoke(app, ["weights", "fetch", "clip_vitb32", "--to", str(tmp_path / "to")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: could not download the weights of backbone 'clip_vitb32' "
                               "(timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors)")
    assert "skinsweep weights fetch clip_vitb32 --to DIR` on a machine that can reach huggingface.co" in lines[0]
    assert "HF_HUB_OFFLINE=1 HF_HOME=DIR" in lines[0] and "ConnectError" in lines[0]
