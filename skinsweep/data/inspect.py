"""``skinsweep data inspect``: what is in a dataset and its split, as plain tables."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from skinsweep.data.index import DatasetIndex
from skinsweep.data.split import SPLITS, SplitManifest, leaked_lesions


@dataclass
class DatasetReport:
    """Tables describing a dataset and one split of it (all computed from the index and manifest)."""

    classes: pd.DataFrame      # rows: diagnosis; columns: train/val/test/all image counts, label
    splits: pd.DataFrame       # rows: train/val/test/all; images, melanoma, prevalence, lesions
    sizes: pd.DataFrame        # rows: width/height; min, median, max
    common_sizes: pd.Series    # "WxH" -> count, most common first
    n_images: int
    n_melanoma: int
    n_lesions: int | None
    n_melanoma_lesions: int | None
    leaked_lesions: int
    split_mode: str
    split_hash: str


def inspect_dataset(index: DatasetIndex, manifest: SplitManifest) -> DatasetReport:
    """The tables ``skinsweep data inspect`` prints, for ``index`` split as ``manifest`` says."""
    df = index.df.merge(manifest.df[["image_id", "split"]], on="image_id", how="left")
    classes = pd.crosstab(df["dx"].fillna("?"), df["split"]).reindex(columns=list(SPLITS), fill_value=0)
    classes["all"] = classes.sum(axis=1)
    classes["label"] = [int(dx in index.positive) for dx in classes.index]
    classes = classes.sort_values("all", ascending=False)
    has_lesions = index.has_lesions
    sizes = pd.DataFrame({
        "min": [df["width"].min(), df["height"].min()],
        "median": [df["width"].median(), df["height"].median()],
        "max": [df["width"].max(), df["height"].max()],
    }, index=["width", "height"])
    common = (df["width"].astype(str) + "x" + df["height"].astype(str)).value_counts()
    return DatasetReport(
        classes=classes, splits=manifest.summary(), sizes=sizes, common_sizes=common,
        n_images=len(df), n_melanoma=int(df["label"].sum()),
        n_lesions=int(df["lesion_id"].nunique()) if has_lesions else None,
        n_melanoma_lesions=int(df.loc[df["label"] == 1, "lesion_id"].nunique()) if has_lesions else None,
        leaked_lesions=leaked_lesions(manifest.df), split_mode=manifest.meta.get("mode", "?"),
        split_hash=manifest.hash,
    )


