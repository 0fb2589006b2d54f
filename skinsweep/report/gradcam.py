"""Heat maps of what pushed a model's melanoma logit up: Grad-CAM via pytorch-grad-cam.

* CNN backbones (timm ResNet, ConvNeXt, EfficientNet …): Grad-CAM on the deepest feature stage
  (timm's ``feature_info``) whose map is at least 4x4 at the model's input size: ResNet-18's
  ``layer4`` at 224 px (7x7); an earlier stage for tiny inputs, where the last one is 1x1 and its
  map would be one constant value.
* ViT backbones (timm ``VisionTransformer`` such as DINO ViT-S/16, and open_clip's image tower):
  Grad-CAM on the last block's first LayerNorm, with a reshape that drops the class/register tokens
  and lays the patch tokens out on their grid (the method pytorch-grad-cam documents for ViTs).

Only the choice of layer and the token reshape are written here; hooks, gradients, weighting and
up-sampling are the library's. Maps are computed on exactly what the model saw (the image decoded and
resized as the image cache does, then the eval transform) and mapped back onto the original image:
a squashed image's map is stretched back, a center-cropped one's is placed on the crop.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from skinsweep.errors import BackboneError

__all__ = ["gradcam", "overlay", "target_layer"]


def target_layer(model, input_size: int = 224) -> tuple[object, Callable | None, str]:
    """``(layer, reshape_transform, method description)`` for a :class:`skinsweep.train.model.Classifier`."""
    bb = model.backbone
    if hasattr(bb, "blocks") and hasattr(bb, "patch_embed"):  # timm VisionTransformer (DINO, tiny_vit …)
        n_prefix = int(getattr(bb, "num_prefix_tokens", 1))
        grid = tuple(bb.patch_embed.grid_size)
        return bb.blocks[-1].norm1, _tokens_to_grid(n_prefix, grid, batch_first=True), "Grad-CAM (ViT tokens)"
    tr = getattr(bb, "transformer", None)
    if tr is not None and hasattr(tr, "resblocks") and hasattr(bb, "grid_size"):  # open_clip image tower
        return (tr.resblocks[-1].ln_1, _tokens_to_grid(1, tuple(bb.grid_size), batch_first=getattr(tr, "batch_first", True)),
                "Grad-CAM (ViT tokens)")
    info = getattr(bb, "feature_info", None)
    if info:
        stages = list(info) if isinstance(info, list) else info.get_dicts()
        big = [st for st in stages if input_size // int(st["reduction"]) >= 4] or stages[:1]
        name = big[-1]["module"]
        return bb.get_submodule(name), None, f"Grad-CAM on {name}"
    raise BackboneError(f"no heat-map method for backbone class {type(bb).__name__}: skinsweep knows timm CNNs "
                        "(feature_info), timm ViTs and open_clip image towers")


def _tokens_to_grid(n_prefix: int, grid: tuple[int, int], *, batch_first: bool) -> Callable:
    h, w = grid

    def reshape(t):
        if not batch_first:  # open_clip towers built with batch_first=False give (N, B, D)
            t = t.transpose(0, 1)
        t = t[:, n_prefix:, :]
        if t.shape[1] != h * w:
            raise BackboneError(f"ViT heat map: {t.shape[1]} patch tokens do not fill a {h}x{w} grid")
        return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)  # (B, D, h, w) like a conv map

    return reshape


def gradcam(model, meta: dict, images: Sequence, *, batch_size: int = 16) -> list[np.ndarray]:
    """One map per image: float32 ``(H, W)`` in [0, 1] at the original image's size.

    ``images``: file paths, or RGB PIL images already decoded as :func:`skinsweep.data.index.read_rgb`
    decodes files (the HTTP service's uploads).
    ``model, meta`` as :func:`skinsweep.train.loop.load_trial_model` returns them. The target is the
    melanoma logit (positive class), whatever the model predicted.
    """
    import torch
    from PIL import Image
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    from skinsweep.data.cache import resize_like_cache
    from skinsweep.data.index import read_rgb
    from skinsweep.data.transforms import DataConfig, eval_transform

    size, policy = int(meta["image_size"]), meta["resize_policy"]
    transform = eval_transform(DataConfig.from_dict(meta["data_config"]))
    layer, reshape, _ = target_layer(model, int(meta["data_config"]["input_size"]))
    model.eval()
    model.requires_grad_(True)  # a linear probe's frozen backbone still has to pass gradients back
    maps: list[np.ndarray] = []
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for s in range(0, len(images), batch_size):
            decoded = [p if isinstance(p, Image.Image) else read_rgb(p)  # once: for the model and for the size
                       for p in images[s:s + batch_size]]
            x = transform(torch.from_numpy(np.stack([resize_like_cache(im, size, policy) for im in decoded])))
            small = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(1)] * len(decoded))  # (B, S, S)
            for im, m in zip(decoded, small):
                maps.append(_to_original(np.asarray(m, dtype=np.float32), im.width, im.height, policy))
    return maps


def _to_original(m: np.ndarray, w: int, h: int, policy: str) -> np.ndarray:
    """Map a square model-input heat map back onto the (w x h) original image."""
    from PIL import Image

    if policy == "center-crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        out = np.zeros((h, w), dtype=np.float32)
        out[top:top + s, left:left + s] = np.asarray(Image.fromarray(m).resize((s, s), Image.BILINEAR))
        return out
    return np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR), dtype=np.float32)


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the heat map (jet colour map) blended on top; uint8 (H, W, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(rgb.astype(np.float32) / 255.0, cam, use_rgb=True, image_weight=1 - alpha)
