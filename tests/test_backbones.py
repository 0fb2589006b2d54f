"""Tests for skinsweep.train.backbones: registry, tiny variants, weight files, hub failures, real backbones.

No test downloads anything: tiny variants are random-init, real backbones are built with
weights="none", and the hub test forces offline mode with an empty cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skinsweep.train import backbones
from skinsweep.train.backbones import (
    Backbone,
    backbone_from_spec,
    create_backbone,
    list_backbones,
    register_backbone,
    save_backbone_weights,
)
from skinsweep.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, DataConfig
from skinsweep.errors import BackboneError

TINY = ["tiny_resnet", "tiny_vit", "tiny_clip"]


def _batch(bb: Backbone, n: int = 8, seed: int = 0) -> torch.Tensor:
    s = bb.data_config.input_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _embed(bb: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bb.model.eval()(x)


# ----------------------------------------------------------------------------- registry


def test_list_backbones_is_sorted_and_has_the_builtins() -> None:
    names = list_backbones()
    assert names == sorted(names)
    assert {"resnet18", "dino_vits16", "clip_vitb32", "dinov2_vits14", "efficientnet_b0",
            "convnext_tiny", "clip_vitl14", *TINY} <= set(names)


@pytest.mark.parametrize(
    "name, match",
    [
        ("resnet19", r"^unknown backbone 'resnet19' \(did you mean resnet18 or tiny_resnet\?\); valid names .*list_backbones"),
        ("ResNet18", r"did you mean resnet18\b"),
        ("dino_vit16", r"did you mean dino_vits16\b"),
        ("clip_vit_b32", r"did you mean clip_vitb32\b"),
        ("nothing_like_it", r"unknown backbone .*valid names are .*timm:<model>"),
        ("timm:resnet181", r"timm has no model 'resnet181'.*did you mean resnet18"),
        ("open_clip:ViT-B-33", r"open_clip has no model 'ViT-B-33'.*did you mean"),
        ("open_clip:ViT-B-32@nope", r"needs a pretrained tag of ViT-B-32.*openai"),
    ],
)
def test_unknown_names_suggest_close_ones(name: str, match: str) -> None:
    with pytest.raises(BackboneError, match=match):
        create_backbone(name, weights="none")


def test_register_backbone_adds_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))

    @register_backbone("my_tiny", pretrained=False)
    def my_tiny(name: str, *, weights: str, **overrides: object) -> Backbone:
        return backbones.tiny_vit(name, weights=weights, **overrides)

    assert "my_tiny" in list_backbones()
    bb = create_backbone("my_tiny")
    assert (bb.name, bb.weights, bb.family) == ("my_tiny", "none", "vit")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("my_tiny")(my_tiny)


# ----------------------------------------------------------------------------- tiny variants


@pytest.mark.parametrize(
    "name, family, head, mean, std",
    [
        ("tiny_resnet", "cnn", "linear", IMAGENET_MEAN, IMAGENET_STD),
        ("tiny_vit", "vit", "linear", IMAGENET_MEAN, IMAGENET_STD),
        ("tiny_clip", "clip", "mlp", CLIP_MEAN, CLIP_STD),
    ],
)
def test_tiny_variant_forward_shape_and_data_config(name, family, head, mean, std) -> None:
    bb = create_backbone(name)
    assert (bb.name, bb.weights, bb.family, bb.default_head) == (name, "none", family, head)
    cfg = bb.data_config
    assert isinstance(cfg, DataConfig) and isinstance(cfg.input_size, int)
    assert cfg.input_size == 32 and cfg.crop_pct == 1.0
    assert cfg.mean == pytest.approx(mean) and cfg.std == pytest.approx(std)
    out = _embed(bb, _batch(bb))
    assert out.shape == (8, bb.num_features) and out.dtype == torch.float32


def test_tiny_clip_is_open_clips_image_tower() -> None:
    open_clip = pytest.importorskip("open_clip")
    bb = create_backbone("tiny_clip")
    assert type(bb.model) is open_clip.transformer.VisionTransformer
    assert any(type(m).__name__ == "QuickGELU" for m in bb.model.modules())  # like OpenAI's CLIP


def test_spec_is_json_and_rebuilds_the_backbone(tmp_path: Path) -> None:
    bb = create_backbone("tiny_vit", input_size=64, drop_path_rate=None)
    spec = json.loads(json.dumps(bb.spec()))
    assert spec["overrides"] == {"input_size": 64}  # None means "keep the default" and is dropped
    again = backbone_from_spec(spec)
    assert again.data_config == bb.data_config and again.num_features == bb.num_features
    path = save_backbone_weights(bb, tmp_path / "vit.safetensors")
    loaded = backbone_from_spec(spec, weights=str(path))
    assert loaded.weights == str(path.resolve())
    x = _batch(bb)
    assert torch.equal(_embed(loaded, x), _embed(bb, x))


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize("name", TINY)
def test_input_size_override_sets_model_and_data_config(name: str) -> None:
    bb = create_backbone(name, input_size=48, crop_pct=0.875)
    assert (bb.data_config.input_size, bb.data_config.crop_pct) == (48, 0.875)
    assert _embed(bb, _batch(bb, n=2)).shape == (2, bb.num_features)


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("tiny_vit", {"img_size": 64}, "set input_size= instead"),
        ("tiny_clip", {"image_size": 64}, "set input_size= instead"),
        ("tiny_resnet", {"no_such_kwarg": 1}, r"does not accept override\(s\) \['no_such_kwarg'\]"),
        ("tiny_clip", {"no_such_field": 1}, r"does not accept override\(s\) \['no_such_field'\]"),
    ],
)
def test_bad_overrides_raise(name: str, overrides: dict, match: str) -> None:
    with pytest.raises(BackboneError, match=match):
        create_backbone(name, **overrides)


# ----------------------------------------------------------------------------- weight files


def _save_pt(bb: Backbone, path: Path) -> None:
    torch.save(bb.model.state_dict(), path)


def _save_pt_nested(bb: Backbone, path: Path) -> None:  # a training checkpoint of a classifier
    state = {f"model.{k}": v for k, v in bb.model.state_dict().items()}
    state["head.weight"] = torch.zeros(1, bb.num_features)
    torch.save({"state_dict": state, "epoch": 3}, path)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize(
    "filename, save",
    [
        ("w.safetensors", lambda bb, p: save_backbone_weights(bb, p)),
        ("w.pt", _save_pt),
        ("w.ckpt", _save_pt_nested),
    ],
)
def test_weights_round_trip(tmp_path: Path, name: str, filename: str, save) -> None:
    torch.manual_seed(1)
    original = create_backbone(name)
    save(original, tmp_path / filename)
    torch.manual_seed(2)
    fresh = create_backbone(name)
    loaded = create_backbone(name, weights=str(tmp_path / filename))
    x = _batch(original)
    assert not torch.equal(_embed(fresh, x), _embed(original, x))  # seeds give different models
    assert torch.equal(_embed(loaded, x), _embed(original, x))
    assert loaded.weights == str((tmp_path / filename).resolve())


def test_timm_checkpoint_with_classifier_loads_as_feature_extractor(tmp_path: Path) -> None:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    full = ResNet(BasicBlock, (1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=7).eval()
    torch.save(full.state_dict(), tmp_path / "timm.pth")  # includes fc.weight / fc.bias
    bb = create_backbone("tiny_resnet", weights=str(tmp_path / "timm.pth"))
    x = _batch(bb, n=2)
    with torch.no_grad():
        expected = full.forward_head(full.forward_features(x), pre_logits=True)
    assert torch.equal(_embed(bb, x), expected)


def test_full_open_clip_checkpoint_loads_the_visual_tower(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1},
        quick_gelu=True,
    ).eval()
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")  # visual.* + text tower
    bb = create_backbone("tiny_clip", weights=str(tmp_path / "open_clip_pytorch_model.bin"))
    x = _batch(bb, n=2)
    with torch.no_grad():
        expected = clip.encode_image(x)
    assert torch.equal(_embed(bb, x), expected)


class _NotATensor:
    pass


def _save_other(name: str, path: Path, **overrides: object) -> None:
    save_backbone_weights(create_backbone(name, **overrides), path.with_suffix(".safetensors"))


@pytest.mark.parametrize(
    "name, write, match",
    [
        ("tiny_resnet", lambda p: p.with_suffix(".safetensors").write_bytes(b"not safetensors"),
         r"could not be read as a safetensors"),
        ("tiny_resnet", lambda p: p.with_suffix(".pt").write_bytes(b"garbage"),
         r"could not be read as a torch state dict"),
        # arbitrary pickled objects are refused (weights_only=True), not executed
        ("tiny_resnet", lambda p: torch.save({"x": _NotATensor()}, p.with_suffix(".pt")),
         r"could not be read as a torch state dict \(weights_only=True\)"),
        ("tiny_resnet", lambda p: torch.save([1, 2, 3], p.with_suffix(".pt")),
         r"does not hold a state dict"),
        ("tiny_resnet", lambda p: _save_other("tiny_vit", p),
         r"does not fit backbone 'tiny_resnet': none of its \d+ keys"),
        ("tiny_vit", lambda p: _save_other("tiny_vit", p, depth=1),
         r"does not fit backbone 'tiny_vit'.*missing key\(s\) \[blocks\.1\."),
        ("tiny_vit", lambda p: _save_other("tiny_vit", p, input_size=64),
         r"1 shape mismatch\(es\).*pos_embed \(1, 65, 64\) vs \(1, 17, 64\)"),
    ],
)
def test_bad_weights_file_gives_one_line_error(tmp_path: Path, name: str, write, match: str) -> None:
    write(tmp_path / "w")
    (path,) = tmp_path.iterdir()
    with pytest.raises(BackboneError, match=match) as info:
        create_backbone(name, weights=str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "name, weights, match",
    [
        ("tiny_vit", "hub", r"random-init test model without hub weights; use weights='none'"),
        ("tiny_vit", "no/such/file.safetensors", r"neither 'hub', 'none' nor an existing file"),
        ("clip_vitb32", "hub:openai", r"put the open_clip pretrained tag in the name"),
    ],
)
def test_bad_weights_argument(name: str, weights: str, match: str) -> None:
    with pytest.raises(BackboneError, match=match):
        create_backbone(name, weights=weights)


def test_save_requires_safetensors_suffix(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=r"\*\.safetensors"):
        save_backbone_weights(create_backbone("tiny_vit"), tmp_path / "w.pt")


# ----------------------------------------------------------------------------- hub


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name, source", [("resnet18", "timm/resnet18.tv_in1k"), ("clip_vitb32", "open_clip/ViT-B-32@openai")]
)
def test_offline_hub_failure_is_one_line(monkeypatch, tmp_path: Path, name: str, source: str) -> None:
    import huggingface_hub.constants as hf_constants

    # Offline and an empty cache, even on a machine that has the weights cached: must fail fast.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    offline_before = hf_constants.HF_HUB_OFFLINE
    with pytest.raises(BackboneError) as info:
        create_backbone(name, weights="hub")
    message = str(info.value)
    assert "\n" not in message
    assert f"pretrained weights for backbone {name!r} ({source}) could not be downloaded" in message
    assert "(HF_HUB_OFFLINE is set)" in message  # read at call time, not only at import
    assert "weights=PATH" in message and "HF_HUB_OFFLINE unset" in message
    assert hf_constants.HF_HUB_OFFLINE == offline_before  # the runtime switch does not leak


# ----------------------------------------------------------------------------- real backbones


@pytest.mark.slow  # ~1 s alone on 1 thread, ~6 s when the 2 CPUs are shared with other jobs
@pytest.mark.parametrize(
    "name, dim, family, head, mean, interpolation",
    [
        ("resnet18", 512, "cnn", "linear", IMAGENET_MEAN, "bilinear"),
        ("dino_vits16", 384, "vit", "linear", IMAGENET_MEAN, "bicubic"),
        ("clip_vitb32", 512, "clip", "mlp", CLIP_MEAN, "bicubic"),
    ],
)
def test_real_backbone_builds_and_embeds(name, dim, family, head, mean, interpolation) -> None:
    bb = create_backbone(name, weights="none")
    assert (bb.num_features, bb.family, bb.default_head, bb.weights) == (dim, family, head, "none")
    cfg = bb.data_config
    assert (cfg.input_size, cfg.crop_pct, cfg.crop_mode) == (224, 1.0, "center")
    assert cfg.interpolation == interpolation
    assert cfg.mean == pytest.approx(mean)
    assert _embed(bb, torch.randn(1, 3, 224, 224)).shape == (1, dim)
