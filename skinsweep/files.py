"""Where derived files go, and how they are written.

Datasets often sit on read-only shared storage, so nothing is ever written into the dataset folder.
Derived files (split manifests, image and embedding caches) go under the skinsweep cache directory:

* ``$SKINSWEEP_CACHE`` if set, else
* ``$XDG_CACHE_HOME/skinsweep`` if ``XDG_CACHE_HOME`` is set, else
* ``~/.cache/skinsweep``.

On a Ray cluster each node resolves this for itself, so each node builds its own image cache once.
Every write is atomic: a crash never leaves a half-written file that a reader trips on. A cache entry
that several processes of a node may need at once (image cache, embeddings, default split manifest) is
built under :func:`file_lock`: the first process builds it, the others wait, then find it and reuse it.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def read_parquet_once(path: str | Path, columns: list[str] | None = None):
    """Read a Parquet file (or only its schema, ``columns=[]``) through ONE open file handle.

    Written by hand because ``pyarrow.parquet.read_table(path)`` opens a local path more than once
    (dataset discovery reads the footer, the scan opens the file again): when a writer renames a new
    version over the file in between, the old footer is applied to the new bytes ("Page was smaller
    than expected", "Couldn't deserialize thrift"). Through one handle a reader sees one whole
    version — the one it opened — however often the file is replaced (``benchmarks/bench_reader_race.py``:
    against a writer replacing the file in a loop, 1,818 of 9,718 path reads failed, 0 of 7,115 handle reads).
    """
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_parquet_schema_once(path: str | Path):
    """The schema (with metadata) of a Parquet file, read through one handle (see :func:`read_parquet_once`)."""
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        return pq.read_schema(f)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write to; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (POSIX ``flock``) on ``path`` (created, kept) until the block ends.

    Used as "build once per node": check for the finished file, else take the lock, check again (another
    process may have built it while this one waited), build, release. The lock goes with the process, so a
    killed builder never leaves it held. Lock files live next to what they guard (a node-local cache).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(o: Any) -> Any:
    """Make ``o`` strict-JSON-able: NaN/inf → None (JSON has neither), numpy scalars and arrays → Python."""
    import numpy as np

    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, (np.floating, float)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def read_json(path: str | Path) -> dict:
    """A JSON file's object, or ``{}`` when the file is missing or not valid JSON (a store's optional
    bookkeeping files: a missing one means "nothing recorded yet")."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
