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


def mirror(local: Path, remote: Remote) -> int:
    """Copy the local Parquet store to ``remote``: changed files only, predictions before ``trials.parquet``.

    Remote predictions / history files whose trial is no longer in the local store are deleted (as the
    local store deletes them). Returns the number of files uploaded.
    """
    import pyarrow.fs as pafs

    local = Path(local)
    done = read_json(local / _MIRRORED)
    files = [f"{d}/{p.name}" for d in PER_TRIAL_DIRS for p in sorted((local / d).glob("*.parquet"))
             if not p.name.startswith(".")]
    files += [f for f in STORE_FILES if (local / f).is_file()]
    files += [TRIALS] if (local / TRIALS).is_file() else []  # last: it names the predictions files
    uploaded, now = 0, {}
    for rel in files:
        st = (local / rel).stat()
        now[rel] = [st.st_size, st.st_mtime_ns]
        if done.get(rel) == now[rel]:
            continue
        pafs.copy_files(str(local / rel), remote.join(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=remote.fs)
        uploaded += 1
    for d in PER_TRIAL_DIRS:
        for info in _remote_files(remote, d):
            if f"{d}/{info.base_name}" not in now:
                remote.fs.delete_file(info.path)
    atomic_write_text(local / _MIRRORED, json.dumps(now))
    return uploaded


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
