"""Sweep recipes: strict YAML → :class:`SweepRecipe`, and the Optuna define-by-run search space.

A recipe (``sweeps/*.yaml``) names the data, the split, the settings every trial shares (``trial:``)
and either a search (``search:``, Optuna TPE under Ray Tune) or a fixed list of configurations
(``trials:``). It is validated once, at load, against strict pydantic models (spaCy style): every
problem is one line naming the file and the dotted field, e.g.::

    sweeps/x.yaml: [search.space.lr.float] low 0.001 must be below high 1e-05; swap them

``--set key.path=value`` overrides are applied to the raw YAML before validation, so they meet the same
schema. The search space is define-by-run, in YAML order::

    space:
      mode: {choice: [finetune, linear_probe]}
      lr:                                   # variants: the first whose `when` matches is used
        - {when: {mode: finetune}, float: [1.0e-5, 1.0e-3], log: true}
        - {when: {mode: linear_probe}, float: [1.0e-4, 1.0e-1], log: true}
      backbone_lr_mult: {when: {mode: finetune}, float: [0.01, 1.0], log: true}

Each variant of a conditional parameter gets its own Optuna name (``lr|mode=finetune``) so TPE never
models two ranges as one; :meth:`SweepRecipe.params_from_optuna` maps them back to TrialConfig names.
Only this module's callers (the sweep) import Ray; this module imports Optuna lazily.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from skinsweep.errors import ConfigError, short_list
from skinsweep.train.loop import TrialConfig

if TYPE_CHECKING:
    import optuna

# Where each sweep-level TrialConfig field is set instead of `trial:` (the sweep fills them in).
SWEEP_LEVEL = {
    "data": "data.root", "split": "split.file", "split_seed": "split.seed", "positive": "data.positive",
    "skip_bad": "data.skip_bad", "seed": "the top-level seed",
    "device": "resources.gpus_per_trial (the sweep picks the device)",
}
# Data-side fields: fixed under `data:`, but a search or a `trials:` entry may vary them per trial.
DATA_LEVEL = {"image_size": "data.image_size", "resize_policy": "data.resize_policy"}
FIXED_FIELDS = tuple(f for f in TrialConfig.model_fields if f not in SWEEP_LEVEL and f not in DATA_LEVEL)
SEARCH_FIELDS = FIXED_FIELDS + tuple(DATA_LEVEL)
DICT_FIELDS = ("backbone_args",)  # searchable key by key: `backbone_args.input_size`
SPEC_KEYS = ("when", "choice", "float", "int", "log", "step")
SEP = "|"  # Optuna name of a conditional variant: "<param>|<condition>"
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
_MAX_CONTEXTS = 4096  # categorical combinations enumerated to check that every variant can apply


class RecipeError(ConfigError):
    """A recipe problem at a dotted ``path``; :func:`load_recipe` prefixes the file (and ``--set`` item)."""

    def __init__(self, path: str, msg: str) -> None:
        self.path, self.msg = path, msg
        super().__init__(f"[{path}] {msg}")


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    root: str = Field(description="Dataset folder or CSV; relative paths are resolved against the working directory.")
    positive: list[str] = Field(["MEL"], min_length=1)
    skip_bad: bool = False
    image_size: Optional[int] = Field(None, ge=8, description="Cached image side; default the backbone's input size.")
    resize_policy: Literal["squash", "center-crop"] = "squash"


class SplitSpec(_Strict):
    mode: Literal["grouped", "image", "official"] = "grouped"
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    seed: int = 0
    file: Optional[str] = Field(None, description="A ready manifest (skinsweep data split); mode/fractions/seed then unused.")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0 or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"{list(v)} must be three positive numbers (train, val, test) summing to 1, "
                             "e.g. [0.7, 0.15, 0.15]")
        return v


class SamplerSpec(_Strict):
    multivariate: bool = True
    group: bool = True
    constant_liar: bool = True
    n_startup_trials: int = Field(10, ge=0)


class SearchSpec(_Strict):
    algorithm: Literal["optuna"] = "optuna"
    num_samples: int = Field(ge=1)
    space: dict[str, Any]
    points_to_evaluate: list[dict[str, Any]] = []
    sampler: SamplerSpec = SamplerSpec()


class SchedulerSpec(_Strict):
    type: Literal["asha", "none"] = "asha"
    metric: str = "val_auc"
    mode: Optional[Literal["max", "min"]] = Field(None, description="Default: max for val_auc etc., min for losses/ece/brier.")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3, gt=1)
    max_t: Optional[int] = Field(None, ge=1, description="Default: the largest `epochs` any trial can have.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        known = _reported_metrics()
        if v not in known:
            raise ValueError(f"unknown metric {v!r}{_did_you_mean(v, list(known))}; trials report {', '.join(known)}")
        return v


def _reported_metrics() -> dict[str, bool]:
    """What a trial reports after every epoch → whether higher is better."""
    from skinsweep.metrics import HIGHER_IS_BETTER

    return {f"val_{k}": hib for k, hib in HIGHER_IS_BETTER.items()} | {"train_loss": False}


class GpuShare(_Strict):
    """GPUs per trial by mode; a plain number in YAML means the same share for both modes."""

    finetune: float = Field(ge=0)
    linear_probe: float = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _number_means_both(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {"finetune": v, "linear_probe": v}
        if not isinstance(v, dict):
            raise ValueError(f"expected a number of GPUs or {{finetune: x, linear_probe: y}}, got {v!r}")
        return v


class ResourcesSpec(_Strict):
    """Per-trial Ray resources. Calling it gives one trial's: ``recipe.resources(params)``."""

    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: GpuShare = GpuShare(finetune=0, linear_probe=0)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    _default_mode: str = PrivateAttr("finetune")  # the recipe's trial.mode, set at validation

    def __call__(self, params: dict[str, Any] | None = None) -> dict[str, float]:
        """``{"cpu": …, "gpu": …}`` for one trial; the GPU share follows its ``mode``. ``params`` may use
        TrialConfig or Optuna names (Ray's ``with_resources`` callable gets the flat Optuna config)."""
        mode = self._default_mode
        for key, value in (params or {}).items():
            if key.split(SEP, 1)[0] == "mode":
                mode = value
        gpu = self.gpus_per_trial.linear_probe if mode == "linear_probe" else self.gpus_per_trial.finetune
        return {"cpu": float(self.cpus_per_trial), "gpu": float(gpu)}


class SweepRecipe(_Strict):
    """A validated sweep recipe; build it with :func:`load_recipe` (or ``SweepRecipe.model_validate``)."""

    name: str = Field(description="Slug naming the output folder <storage>/<name>.")
    storage: str = "results"
    seed: int = 0
    data: DataSpec
    split: SplitSpec = SplitSpec()
    trial: dict[str, Any] = {}
    trials: list[dict[str, Any]] = []
    search: Optional[SearchSpec] = None
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()  # also callable: recipe.resources(params) -> {cpu, gpu}
    retries: int = Field(1, ge=0, description="Times a crashed trial is retried before it is recorded as failed.")
    _space: tuple = PrivateAttr(())  # the parsed search space (tuple of _Param), in YAML order

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError(f"{v!r} must be letters, digits, - and _ only (it names the output folder "
                             f"<storage>/<name>); e.g. {re.sub(r'[^A-Za-z0-9_-]+', '-', v).strip('-') or 'my-sweep'!r}")
        return v

    @model_validator(mode="after")
    def _semantics(self) -> "SweepRecipe":
        _check_recipe(self)
        return self

    # ---- what the sweep uses ------------------------------------------------------------------
    @property
    def hash(self) -> str:
        """sha256[:16] of :meth:`resolved` as JSON with sorted keys."""
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in (JSON-safe): what to write next to the outputs."""
        return self.model_dump(mode="json")

    @property
    def out_dir(self) -> str:
        """``<storage>/<name>``: a local path or a URI (``s3://…``), as a string."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def num_samples(self) -> int:
        """Trials the sweep runs: ``search.num_samples`` (points included) or ``len(trials)``."""
        return self.search.num_samples if self.search else len(self.trials)

    def explicit_points(self) -> list[dict[str, Any]]:
        """``trials:`` entries as TrialConfig-named param dicts (``backbone_args`` nested); [] for a search."""
        return [_nest(t) for t in self.trials]

    def define_by_run(self, trial: Any) -> None:
        """Suggest this recipe's space on an Optuna trial (or Ray's wrapper of one), in YAML order.

        Only ``trial.suggest_*`` is called, and conditions are evaluated on the values they return, so
        Ray Tune's ``OptunaSearch(space=recipe.define_by_run)`` captures every parameter.
        """
        values: dict[str, Any] = {}
        for p in _params(self):
            v = p.variant_for(values)
            if v is not None:
                values[p.name] = v.suggest(trial)

    def params_from_optuna(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Optuna-named params (``lr|mode=finetune``, ``backbone_args.input_size``) → TrialConfig names
        (``lr``, ``backbone_args: {input_size: …}``). Plain TrialConfig names pass through, so the
        ``explicit_points()`` configs of a ``trials:`` recipe work too."""
        out: dict[str, Any] = {}
        for key, value in flat.items():
            base = key.split(SEP, 1)[0]
            try:
                _check_param_name(base, f"params.{key}", allowed=SEARCH_FIELDS)
            except RecipeError as e:
                raise ConfigError(f"sweep {self.name}: {e}") from None
            if base in out:
                raise ConfigError(f"sweep {self.name}: params set {base} twice ({key}); pass one Optuna "
                                  "trial's params")
            out[base] = value
        return _nest(out)

    def optuna_points(self) -> list[dict[str, Any]]:
        """``search.points_to_evaluate`` in Optuna names, for ``study.enqueue_trial`` /
        ``OptunaSearch(points_to_evaluate=…)``. Validated at load."""
        if not self.search:
            return []
        return [_point_to_optuna(self, pt, f"search.points_to_evaluate[{i}]")
                for i, pt in enumerate(self.search.points_to_evaluate)]

    def trial_config(self, params: dict[str, Any] | None = None, *, split: str | None = None,
                     device: str | None = None) -> TrialConfig:
        """One trial's TrialConfig: defaults < data/split/seed < ``trial:`` < ``params``.

        Args:
            params: TrialConfig-named values (from :meth:`params_from_optuna` or :meth:`explicit_points`).
            split: path of the manifest the sweep made with :meth:`split_args` (``split.file`` wins).
                Needed unless the split is the default one (grouped 70/15/15), which a trial can make.
            device: where the trial runs; default ``cpu`` when :meth:`resources` gives the trial no GPU,
                else ``auto`` (the GPU Ray assigned).
        """
        split_path = self.split.file or split
        if split_path is None and (self.split.mode != "grouped" or tuple(self.split.fractions) != DEFAULT_FRACTIONS):
            raise ConfigError(f"sweep {self.name}: split.mode {self.split.mode} / fractions "
                              f"{list(self.split.fractions)} need a manifest; make it once with "
                              "skinsweep.data.split.get_or_create_split(index, **recipe.split_args()) "
                              "and pass trial_config(params, split=path)")
        params = _nest(params or {})
        for k in params:
            try:
                _check_param_name(k, f"params.{k}", allowed=SEARCH_FIELDS)
            except RecipeError as e:
                raise ConfigError(f"sweep {self.name}: {e}") from None
        values = _merge(_base_values(self, split_path), params)
        values["device"] = device or ("auto" if self.resources(params)["gpu"] > 0 else "cpu")
        try:
            return TrialConfig(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            msgs = "; ".join(f"[{'.'.join(map(str, err['loc']))}] {_msg(err)}" for err in e.errors())
            raise ConfigError(f"sweep {self.name}: invalid trial parameters {params}: {msgs}") from None

    def split_args(self) -> dict[str, Any]:
        """Keyword arguments of ``skinsweep.data.split.get_or_create_split`` for this recipe's manifest."""
        return {"split_path": self.split.file, "mode": self.split.mode, "seed": self.split.seed,
                "fractions": tuple(self.split.fractions)}

    def resources_for(self, params: dict[str, Any] | None = None) -> dict[str, float]:
        """``recipe.resources(params)`` keyed ``{"cpus", "gpus"}``, for result columns."""
        r = self.resources(params)
        return {"cpus": r["cpu"], "gpus": r["gpu"]}

    def sampler(self) -> "optuna.samplers.TPESampler":
        """A seeded ``optuna.samplers.TPESampler`` with ``search.sampler``'s settings."""
        import optuna

        s = self.search.sampler if self.search else SamplerSpec()
        with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna: a deliberate choice
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                multivariate=s.multivariate, group=s.group, constant_liar=s.constant_liar,
                n_startup_trials=s.n_startup_trials, seed=self.seed)


# --------------------------------------------------------------------------------------------------
# The space: parameters, variants and their Optuna names
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Variant:
    """One distribution of a parameter, used when every ``when`` entry matches."""

    param: str
    path: str                                   # dotted recipe path, e.g. search.space.lr[0]
    optuna_name: str
    kind: Literal["choice", "float", "int"]
    when: tuple[tuple[str, tuple], ...] = ()
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def matches(self, values: dict[str, Any]) -> bool:
        return all(k in values and any(_same(values[k], w) for w in ws) for k, ws in self.when)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.optuna_name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.optuna_name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.optuna_name, self.low, self.high, step=self.step, log=self.log)

    def coerce(self, value: Any) -> Any:
        """``value`` as this variant would suggest it; ValueError if it lies outside the distribution."""
        if self.kind == "choice":
            for c in self.choices:
                if _same(value, c):
                    return c
            raise ValueError(f"{value!r} is not one of the choices {list(self.choices)}")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if isinstance(value, bool) or not self.low <= x <= self.high:
            raise ValueError(f"{value!r} is outside [{_num(self.low)}, {_num(self.high)}]")
        if self.kind == "int" and x != int(x):
            raise ValueError(f"{value!r} is not an integer")
        if self.step and abs((x - self.low) / self.step - round((x - self.low) / self.step)) > 1e-9:
            raise ValueError(f"{value!r} is not on the grid {_num(self.low)} + k × {_num(self.step)}")
        return int(x) if self.kind == "int" else x

    def describe_when(self) -> str:
        return ", ".join(f"{k}={'|'.join(map(str, ws))}" for k, ws in self.when) or "always"


@dataclass(frozen=True)
class _Param:
    name: str
    variants: tuple[_Variant, ...]

    def variant_for(self, values: dict[str, Any]) -> _Variant | None:
        return next((v for v in self.variants if v.matches(values)), None)


def _params(recipe: SweepRecipe) -> tuple[_Param, ...]:
    """The parsed space (parsed once, at validation; pickled with the recipe for Ray)."""
    return recipe._space


def _parse_space(space: dict[str, Any], recipe: SweepRecipe) -> tuple[_Param, ...]:
    if not space:
        raise RecipeError("search.space", "is empty; add a parameter (e.g. lr: {float: [1.0e-5, 1.0e-3], "
                                          "log: true}) or list configurations under trials:")
    params: list[_Param] = []
    for name, spec in space.items():
        path = f"search.space.{name}"
        if spec is None:  # `--set search.space.<p>=null` drops a parameter
            continue
        _check_param_name(name, path, allowed=SEARCH_FIELDS)
        if name in recipe.trial or (name.partition(".")[0] in recipe.trial and name.partition(".")[2]
                                    in (recipe.trial.get(name.partition(".")[0]) or {})):
            raise RecipeError(path, f"{name} is both fixed under trial: and searched; remove one of them")
        if isinstance(spec, list):
            if not spec:
                raise RecipeError(path, "an empty list of variants; give at least one {when: ..., float: ...}")
            variants = [_parse_variant(name, s, f"{path}[{k}]", params, conditional=True) for k, s in enumerate(spec)]
        else:
            variants = [_parse_variant(name, spec, path, params, conditional=False)]
        seen: dict[str, str] = {}
        for v in variants:
            if v.optuna_name in seen:
                raise RecipeError(f"{v.path}.when", f"same condition as {seen[v.optuna_name]}; merge them")
            seen[v.optuna_name] = v.path
        params.append(_Param(name, tuple(variants)))
    return tuple(params)


def _parse_variant(name: str, spec: Any, path: str, earlier: list[_Param], *, conditional: bool) -> _Variant:
    if not isinstance(spec, dict):
        raise RecipeError(path, f"expected a mapping like {{choice: [a, b]}}, {{float: [lo, hi]}} or "
                                f"{{int: [lo, hi]}} (or a list of them with `when`), got {spec!r}")
    for key in spec:
        if key not in SPEC_KEYS:
            raise RecipeError(f"{path}.{key}", f"unknown key{_did_you_mean(str(key), SPEC_KEYS)}; a parameter "
                                               f"takes {', '.join(SPEC_KEYS)}")
    kinds = [k for k in ("choice", "float", "int") if k in spec]
    if len(kinds) != 1:
        raise RecipeError(path, f"give exactly one of choice, float, int (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    when = _parse_when(spec.get("when"), f"{path}.when", earlier)
    if conditional and len(when) == 0:
        cond = "default"  # a catch-all last variant
    else:
        cond = ",".join(f"{k}={'+'.join(map(str, ws))}" for k, ws in when)
    optuna_name = f"{name}{SEP}{cond}".replace("/", "%2F") if conditional else name  # Ray splits on "/"
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise RecipeError(f"{path}.log", f"must be true or false, got {log!r}")
    if kind == "choice":
        if "log" in spec or step is not None:
            raise RecipeError(f"{path}.{'log' if 'log' in spec else 'step'}", "only applies to float and int ranges")
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise RecipeError(f"{path}.choice", f"must be a non-empty list, got {choices!r}")
        for i, c in enumerate(choices):
            if c is not None and not isinstance(c, (str, int, float, bool)):
                hint = (f"; search dict fields key by key, e.g. {name}.input_size: {{choice: [32, 48]}}"
                        if name in DICT_FIELDS else "")
                raise RecipeError(f"{path}.choice[{i}]", f"{c!r} is not a plain value (text, number, "
                                                         f"true/false, null){hint}")
            if any(_same(c, d) for d in choices[:i]):
                raise RecipeError(f"{path}.choice[{i}]", f"{c!r} is listed twice; remove the repeat")
        return _Variant(name, path, optuna_name, "choice", when=when, choices=tuple(choices))
    bounds = spec[kind]
    where = f"{path}.{kind}"
    if (not isinstance(bounds, list) or len(bounds) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in bounds)):
        raise RecipeError(where, f"must be two numbers [low, high], got {bounds!r}")
    lo, hi = bounds
    if kind == "int" and any(float(b) != int(b) for b in bounds):
        raise RecipeError(where, f"int bounds must be whole numbers, got {bounds!r}; use float: for a real range")
    if not lo < hi:
        raise RecipeError(where, f"low {_num(lo)} must be below high {_num(hi)}"
                                 + ("; swap them" if lo > hi else "; use a choice of one value, or fix it under trial:"))
    if log and lo <= 0:
        raise RecipeError(where, f"log: true needs low > 0, got {_num(lo)}; raise low or drop log")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or step > hi - lo:
            raise RecipeError(f"{path}.step", f"must be a number in (0, high - low], got {step!r}")
        if log:
            raise RecipeError(f"{path}.step", "cannot be combined with log: true (Optuna samples one or the other)")
        if kind == "int" and float(step) != int(step):
            raise RecipeError(f"{path}.step", f"must be a whole number for int:, got {step!r}")
    return _Variant(name, path, optuna_name, kind, when=when, low=float(lo), high=float(hi), log=log,
                    step=None if step is None else float(step))


def _parse_when(when: Any, path: str, earlier: list[_Param]) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise RecipeError(path, f"must map earlier parameters to a value or list of values, e.g. "
                                f"{{mode: finetune}}; got {when!r}")
    by_name = {p.name: p for p in earlier}
    out = []
    for key, want in when.items():
        if key not in by_name:
            hint = (" (it is sampled later: move it above this parameter)" if key in SEARCH_FIELDS
                    else _did_you_mean(str(key), list(by_name)))
            raise RecipeError(f"{path}.{key}", f"not an earlier search.space parameter{hint}; `when` may only "
                                               f"refer to parameters listed above it ({', '.join(by_name) or 'none'})")
        ref = by_name[key]
        if any(v.kind != "choice" for v in ref.variants):
            raise RecipeError(f"{path}.{key}", f"{key} is a numeric range; `when` can only test choice parameters")
        wants = want if isinstance(want, list) else [want]
        possible = [c for v in ref.variants for c in v.choices]
        for w in wants:
            if not any(_same(w, c) for c in possible):
                raise RecipeError(f"{path}.{key}", f"{w!r} is never sampled: {key} takes "
                                                   f"{short_list(dict.fromkeys(map(str, possible)), 10)}")
        out.append((key, tuple(wants)))
    return tuple(out)


def _check_space(recipe: SweepRecipe, params: tuple[_Param, ...]) -> None:
    """Every value and bound fits TrialConfig; every parameter and variant can actually apply."""
    base = _base_values(recipe, None)
    for p in params:
        for v in p.variants:
            if v.kind != "choice":
                _check_range_type(p.name, v)
            samples = (list(enumerate(v.choices)) if v.kind == "choice"
                       else [(None, _as_kind(v, v.low)), (None, _as_kind(v, v.high))])
            for i, value in samples:
                where = f"{v.path}.choice[{i}]" if i is not None else f"{v.path}.{v.kind}"
                _validate(_merge(base, _nest({p.name: value})), {p.name.partition(".")[0]: where})
    # enumerate the categorical combinations: which variants are ever used?
    contexts: list[dict[str, Any]] = [{}]
    used: set[str] = set()
    for p in params:
        grown = []
        for ctx in contexts:
            v = p.variant_for(ctx)
            if v is None:
                grown.append(ctx)
                continue
            used.add(v.path)
            for value in (v.choices if v.kind == "choice" else (_as_kind(v, v.low),)):
                grown.append({**ctx, p.name: value})
        contexts = grown
        if len(contexts) > _MAX_CONTEXTS:
            return  # too many combinations to enumerate; the per-value checks above still ran
    for p in params:
        unused = [v for v in p.variants if v.path not in used]
        if len(unused) == len(p.variants):
            raise RecipeError(f"search.space.{p.name}", "never applies: no variant's `when` matches any "
                                                        "combination of the parameters above it; fix the conditions")
        if unused:
            raise RecipeError(f"{unused[0].path}.when", f"never used ({unused[0].describe_when()}): earlier "
                                                        "variants always match first; reorder or remove it")
    for ctx in contexts:  # whole combinations, in case TrialConfig checks fields against each other
        _validate(_merge(base, _nest(ctx)), {}, where=f"search.space (combination {ctx})")


def _check_range_type(name: str, v: _Variant) -> None:
    if name.partition(".")[0] in DICT_FIELDS:
        return
    ann = _unwrap(TrialConfig.model_fields[name].annotation)
    if ann not in (int, float):
        raise RecipeError(f"{v.path}.{v.kind}", f"{name} is not a number; use choice: [...]")
    if ann is int and v.kind == "float":
        raise RecipeError(f"{v.path}.float", f"{name} is an integer; use int: [{_num(v.low)}, {_num(v.high)}]")


def _point_to_optuna(recipe: SweepRecipe, point: dict[str, Any], path: str) -> dict[str, Any]:
    """A TrialConfig-named point → Optuna names; it must set exactly the parameters that apply to it."""
    flat = _flatten_dicts(point)
    names = {p.name for p in _params(recipe)}
    for key in flat:
        if key not in names:
            _check_param_name(key, f"{path}.{key}", allowed=SEARCH_FIELDS)
            raise RecipeError(f"{path}.{key}", f"{key} is not in search.space; a point sets searched "
                                               f"parameters only ({', '.join(names)}); fixed values go under trial:")
    values: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for p in _params(recipe):
        v = p.variant_for(values)
        if v is None:
            if p.name in flat:
                raise RecipeError(f"{path}.{p.name}", f"does not apply to this point (only when "
                                                      f"{'; '.join(x.describe_when() for x in p.variants)}); remove it")
            continue
        if p.name not in flat:
            raise RecipeError(path, f"sets no {p.name}, which applies to it ({v.describe_when()}); add "
                                    f"{p.name}: <value> so the point is one exact configuration")
        try:
            values[p.name] = out[v.optuna_name] = v.coerce(flat[p.name])
        except ValueError as e:
            raise RecipeError(f"{path}.{p.name}", f"{e} (see {v.path})") from None
    _validate(_merge(_base_values(recipe, None), _nest(values)),
              {k.partition(".")[0]: f"{path}.{k.partition('.')[0]}" for k in values})
    return out


# --------------------------------------------------------------------------------------------------
# Whole-recipe checks
# --------------------------------------------------------------------------------------------------

def _check_recipe(r: SweepRecipe) -> None:
    if bool(r.trials) == bool(r.search):
        raise RecipeError("search" if r.search else "trials",
                          "give exactly one of trials: (a list of configurations) or search: (an Optuna search)"
                          + (", not both" if r.search else "; the recipe has neither"))
    for key in r.trial:
        _check_param_name(key, f"trial.{key}", allowed=FIXED_FIELDS)
    base = _base_values(r, None)
    sources = {k: f"trial.{k}" for k in r.trial} | {"data": "data.root", "positive": "data.positive",
                                                     "image_size": "data.image_size", "split": "split.file",
                                                     "resize_policy": "data.resize_policy"}
    _validate(base, sources)
    epochs = [base.get("epochs", TrialConfig.model_fields["epochs"].default)]
    hashes: dict[str, int] = {}
    for i, entry in enumerate(r.trials):
        for key in entry:
            _check_param_name(key, f"trials[{i}].{key}", allowed=SEARCH_FIELDS)
        cfg = _validate(_merge(base, _nest(entry)), sources | {k.partition(".")[0]: f"trials[{i}].{k}" for k in entry})
        if cfg.hash in hashes:
            raise RecipeError(f"trials[{i}]", f"is the same configuration as trials[{hashes[cfg.hash]}]; remove it")
        hashes[cfg.hash] = i
        epochs.append(cfg.epochs)
    if r.search:
        r._space = params = _parse_space(r.search.space, r)
        _check_space(r, params)
        for i, pt in enumerate(r.search.points_to_evaluate):
            _point_to_optuna(r, pt, f"search.points_to_evaluate[{i}]")
        n_points = len(r.search.points_to_evaluate)
        if r.search.num_samples < n_points:
            raise RecipeError("search.num_samples", f"{r.search.num_samples} is fewer than the "
                                                    f"{n_points} points_to_evaluate; raise it to at least {n_points}")
        for p in params:
            if p.name == "epochs":
                epochs += [int(v.high) if v.kind != "choice" else max(int(c) for c in v.choices) for v in p.variants]
    if r.search and r.search.sampler.group and not r.search.sampler.multivariate:
        raise RecipeError("search.sampler.group", "true needs multivariate: true (Optuna's TPE); set group: false "
                                                  "or multivariate: true")
    sch = r.scheduler
    best = "max" if _reported_metrics()[sch.metric] else "min"
    if sch.mode is not None and sch.mode != best:
        raise RecipeError("scheduler.mode", f"{sch.mode} would keep the worst trials: {sch.metric} is better when "
                                            f"{'higher' if best == 'max' else 'lower'}; use mode: {best}")
    # defaults that depend on the rest of the recipe, resolved so the written recipe shows them
    object.__setattr__(r, "scheduler", sch.model_copy(update={"mode": best, "max_t": sch.max_t or max(epochs)}))
    res = r.resources.model_copy()  # own copy: a default instance may be shared
    res._default_mode = base.get("mode", TrialConfig.model_fields["mode"].default)
    object.__setattr__(r, "resources", res)
    if r.scheduler.type == "asha" and r.scheduler.grace_period > r.scheduler.max_t:
        raise RecipeError("scheduler.grace_period", f"{r.scheduler.grace_period} is beyond max_t "
                                                    f"{r.scheduler.max_t} (the longest trial); lower it")


def _base_values(r: SweepRecipe, split_path: str | None) -> dict[str, Any]:
    """TrialConfig values every trial shares: the sweep-level ones, then ``trial:``."""
    d, s = r.data, r.split
    base = {"data": d.root, "positive": list(d.positive), "skip_bad": d.skip_bad, "image_size": d.image_size,
            "resize_policy": d.resize_policy, "split": split_path or s.file, "split_seed": s.seed, "seed": r.seed}
    return _merge(base, r.trial)


def _validate(values: dict[str, Any], sources: dict[str, str], where: str | None = None) -> TrialConfig:
    """TrialConfig(values) or a RecipeError at the recipe path the first bad field came from.

    Also checks the backbone name against the registry, so a typo fails at load, not in every trial.
    """
    try:
        cfg = TrialConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"][1:])
        path = where or (sources.get(field, f"trial.{field}") + rest)
        raise RecipeError(path, _msg(err) + (f" ({field})" if where else "")) from None
    from skinsweep.train.backbones import list_backbones

    names = list_backbones()
    if cfg.backbone not in names and cfg.backbone.partition(":")[0] not in ("timm", "open_clip"):  # any hub model
        raise RecipeError(where or sources.get("backbone", "trial.backbone"),
                          f"unknown backbone {cfg.backbone!r}{_did_you_mean(cfg.backbone, names)}; valid: "
                          f"{', '.join(names)}, or timm:<model> / open_clip:<model>@<tag>")
    return cfg


def _check_param_name(name: str, path: str, *, allowed: Sequence[str]) -> None:
    base, dot, sub = name.partition(".")
    if dot and base in DICT_FIELDS and base in allowed and sub:
        return
    if name in allowed:
        return
    if name in SWEEP_LEVEL or name in DATA_LEVEL:
        where = SWEEP_LEVEL.get(name) or DATA_LEVEL[name]
        raise RecipeError(path, f"{name} is set once for the whole sweep: use {where}")
    hint = _did_you_mean(name, allowed)
    raise RecipeError(path, f"{name!r} is not a TrialConfig field{hint}; valid: {short_list(allowed, 40)}")


# --------------------------------------------------------------------------------------------------
# Loading: YAML, --set overrides, error lines
# --------------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader + YAML 1.2 floats (``1e-4`` is a number, not text) + duplicate keys are errors."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                base_dir: str | os.PathLike | None = None) -> SweepRecipe:
    """Read, override and validate a sweep recipe.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (``--set``); the value is YAML (``50``, ``/x``,
            ``[0.8, 0.1, 0.1]``, ``{finetune: 1, linear_probe: 0}``); list items by index (``trials.0.lr``).
        base_dir: folder that relative local paths (``data.root``, ``split.file``, ``storage``,
            ``weights`` files) are resolved against; default the working directory. Resolving at load
            keeps them valid on Ray workers, which run in their own folders.

    Raises:
        ConfigError: one line, ``<file>: [<dotted.field>] <problem and fix>``.
    """
    src = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{src}: no such recipe file; see sweeps/ for examples") from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot read the recipe ({e.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{src}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a recipe is a mapping (name:, data:, trial:, search: ...), got "
                          f"{type(raw).__name__}")
    sets = [_apply_set(raw, item, src) for item in overrides]
    _resolve_paths(raw, Path(base_dir) if base_dir is not None else Path.cwd())
    return recipe_from_dict(raw, src, sets)


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe",
                     sets: Sequence[tuple[str, str]] = ()) -> SweepRecipe:
    """Validate an already-loaded recipe dict (paths are taken as given); errors as in :func:`load_recipe`."""
    try:
        return SweepRecipe.model_validate(raw)
    except RecipeError as e:
        raise ConfigError(f"{source}: [{e.path}] {e.msg}{_from_set(e.path, sets)}") from None
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            p = _loc_path(err["loc"])
            msgs.append(f"[{p or 'recipe'}] {_msg(err, err['loc'])}{_from_set(p, sets)}")
        raise ConfigError(f"{source}: {'; '.join(msgs)}") from None


def _apply_set(raw: dict, item: str, src: str) -> tuple[str, str]:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{src}: --set {item!r}: expected key.path=value, e.g. --set search.num_samples=50")
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: --set {item}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                          "quote it") from None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{src}: --set {item}: {'.'.join(parts[:depth]) or 'recipe'} is a list of "
                                  f"{len(node)}; index it with 0..{len(node) - 1}")
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node[idx] = {} if node[idx] is None else node[idx]
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{src}: --set {item}: {'.'.join(parts[:depth])} is {node!r}, not a mapping; "
                              f"set the whole value, e.g. --set '{'.'.join(parts[:depth])}={{{part}: ...}}'")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:  # missing or null: create the mapping
                node[part] = {}
            node = node[part]
    return key, item


def _resolve_paths(raw: dict, base: Path) -> None:
    def absolute(p: Any) -> Any:
        if not isinstance(p, str) or not p or "://" in p:
            return p
        return os.path.normpath(base / os.path.expanduser(p))

    if isinstance(raw.get("data"), dict) and "root" in raw["data"]:
        raw["data"]["root"] = absolute(raw["data"]["root"])
    if isinstance(raw.get("split"), dict) and raw["split"].get("file"):
        raw["split"]["file"] = absolute(raw["split"]["file"])
    raw["storage"] = absolute(raw.get("storage", SweepRecipe.model_fields["storage"].default))
    for t in [raw.get("trial")] + list(raw.get("trials") or []):
        if isinstance(t, dict) and isinstance(t.get("weights"), str) and t["weights"] not in ("hub", "none"):
            t["weights"] = absolute(t["weights"])


def _from_set(path: str, sets: Sequence[tuple[str, str]]) -> str:
    if not path:
        return ""
    tokens = _tokens(path)
    for key, item in sets:
        k = _tokens(key)
        if tokens[:len(k)] == k or k[:len(tokens)] == tokens:
            return f" (from --set {item})"
    return ""


def _tokens(path: str) -> list[str]:
    return [t for t in re.split(r"[.\[\]]", path) if t]


def _loc_path(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _msg(err: dict, loc: tuple = ()) -> str:
    """One pydantic error as a sentence with the value found and, for unknown keys, the valid ones."""
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        return f"unknown field{_did_you_mean(str(loc[-1]), valid)}; valid: {', '.join(valid)}" if valid else \
            "unknown field"
    if kind == "missing":
        return "required field is missing"
    value = err.get("input")
    return f"{msg}, got {value!r}" if not isinstance(value, (dict, list)) else msg


def _fields_at(loc: tuple) -> list[str]:
    model: Any = SweepRecipe
    for p in loc:
        if isinstance(p, int):
            continue
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        if p not in fields:
            return []
        model = _unwrap(fields[p].annotation)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return [(f.alias or n) for n, f in model.model_fields.items()]


def _unwrap(ann: Any) -> Any:
    """Optional[X] → X."""
    if get_origin(ann) is Union:
        args = [a for a in get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def _did_you_mean(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps true apart from 1 (YAML yes/no vs numbers)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _num(x: float) -> str:
    return f"{x:g}"


def _as_kind(v: _Variant, x: float) -> Any:
    return int(x) if v.kind == "int" else x


def _nest(params: dict[str, Any]) -> dict[str, Any]:
    """``{"backbone_args.input_size": 32}`` → ``{"backbone_args": {"input_size": 32}}`` (other keys as they are)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        base, dot, sub = key.partition(".")
        if dot and base in DICT_FIELDS:
            out.setdefault(base, {})
            out[base] = {**out[base], sub: value}
        elif key in DICT_FIELDS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _flatten_dicts(params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_nest` for dict fields."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in DICT_FIELDS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; dict fields (backbone_args) merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if key in DICT_FIELDS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


__all__ = ["SweepRecipe", "load_recipe", "recipe_from_dict", "RecipeError"]
