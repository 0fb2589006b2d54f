"""Image cache: every image decoded and resized once, stored as uint8 in one memory-mappable file.

Layout (under ``$SKINSWEEP_CACHE/images/<dataset>-<hash>/``)::

    <policy>-<size>-<key>.u8     raw uint8 array, shape (N, size, size, 3), RGB, row order = ``ids``
    <policy>-<size>-<key>.json   ids, shape, key, policy, size — written last, so it marks a complete cache

The key hashes the dataset's content hash, every file's size and mtime, the size, the resize policy and
the cache version: a changed image, label or setting gives a new key and the cache is rebuilt (the old
file for the same policy and size is removed). Every epoch and every trial on a node reuses one file;
``np.memmap`` keeps it in the page cache, not in each process's heap.

Resize policies:

* ``squash`` (default) — resize the whole frame to size×size, ignoring the aspect ratio: the reference
  study's ``Resize((224, 224))``. Keeps the whole field of view, including lesions near the edge.
* ``center-crop`` — take the centre square (the shorter side), then resize: no distortion, but the
  sides of 4:3 dermoscopy frames are cut.

Both resize with PIL's bicubic filter (antialiased when shrinking).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from skinsweep.data.index import DatasetIndex, map_chunks, read_rgb
from skinsweep.errors import DataError, first_line, short_list
from skinsweep.files import atomic_write_text, cache_dir, dataset_key, file_lock

CACHE_VERSION = 1
POLICIES = ("squash", "center-crop")
DEFAULT_SIZE = 224
DEFAULT_POLICY = "squash"


def decode_resize(path: str | Path, size: int, policy: str = DEFAULT_POLICY) -> np.ndarray:
    """Decode one image and resize it as the cache does. Returns uint8 (size, size, 3)."""
    return resize_like_cache(read_rgb(path), size, policy)


def resize_like_cache(im: Image.Image, size: int, policy: str = DEFAULT_POLICY) -> np.ndarray:
    """An already decoded RGB image, cropped and resized as the cache does. Returns uint8 (size, size, 3)."""
    if policy == "center-crop":
        s = min(im.width, im.height)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


@dataclass
class ImageCache:
    """A built cache: ``images[i]`` is the uint8 (size, size, 3) image of ``ids[i]``."""

    images: np.ndarray
    ids: list[str]
    size: int
    policy: str
    key: str
    path: Path
    built: bool = field(default=False, compare=False)  # True when this call built it (not reused it)

    def __post_init__(self) -> None:
        self._row = {i: r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids`` (DataError naming the first unknown ids)."""
        try:
            return np.fromiter((self._row[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError:
            unknown = [i for i in ids if i not in self._row]
            raise DataError(f"images not in the image cache {self.path.name}: {short_list(unknown)}; "
                            "the split and the cache come from different datasets") from None

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """uint8 (B, size, size, 3) images for ``ids``."""
        return np.asarray(self.images[self.rows(ids)])


def cache_key(index: DatasetIndex, size: int, policy: str) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{index.hash}|{size}|{policy}|".encode())
    for p in index.df["path"]:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _fill_rows(items: list[tuple[int, str]], *, file: str, n: int, size: int, policy: str) -> list[str]:
    """Worker: decode + resize ``items`` (row, path) straight into the memmapped file; return errors."""
    arr = np.memmap(file, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
    errors = []
    for row, path in items:
        try:
            arr[row] = decode_resize(path, size, policy)
        except Exception as e:  # noqa: BLE001 - reported to the user below, with the file name
            errors.append(f"{Path(path).name} ({type(e).__name__})")
    arr.flush()
    del arr
    return errors


def build_cache(
    index: DatasetIndex,
    *,
    size: int = DEFAULT_SIZE,
    policy: str = DEFAULT_POLICY,
    workers: int | None = None,
    progress: bool = False,
    root: str | Path | None = None,
) -> ImageCache:
    """Return the image cache for ``index`` at ``size``/``policy``, building it if missing or stale.

    Args:
        index: the dataset (all its images are cached, whatever the split).
        size: side of the square cached images, in pixels.
        policy: ``squash`` or ``center-crop`` (module docstring).
        workers: decoding processes (default: all cores).
        progress: show a progress bar while building.
        root: cache folder (default ``$SKINSWEEP_CACHE/images/<dataset>``).
    """
    if policy not in POLICIES:
        raise DataError(f"unknown resize policy {policy!r}; use one of {', '.join(POLICIES)}")
    if not isinstance(size, int) or size < 8:
        raise DataError(f"cache size must be an integer ≥ 8 pixels, got {size!r}")
    folder = Path(root) if root else cache_dir() / "images" / dataset_key(index.root)
    key = cache_key(index, size, policy)
    stem = f"{policy}-{size}-{key}"
    data_file, meta_file = folder / f"{stem}.u8", folder / f"{stem}.json"
    ids = index.df["image_id"].astype(str).tolist()
    shape = (len(ids), size, size, 3)

    def ready(built: bool) -> ImageCache | None:
        """The finished cache, when its marker (the .json, written last) says it is complete and current."""
        if meta_file.is_file() and data_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                return None
            if meta.get("ids") == ids and tuple(meta.get("shape", ())) == shape:
                return ImageCache(np.memmap(data_file, dtype=np.uint8, mode="r", shape=shape), ids, size, policy,
                                  key, data_file, built)
        return None

    if (cache := ready(False)) is not None:
        return cache
    with contextlib.ExitStack() as stack:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(folder / f".{policy}-{size}.lock"))
        except OSError as e:
            raise DataError(f"cannot write the image cache in {folder}: {e.strerror}; set SKINSWEEP_CACHE to a "
                            "writable folder") from None
        # One process per node builds; the others (trials starting together) wait here and reuse its cache.
        if (cache := ready(False)) is not None:
            return cache
        _build(index, folder, stem, data_file, meta_file, ids, shape, key, size=size, policy=policy,
               workers=workers, progress=progress)
    return ready(True)


def _build(index: DatasetIndex, folder: Path, stem: str, data_file: Path, meta_file: Path, ids: list[str],
           shape: tuple, key: str, *, size: int, policy: str, workers: int | None, progress: bool) -> None:
    """Decode + resize every image into a temporary file, rename it into place, then write the marker."""
    tmp = folder / f".{stem}.{os.getpid()}.u8.tmp"
    try:
        with open(tmp, "wb") as f:
            # reserve the space now: a full disk is then one ENOSPC here, not a SIGBUS in a decoding worker
            # writing into a sparse memory-mapped file
            try:
                os.posix_fallocate(f.fileno(), 0, int(np.prod(shape)))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                f.truncate(int(np.prod(shape)))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the image cache {tmp}: {e.strerror}; free space there or set "
                        "SKINSWEEP_CACHE to a writable folder with room for it") from None
    try:
        fill = partial(_fill_rows, file=str(tmp), n=len(ids), size=size, policy=policy)
        items = list(enumerate(index.df["path"].astype(str)))
        errors: list[str] = []
        for errs in map_chunks(fill, items, workers=workers, progress=progress,
                                  label=f"caching {len(ids)} images at {size}px ({policy})"):
            errors += errs
        if errors:
            raise DataError(f"{len(errors)} images could not be decoded while caching: {short_list(errors, 3)}; "
                            "they changed since the dataset was checked — re-run `skinsweep data split` "
                            "(add --skip-bad to drop them)")
        os.replace(tmp, data_file)
        for old in folder.glob(f"{policy}-{size}-*"):  # stale caches of the same settings
            if old.name not in (data_file.name, meta_file.name):
                old.unlink(missing_ok=True)
        atomic_write_text(meta_file, json.dumps({"version": CACHE_VERSION, "key": key, "size": size,
                                                 "policy": policy, "shape": list(shape), "dataset": str(index.root),
                                                 "dataset_hash": index.hash, "ids": ids}))
    except OSError as e:  # disk full or unwritable mid-build (a decoding worker's error arrives the same way)
        raise DataError(f"cannot write the image cache {data_file}: {e.strerror or first_line(e)}; free space "
                        "there or set SKINSWEEP_CACHE to a writable folder with room for it, then run again") from None
    finally:
        if tmp.exists():
            tmp.unlink()
