"""Embedding cache for linear-probe trials.

A frozen backbone maps each image to the same embedding every epoch and every trial, so linear-probe
trials compute the embeddings of the split's images once per (backbone + weights, data config, image
cache, split) and reuse them from ``$SKINSWEEP_CACHE/embeddings/<key>.npy`` (float32 (N, D), row order
in the ``.json`` sidecar, which is written last and marks a complete entry). Trials of one node that need
the same entry at once compute it once: the first holds a lock (``.<key>.lock``), the others wait and reuse it.

Randomly initialised backbones (``weights: none``) depend on the seed, so the seed is part of the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from skinsweep.data.cache import ImageCache
from skinsweep.files import atomic_path, atomic_write_text, cache_dir, file_lock


def embedding_key(*, backbone_spec: dict, data_config: dict, image_cache_key: str, split_hash: str,
                  seed: int) -> str:
    spec = dict(backbone_spec)
    weights = str(spec.get("weights", ""))
    if Path(weights).is_file():  # a local weights file: its identity is its content stamp
        st = os.stat(weights)
        spec["weights_stamp"] = [st.st_size, st.st_mtime_ns]
    payload = {"backbone": spec, "data": data_config, "images": image_cache_key, "split": split_hash,
               "seed": seed if weights in ("none", "", "None") else None, "v": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_embeddings(
    key: str,
    ids: Sequence[str],
    cache: ImageCache,
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 256,
) -> tuple[np.ndarray, bool]:
    """Embeddings (N, D) float32 for ``ids``, from the cache when present. Returns (array, cache_hit).

    ``embed`` maps a uint8 batch (B, S, S, 3) to features (B, D) (transform + frozen backbone).
    """
    folder = cache_dir() / "embeddings"
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    ids = list(ids)

    def ready() -> np.ndarray | None:
        if data.is_file() and meta.is_file():
            try:
                if json.loads(meta.read_text())["ids"] == ids:
                    return np.load(data, mmap_mode="r")
            except (OSError, ValueError, KeyError):
                return None
        return None

    if (arr := ready()) is not None:
        return arr, True
    # Linear-probe trials of one node starting together: one computes, the others wait and reuse.
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(folder / f".{key}.lock"))
        except OSError:
            pass  # a read-only cache: compute without the lock (and without saving)
        if (arr := ready()) is not None:
            return arr, True
        rows = cache.rows(ids)
        parts = [embed(torch.from_numpy(np.asarray(cache.images[rows[s:s + batch_size]]))).float().cpu().numpy()
                 for s in range(0, len(rows), batch_size)]
        feats = np.concatenate(parts).astype(np.float32)
        try:
            with atomic_path(data) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, feats)
            atomic_write_text(meta, json.dumps({"ids": ids, "shape": list(feats.shape)}))
        except OSError:
            pass  # a read-only or full cache only costs recomputation next time
    return feats, False
