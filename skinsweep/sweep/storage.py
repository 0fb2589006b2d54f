"""Where a sweep's outputs live: a local / shared (NFS) path, or an object store (``s3://…``) via pyarrow.fs.

With a path, ``<storage>/<name>/`` *is* the results store: Ray Tune's state, each trial's checkpoint and
the Parquet store side by side, written in place.

With an object-store URI (anything ``pyarrow.fs.FileSystem.from_uri`` understands: ``s3://bucket/prefix``,
``gs://…``, also ``s3://bucket/prefix?endpoint_override=host:port&scheme=http``), Ray Tune writes its state
and every trial's checkpoint to ``<storage>/<name>/`` directly (``RunConfig(storage_filesystem=…)``). The
Parquet store needs a local disk (``flock``, atomic renames, DuckDB), so the driver builds it in a local
working copy (``--results-dir``, default ``results/<name>``) — what ``skinsweep results`` and ensembles
read — and :func:`mirror` copies it to ``<storage>/<name>/`` after every consolidated trial and at the end.
Object stores replace an object whole, so a reader of the mirror sees an old or a new file, never half of
one; predictions files go up before ``trials.parquet``, as in the local store.

Credentials and endpoints come from the usual places of the filesystem's SDK (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, instance roles;
``AWS_ENDPOINT_URL`` or ``?endpoint_override=`` for MinIO, Ceph and other S3-compatible servers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from skinsweep.errors import ConfigError, first_line
from skinsweep.files import atomic_path, atomic_write_text, read_json
from skinsweep.results import HISTORY_DIR, PREDICTIONS_DIR, SWEEP_JSON, TRIALS

# The Parquet store's files that the mirror holds (Ray Tune's own state and checkpoints are already there).
STORE_FILES = ("split.parquet", SWEEP_JSON, "budget.json", "optuna.journal")  # mirrored and pulled with the store
PER_TRIAL_DIRS = (PREDICTIONS_DIR, HISTORY_DIR)  # one <trial_id>.parquet per trial in each
CHECKPOINTS_DIR = "checkpoints"   # local copies of remote checkpoints (what bundles are built from)
_MIRRORED = ".mirrored.json"      # {relative path: [size, mtime_ns]} of what the last mirror uploaded


@dataclass(frozen=True)
class Remote:
    """A sweep folder ``<storage>/<name>`` in an object store.

    Attributes:
        uri: the folder as a URI (``s3://bucket/prefix/name``), for messages and the ``checkpoint_uri`` column.
        fs: the pyarrow filesystem (picklable; credentials from the environment are not pickled).
        path: the folder on ``fs`` (``bucket/prefix/name``).
    """

    uri: str
    fs: object
    path: str
    scheme: str

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def uri_of(self, fs_path: str) -> str:
        return f"{self.scheme}://{fs_path.lstrip('/')}"

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.join(rel)).type != pafs.FileType.NotFound


def remote_sweep(storage: str, name: str) -> Remote | None:
    """The object-store folder of sweep ``name``, or None when ``storage`` is a plain path."""
    if "://" not in str(storage):
        return None
    import pyarrow as pa
    import pyarrow.fs as pafs

    scheme = storage.split("://", 1)[0].lower()
    if scheme == "file":
        raise ConfigError(f"storage {storage!r}: write a local path without file:// "
                          f"(e.g. --set storage={storage.split('://', 1)[1] or '/'})")
    try:
        fs, base = pafs.FileSystem.from_uri(storage)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise ConfigError(f"storage {storage!r} is not a usable filesystem URI ({first_line(e)}); use a local "
                          "path or an object-store URI such as s3://bucket/prefix") from None
    base = base.rstrip("/")
    if not base:
        raise ConfigError(f"storage {storage!r} names no bucket; use s3://BUCKET[/prefix]")
    path = f"{base}/{name}"
    return Remote(uri=f"{scheme}://{path}", fs=fs, path=path, scheme=scheme)


def check_writable(remote: Remote) -> None:
    """Write and delete a marker object in the sweep folder; a one-line ConfigError when that fails."""
    import pyarrow as pa

    marker = remote.join(".skinsweep-write-test")
    try:
        remote.fs.create_dir(remote.path, recursive=True)
        with remote.fs.open_output_stream(marker) as f:
            f.write(b"ok")
        remote.fs.delete_file(marker)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"storage {remote.uri} is not writable ({first_line(e)[:240]}); check the bucket name, "
                          "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws) and the endpoint "
                          "(AWS_ENDPOINT_URL), or use --set storage=PATH for a local folder") from None


def store_files(local: Path) -> list[str]:
    """The store's files that the mirror holds, relative to ``local``, in upload order: per-trial files first,
    then the store-level files, ``trials.parquet`` last (it names the predictions files)."""
    local = Path(local)
    files = [f"{d}/{p.name}" for d in PER_TRIAL_DIRS for p in sorted((local / d).glob("*.parquet"))
             if not p.name.startswith(".")]
    files += [f for f in STORE_FILES if (local / f).is_file()]
    return files + ([TRIALS] if (local / TRIALS).is_file() else [])


def pending(local: Path) -> list[str]:
    """The store's files that changed since the last mirror recorded them (what the next mirror uploads)."""
    local = Path(local)
    done = read_json(local / _MIRRORED)
    out = []
    for rel in store_files(local):
        try:
            st = (local / rel).stat()
        except FileNotFoundError:  # removed since listed (a resumed sweep dropped the trial)
            continue
        if done.get(rel) != [st.st_size, st.st_mtime_ns]:
            out.append(rel)
    return out


def mirror(local: Path, remote: Remote, *, check_remote: bool = False) -> int:
    """Copy the local Parquet store to ``remote``: changed files only, predictions before ``trials.parquet``.

    Remote predictions / history files whose trial is no longer in the local store are deleted (as the
    local store deletes them). Returns the number of files uploaded. Safe while the store is being written:
    ``trials.parquet`` is taken first (a hard link to the current version), the predictions listed after it,
    so the uploaded table never names a predictions file that was not uploaded before it. A pass that fails
    part-way records what it did upload, so the next pass (or ``skinsweep results sync``) sends only the rest.
    """
    import pyarrow.fs as pafs

    local = Path(local)
    done = read_json(local / _MIRRORED)
    record = dict(done)
    there = _remote_sizes(remote, store_files(local)) if check_remote else None
    snapshot = _snapshot(local / TRIALS)  # before listing the predictions: every trial it names has its file
    uploaded = 0
    try:
        files = [f for f in store_files(local) if f != TRIALS]
        sources = [(rel, local / rel) for rel in files] + ([(TRIALS, snapshot)] if snapshot is not None else [])
        present = set()
        for rel, src in sources:
            try:
                st = src.stat()
            except FileNotFoundError:
                continue
            present.add(rel)
            if done.get(rel) == [st.st_size, st.st_mtime_ns] and (there is None or there.get(rel) == st.st_size):
                continue
            pafs.copy_files(str(src), remote.join(rel), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=remote.fs)
            record[rel] = [st.st_size, st.st_mtime_ns]
            uploaded += 1
        for d in PER_TRIAL_DIRS:
            for info in _remote_files(remote, d):
                if f"{d}/{info.base_name}" not in present:
                    remote.fs.delete_file(info.path)
        record = {k: v for k, v in record.items() if k in present}
    finally:
        if snapshot is not None:
            snapshot.unlink(missing_ok=True)
        atomic_write_text(local / _MIRRORED, json.dumps(record))
    return uploaded


def _remote_sizes(remote: Remote, rels: list[str]) -> dict[str, int]:
    """{relative path: size} of the store's files that the object store holds."""
    import pyarrow.fs as pafs

    sizes = {f"{d}/{i.base_name}": i.size for d in PER_TRIAL_DIRS for i in _remote_files(remote, d)}
    top = [r for r in rels if "/" not in r]
    for rel, info in zip(top, remote.fs.get_file_info([remote.join(r) for r in top]) if top else []):
        if info.type == pafs.FileType.File:
            sizes[rel] = info.size
    return sizes


def sync_store(local: Path, storage: str | None = None) -> dict:
    """``skinsweep results sync``: copy what the object-store mirror of the sweep in ``local`` lacks.

    ``storage``: like a recipe's ``storage:`` (``s3://bucket/prefix``; the sweep's name is appended); default
    the sweep folder recorded in ``sweep.json``. Returns ``{"uri", "uploaded", "files"}``; an unreachable or
    unwritable object store is a one-line :class:`~skinsweep.errors.ConfigError`.
    """
    local = Path(local)
    info = read_json(local / SWEEP_JSON)
    if not (local / TRIALS).is_file() and not info:
        raise ConfigError(f"{local} is not a sweep's results folder (no {TRIALS} or {SWEEP_JSON}); pass the folder "
                          "a sweep wrote (results/<name>, or its --results-dir)")
    name = info.get("name") or local.name
    if storage is not None:
        remote = remote_sweep(storage, name)
        if remote is None:
            raise ConfigError(f"--storage {storage}: give an object-store URI (s3://bucket/prefix); a local folder "
                              "needs no sync")
    else:
        recorded = str(info.get("storage") or "")
        if "://" not in recorded:
            raise ConfigError(f"{local} was not run with object-store storage (its {SWEEP_JSON} records "
                              f"{recorded or 'none'}); pass --storage s3://bucket/prefix to copy it to one")
        remote = remote_sweep(recorded.rsplit("/", 1)[0], recorded.rsplit("/", 1)[1])
    files = store_files(local)
    try:
        uploaded = mirror(local, remote, check_remote=True)
    except storage_errors() as e:
        left = len(pending(local))
        raise ConfigError(f"cannot copy {local} to {remote.uri} ({brief_error(e)}); {left} of {len(files)} "
                          "files not copied; check the endpoint (AWS_ENDPOINT_URL), bucket and credentials, then run "
                          "`skinsweep results sync` again") from None
    return {"uri": remote.uri, "uploaded": uploaded, "files": len(files)}


def _snapshot(path: Path) -> Path | None:
    """A hard link to ``path``'s current version (the store replaces files by renaming, so the link keeps
    this version whatever happens to ``path``); None when there is no such file."""
    import os
    import shutil
    import threading

    link = path.with_name(f".{path.name}.mirror-{os.getpid()}-{threading.get_ident()}")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except FileNotFoundError:
        return None
    except OSError:  # a filesystem without hard links: a copy (keeps the mtime, which the record compares)
        try:
            shutil.copy2(path, link)
        except FileNotFoundError:
            return None
    return link


def pull(remote: Remote, local: Path) -> int:
    """Download the mirrored store (trials, predictions, history, split, sweep.json) into an empty local folder.

    Used by ``--resume`` on a machine without the working copy. Checkpoints are not pulled here: the sweep
    re-fetches each finished trial's checkpoint from Ray's storage. Returns the number of files fetched.
    """
    wanted = [*STORE_FILES, TRIALS]
    wanted += [f"{d}/{i.base_name}" for d in PER_TRIAL_DIRS for i in _remote_files(remote, d)]
    present = [rel for rel in wanted if remote.exists(rel)]
    for rel in present:
        fetch(remote.fs, remote.join(rel), Path(local) / rel)
    return len(present)


def fetch(fs, fs_path: str, dest: Path) -> None:
    """Copy one file from ``fs`` to the local ``dest``, atomically (a reader never sees half of it)."""
    import pyarrow.fs as pafs

    with atomic_path(dest) as tmp:
        pafs.copy_files(fs_path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def _remote_files(remote: Remote, folder: str) -> list:
    """The files (pyarrow FileInfo) directly in ``folder`` of the remote sweep folder; none when it is missing."""
    import pyarrow.fs as pafs

    listing = remote.fs.get_file_info(pafs.FileSelector(remote.join(folder), allow_not_found=True))
    return [i for i in listing if i.type == pafs.FileType.File]


# --------------------------------------------------------------------------------------------------
# Mirroring in the background, with exponential backoff while the object store is unreachable
# --------------------------------------------------------------------------------------------------

MIRROR_WAIT_ENV = "SKINSWEEP_MIRROR_WAIT"    # seconds the end of a sweep waits for the mirror (default 60)
STORAGE_WAIT_ENV = "SKINSWEEP_STORAGE_WAIT"  # seconds a trial waits for the object store (default 600)


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment variable ``name`` (``default`` when unset or not a number)."""
    import os

    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def brief_error(e: BaseException, n: int = 160) -> str:
    """An object-store error in a few words: the AWS SDK's network failures are reduced to what curl said
    (``Could not connect to server``); anything else is its first line, cut at ``n`` characters."""
    import re

    text = first_line(e)
    m = re.search(r"curlCode: \d+, ([^;]+)", text)
    if m:
        return m.group(1).strip()
    return text if len(text) <= n else text[:n - 1].rsplit(" ", 1)[0] + "…"


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions an unreachable or failing object store raises through pyarrow.fs."""
    import pyarrow as pa

    return (OSError, pa.ArrowException)


class MirrorWorker:
    """Mirrors a local results store to object-store storage in a background thread.

    :meth:`request` asks for a mirror pass and returns at once, so a slow or unreachable object store never
    holds up the caller (Tune's driver loop, which also receives the other trials' reports). Requests that
    arrive while a pass runs are folded into one more pass. A failed pass is retried with exponential
    backoff (``first_delay`` doubling up to ``max_delay``); :meth:`status_line` says so for the progress view
    (``mirror: s3://… unreachable (…), 3 files waiting, retry in 8 s``), and ``notify`` is called with a line
    when the store becomes unreachable, at each failed retry and when the mirror has caught up again.
    :meth:`flush` waits (bounded) until everything requested so far is mirrored.
    """

    def __init__(self, local: Path, remote: Remote, *, notify=None, first_delay: float = 1.0,
                 max_delay: float = 60.0, mirror_fn=None) -> None:
        import threading

        self.local, self.remote = Path(local), remote
        self.notify = notify or (lambda line: None)
        self.first_delay, self.max_delay = first_delay, max_delay
        self.mirror_fn = mirror_fn or mirror
        self.error: str | None = None    # the last pass's error while the store is unreachable, else None
        self.waiting = 0                 # files not mirrored yet, counted when a pass fails
        self.retry_at: float | None = None
        self.uploaded = 0                # files uploaded by this worker's passes
        self.failures = 0                # failed passes in all
        self.lock = threading.Lock()     # one pass at a time (this worker's thread or a caller's sync pass)
        self._cond = threading.Condition()
        self._requested = self._done = 0
        self._delay = first_delay
        self._kick = self._stop = False
        self._thread = threading.Thread(target=self._run, name="skinsweep-mirror", daemon=True)
        self._thread.start()

    # ---- callers ----------------------------------------------------------------------------------
    def request(self) -> None:
        """Ask for a mirror pass (non-blocking)."""
        with self._cond:
            self._requested += 1
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Mirror everything requested so far, waiting at most ``timeout`` seconds (an unreachable store is
        tried again at once, then on its backoff schedule); True when the mirror caught up."""
        import time

        self.request()
        end = time.monotonic() + timeout
        with self._cond:
            target = self._requested
            self._kick = True
            self._cond.notify_all()
            while self._done < target and not self._stop:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._done >= target

    def close(self) -> None:
        """Stop the thread (after the pass in progress); nothing is lost: what is not mirrored is still in the
        local store, and ``skinsweep results sync`` or the next sweep run sends it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def status_line(self) -> str:
        """One line while the object store is unreachable, '' while the mirror keeps up."""
        import time

        with self._cond:
            if self.error is None:
                return ""
            wait = "" if self.retry_at is None else f", retry in {max(0, round(self.retry_at - time.time()))} s"
            return (f"mirror: {self.remote.uri} unreachable ({self.error}), {self.waiting} "
                    f"file{'s' if self.waiting != 1 else ''} waiting{wait}")

    # ---- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        import time

        while True:
            with self._cond:
                while self._done >= self._requested and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                target = self._requested
                self._kick = False
            try:
                with self.lock:
                    n = self.mirror_fn(self.local, self.remote)
            except Exception as e:  # noqa: BLE001 - any failure is retried; the message is shown, not raised
                msg = brief_error(e)
                try:
                    waiting = len(pending(self.local))
                except OSError:
                    waiting = self.waiting
                with self._cond:
                    self.failures += 1
                    self.error, self.waiting = msg, waiting
                    delay, self._delay = self._delay, min(self._delay * 2, self.max_delay)
                    self.retry_at = time.time() + delay
                self.notify(self.status_line())
                with self._cond:  # back off; flush() or close() cut the wait short
                    self._cond.wait_for(lambda: self._stop or self._kick, timeout=delay)
                    self.retry_at = None
                continue  # nothing was marked done: the same pass again
            with self._cond:
                recovered = self.error is not None
                self.error, self.waiting, self.retry_at, self._delay = None, 0, None, self.first_delay
                self.uploaded += n
                self._done = max(self._done, target)
                self._cond.notify_all()
            if recovered:
                self.notify(f"mirror: {self.remote.uri} reachable again; the mirror has caught up")


def retry_storage(fn, what: str, *, wait_s: float | None = None, first_delay: float = 1.0, max_delay: float = 60.0,
                  log=None):
    """Call ``fn()``; while it fails with an object-store error, call it again with exponential backoff for up to
    ``wait_s`` seconds (default ``$SKINSWEEP_STORAGE_WAIT``, 600), then raise the last error.

    Used on the workers for what must reach the object store (a trial's checkpoint, the split manifest): a
    storage outage then pauses the trial's last step instead of failing it.
    """
    import sys
    import time

    wait_s = env_seconds(STORAGE_WAIT_ENV, 600.0) if wait_s is None else wait_s
    end, delay = time.monotonic() + wait_s, first_delay
    while True:
        try:
            return fn()
        except storage_errors() as e:
            # (Ray's "Unable to set up cluster storage" RuntimeError is not an outage but storage that this node
            # cannot see — a local path on a multi-node cluster — and is not retried.)
            left = end - time.monotonic()
            if left <= 0:
                raise
            pause = min(delay, left)
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
                f"skinsweep: {what} failed ({brief_error(e)}); retrying in {pause:.0f} s")
            time.sleep(pause)
            delay = min(delay * 2, max_delay)
