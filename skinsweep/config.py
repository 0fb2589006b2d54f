"""The one configuration layer: strict YAML, ``--set`` overrides and one-line errors.

Sweep recipes, ensemble recipes and ``skinsweep train`` are read by :func:`load_config` (or its two halves,
:func:`read_config` and :func:`validate_config`); every problem is one ConfigError line,
``FILE: [dotted.field] message``, ending in ``(from --set …)`` when an override caused it. Validators that
know the field a problem belongs to raise :class:`FieldError` with the path below their model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from skinsweep.errors import ConfigError, did_you_mean

M = TypeVar("M", bound=BaseModel)
Override = tuple[str, str]  # (dotted key, how the user wrote it: "--set a.b=1")


class FieldError(ValueError):
    """A validator's error at ``path`` (``"a.b[0]"``) below the model being validated."""

    def __init__(self, path: str, msg: str) -> None:
        super().__init__(msg)
        self.loc = tuple(int(t) if t.isdigit() else t for t in _tokens(path))


class Strict(BaseModel):
    """Base of every config model: frozen, and an unknown key is an error naming the valid ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = [f.alias or n for n, f in cls.model_fields.items() if not f.exclude]
            for key in data:
                if key not in valid:
                    raise FieldError(str(key), f"unknown field{did_you_mean(key, valid)}; valid: {', '.join(valid)}")
        return data


class YamlLoader(yaml.SafeLoader):
    """SafeLoader + YAML 1.2 floats (``1e-4`` is a number, not text) + duplicate keys are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, what: str = "recipe",
                examples: str | None = None) -> tuple[dict[str, Any], list[Override]]:
    """The YAML mapping in ``path`` with ``overrides`` (``--set`` items) applied, and those overrides."""
    src = str(path)
    try:
        raw = yaml.load(Path(path).read_text(), Loader=YamlLoader)
    except FileNotFoundError:
        raise ConfigError(f"{src}: no such {what} file" + (f"; see {examples} for examples" if examples else "")) from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot read the {what} ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{src}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {'an' if what[0] in 'aeiou' else 'a'} {what} is a mapping of fields, got "
                          f"{type(raw).__name__}")
    return raw, [apply_override(raw, item, src) for item in overrides]


def apply_override(raw: dict[str, Any], item: str, source: str, label: str | None = None) -> Override:
    """Apply ``key.path=value`` to ``raw`` in place (list items: ``trials[0].lr`` or ``trials.0.lr``; missing
    mappings are created; the value is YAML, empty is null); returns ``(key, label)`` for error lines."""
    label = label or f"--set {item}"
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not re.fullmatch(r"[^.\[\]\s]+(?:\.[^.\[\]\s]+|\[\d+\])*", key):
        raise ConfigError(f"{source}: --set {item!r}: expected key.path=value (key[i] for list item i)")
    try:
        value = yaml.load(text, Loader=YamlLoader) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {label}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                          "quote it") from None
    parts = _tokens(key)
    node: Any = raw
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source}: {label}: {here or 'the root'} is a list of {len(node)}; "
                                  f"index it with 0..{len(node) - 1}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{source}: {label}: {here} is {node!r}, not a mapping; set the whole value, "
                              f"e.g. --set '{here}={{{part}: ...}}'")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None or isinstance(node, list) and node[part] is None:
                node[part] = {}
            node = node[part]
    return key, label


def validate_config(model: type[M], raw: dict[str, Any], source: str, overrides: Sequence[Override] = ()) -> M:
    """``model.model_validate(raw)``, or a ConfigError: ``SOURCE: [dotted.field] message (from --set …)``."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(
            f"[{path or 'recipe'}] {msg}{_from_override(path, overrides)}" for path, msg in errors(e))) from None


def load_config(path: str | os.PathLike, model: type[M], overrides: Sequence[str] = (), *, what: str = "recipe",
                examples: str | None = None) -> M:
    """Read ``path`` (strict YAML), apply ``overrides`` and validate it as ``model``; errors are one line."""
    raw, sets = read_config(path, overrides, what=what, examples=examples)
    return validate_config(model, raw, str(path), sets)


def errors(e: ValidationError) -> list[tuple[str, str]]:
    """A ValidationError as ``(dotted.path, sentence)`` pairs: the value found, no pydantic prefixes."""
    out = []
    for err in e.errors():
        loc = err["loc"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            loc = loc + cause.loc
        out.append((dotted(loc), message(err)))
    return out


def message(err: dict) -> str:
    """One pydantic error as a sentence, with the value found when it is a scalar."""
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "missing":
        return "required field is missing"
    value = err.get("input")
    return msg if isinstance(value, (dict, list)) else f"{msg}, got {value!r}"


def dotted(loc: Sequence[Any]) -> str:
    """``("a", "b", 0, "c")`` → ``a.b[0].c``; union tags written ``<like-this>`` are left out."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not (p.startswith("<") and p.endswith(">")):
            out += ("." if out else "") + p
    return out


def _from_override(path: str, overrides: Sequence[Override]) -> str:
    tokens = _tokens(path)
    for key, label in reversed(overrides):  # the last override of a field is the one in effect
        k = _tokens(key)
        if path and (tokens[:len(k)] == k or k[:len(tokens)] == tokens):
            return f" (from {label})"
    return ""


def _tokens(path: str) -> list[str]:
    return [t for t in re.split(r"[.\[\]]", path) if t]

