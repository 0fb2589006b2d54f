"""Tests for skinsweep.data.transforms.

The test that matters: our batched eval transforms reproduce the libraries' own PIL pipelines
(timm for DINO, open_clip for CLIP) on the same image. Tolerances, in normalised units:

    max |ours - theirs| <= MAX_ABS  = 0.036  (2 uint8 levels at the smallest std, 0.224)
    mean |ours - theirs| <= MEAN_ABS = 5e-4

Measured (torch 2.14, timm 1.0.31, open_clip 3.3.0): max 0.035 (2 levels, 224->248 upsampling for
DINO) and 0.0175 (1 level) everywhere else; mean <= 1.4e-4; CLIP at 224x224 input is exact.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

import skinsweep.data.transforms as T
from skinsweep.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    eval_transform,
    format_data_config,
    train_transform,
)
from skinsweep.errors import ConfigError, DataError

MAX_ABS = 0.036
MEAN_ABS = 5e-4
SIZES = [(224, 224), (300, 300), (450, 600), (600, 450)]  # (H, W)


def lesion_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour gradients, pixel noise texture and a dark lesion-like blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        128 + 100 * np.sin(x / w * 3 * np.pi) * np.cos(y / h * 2 * np.pi),
        255 * (x + y) / (h + w),
        128 + 60 * np.sin((x * x + y * y) / (h * w) * 20),
    ], -1)
    img += rng.normal(0, 12, img.shape)
    blob = (y - 0.55 * h) ** 2 + (x - 0.45 * w) ** 2 < (0.25 * min(h, w)) ** 2
    img[blob] = 0.3 * img[blob] + 0.7 * np.array([90, 50, 30])
    return np.clip(img, 0, 255).astype(np.uint8)


def batch(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs))


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()
    assert diff.max() <= MAX_ABS, f"max abs diff {diff.max():.4f}"
    assert diff.mean() <= MEAN_ABS, f"mean abs diff {diff.mean():.6f}"


@pytest.fixture(scope="module")
def dino():
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    return cfg, timm.data.create_transform(**cfg)


@pytest.fixture(scope="module")
def clip():
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return model.visual.preprocess_cfg, preprocess


@pytest.fixture(params=["native", "emulated"])
def resize_path(request, monkeypatch):
    """Run a test through both uint8 resize paths (CPU-native kernels, and the any-device one)."""
    if request.param == "emulated":
        orig = T._resize
        monkeypatch.setattr(T, "_resize", lambda x, size, mode: orig(x, size, mode, native=False))
    return request.param


# --------------------------------------------------------------------------- parity with the libraries


@pytest.mark.parametrize("hw", SIZES)
def test_dino_eval_matches_timm(dino, hw, resize_path):
    cfg, theirs = dino
    img = lesion_image(*hw)
    ours = eval_transform(DataConfig.from_timm(cfg))(batch(img))
    assert_matches(ours, theirs(Image.fromarray(img))[None])


@pytest.mark.parametrize("hw", SIZES)
def test_clip_eval_matches_open_clip(clip, hw, resize_path):
    preprocess_cfg, theirs = clip
    img = lesion_image(*hw, seed=1)
    ref = theirs(Image.fromarray(img))[None]
    explicit = DataConfig(input_size=224, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic",
                          crop_pct=1.0, crop_mode="center")
    assert DataConfig.from_open_clip(preprocess_cfg) == explicit
    assert_matches(eval_transform(explicit)(batch(img)), ref)


@pytest.mark.parametrize("size,interpolation,crop_pct,crop_mode", [
    (224, "bilinear", 0.875, "center"),  # resnet18.tv_in1k
    (224, "bicubic", 1.0, "squash"),
    (192, "bicubic", 0.95, "squash"),
    (160, "bilinear", 1.0, "center"),
])
@pytest.mark.parametrize("hw", [(300, 300), (450, 600)])
def test_eval_matches_timm_other_configs(size, interpolation, crop_pct, crop_mode, hw):
    kwargs = dict(input_size=(3, size, size), interpolation=interpolation, crop_pct=crop_pct,
                  crop_mode=crop_mode, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    theirs = timm.data.create_transform(**kwargs)
    img = lesion_image(*hw, seed=2)
    ours = eval_transform(DataConfig.from_timm(kwargs))(batch(img))
    assert_matches(ours, theirs(Image.fromarray(img))[None])


def test_batch_equals_one_at_a_time(dino):
    tf = eval_transform(DataConfig.from_timm(dino[0]))
    imgs = [lesion_image(300, 300, seed=s) for s in range(3)]
    torch.testing.assert_close(tf(batch(*imgs)), torch.cat([tf(batch(i)) for i in imgs]))


# --------------------------------------------------------------------------- eval behaviour


@pytest.mark.parametrize("hw", [(224, 224), (300, 200), (64, 64)])
@pytest.mark.parametrize("crop_pct,crop_mode", [(1.0, "center"), (0.9, "center"), (0.9, "squash")])
def test_eval_output_shape_dtype(hw, crop_pct, crop_mode):
    x = batch(lesion_image(*hw), lesion_image(*hw, seed=1))
    out = eval_transform(DataConfig(input_size=96, crop_pct=crop_pct, crop_mode=crop_mode))(x)
    assert out.shape == (2, 3, 96, 96) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all()


def test_identity_resize_is_skipped(monkeypatch):
    def no_resize(*args, **kwargs):
        raise AssertionError("interpolate called for a no-op resize")

    monkeypatch.setattr(T, "_interp", no_resize)
    x = batch(lesion_image(224, 224))
    out = eval_transform(DataConfig(crop_pct=1.0))(x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # float rounding only


def test_float_input_on_unit_scale(dino):
    x = batch(lesion_image(300, 300))
    cfg = DataConfig.from_timm(dino[0])
    as_u8 = eval_transform(cfg)(x)
    as_float = eval_transform(cfg)(x.float() / 255)
    # the float path skips PIL's uint8 rounding: close, not bit-equal
    assert (as_u8 - as_float).abs().max() < MAX_ABS
    same_size = batch(lesion_image(224, 224))
    torch.testing.assert_close(eval_transform(DataConfig())(same_size.double() / 255),
                               eval_transform(DataConfig())(same_size))


def test_nearest_copies_input_pixels():
    x = batch(lesion_image(100, 150))
    cfg = DataConfig(input_size=64, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    out = (eval_transform(cfg)(x) * 255).round().to(torch.uint8)
    pixels = {tuple(p) for p in x.reshape(-1, 3).tolist()}
    assert all(tuple(p) in pixels for p in out[0].permute(1, 2, 0).reshape(-1, 3).tolist())


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r"\(B, H, W, 3\)"),
    (torch.zeros(32, 32, 3, dtype=torch.uint8), r"\(B, H, W, 3\)"),
    (torch.zeros(2, 32, 32, 3, dtype=torch.int32), "uint8"),
])
@pytest.mark.parametrize("augment", T.AUGMENTS)
def test_bad_batches_raise_data_error(bad, match, augment):
    with pytest.raises(DataError, match=match):
        train_transform(DataConfig(input_size=32), augment)(bad)


# --------------------------------------------------------------------------- train augmentation


def _study(**kw):
    return train_transform(DataConfig(input_size=32), "resnet_study", **kw)


def test_train_none_is_eval():
    x = batch(lesion_image(40, 40))
    cfg = DataConfig(input_size=32, crop_pct=0.9)
    torch.testing.assert_close(train_transform(cfg, "none")(x, generator=torch.Generator()),
                               eval_transform(cfg)(x))


def test_train_deterministic_given_seed():
    x = batch(*[lesion_image(48, 48, seed=s) for s in range(4)])
    run = lambda seed: _study()(x, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_train_randomness_is_per_sample():
    x = batch(*[lesion_image(48, 48)] * 8)
    out = _study()(x, generator=torch.Generator().manual_seed(0)).flatten(1)
    assert torch.cdist(out, out).fill_diagonal_(1.0).min() > 1e-3  # every pair differs


@pytest.mark.parametrize("p,lo,hi", [(0.0, 0.0, 0.0), (0.5, 0.4, 0.6), (1.0, 1.0, 1.0)])
def test_flip_probability(p, lo, hi):
    # a left-to-right gray ramp: crops, resizes and jitter keep it increasing, a flip reverses it
    ramp = np.broadcast_to(np.linspace(20, 235, 48, dtype=np.float32)[None, :, None], (48, 48, 3))
    x = torch.from_numpy(ramp.astype(np.uint8)).expand(400, 48, 48, 3).contiguous()
    out = _study(hflip=p, scale=(0.5, 1.0))(x, generator=torch.Generator().manual_seed(0))
    slope = out[:, 0, :, -4:].mean((1, 2)) - out[:, 0, :, :4].mean((1, 2))
    assert (slope != 0).all()
    assert lo <= (slope < 0).float().mean().item() <= hi


def test_no_augmentation_equals_eval():
    x = batch(lesion_image(32, 32), lesion_image(32, 32, seed=1))
    out = _study(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0)(x)
    torch.testing.assert_close(out, eval_transform(DataConfig(input_size=32))(x))


def _dihedral8(y: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square applied to y (3, S, S), written independently of the module."""
    out = []
    for k in range(4):
        r = torch.rot90(y, k, dims=(1, 2))
        out += [r, torch.flip(r, dims=(2,))]
    return out


@pytest.mark.parametrize("augment", ["flips", "light"])
def test_flips_and_light_shapes_and_determinism(augment):
    x = batch(*[lesion_image(40, 40, seed=s) for s in range(6)])
    t = train_transform(DataConfig(input_size=32), augment)
    run = lambda seed: t(x, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flips_is_a_dihedral_view_of_eval_per_sample():
    cfg = DataConfig(input_size=32, crop_pct=0.9)  # a centre crop too: the view is of the eval output
    x = batch(*[lesion_image(40, 40, seed=s) for s in range(64)])
    ref = eval_transform(cfg)(x)
    out = train_transform(cfg, "flips")(x, generator=torch.Generator().manual_seed(0))
    seen = []
    for i in range(len(x)):
        match = [v for v, d in enumerate(_dihedral8(ref[i])) if torch.equal(out[i], d)]
        assert match, f"sample {i} is not a dihedral view of its eval image"
        seen.append(match[0])
    assert len(set(seen)) == 8  # all 8 views occur, chosen per sample


def test_light_turns_every_way():
    # an asymmetric corner mark shows which way a sample was turned and flipped
    img = np.full((48, 48, 3), 128, np.uint8)
    img[:12, :12] = 250
    x = torch.from_numpy(img).expand(200, 48, 48, 3).contiguous()
    out = train_transform(DataConfig(input_size=32), "light")(x, generator=torch.Generator().manual_seed(0))
    corners = torch.stack([out[:, 0, :8, :8].mean((1, 2)), out[:, 0, :8, -8:].mean((1, 2)),
                           out[:, 0, -8:, :8].mean((1, 2)), out[:, 0, -8:, -8:].mean((1, 2))], 1)
    brightest = corners.argmax(1)
    assert set(brightest.tolist()) == {0, 1, 2, 3}  # the mark lands in every corner
    t = train_transform(DataConfig(input_size=32), "light")
    assert (t.scale, t.jitter, t.hflip, t.rot90) == ((0.5, 1.0), 0.1, 0.5, True)  # crops keep >= half the area
    # without the rot90 option, the same seed gives exactly the study's RNG stream
    study = _study(scale=(0.5, 1.0), jitter=0.1)(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out, study)
    norot = train_transform(DataConfig(input_size=32), "light", rot90=False)
    assert torch.equal(norot(x, generator=torch.Generator().manual_seed(0)), study)


@pytest.mark.parametrize("tta, n", [("none", 1), ("flips", 4), ("dihedral", 8)])
def test_tta_views_and_logits(tta, n):
    y = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    views = T.tta_views(y, tta)
    assert len(views) == n
    for i in range(3):
        eight = _dihedral8(y[i])
        assert all(any(torch.equal(v[i], d) for d in eight) for v in views)  # each view is a symmetry
        assert len({tuple(v[i].flatten().tolist()) for v in views}) == n  # and they are distinct
    model = lambda v: v[:, 0, :2, :3].sum((1, 2)) * 1.5  # noqa: E731  (a corner detector: not invariant)
    expected = torch.stack([model(v) for v in views]).mean(0)
    torch.testing.assert_close(T.tta_logits(model, y, tta), expected)
    if tta == "dihedral":  # invariant: every output pixel is averaged over its whole orbit
        inv = lambda v: v.mean((1, 2, 3))  # noqa: E731
        torch.testing.assert_close(T.tta_logits(inv, y, tta), inv(y))
    with pytest.raises(ConfigError, match="tta must be one of"):
        T.tta_views(y, "rot")


@pytest.mark.parametrize("hw", [(224, 224), (100, 300), (300, 100), (10, 200)])
def test_random_resized_crop_boxes(hw):
    h, w = hw
    boxes = T._rrc_params(2000, h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    area = (ch * cw).double() / (h * w)
    assert area.max() <= 1.0 and area.min() >= 0.06  # 0.08 up to rounding of the sides
    if hw == (224, 224):  # spread over the scale range, not stuck on the fallback
        assert area.min() < 0.1 and area.max() > 0.9 and len(set(top.tolist())) > 50


def test_color_jitter_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    y = 0.3 + 0.4 * torch.rand(4, 3, 16, 16, generator=g)  # mid-range: no clipping anywhere
    factors = 0.8 + 0.4 * torch.rand(4, 3, generator=g)
    ours = T._jitter(y, factors)
    # atol: torchvision's grayscale uses 0.2989 for red, we use PIL's 0.299 (<= 2e-5 here)
    for i, (b, c, s) in enumerate(factors.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(y[i], b), c), s)
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=5e-5)
        ref2 = TF.adjust_contrast(TF.adjust_brightness(TF.adjust_saturation(y[i], s), b), c)
        torch.testing.assert_close(ours[i], ref2, rtol=0, atol=5e-5)  # order does not matter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_pil_and_cpu(dino):
    cfg, theirs = dino
    imgs = [lesion_image(*hw, seed=s) for s, hw in enumerate([(300, 300)] * 3)]
    out = eval_transform(DataConfig.from_timm(cfg))(batch(*imgs).cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float32
    for i, img in enumerate(imgs):  # the CUDA path replays PIL's rounding in float
        assert_matches(out[i:i + 1].cpu(), theirs(Image.fromarray(img))[None])
    x = batch(*[lesion_image(48, 48, seed=s) for s in range(4)])
    cpu = _study()(x, generator=torch.Generator().manual_seed(0))
    gpu = _study()(x.cuda(), generator=torch.Generator().manual_seed(0)).cpu()
    # same seed, same crops/flips/jitter; only uint8 rounding of the crops may differ by a level
    assert (gpu - cpu).abs().mean() < 1e-2 and (gpu - cpu).abs().max() < 3 * MAX_ABS


# --------------------------------------------------------------------------- config


def test_from_timm_dino(dino):
    cfg = DataConfig.from_timm(dino[0])
    assert cfg == DataConfig(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             interpolation="bicubic", crop_pct=0.9, crop_mode="center")
    assert DataConfig.from_timm({**dino[0], "crop_pct": None, "crop_mode": None}).crop_pct == 0.875


def test_dict_round_trip():
    cfg = DataConfig(input_size=192, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=0.95, crop_mode="squash")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DataConfig.from_dict(d) == cfg
    assert DataConfig.from_dict({}) == DataConfig()


def test_format_data_config_and_module_reprs():
    cfg = DataConfig(crop_pct=0.9)
    text = format_data_config(cfg)
    assert text.startswith("224px center crop_pct=0.9 (resize 248) bicubic mean=(0.485, 0.456, 0.406)")
    assert text in repr(eval_transform(cfg))
    assert text in repr(train_transform(cfg, "resnet_study")) and "rrc(scale=(0.08, 1.0)" in repr(
        train_transform(cfg, "resnet_study"))


@pytest.mark.parametrize("make,match", [
    (lambda: DataConfig(input_size=0), "input_size"),
    (lambda: DataConfig(input_size=224.0), "input_size"),
    (lambda: DataConfig(mean=(0.5, 0.5)), "mean"),
    (lambda: DataConfig(std=(0.2, 0.0, 0.2)), "std"),
    (lambda: DataConfig(std="abc"), "std"),
    (lambda: DataConfig(interpolation="lanczos"), "interpolation"),
    (lambda: DataConfig(crop_pct=0.0), "crop_pct"),
    (lambda: DataConfig(crop_pct=1.5), "crop_pct"),
    (lambda: DataConfig(crop_mode="border"), "crop_mode"),
    (lambda: DataConfig.from_dict({"input_size": 224, "size": 3}), "unknown keys.*size"),
    (lambda: DataConfig.from_dict([224]), "mapping"),
    (lambda: DataConfig.from_timm({"input_size": (3, 224, 192)}), "input_size"),
    (lambda: DataConfig.from_timm({"input_size": (3, 224, 224), "crop_border_pixels": 2}), "crop_border"),
    (lambda: DataConfig.from_open_clip({"size": 224, "resize_mode": "longest"}), "resize_mode"),
    (lambda: train_transform(DataConfig(), "randaug"), "augment"),
    (lambda: train_transform(DataConfig(), "none", hflip=0.5), "none"),
    (lambda: train_transform(DataConfig(), "flips", hflip=0.5), "flips"),
    (lambda: train_transform(DataConfig(), "resnet_study", scale=(0.5, 0.1)), "scale"),
    (lambda: train_transform(DataConfig(), "resnet_study", scale=0.5), "scale must be a .low, high. pair"),
    (lambda: train_transform(DataConfig(), "resnet_study", ratio=(0.0, 1.0)), "ratio"),
    (lambda: train_transform(DataConfig(), "resnet_study", hflip=1.5), "hflip"),
    (lambda: train_transform(DataConfig(), "resnet_study", jitter=1.0), "jitter"),
])
def test_bad_config_raises(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
