"""One trial's configuration: :class:`TrialConfig`, the single source of every training setting.

``skinsweep train`` builds its options from this model's fields, and a sweep recipe's ``trial:`` section
and search space are validated against it, so the command line, recipes and the trial cannot drift.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from skinsweep.errors import ConfigError


class TrialConfig(BaseModel):
    """Everything that defines one trial. Unknown keys are errors; None keeps a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    data: str = Field(description="Dataset folder (ISIC / HAM10000 layout) or CSV file.")
    split: Optional[str] = Field(None, description="Split manifest; default: lesion-grouped 70/15/15, seed split_seed.")
    split_seed: int = 0
    positive: list[str] = ["MEL"]
    skip_bad: bool = False
    image_size: Optional[int] = Field(None, ge=8, description="Cached image side; default the backbone's input size.")
    resize_policy: Literal["squash", "center-crop"] = "squash"
    # model
    backbone: str = "resnet18"
    weights: Optional[str] = Field(None, description="hub, none, or a local .safetensors/.pt file; default per backbone.")
    backbone_args: dict[str, Any] = Field({}, description="Overrides passed to the backbone builder, e.g. {input_size: 96}.")
    mode: Literal["finetune", "linear_probe"] = "finetune"
    head: Literal["auto", "linear", "mlp"] = "auto"
    head_hidden: int = Field(512, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # optimisation
    loss: Literal["bce", "focal"] = "bce"
    pos_weight: float = Field(8.0, gt=0, description="Positive-class weight (the study: 8 = benign/melanoma ratio).")
    focal_gamma: float = Field(2.0, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0)
    backbone_lr_mult: float = Field(1.0, gt=0, description="Backbone lr = lr × this (finetune only).")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(20, ge=1)
    warmup_epochs: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    augment: Literal["auto", "none", "resnet_study"] = "auto"
    select_metric: str = "auc"
    embedding_cache: bool = Field(True, description="linear_probe: embed each image once and reuse (else run the frozen backbone every epoch).")
    # runtime
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = Field(256, ge=1)

    @field_validator("select_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        from skinsweep.metrics import HIGHER_IS_BETTER

        if v not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown metric {v!r}; use one of {', '.join(HIGHER_IS_BETTER)}")
        return v

    @property
    def hash(self) -> str:
        """Hash of every setting except where it runs (device)."""
        d = self.model_dump(exclude={"device", "eval_batch_size"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(values: dict[str, Any], source: str = "options") -> TrialConfig:
    """Validate ``values`` into a TrialConfig; errors become one ``[field] message`` line."""
    try:
        return TrialConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        msgs = "; ".join(f"[{'.'.join(str(p) for p in err['loc']) or 'config'}] {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid trial {source}: {msgs}") from None
