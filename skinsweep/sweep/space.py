"""A sweep's search space (``search:`` of a recipe) as typed models, and its Optuna names.

A parameter is one distribution (``{choice: [...]}``, ``{float: [lo, hi]}``, ``{int: [lo, hi]}``, ranges
with ``log`` or ``step``) or a list of variants, the first whose ``when: {earlier_param: value(s)}``
matches being used; parameters are sampled define-by-run, in YAML order. The models reject what cannot
be sampled; each variant of a conditional parameter gets its own Optuna name (``lr|mode=finetune``), so
TPE never models two ranges as one. Whether the values make valid TrialConfigs is the recipe's check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional, Sequence, Union

from pydantic import (ConfigDict, Discriminator, Field, StrictBool, Tag, field_validator, model_serializer,
                      model_validator)

from skinsweep.config import FieldError, Strict
from skinsweep.errors import did_you_mean, short_list
from skinsweep.train.config import TrialConfig

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
SEP = "|"  # Optuna name of a conditional variant: "<param>|<condition>"
MAX_CONTEXTS = 4096  # categorical combinations enumerated to check that every variant can apply


def parse_duration(text: str) -> float:
    """``90s`` / ``60m`` / ``1.5h`` / ``2d`` / ``3600`` (seconds) → seconds; a ValueError says what is accepted."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 60m, 1.5h or a number of seconds")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def format_duration(seconds: float) -> str:
    """3725 → ``1h02m05s``; 65 → ``1m05s``; 9 → ``9s``."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def field_problem(name: str, allowed: Sequence[str]) -> str | None:
    """Why ``name`` cannot be set here (a TrialConfig field in ``allowed``, or ``<dict field>.<key>``), or None."""
    base, dot, sub = name.partition(".")
    if name in allowed or (dot and sub and base in DICT_FIELDS and base in allowed):
        return None
    if name in SWEEP_LEVEL or name in DATA_LEVEL:
        return f"{name} is set once for the whole sweep: use {SWEEP_LEVEL.get(name) or DATA_LEVEL[name]}"
    return f"{name!r} is not a TrialConfig field{did_you_mean(name, allowed)}; valid: {short_list(allowed, 40)}"


def same(a: Any, b: Any) -> bool:
    """Equality that keeps true apart from 1 (YAML yes/no vs numbers)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class Variant(Strict):
    """One distribution of a parameter, used when every ``when`` entry matches the values sampled above."""

    model_config = ConfigDict(serialize_by_alias=True)  # dumps as written: {float: [lo, hi], log: true}
    kind: ClassVar[str]
    when: Optional[dict[str, Any]] = Field(None, min_length=1, description="{earlier_param: value or [values]}, all matching.")

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> dict[str, Any]:
        """Only the keys the recipe wrote (the recipe hash covers the space as written)."""
        written = {key for n in self.model_fields_set for key in (n, type(self).model_fields[n].alias) if key}
        return {k: v for k, v in handler(self).items() if k in written}

    def conditions(self) -> list[tuple[str, list]]:
        return [(k, w if isinstance(w, list) else [w]) for k, w in (self.when or {}).items()]

    def matches(self, values: dict[str, Any]) -> bool:
        return all(k in values and any(same(values[k], w) for w in ws) for k, ws in self.conditions())

    def describe_when(self) -> str:
        return ", ".join(f"{k}={'|'.join(map(str, ws))}" for k, ws in self.conditions()) or "always"


class Choice(Variant):
    kind: ClassVar[str] = "choice"
    choice: list[Any] = Field(description="Plain values (text, numbers, true/false, null), each once.")

    @field_validator("choice", mode="before")
    @classmethod
    def _plain_values(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise ValueError(f"must be a non-empty list, got {v!r}")
        for i, c in enumerate(v):
            if c is not None and not isinstance(c, (str, int, float, bool)):
                hint = ("; search a dict field key by key, e.g. backbone_args.input_size: {choice: [32, 48]}"
                        if isinstance(c, dict) else "")
                raise FieldError(str(i), f"{c!r} is not a plain value (text, number, true/false, null){hint}")
            if any(same(c, d) for d in v[:i]):
                raise FieldError(str(i), f"{c!r} is listed twice; remove the repeat")
        return v

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choice))

    def coerce(self, value: Any) -> Any:
        """``value`` as this variant would suggest it; ValueError if it is not one of the choices."""
        for c in self.choice:
            if same(value, c):
                return c
        raise ValueError(f"{value!r} is not one of the choices {self.choice}")

    def samples(self) -> list[tuple[str, Any]]:
        """``(path below this variant, value)`` for every value it can suggest (ranges: their bounds)."""
        return [(f"choice[{i}]", c) for i, c in enumerate(self.choice)]

    def context_values(self) -> list[Any]:
        """The values that stand for it when enumerating which later variants can apply."""
        return list(self.choice)


Number = Union[int, float]


class Range(Variant):
    bounds: tuple[Number, Number]  # aliased `float` / `int` in the subclasses
    log: StrictBool = Field(False, description="Sample on a log scale (needs low > 0).")
    step: Optional[Number] = Field(None, description="Grid step from low (not with log).")

    @field_validator("bounds", mode="before")
    @classmethod
    def _two_numbers(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(map(_is_number, v)):
            raise ValueError(f"must be two numbers [low, high], got {v!r}")
        return v

    @field_validator("step", mode="before")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if v is not None and (not _is_number(v) or v <= 0):
            raise ValueError(f"must be a number in (0, high - low], got {v!r}")
        return v

    @model_validator(mode="after")
    def _sampleable(self) -> "Range":
        lo, hi = self.bounds
        if self.kind == "int" and any(float(b) != int(b) for b in self.bounds):
            raise FieldError(self.kind, f"int bounds must be whole numbers, got {list(self.bounds)!r}; "
                                        "use float: for a real range")
        if not lo < hi:
            raise FieldError(self.kind, f"low {lo:g} must be below high {hi:g}" + (
                "; swap them" if lo > hi else "; use a choice of one value, or fix it under trial:"))
        if self.log and lo <= 0:
            raise FieldError(self.kind, f"log: true needs low > 0, got {lo:g}; raise low or drop log")
        if self.step is not None:
            if self.step > hi - lo:
                raise FieldError("step", f"must be a number in (0, high - low], got {self.step!r}")
            if self.log:
                raise FieldError("step", "cannot be combined with log: true (Optuna samples one or the other)")
            if self.kind == "int" and float(self.step) != int(self.step):
                raise FieldError("step", f"must be a whole number for int:, got {self.step!r}")
        return self

    @property
    def low(self) -> float:
        return float(self.bounds[0])

    @property
    def high(self) -> float:
        return float(self.bounds[1])

    def _as_kind(self, x: float) -> Any:
        return int(x) if self.kind == "int" else x

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=None if self.step is None else float(self.step),
                                   log=self.log)

    def coerce(self, value: Any) -> Any:
        """``value`` as this variant would suggest it; ValueError if it lies outside the distribution."""
        if not _is_number(value):
            raise ValueError(f"{value!r} is not a number")
        x = float(value)
        if not self.low <= x <= self.high:
            raise ValueError(f"{value!r} is outside [{self.low:g}, {self.high:g}]")
        if self.kind == "int" and x != int(x):
            raise ValueError(f"{value!r} is not an integer")
        if self.step and abs((x - self.low) / self.step - round((x - self.low) / self.step)) > 1e-9:
            raise ValueError(f"{value!r} is not on the grid {self.low:g} + k × {self.step:g}")
        return self._as_kind(x)

    def samples(self) -> list[tuple[str, Any]]:
        return [(self.kind, self._as_kind(self.low)), (self.kind, self._as_kind(self.high))]

    def context_values(self) -> list[Any]:
        return [self._as_kind(self.low)]


class FloatRange(Range):
    kind: ClassVar[str] = "float"
    bounds: tuple[Number, Number] = Field(alias="float", description="[low, high]")


class IntRange(Range):
    kind: ClassVar[str] = "int"
    bounds: tuple[Number, Number] = Field(alias="int", description="[low, high], whole numbers")


def _kind_tag(v: Any) -> str | None:
    if isinstance(v, Variant):
        return f"<{v.kind}>"
    kinds = [k for k in ("choice", "float", "int") if isinstance(v, dict) and k in v]
    return f"<{kinds[0]}>" if len(kinds) == 1 else None


Distribution = Annotated[
    Union[Annotated[Choice, Tag("<choice>")], Annotated[FloatRange, Tag("<float>")],
          Annotated[IntRange, Tag("<int>")]],
    Discriminator(_kind_tag, custom_error_type="distribution",
                  custom_error_message="give exactly one of choice, float, int in a mapping, e.g. "
                                       "{float: [1.0e-5, 1.0e-3], log: true}, or a list of them with `when`")]
ParamSpec = Annotated[
    Union[Annotated[Distribution, Tag("<one>")],
          Annotated[list[Distribution], Field(min_length=1), Tag("<variants>")]],
    Discriminator(lambda v: "<variants>" if isinstance(v, list) else "<one>")]


@dataclass(frozen=True)
class Param:
    """One ``search.space`` entry: its name and variants (one, unless written as a list)."""

    name: str
    variants: tuple[Variant, ...]
    conditional: bool

    def path(self, k: int) -> str:
        """Where variant ``k`` is in the recipe: ``search.space.lr[1]``."""
        return f"search.space.{self.name}" + (f"[{k}]" if self.conditional else "")

    def optuna_name(self, k: int) -> str:
        if not self.conditional:
            return self.name
        cond = ",".join(f"{key}={'+'.join(map(str, ws))}" for key, ws in self.variants[k].conditions()) or "default"
        return f"{self.name}{SEP}{cond}".replace("/", "%2F")  # Ray splits config keys on "/"

    def variant_for(self, values: dict[str, Any]) -> int | None:
        """Index of the first variant whose ``when`` matches ``values``, or None."""
        return next((k for k, v in enumerate(self.variants) if v.matches(values)), None)


class SamplerSpec(Strict):
    multivariate: bool = True
    group: bool = True
    constant_liar: bool = True
    n_startup_trials: int = Field(10, ge=0)


class SearchSpec(Strict):
    algorithm: Literal["optuna"] = "optuna"
    num_samples: int = Field(ge=1, description="Trials the sweep runs, points_to_evaluate included.")
    space: dict[str, Optional[ParamSpec]] = Field(description="TrialConfig field → distribution; null drops it.")
    points_to_evaluate: list[dict[str, Any]] = []
    sampler: SamplerSpec = SamplerSpec()
    time_budget: Optional[float] = Field(
        None, gt=0, description="Wall-time budget in seconds (YAML also takes 90s, 60m, 8h): no trial starts once it "
                                "is spent and running trials stop at it (status out_of_budget). Whichever of "
                                "num_samples and the budget ends first ends the sweep.")
    warm_start: list[str] = Field([], description="Earlier sweeps' results folders whose completed and pruned trials "
                                                  "are told to Optuna before it samples (trials outside the space "
                                                  "are skipped).")
    study: Literal["memory", "journal"] = Field(
        "memory", description="memory, or journal: the Optuna study is also written to <results>/optuna.journal "
                              "(Optuna's JournalFileStorage) for optuna-dashboard.")

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return parse_duration(v) if isinstance(v, str) else v

    @field_validator("warm_start", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def params(self) -> tuple[Param, ...]:
        """The space in YAML order (parameters set to null by ``--set`` left out)."""
        return tuple(Param(name, tuple(spec) if isinstance(spec, list) else (spec,), isinstance(spec, list))
                     for name, spec in self.space.items() if spec is not None)

    def contexts(self) -> tuple[list[dict[str, Any]] | None, set[tuple[str, int]]]:
        """Every combination of categorical values the space can sample (None past MAX_CONTEXTS), and the
        ``(param, variant)`` pairs some combination uses."""
        contexts: list[dict[str, Any]] = [{}]
        used: set[tuple[str, int]] = set()
        for p in self.params():
            grown = []
            for ctx in contexts:
                k = p.variant_for(ctx)
                if k is None:
                    grown.append(ctx)
                    continue
                used.add((p.name, k))
                grown += [{**ctx, p.name: value} for value in p.variants[k].context_values()]
            contexts = grown
            if len(contexts) > MAX_CONTEXTS:
                return None, used
        return contexts, used

    @model_validator(mode="after")
    def _sampleable(self) -> "SearchSpec":
        params = self.params()
        if not params:
            raise FieldError("space", "is empty; add a parameter (e.g. lr: {float: [1.0e-5, 1.0e-3], log: true}) "
                                      "or list configurations under trials:")
        earlier: dict[str, Param] = {}
        for p in params:
            where = f"space.{p.name}"
            if problem := field_problem(p.name, SEARCH_FIELDS):
                raise FieldError(where, problem)
            seen: dict[str, int] = {}
            for k, v in enumerate(p.variants):
                _check_when(v, f"{where}[{k}]" if p.conditional else where, earlier)
                if p.optuna_name(k) in seen:
                    raise FieldError(f"{where}[{k}].when", f"same condition as {p.path(seen[p.optuna_name(k)])}; "
                                                          "merge them")
                seen[p.optuna_name(k)] = k
            earlier[p.name] = p
        contexts, used = self.contexts()
        for p in params if contexts is not None else ():
            unused = [k for k in range(len(p.variants)) if (p.name, k) not in used]
            if len(unused) == len(p.variants):
                raise FieldError(f"space.{p.name}", "never applies: no variant's `when` matches any combination "
                                                    "of the parameters above it; fix the conditions")
            if unused:
                raise FieldError(f"space.{p.name}[{unused[0]}].when",
                                 f"never used ({p.variants[unused[0]].describe_when()}): earlier variants always "
                                 "match first; reorder or remove it")
        if self.num_samples < len(self.points_to_evaluate):
            n = len(self.points_to_evaluate)
            raise FieldError("num_samples", f"{self.num_samples} is fewer than the {n} points_to_evaluate; raise it "
                                            f"to at least {n}")
        if self.sampler.group and not self.sampler.multivariate:
            raise FieldError("sampler.group", "true needs multivariate: true (Optuna's TPE); set group: false or "
                                              "multivariate: true")
        return self


def _check_when(v: Variant, where: str, earlier: dict[str, Param]) -> None:
    """``when`` may only test values a choice parameter listed above can take."""
    for key, wants in v.conditions():
        ref = earlier.get(key)
        if ref is None:
            hint = (" (it is sampled later: move it above this parameter)" if key in SEARCH_FIELDS
                    else did_you_mean(key, list(earlier)))
            raise FieldError(f"{where}.when.{key}", f"not an earlier search.space parameter{hint}; `when` may only "
                                                    f"refer to parameters listed above it ({', '.join(earlier) or 'none'})")
        if any(not isinstance(r, Choice) for r in ref.variants):
            raise FieldError(f"{where}.when.{key}", f"{key} is a numeric range; `when` can only test choice parameters")
        possible = [c for r in ref.variants for c in r.choice]
        for w in wants:
            if not any(same(w, c) for c in possible):
                raise FieldError(f"{where}.when.{key}", f"{w!r} is never sampled: {key} takes "
                                                        f"{short_list(dict.fromkeys(map(str, possible)), 10)}")

