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

How the images are made: each lesion gets a latent *atypia* score in [0, 1] drawn from a class-
dependent Beta distribution, and every ABCD sign (asymmetry, border irregularity, extra colours such
as blue-white veil and black dots, diameter) is drawn with a probability that grows with atypia.
Melanomas draw high atypia and nevi low, but the distributions overlap, so the task is learnable but
not trivial: a small CNN trained from scratch on 64x64 images for 4 CPU minutes reaches ROC-AUC
0.80-0.91 (benchmarks/synth_learnability.py); the atypia overlap alone caps it near 0.90-0.93.
The lesion is rendered once in its own frame (a "sprite"); every photo of that lesion re-places the
same sprite with a small pose / scale / colour change on freshly textured skin, with its own hairs,
illumination and dermatoscope vignette, as repeated photos in HAM10000 do.

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
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

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
# Atypia ~ Beta(a, b) per dx: the single knob that sets how much melanomas and the rest overlap.
_ATYPIA = {"mel": (2.4, 1.8), "nv": (1.4, 4.2), "bkl": (1.6, 3.5), "bcc": (1.6, 3.5),
           "akiec": (1.6, 3.5), "df": (1.2, 4.5), "vasc": (1.2, 4.5)}

_E = 1.4  # half-width of a lesion sprite in lesion radii (room for a ragged border and streaks)


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
    """One image: its metadata row plus what the renderer needs (lesion key, photo index)."""

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
               progress: bool = True, quality: int = 90) -> SynthSummary:
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

    Returns:
        A :class:`SynthSummary`. Raises ConfigError for bad arguments and DataError for a bad
        ``like`` file or an ``out`` folder that holds something else.
    """
    width, height, workers = _check_args(n, size, melanoma_rate, workers, quality, seed)
    rng = np.random.default_rng([seed, 0])
    if like is not None:
        rows = _plan_like(Path(like), n, rng)
    else:
        rows = _plan_generated(2000 if n is None else n, melanoma_rate, rng)
    if official:
        _assign_splits(rows, rng)
    if like is None:  # release ids: consecutive per split, photos of a lesion scattered
        number = FIRST_IMAGE_NUMBER
        for split in SPLIT_DIRS:
            members = [r for r in rows if r.split == split]
            for i in rng.permutation(len(members)):
                members[i].image_id, number = f"ISIC_{number:07d}", number + 1

    out = Path(out)
    _prepare_out(out)
    args = {"n": len(rows), "seed": seed, "size": [width, height], "melanoma_rate": melanoma_rate,
            "like": None if like is None else str(like), "official": official, "quality": quality}
    (out / MARKER).write_text(json.dumps({"complete": False, **args}, indent=1) + "\n")
    _write_labels(out, rows, official)

    tasks = [(str(_image_path(out, r)), r.dx, seed, r.key, r.view, width, height, quality)
             for r in rows]
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
    by_lesion: dict[int, list[_Row]] = defaultdict(list)
    for r in rows:
        by_lesion[r.key].append(r)
    dx_images: dict[str, int] = defaultdict(int)
    for r in rows:
        dx_images[r.dx] += 1
    quota = _largest_remainder(n, dict(dx_images))
    chosen: set[int] = set()
    order = [int(k) for k in rng.permutation(len(by_lesion))]
    for k in order:
        first = by_lesion[k][0]
        if len(by_lesion[k]) <= quota[first.dx]:
            chosen.add(k)
            quota[first.dx] -= len(by_lesion[k])
    short = n - sum(len(by_lesion[k]) for k in chosen)
    for k in order:  # top up when whole lesions did not fit a quota exactly
        if short > 0 and k not in chosen and len(by_lesion[k]) <= short:
            chosen.add(k)
            short -= len(by_lesion[k])
    return [r for r in rows if r.key in chosen]


def _assign_splits(rows: list[_Row], rng: np.random.Generator,
                   shares: tuple[float, float] = (0.7, 0.8)) -> None:
    """~70/10/20 train/validation/test by whole lesion, per dx so every split has each class."""
    lesions: dict[int, list[_Row]] = defaultdict(list)
    for r in rows:
        lesions[r.key].append(r)
    by_dx: dict[str, list[int]] = defaultdict(list)
    for key, group in lesions.items():
        by_dx[group[0].dx].append(key)
    for keys in by_dx.values():
        total, done = sum(len(lesions[k]) for k in keys), 0
        for i in rng.permutation(len(keys)):
            group = lesions[keys[i]]
            mid = (done + len(group) / 2) / total  # where this lesion's images fall in the order
            split = "train" if mid < shares[0] else "validation" if mid < shares[1] else "test"
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


def _image_path(out: Path, r: _Row) -> Path:
    return out / f"ISIC2018_Task3_{SPLIT_DIRS[r.split]}_Input" / f"{r.image_id}.jpg"


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


# ---------------------------------------------------------------------------------------------
# Drawing: numpy for smooth fields and colour, PIL for shapes, resampling and blur
# ---------------------------------------------------------------------------------------------

_F32 = np.float32
_SKIN = np.array([(242, 200, 188), (236, 190, 172), (226, 172, 150), (240, 184, 162),
                  (218, 165, 138), (246, 214, 206), (236, 180, 184)], _F32)  # before lighting
BLACK, BLUE_GREY, VEIL, WHITE = (50, 32, 34), (95, 105, 135), (150, 160, 190), (228, 218, 218)
RED, DARK_RED, PINK = (185, 70, 80), (120, 40, 45), (218, 148, 150)


def _noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 1) -> np.ndarray:
    """Smooth value noise of shape (h, w), unit std: random grids upsampled bicubically by PIL."""
    out, amp = np.zeros((h, w), _F32), 1.0
    for _ in range(octaves):
        gh = max(2, int(cells * h / max(h, w)) + 2)
        gw = max(2, int(cells * w / max(h, w)) + 2)
        grid = rng.standard_normal((gh, gw)).astype(_F32)
        out += amp * np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC))
        cells, amp = cells * 2.1, amp * 0.5
    return out / max(float(out.std()), 1e-6)


def _region(field_: np.ndarray, coverage: float, soft: float = 0.35) -> np.ndarray:
    """Soft mask covering about ``coverage`` of a unit-std field (threshold from the normal cdf)."""
    t = NormalDist().inv_cdf(1.0 - min(max(coverage, 1e-3), 0.999))
    return np.clip((field_ - t) / soft, 0.0, 1.0)


def _blend(col: np.ndarray, mask: np.ndarray, rgb, opacity: float = 1.0) -> None:
    """In place: col = col * (1 - m) + rgb * m, with m = mask * opacity. col is (h, w, 3)."""
    m = (mask * _F32(opacity))[..., None]
    col *= 1.0 - m
    col += m * np.asarray(rgb, _F32)


def _jitter(rng: np.random.Generator, rgb, spread: float = 0.12, sd: float = 4.0) -> np.ndarray:
    """A colour near rgb: mostly brighter/darker (one factor), a little hue noise per channel."""
    out = np.asarray(rgb, _F32) * rng.uniform(1 - spread, 1 + spread) + rng.normal(0, sd, 3)
    return np.clip(out, 0, 255).astype(_F32)


def _lesion(dx: str, rng: np.random.Generator, px: int) -> tuple[Image.Image, float]:
    """Draw one lesion in its own frame: an RGBA sprite (side px) and its radius in image units.

    The sprite covers [-_E, _E]^2 lesion radii. The radius is in units of min(width, height).
    """
    a = float(rng.beta(*_ATYPIA[dx]))  # atypia: every sign below is more likely when it is high
    chance = lambda prob: rng.random() < prob  # noqa: E731  (a shorthand used many times)
    radius = 0.16 * np.exp(rng.normal(0, 0.25)) * (1 + 1.1 * a)
    radius *= {"df": 0.6, "vasc": 0.75, "akiec": 1.15, "bkl": 1.1}.get(dx, 1.0)
    radius = float(np.clip(radius, 0.05, 0.42))
    p = int(np.clip(2 * _E * radius * px, 16, 320))  # capped: textures are smooth, PIL upsamples
    t = np.linspace(-_E, _E, p, dtype=_F32)
    u, v = np.meshgrid(t, t)
    rho = np.hypot(u, v)

    # Shape (A, B): odd harmonics break symmetry, high ones notch the border; both grow with a.
    ang = np.linspace(-np.pi, np.pi, 721, dtype=_F32)
    r = 1 + rng.uniform(0, 0.2) * np.cos(2 * ang + rng.uniform(0, 6.3))  # ellipse: symmetric
    for k in (1, 3, 5):
        r += a * rng.uniform(0.0, 0.22) / k**0.3 * np.cos(k * ang + rng.uniform(0, 6.3))
    for k in range(4, 14):
        r += a**1.5 * rng.uniform(0, 0.09) / k**0.4 * np.cos(k * ang + rng.uniform(0, 6.3))
    idx = np.rint((np.arctan2(v, u) + np.pi) * (720 / (2 * np.pi))).astype(np.int32)
    d = rho / np.maximum(r[idx], 0.3) + (0.03 + 0.12 * a) * _noise(rng, p, p, 9, 2) * 0.5
    soft = {"akiec": 0.45, "bcc": 0.25, "bkl": 0.08, "vasc": 0.06}.get(dx, rng.uniform(0.06, 0.3))
    alpha = np.clip((1 - d) / soft, 0, 1)
    inside = np.clip((0.9 - d) / 0.2, 0, 1)  # colour features stay inside the border

    # Base pigment: a light and a dark tone mixed by a per-pixel pigment level.
    side = u * np.cos(psi := rng.uniform(0, 6.3)) + v * np.sin(psi)
    level = (rng.uniform(0.1, 0.7) + 0.4 * a + rng.uniform(-0.2, 0.3) * (1 - rho)
             + a * rng.uniform(0, 0.35) * side + (0.05 + 0.25 * a) * _noise(rng, p, p, 4, 2)
             + (0.06 + 0.1 * a) * _noise(rng, p, p, 20))  # granular texture
    light, dark = _jitter(rng, (188, 128, 88)), _jitter(rng, (92, 54, 40))
    if dx == "bkl":
        light, dark = _jitter(rng, (202, 152, 118)), _jitter(rng, (138, 92, 68))
    elif dx in ("bcc", "akiec") or (dx == "mel" and chance(0.06)):  # incl. amelanotic melanoma
        light, dark = _jitter(rng, PINK, 0.06), _jitter(rng, (175, 100, 100))
        level = level * 0.6
    elif dx == "vasc":
        light, dark = _jitter(rng, (190, 70, 90)), _jitter(rng, (120, 40, 75), 0.2, 10)
    elif dx == "df":
        level = level * np.clip((rho - 0.15) / 0.45, 0.2, 1)  # pale centre, pigmented ring
    level = np.clip(level, 0, 1)[..., None]
    col = light + (dark - light) * level

    # Pigment network: zero-crossings of noise form an irregular mesh; atypical = thick, broken.
    if dx in ("mel", "nv", "df", "akiec") and chance(0.6):
        width = 0.12 + 0.2 * a * (1 + _noise(rng, p, p, 3))
        net = np.exp(-(_noise(rng, p, p, 14 + 8 * rng.random()) / np.maximum(width, 0.05)) ** 2)
        net *= inside * (1 - _region(_noise(rng, p, p, 4), 0.6 * a))
        _blend(col, net, dark * 0.75 if dx != "akiec" else DARK_RED, rng.uniform(0.3, 0.6))

    # C: extra colours, each with an atypia-driven chance (benign lesions get them too, rarely).
    def bias() -> np.ndarray:  # a blob field pushed to one side, more so for atypical lesions
        b = rng.uniform(0, 6.3)
        return _noise(rng, p, p, 3) + 1.2 * a * (u * np.cos(b) + v * np.sin(b))

    melanocytic = dx in ("mel", "nv")
    if chance(0.1 + 0.55 * a):  # dark brown / black blotch off centre
        blotch = _region(bias(), rng.uniform(0.1, 0.3), 0.7) * inside
        _blend(col, blotch, BLACK, rng.uniform(0.4, 0.85))
    if chance((0.04 + 0.55 * a**1.5) * (1 if melanocytic else 0.6)):  # blue-white veil
        veil = _region(bias(), rng.uniform(0.15, 0.35)) * inside
        veil *= 0.8 + 0.2 * _noise(rng, p, p, 12)  # mottled, not a flat patch
        _blend(col, veil, VEIL, rng.uniform(0.5, 0.8))
    if chance(0.03 + 0.35 * a**2):  # regression: white scar-like area
        _blend(col, _region(bias(), rng.uniform(0.1, 0.25)) * inside, WHITE, rng.uniform(0.4, 0.7))
    if chance(0.05 + 0.3 * a):  # reddish / pink areas
        _blend(col, _region(bias(), rng.uniform(0.1, 0.3)) * inside, RED, rng.uniform(0.2, 0.5))
    if dx == "nv" and chance(0.03):  # blue nevus: homogeneous blue-grey
        _blend(col, inside, BLUE_GREY, 0.7)

    # Class-specific structures drawn as shapes (dots, streaks, vessels, lobules), one mask each.
    def to_px(x: float, y: float) -> tuple[float, float]:
        return (x + _E) * p / (2 * _E), (y + _E) * p / (2 * _E)

    def border(th: float) -> float:  # the lesion's radius towards angle th (in [-pi, pi])
        return float(r[int(round((th + np.pi) * 720 / (2 * np.pi))) % 721])

    def stamp(rgb, opacity: float, paint) -> None:
        mask = Image.new("L", (p, p))
        paint(ImageDraw.Draw(mask))
        m = np.asarray(mask.filter(ImageFilter.GaussianBlur(max(0.5, p / 400))), _F32) / 255
        _blend(col, m * np.clip(alpha * 1.5, 0, 1), rgb, opacity)

    def dots(count: int, size: tuple[float, float], where: tuple[float, float]):
        def paint(draw: ImageDraw.ImageDraw) -> None:
            for _ in range(count):
                th = rng.uniform(-np.pi, np.pi)
                rr = rng.uniform(*where) * border(th)
                x, y = to_px(rr * np.cos(th), rr * np.sin(th))
                s = rng.uniform(*size) * p
                draw.ellipse((x - s, y - s, x + s, y + s), fill=int(rng.integers(150, 256)))
        return paint

    def streaks(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(4, 16))):
            th = rng.uniform(-np.pi, np.pi)
            c, s, rr = np.cos(th), np.sin(th), border(th)
            draw.line([to_px(0.75 * rr * c, 0.75 * rr * s), to_px(1.2 * rr * c, 1.2 * rr * s)],
                      fill=220, width=max(1, int(0.02 * p)))

    def vessels(draw: ImageDraw.ImageDraw) -> None:  # branching random walks, thinning out
        for _ in range(int(rng.integers(2, 7))):
            x, y, th = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0, 6.3)
            wid = 0.012 * p + 1
            for _ in range(int(rng.integers(4, 10))):
                step = rng.uniform(0.08, 0.2)
                nx, ny = x + step * np.cos(th), y + step * np.sin(th)
                draw.line([to_px(x, y), to_px(nx, ny)], fill=255, width=max(1, int(wid)))
                x, y, th, wid = nx, ny, th + rng.normal(0, 0.6), wid * 0.85

    def lacunae(draw: ImageDraw.ImageDraw) -> None:  # dark red-purple lobules
        for _ in range(int(rng.integers(3, 12))):
            x, y = to_px(rng.uniform(-0.55, 0.55), rng.uniform(-0.55, 0.55))
            s = rng.uniform(0.1, 0.22) * p / (2 * _E)
            draw.ellipse((x - s, y - s, x + s, y + s), fill=int(rng.integers(150, 256)))

    if chance(0.08 + 0.5 * a):  # black dots / irregular globules, more of them towards the border
        stamp(BLACK, 0.9, dots(int(rng.integers(3, 10 + 30 * a)), (0.004, 0.012 + 0.02 * a),
                               (0.3 + 0.3 * a, 1.0)))
    elif melanocytic and chance(0.3):  # regular brown globules of a globular nevus
        stamp(dark * 0.8, 0.8, dots(int(rng.integers(8, 25)), (0.012, 0.022), (0.0, 0.85)))
    if melanocytic and chance(0.03 + 0.4 * a):  # streaks / pseudopods at the border
        stamp((65, 42, 38), 0.8, streaks)
    if dx == "bkl":  # milia-like cysts, comedo-like openings, cerebriform furrows
        stamp(WHITE, 0.7, dots(int(rng.integers(0, 10)), (0.01, 0.025), (0.0, 0.8)))
        stamp(dark * 0.7, 0.8, dots(int(rng.integers(0, 8)), (0.01, 0.02), (0.0, 0.8)))
        fissure = np.exp(-(_noise(rng, p, p, 7) / 0.12) ** 2) * inside
        _blend(col, fissure, dark * 0.8, rng.uniform(0.0, 0.5))
    if dx == "bcc" or (dx == "mel" and chance(0.1)):  # arborizing vessels, blue-grey nests
        stamp(RED, 0.85, vessels)
        if chance(0.5):
            nest = _region(_noise(rng, p, p, 10), rng.uniform(0.03, 0.12), 0.5) * inside
            _blend(col, nest, BLUE_GREY, rng.uniform(0.4, 0.7))
    if dx == "akiec":  # white-yellow scale
        _blend(col, _region(_noise(rng, p, p, 16, 2), rng.uniform(0.05, 0.25), 0.6) * inside,
               (238, 228, 210), 0.55)
    if dx == "vasc":
        stamp((95, 25, 55), 0.7, lacunae)
    if dx == "df" and chance(0.8):  # central white scar-like patch
        scar = np.clip((rng.uniform(0.25, 0.5) - rho + 0.15 * _noise(rng, p, p, 5)) / 0.2, 0, 1)
        _blend(col, scar, WHITE, rng.uniform(0.3, 0.7))

    opacity = rng.uniform(0.6, 0.9) if dx in ("bcc", "akiec") else rng.uniform(0.85, 1.0)
    rgba = np.dstack([col, alpha * opacity * 255])
    return Image.fromarray(np.clip(rgba, 0, 255).astype(np.uint8), "RGBA"), radius


def _skin(rng: np.random.Generator, base: np.ndarray, w: int, h: int) -> Image.Image:
    """Skin background: colour mottle, fine texture, some redness and freckles.

    Drawn at half resolution and upsampled: skin under a dermatoscope is smooth at that scale,
    and it halves the cost of the most expensive step.
    """
    sw, sh = max(8, w // 2), max(8, h // 2)
    col = np.empty((sh, sw, 3), _F32)
    col[:] = base
    col *= (1 + 0.04 * _noise(rng, sh, sw, 4, 2))[..., None]
    col *= (1 + rng.uniform(0.012, 0.03) * _noise(rng, sh, sw, 50, 2))[..., None]  # fine texture
    redness = _region(_noise(rng, sh, sw, 5, 2), rng.uniform(0, 0.5), 2.5)[..., None]
    col += redness * np.array((2, -12, -8), _F32) * rng.uniform(0.3, 1.0)
    if rng.random() < 0.3:  # background freckles / lentigines
        _blend(col, _region(_noise(rng, sh, sw, 35), rng.uniform(0.02, 0.08), 0.5),
               base * np.array((0.82, 0.72, 0.66), _F32), rng.uniform(0.2, 0.45))
    img = Image.fromarray(np.clip(col, 0, 255).astype(np.uint8), "RGB")
    return img.resize((w, h), Image.BICUBIC)


def _lighting(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Per-pixel RGB gain (as a 0..255 image) for uneven light, white balance and the vignette.

    Smooth, so it is computed at quarter resolution and upsampled; applied with ImageChops.multiply.
    """
    lw, lh, unit = max(8, w // 4), max(8, h // 4), min(w, h)
    x = ((np.arange(lw, dtype=_F32) + 0.5) * (w / lw) - w / 2)[None, :] / unit
    y = ((np.arange(lh, dtype=_F32) + 0.5) * (h / lh) - h / 2)[:, None] / unit
    ang = rng.uniform(0, 6.3)
    light = (0.92 + rng.uniform(0, 0.08) * (x * np.cos(ang) + y * np.sin(ang))
             - rng.uniform(0, 0.3) * (x * x + y * y))
    if rng.random() < 0.6:  # dark circular rim of the dermatoscope, corners (nearly) black
        rv = rng.uniform(0.75, 1.05) * np.hypot(w, h) / 2 / unit  # circle radius in units
        dist = np.hypot(x - rng.normal(0, 0.03), y - rng.normal(0, 0.03))
        light = light * np.clip((rv - dist) / rng.uniform(0.04, 0.12), 0.03, 1)
    balance = rng.normal(1, 0.03, 3)
    gain = light[..., None] * (balance / balance.max() * rng.uniform(0.88, 1.0))
    return Image.fromarray(np.clip(gain * 255, 0, 255).astype(np.uint8), "RGB").resize(
        (w, h), Image.BILINEAR)


def _hairs(rng: np.random.Generator, img: Image.Image, count: int) -> Image.Image:
    """Thin dark curves (quadratic Bezier), drawn on a mask and softened so they are not aliased."""
    w, h = img.size
    unit = min(w, h)
    mask = Image.new("L", (w, h))
    draw = ImageDraw.Draw(mask)
    tt = np.linspace(0, 1, 24)[:, None]
    for _ in range(count):
        p0 = rng.uniform((-0.1 * w, -0.1 * h), (1.1 * w, 1.1 * h))
        th, length = rng.uniform(0, 6.3), rng.uniform(0.2, 0.9) * w
        p2 = p0 + length * np.array((np.cos(th), np.sin(th)))
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.2) * length * np.array((-np.sin(th), np.cos(th)))
        pts = (1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt**2 * p2
        draw.line([tuple(q) for q in pts], fill=int(rng.integers(170, 256)),
                  width=max(1, int(round(rng.uniform(0.8, 2.2) * unit / 450))), joint="curve")
    mask = mask.filter(ImageFilter.GaussianBlur(max(0.4, 0.6 * unit / 450)))
    tone = tuple(int(q) for q in _jitter(rng, (45, 35, 32), 0.3))
    return Image.composite(Image.new("RGB", (w, h), tone), img, mask)


def render(dx: str, seed: int, key: int, view: int, size: tuple[int, int]) -> Image.Image:
    """One synthetic dermoscopy photo: lesion ``key`` (seeded by ``seed``) in its ``view``-th photo.

    Args:
        dx: HAM10000 code (mel, nv, bcc, akiec, bkl, df, vasc).
        size: (width, height) in pixels.

    Returns:
        An RGB PIL image. The same arguments always give the same pixels.
    """
    w, h = size
    unit = min(w, h)
    lesion_rng = np.random.default_rng([seed, 1, key])  # same lesion and patient in every photo
    rng = np.random.default_rng([seed, 2, key, view])  # this photo's pose, light, hairs
    skin_base = _jitter(lesion_rng, _SKIN[lesion_rng.integers(len(_SKIN))], 0.04)
    hairiness = lesion_rng.uniform(0, 12) if lesion_rng.random() < 0.55 else 0.0
    offset = lesion_rng.normal(0, 0.06, 2)
    orientation = lesion_rng.uniform(0, 2 * np.pi)
    sprite, radius = _lesion(dx, lesion_rng, unit)

    # Skin, then the lesion re-posed for this photo: a repeat is rotated, scaled and shifted a bit.
    img = _skin(rng, skin_base, w, h)
    scale = float(np.exp(rng.normal(0, 0.08))) if view else 1.0
    phi = orientation + (rng.normal(0, 0.25) if view else 0.0)
    cx = w / 2 + unit * (offset[0] + rng.normal(0, 0.03))
    cy = h / 2 + unit * (offset[1] + rng.normal(0, 0.03))
    ext = _E * radius * unit * scale  # sprite corners beyond this radius are empty skin
    x0, y0, side = int(cx - ext), int(cy - ext), int(2 * ext) + 2
    k = sprite.width / (2 * _E * radius * unit * scale)  # sprite px per image px
    c, s, half = k * np.cos(phi), k * np.sin(phi), sprite.width / 2
    bx, by = cx - x0, cy - y0  # lesion centre inside the pasted box
    placed = sprite.transform((side, side), Image.AFFINE, (c, s, half - c * bx - s * by,
                                                           -s, c, half + s * bx - c * by),
                              Image.BILINEAR)
    img.paste(placed, (x0, y0), placed)

    # Photo conditions, then hairs on top.
    img = ImageChops.multiply(img, _lighting(rng, w, h))
    n_hairs = int(rng.poisson(hairiness))
    return _hairs(rng, img, n_hairs) if n_hairs else img
