"""Split manifests: grouping, stratification, determinism, persistence and matching."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import make_rows, write_isic
from skinsweep.data.index import DatasetIndex, load_index
from skinsweep.data.split import (SplitManifest, get_or_create_split, leaked_lesions, make_split)
from skinsweep.errors import DataError


def synthetic_index(n_lesions=2000, seed=0) -> DatasetIndex:
    """A label-only index (no files) with HAM-like structure: 11% melanoma, repeated lesions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for lesion in range(n_lesions):
        mel = rng.random() < 0.08
        copies = rng.choice([1, 2, 3, 4], p=[0.6, 0.2, 0.1, 0.1] if mel else [0.8, 0.12, 0.05, 0.03])
        for _ in range(copies):
            rows.append({"image_id": f"ISIC_{len(rows):07d}", "lesion_id": f"HAM_{lesion:07d}",
                         "dx": "MEL" if mel else "NV", "label": int(mel), "source_split": "train"})
    df = pd.DataFrame(rows)
    for c in ("path", "age", "sex", "site", "dx_type", "width", "height"):
        df[c] = None
    return DatasetIndex(df=df, root=__import__("pathlib").Path("/synthetic"), fmt="csv", positive=("MEL",))


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.1, 0.1)])
def test_grouped_split_has_no_leak_and_hits_targets(seed, fractions):
    idx = synthetic_index()
    m = make_split(idx, mode="grouped", fractions=fractions, seed=seed)
    assert leaked_lesions(m.df) == 0 and m.meta["leaked_lesions"] == 0
    s = m.summary()
    total, prev = s.loc["all", "images"], s.loc["all", "prevalence"]
    for name, frac in zip(("train", "val", "test"), fractions):
        assert abs(s.loc[name, "images"] / total - frac) < 0.01, name
        assert abs(s.loc[name, "prevalence"] - prev) < 0.01, name


def test_split_is_deterministic_and_seeded():
    idx = synthetic_index()
    a, b = make_split(idx, seed=3), make_split(idx, seed=3)
    assert a.hash == b.hash and a.df.equals(b.df)
    assert make_split(idx, seed=4).hash != a.hash


def test_image_mode_reports_the_leak():
    idx = synthetic_index()
    m = make_split(idx, mode="image", seed=0)
    assert m.meta["leaked_lesions"] > 50
    s = m.summary()
    assert abs(s.loc["test", "prevalence"] - s.loc["all", "prevalence"]) < 0.01


def test_official_mode(official_dir):
    m = make_split(load_index(official_dir), mode="official")
    assert m.df["split"].value_counts().to_dict() == {"train": 60, "test": 18, "val": 12}


def test_official_mode_needs_the_release_folders(isic_dir):
    with pytest.raises(DataError, match=r"official split needs .* has only \['train'\]; use --mode grouped"):
        make_split(load_index(isic_dir), mode="official")


@pytest.mark.parametrize("fractions, mode, message", [
    ((0.7, 0.2, 0.2), "grouped", r"summing to 1"),
    ((0.7, 0.3), "grouped", r"three positive numbers"),
    ((1.0, 0.0, 0.0), "grouped", r"three positive numbers"),
    (("a", 0.5, 0.5), "grouped", r"not numbers"),
    ((0.7, 0.15, 0.15), "random", r"unknown split mode 'random'"),
])
def test_bad_split_settings(fractions, mode, message):
    with pytest.raises(DataError, match=message):
        make_split(synthetic_index(50), mode=mode, fractions=fractions)


def test_manifest_round_trip_and_schema(tmp_path, isic_dir):
    idx = load_index(isic_dir)
    m = make_split(idx, seed=1)
    path = m.save(tmp_path / "split.parquet")
    back = SplitManifest.load(path)
    assert back.hash == m.hash and back.meta["mode"] == "grouped" and back.meta["dataset_hash"] == idx.hash
    assert pq.read_schema(path).names == ["image_id", "split", "label", "lesion_id", "dx"]
    assert set(back.df["split"]) == {"train", "val", "test"}
    back.check_matches(idx)


def test_edited_manifest_is_refused(tmp_path, isic_dir):
    m = make_split(load_index(isic_dir))
    path = m.save(tmp_path / "split.parquet")
    table = pq.read_table(path)
    df = table.to_pandas()
    df.loc[0, "split"] = "test" if df.loc[0, "split"] != "test" else "train"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(DataError, match="was edited after it was written"):
        SplitManifest.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.iloc[1:], r"0 manifest images not in the dataset .*1 dataset images not in the manifest"),
    (lambda d: d.assign(label=1 - d["label"]), r"disagrees with dataset .* on the label of 60 images"),
])
def test_manifest_must_match_the_data(isic_dir, change, message):
    idx = load_index(isic_dir)
    m = make_split(idx)
    other = SplitManifest(df=change(m.df).reset_index(drop=True), meta=m.meta)
    with pytest.raises(DataError, match=message):
        other.check_matches(idx)


@pytest.mark.parametrize("content, message", [(b"not parquet", "not a readable Parquet"), (None, "not found")])
def test_bad_manifest_file(tmp_path, content, message):
    path = tmp_path / "split.parquet"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        SplitManifest.load(path)


def test_default_split_is_created_then_reused_then_refreshed(tmp_path):
    root = write_isic(tmp_path / "d", make_rows(40))
    m1, p1, created1 = get_or_create_split(load_index(root))
    m2, p2, created2 = get_or_create_split(load_index(root))
    assert created1 and not created2 and p1 == p2 and m1.hash == m2.hash
    assert not str(p1).startswith(str(root))  # never written into the dataset folder
    # the data changes (one more labelled image): the default manifest is re-created, not reused
    write_isic(tmp_path / "d", make_rows(41))
    m3, p3, created3 = get_or_create_split(load_index(root))
    assert created3 and p3 == p1 and len(m3.df) == 41


def test_dataset_folder_may_be_read_only(tmp_path):
    import os
    import stat

    root = write_isic(tmp_path / "ro", make_rows(30))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    os.chmod(root, 0o555)
    try:
        m, path, created = get_or_create_split(load_index(root))
        assert created and path.is_file()
    finally:
        os.chmod(root, 0o755)


@pytest.mark.realdata
@pytest.mark.parametrize("mode", ["grouped", "image"])
def test_real_labels_split(real_labels_dir, mode):
    idx = load_index(real_labels_dir, verify=False)
    train_only = DatasetIndex(df=idx.df[idx.df["source_split"] == "train"].reset_index(drop=True),
                              root=idx.root, fmt=idx.fmt, positive=idx.positive)
    m = make_split(train_only, mode=mode, seed=0)
    s = m.summary()
    assert s.loc["all", "images"] == 10015
    for name in ("train", "val", "test"):
        assert abs(s.loc[name, "prevalence"] - 0.111) <= 0.01, name
    if mode == "grouped":
        assert m.meta["leaked_lesions"] == 0
    else:
        assert m.meta["leaked_lesions"] > 500  # measured: ~1,000 lesions straddle splits


def test_inspect_dataset_tables_agree_with_the_index_and_manifest(isic_dir):
    from skinsweep.data.inspect import inspect_dataset

    idx = load_index(isic_dir)
    m = make_split(idx, seed=0)
    r = inspect_dataset(idx, m)
    assert (r.n_images, r.n_melanoma) == (60, int(idx.df["label"].sum()))
    assert r.n_lesions == idx.df["lesion_id"].nunique() < 60
    assert list(r.classes.columns) == ["train", "val", "test", "all", "label"]
    assert r.classes["all"].sum() == 60 and r.classes.loc["MEL", "label"] == 1
    assert r.classes["all"].is_monotonic_decreasing  # most common diagnosis first
    assert (r.classes[["train", "val", "test"]].sum(axis=1) == r.classes["all"]).all()
    assert r.splits.loc["all", "images"] == 60 and r.leaked_lesions == 0
    assert r.sizes.loc["width"].tolist() == [60, 60, 60] and r.common_sizes.to_dict() == {"60x45": 60}
    assert (r.split_mode, r.split_hash) == ("grouped", m.hash)
