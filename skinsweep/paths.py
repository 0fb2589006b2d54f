"""Default locations for derived artefacts (split manifests, image and embedding caches).

Datasets often sit on read-only shared storage, so nothing is ever written into the dataset folder.
Derived files go under the skinsweep cache directory:

* ``$SKINSWEEP_CACHE`` if set, else
* ``$XDG_CACHE_HOME/skinsweep`` if ``XDG_CACHE_HOME`` is set, else
* ``~/.cache/skinsweep``.

On a Ray cluster each node resolves this for itself, so each node builds its own image cache once.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def cache_dir() -> Path:
    """Root of skinsweep's cache (see module docstring for how it is chosen)."""
    env = os.environ.get("SKINSWEEP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "skinsweep"


def dataset_key(root: str | Path) -> str:
    """A readable, collision-safe folder name for a dataset root: ``<name>-<8 hex of abs path>``."""
    root = Path(root).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name) or "dataset"
    return f"{name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
