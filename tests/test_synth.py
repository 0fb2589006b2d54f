"""Tests for skinsweep.data.synth: the synthetic ISIC 2018 Task 3 / HAM10000 look-alike."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinsweep.data.synth import CLASSES, SynthSummary, synthesize
from skinsweep.errors import ConfigError, DataError

GT_HEADER = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
META_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
SITES = {"back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot",
         "unknown", "neck", "scalp", "hand", "ear", "genital", "acral"}
REAL_META = Path(__file__).parents[2] / "shared/data/isic2018/HAM10000_metadata.csv"
SMALL = (96, 72)


def make(out: Path, n: int = 40, **kw) -> SynthSummary:
    kw = {"size": SMALL, "workers": 1, "progress": False, **kw}
    return synthesize(out, n, **kw)


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def train_gt(out: Path) -> Path:
    return out / "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"


def all_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, make(out, 120, seed=3)


# ---- layout and label files ----------------------------------------------------------------------


def test_release_layout_headers_and_ids(small):
    out, summary = small
    header, gt = read(train_gt(out))
    assert header == GT_HEADER
    meta_header, meta = read(out / "HAM10000_metadata.csv")
    assert meta_header == META_HEADER
    assert not (out / "ISIC2018_Task3_Validation_Input").exists()  # official=False: training only

    ids = [r["image"] for r in gt]
    assert ids == [f"ISIC_{24306 + i:07d}" for i in range(120)]  # release numbering, sorted
    jpgs = sorted(p.stem for p in (out / "ISIC2018_Task3_Training_Input").iterdir())
    assert jpgs == ids
    assert sorted(r["image_id"] for r in meta) == ids
    assert all(re.fullmatch(r"HAM_\d{7}", r["lesion_id"]) for r in meta)
    assert (summary.n_images, summary.splits) == (120, {"train": 120})
    assert summary.n_lesions == len({r["lesion_id"] for r in meta})


def test_ground_truth_is_one_hot_and_matches_dx(small):
    out, summary = small
    dx = {r["image_id"]: r["dx"] for r in read(out / "HAM10000_metadata.csv")[1]}
    raw_lines = train_gt(out).read_text().splitlines()[1:]
    for line, row in zip(raw_lines, read(train_gt(out))[1]):
        cells = line.split(",")[1:]
        assert set(cells) <= {"0.0", "1.0"} and cells.count("1.0") == 1, line  # release format
        assert CLASSES[cells.index("1.0")].lower() == dx[row["image"]]
    assert summary.n_melanoma == sum(v == "mel" for v in dx.values())


def test_metadata_values_use_ham10000_vocabulary(small):
    out, _ = small
    for r in read(out / "HAM10000_metadata.csv")[1]:
        assert r["dx"] in {c.lower() for c in CLASSES}
        assert r["dx_type"] in {"histo", "follow_up", "consensus", "confocal"}
        assert r["sex"] in {"male", "female", "unknown"}
        assert r["localization"] in SITES
        assert r["age"] == "" or re.fullmatch(r"\d{1,2}\.0", r["age"]), r["age"]


@pytest.mark.parametrize("rate", [0.111, 0.3])
def test_melanoma_share_is_near_target(tmp_path, rate):
    summary = make(tmp_path / "ds", 300, melanoma_rate=rate, size=(32, 24))
    assert abs(summary.n_melanoma / 300 - rate) < 0.01
    counts = defaultdict(int)
    for r in read(tmp_path / "ds/HAM10000_metadata.csv")[1]:
        counts[r["dx"]] += 1
    assert counts["nv"] > counts["bkl"] > counts["bcc"] > counts["df"]  # HAM10000's order


def test_repeated_lesions_share_dx_and_melanomas_repeat_more(tmp_path):
    make(tmp_path / "ds", 400, melanoma_rate=0.3, size=(32, 24))
    per_lesion = defaultdict(list)
    for r in read(tmp_path / "ds/HAM10000_metadata.csv")[1]:
        per_lesion[r["lesion_id"]].append(r)
    assert any(len(v) > 1 for v in per_lesion.values())
    for rows in per_lesion.values():  # one lesion = one diagnosis and one patient
        assert len({(r["dx"], r["age"], r["sex"], r["localization"]) for r in rows}) == 1

    def images_per_lesion(dx: str) -> float:
        sizes = [len(v) for v in per_lesion.values() if v[0]["dx"] == dx]
        return sum(sizes) / len(sizes)

    assert images_per_lesion("mel") > images_per_lesion("nv") + 0.3  # HAM: 1.81 vs 1.24


def test_official_splits_are_by_lesion(tmp_path):
    out = tmp_path / "ds"
    summary = make(out, 150, official=True, size=(32, 24))
    split_of: dict[str, str] = {}
    for split in ("Training", "Validation", "Test"):
        header, gt = read(out / f"ISIC2018_Task3_{split}_GroundTruth/ISIC2018_Task3_{split}_GroundTruth.csv")
        assert header == GT_HEADER
        jpgs = {p.stem for p in (out / f"ISIC2018_Task3_{split}_Input").iterdir()}
        assert jpgs == {r["image"] for r in gt}
        split_of.update({r["image"]: split for r in gt})
    assert sorted(split_of) == [f"ISIC_{24306 + i:07d}" for i in range(150)]
    assert summary.splits == {s: sum(v == name for v in split_of.values()) for s, name in
                              (("train", "Training"), ("validation", "Validation"), ("test", "Test"))}
    assert 0.6 < summary.splits["train"] / 150 < 0.8 and summary.splits["validation"] > 5
    meta = read(out / "HAM10000_metadata.csv")[1]  # covers every split (documented difference)
    assert {r["image_id"] for r in meta} == set(split_of)
    lesion_splits = defaultdict(set)
    for r in meta:
        lesion_splits[r["lesion_id"]].add(split_of[r["image_id"]])
    assert all(len(s) == 1 for s in lesion_splits.values())


# ---- images ----------------------------------------------------------------------------------


def test_images_are_rgb_jpegs_of_the_requested_size(small):
    out, _ = small
    for p in sorted((out / "ISIC2018_Task3_Training_Input").iterdir())[:10]:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", SMALL)


def test_default_size_is_the_release_600x450(tmp_path):
    synthesize(tmp_path / "ds", 2, workers=1, progress=False)
    for p in (tmp_path / "ds/ISIC2018_Task3_Training_Input").iterdir():
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (600, 450))
            assert np.asarray(im).std() > 10  # not a blank frame


def test_melanomas_are_darker_and_more_varied_than_nevi(tmp_path):
    out = tmp_path / "ds"
    make(out, 200, melanoma_rate=0.5, seed=1)
    stats = defaultdict(list)
    for r in read(out / "HAM10000_metadata.csv")[1]:
        a = np.asarray(Image.open(out / f"ISIC2018_Task3_Training_Input/{r['image_id']}.jpg"), float)
        centre = a[18:54, 24:72]  # the middle half, where the lesion sits
        stats[r["dx"]].append((np.percentile(centre.mean(2), 10), centre.reshape(-1, 3).std(0).mean()))
    mel, nv = np.mean(stats["mel"], 0), np.mean(stats["nv"], 0)
    assert mel[0] < nv[0] - 5, (mel, nv)  # darkest tenth of the lesion area: darker
    assert mel[1] > nv[1] + 1, (mel, nv)  # colour spread: more colours


# ---- determinism ---------------------------------------------------------------------------------


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(tmp_path):
    make(tmp_path / "a", 24, seed=5)
    make(tmp_path / "b", 24, seed=5, workers=2)  # work split differently, same files
    make(tmp_path / "c", 24, seed=6)
    a, b, c = (all_bytes(tmp_path / k) for k in "abc")
    assert a == b
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in jpgs)
    assert a["HAM10000_metadata.csv"] != c["HAM10000_metadata.csv"]


# sha256 over (relative path, bytes) of every file of one small official run, captured from the code
# before the painter and the writer were split into two modules; a change here changes every demo.
GOLDEN_SHA256 = "9f92527cbf76a463dc4549a9312104a3b99631ee183563a7668ace67ff1727c4"


def test_same_arguments_give_the_recorded_bytes(tmp_path):
    synthesize(tmp_path / "ds", 24, seed=7, size=(64, 48), official=True, workers=1, progress=False)
    digest = hashlib.sha256()
    for name, data in all_bytes(tmp_path / "ds").items():
        digest.update(name.encode())
        digest.update(data)
    assert digest.hexdigest() == GOLDEN_SHA256  # same numpy / Pillow: ids, labels and pixels unchanged


def test_rerun_replaces_a_previous_synthetic_output(tmp_path):
    out = tmp_path / "ds"
    make(out, 30)
    make(out, 10, progress=True)
    assert len(list((out / "ISIC2018_Task3_Training_Input").iterdir())) == 10  # no stale images
    assert len(read(train_gt(out))[1]) == 10


# ---- like= ---------------------------------------------------------------------------------------


FAKE_META = """lesion_id,image_id,dx,dx_type,age,sex,localization
HAM_0000001,ISIC_0000100,mel,histo,70.0,male,back
HAM_0000001,ISIC_0000101,mel,histo,70.0,male,back
HAM_0000002,ISIC_0000102,nv,follow_up,35.0,female,trunk
HAM_0000003,ISIC_0000103,nv,follow_up,,unknown,unknown
HAM_0000003,ISIC_0000104,nv,follow_up,,unknown,unknown
HAM_0000003,ISIC_0000105,nv,follow_up,,unknown,unknown
HAM_0000004,ISIC_0000106,bkl,confocal,60.0,male,face
HAM_0000005,ISIC_0000107,bcc,histo,80.0,female,scalp
HAM_0000006,ISIC_0000108,df,consensus,45.0,male,lower extremity
HAM_0000007,ISIC_0000109,vasc,histo,10.0,female,abdomen
HAM_0000008,ISIC_0000110,akiec,histo,75.0,male,hand
HAM_0000009,ISIC_0000111,nv,histo,50.0,male,back
"""


def test_like_copies_ids_lesions_dx_and_metadata(tmp_path):
    like = tmp_path / "meta.csv"
    like.write_text(FAKE_META)
    summary = make(tmp_path / "ds", None, like=like)
    assert (summary.n_images, summary.n_lesions, summary.n_melanoma) == (12, 9, 2)
    assert read(tmp_path / "ds/HAM10000_metadata.csv") == read(like)
    gt = {r["image"]: r for r in read(train_gt(tmp_path / "ds"))[1]}
    for r in read(like)[1]:
        assert gt[r["image_id"]][r["dx"].upper()] == "1.0"
        assert (tmp_path / f"ds/ISIC2018_Task3_Training_Input/{r['image_id']}.jpg").is_file()


def test_like_with_smaller_n_keeps_whole_lesions_deterministically(tmp_path):
    like = tmp_path / "meta.csv"
    like.write_text(FAKE_META)
    s1 = make(tmp_path / "a", 6, like=like, seed=2)
    make(tmp_path / "b", 6, like=like, seed=2)
    assert s1.n_images == 6
    rows = read(tmp_path / "a/HAM10000_metadata.csv")[1]
    assert rows == read(tmp_path / "b/HAM10000_metadata.csv")[1]
    full = defaultdict(set)
    for r in read(like)[1]:
        full[r["lesion_id"]].add(r["image_id"])
    kept = defaultdict(set)
    for r in rows:
        kept[r["lesion_id"]].add(r["image_id"])
    assert all(kept[k] == full[k] for k in kept)  # a lesion is in whole or not at all


def test_like_with_only_required_columns_draws_metadata_per_lesion(tmp_path):
    like = tmp_path / "meta.csv"
    like.write_text("image_id,lesion_id,dx\n" + "".join(
        f"IMG_{i},L{i // 3},{'mel' if i < 6 else 'nv'}\n" for i in range(12)))
    make(tmp_path / "ds", None, like=like, official=True)
    rows = read(tmp_path / "ds/HAM10000_metadata.csv")[1]
    assert [r["image_id"] for r in rows] == [f"IMG_{i}" for i in range(12)]
    per_lesion = defaultdict(set)
    for r in rows:
        assert r["sex"] in {"male", "female", "unknown"} and r["localization"] in SITES
        per_lesion[r["lesion_id"]].add((r["dx_type"], r["age"], r["sex"], r["localization"]))
    assert all(len(v) == 1 for v in per_lesion.values())


@pytest.mark.realdata
def test_like_real_ham10000_metadata(tmp_path):
    if not REAL_META.is_file():
        pytest.skip(f"{REAL_META} not present (only in the shared reference data)")
    summary = make(tmp_path / "ds", 30, like=REAL_META, size=(32, 24))
    real = {r["image_id"]: r for r in read(REAL_META)[1]}
    rows = read(tmp_path / "ds/HAM10000_metadata.csv")[1]
    assert summary.n_images == len(rows) == 30
    assert all(r == real[r["image_id"]] for r in rows)
    per_lesion = defaultdict(int)
    for r in real.values():
        per_lesion[r["lesion_id"]] += 1
    kept = defaultdict(int)
    for r in rows:
        kept[r["lesion_id"]] += 1
    assert all(kept[k] == per_lesion[k] for k in kept)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, r"^n: .*>= 1"),
    ({"n": 2.5}, r"^n: "),
    ({"size": (8, 8)}, r"^size: .*>= 16"),
    ({"size": (100,)}, r"^size: "),
    ({"melanoma_rate": 0.0}, r"^melanoma_rate: .*between 0 and 1"),
    ({"melanoma_rate": 1.0}, r"^melanoma_rate: "),
    ({"workers": 0}, r"^workers: "),
    ({"quality": 0}, r"^quality: "),
    ({"seed": -1}, r"^seed: "),
])
def test_bad_arguments_raise_config_error(tmp_path, kwargs, match):
    kwargs = {"n": 4, "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=match):
        synthesize(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()  # nothing written before the arguments are checked


@pytest.mark.parametrize("content, match", [
    ("image_id,dx\nISIC_1,mel\n", r"like: .*meta\.csv lacks column\(s\) lesion_id"),
    ("lesion_id,image_id,dx\n", r"like: .*no rows"),
    ("lesion_id,image_id,dx\nHAM_1,ISIC_1,melanoma\n", r"like: .*unknown dx value\(s\) melanoma"),
    ("lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\nHAM_2,ISIC_1,nv\n", r"like: .*repeats image_id"),
    ("lesion_id,image_id,dx\nHAM_1,../evil,mel\n", r"like: .*not plain file names"),
])
def test_bad_like_file_raises_data_error(tmp_path, content, match):
    like = tmp_path / "meta.csv"
    like.write_text(content)
    with pytest.raises(DataError, match=match):
        make(tmp_path / "ds", 4, like=like)


def test_missing_like_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match=r"like: .*does not exist"):
        make(tmp_path / "ds", 4, like=tmp_path / "nope.csv")


@pytest.mark.parametrize("setup, match", [
    (lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")), r"out: .*not empty.*notes\.txt"),
    (lambda out: out.write_text("a file"), r"out: .*is a file"),
])
def test_refuses_to_overwrite_unrelated_files(tmp_path, setup, match):
    out = tmp_path / "ds"
    setup(out)
    before = all_bytes(tmp_path)
    with pytest.raises(DataError, match=match):
        make(out, 4)
    assert all_bytes(tmp_path) == before


def test_refuses_previous_output_with_foreign_files_inside(tmp_path):
    out = tmp_path / "ds"
    make(out, 4)
    (out / "ISIC2018_Task3_Training_Input/my_notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"out: .*my_notes\.txt"):
        make(out, 4)
    assert (out / "ISIC2018_Task3_Training_Input/my_notes.txt").read_text() == "keep me"


def test_first_id_and_melanoma_rate_make_another_site(tmp_path):
    from typer.testing import CliRunner

    from skinsweep.cli import app

    make(tmp_path / "d", 12, seed=3, first_id=100000)
    ids = sorted(p.stem for p in (tmp_path / "d" / "ISIC2018_Task3_Training_Input").glob("*.jpg"))
    assert ids == [f"ISIC_{100000 + k:07d}" for k in range(12)]
    with pytest.raises(ConfigError, match="first_id"):
        make(tmp_path / "e", 4, first_id=-1)
    r = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "f"), "--n", "20", "--melanoma-rate", "0.5",
                                 "--first-id", "7", "--size", "32x24", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "20 images (10 melanoma" in r.output
    assert (tmp_path / "f" / "ISIC2018_Task3_Training_Input" / "ISIC_0000007.jpg").is_file()
