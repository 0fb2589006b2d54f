"""Synthetic dermoscopy lesions written in the real ISIC 2018 Task 3 / HAM10000 release layout.

This is the embedded default dataset for the demo and the tests: the real release cannot be
fetched in CI, so :func:`synthesize` writes a look-alike that every reader in skinsweep handles
exactly as it would handle the real thing::

    out/ISIC2018_Task3_Training_Input/ISIC_0024306.jpg ...       RGB JPEGs, (width, height) = size
    out/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    out/HAM10000_metadata.csv                                     lesion_id,image_id,dx,dx_type,...
    out/ISIC2018_Task3_{Validation,Test}_{Input,GroundTruth}/...  only with official=True
    out/.skinsweep-synth.json                                     the arguments (marks our output)

With ``official=True`` about 70/10/20 of the images (grouped by lesion, stratified by diagnosis) go
to the Training / Validation / Test folders. Unlike the real release, HAM10000_metadata.csv then
lists the Validation and Test images too (the real file covers Training only), so lesion ids are
known for every split. Image ids are consecutive from ISIC_0024306: Training, then Validation,
then Test, as in the release; within a split, the photos of one lesion are scattered.

How the images are drawn (a latent atypia score per lesion, ABCD signs, repeated photos of one
lesion) is :mod:`skinsweep.data.painter`; this module plans which images, lesions, labels and
metadata there are, and writes them.

Every image depends only on (seed, lesion, photo index, size), never on the worker that drew it, so
the same arguments give byte-identical files with any number of workers (same numpy / Pillow).
Speed: ~80 images/s at 600x450 on 2 cores (25 ms of CPU per image).
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skinsweep.data.painter import render
from skinsweep.errors import ConfigError, DataError, short_list

__all__ = ["CLASSES", "FIRST_IMAGE_NUMBER", "SynthSummary", "render", "synthesize"]

CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")  # ground-truth column order
FIRST_IMAGE_NUMBER = 24306  # ISIC_0024306 is the first image of the real training set
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
MARKER = ".skinsweep-synth.json"
SPLIT_DIRS = {"train": "Training", "validation": "Validation", "test": "Test"}

# HAM10000 statistics (10,015 images), used for the class mix and the metadata of generated lesions.
_BENIGN_IMAGES = {"nv": 6705, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
# P(lesion photographed 1, 2, 3, 4 times), per dx: melanomas are repeated far more often than nevi.
_REPEATS = {"mel": (0.38, 0.45, 0.16, 0.01), "nv": (0.82, 0.13, 0.047, 0.003),
            "bkl": (0.61, 0.30, 0.08, 0.01), "bcc": (0.54, 0.36, 0.10, 0.0),
            "akiec": (0.66, 0.25, 0.08, 0.01), "df": (0.54, 0.35, 0.11, 0.0),
            "vasc": (0.65, 0.26, 0.08, 0.01)}
_AGE = {"mel": (61, 15), "nv": (46, 15), "bkl": (64, 14), "bcc": (67, 14), "akiec": (67, 11),
        "df": (53, 14), "vasc": (51, 22)}  # mean, sd in years
_DX_TYPE = {"nv": {"follow_up": 0.55, "histo": 0.37, "consensus": 0.08},
            "bkl": {"histo": 0.70, "consensus": 0.24, "confocal": 0.06},
            "vasc": {"consensus": 0.53, "histo": 0.47}, "df": {"consensus": 0.52, "histo": 0.48},
            "mel": {"histo": 1.0}, "bcc": {"histo": 1.0}, "akiec": {"histo": 1.0}}
_SITES = {"back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118,
          "abdomen": 1022, "face": 745, "chest": 407, "foot": 319, "unknown": 234, "neck": 168,
          "scalp": 128, "hand": 90, "ear": 56, "genital": 48, "acral": 7}

@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote."""

    out: Path
    n_images: int
    n_melanoma: int
    n_lesions: int
    splits: dict[str, int] = field(default_factory=dict)  # images per split: train/validation/test
    seconds: float = 0.0  # wall time spent drawing and writing images


@dataclass
class _Row:
    """One image: its metadata row plus what the painter needs (lesion key, photo index)."""

    image_id: str
    lesion_id: str
    dx: str
    dx_type: str
    age: str
    sex: str
    localization: str
    key: int  # seeds the lesion's look; equal for every photo of one lesion
    view: int  # 0 for the first photo of a lesion, 1 for the second, ...
    split: str = "train"


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def synthesize(out: str | Path, n: int | None = None, *, seed: int = 0,
               size: tuple[int, int] = (600, 450), melanoma_rate: float = 0.111,
               like: str | Path | None = None, official: bool = False, workers: int | None = None,
               progress: bool = True, quality: int = 90, first_id: int = FIRST_IMAGE_NUMBER) -> SynthSummary:
    """Write ``n`` synthetic dermoscopy images and their label files under ``out``.

    Args:
        out: dataset folder to create (or a previous synthetic output, which is replaced).
        n: number of images; None means 2000, or every row of ``like``. With ``like`` it is capped
            by the file's rows and a smaller n keeps a seeded subset of whole lesions.
        seed: everything (ids, labels, pixels) is a pure function of the arguments.
        size: (width, height) in pixels of every image; the release uses 600x450.
        melanoma_rate: share of MEL images; the other classes keep HAM10000's proportions.
            Ignored with ``like`` (its dx column decides).
        like: a HAM10000_metadata.csv whose image ids, lesion ids, dx and patient metadata are
            copied (needs image_id, lesion_id, dx; dx_type / age / sex / localization are drawn
            when absent).
        official: also write Validation and Test folders (~70/10/20 by lesion, stratified by dx).
        workers: processes drawing images (default ``os.cpu_count()``).
        progress: show a rich progress bar.
        quality: JPEG quality, 1..95.
        first_id: number of the first image id (``ISIC_0024306`` by default, as the release). A second
            synthetic "site" needs other ids, or its images share ids with the first one's (which
            ``skinsweep evaluate`` reports as leakage). Ignored with ``like``.

    Returns:
        A :class:`SynthSummary`. Raises ConfigError for bad arguments and DataError for a bad
        ``like`` file or an ``out`` folder that holds something else.
    """
    width, height, workers = _check_args(n, size, melanoma_rate, workers, quality, seed)
    if isinstance(first_id, bool) or not isinstance(first_id, (int, np.integer)) or not 0 <= first_id <= 9_999_999 - 10**6:
        raise ConfigError(f"first_id: expected an integer from 0 to 8999999, got {first_id!r}; e.g. 100000")
    rng = np.random.default_rng([seed, 0])
    if like is not None:
        rows = _plan_like(Path(like), n, rng)
    else:
        rows = _plan_generated(2000 if n is None else n, melanoma_rate, rng)
    if official:
        _assign_splits(rows, rng)
    if like is None:  # release ids: consecutive per split, photos of a lesion scattered
        number = int(first_id)
        for split in SPLIT_DIRS:
            members = [r for r in rows if r.split == split]
            for i in rng.permutation(len(members)):
                members[i].image_id, number = f"ISIC_{number:07d}", number + 1

    out = Path(out)
    _prepare_out(out)
    args = {"n": len(rows), "seed": seed, "size": [width, height], "melanoma_rate": melanoma_rate,
            "like": None if like is None else str(like), "official": official, "quality": quality}
    if first_id != FIRST_IMAGE_NUMBER:  # the default's marker stays as it was
        args["first_id"] = int(first_id)
    (out / MARKER).write_text(json.dumps({"complete": False, **args}, indent=1) + "\n")
    _write_labels(out, rows, official)

    tasks = [(str(out / f"ISIC2018_Task3_{SPLIT_DIRS[r.split]}_Input" / f"{r.image_id}.jpg"), r.dx, seed,
              r.key, r.view, width, height, quality) for r in rows]
    t0 = time.perf_counter()
    _run_tasks(tasks, workers, progress)
    seconds = time.perf_counter() - t0
    (out / MARKER).write_text(json.dumps({"complete": True, **args}, indent=1) + "\n")

    splits = {s: sum(r.split == s for r in rows) for s in SPLIT_DIRS if official or s == "train"}
    return SynthSummary(out=out, n_images=len(rows), n_melanoma=sum(r.dx == "mel" for r in rows),
                        n_lesions=len({r.lesion_id for r in rows}), splits=splits, seconds=seconds)


def _check_args(n, size, melanoma_rate, workers, quality, seed) -> tuple[int, int, int]:
    def is_int(x) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if n is not None and (not is_int(n) or n < 1):
        raise ConfigError(f"n: expected an integer >= 1, got {n!r}; ask for at least one image")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(is_int(s) and s >= 16 for s in size)):
        raise ConfigError(f"size: expected (width, height) with both integers >= 16, got {size!r};"
                          " e.g. size=(600, 450)")
    if not isinstance(melanoma_rate, (int, float)) or not 0.0 < melanoma_rate < 1.0:
        raise ConfigError(f"melanoma_rate: expected a share strictly between 0 and 1, got "
                          f"{melanoma_rate!r}; HAM10000 has 0.111")
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"seed: expected an integer >= 0, got {seed!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if not is_int(workers) or workers < 1:
        raise ConfigError(f"workers: expected an integer >= 1 or None (all CPUs), got {workers!r}")
    if not is_int(quality) or not 1 <= quality <= 95:
        raise ConfigError(f"quality: expected a JPEG quality from 1 to 95, got {quality!r}")
    return int(size[0]), int(size[1]), int(workers)


# ---------------------------------------------------------------------------------------------
# Planning: which images, lesions, labels and metadata (cheap, in the calling process)
# ---------------------------------------------------------------------------------------------


def _largest_remainder(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split n into integer counts proportional to weights (exact total, no rounding drift)."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _pick(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.asarray([table[k] for k in keys], float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def _draw_meta(dx: str, rng: np.random.Generator) -> dict[str, str]:
    """Patient metadata of one lesion (shared by all its photos, as in HAM10000)."""
    unknown = rng.random() < 0.006  # HAM: 57 rows with no age, mostly sex and site unknown too
    mean, sd = _AGE[dx]
    age = "" if unknown else f"{float(np.clip(5 * round(rng.normal(mean, sd) / 5), 0, 85)):.1f}"
    sex = "unknown" if unknown else ("male" if rng.random() < 0.543 else "female")
    site = "unknown" if unknown else _pick(rng, _SITES)
    return {"dx_type": _pick(rng, _DX_TYPE[dx]), "age": age, "sex": sex, "localization": site}


def _plan_generated(n: int, melanoma_rate: float, rng: np.random.Generator) -> list[_Row]:
    n_mel = int(round(n * melanoma_rate))
    counts = {"mel": n_mel, **_largest_remainder(n - n_mel, _BENIGN_IMAGES)}
    lesions: list[tuple[str, int]] = []  # (dx, number of photos)
    for dx, left in counts.items():
        while left > 0:
            k = min(left, 1 + int(rng.choice(4, p=np.asarray(_REPEATS[dx]) / sum(_REPEATS[dx]))))
            lesions.append((dx, k))
            left -= k
    numbers = rng.permutation(len(lesions))  # HAM_ ids are not in diagnosis order either
    rows = []
    for key, (dx, k) in enumerate(lesions):
        meta = _draw_meta(dx, rng)
        rows += [_Row("", f"HAM_{numbers[key]:07d}", dx, key=key, view=v, **meta) for v in range(k)]
    return rows


def _plan_like(path: Path, n: int | None, rng: np.random.Generator) -> list[_Row]:
    if not path.is_file():
        raise DataError(f"like: {path} does not exist; pass a HAM10000_metadata.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("image_id", "lesion_id", "dx") if c not in columns]
        if missing:
            raise DataError(f"like: {path} lacks column(s) {', '.join(missing)} (has "
                            f"{short_list(columns) or 'no header'}); pass a HAM10000_metadata.csv")
        table = list(reader)
    if not table:
        raise DataError(f"like: {path} has a header but no rows; pass a non-empty metadata file")
    bad_dx = sorted({r["dx"] for r in table} - {c.lower() for c in CLASSES})
    if bad_dx:
        raise DataError(f"like: {path} has unknown dx value(s) {short_list(bad_dx)}; expected "
                        f"{', '.join(c.lower() for c in CLASSES)}")
    ids = [r["image_id"] for r in table]
    bad_id = [i for i in ids if not re.fullmatch(r"[A-Za-z0-9_.-]+", i or "")]
    if bad_id:
        raise DataError(f"like: {path} has image_id(s) that are not plain file names: "
                        f"{short_list(map(repr, bad_id))}")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) < 5000 else ["..."]
        raise DataError(f"like: {path} repeats image_id(s) {short_list(dup)}; ids must be unique")

    keys: dict[str, int] = {}  # lesion -> key in order of first appearance (stable under subsets)
    views: dict[str, int] = defaultdict(int)
    meta_seed = int(rng.integers(2**32))
    rows = []
    for r in table:
        key = keys.setdefault(r["lesion_id"], len(keys))
        # Columns the file lacks are drawn per lesion, so all photos of a lesion agree.
        meta = _draw_meta(r["dx"], np.random.default_rng([meta_seed, key]))
        meta.update({k: r[k] for k in meta if k in columns})
        rows.append(_Row(r["image_id"], r["lesion_id"], r["dx"], key=key,
                         view=views[r["lesion_id"]], **meta))
        views[r["lesion_id"]] += 1
    if n is None or n >= len(rows):
        return rows

    # A seeded subset of whole lesions with (nearly) the file's class mix: fill each dx's quota.
    lesions = _by_lesion(rows)
    quota = _largest_remainder(n, Counter(r.dx for r in rows))
    chosen: set[int] = set()
    order = [int(k) for k in rng.permutation(len(lesions))]
    for k in order:
        dx = lesions[k][0].dx
        if len(lesions[k]) <= quota[dx]:
            chosen.add(k)
            quota[dx] -= len(lesions[k])
    short = n - sum(len(lesions[k]) for k in chosen)
    for k in order:  # top up when whole lesions did not fit a quota exactly
        if short > 0 and k not in chosen and len(lesions[k]) <= short:
            chosen.add(k)
            short -= len(lesions[k])
    return [r for r in rows if r.key in chosen]


def _by_lesion(rows: list[_Row]) -> dict[int, list[_Row]]:
    """Lesion key -> its photos, lesions in order of first appearance."""
    lesions: dict[int, list[_Row]] = defaultdict(list)
    for r in rows:
        lesions[r.key].append(r)
    return lesions


def _assign_splits(rows: list[_Row], rng: np.random.Generator) -> None:
    """~70/10/20 train/validation/test by whole lesion, per dx so every split has each class."""
    lesions = _by_lesion(rows)
    by_dx: dict[str, list[int]] = defaultdict(list)
    for key, group in lesions.items():
        by_dx[group[0].dx].append(key)
    for keys in by_dx.values():
        total, done = sum(len(lesions[k]) for k in keys), 0
        for i in rng.permutation(len(keys)):
            group = lesions[keys[i]]
            mid = (done + len(group) / 2) / total  # where this lesion's images fall in the order
            split = "train" if mid < 0.7 else "validation" if mid < 0.8 else "test"
            for r in group:
                r.split = split
            done += len(group)


# ---------------------------------------------------------------------------------------------
# Writing: folder safety, label files, parallel image drawing
# ---------------------------------------------------------------------------------------------


def _known_entries() -> dict[str, str]:
    """Top-level names we write, and the only file suffix each folder may hold."""
    names = {MARKER: "", "HAM10000_metadata.csv": ""}
    for s in SPLIT_DIRS.values():
        names[f"ISIC2018_Task3_{s}_Input"] = ".jpg"
        names[f"ISIC2018_Task3_{s}_GroundTruth"] = ".csv"
    return names


def _prepare_out(out: Path) -> None:
    """Create ``out``; replace a previous synthetic output; refuse to touch anything else."""
    if out.exists() and not out.is_dir():
        raise DataError(f"out: {out} is a file; pass a folder path")
    entries = sorted(out.iterdir()) if out.exists() else []
    if entries:
        known = _known_entries()
        foreign = [p.name for p in entries if p.name not in known]
        for p in entries:
            if p.is_dir() and p.name in known:
                foreign += [f"{p.name}/{q.name}" for q in p.iterdir()
                            if not (q.is_file() and q.suffix == known[p.name])]
        if not (out / MARKER).is_file() or foreign:
            what = short_list(foreign or [p.name for p in entries])
            raise DataError(f"out: {out} is not empty and is not a skinsweep synthetic dataset "
                            f"(holds {what}); choose a new or empty folder")
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_labels(out: Path, rows: list[_Row], official: bool) -> None:
    for split, name in SPLIT_DIRS.items():
        if not official and split != "train":
            continue
        (out / f"ISIC2018_Task3_{name}_Input").mkdir()
        gt = out / f"ISIC2018_Task3_{name}_GroundTruth"
        gt.mkdir()
        with (gt / f"ISIC2018_Task3_{name}_GroundTruth.csv").open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", *CLASSES])
            for r in sorted((r for r in rows if r.split == split), key=lambda r: r.image_id):
                w.writerow([r.image_id, *("1.0" if r.dx == c.lower() else "0.0" for c in CLASSES)])
    with (out / "HAM10000_metadata.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(METADATA_COLUMNS)
        for r in rows:
            w.writerow([getattr(r, c) for c in METADATA_COLUMNS])


_Task = tuple[str, str, int, int, int, int, int, int]  # path, dx, seed, key, view, w, h, quality


def _draw_chunk(tasks: list[_Task]) -> int:
    for path, dx, seed, key, view, w, h, quality in tasks:
        render(dx, seed, key, view, (w, h)).save(path, "JPEG", quality=quality)
    return len(tasks)


def _run_tasks(tasks: list[_Task], workers: int, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    chunk = 8  # small enough for a smooth bar, big enough to amortise inter-process calls
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    workers = min(workers, len(chunks))
    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), disable=not progress)
    if workers == 1:
        with bar:
            job = bar.add_task("drawing synthetic lesions", total=len(tasks))
            for c in chunks:
                bar.advance(job, _draw_chunk(c))
        return
    # fork on Linux: works from scripts without a __main__ guard and starts fast. The pool forks
    # all workers at the first submit, i.e. before rich's refresh thread exists. Elsewhere fork is
    # unsafe (macOS) or missing (Windows), so spawn.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_draw_chunk, c) for c in chunks]
        try:
            with bar:
                job = bar.add_task("drawing synthetic lesions", total=len(tasks))
                for fut in as_completed(futures):
                    bar.advance(job, fut.result())
        except BaseException:  # Ctrl-C or a failed chunk: do not wait for the rest to be drawn
            pool.shutdown(wait=False, cancel_futures=True)
            raise
