"""Ensemble recipes (``ensembles/*.yaml``): members rule, combiner, calibration, threshold, report."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from skinsweep.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MembersSpec(_Strict):
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
            raise ValueError("rule explicit needs `trials: [id, …]`")
        if self.rule != "explicit" and self.trials:
            raise ValueError(f"`trials` is only for rule explicit (rule is {self.rule})")
        if not self.by.startswith("val_"):
            raise ValueError(f"by {self.by!r}: members are chosen on validation metrics only (val_auc, val_ap, …)")
        return self


class CombinerSpec(_Strict):
    type: Literal["mean_prob", "mean_logit", "weighted", "stacking"] = "stacking"
    C: float = Field(1.0, gt=0, description="stacking: inverse L2 strength")
    n_splits: int = Field(5, ge=2, description="cross-fitting folds on validation (grouped by lesion)")
    metadata: list[Literal["age", "sex", "site"]] = Field(
        [], description="stacking: patient metadata from the sweep's dataset index, stacked with the member logits")

    @model_validator(mode="after")
    def _metadata_needs_stacking(self) -> "CombinerSpec":
        if self.metadata and self.type != "stacking":
            raise ValueError(f"combiner.metadata is only used by combiner.type stacking (type is {self.type}); "
                             "set combiner.type: stacking or drop combiner.metadata")
        if len(set(self.metadata)) != len(self.metadata):
            raise ValueError(f"combiner.metadata lists a feature twice ({self.metadata}); list each of age, sex, site once")
        return self


class CalibrationSpec(_Strict):
    method: Literal["none", "temperature", "platt", "isotonic"] = "temperature"


class ThresholdSpec(_Strict):
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


class ReportSpec(_Strict):
    n_boot: int = Field(2000, ge=100)
    seed: int = 0
    spec_for_sens: float = Field(0.9, gt=0, lt=1, description="report sensitivity at this specificity")


class EnsembleRecipe(_Strict):
    name: str
    members: MembersSpec = MembersSpec()
    combiner: CombinerSpec = CombinerSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    threshold: ThresholdSpec = ThresholdSpec()
    report: ReportSpec = ReportSpec()
    seed: int = 0

    @model_validator(mode="after")
    def _greedy_has_no_metadata(self) -> "EnsembleRecipe":
        if self.combiner.metadata and self.members.rule == "greedy":
            raise ValueError("combiner.metadata cannot be used with members.rule greedy (it averages probabilities); "
                             "use another members.rule with combiner.type stacking, or drop combiner.metadata")
        return self

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def load_ensemble_recipe(path: str | Path, overrides: list[str] = ()) -> EnsembleRecipe:
    """YAML → EnsembleRecipe; ``overrides`` are ``key.path=value`` (``--set``). Errors: one line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"ensemble recipe not found: {path}; see ensembles/*.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of recipe fields at the top level")
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; e.g. --set calibration.method=isotonic")
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return EnsembleRecipe(**raw)
    except ValidationError as e:
        msgs = "; ".join(f"[{'.'.join(str(p) for p in err['loc']) or 'recipe'}] {err['msg'].removeprefix('Value error, ')}"
                         for err in e.errors())
        raise ConfigError(f"{path}: {msgs}") from None
