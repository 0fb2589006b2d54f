"""Ensemble recipes (``ensembles/*.yaml``): members rule, combiner, calibration, threshold, report."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field, model_validator

from skinsweep.config import FieldError, Strict, load_config


class MembersSpec(Strict):
    rule: Literal["explicit", "best_per_backbone", "top_k", "greedy"] = "best_per_backbone"
    trials: list[str] = Field([], description="explicit: trial ids")
    backbones: Optional[list[str]] = Field(None, description="best_per_backbone / top_k: restrict to these")
    modes: Optional[list[Literal["finetune", "linear_probe"]]] = None
    by: str = Field("val_auc", description="trials.parquet column that ranks candidates (validation only)")
    k: int = Field(3, ge=1, description="top_k: members per backbone")
    top_n: int = Field(20, ge=1, description="greedy: candidates (best by `by`)")
    n_iter: int = Field(25, ge=1, description="greedy: selection rounds (with replacement)")
    metric: Literal["auc", "ap"] = "auc"

    @model_validator(mode="after")
    def _rule_fields(self) -> "MembersSpec":
        if self.rule == "explicit" and not self.trials:
            raise FieldError("trials", "rule explicit needs `trials: [id, …]`")
        if self.rule != "explicit" and self.trials:
            raise FieldError("trials", f"`trials` is only for rule explicit (rule is {self.rule})")
        if not self.by.startswith("val_"):
            raise FieldError("by", f"{self.by!r}: members are chosen on validation metrics only (val_auc, val_ap, …)")
        return self


class CombinerSpec(Strict):
    type: Literal["mean_prob", "mean_logit", "weighted", "stacking"] = "stacking"
    C: float = Field(1.0, gt=0, description="stacking: inverse L2 strength")
    n_splits: int = Field(5, ge=2, description="cross-fitting folds on validation (grouped by lesion)")
    metadata: list[Literal["age", "sex", "site"]] = Field(
        [], description="stacking: patient metadata from the sweep's dataset index, stacked with the member logits")

    @model_validator(mode="after")
    def _distinct_metadata(self) -> "CombinerSpec":
        if len(set(self.metadata)) != len(self.metadata):
            raise FieldError("metadata", f"combiner.metadata lists a feature twice ({self.metadata}); list each of age, sex, site once")
        return self


class CalibrationSpec(Strict):
    method: Literal["none", "temperature", "platt", "isotonic"] = "temperature"


class ThresholdSpec(Strict):
    target_sensitivity: Optional[float] = Field(None, gt=0, le=1)
    target_specificity: Optional[float] = Field(None, gt=0, le=1)
    youden: bool = False

    @model_validator(mode="after")
    def _one(self) -> "ThresholdSpec":
        n = sum([self.target_sensitivity is not None, self.target_specificity is not None, self.youden])
        if n > 1:
            raise ValueError("choose one of target_sensitivity, target_specificity, youden")
        return self

    def kwargs(self) -> dict:
        if self.target_specificity is not None:
            return {"target_specificity": self.target_specificity}
        if self.youden:
            return {"youden": True}
        return {"target_sensitivity": self.target_sensitivity or 0.95}


class ReportSpec(Strict):
    n_boot: int = Field(2000, ge=100)
    seed: int = 0
    spec_for_sens: float = Field(0.9, gt=0, lt=1, description="report sensitivity at this specificity")


class EnsembleRecipe(Strict):
    name: str
    members: MembersSpec = MembersSpec()
    combiner: CombinerSpec = CombinerSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    threshold: ThresholdSpec = ThresholdSpec()
    report: ReportSpec = ReportSpec()
    seed: int = 0

    @model_validator(mode="after")
    def _metadata_needs_a_regression(self) -> "EnsembleRecipe":
        c = self.combiner
        if c.metadata and c.type != "stacking" and self.members.rule != "greedy":
            raise FieldError("combiner.metadata", f"combiner.metadata is only used by combiner.type stacking or members.rule "
                             f"greedy (type is {c.type}, rule {self.members.rule}); set combiner.type: stacking or drop "
                             "combiner.metadata")
        return self

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def load_ensemble_recipe(path: str | Path, overrides: Sequence[str] = ()) -> EnsembleRecipe:
    """YAML → EnsembleRecipe; ``overrides`` are ``key.path=value`` (``--set``). Errors: one line,
    ``FILE: [dotted.field] message``, as for sweep recipes (:func:`skinsweep.config.load_config`)."""
    return load_config(path, EnsembleRecipe, overrides, what="ensemble recipe", examples="ensembles/")
