"""Dataset readers: layouts, label parsing, metadata join, and one-line errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import CLASSES, make_rows, write_ham_metadata, write_image, write_isic
from skinsweep.data.index import INDEX_COLUMNS, load_index, read_rgb
from skinsweep.errors import DataError


# ---- layouts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("float_labels", [True, False])
@pytest.mark.parametrize("columns", [("image",) + CLASSES, ("VASC", "image", "NV", "MEL", "DF", "BKL", "AKIEC", "BCC")])
def test_isic_layout_any_column_order_and_number_format(tmp_path, float_labels, columns):
    rows = make_rows(30)
    root = write_isic(tmp_path / "d", rows, float_labels=float_labels, columns=columns)
    idx = load_index(root)
    assert idx.fmt == "isic" and len(idx) == 30
    assert list(idx.df.columns) == list(INDEX_COLUMNS)
    expected = {r["image_id"]: int(r["dx"] == "MEL") for r in rows}
    assert dict(zip(idx.df["image_id"], idx.df["label"])) == expected
    assert set(idx.df["dx"]) <= set(CLASSES)
    assert (idx.df["width"] == 60).all() and (idx.df["height"] == 45).all()


def test_isic_joins_ham_metadata(isic_dir):
    idx = load_index(isic_dir)
    rows = {r["image_id"]: r for r in make_rows(60)}
    df = idx.df.set_index("image_id")
    for image_id, r in rows.items():
        assert df.loc[image_id, "lesion_id"] == r["lesion_id"]
        assert df.loc[image_id, "sex"] == r["sex"] and df.loc[image_id, "site"] == "back"
    assert df["lesion_id"].nunique() < len(df)  # some lesions photographed twice
    assert idx.has_lesions


def test_isic_without_metadata_has_no_lesions(tmp_path):
    idx = load_index(write_isic(tmp_path / "d", make_rows(20), metadata=False))
    assert not idx.has_lesions and idx.df["lesion_id"].isna().all()


def test_official_layout_records_release_split(official_dir):
    idx = load_index(official_dir)
    counts = idx.df["source_split"].value_counts().to_dict()
    assert counts == {"train": 60, "val": 12, "test": 18}
    # metadata covers the training images only, as in the real release
    assert idx.df.loc[idx.df["source_split"] == "train", "lesion_id"].notna().all()
    assert idx.df.loc[idx.df["source_split"] != "train", "lesion_id"].isna().all()


def test_ham_distribution_layout(tmp_path):
    root = tmp_path / "ham"
    rows = make_rows(24)
    write_ham_metadata(root / "HAM10000_metadata.csv", rows)
    for k, r in enumerate(rows):
        part = "HAM10000_images_part_1" if k < 12 else "HAM10000_images_part_2"
        write_image(root / part / f"{r['image_id']}.jpg", seed=k)
    idx = load_index(root)
    assert idx.fmt == "ham" and len(idx) == 24
    assert idx.df["label"].sum() == sum(r["dx"] == "MEL" for r in rows)
    assert idx.df["path"].str.contains("part_2").sum() == 12


def test_plain_csv(tmp_path):
    for k in range(10):
        write_image(tmp_path / "imgs" / f"x{k}.png", seed=k)
    pd.DataFrame({"path": [f"imgs/x{k}.png" for k in range(10)], "label": [1, 0] * 5,
                  "lesion_id": [f"L{k // 2}" for k in range(10)]}).to_csv(tmp_path / "data.csv", index=False)
    idx = load_index(tmp_path / "data.csv")
    assert idx.fmt == "csv" and len(idx) == 10 and idx.df["label"].sum() == 5
    assert idx.df["image_id"].tolist() == sorted(f"x{k}" for k in range(10))
    assert Path(idx.df["path"][0]).is_absolute()


@pytest.mark.parametrize("positive, n_pos", [(("MEL",), 6), (("mel", "BCC"), None)])
def test_positive_classes_configurable(isic_dir, positive, n_pos):
    idx = load_index(isic_dir, positive=positive)
    want = idx.df["dx"].isin([p.upper() for p in positive]).sum()
    assert idx.df["label"].sum() == want
    if n_pos is not None:
        assert want == n_pos


def test_image_modes_read_as_rgb(tmp_path):
    """Grayscale, RGBA, CMYK and EXIF-rotated files all come back as upright RGB."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white → after a 90° EXIF rotation it is the top or bottom half
    Image.fromarray(arr[..., 0]).save(tmp_path / "gray.jpg")
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° CW to display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif)
    for name in ("gray.jpg", "rgba.png", "cmyk.jpg"):
        im = read_rgb(tmp_path / name)
        assert im.mode == "RGB" and im.size == (40, 20), name
        assert np.asarray(im)[:, :15].mean() > 200 and np.asarray(im)[:, 25:].mean() < 60, name
    rot = read_rgb(tmp_path / "rot.jpg")
    assert rot.mode == "RGB" and rot.size == (20, 40)  # rotated upright


# ---- errors ----------------------------------------------------------------------------------------
def _gt(root: Path) -> Path:
    return root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"


def _img_dir(root: Path) -> Path:
    return root / "ISIC2018_Task3_Training_Input"


def _edit_csv(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype=str)
    fn(df).to_csv(path, index=False)


BREAKAGES = [
    ("missing_gt", lambda r: _gt(r).unlink(), r"ground-truth CSV missing: .*GroundTruth\.csv"),
    ("missing_image_dir", lambda r: shutil.rmtree(_img_dir(r)), r"image folder missing: .*Training_Input"),
    ("listed_but_missing", lambda r: (_img_dir(r) / "ISIC_0024310.jpg").unlink(),
     r"1 images listed in .* are missing .*ISIC_0024310.*--skip-bad"),
    ("unlisted", lambda r: write_image(_img_dir(r) / "ISIC_9999999.jpg", 1),
     r"1 images in .* are not listed .*ISIC_9999999"),
    ("duplicate_ids", lambda r: _edit_csv(_gt(r), lambda d: pd.concat([d, d.iloc[:2]])),
     r"2 duplicate image ids \(ISIC_0024306, ISIC_0024307\)"),
    ("not_one_hot", lambda r: _edit_csv(_gt(r), lambda d: d.assign(MEL=d["MEL"].where(d.index != 3, "1.0"), NV=d["NV"].where(d.index != 3, "1.0"))),
     r"1 rows are not one-hot .*ISIC_0024309"),
    ("unknown_column", lambda r: _edit_csv(_gt(r), lambda d: d.assign(UNK="0.0")), r"unknown column\(s\) UNK"),
    ("missing_column", lambda r: _edit_csv(_gt(r), lambda d: d.drop(columns=["DF"])), r"missing column\(s\) DF"),
    ("not_a_csv", lambda r: _gt(r).write_bytes(b"\x00\xff\x00garbage\n\x01"), r"GroundTruth\.csv"),
    ("meta_disagrees", lambda r: _edit_csv(r / "HAM10000_metadata.csv", lambda d: d.assign(dx="nv")),
     r"disagrees with the ground-truth CSV on the diagnosis"),
    ("meta_bad_dx", lambda r: _edit_csv(r / "HAM10000_metadata.csv", lambda d: d.assign(dx="xyz")),
     r"unknown diagnoses \['XYZ'\]"),
    ("corrupt", lambda r: (_img_dir(r) / "ISIC_0024311.jpg").write_bytes(b"not a jpeg"),
     r"1 images cannot be decoded: ISIC_0024311\.jpg .*--skip-bad"),
    ("truncated", lambda r: (_img_dir(r) / "ISIC_0024312.jpg").write_bytes((_img_dir(r) / "ISIC_0024312.jpg").read_bytes()[:300]),
     r"1 images cannot be decoded: ISIC_0024312\.jpg"),
]


@pytest.mark.parametrize("name, break_it, message", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_bad_isic_input_one_line_error(tmp_path, name, break_it, message):
    root = write_isic(tmp_path / "d", make_rows(20))
    break_it(root)
    with pytest.raises(DataError, match=message) as e:
        load_index(root)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, r"does not exist"),
    (lambda p: p.mkdir(), r"no known dataset layout"),
    (lambda p: p.write_text("x"), r"not a \.csv"),
])
def test_bad_root(tmp_path, setup, message):
    root = tmp_path / "thing"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_index(root)


@pytest.mark.parametrize("positive, message", [(("XYZ",), r"no positives for positive classes XYZ"),
                                                (CLASSES, r"no negatives")])
def test_single_class_dataset_is_an_error(isic_dir, positive, message):
    with pytest.raises(DataError, match=message):
        load_index(isic_dir, positive=positive)


@pytest.mark.parametrize("rows, message", [
    ({"path": ["a.png"], "label": [2]}, r"'label' must be 0 or 1"),
    ({"path": ["a.png"], "label": [1], "colour": ["red"]}, r"unknown column\(s\) colour"),
    ({"file": ["a.png"], "label": [1]}, r"missing column\(s\) path"),
    ({"path": ["nope.png", "a.png"], "label": [1, 0]}, r"1 listed images do not exist \(.*nope\.png"),
    ({"path": ["a.png", "a.png"], "label": [1, 0]}, r"duplicate image ids \(a\)"),
])
def test_bad_plain_csv(tmp_path, rows, message):
    write_image(tmp_path / "a.png", 0)
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(DataError, match=message):
        load_index(tmp_path / "data.csv")


def test_skip_bad_drops_and_records(tmp_path):
    root = write_isic(tmp_path / "d", make_rows(20))
    (_img_dir(root) / "ISIC_0024311.jpg").write_bytes(b"not a jpeg")
    (_img_dir(root) / "ISIC_0024310.jpg").unlink()
    write_image(_img_dir(root) / "ISIC_9999999.jpg", 1)
    idx = load_index(root, skip_bad=True)
    assert len(idx) == 18
    assert {b["image_id"]: b["reason"].split(":")[0] for b in idx.bad} == {
        "ISIC_0024310": "missing", "ISIC_9999999": "unlisted", "ISIC_0024311": "UnidentifiedImageError"}


def test_image_check_is_memoised_and_notices_changes(isic_dir, monkeypatch):
    load_index(isic_dir)
    import skinsweep.data.index as index_mod

    calls = []
    real = index_mod._check_images
    monkeypatch.setattr(index_mod, "_check_images", lambda paths: calls.append(len(paths)) or real(paths))
    load_index(isic_dir)
    assert sum(calls) == 0  # nothing re-decoded
    (_img_dir(isic_dir) / "ISIC_0024320.jpg").write_bytes(b"broken now")
    with pytest.raises(DataError, match="ISIC_0024320"):
        load_index(isic_dir)
    assert sum(calls) == 1  # only the changed file


# ---- the real release label files -----------------------------------------------------------------
@pytest.mark.realdata
def test_real_label_files(real_labels_dir):
    idx = load_index(real_labels_dir, verify=False)
    df = idx.df
    assert len(df) == 10015 + 193 + 1512
    train = df[df["source_split"] == "train"]
    assert train["label"].sum() == 1113 and train["lesion_id"].nunique() == 7470
    assert train.loc[train["label"] == 1, "lesion_id"].nunique() == 614
    assert df.loc[df["source_split"] == "val", "label"].sum() == 21
    assert df.loc[df["source_split"] == "test", "label"].sum() == 171
