"""Sweep recipes: strict YAML → :class:`SweepRecipe`, what every trial of a sweep will run.

A recipe (``sweeps/*.yaml``) names the data, the split, the settings every trial shares (``trial:``)
and either a search (``search:``, see :mod:`skinsweep.sweep.space`) or fixed configurations
(``trials:``). It is read by :mod:`skinsweep.config` (``--set`` overrides meet the same schema) and
validated once, at load: ``trial:``, every ``trials:`` entry, every value the space can sample and every
point to evaluate must make a valid TrialConfig; defaults that depend on the rest of the recipe
(``scheduler.mode``, ``scheduler.max_t``) are filled in, so :meth:`SweepRecipe.resolved` shows them.
Every problem is one line: ``sweeps/x.yaml: [search.space.lr.float] low 0.001 must be below high 1e-05``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from skinsweep.config import FieldError, Strict, errors, read_config, validate_config
from skinsweep.errors import ConfigError, did_you_mean
from skinsweep.sweep.space import (DATA_LEVEL, DICT_FIELDS, FIXED_FIELDS, SEARCH_FIELDS, SEP, SWEEP_LEVEL, Param,
                                   SamplerSpec, SearchSpec, Range, field_problem)
from skinsweep.train.config import TrialConfig, parse_config

if TYPE_CHECKING:
    import optuna

DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)


# ---- Schema ---------------------------------------------------------------------------------------

class DataSpec(Strict):
    root: str = Field(description="Dataset folder or CSV; relative paths are resolved against the working directory.")
    positive: list[str] = Field(["MEL"], min_length=1)
    skip_bad: bool = False
    image_size: Optional[int] = Field(None, ge=8, description="Cached image side; default the backbone's input size.")
    resize_policy: Literal["squash", "center-crop"] = "squash"


class SplitSpec(Strict):
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


def _reported_metrics() -> dict[str, bool]:
    """What a trial reports after every epoch → whether higher is better."""
    from skinsweep.metrics import HIGHER_IS_BETTER

    return {f"val_{k}": hib for k, hib in HIGHER_IS_BETTER.items()} | {"train_loss": False}


class SchedulerSpec(Strict):
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
            raise ValueError(f"unknown metric {v!r}{did_you_mean(v, list(known))}; trials report {', '.join(known)}")
        return v


class GpuShare(Strict):
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


class ResourcesSpec(Strict):
    """Per-trial Ray resources. Calling it gives one trial's: ``recipe.resources(params)``."""

    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: GpuShare = GpuShare(finetune=0, linear_probe=0)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    default_mode: Literal["finetune", "linear_probe"] = Field(
        "finetune", exclude=True, description="The recipe's trial.mode, filled in by SweepRecipe (not a YAML key).")

    def __call__(self, params: dict[str, Any] | None = None) -> dict[str, float]:
        """``{"cpu": …, "gpu": …}`` for one trial; the GPU share follows its ``mode``. ``params`` may use
        TrialConfig or Optuna names (Ray's ``with_resources`` callable gets the flat Optuna config)."""
        mode = self.default_mode
        for key, value in (params or {}).items():
            if key.split(SEP, 1)[0] == "mode":
                mode = value
        gpu = self.gpus_per_trial.linear_probe if mode == "linear_probe" else self.gpus_per_trial.finetune
        return {"cpu": float(self.cpus_per_trial), "gpu": float(gpu)}


class SweepRecipe(Strict):
    """A validated sweep recipe; build it with :func:`load_recipe` (or ``SweepRecipe.model_validate``)."""

    name: str = Field(description="Slug naming the output folder <storage>/<name>.")
    storage: str = "results"
    seed: int = 0
    data: DataSpec
    split: SplitSpec = SplitSpec()
    trial: dict[str, Any] = Field({}, description="TrialConfig fields every trial shares.")
    trials: list[dict[str, Any]] = Field([], description="Fixed configurations: TrialConfig fields on top of trial:.")
    search: Optional[SearchSpec] = None
    scheduler: SchedulerSpec = Field(SchedulerSpec(), validate_default=True)
    resources: ResourcesSpec = Field(ResourcesSpec(), validate_default=True)  # callable: recipe.resources(params)
    retries: int = Field(1, ge=0, description="Times a crashed trial is retried before it is recorded as failed.")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError(f"{v!r} must be letters, digits, - and _ only (it names the output folder "
                             f"<storage>/<name>); e.g. {re.sub(r'[^A-Za-z0-9_-]+', '-', v).strip('-') or 'my-sweep'!r}")
        return v

    # Defaults that depend on the fields above, filled in so the written recipe shows them.
    @field_validator("scheduler")
    @classmethod
    def _resolve_scheduler(cls, sch: SchedulerSpec, info: ValidationInfo) -> SchedulerSpec:
        best = "max" if _reported_metrics()[sch.metric] else "min"
        if sch.mode not in (None, best):
            raise FieldError("mode", f"{sch.mode} would keep the worst trials: {sch.metric} is better when "
                                     f"{'higher' if best == 'max' else 'lower'}; use mode: {best}")
        max_t = sch.max_t or _longest(info.data)
        if sch.type == "asha" and sch.grace_period > max_t:
            raise FieldError("grace_period", f"{sch.grace_period} is beyond max_t {max_t} (the longest trial); lower it")
        return sch.model_copy(update={"mode": best, "max_t": max_t})

    @field_validator("resources")
    @classmethod
    def _resolve_default_mode(cls, res: ResourcesSpec, info: ValidationInfo) -> ResourcesSpec:
        mode = (info.data.get("trial") or {}).get("mode", TrialConfig.model_fields["mode"].default)
        return res.model_copy(update={"default_mode": mode})

    @model_validator(mode="after")
    def _every_trial_is_valid(self) -> "SweepRecipe":
        if bool(self.trials) == bool(self.search):
            raise FieldError("search" if self.search else "trials",
                             "give exactly one of trials: (a list of configurations) or search: (an Optuna search)"
                             + (", not both" if self.search else "; the recipe has neither"))
        for key in self.trial:
            if problem := field_problem(key, FIXED_FIELDS):
                raise FieldError(f"trial.{key}", problem)
        base = self._base_values(None)
        sources = {k: f"trial.{k}" for k in self.trial} | SWEEP_LEVEL | DATA_LEVEL
        _validate(base, sources)
        hashes: dict[str, int] = {}
        for i, entry in enumerate(self.trials):
            for key in entry:
                if problem := field_problem(key, SEARCH_FIELDS):
                    raise FieldError(f"trials[{i}].{key}", problem)
            cfg = _validate(_merge(base, entry), sources | {k.partition(".")[0]: f"trials[{i}].{k}" for k in entry})
            if cfg.hash in hashes:
                raise FieldError(f"trials[{i}]", f"is the same configuration as trials[{hashes[cfg.hash]}]; remove it")
            hashes[cfg.hash] = i
        if self.search:
            self._check_space(base)
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
        return [_merge(t) for t in self.trials]

    def define_by_run(self, trial: Any) -> None:
        """Suggest this recipe's space on an Optuna trial (or Ray's wrapper of one), in YAML order.

        Only ``trial.suggest_*`` is called, and conditions are evaluated on the values they return, so
        Ray Tune's ``OptunaSearch(space=recipe.define_by_run)`` captures every parameter.
        """
        values: dict[str, Any] = {}
        for p in self._params():
            k = p.variant_for(values)
            if k is not None:
                values[p.name] = p.variants[k].suggest(trial, p.optuna_name(k))

    def params_from_optuna(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Optuna-named params (``lr|mode=finetune``, ``backbone_args.input_size``) → TrialConfig names
        (``lr``, ``backbone_args: {input_size: …}``). Plain TrialConfig names pass through, so the
        ``explicit_points()`` configs of a ``trials:`` recipe work too."""
        out: dict[str, Any] = {}
        for key, value in flat.items():
            base = key.split(SEP, 1)[0]
            self._check_params([base])
            if base in out:
                raise ConfigError(f"sweep {self.name}: params set {base} twice ({key}); pass one Optuna "
                                  "trial's params")
            out[base] = value
        return _merge(out)

    def optuna_points(self) -> list[dict[str, Any]]:
        """``search.points_to_evaluate`` in Optuna names, for ``study.enqueue_trial`` /
        ``OptunaSearch(points_to_evaluate=…)``. Validated at load."""
        if not self.search:
            return []
        return [self._point_to_optuna(pt, f"search.points_to_evaluate[{i}]")
                for i, pt in enumerate(self.search.points_to_evaluate)]

    def trial_config(self, params: dict[str, Any] | None = None, *, split: str | None = None,
                     device: str | None = None) -> TrialConfig:
        """One trial's TrialConfig: defaults < data/split/seed < ``trial:`` < ``params`` (TrialConfig names, from
        :meth:`params_from_optuna` or :meth:`explicit_points`). ``split``: the manifest the sweep made with
        :meth:`split_args` (``split.file`` wins), needed unless the split is the default grouped 70/15/15, which
        a trial can make. ``device``: default ``cpu`` when the trial gets no GPU, else ``auto`` (Ray's GPU).
        """
        split_path = self.split.file or split
        if split_path is None and (self.split.mode != "grouped" or tuple(self.split.fractions) != DEFAULT_FRACTIONS):
            raise ConfigError(f"sweep {self.name}: split.mode {self.split.mode} / fractions "
                              f"{list(self.split.fractions)} need a manifest; make it once with "
                              "skinsweep.data.split.get_or_create_split(index, **recipe.split_args()) "
                              "and pass trial_config(params, split=path)")
        params = _merge(params or {})
        self._check_params(params)
        values = _merge(self._base_values(split_path), params)
        values["device"] = device or ("auto" if self.resources(params)["gpu"] > 0 else "cpu")
        return parse_config(values, f"sweep {self.name}: invalid trial parameters {params}")

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

    # ---- validation helpers -------------------------------------------------------------------
    def _params(self) -> tuple[Param, ...]:
        return self.search.params() if self.search else ()

    def _base_values(self, split_path: str | None) -> dict[str, Any]:
        """TrialConfig values every trial shares: the sweep-level ones, then ``trial:``."""
        d, s = self.data, self.split
        return _merge({"data": d.root, "positive": list(d.positive), "skip_bad": d.skip_bad, "image_size": d.image_size,
                       "resize_policy": d.resize_policy, "split": split_path or s.file, "split_seed": s.seed,
                       "seed": self.seed}, self.trial)

    def _check_params(self, names: Sequence[str]) -> None:
        for name in names:
            if problem := field_problem(name, SEARCH_FIELDS):
                raise ConfigError(f"sweep {self.name}: [params.{name}] {problem}")

    def _check_space(self, base: dict[str, Any]) -> None:
        """Every value and bound the space can sample makes a valid TrialConfig with ``trial:``."""
        for p in self._params():
            field, _, key = p.name.partition(".")
            if p.name in self.trial or (key and key in (self.trial.get(field) or {})):
                raise FieldError(f"search.space.{p.name}", f"{p.name} is both fixed under trial: and searched; "
                                                           "remove one of them")
            for k, v in enumerate(p.variants):
                if isinstance(v, Range) and field not in DICT_FIELDS:
                    _check_range_type(p.name, v, f"{p.path(k)}.{v.kind}")
                for sub, value in v.samples():
                    _validate(_merge(base, {p.name: value}), {field: f"{p.path(k)}.{sub}"})
        contexts, _ = self.search.contexts()
        for ctx in contexts or ():  # whole combinations, in case TrialConfig checks fields against each other
            _validate(_merge(base, ctx), {}, combination=ctx)
        for i, pt in enumerate(self.search.points_to_evaluate):
            self._point_to_optuna(pt, f"search.points_to_evaluate[{i}]")

    def _point_to_optuna(self, point: dict[str, Any], path: str) -> dict[str, Any]:
        """A TrialConfig-named point → Optuna names; it must set exactly the parameters that apply to it."""
        flat = _flatten_dicts(point)
        params = self._params()
        names = [p.name for p in params]
        for key in flat:
            if key not in names:
                raise FieldError(f"{path}.{key}", field_problem(key, SEARCH_FIELDS) or (
                    f"{key} is not in search.space; a point sets searched parameters only ({', '.join(names)}); "
                    "fixed values go under trial:"))
        values: dict[str, Any] = {}
        out: dict[str, Any] = {}
        for p in params:
            k = p.variant_for(values)
            if k is None:
                if p.name in flat:
                    raise FieldError(f"{path}.{p.name}", "does not apply to this point (only when "
                                     f"{'; '.join(x.describe_when() for x in p.variants)}); remove it")
                continue
            v = p.variants[k]
            if p.name not in flat:
                raise FieldError(path, f"sets no {p.name}, which applies to it ({v.describe_when()}); add "
                                       f"{p.name}: <value> so the point is one exact configuration")
            try:
                values[p.name] = out[p.optuna_name(k)] = v.coerce(flat[p.name])
            except ValueError as e:
                raise FieldError(f"{path}.{p.name}", f"{e} (see {p.path(k)})") from None
        _validate(_merge(self._base_values(None), values),
                  {k.partition(".")[0]: f"{path}.{k.partition('.')[0]}" for k in values})
        return out


def _longest(fields: dict[str, Any]) -> int:
    """The largest ``epochs`` any trial can have, from a recipe's validated ``trial``/``trials``/``search``."""
    default = TrialConfig.model_fields["epochs"].default
    trial, search = fields.get("trial") or {}, fields.get("search")
    epochs = [trial.get("epochs", default)] + [t.get("epochs", trial.get("epochs", default))
                                               for t in fields.get("trials") or []]
    for p in search.params() if search else ():
        if p.name == "epochs":
            epochs += [v.high if isinstance(v, Range) else max(v.choice) for v in p.variants]
    whole = []
    for e in epochs:  # a value TrialConfig rejects is reported with its own path; here it is skipped
        try:
            whole.append(int(e))
        except (TypeError, ValueError):
            pass
    return max(whole, default=default)


# ---- Checks against TrialConfig -------------------------------------------------------------------

def _validate(values: dict[str, Any], sources: dict[str, str], combination: dict | None = None) -> TrialConfig:
    """TrialConfig(values), or a FieldError at the recipe path (``sources``: field → path) the first bad field
    came from. Also checks the backbone name against the registry, so a typo fails at load, not in every trial.
    """
    problem = None
    try:
        cfg = TrialConfig.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        path, problem = errors(e)[0]
    else:
        from skinsweep.train.backbones import list_backbones

        names, path = list_backbones(), "backbone"
        if cfg.backbone not in names and cfg.backbone.partition(":")[0] not in ("timm", "open_clip"):  # any hub model
            problem = (f"unknown backbone {cfg.backbone!r}{did_you_mean(cfg.backbone, names)}; valid: "
                       f"{', '.join(names)}, or timm:<model> / open_clip:<model>@<tag>")
    if problem is None:
        return cfg
    field = re.match(r"[^.\[]*", path).group()
    if combination is not None:
        raise FieldError("search.space", f"combination {combination}: {problem} ({field})")
    raise FieldError(sources.get(field, f"trial.{field}") + path[len(field):], problem)


def _check_range_type(name: str, v: Range, path: str) -> None:
    ann = TrialConfig.model_fields[name].annotation
    if ann not in (int, float):  # Optional[int] (image_size) counts as a number too
        ann = next((a for a in getattr(ann, "__args__", ()) if a in (int, float)), ann)
    if ann not in (int, float):
        raise FieldError(path, f"{name} is not a number; use choice: [...]")
    if ann is int and v.kind == "float":
        raise FieldError(path, f"{name} is an integer; use int: [{v.low:g}, {v.high:g}]")


# ---- Loading --------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                base_dir: str | os.PathLike | None = None) -> SweepRecipe:
    """Read, override and validate a sweep recipe.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (``--set``; see :func:`skinsweep.config.apply_override`).
        base_dir: folder that relative local paths (``data.root``, ``split.file``, ``storage``,
            ``weights`` files) are resolved against; default the working directory. Resolving at load
            keeps them valid on Ray workers, which run in their own folders.

    Raises:
        ConfigError: one line, ``<file>: [<dotted.field>] <problem and fix>``.
    """
    raw, sets = read_config(path, overrides, what="recipe", examples="sweeps/")
    _resolve_paths(raw, Path(base_dir) if base_dir is not None else Path.cwd())
    return validate_config(SweepRecipe, raw, str(path), sets)


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
    search = raw.get("search")
    if isinstance(search, dict) and search.get("warm_start"):
        ws = search["warm_start"]
        search["warm_start"] = absolute(ws) if isinstance(ws, str) else [absolute(w) for w in ws] if isinstance(ws, list) else ws
    for t in [raw.get("trial")] + list(raw.get("trials") or []):
        if isinstance(t, dict) and isinstance(t.get("weights"), str) and t["weights"] not in ("hub", "none"):
            t["weights"] = absolute(t["weights"])


# ---- TrialConfig values with a dict field (backbone_args), nested or flat -------------------------

def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Layers of TrialConfig values, later ones on top; ``backbone_args.input_size`` keys and
    ``backbone_args`` dicts merge key by key (``_merge(params)`` alone nests the flat keys)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            base, dot, sub = key.partition(".")
            if dot and base in DICT_FIELDS:
                key, value = base, {sub: value}
            if key in DICT_FIELDS and isinstance(value, dict) and isinstance(out.get(key), dict):
                value = {**out[key], **value}
            out[key] = value
    return out


def _flatten_dicts(params: dict[str, Any]) -> dict[str, Any]:
    """``{"backbone_args": {"input_size": 32}}`` → ``{"backbone_args.input_size": 32}`` (other keys as they are)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        out |= {f"{key}.{k}": v for k, v in value.items()} if key in DICT_FIELDS and isinstance(value, dict) else {key: value}
    return out


__all__ = ["SweepRecipe", "load_recipe"]
