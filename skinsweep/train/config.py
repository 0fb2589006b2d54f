"""One trial's configuration: :class:`TrialConfig`, the single source of every training setting.

``skinsweep train`` builds its options from this model's fields, and a sweep recipe's ``trial:`` section
and search space are validated against it, so the command line, recipes and the trial cannot drift.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from skinsweep.config import Strict, validate_config


class TrialConfig(Strict):
    """Everything that defines one trial. Unknown keys are errors; None keeps a default."""

    # data
    data: str = Field(description="Dataset folder (ISIC / HAM10000 layout) or CSV file.")
    split: Optional[str] = Field(None, description="Split manifest; default: lesion-grouped 70/15/15, seed split_seed.")
    split_seed: int = Field(0, description="Seed of the default split (when no split manifest is given).")
    positive: list[str] = Field(["MEL"], description="Diagnosis codes counted as melanoma (label 1).")
    skip_bad: bool = Field(False, description="Drop missing, unlisted or undecodable images instead of failing.")
    image_size: Optional[int] = Field(None, ge=8, description="Cached image side; default the backbone's input size.")
    resize_policy: Literal["squash", "center-crop"] = Field("squash", description="squash (whole frame) or center-crop.")
    # model
    backbone: str = Field("resnet18", description="Backbone name (see `skinsweep backbones`), or timm:NAME / open_clip:NAME.")
    weights: Optional[str] = Field(None, description="hub (timm / open_clip / Hugging Face cache; honours HF_HUB_OFFLINE), none (random init), or a local .safetensors/.pt state dict; default per backbone.")
    backbone_args: dict[str, Any] = Field({}, description="Overrides passed to the backbone builder, e.g. {input_size: 96}.")
    mode: Literal["finetune", "linear_probe"] = Field("finetune", description="finetune (everything trains) or linear_probe (frozen backbone; embeddings computed once and cached).")
    head: Literal["auto", "linear", "mlp"] = Field("auto", description="Classifier head: auto (the backbone's default: linear for ResNet and DINO, mlp for CLIP, as the study), linear or mlp.")
    head_hidden: int = Field(512, ge=1, description="Hidden units of the mlp head.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the head's last layer.")
    # optimisation
    loss: Literal["bce", "focal"] = Field("bce", description="bce (BCE with logits weighted by pos_weight) or focal (alpha = w/(1+w), gamma focal_gamma).")
    pos_weight: float = Field(8.0, gt=0, description="Positive-class weight (the study: 8 = benign/melanoma ratio).")
    focal_gamma: float = Field(2.0, ge=0, description="Focusing parameter of the focal loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Training targets become y(1-ε)+ε/2 (bce and focal); reported val/test losses stay on the true labels.")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="adam or adamw.")
    lr: float = Field(1e-4, gt=0, description="Learning rate (head; the backbone gets lr × backbone_lr_mult).")
    backbone_lr_mult: float = Field(1.0, gt=0, description="Backbone lr = lr × this (finetune only).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the optimizer.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    epochs: int = Field(20, ge=1, description="Training epochs.")
    warmup_epochs: int = Field(0, ge=0, description="Epochs of linear learning-rate warm-up (onecycle: its cosine warm-up phase; 0 = 30% of the steps).")
    schedule: Literal["constant", "cosine", "onecycle"] = Field("constant", description="Learning-rate schedule per step: constant, cosine (to 0), or onecycle (torch OneCycleLR defaults: cosine up from lr/25 to lr over the warm-up, then cosine down to lr/25e4).")
    augment: Literal["auto", "none", "flips", "light", "resnet_study"] = Field("auto", description="Training augmentation: auto (resnet_study for fine-tuned CNNs, none otherwise, as the study), none, flips (random 90° rotation + horizontal flip: the 8 dihedral views), light (flips + random resized crop of 50-100% area + colour jitter 0.1) or resnet_study (crop 8-100%, hflip, jitter 0.2).")
    tta: Literal["none", "flips", "dihedral"] = Field("none", description="Test-time augmentation of the final val/test scoring and of bundles: mean logit over flips (identity, h, v, hv) or dihedral (4 rotations × hflip); per-epoch validation stays plain. A cached linear probe runs its frozen backbone on the views for this.")
    select_metric: str = Field("auc", description="Validation metric that picks the epoch.")
    embedding_cache: bool = Field(True, description="linear_probe: embed each image once and reuse (else run the frozen backbone every epoch).")
    # runtime
    seed: int = Field(0, description="Random seed (a fixed seed is deterministic on CPU).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (GPU: bf16 autocast, channels-last for CNNs).")
    eval_batch_size: int = Field(256, ge=1, description="Batch size for validation and test.")

    @field_validator("select_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        from skinsweep.metrics import HIGHER_IS_BETTER

        if v not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown metric {v!r}; use one of {', '.join(HIGHER_IS_BETTER)}")
        return v

    @property
    def hash(self) -> str:
        """Hash of every setting except where it runs (device); fields added later are left out at their
        defaults, so trials that ran before they existed keep their hash (trial id, reuse, resume).

        A split manifest counts by its content hash, not its path: each node of a cluster reads the sweep's
        manifest from its own cache folder, and the same trial must have the same hash on all of them. (A
        ``split`` that is not a readable manifest, e.g. not written yet, counts by its path; a trial refuses
        to run on it anyway.)
        """
        return self._digest(split_by_content=True)

    @property
    def path_hash(self) -> str:
        """The hash as skinsweep computed it before it counted the split manifest by content (by its path):
        what trial folders written then recorded, so that they are still reused (``run_trial``)."""
        return self._digest(split_by_content=False)

    def _digest(self, *, split_by_content: bool) -> str:
        d = self.model_dump(exclude={"device", "eval_batch_size"})
        for name, default in _ADDED_LATER.items():
            if d[name] == default:
                del d[name]
        if split_by_content and d["split"] is not None:
            from skinsweep.data.split import recorded_hash

            content = recorded_hash(d["split"])
            if content is not None:
                d["split"] = f"manifest:{content}"
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_ADDED_LATER = {"label_smoothing": 0.0, "tta": "none"}


def parse_config(values: dict[str, Any], source: str = "trial config") -> TrialConfig:
    """Validate ``values`` (None keeps a default) into a TrialConfig; errors: one ``SOURCE: [field] message`` line."""
    return validate_config(TrialConfig, {k: v for k, v in values.items() if v is not None}, source)
