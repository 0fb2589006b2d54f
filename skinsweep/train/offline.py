"""Pretrained weights for clusters without internet: fetch, copy, check.

Many GPU clusters cannot reach the model hubs. On a machine that can::

    skinsweep weights fetch resnet18 dino_vits16 clip_vitb32 --to hf-home   # fetch_weights()

downloads each backbone's pretrained weights into ``hf-home/hub``, an ordinary Hugging Face cache
(``models--<org>--<name>/{blobs,snapshots,refs}``, written by huggingface_hub's own ``hf_hub_download``,
not by us). Copy the folder to the cluster, point ``HF_HOME`` at it and set ``HF_HUB_OFFLINE=1``:
timm and open_clip then find the files where they look, and ``weights: hub`` loads them. ::

    HF_HUB_OFFLINE=1 HF_HOME=/shared/hf-home skinsweep weights check resnet18   # check_weights()

Which files: timm's pretrained config names the hub repo (``hf_hub_id``); timm tries ``model.safetensors``
then ``pytorch_model.bin``. open_clip's tag config names it (``hf_hub``, e.g. the OpenAI CLIP weights in
``timm/vit_base_patch32_clip_224.openai``); open_clip tries ``open_clip_model.safetensors`` then
``open_clip_pytorch_model.bin``. :func:`hub_weights` asks the installed libraries, so a new timm /
open_clip release that moves a file is followed, not hard-coded here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinsweep.errors import BackboneError, first_line, short_list

__all__ = ["HubWeights", "WeightsStatus", "check_weights", "fetch_weights", "hub_cache_dir", "hub_weights"]


@dataclass(frozen=True)
class HubWeights:
    """Where backbone ``backbone``'s pretrained weights live on the Hugging Face Hub."""

    backbone: str
    source: str                 # the timm: / open_clip: name, e.g. "timm:resnet18.tv_in1k"
    repo_id: str                # e.g. "timm/resnet18.tv_in1k"
    revision: str | None        # None: the repo's main branch
    filenames: tuple[str, ...]  # the files the library tries, in its order (safetensors first)


@dataclass(frozen=True)
class WeightsStatus:
    """One row of ``skinsweep weights check``."""

    backbone: str
    repo_id: str
    file: str | None     # the weights file found in the cache, None when missing
    path: str | None     # its path in the cache
    loads: bool | None   # None: not tried (missing, or load=False)
    error: str = ""      # why it did not load

    @property
    def ok(self) -> bool:
        return self.file is not None and self.loads is not False


def hub_weights(name: str) -> HubWeights:
    """The hub repo and candidate files of backbone ``name`` (registered, ``timm:…`` or ``open_clip:…@tag``)."""
    from skinsweep.train.backbones import hub_name

    source = hub_name(name)
    if source is None:
        raise BackboneError(f"backbone {name!r} is a random-init test model without hub weights; "
                            "nothing to fetch (weights='none' needs no files)")
    prefix, _, rest = source.partition(":")
    if prefix == "timm":
        import timm
        from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

        cfg = timm.models.get_pretrained_cfg(rest) if timm.is_model(rest) else None
        if cfg is None or not cfg.hf_hub_id:
            raise BackboneError(f"backbone {name!r}: timm {rest!r} has no weights on the Hugging Face Hub "
                                "(see timm.list_pretrained()); pass weights=PATH to a local file instead")
        repo_id, revision = hf_split(cfg.hf_hub_id)
        # what timm.models._hub.load_state_dict_from_hf tries: the named file, else safetensors then .bin
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
        return HubWeights(name, source, repo_id, revision, files)
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME as OC_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives, get_pretrained_cfg

    arch, _, tag = rest.partition("@")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise BackboneError(f"backbone {name!r} needs a pretrained tag of {arch}: 'open_clip:{arch}@<tag>' "
                            f"with tag one of {short_list(tags, 8)}")
    hf = get_pretrained_cfg(arch, tag).get("hf_hub", "")
    if not hf:
        raise BackboneError(f"backbone {name!r}: open_clip's {arch}@{tag} weights are not on the Hugging Face "
                            "Hub (a plain URL), so they cannot go through the HF cache; download them and pass "
                            "weights=PATH")
    # open_clip's hf_hub is "org/repo/" or "org/repo/file"; download_pretrained_from_hf tries the
    # safetensors alternative of the file first
    repo_id, filename = os.path.split(hf)
    filename = filename or OC_WEIGHTS_NAME
    return HubWeights(name, source, repo_id, None, (*_get_safe_alternatives(filename), filename))


def hub_cache_dir(home: str | Path | None = None) -> Path:
    """The hub cache folder (``models--…`` inside) of HF_HOME-like folder ``home``; None: huggingface_hub's
    own (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``). A ``home`` that already is a hub cache (it holds
    ``models--…`` folders) is used as it is."""
    if home is None:
        import huggingface_hub.constants as hf_constants

        return Path(hf_constants.HF_HUB_CACHE)
    home = Path(home).expanduser()
    if not (home / "hub").is_dir() and any(home.glob("models--*")):
        return home
    return home / "hub"


# ----------------------------------------------------------------------------- fetch


@dataclass(frozen=True)
class Fetched:
    backbone: str
    repo_id: str
    file: str
    path: str
    size: int


def fetch_weights(names: Sequence[str], to: str | Path | None = None, *,
                  download: Callable[..., str] | None = None) -> list[Fetched]:
    """Download the pretrained weights of backbones ``names`` into the HF cache of ``to`` (an HF_HOME-like
    folder; None: this machine's own cache). ``download``: ``huggingface_hub.hf_hub_download`` or a
    stand-in with its signature. Files already in the cache are not downloaded again."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    download = download or hf_hub_download
    wanted = [hub_weights(n) for n in dict.fromkeys(names)]  # every name checked before any download
    cache = hub_cache_dir(to)
    fetched = []
    for w in wanted:
        for filename in w.filenames:
            try:
                path = download(repo_id=w.repo_id, filename=filename, revision=w.revision, cache_dir=str(cache))
            except RemoteEntryNotFoundError:
                # the repo has no such file (huggingface_hub notes that in the cache, so timm / open_clip
                # skip it offline too): try the library's next candidate
                continue
            except (OSError, ValueError) as e:  # unreachable hub, offline mode, unknown repo, disk full
                raise BackboneError(
                    f"could not download the weights of backbone {w.backbone!r} ({w.repo_id}/{filename}) from "
                    f"the Hugging Face Hub ({_why(e)}); run `skinsweep weights fetch {w.backbone} --to DIR` on "
                    "a machine that can reach huggingface.co (or set HF_ENDPOINT to a mirror), copy DIR here "
                    "and use it with HF_HUB_OFFLINE=1 HF_HOME=DIR"
                ) from e
            fetched.append(Fetched(w.backbone, w.repo_id, filename, str(path), Path(path).stat().st_size))
            break
        else:
            raise BackboneError(f"the Hugging Face repo {w.repo_id} of backbone {w.backbone!r} has none of "
                                f"{', '.join(w.filenames)}; is timm / open_clip up to date?")
    return fetched


def _why(e: BaseException) -> str:
    """``LocalEntryNotFoundError from ConnectError``: what failed, without huggingface_hub's paragraphs."""
    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set: unset it to download"
    cause = e.__cause__ or e.__context__
    return type(e).__name__ + (f" from {type(cause).__name__}" if cause is not None else "")


# ----------------------------------------------------------------------------- check


@contextlib.contextmanager
def offline_cache(cache: str | Path | None) -> Iterator[Path]:
    """Within: huggingface_hub (and so timm / open_clip) reads only the hub cache of ``cache`` (see
    :func:`hub_cache_dir`), offline, as a cluster node with ``HF_HUB_OFFLINE=1 HF_HOME=cache`` would."""
    import huggingface_hub.constants as hf_constants

    hub = hub_cache_dir(cache)
    saved = hf_constants.HF_HUB_CACHE, os.environ.get("HF_HUB_OFFLINE")
    hf_constants.HF_HUB_CACHE = str(hub)  # read by hf_hub_download at each call
    os.environ["HF_HUB_OFFLINE"] = "1"    # read by skinsweep.train.weights.hub_download at each call
    try:
        yield hub
    finally:
        hf_constants.HF_HUB_CACHE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def check_weights(names: Sequence[str] | None = None, cache: str | Path | None = None, *,
                  load: bool = True) -> list[WeightsStatus]:
    """For backbones ``names`` (None: every registered one with hub weights): is a weights file in the HF
    cache of ``cache`` (None: this machine's), and does the backbone build from it offline (``load``)?"""
    from huggingface_hub import try_to_load_from_cache

    from skinsweep.train.backbones import create_backbone, hub_name, list_backbones

    if names is None:
        names = [n for n in list_backbones() if hub_name(n) is not None]
    wanted = [hub_weights(n) for n in dict.fromkeys(names)]
    rows = []
    with offline_cache(cache) as hub:
        for w in wanted:
            file = path = None
            for filename in w.filenames:
                # a str is a cached file; None / _CACHED_NO_EXIST mean not there
                found: Any = try_to_load_from_cache(w.repo_id, filename, cache_dir=str(hub), revision=w.revision)
                if isinstance(found, str):
                    file, path = filename, found
                    break
            loads, error = None, ""
            if file is not None and load:
                try:
                    create_backbone(w.backbone, weights="hub")
                    loads = True
                except Exception as e:  # noqa: BLE001
                    # a damaged or mismatched file: timm raises RuntimeError on a strict load, safetensors
                    # its own SafetensorError, torch.load pickle errors...; the check reports each one
                    # rather than stopping at the first
                    loads, error = False, f"{type(e).__name__}: {first_line(e)[:200]}"
            rows.append(WeightsStatus(w.backbone, w.repo_id, file, path, loads, error))
    return rows
