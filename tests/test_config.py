"""The one config layer: strict YAML, --set overrides, and one error format for every kind of config."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from pydantic import model_validator

from skinsweep.config import FieldError, Strict, apply_override, load_config, read_config
from skinsweep.ensemble.recipe import load_ensemble_recipe
from skinsweep.errors import ConfigError
from skinsweep.sweep.recipe import load_recipe

SWEEP = {
    "name": "t", "data": {"root": "data"}, "trial": {"epochs": 3},
    "search": {"num_samples": 4,
               "space": {"mode": {"choice": ["finetune", "linear_probe"]},
                         "lr": [{"when": {"mode": "finetune"}, "float": [1e-5, 1e-3], "log": True},
                                {"when": {"mode": "linear_probe"}, "float": [1e-4, 1e-1], "log": True}]},
               "points_to_evaluate": [{"mode": "finetune", "lr": 1e-4}]},
}
ENSEMBLE = {"name": "e", "members": {"rule": "best_per_backbone", "modes": ["finetune"]}, "report": {"n_boot": 200}}


def write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def changed(base: dict, **changes) -> dict:
    """``base`` with ``a__b=value`` set (nested mappings created)."""
    body = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = body
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return body


# --------------------------------------------------------------------------------------------------
# One error format for sweep and ensemble recipes
# --------------------------------------------------------------------------------------------------

BAD = [  # (loader, recipe body, --set items, dotted field, message regex)
    ("sweep", changed(SWEEP, serch={}), [], "serch", r"unknown field \(did you mean search\?\); valid: name, .*"),
    ("ensemble", changed(ENSEMBLE, colour=1), [], "colour", r"unknown field; valid: name, members, .*"),
    ("sweep", changed(SWEEP, data__rooot="d"), [], "data.rooot", r"unknown field \(did you mean root\?\); valid: root, .*"),
    ("ensemble", changed(ENSEMBLE, members__rul="x"), [], "members.rul",
     r"unknown field \(did you mean rule\?\); valid: rule, .*"),
    ("sweep", changed(SWEEP, split__mode="lesion"), [], "split.mode",
     r"Input should be 'grouped', 'image' or 'official', got 'lesion'"),
    ("ensemble", changed(ENSEMBLE, calibration__method="beta"), [], "calibration.method",
     r"Input should be 'none', 'temperature', 'platt' or 'isotonic', got 'beta'"),
    ("sweep", SWEEP, ["search.num_samples=abc"], "search.num_samples",
     r"Input should be a valid integer.*, got 'abc' \(from --set search\.num_samples=abc\)"),
    ("ensemble", ENSEMBLE, ["report.n_boot=abc"], "report.n_boot",
     r"Input should be a valid integer.*, got 'abc' \(from --set report\.n_boot=abc\)"),
    ("sweep", SWEEP, ["search.points_to_evaluate[0].lr=1"], "search.points_to_evaluate[0].lr",
     r"1 is outside \[1e-05, 0\.001\] \(see search\.space\.lr\[0\]\) \(from --set search\.points_to_evaluate\[0\]\.lr=1\)"),
    ("ensemble", ENSEMBLE, ["members.modes[0]=probe"], "members.modes[0]",
     r"Input should be 'finetune' or 'linear_probe', got 'probe' \(from --set members\.modes\[0\]=probe\)"),
    ("sweep", changed(SWEEP, data={}), [], "data.root", r"required field is missing"),
    ("ensemble", {"members": {}}, [], "name", r"required field is missing"),
    ("sweep", changed(SWEEP, search__space__lr={"float": [1e-3, 1e-5]}), [], "search.space.lr.float",
     r"low 0\.001 must be below high 1e-05; swap them"),
    ("ensemble", changed(ENSEMBLE, members={"rule": "explicit"}), [], "members.trials", r"rule explicit needs .*"),
    ("ensemble", changed(ENSEMBLE, members={"rule": "top_k"}, combiner={"type": "mean_prob", "metadata": ["age"]}), [],
     "combiner.metadata", r"combiner\.metadata is only used by combiner\.type stacking or members\.rule greedy.*"),
]


@pytest.mark.parametrize("kind, body, sets, field, message", BAD,
                         ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_recipes_have_one_error_format(tmp_path, kind, body, sets, field, message):
    path = write(tmp_path, body)
    load = load_recipe if kind == "sweep" else load_ensemble_recipe
    with pytest.raises(ConfigError) as info:
        load(path, sets)
    assert re.fullmatch(rf"{re.escape(str(path))}: \[{re.escape(field)}\] {message}", str(info.value)), str(info.value)


@pytest.mark.parametrize("load", [load_recipe, load_ensemble_recipe])
@pytest.mark.parametrize("text, message", [
    ("name: a\nname: b\n", r"invalid YAML at line 2, column 1: duplicate key 'name'"),
    ("name: [unclosed", r"invalid YAML at line 1.*"),
    ("- a list\n", r"an? (ensemble )?recipe is a mapping of fields, got list"),
])
def test_unreadable_yaml_is_one_line_for_both(tmp_path, load, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}$"):
        load(path)


def test_set_with_list_indices_for_both_recipe_kinds(tmp_path):
    sweep = load_recipe(write(tmp_path, SWEEP), ["search.points_to_evaluate[0].lr=2e-4", "search.space.lr.0.float=[1e-5, 1e-2]"])
    assert sweep.optuna_points() == [{"mode": "finetune", "lr|mode=finetune": 2e-4}]
    assert sweep.search.params()[1].variants[0].high == 1e-2
    ens = load_ensemble_recipe(write(tmp_path, ENSEMBLE), ["members.modes[0]=linear_probe", "threshold.youden=true"])
    assert ens.members.modes == ["linear_probe"] and ens.threshold.kwargs() == {"youden": True}


# --------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------

def test_yaml_reads_exponents_as_numbers_and_rejects_duplicates(tmp_path):
    raw, sets = read_config(write(tmp_path, {"a": 1}), ["b=1e-4", "c=1.0e-3", "d=text"])
    assert raw == {"a": 1, "b": 1e-4, "c": 1e-3, "d": "text"} and isinstance(raw["b"], float)
    assert sets == [("b", "--set b=1e-4"), ("c", "--set c=1.0e-3"), ("d", "--set d=text")]
    (tmp_path / "dup.yaml").write_text("a:\n  b: 1\n  b: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML at line 3.*duplicate key 'b'"):
        read_config(tmp_path / "dup.yaml")


def test_apply_override_paths():
    raw = {"a": {"b": [{"c": 1}, {"c": 2}]}, "n": None}
    assert apply_override(raw, "a.b[1].c=5", "f") == ("a.b[1].c", "--set a.b[1].c=5")
    apply_override(raw, "a.b.0.c=[1, 2]", "f")  # the dotted index form still works
    apply_override(raw, "n.m.k=x", "f")         # null or missing mappings on the way are created
    apply_override(raw, "e=", "f")              # empty is null
    assert raw == {"a": {"b": [{"c": [1, 2]}, {"c": 5}]}, "n": {"m": {"k": "x"}}, "e": None}


@pytest.mark.parametrize("item, message", [
    ("a.b[2].c=1", r"f: --set a\.b\[2\]\.c=1: a\.b is a list of 2; index it with 0\.\.1"),
    ("a.b.x=1", r"f: --set a\.b\.x=1: a\.b is a list of 2; index it with 0\.\.1"),
    ("s.x=1", r"f: --set s\.x=1: s is 'text', not a mapping; set the whole value, e.g. --set 's=\{x: \.\.\.\}'"),
    ("a.b", r"f: --set 'a\.b': expected key\.path=value \(key\[i\] for list item i\)"),
    ("a..b=1", r"f: --set 'a\.\.b=1': expected key\.path=value \(key\[i\] for list item i\)"),
    ("s=[unclosed", r"f: --set s=\[unclosed: the value is not valid YAML .*; quote it"),
])
def test_apply_override_errors(item, message):
    with pytest.raises(ConfigError, match=rf"^{message}$"):
        apply_override({"a": {"b": [{}, {}]}, "s": "text"}, item, "f")


class Inner(Strict):
    size: int = 1


class Outer(Strict):
    name: str
    inner: list[Inner] = []

    @model_validator(mode="after")
    def _named(self) -> "Outer":
        if self.name == "bad":
            raise FieldError("inner[0].size", "a validator's error lands at the field it names")
        return self


def test_load_config_validates_any_strict_model(tmp_path):
    path = write(tmp_path, {"name": "x", "inner": [{"size": 2}]})
    assert load_config(path, Outer, ["inner[0].size=3"]).inner[0].size == 3
    with pytest.raises(ConfigError, match=r"x\.yaml: \[inner\[0\]\.sise\] unknown field \(did you mean size\?\); "
                                          r"valid: size \(from --set inner\[0\]\.sise=3\)$"):
        load_config(path, Outer, ["inner[0].sise=3"])
    with pytest.raises(ConfigError, match=r"x\.yaml: \[inner\[0\]\.size\] a validator's error lands at the field it "
                                          r"names$"):  # (an override elsewhere is not named)
        load_config(path, Outer, ["name=bad"])
    with pytest.raises(ConfigError, match=r"no such config file$"):
        load_config(tmp_path / "none.yaml", Outer, what="config")
    with pytest.raises(Exception):
        load_config(path, Outer).name = "y"  # frozen
