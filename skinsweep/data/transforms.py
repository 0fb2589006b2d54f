"""Batched image transforms on cached uint8 tensors, built only from a backbone's data config.

Images reach training from the image cache as a uint8 array ``(B, H, W, 3)`` (RGB, NHWC). Every
transform here maps such a batch to a float32 ``(B, 3, S, S)`` tensor, normalised, on the device the
input is on: no PIL, no per-image Python work except the per-sample crop loop of the training
augmentation. Float input is accepted too and is taken to be on torchvision's ``[0, 1]`` scale.

Eval semantics are timm's ``transforms_imagenet_eval`` (which open_clip's ``"shortest"`` eval
preprocess also follows): resize with the shorter side to ``floor(S / crop_pct)`` (long side
``int(scale * long / short)`` like torchvision), or ``squash`` both sides to it, then centre-crop
``S`` (offsets ``int(round((n - S) / 2))``); a resize to the input's own size is skipped. Resizing
uses ``F.interpolate(antialias=True)``, whose bicubic/bilinear kernels are ports of PIL's, and for
uint8 input keeps PIL's uint8 rounding (see ``_resize``). Against the libraries' own PIL pipelines
(timm ``create_transform`` for DINO ViT-S/16, open_clip ViT-B-32 preprocess) on textured
224x224, 300x300, 450x600 and 600x450 images, in normalised units:

    max |ours - theirs|  measured 0.035 (2 uint8 levels, DINO 224->248 upsampling), else <= 1 level
                         (0.0175 ImageNet / 0.015 CLIP std); asserted <= 0.036
    mean |ours - theirs| measured <= 1.4e-4; asserted <= 5e-4

``nearest`` uses ``nearest-exact`` (PIL's pixel-centre convention) but may pick the other pixel at
exact ties, where PIL's incremental float arithmetic rounds differently; no backbone here uses it.

``train_transform(cfg, "resnet_study")`` is the reference study's ResNet-18 recipe with
torchvision's defaults, vectorised, with per-sample randomness drawn from an explicit CPU
``torch.Generator`` (so a seed gives the same augmentation on any device): RandomResizedCrop(S,
scale=(0.08, 1), ratio=(3/4, 4/3), bilinear), horizontal flip p=0.5, ColorJitter(brightness=0.2,
contrast=0.2, saturation=0.2), then the config's normalisation. Scale 0.08 can crop a small lesion
out of the frame; ``"light"`` is the milder variant (scale (0.5, 1), jitter 0.1, plus a random quarter
turn), and ``"flips"`` changes only the orientation (the eval output in one of its 8 dihedral views).
``tta_logits`` averages a model over such views at evaluation time (``TTAS``).

Measured on 2 idle CPU cores (torch 2.14), batch of 64, median per batch, input 224 / 448 px:
train "resnet_study" 32 / 41 ms (crop loop ~12 ms of it; 41 / 52 ms with 1 thread), DINO eval
(224 -> 248 -> crop 224) 23 / 33 ms, CLIP eval 16 / 30 ms. A ResNet-18 training step on the same
batch takes 4-6 s on the same 2 cores.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from skinsweep.errors import ConfigError, DataError

# the libraries' own constants (both are hard dependencies), so the numbers are never retyped
from open_clip.constants import OPENAI_DATASET_MEAN as CLIP_MEAN
from open_clip.constants import OPENAI_DATASET_STD as CLIP_STD
from timm.data.constants import DEFAULT_CROP_PCT as TIMM_DEFAULT_CROP_PCT
from timm.data.constants import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data.constants import IMAGENET_DEFAULT_STD as IMAGENET_STD

__all__ = [
    "AUGMENTS",
    "FlipsTransform",
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_MODES",
    "DataConfig",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "TTAS",
    "TrainTransform",
    "eval_transform",
    "format_data_config",
    "train_transform",
    "tta_logits",
    "tta_views",
]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
CROP_MODES = ("center", "squash")
AUGMENTS = ("none", "flips", "light", "resnet_study")
TTAS = ("none", "flips", "dihedral")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 as PIL convert("L"); torchvision uses 0.2989 for red


# --------------------------------------------------------------------------- data config


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing that travels with a backbone (timm's data config, square inputs only).

    ``input_size`` is the square side ``S`` in pixels; ``mean``/``std`` are per RGB channel on the
    ``[0, 1]`` scale; ``crop_pct`` in ``(0, 1]`` is the fraction of the resized image kept by the
    centre crop (1.0: no crop beyond the aspect-ratio trim).
    """

    input_size: int = 224
    mean: tuple[float, float, float] = tuple(IMAGENET_MEAN)
    std: tuple[float, float, float] = tuple(IMAGENET_STD)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ConfigError(f"DataConfig.input_size must be a positive int, got {size!r}; e.g. 224")
        object.__setattr__(self, "input_size", int(size))  # numpy ints become plain, JSON-safe ints
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                vec = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                vec = ()
            if len(vec) != 3 or not all(math.isfinite(v) for v in vec):
                raise ConfigError(f"DataConfig.{name} must be 3 finite floats (R, G, B), got {value!r}")
            if name == "std" and min(vec) <= 0:
                raise ConfigError(f"DataConfig.std must be > 0 per channel, got {value!r}")
            object.__setattr__(self, name, vec)  # lists from JSON become tuples: hashable, frozen
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"DataConfig.interpolation must be one of {INTERPOLATIONS}, "
                              f"got {self.interpolation!r}")
        pct = self.crop_pct
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise ConfigError(f"DataConfig.crop_pct must be in (0, 1], got {pct!r}; "
                              "use 1.0 to keep the whole resized image")
        object.__setattr__(self, "crop_pct", float(pct))
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(f"DataConfig.crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Inverse of ``to_dict``; missing keys take the defaults, unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"DataConfig must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"DataConfig has unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_timm(cls, cfg: Mapping[str, Any]) -> DataConfig:
        """From ``timm.data.resolve_data_config(...)`` (input_size ``(3, H, W)``, mean, std, ...).

        ``crop_pct``/``crop_mode`` of ``None`` take timm's eval defaults (0.875, "center"). Keys we
        cannot honour are an error rather than dropped, so the pipeline never silently differs.
        """
        allowed = {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ConfigError(f"timm data config has unsupported keys {unknown}; expected {sorted(allowed)}")
        shape = tuple(cfg.get("input_size", (3, 224, 224)))
        if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
            raise ConfigError(f"timm data config input_size must be (3, S, S), got {shape}; "
                              "only square RGB inputs are supported")
        return cls(
            input_size=int(shape[1]),
            mean=cfg.get("mean", IMAGENET_MEAN),
            std=cfg.get("std", IMAGENET_STD),
            interpolation=cfg.get("interpolation") or "bilinear",  # timm's eval default
            crop_pct=cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT,
            crop_mode=cfg.get("crop_mode") or "center",
        )

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> DataConfig:
        """From an open_clip ``model.visual.preprocess_cfg`` (size, mean, std, interpolation, resize_mode)."""
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"open_clip preprocess size must be square, got {size}")
        mode = cfg.get("resize_mode") or "shortest"
        if mode not in ("shortest", "squash"):
            raise ConfigError(f"open_clip resize_mode {mode!r} is not supported; use 'shortest' or 'squash'")
        return cls(
            input_size=int(size[0]),
            mean=cfg.get("mean") or CLIP_MEAN,
            std=cfg.get("std") or CLIP_STD,
            interpolation=cfg.get("interpolation") or "bicubic",
            crop_pct=1.0,  # open_clip resizes straight to the model size
            crop_mode="center" if mode == "shortest" else "squash",
        )


def format_data_config(cfg: DataConfig) -> str:
    """One line for logs and module reprs, e.g. ``224px center crop_pct=0.9 (resize 248) bicubic mean=(...)``."""
    scale = math.floor(cfg.input_size / cfg.crop_pct)
    mean = ", ".join(f"{v:.4g}" for v in cfg.mean)
    std = ", ".join(f"{v:.4g}" for v in cfg.std)
    return (f"{cfg.input_size}px {cfg.crop_mode} crop_pct={cfg.crop_pct:g} (resize {scale}) "
            f"{cfg.interpolation} mean=({mean}) std=({std})")


# --------------------------------------------------------------------------- shared helpers


def _as_nchw(x: Tensor) -> Tensor:
    """Check a (B, H, W, 3) uint8 (0..255) or float (0..1) batch; return its (B, 3, H, W) view (no copy)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[-1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"image batch must be a (B, H, W, 3) RGB tensor, got {shape}; "
                        "permute NCHW batches with x.permute(0, 2, 3, 1)")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise DataError(f"image batch must be uint8 (0..255) or float (0..1), got {x.dtype}")
    # channels_last strides: interpolate has fast kernels for them, and nothing is copied yet
    return x.permute(0, 3, 1, 2)


def _interp(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode == "nearest":  # nearest-exact samples pixel centres like PIL; plain "nearest" is shifted
        return F.interpolate(x, size=size, mode="nearest-exact")
    # antialias=True uses PIL's filters (bicubic a=-0.5, support scaled when downsampling), also
    # when upsampling, where antialias=False would use a=-0.75 and differ from PIL
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def _resize(x: Tensor, size: tuple[int, int], mode: str, native: bool | None = None) -> Tensor:
    """Resize (B, 3, H, W) to ``size``, keeping the input's 0..255 or 0..1 scale; a no-op returns ``x``.

    uint8 input follows PIL's uint8 resampling. ``native`` (default: on CPU) uses torch's uint8
    kernels, a port of PIL's (<= 2 uint8 levels off, no full-size float copy, ~10x faster on CPU);
    otherwise PIL's two separable passes (horizontal first, rounding to uint8 after each) are
    replayed in float32, <= 1 level off, on any device.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if x.dtype != torch.uint8:
        return _interp(x.to(torch.float32), size, mode).clamp_(0.0, 1.0)
    if native is None:
        native = x.device.type == "cpu"
    if native or mode == "nearest":  # nearest copies pixels: exact in uint8 on every device
        return _interp(x, size, mode)
    x = x.to(torch.float32)
    if w != size[1]:
        x = _interp(x, (h, size[1]), mode).clamp_(0.0, 255.0).round_()
    if h != size[0]:
        x = _interp(x, tuple(size), mode).clamp_(0.0, 255.0).round_()
    return x


def _eval_geometry(cfg: DataConfig, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resized (h, w) and crop (top, left) for an h x w input, exactly as timm/torchvision compute them."""
    scale = math.floor(cfg.input_size / cfg.crop_pct)
    if cfg.crop_mode == "squash":
        new = (scale, scale)
    else:  # torchvision Resize(int): shorter side to `scale`, longer side truncated
        short, long = min(h, w), max(h, w)
        new_long = int(scale * long / short)
        new = (scale, new_long) if h <= w else (new_long, scale)
    s = cfg.input_size
    return new, (int(round((new[0] - s) / 2.0)), int(round((new[1] - s) / 2.0)))


def _normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], unit: float) -> Tensor:
    """(x / unit - mean) / std for (B, 3, H, W) of any dtype/layout -> new contiguous float32 tensor."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    # one allocation, then in-place passes: measured fastest on CPU (fresh large tensors page-fault)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return out.copy_(x).mul_(1.0 / (unit * s)).sub_(m / s)


# --------------------------------------------------------------------------- eval


class EvalTransform(nn.Module):
    """uint8 (B, H, W, 3) or float (0..1) -> float32 (B, 3, S, S): resize, centre crop, normalise."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``generator`` is ignored; it keeps the call signature of ``TrainTransform``."""
        x = _as_nchw(x)
        unit = 255.0 if x.dtype == torch.uint8 else 1.0
        size, (top, left) = _eval_geometry(self.cfg, *x.shape[-2:])
        x = _resize(x, size, self.cfg.interpolation)
        s = self.cfg.input_size
        return _normalize(x[..., top:top + s, left:left + s], self.cfg.mean, self.cfg.std, unit)

    def extra_repr(self) -> str:
        return format_data_config(self.cfg)


def eval_transform(cfg: DataConfig) -> EvalTransform:
    """The eval pipeline of ``cfg`` (timm / open_clip semantics) as a batched, device-agnostic module."""
    return EvalTransform(cfg)


# --------------------------------------------------------------------------- train


def _rrc_params(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                g: torch.Generator | None, tries: int = 10) -> Tensor:
    """torchvision ``RandomResizedCrop.get_params`` for ``n`` samples at once -> (n, 4) int64 top, left, h, w."""
    area = h * w
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=g, dtype=torch.float64))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, tries, generator=g, dtype=torch.float64))
    cw = torch.sqrt(target * aspect).round().long()
    ch = torch.sqrt(target / aspect).round().long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    # fallback when all tries fail: torchvision's central crop clamped to the ratio range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(h * ratio[1])), h
    else:
        fw, fh = w, h
    first = torch.where(ok.any(1), ok.long().argmax(1), torch.full((n,), -1))
    idx = first.clamp(min=0).unsqueeze(1)
    cw = torch.where(first >= 0, cw.gather(1, idx).squeeze(1), torch.tensor(fw))
    ch = torch.where(first >= 0, ch.gather(1, idx).squeeze(1), torch.tensor(fh))
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.where(first >= 0, (u[:, 0] * (h - ch + 1)).long(), (h - ch) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (w - cw + 1)).long(), (w - cw) // 2)
    return torch.stack([top, left, ch, cw], 1)


def _jitter(x: Tensor, factors: Tensor, unit: float = 1.0) -> Tensor:
    """ColorJitter: x (n, 3, h, w) uint8 or float on 0..unit -> new float32 tensor on 0..1.

    ``factors`` (n, 3): brightness, contrast, saturation. All three are linear maps (torchvision
    ``adjust_*``: scale; blend with the mean of the grayscale image; blend with the grayscale image),
    so their composition is the one per-sample map ``b * (c * (s * y + (1 - s) * gray) + (1 - c) *
    mean(gray))`` whatever the order. torchvision shuffles the order and clips after each step; we
    clip once, so the two differ only at pixels that saturate on the way. Written as few full passes
    over the batch as possible (the uint8 → float conversion is fused with the scaling): on a 2-core
    CPU this map, not the crop, dominated the augmentation's cost.
    """
    n = x.shape[0]
    b, c, s = (factors[:, k].view(n, 1, 1, 1).to(torch.float32) for k in range(3))
    # grayscale (n, 1, h, w) on the 0..1 scale; in-place adds beat conv2d / einsum on CPU
    gray = x[:, 0:1].to(torch.float32, copy=True).mul_(_LUMA[0] / unit)  # never alias x
    gray.add_(x[:, 1:2], alpha=_LUMA[1] / unit).add_(x[:, 2:3], alpha=_LUMA[2] / unit)
    mean_gray = gray.mean((2, 3), keepdim=True)
    offset = gray.mul_(b * c * (1 - s)).add_(b * (1 - c) * mean_gray)
    return torch.mul(x, b * c * s / unit).add_(offset).clamp_(0.0, 1.0)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run many tiny CPU ops single-threaded, then restore torch's thread count.

    Each per-sample resize is too small to gain from intra-op threads, but every op still opens an
    OpenMP parallel region; when the cores are oversubscribed (another trial, a data loader) each
    region waits for a descheduled thread. Measured on 2 busy cores, batch 64 at 224 px: the crop
    loop takes ~700 ms with 2 threads and ~11 ms with 1 (~12 ms with 2 on idle cores).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" else n)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"train_transform {name} must be a (low, high) pair, got {value!r}") from None
    return lo, hi


class TrainTransform(nn.Module):
    """The reference study's ResNet-18 augmentation, per-sample random, batched.

    uint8 (B, H, W, 3) or float (0..1) -> float32 (B, 3, S, S). Each sample gets its own
    RandomResizedCrop box (bilinear, as torchvision's default), flip and jitter factors, drawn
    from ``generator`` (a CPU ``torch.Generator``; ``None`` uses torch's global RNG). ColorJitter
    is one per-sample affine map with a single clip (``_jitter``). ``rot90`` adds a uniform random
    quarter turn before the flip (with hflip 0.5: a uniform one of the 8 dihedral views; the output is
    square, so the shape stays); it is drawn after the other parameters, so without it a seed gives
    exactly the study's augmentation.
    """

    def __init__(self, cfg: DataConfig, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 jitter: float = 0.2, rot90: bool = False) -> None:
        super().__init__()
        scale, ratio = _pair("scale", scale), _pair("ratio", ratio)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"train_transform scale must satisfy 0 < lo <= hi <= 1, got {scale}; "
                              "torchvision's default is (0.08, 1.0)")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"train_transform ratio must satisfy 0 < lo <= hi, got {ratio}; "
                              "torchvision's default is (0.75, 1.333)")
        if not 0 <= hflip <= 1:
            raise ConfigError(f"train_transform hflip must be a probability in [0, 1], got {hflip}")
        if not 0 <= jitter < 1:
            raise ConfigError(f"train_transform jitter must be in [0, 1), got {jitter}; e.g. 0.2")
        self.cfg, self.scale, self.ratio, self.hflip, self.jitter = cfg, scale, ratio, hflip, jitter
        self.rot90 = bool(rot90)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        src = _as_nchw(x)
        n, _, h, w = src.shape
        s = self.cfg.input_size
        # --- random parameters, all drawn on the CPU so a seed means the same thing on any device
        boxes = _rrc_params(n, h, w, self.scale, self.ratio, generator).tolist()
        flips = (torch.rand(n, generator=generator) < self.hflip).tolist()
        j = self.jitter
        bcs = 1 - j + 2 * j * torch.rand(n, 3, generator=generator)  # brightness, contrast, saturation
        turns = torch.randint(4, (n,), generator=generator).tolist() if self.rot90 else [0] * n

        # --- crop + resize + turn + flip per sample; uint8 stays uint8 (torchvision's fast native kernels)
        out = torch.empty((n, 3, s, s), dtype=x.dtype, device=x.device)
        with _one_cpu_thread(x.device):
            for i, ((top, left, ch, cw), flip, k) in enumerate(zip(boxes, flips, turns)):
                crop = TF.resized_crop(src[i], top, left, ch, cw, [s, s],
                                       interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
                out[i] = _dihedral(crop, k, flip)

        # --- colour jitter + normalisation, in place on the one float buffer we return
        unit = 255.0 if x.dtype == torch.uint8 else 1.0
        y = _jitter(out, bcs.to(out.device), unit)
        m = torch.tensor(self.cfg.mean, dtype=torch.float32, device=y.device).view(1, 3, 1, 1)
        sd = torch.tensor(self.cfg.std, dtype=torch.float32, device=y.device).view(1, 3, 1, 1)
        return y.sub_(m).div_(sd)

    def extra_repr(self) -> str:
        return (f"{format_data_config(self.cfg)} rrc(scale={self.scale}, ratio=({self.ratio[0]:.3g}, "
                f"{self.ratio[1]:.3g})) hflip={self.hflip} jitter={self.jitter}" + (" rot90" if self.rot90 else ""))


class FlipsTransform(nn.Module):
    """The eval transform, then per sample a uniform random one of the 8 dihedral views (quarter turn
    k in 0..3, then a horizontal flip with p 0.5). A dermoscopic lesion has no up, down, left or right,
    so these are label-preserving and change no pixel value: no crop, no resampling, no colour change."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg, self.base = cfg, EvalTransform(cfg)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        y = self.base(x)
        n = y.shape[0]
        view = (2 * torch.randint(4, (n,), generator=generator) + (torch.rand(n, generator=generator) < 0.5)).tolist()
        out = torch.empty_like(y)
        for v in set(view):  # one batched op per view used, not one per sample
            idx = torch.tensor([i for i, u in enumerate(view) if u == v], device=y.device)
            out[idx] = _dihedral(y[idx], v // 2, bool(v % 2))
        return out

    def extra_repr(self) -> str:
        return f"{format_data_config(self.cfg)} dihedral"


def _dihedral(x: Tensor, k: int, flip: bool) -> Tensor:
    """``x`` (..., S, S) turned ``k`` quarter turns (counter-clockwise), then mirrored left-right if ``flip``."""
    x = x.rot90(k, (-2, -1)) if k else x
    return x.flip(-1) if flip else x


def train_transform(cfg: DataConfig, augment: str = "none", **kwargs: Any) -> nn.Module:
    """Training pipeline, from weakest to strongest:

    * ``"none"``: the eval transform (how the study trained DINO and CLIP);
    * ``"flips"``: the eval transform + a random dihedral view (``FlipsTransform``: pixels unchanged);
    * ``"light"``: ``TrainTransform`` with crops of 50-100% of the area, jitter 0.1, hflip and rot90
      (a crop keeps the lesion, unlike the study's 8% floor);
    * ``"resnet_study"``: ``TrainTransform`` as the study (crops of 8-100%, hflip, jitter 0.2).

    kwargs override ``TrainTransform``'s (scale, ratio, hflip, jitter, rot90) for the last two. All are
    called as ``t(x, generator=g)`` with x uint8 (B, H, W, 3) -> float32 (B, 3, S, S).
    """
    if augment in ("none", "flips"):
        if kwargs:
            raise ConfigError(f"augment {augment!r} takes no options, got {sorted(kwargs)}")
        return EvalTransform(cfg) if augment == "none" else FlipsTransform(cfg)
    if augment == "light":
        return TrainTransform(cfg, **{"scale": (0.5, 1.0), "jitter": 0.1, "rot90": True, **kwargs})
    if augment == "resnet_study":
        return TrainTransform(cfg, **kwargs)
    raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")


# --------------------------------------------------------------------------- test-time augmentation


def tta_views(x: Tensor, tta: str) -> list[Tensor]:
    """The views of a normalised (B, 3, S, S) batch averaged by test-time augmentation ``tta``:
    ``none`` [x]; ``flips`` identity, hflip, vflip, hvflip; ``dihedral`` the 4 quarter turns, each
    also mirrored (the 8 symmetries of the square). Views are cheap (no resampling)."""
    if tta == "none":
        return [x]
    if tta == "flips":
        return [x, x.flip(-1), x.flip(-2), x.flip((-2, -1))]
    if tta == "dihedral":
        return [_dihedral(x, k, f) for k in range(4) for f in (False, True)]
    raise ConfigError(f"tta must be one of {TTAS}, got {tta!r}")


def tta_logits(model: Any, x: Tensor, tta: str) -> Tensor:
    """``model(x)`` averaged over ``tta_views(x, tta)`` (in float32, views summed in order, so the
    trial's final scoring and a bundle give the same numbers); ``none`` is ``model(x)`` unchanged."""
    if tta == "none":
        return model(x)
    views = tta_views(x, tta)
    total = model(views[0]).float()
    for v in views[1:]:
        total = total + model(v).float()
    return total / len(views)
