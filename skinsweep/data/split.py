"""Train/val/test split manifests: stratified, grouped by lesion, seeded, saved with a content hash.

Modes:

* ``grouped`` (default) — stratified by label and grouped by ``lesion_id``: no lesion has images on two
  sides. Images without a lesion id form their own group.
* ``image`` — stratified by label only, image by image, as in the reference study. Images of one
  lesion can land on both sides (the manifest records how many lesions leak); use it to reproduce the
  study, not to measure a model.
* ``official`` — the release's own Training / Validation / Test folders (ISIC 2018 layout or a CSV
  ``split`` column).

A manifest is a Parquet file with one row per image (``image_id, split, label, lesion_id, dx``) and its
settings, the dataset's content hash and its own content hash in the Parquet key-value metadata under
``skinsweep``. Every later stage records the manifest hash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from skinsweep.data.index import DatasetIndex
from skinsweep.errors import DataError, short_list
from skinsweep.files import atomic_path, cache_dir, dataset_key, file_lock

SPLITS = ("train", "val", "test")
MODES = ("grouped", "image", "official")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
DEFAULT_SEED = 0
MANIFEST_COLUMNS = ("image_id", "split", "label", "lesion_id", "dx")
_META_KEY = b"skinsweep"


@dataclass
class SplitManifest:
    """One row per image with its split, plus the settings that produced it.

    Attributes:
        df: columns ``MANIFEST_COLUMNS``, sorted by ``image_id``.
        meta: settings (mode, seed, fractions, positive classes), the dataset hash, leak count, dropped
            images; JSON-safe.
    """

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """Content hash of (image_id, split, label): two manifests with equal hashes split alike."""
        rows = self.df[["image_id", "split", "label"]].astype(str).sort_values("image_id")
        return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]

    def ids(self, split: str) -> list[str]:
        return self.df.loc[self.df["split"] == split, "image_id"].tolist()

    def summary(self) -> pd.DataFrame:
        """Per split: images, melanomas, prevalence, lesions (rows train/val/test/all)."""
        rows = []
        for name in (*SPLITS, "all"):
            part = self.df if name == "all" else self.df[self.df["split"] == name]
            rows.append({
                "split": name, "images": len(part), "melanoma": int(part["label"].sum()),
                "prevalence": float(part["label"].mean()) if len(part) else float("nan"),
                "lesions": int(part["lesion_id"].nunique()) if part["lesion_id"].notna().any() else None,
            })
        return pd.DataFrame(rows).set_index("split")

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        table = pa.Table.from_pandas(self.df, preserve_index=False)
        meta = dict(self.meta, hash=self.hash)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
        try:
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
        except OSError as e:
            raise DataError(f"cannot write split manifest {path}: {e.strerror}; pass --out to a writable "
                            "location or set SKINSWEEP_CACHE") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SplitManifest":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"split manifest not found: {path}; create one with `skinsweep data split DIR --out {path}`")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet split manifest ({e}); re-create it with "
                            "`skinsweep data split`") from None
        raw = (table.schema.metadata or {}).get(_META_KEY)
        missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
        if raw is None or missing:
            raise DataError(f"{path} is not a skinsweep split manifest (missing {'metadata' if raw is None else missing}); "
                            "re-create it with `skinsweep data split`")
        meta = json.loads(raw)
        df = table.to_pandas()[list(MANIFEST_COLUMNS)]
        m = cls(df=df, meta=meta)
        if meta.get("hash") != m.hash:
            raise DataError(f"{path} was edited after it was written (content hash {m.hash} != recorded "
                            f"{meta.get('hash')}); re-create it with `skinsweep data split`")
        odd = set(df["split"]) - set(SPLITS)
        if odd:
            raise DataError(f"{path}: column split has values {sorted(odd)}; expected train, val, test")
        return m

    def check_matches(self, index: DatasetIndex, path: str | Path | None = None) -> None:
        """Raise DataError unless this manifest lists exactly the index's images with the same labels."""
        where = f"split manifest {path}" if path else "split manifest"
        a = self.df.set_index("image_id")["label"]
        b = index.df.set_index("image_id")["label"]
        extra, missing = a.index.difference(b.index), b.index.difference(a.index)
        fix = f"re-create it with `skinsweep data split {index.root}`"
        if len(extra) or len(missing):
            raise DataError(f"{where} does not match dataset {index.root}: {len(extra)} manifest images not in "
                            f"the dataset ({short_list(extra, 3)}), {len(missing)} dataset images not in the "
                            f"manifest ({short_list(missing, 3)}); {fix}")
        differ = a.index[a.values != b.reindex(a.index).values]
        if len(differ):
            raise DataError(f"{where} disagrees with dataset {index.root} on the label of {len(differ)} images "
                            f"({short_list(differ, 3)}; positive classes {self.meta.get('positive')}); {fix}")


# --------------------------------------------------------------------------------------------------
# Making splits
# --------------------------------------------------------------------------------------------------

def make_split(
    index: DatasetIndex,
    *,
    mode: str = "grouped",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> SplitManifest:
    """Split ``index`` into train/val/test (see module docstring for the modes). Deterministic in ``seed``."""
    fractions = check_fractions(fractions)
    if mode not in MODES:
        raise DataError(f"unknown split mode {mode!r}; use one of {', '.join(MODES)}")
    df = index.df
    if mode == "official":
        present = set(df["source_split"].dropna())
        if not {"train", "val", "test"} <= present:
            raise DataError(f"official split needs the release's Training, Validation and Test folders; "
                            f"{index.root} has only {sorted(present) or 'none'}; use --mode grouped instead")
        split = df["source_split"].astype(str).to_numpy()
    elif mode == "grouped":
        groups = df["lesion_id"].fillna(df["image_id"]).astype(str).to_numpy()
        split = _grouped_split(groups, df["label"].to_numpy(), fractions, seed)
    else:
        split = _image_split(df["label"].to_numpy(), fractions, seed)

    out = pd.DataFrame({
        "image_id": df["image_id"].astype(str).to_numpy(),
        "split": split,
        "label": df["label"].astype("int64").to_numpy(),
        "lesion_id": df["lesion_id"].astype(object).where(df["lesion_id"].notna(), None).to_numpy(),
        "dx": df["dx"].astype(object).where(df["dx"].notna(), None).to_numpy(),
    })
    meta = {
        "mode": mode, "seed": int(seed), "fractions": list(fractions), "positive": list(index.positive),
        "dataset": str(index.root), "dataset_format": index.fmt, "dataset_hash": index.hash,
        "leaked_lesions": leaked_lesions(out), "dropped_images": index.bad,
    }
    return SplitManifest(df=out, meta=meta)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        f = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        raise DataError(f"split fractions {fractions!r} are not numbers; pass e.g. 0.7,0.15,0.15") from None
    if len(f) != 3 or min(f) <= 0 or abs(sum(f) - 1) > 1e-6:
        raise DataError(f"split fractions {fractions!r} must be three positive numbers (train,val,test) "
                        "summing to 1, e.g. 0.7,0.15,0.15")
    return f  # type: ignore[return-value]


def _grouped_split(groups: np.ndarray, labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Stratified, lesion-grouped assignment.

    scikit-learn's StratifiedGroupKFold only makes equal-sized folds, so 70/15/15 would need k=20 folds
    and round every fraction to 5%; this greedy version hits any fractions. Lesions are stratified by
    their label (any positive image makes a positive lesion), shuffled by the seed, placed largest
    first, each into the split whose image count is furthest below its target (relative deficit).
    """
    rng = np.random.default_rng(seed)
    g = pd.DataFrame({"g": groups, "y": labels}).groupby("g", sort=True)
    sizes, glabel = g.size(), g["y"].max()
    target = np.asarray(fractions)
    assign: dict[str, int] = {}
    for y in (1, 0):
        names = sizes.index[glabel.to_numpy() == y].to_numpy()
        names = names[rng.permutation(len(names))]
        s = sizes.loc[names].to_numpy()
        order = np.argsort(-s, kind="stable")  # largest lesions first, random among equal sizes
        want = target * s.sum()
        have = np.zeros(3)
        for i in order:
            k = int(np.argmax((want - have) / want))
            assign[names[i]] = k
            have[k] += s[i]
    return np.asarray(SPLITS)[[assign[x] for x in groups]]


def _image_split(labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Stratified image-level split (the reference study's), via scikit-learn."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, train_size=fractions[0], stratify=labels, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(rest, train_size=val_share, stratify=labels[rest], random_state=seed)
    out = np.empty(len(labels), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out.astype(str)


# --------------------------------------------------------------------------------------------------
# Reporting and defaults
# --------------------------------------------------------------------------------------------------

def leaked_lesions(df: pd.DataFrame) -> int:
    """Number of lesions with images in more than one split."""
    known = df[df["lesion_id"].notna()]
    return int((known.groupby("lesion_id")["split"].nunique() > 1).sum())


def default_split_path(index: DatasetIndex, mode: str = "grouped", seed: int = DEFAULT_SEED,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Path:
    """``$SKINSWEEP_CACHE/splits/<dataset>-<hash>/<mode>-seed<seed>-<70-15-15>-<MEL>.parquet``."""
    f = "-".join(f"{round(x * 100, 2):g}" for x in check_fractions(fractions))
    pos = "+".join(index.positive)
    return cache_dir() / "splits" / dataset_key(index.root) / f"{mode}-seed{seed}-{f}-{pos}.parquet"


def recorded_hash(path: str | Path) -> str | None:
    """The content hash a manifest file records in its metadata, or None when ``path`` is not a readable
    manifest. Reads only the Parquet footer (``SplitManifest.load`` checks it against the rows), cached per
    file version: ``TrialConfig.hash`` asks for it often."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return _recorded_hash(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _recorded_hash(path: str, mtime_ns: int, size: int) -> str | None:
    try:
        raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
        h = json.loads(raw).get("hash") if raw else None
    except (pa.ArrowInvalid, OSError, ValueError, AttributeError):
        return None
    return h if isinstance(h, str) else None


def get_or_create_split(index: DatasetIndex, *, split_path: str | Path | None = None, mode: str = "grouped",
                        seed: int = DEFAULT_SEED, fractions: Sequence[float] = DEFAULT_FRACTIONS
                        ) -> tuple[SplitManifest, Path, bool]:
    """Load the manifest at ``split_path`` (must match the data), or reuse/create the default one.

    Returns (manifest, path, created). A default manifest whose dataset hash no longer matches the data
    (images added, labels changed) is re-created; an explicit ``split_path`` is never overwritten.
    """
    if split_path is not None:
        m = SplitManifest.load(split_path)
        m.check_matches(index, split_path)
        return m, Path(split_path), False
    path = default_split_path(index, mode, seed, fractions)
    if (m := _reusable(path, index)) is not None:
        return m, path, False
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path.parent / f".{path.name}.lock"))
        except OSError as e:
            raise DataError(f"cannot write split manifest {path}: {e.strerror}; set SKINSWEEP_CACHE to a writable "
                            "folder") from None
        # trials of one node starting together: one makes the manifest, the others wait and reuse it
        if (m := _reusable(path, index)) is not None:
            return m, path, False
        m = make_split(index, mode=mode, fractions=fractions, seed=seed)
        m.save(path)
    return m, path, True


def _reusable(path: Path, index: DatasetIndex) -> SplitManifest | None:
    """The default manifest at ``path`` when it exists and matches the data; None when missing, stale or damaged."""
    if not path.is_file():
        return None
    try:
        m = SplitManifest.load(path)
        if m.meta.get("dataset_hash") == index.hash:
            m.check_matches(index, path)
            return m
    except DataError:
        pass  # stale or damaged default manifest: re-created by the caller
    return None
