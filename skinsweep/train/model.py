"""Classifier = backbone (feature extractor) + head (one melanoma logit).

Heads follow the reference study: a linear layer for ResNet-18 and DINO, a small MLP for CLIP
(``head="auto"`` picks the backbone's default). Modes: ``finetune`` trains everything;
``linear_probe`` freezes the backbone (eval mode, no grads) and trains the head only.
"""

from __future__ import annotations

from torch import Tensor, nn

from skinsweep.errors import ConfigError

MODES = ("finetune", "linear_probe")


def make_head(kind: str, in_features: int, *, hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    """``linear``: in→1. ``mlp``: in→hidden→GELU→dropout→1 (the study's CLIP head)."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1)) if dropout else nn.Linear(in_features, 1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
    raise ConfigError(f"unknown head {kind!r}; use linear or mlp")  # "auto" is resolved by the caller


class Classifier(nn.Module):
    """``forward(x: float (B,3,S,S)) -> logits (B,)``; ``head_forward(features (B,D)) -> logits (B,)``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, mode: str = "finetune") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.backbone, self.head, self.mode = backbone, head, mode
        if mode == "linear_probe":
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.mode == "linear_probe":
            self.backbone.eval()  # frozen: batch-norm statistics and dropout stay fixed
        return self

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def head_forward(self, feats: Tensor) -> Tensor:
        return self.head(feats).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_forward(self.features(x))


def param_groups(model: Classifier, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: the head at ``lr``, the backbone (when trained) at ``lr * backbone_lr_mult``."""
    groups = [{"params": list(model.head.parameters()), "lr": lr, "weight_decay": weight_decay}]
    if model.mode == "finetune":
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad],
                       "lr": lr * backbone_lr_mult, "weight_decay": weight_decay})
    return groups


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
