"""Backbone registry: image feature extractors that travel with their preprocessing.

Modelled on timm's ``_registry.py`` / ``create_model``: a dict of builder functions filled by a
decorator, and one factory::

    bb = create_backbone("dino_vits16")                 # pretrained, from the HF cache
    bb = create_backbone("tiny_vit")                    # random-init test model (weights="none")
    bb = create_backbone("resnet18", weights="ft.safetensors", drop_path_rate=None)
    feats = bb.model(x)                                 # x: float (B, 3, S, S) -> (B, bb.num_features)
    bb.data_config                                      # size, mean/std, crop: transforms come from it

Names: the registered ones (``list_backbones()``), plus any timm or open_clip model by prefix:
``timm:<arch>[.<tag>]`` (timm's own naming, e.g. ``timm:resnet10t``) and
``open_clip:<arch>[@<tag>]`` (e.g. ``open_clip:ViT-L-14@openai``). The open_clip pretrained tag is
part of the *name* (not of ``weights``) because, like timm's ``.tag``, it selects the model's
activation (QuickGELU) and preprocessing, not just a file; ``weights`` then means the same for
every backbone:

* ``"hub"``: pretrained weights from the model hub via timm / open_clip, through the Hugging Face
  cache; honours ``HF_HUB_OFFLINE`` (read when the weights are requested, not only at import).
* ``"none"``: random initialisation (the default, and the only non-file option, for ``tiny_*``).
* a path: a ``.safetensors`` file, or a torch state dict loaded with ``weights_only=True`` (never
  unpickles arbitrary objects). Keys may carry a prefix (``model.``, ``visual.``, ``module.``,
  ``backbone.`` ...): the prefix under which most tensors match the model is used and the rest of
  the file is ignored (e.g. a full CLIP checkpoint's text tower, or a classifier's head). The
  timm architecture's own classifier (``fc``/``head``/``classifier``, e.g. ImageNet's) is
  dropped. Otherwise keys and shapes must match exactly.

Overrides (keyword arguments of ``create_backbone``) follow timm: ``None`` means "keep the
default" and is dropped. Keys naming a ``DataConfig`` field (``input_size``, ``mean``, ``std``,
``interpolation``, ``crop_pct``, ``crop_mode``) change the data config; for ViT / CLIP models
``input_size`` also sets the model's image size (the only way to do so). All other keys go to the
model constructor: ``timm.create_model`` kwargs, or ``CLIPVisionCfg`` fields for open_clip models.

Models are returned in ``eval()`` mode on the CPU; the trainer switches to ``train()``. Hub
downloads and weight files are handled in :mod:`skinsweep.train.weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from skinsweep.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, DataConfig
from skinsweep.errors import BackboneError, did_you_mean, short_list
from skinsweep.train.weights import hub_download, load_weights_file, resolve_weights, save_backbone_weights

__all__ = [
    "Backbone",
    "backbone_from_spec",
    "create_backbone",
    "hub_name",
    "list_backbones",
    "register_backbone",
    "save_backbone_weights",
]

Family = Literal["cnn", "vit", "clip"]
Head = Literal["linear", "mlp"]

_DATA_KEYS = frozenset(f.name for f in dataclasses.fields(DataConfig))
_PREFIX_HINT = "or use 'timm:<model>' / 'open_clip:<model>@<tag>' for any timm / open_clip model"


@dataclass
class Backbone:
    """A feature extractor plus everything needed to feed it and to rebuild it.

    ``model(x)`` maps float ``(B, 3, S, S)`` (normalised as ``data_config`` says,
    ``S = data_config.input_size``) to ``(B, num_features)``.
    """

    model: nn.Module
    num_features: int
    data_config: DataConfig
    name: str
    family: Family
    weights: str  # "hub", "none" or an absolute file path: what create_backbone accepts
    default_head: Head  # the head the reference study used for this family
    source: str = ""  # the library model behind it, e.g. "timm/resnet18.tv_in1k"
    overrides: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """JSON-safe description; ``backbone_from_spec(bb.spec())`` rebuilds the same backbone."""
        spec = {
            "name": self.name,
            "weights": self.weights,
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()},
            "source": self.source,
            "data_config": self.data_config.to_dict(),
        }
        try:
            json.dumps(spec)
        except TypeError as e:
            raise BackboneError(
                f"backbone {self.name!r} has an override that cannot be recorded as JSON ({e}); "
                "pass plain values (numbers, strings, lists) as overrides"
            ) from None
        return spec


# ----------------------------------------------------------------------------- registry

Builder = Callable[..., Backbone]


# name -> (builder, pretrained: has hub weights (default weights="hub") or is a random-init test model)
_REGISTRY: dict[str, tuple[Builder, bool]] = {}
# name -> the prefixed name whose hub weights it loads ("timm:resnet18.tv_in1k"), for `skinsweep weights`
_HUB: dict[str, str] = {}


def register_backbone(name: str, *, pretrained: bool = True, hub: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(name, *, weights, **overrides) -> Backbone`` under ``name``.

    ``pretrained=False`` marks a random-init model: its default weights are ``"none"`` and
    ``weights="hub"`` is refused. ``hub``: the ``timm:``/``open_clip:`` name whose hub weights the
    builder loads (what ``skinsweep weights fetch`` / ``check`` look for).
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY or ":" in name:
            raise ValueError(f"backbone name {name!r} is already registered or contains ':'")
        _REGISTRY[name] = (builder, pretrained)
        if hub:
            _HUB[name] = hub
        return builder

    return decorator


def hub_name(name: str) -> str | None:
    """The ``timm:<arch.tag>`` / ``open_clip:<arch>@<tag>`` name whose hub weights backbone ``name`` loads;
    None for a random-init test model or a registered backbone that did not say. Unknown names raise."""
    prefix, _, rest = name.partition(":")
    if rest and prefix in _PREFIX_BUILDERS:
        return name
    if name not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone {name!r}{did_you_mean(name, list_backbones(), n=3, cutoff=0.5, lower=True)}; "
            f"valid names are {short_list(list_backbones(), 20)}, {_PREFIX_HINT}"
        )
    return _HUB.get(name)


def list_backbones() -> list[str]:
    """Sorted names of the registered backbones (prefix names ``timm:``/``open_clip:`` also work)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, *, weights: str | None = None, **overrides: Any) -> Backbone:
    """Build backbone ``name`` with ``weights`` ("hub", "none" or a file path; None: the backbone's
    default, "hub" for pretrained ones and "none" for ``tiny_*``). See the module docstring."""
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None = keep the default
    prefix, _, rest = name.partition(":")
    if rest and prefix in _PREFIX_BUILDERS:
        builder, pretrained = _PREFIX_BUILDERS[prefix], True
    elif name in _REGISTRY:
        builder, pretrained = _REGISTRY[name]
    else:
        raise BackboneError(
            f"unknown backbone {name!r}{did_you_mean(name, list_backbones(), n=3, cutoff=0.5, lower=True)}; "
            f"valid names are {short_list(list_backbones(), 20)} "
            f"(skinsweep.train.backbones.list_backbones()), {_PREFIX_HINT}"
        )
    weights = resolve_weights(name, weights, pretrained)
    backbone = builder(name, weights=weights, **overrides)
    return dataclasses.replace(backbone, name=name, weights=weights, overrides=overrides)


def backbone_from_spec(spec: Mapping[str, Any], *, weights: str | None = None) -> Backbone:
    """Rebuild a backbone from ``Backbone.spec()``; ``weights`` replaces the recorded source (e.g. the
    weights file inside a bundle). The recorded data config is authoritative: it is what the model
    was trained with, even if a library default has changed since."""
    missing = {"name", "weights", "overrides", "data_config"} - set(spec)
    if missing:
        raise BackboneError(f"backbone spec lacks {sorted(missing)}; write it with Backbone.spec()")
    backbone = create_backbone(spec["name"], weights=weights or spec["weights"], **spec["overrides"])
    return dataclasses.replace(backbone, data_config=DataConfig.from_dict(spec["data_config"]))


# ----------------------------------------------------------------------------- overrides


def _split_overrides(overrides: dict[str, Any], size_kwarg: str) -> tuple[dict, dict]:
    """-> (DataConfig overrides, model constructor kwargs)."""
    if size_kwarg in overrides:
        raise BackboneError(f"override {size_kwarg}= is not accepted; set input_size= instead "
                            "(it sets both the model and its data config)")
    data = {k: v for k, v in overrides.items() if k in _DATA_KEYS}
    return data, {k: v for k, v in overrides.items() if k not in _DATA_KEYS}


# ----------------------------------------------------------------------------- timm family


def _timm_backbone(
    name: str,
    make: Callable[..., nn.Module],
    *,
    weights: str,
    overrides: dict[str, Any],
    family: Family,
    source: str,
    data_config: DataConfig | None = None,
    data_defaults: Mapping[str, Any] | None = None,
) -> Backbone:
    """Shared path of every timm model (real or tiny).

    ``make(**kwargs)`` builds the model with ``num_classes=0`` (so forward returns pooled
    features); ``data_config`` None means timm's own config for the model's pretrained tag,
    then ``data_defaults`` and the user's data overrides are applied in that order.
    """
    data_over, model_kw = _split_overrides(overrides, "img_size")
    if family == "vit" and "input_size" in data_over:
        model_kw["img_size"] = data_over["input_size"]
    hub = contextlib.nullcontext() if weights != "hub" else hub_download(name, source)
    try:
        with hub:
            model = make(**model_kw)
    except TypeError as e:
        if not model_kw:
            raise
        raise BackboneError(f"backbone {name!r} ({source}) does not accept override(s) "
                            f"{sorted(model_kw)}: {e}") from e
    if weights not in ("hub", "none"):
        # timm checkpoints carry their classifier (e.g. ImageNet's fc); with num_classes=0 it is an
        # Identity, so its tensors in the file are dropped. Found by identity, not by name, since
        # it is "fc", "head", "head.fc" or "classifier" depending on the architecture.
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        drop = tuple(f"{n}." for n, m in model.named_modules() if n and m is head)
        load_weights_file(model, weights, name=name, drop=drop)

    if data_config is None:
        from timm.data import resolve_data_config

        data_config = DataConfig.from_timm(resolve_data_config(model=model))
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if size:  # timm's pretrained cfg keeps the tag's size even when img_size was changed
            data_config = dataclasses.replace(data_config, input_size=int(size[0]))
    data_config = dataclasses.replace(data_config, **{**(data_defaults or {}), **data_over})
    num_features = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(model=model.eval(), num_features=int(num_features), data_config=data_config,
                    name=name, family=family, weights=weights,
                    default_head="linear", source=source)


# Built-in registrations use crop_pct=1.0: the image cache already holds the lesion at the model's
# input size, so no resize or border crop happens (timm's usual 0.875 would cut off the rim).
_FIT_CACHE: Mapping[str, Any] = {"crop_pct": 1.0}


def _timm_pretrained(name: str, arch: str, weights: str, overrides: dict[str, Any], *,
                     model_defaults: Mapping[str, Any] | None = None,
                     data_defaults: Mapping[str, Any] | None = _FIT_CACHE) -> Backbone:
    """A model of timm's registry by ``arch[.tag]``; family "vit" for models with a fixed input
    size (timm's ``fixed_input_size``: ViT, DeiT, Swin, EVA ...), else "cnn"."""
    import timm

    if not timm.is_model(arch):
        raise BackboneError(f"backbone {name!r}: timm has no model {arch!r}"
                            f"{did_you_mean(arch, timm.list_models(), n=3)}; see timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(arch)
    if weights == "hub" and cfg is None:
        raise BackboneError(f"timm has no pretrained weights for {arch!r}; use weights='none' or a file")
    family: Family = "vit" if cfg is not None and cfg.fixed_input_size else "cnn"

    def make(**kw: Any) -> nn.Module:
        kw = {**(model_defaults or {}), **kw}
        return timm.create_model(arch, pretrained=weights == "hub", num_classes=0, **kw)

    return _timm_backbone(name, make, weights=weights, overrides=overrides, family=family,
                          source=f"timm/{arch}", data_defaults=data_defaults)


def _timm_builder(arch: str, **model_defaults: Any) -> Builder:
    """The builder of a registered timm model ``arch.tag`` (``model_defaults``: constructor kwargs)."""

    def build(name: str, *, weights: str, **overrides: Any) -> Backbone:
        return _timm_pretrained(name, arch, weights, overrides, model_defaults=model_defaults)

    return build


# name -> timm arch.tag (features): ResNet-18 with torchvision ImageNet weights, the reference
# study's CNN (512); DINO ViT-S/16, self-supervised ImageNet-1k (384; timm's cfg says crop_pct 0.9,
# but the study used a plain bicubic resize to 224, hence _FIT_CACHE); EfficientNet-B0, timm
# RandAugment ImageNet weights (1280); ConvNeXt-T, ImageNet-12k fine-tuned on 1k (768).
for _name, _arch in {"resnet18": "resnet18.tv_in1k", "dino_vits16": "vit_small_patch16_224.dino",
                     "efficientnet_b0": "efficientnet_b0.ra_in1k",
                     "convnext_tiny": "convnext_tiny.in12k_ft_in1k"}.items():
    register_backbone(_name, hub=f"timm:{_arch}")(_timm_builder(_arch))
# DINOv2 ViT-S/14 (384): built at 224 (16x16 patches) rather than timm's 518, to share the 224 image
# cache; timm resamples the position embedding when loading hub weights.
register_backbone("dinov2_vits14", hub="timm:vit_small_patch14_dinov2.lvd142m")(_timm_builder("vit_small_patch14_dinov2.lvd142m", img_size=224))


def _timm_prefixed(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """``timm:<arch>[.<tag>]``: any timm model, with timm's own data config (crop_pct included)."""
    return _timm_pretrained(name, name.partition(":")[2], weights, overrides, data_defaults=None)


_TINY_DATA = DataConfig(input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)


@register_backbone("tiny_resnet", pretrained=False)
def tiny_resnet(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """timm ``ResNet`` (resnet18's class and BasicBlock), one block per stage, 8..64 channels, 32 px
    (the five stride-2 stages end on a 1x1 map, enough for smoke tests and the fastest to run)."""
    from timm.models.resnet import BasicBlock, ResNet

    def make(**kw: Any) -> nn.Module:
        kw = {"block": BasicBlock, "layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64),
              "stem_width": 8, "num_classes": 0, **kw}
        return ResNet(**kw)

    return _timm_backbone(name, make, weights=weights, overrides=overrides, family="cnn",
                          source="timm/ResNet(BasicBlock,1-1-1-1,8-64ch)", data_config=_TINY_DATA)


@register_backbone("tiny_vit", pretrained=False)
def tiny_vit(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """timm ``VisionTransformer`` (DINO's class): 32 px, patch 8, width 64, depth 2, 2 heads."""
    from timm.models.vision_transformer import VisionTransformer

    def make(**kw: Any) -> nn.Module:
        kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
              "num_classes": 0, **kw}
        return VisionTransformer(**kw)

    return _timm_backbone(name, make, weights=weights, overrides=overrides, family="vit",
                          source="timm/VisionTransformer(32px,p8,w64,d2)", data_config=_TINY_DATA)


# ----------------------------------------------------------------------------- open_clip family


def _clip_backbone(name: str, source: str, model_cfg: dict[str, Any], tag_cfg: Mapping[str, Any],
                   *, weights: str, overrides: dict[str, Any],
                   download: Callable[[], str] | None = None) -> Backbone:
    """Shared path of every open_clip image tower (real or tiny).

    Only the vision tower is built, with open_clip's own ``_build_vision_tower`` (what
    ``CLIP.__init__`` calls for ``model.visual``), so no text tower is allocated. Hub weights are
    the open_clip checkpoint file (fetched by ``download``), loaded like a local file: its
    ``visual.`` prefix selects the image tower.
    """
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    data_over, model_kw = _split_overrides(overrides, "image_size")
    valid = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
    unknown = sorted(set(model_kw) - valid)
    if unknown:
        raise BackboneError(f"backbone {name!r} does not accept override(s) {unknown}; open_clip "
                            f"vision options are {short_list(sorted(valid - {'image_size'}), 8)}")
    vision_cfg = {**model_cfg["vision_cfg"], **model_kw}
    if "input_size" in data_over:
        vision_cfg["image_size"] = data_over["input_size"]
    path = weights
    if weights == "hub":  # fetch first: fail fast, before allocating the model
        assert download is not None, "pretrained open_clip backbones pass a download function"
        with hub_download(name, source):
            path = download()
    # OpenAI weights were trained with QuickGELU; open_clip records that on the tag, not the arch.
    quick_gelu = bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
    if path not in ("hub", "none"):
        load_weights_file(visual, path, name=name)

    pre = merge_preprocess_dict(PreprocessCfg(), dict(tag_cfg))
    pre["size"] = vision_cfg.get("image_size", 224)
    data_config = dataclasses.replace(DataConfig.from_open_clip(pre), **data_over)
    return Backbone(model=visual.eval(), num_features=int(model_cfg["embed_dim"]),
                    data_config=data_config, name=name, family="clip", weights=weights,
                    default_head="mlp", source=source)


def _open_clip_pretrained(name: str, arch: str, tag: str | None, weights: str,
                          overrides: dict[str, Any]) -> Backbone:
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise BackboneError(f"backbone {name!r}: open_clip has no model {arch!r}"
                            f"{did_you_mean(arch, open_clip.list_models(), n=3)}; see open_clip.list_models()")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if (tag is not None and tag not in tags) or (tag is None and weights == "hub"):
        raise BackboneError(f"backbone {name!r} needs a pretrained tag of {arch}: "
                            f"'open_clip:{arch}@<tag>' with tag one of {short_list(tags, 8)}")
    tag_cfg = get_pretrained_cfg(arch, tag) if tag else {}
    return _clip_backbone(name, f"open_clip/{arch}@{tag}" if tag else f"open_clip/{arch}",
                          model_cfg, tag_cfg, weights=weights, overrides=overrides,
                          download=lambda: str(download_pretrained(tag_cfg)))


@register_backbone("clip_vitb32", hub="open_clip:ViT-B-32@openai")
def clip_vitb32(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """CLIP ViT-B/32 image tower, OpenAI weights (the reference study's CLIP); 512 features.
    Data config: 224, bicubic, centre crop, crop_pct 1.0, CLIP mean/std (open_clip's own)."""
    return _open_clip_pretrained(name, "ViT-B-32", "openai", weights, overrides)


@register_backbone("clip_vitl14", hub="open_clip:ViT-L-14@openai")
def clip_vitl14(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """CLIP ViT-L/14 image tower, OpenAI weights; 768 features."""
    return _open_clip_pretrained(name, "ViT-L-14", "openai", weights, overrides)


def _open_clip_prefixed(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """``open_clip:<arch>[@<tag>]``: any open_clip model's image tower."""
    arch, _, tag = name.partition(":")[2].partition("@")
    return _open_clip_pretrained(name, arch, tag or None, weights, overrides)


@register_backbone("tiny_clip", pretrained=False)
def tiny_clip(name: str, *, weights: str, **overrides: Any) -> Backbone:
    """open_clip ``VisionTransformer`` (ViT-B-32's image tower class, QuickGELU like OpenAI's):
    32 px, patch 8, width 64, 2 layers, 2 heads, 32 features, CLIP mean/std."""
    model_cfg = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                "head_width": 32}}
    tag_cfg = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    return _clip_backbone(name, "open_clip/VisionTransformer(32px,p8,w64,l2)", model_cfg, tag_cfg,
                          weights=weights, overrides=overrides)


_PREFIX_BUILDERS: dict[str, Builder] = {"timm": _timm_prefixed, "open_clip": _open_clip_prefixed}
