"""Image cache: pixels equal a direct decode + resize, reuse, staleness, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import make_rows, shared, write_image, write_isic
from skinsweep.data.cache import build_cache, decode_resize
from skinsweep.data.index import load_index
from skinsweep.errors import DataError


@pytest.mark.parametrize("policy", ["squash", "center-crop"])
@pytest.mark.parametrize("workers", [1, 2])
def test_cache_pixels_equal_direct_decode(tmp_path, policy, workers):
    root = write_isic(tmp_path / "d", make_rows(300), size=(80, 60))  # >2 chunks: exercises the process pool
    idx = load_index(root)
    cache = build_cache(idx, size=32, policy=policy, workers=workers)
    assert cache.images.shape == (300, 32, 32, 3) and cache.images.dtype == np.uint8
    for i in (0, 57, 299):
        direct = decode_resize(idx.df["path"][i], 32, policy)
        np.testing.assert_array_equal(cache.images[i], direct)
        np.testing.assert_array_equal(cache.get([idx.df["image_id"][i]])[0], direct)


def test_center_crop_differs_from_squash_on_non_square_images(isic_dir):
    path = load_index(isic_dir).df["path"][0]
    assert not np.array_equal(decode_resize(path, 32, "squash"), decode_resize(path, 32, "center-crop"))


def test_cache_is_reused_then_rebuilt_when_stale(isic_dir, monkeypatch):
    idx = load_index(isic_dir)
    first = build_cache(idx, size=24)
    import skinsweep.data.cache as cache_mod

    calls = []
    real = cache_mod._fill_rows
    monkeypatch.setattr(cache_mod, "_fill_rows", lambda items, **kw: calls.append(len(items)) or real(items, **kw))
    again = build_cache(load_index(isic_dir), size=24)
    assert calls == [] and again.path == first.path  # reused, nothing decoded

    # an image is replaced on disk: the cache is stale and rebuilt with the new pixels
    target = idx.df["path"][5]
    write_image(__import__("pathlib").Path(target), seed=999)
    os.utime(target, ns=(1, 1_000_000_000_000))
    fresh = build_cache(load_index(isic_dir), size=24, workers=1)
    assert sum(calls) == len(idx) and fresh.key != first.key
    np.testing.assert_array_equal(fresh.images[5], decode_resize(target, 24))
    assert not first.path.exists()  # the stale file was removed
    # a different size is a different cache, both kept
    other = build_cache(load_index(isic_dir), size=16, workers=1)
    assert other.path != fresh.path and fresh.path.exists()


def test_unknown_ids_and_bad_settings(isic_dir):
    idx = load_index(isic_dir)
    cache = build_cache(idx, size=16)
    with pytest.raises(DataError, match=r"not in the image cache .*ISIC_0000001"):
        cache.get(["ISIC_0000001"])
    with pytest.raises(DataError, match=r"unknown resize policy 'stretch'"):
        build_cache(idx, policy="stretch")
    with pytest.raises(DataError, match=r"integer ≥ 8"):
        build_cache(idx, size=4)


def test_unwritable_cache_location(isic_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write the image cache .*SKINSWEEP_CACHE"):
        build_cache(load_index(isic_dir), size=16, root=blocker / "sub")


@pytest.mark.slow
@pytest.mark.realdata
def test_real_images_index_split_cache():
    """All 10,015 real 200×150 HAM10000 images: index, grouped split and a (small) cache."""
    from skinsweep.data.split import make_split

    idx = load_index(shared("ham10000_200x150"))
    assert len(idx) == 10015 and idx.df["label"].sum() == 1113
    assert idx.df.loc[idx.df["label"] == 1, "lesion_id"].nunique() == 614
    m = make_split(idx)
    assert m.meta["leaked_lesions"] == 0
    cache = build_cache(idx, size=32)
    assert cache.images.shape == (10015, 32, 32, 3)
    i = 4321
    np.testing.assert_array_equal(cache.images[i], decode_resize(idx.df["path"][i], 32))
