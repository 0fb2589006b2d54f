"""Dataset readers: one index table (one row per image) from any supported layout.

Supported layouts (``detect_format`` picks one, or pass ``fmt``):

* ``isic``  — the ISIC 2018 Task 3 release: ``ISIC2018_Task3_{Training,Validation,Test}_Input/`` image
  folders and one-hot ground-truth CSVs ``ISIC2018_Task3_<Split>_GroundTruth/ISIC2018_Task3_<Split>_
  GroundTruth.csv`` (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, any column order, 0/1 or 0.0/1.0), joined
  with ``HAM10000_metadata.csv`` (lesion ids, age, sex, site) when that file sits in the root.
* ``ham``   — the HAM10000 distribution: ``HAM10000_metadata.csv`` + ``HAM10000_images_part_1/``,
  ``HAM10000_images_part_2/`` (or one ``HAM10000_images/`` folder).
* ``csv``   — a plain CSV (``path,label[,image_id,lesion_id,dx,age,sex,site,dx_type]``) for any other
  dataset; paths are relative to the CSV's folder.

The index columns are ``image_id, path, label, dx, lesion_id, age, sex, site, dx_type,
source_split, width, height`` (``source_split`` is the release's own split: train/val/test; ``width``
and ``height`` are filled by the image check). Labels are binary: 1 for the positive classes (default
``MEL``), 0 otherwise.

Every image is decoded once to catch corrupt, truncated and non-image files; results are memoised in
the cache directory by (path, size, mtime), so the check costs nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from skinsweep.errors import DataError, first_line, short_list
from skinsweep.files import atomic_write_text, cache_dir, dataset_key

ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC_SPLITS = {"Training": "train", "Validation": "val", "Test": "test"}
HAM_METADATA = "HAM10000_metadata.csv"
HAM_REQUIRED = ("lesion_id", "image_id", "dx")
HAM_OPTIONAL = ("dx_type", "age", "sex", "localization")
CSV_REQUIRED = ("path",)
CSV_OPTIONAL = ("label", "image_id", "lesion_id", "dx", "age", "sex", "site", "dx_type", "split")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INDEX_COLUMNS = ("image_id", "path", "label", "dx", "lesion_id", "age", "sex", "site", "dx_type",
                 "source_split", "width", "height")
FORMATS = ("auto", "isic", "ham", "csv")


@dataclass
class DatasetIndex:
    """One row per usable image, plus where it came from and what was dropped.

    Attributes:
        df: the index table (columns ``INDEX_COLUMNS``), sorted by ``image_id``.
        root: the dataset folder (or CSV file) it was read from.
        fmt: ``isic`` | ``ham`` | ``csv``.
        positive: the diagnosis codes counted as label 1.
        bad: images dropped by ``skip_bad`` — dicts with ``image_id``, ``path``, ``reason``.
    """

    df: pd.DataFrame
    root: Path
    fmt: str
    positive: tuple[str, ...]
    bad: list[dict] = field(default_factory=list)

    @property
    def hash(self) -> str:
        """Content hash of the labelled dataset (ids, labels, lesions, diagnoses, release split).

        Independent of where the folder sits, so a split manifest made on one machine matches the same
        dataset mounted elsewhere.
        """
        cols = ["image_id", "label", "lesion_id", "dx", "source_split"]
        text = self.df[cols].astype(str).to_csv(index=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def has_lesions(self) -> bool:
        return bool(self.df["lesion_id"].notna().any())

    def __len__(self) -> int:
        return len(self.df)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def load_index(
    root: str | Path,
    *,
    fmt: str = "auto",
    positive: Sequence[str] = ("MEL",),
    skip_bad: bool = False,
    verify: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> DatasetIndex:
    """Read a dataset folder (or plain CSV) into a validated :class:`DatasetIndex`.

    Args:
        root: dataset folder (ISIC / HAM10000 layout) or a CSV file with ``path,label`` columns.
        fmt: ``auto`` (detect), ``isic``, ``ham`` or ``csv``.
        positive: diagnosis codes (case-insensitive) that count as melanoma = 1.
        skip_bad: drop missing, unlisted, corrupt or non-image files instead of failing; what was
            dropped is recorded in ``DatasetIndex.bad``.
        verify: decode every image once (memoised) to catch corrupt files and record sizes.
        workers: processes for the image check (default: all cores).
        progress: show a progress bar for the image check.

    Raises:
        DataError: one line naming the file and the fix, for any malformed input.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset not found: {root} does not exist; pass the folder that holds the "
                        "ISIC2018_Task3_* / HAM10000 files, or a CSV with path,label columns")
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    positive = tuple(p.strip().upper() for p in positive if p.strip())
    if not positive:
        raise DataError("no positive classes given; pass e.g. --positive MEL")
    fmt = detect_format(root) if fmt == "auto" else fmt

    bad: list[dict] = []
    if fmt == "isic":
        df = _read_isic(root, skip_bad, bad)
    elif fmt == "ham":
        df = _read_ham(root, skip_bad, bad)
    else:
        df = _read_csv(root)

    df = _finish(df, positive)
    if verify:
        df = _verify_images(df, root, skip_bad, bad, workers=workers, progress=progress)
    _check_classes(df, positive, root)
    return DatasetIndex(df=df.reset_index(drop=True), root=root, fmt=fmt, positive=positive, bad=bad)


def detect_format(root: Path) -> str:
    """Guess the layout of ``root``: ``csv`` for a CSV file, else ``isic`` or ``ham`` from its folders."""
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"{root} is a file but not a .csv; pass a dataset folder or a CSV with "
                        "path,label columns")
    if any((root / f"ISIC2018_Task3_{s}_GroundTruth").is_dir() or (root / f"ISIC2018_Task3_{s}_Input").is_dir()
           for s in ISIC_SPLITS):
        return "isic"
    if (root / HAM_METADATA).is_file():
        return "ham"
    raise DataError(
        f"no known dataset layout in {root}: expected ISIC2018_Task3_Training_Input/ + "
        f"ISIC2018_Task3_Training_GroundTruth/ (ISIC 2018), or {HAM_METADATA} + HAM10000_images_part_1/ "
        "(HAM10000); for other data pass a CSV file with path,label columns")


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------

def _read_isic(root: Path, skip_bad: bool, bad: list[dict]) -> pd.DataFrame:
    frames = []
    for split_name, split in ISIC_SPLITS.items():
        img_dir = root / f"ISIC2018_Task3_{split_name}_Input"
        gt_dir = root / f"ISIC2018_Task3_{split_name}_GroundTruth"
        gt_csv = gt_dir / f"ISIC2018_Task3_{split_name}_GroundTruth.csv"
        if not img_dir.is_dir() and not gt_dir.exists():
            continue
        if not gt_csv.is_file():
            raise DataError(f"ground-truth CSV missing: {gt_csv} not found (its images are in {img_dir.name}/); "
                            "restore it from the ISIC 2018 Task 3 release or remove the image folder")
        if not img_dir.is_dir():
            raise DataError(f"image folder missing: {img_dir} not found (labels are in {gt_csv.name}); "
                            "restore the images from the ISIC 2018 Task 3 release")
        gt = _read_csv_file(gt_csv)
        frames.append(_parse_one_hot(gt, gt_csv).assign(source_split=split, _dir=str(img_dir), _csv=str(gt_csv)))
    if not frames:
        raise DataError(f"no ISIC2018_Task3_<Split>_GroundTruth/ folders in {root}; "
                        "expected at least ISIC2018_Task3_Training_GroundTruth/ and _Input/")
    df = pd.concat(frames, ignore_index=True)
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise DataError(f"image ids listed in more than one ground-truth CSV: {short_list(dup.unique())}; "
                        "each image may appear in one split only")

    meta_path = root / HAM_METADATA
    if meta_path.is_file():
        meta = _read_ham_metadata(meta_path).rename(columns={"dx": "_meta_dx"})
        df = df.merge(meta, on="image_id", how="left")
        clash = df[df["_meta_dx"].notna() & (df["_meta_dx"] != df["dx"])]
        if len(clash):
            raise DataError(f"{meta_path.name} disagrees with the ground-truth CSV on the diagnosis of "
                            f"{len(clash)} images ({short_list(clash['image_id'])}); fix or remove one of them")
        df = df.drop(columns=["_meta_dx"])

    parts = [_attach_paths(g, [Path(img_dir)], Path(csv_path), skip_bad, bad)
             for (img_dir, csv_path), g in df.groupby(["_dir", "_csv"], sort=False)]
    return pd.concat(parts, ignore_index=True).drop(columns=["_dir", "_csv"])


def _read_ham(root: Path, skip_bad: bool, bad: list[dict]) -> pd.DataFrame:
    meta_path = root / HAM_METADATA
    df = _read_ham_metadata(meta_path)
    dirs = [d for d in (root / "HAM10000_images_part_1", root / "HAM10000_images_part_2", root / "HAM10000_images")
            if d.is_dir()]
    if not dirs:
        raise DataError(f"image folders missing: {root} has {HAM_METADATA} but no HAM10000_images_part_1/ or "
                        "HAM10000_images_part_2/; unpack the HAM10000 image archives next to it")
    return _attach_paths(df.assign(source_split="train"), dirs, meta_path, skip_bad, bad)


def _read_csv(csv_path: Path) -> pd.DataFrame:
    df = _read_csv_file(csv_path)
    _check_columns(df, csv_path, CSV_REQUIRED, CSV_OPTIONAL)
    if "label" not in df.columns and "dx" not in df.columns:
        raise DataError(f"{csv_path.name}: needs a 'label' column (0/1) or a 'dx' column with class codes")
    base = csv_path.parent
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in df["path"].astype(str)]
    if "image_id" not in df.columns:
        df["image_id"] = [Path(p).stem for p in df["path"]]
    if "label" in df.columns:
        lab = pd.to_numeric(df["label"], errors="coerce")
        bad_rows = df["image_id"][~lab.isin([0, 1])]
        if len(bad_rows):
            raise DataError(f"{csv_path.name}: column 'label' must be 0 or 1; {len(bad_rows)} rows are not "
                            f"({short_list(bad_rows)})")
        df["label"] = lab.astype(int)
    if "split" in df.columns:
        df = df.rename(columns={"split": "source_split"})
        odd = set(df["source_split"].dropna()) - {"train", "val", "test"}
        if odd:
            raise DataError(f"{csv_path.name}: column 'split' has values {sorted(odd)}; use train, val or test")
    _check_duplicates(df["image_id"], csv_path)
    missing = [p for p in df["path"] if not Path(p).is_file()]
    if missing:
        raise DataError(f"{csv_path.name}: {len(missing)} listed images do not exist "
                        f"({short_list(missing, 3)}); fix the paths (relative to {base})")
    return df


# --------------------------------------------------------------------------------------------------
# Helpers shared by the readers
# --------------------------------------------------------------------------------------------------

def _read_csv_file(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV ({first_line(e)}); check the file") from None
    df.columns = [c.strip() for c in df.columns]
    return df


def _check_columns(df: pd.DataFrame, path: Path, required: Iterable[str], optional: Iterable[str]) -> None:
    cols = list(df.columns)
    missing = [c for c in required if c not in cols]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {', '.join(missing)}; found {', '.join(cols)}")
    unknown = [c for c in cols if c not in set(required) | set(optional)]
    if unknown:
        raise DataError(f"{path.name}: unknown column(s) {', '.join(unknown)}; allowed: "
                        f"{', '.join(list(required) + list(optional))}")


def _check_duplicates(ids: pd.Series, path: Path) -> None:
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{path.name}: {dup.nunique()} duplicate image ids ({short_list(dup.unique())}); "
                        "each image must be listed once")


def _parse_one_hot(gt: pd.DataFrame, path: Path) -> pd.DataFrame:
    """ISIC one-hot ground truth (any column order, 0/1 or 0.0/1.0) → image_id, dx."""
    _check_columns(gt, path, ("image",) + ISIC_CLASSES, ())
    _check_duplicates(gt["image"], path)
    values = gt[list(ISIC_CLASSES)].apply(pd.to_numeric, errors="coerce").to_numpy()
    ok = np.isin(values, (0.0, 1.0)).all(axis=1) & (np.nan_to_num(values).sum(axis=1) == 1)
    if not ok.all():
        rows = gt["image"][~ok]
        raise DataError(f"{path.name}: {len(rows)} rows are not one-hot over {','.join(ISIC_CLASSES)} "
                        f"({short_list(rows)}); each row needs exactly one 1 and 0 elsewhere")
    dx = np.asarray(ISIC_CLASSES)[values.argmax(axis=1)]
    return pd.DataFrame({"image_id": gt["image"].str.strip(), "dx": dx})


def _read_ham_metadata(path: Path) -> pd.DataFrame:
    meta = _read_csv_file(path)
    _check_columns(meta, path, HAM_REQUIRED, HAM_OPTIONAL)
    _check_duplicates(meta["image_id"], path)
    meta["dx"] = meta["dx"].str.strip().str.upper()
    unknown = sorted(set(meta["dx"].dropna()) - set(ISIC_CLASSES))
    if unknown:
        raise DataError(f"{path.name}: unknown diagnoses {unknown} in column dx; expected {', '.join(ISIC_CLASSES)}")
    meta = meta.rename(columns={"localization": "site"})
    return meta.reindex(columns=["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "site"])


def _attach_paths(df: pd.DataFrame, dirs: list[Path], listing: Path, skip_bad: bool,
                  bad: list[dict]) -> pd.DataFrame:
    """Find each listed image in ``dirs``; check for listed-but-missing and present-but-unlisted files."""
    on_disk: dict[str, Path] = {}
    for d in dirs:
        for entry in os.scandir(d):
            # Release folders also hold LICENSE.txt / ATTRIBUTION.txt: only image files count.
            if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                on_disk.setdefault(os.path.splitext(entry.name)[0], Path(entry.path))
    where = " / ".join(d.name + "/" for d in dirs)
    missing = [i for i in df["image_id"] if i not in on_disk]
    unlisted = sorted(set(on_disk) - set(df["image_id"]))
    if missing and not skip_bad:
        raise DataError(f"{len(missing)} images listed in {listing.name} are missing from {where} "
                        f"({short_list(missing)}); restore them, or pass --skip-bad to drop them")
    if unlisted and not skip_bad:
        raise DataError(f"{len(unlisted)} images in {where} are not listed in {listing.name} "
                        f"({short_list(unlisted)}); add their labels, move them out, or pass --skip-bad to ignore them")
    bad.extend({"image_id": i, "path": str(dirs[0] / i), "reason": "missing"} for i in missing)
    bad.extend({"image_id": i, "path": str(on_disk[i]), "reason": "unlisted"} for i in unlisted)
    df = df[df["image_id"].isin(on_disk)].copy()
    df["path"] = [str(on_disk[i]) for i in df["image_id"]]
    return df


def _finish(df: pd.DataFrame, positive: tuple[str, ...]) -> pd.DataFrame:
    """Fill optional columns, derive labels from diagnoses (unless a CSV gave them), fix dtypes and order."""
    for c in INDEX_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df["dx"] = df["dx"].astype("string").str.strip().str.upper()
    if df["label"].isna().all():  # only a CSV has a label column
        df["label"] = df["dx"].isin(positive).astype(int)
    df["label"] = df["label"].astype(int)
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    for c in ("image_id", "path", "lesion_id", "sex", "site", "dx_type", "source_split"):
        df[c] = df[c].astype("string")
    for c in ("width", "height"):  # filled by the image check; all-missing until then
        df[c] = pd.array([pd.NA] * len(df), dtype="Int64")
    return df[list(INDEX_COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)


def _check_classes(df: pd.DataFrame, positive: tuple[str, ...], root: Path) -> None:
    if len(df) == 0:
        raise DataError(f"{root}: no usable images; check the folder and the label files")
    n_pos = int(df["label"].sum())
    if n_pos == 0 or n_pos == len(df):
        which = "positives" if n_pos == 0 else "negatives"
        found = ", ".join(f"{k}={v}" for k, v in df["dx"].value_counts(dropna=False).items())
        raise DataError(f"{root}: no {which} for positive classes {','.join(positive)} (diagnoses: {found}); "
                        "pass --positive with the class codes that count as melanoma")


# --------------------------------------------------------------------------------------------------
# Image decoding and the memoised image check
# --------------------------------------------------------------------------------------------------

def read_rgb(path: str | Path) -> Image.Image:
    """Decode an image file as RGB, honouring EXIF orientation (grayscale/RGBA/CMYK/P → RGB)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


def _check_images(paths: list[str]) -> list[tuple[str, int, int, str]]:
    """Decode each path fully: (path, width, height, error or '') per path."""
    out = []
    for path in paths:
        try:
            im = read_rgb(path)
            out.append((path, im.width, im.height, ""))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "not a usable image"
            out.append((path, 0, 0, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"))
    return out


def map_chunks(fn, items: list, *, workers: int | None, progress: bool, label: str, chunk: int = 64):
    """Apply ``fn`` to chunks of ``items`` in worker processes (serially when small); yield results.

    Shared by the image check and the image cache. Yields ``fn(chunk_items)`` in chunk order.
    """
    from rich.progress import Progress

    workers = workers or os.cpu_count() or 1
    chunks = [items[s:s + chunk] for s in range(0, len(items), chunk)]
    serial = workers <= 1 or len(items) <= 2 * chunk
    with (Progress(transient=True, disable=not progress) as bar,
          nullcontext() if serial else ProcessPoolExecutor(max_workers=workers) as ex):
        task = bar.add_task(label, total=len(items))
        for c, res in zip(chunks, map(fn, chunks) if serial else ex.map(fn, chunks)):
            yield res
            bar.advance(task, len(c))


def _verify_images(df: pd.DataFrame, root: Path, skip_bad: bool, bad: list[dict], *, workers: int | None,
                   progress: bool) -> pd.DataFrame:
    memo_path = cache_dir() / "verify" / f"{dataset_key(root)}.json"
    memo: dict[str, list] = {}
    if memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs a re-check

    def stamp(p: str) -> list:
        st = os.stat(p)
        return [st.st_size, st.st_mtime_ns]

    results: dict[str, tuple[int, int, str]] = {}
    todo = []
    for p in df["path"]:
        rec = memo.get(p)
        if rec and rec[:2] == stamp(p):
            results[p] = (rec[2], rec[3], rec[4])
        else:
            todo.append(p)
    for chunk_res in map_chunks(_check_images, todo, workers=workers, progress=progress, label="checking images"):
        for p, w, h, err in chunk_res:
            results[p] = (w, h, err)
            memo[p] = stamp(p) + [w, h, err]
    if todo:
        atomic_write_text(memo_path, json.dumps(memo))

    errors = [(i, p, results[p][2]) for i, p in zip(df["image_id"], df["path"]) if results[p][2]]
    if errors and not skip_bad:
        first = "; ".join(f"{Path(p).name} ({e})" for _, p, e in errors[:3])
        raise DataError(f"{len(errors)} images cannot be decoded: {first}"
                        f"{' …' if len(errors) > 3 else ''}; replace them, or pass --skip-bad to drop them")
    bad.extend({"image_id": i, "path": p, "reason": e} for i, p, e in errors)
    df = df[~df["path"].isin({p for _, p, _ in errors})].copy()
    df["width"] = pd.array([results[p][0] for p in df["path"]], dtype="Int64")
    df["height"] = pd.array([results[p][1] for p in df["path"]], dtype="Int64")
    return df
