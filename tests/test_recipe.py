"""Sweep recipes: strict schema, --set overrides, and the Optuna define-by-run space."""

from __future__ import annotations

import copy
import math
import pickle
import re
from pathlib import Path

import optuna
import pytest
import yaml

from skinsweep.errors import ConfigError
from skinsweep.sweep.recipe import SweepRecipe, load_recipe
from skinsweep.train.loop import TrialConfig

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
SHIPPED = sorted(SWEEPS.glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = {
    "name": "t",
    "data": {"root": "data"},
    "trial": {"epochs": 3, "batch_size": 16},
    "search": {
        "num_samples": 5,
        "space": {
            "backbone": {"choice": ["tiny_resnet", "tiny_vit"]},
            "mode": {"choice": ["finetune", "linear_probe"]},
            "pos_weight": {"float": [1.0, 16.0], "log": True},
            "lr": [{"when": {"mode": "finetune"}, "float": [1e-5, 1e-3], "log": True},
                   {"when": {"mode": "linear_probe"}, "float": [1e-4, 1e-1], "log": True}],
            "backbone_lr_mult": {"when": {"mode": "finetune"}, "float": [0.01, 1.0], "log": True},
        },
        "points_to_evaluate": [
            {"backbone": "tiny_resnet", "mode": "finetune", "lr": 1e-4, "pos_weight": 8, "backbone_lr_mult": 1.0},
            {"backbone": "tiny_vit", "mode": "linear_probe", "lr": 1e-2, "pos_weight": 2},
        ],
    },
}


def write(tmp_path: Path, recipe: dict, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


DROP = object()


def edit(**changes):
    """A copy of BASE with changes at ``a__b`` paths (the value ``DROP`` deletes the key)."""
    r = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = r
        for p in parents:
            node = node.setdefault(p, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return r


@pytest.fixture
def base_recipe(tmp_path) -> SweepRecipe:
    return load_recipe(write(tmp_path, BASE))


# --------------------------------------------------------------------------------------------------
# Shipped recipes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.name == path.stem and r.num_samples >= 1
    assert r.out_dir.endswith(f"/{path.stem}")
    points = r.optuna_points() if r.search else r.explicit_points()
    assert points and all(isinstance(r.trial_config(r.params_from_optuna(p)), TrialConfig) for p in points)
    assert r.scheduler.max_t >= r.scheduler.grace_period


def test_shipped_set_is_complete():
    assert {p.stem for p in SHIPPED} >= {"paper", "search", "demo", "ham-cpu"}


def test_search_recipe_starts_from_the_study():
    r = load_recipe(SWEEPS / "search.yaml")
    cfgs = [r.trial_config(r.params_from_optuna(p)) for p in r.optuna_points()]
    assert [c.backbone for c in cfgs] == ["resnet18", "dino_vits16", "clip_vitb32"]
    for c in cfgs:
        assert (c.mode, c.lr, c.pos_weight, c.backbone_lr_mult, c.batch_size, c.epochs, c.optimizer) == (
            "finetune", 1e-4, 8.0, 1.0, 32, 20, "adam")
    assert r.resources({"mode": "finetune"}) == {"cpu": 2.0, "gpu": 0.5}
    assert r.resources({"mode": "linear_probe"}) == {"cpu": 2.0, "gpu": 0.1}
    assert r.scheduler.grace_period == 2 and r.scheduler.max_t == 20


def test_paper_recipe_runs_every_trial_to_the_end():
    r = load_recipe(SWEEPS / "paper.yaml")
    cfgs = [r.trial_config(p) for p in r.explicit_points()]
    assert [c.backbone for c in cfgs] == ["resnet18", "dino_vits16", "clip_vitb32"]
    assert {(c.lr, c.pos_weight, c.epochs, c.resize_policy) for c in cfgs} == {(1e-4, 8.0, 20, "squash")}
    assert r.search is None and r.scheduler.type == "none"


# --------------------------------------------------------------------------------------------------
# Loading and --set
# --------------------------------------------------------------------------------------------------

def test_set_overrides_apply(tmp_path):
    r = load_recipe(SWEEPS / "search.yaml", ["search.num_samples=7", "data.root=/x/ham",
                                             "resources.gpus_per_trial.finetune=0.25", "trial.epochs=3",
                                             "split.fractions=[0.8, 0.1, 0.1]"])
    assert r.num_samples == 7 and r.data.root == "/x/ham"
    assert r.resources({"mode": "finetune"})["gpu"] == 0.25 and r.resources({"mode": "linear_probe"})["gpu"] == 0.1
    assert r.trial["epochs"] == 3 and r.scheduler.max_t == 3  # max_t follows the trial's epochs
    assert r.split.fractions == (0.8, 0.1, 0.1)
    assert r.hash != load_recipe(SWEEPS / "search.yaml").hash


def test_relative_paths_resolve_against_base_dir(tmp_path):
    r = load_recipe(write(tmp_path, edit(storage="s3://bucket/sweeps")), ["data.root=imgs"], base_dir=tmp_path)
    assert r.data.root == str(tmp_path / "imgs")
    assert r.out_dir == "s3://bucket/sweeps/t"  # URIs are left alone
    assert load_recipe(write(tmp_path, BASE), base_dir=tmp_path).out_dir == f"{tmp_path}/results/t"


@pytest.mark.parametrize("item, match", [
    ("search.num_samples=abc", r"\[search\.num_samples\] .*valid integer.*\(from --set search\.num_samples=abc\)"),
    ("search.num_sample=5", r"\[search\.num_sample\] unknown field \(did you mean num_samples.*\).*from --set"),
    ("resources.gpus_per_trial.finetune=-1", r"\[resources\.gpus_per_trial\.finetune\] .*greater than or equal to 0"),
    ("trial.epoch=3", r"\[trial\.epoch\] 'epoch' is not a TrialConfig field \(did you mean epochs.*\).*from --set"),
    ("search.num_samples", r"--set 'search\.num_samples': expected key\.path=value"),
    ("name.x=1", r"--set name\.x=1: name is 't', not a mapping"),
    ("search.points_to_evaluate.5.lr=1", r"search\.points_to_evaluate is a list of 2; index it with 0\.\.1"),
])
def test_bad_set_names_the_item(tmp_path, item, match):
    with pytest.raises(ConfigError, match=r"x\.yaml: .*" + match):
        load_recipe(write(tmp_path, BASE), [item])


def test_set_nested_into_a_number_explains(tmp_path):
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_trial is 0, not a mapping; set the whole value"):
        load_recipe(SWEEPS / "demo.yaml", ["resources.gpus_per_trial.finetune=0.5"])
    r = load_recipe(SWEEPS / "demo.yaml", ["resources.gpus_per_trial={finetune: 0.5, linear_probe: 0}"])
    assert r.resources({"mode": "finetune"})["gpu"] == 0.5


@pytest.mark.parametrize("text, match", [
    (None, r"nope\.yaml: no such recipe file"),
    ("name: [unclosed", r"x\.yaml: invalid YAML at line 1"),
    ("- just\n- a list\n", r"x\.yaml: a recipe is a mapping"),
    ("name: a\nname: b\n", r"x\.yaml: invalid YAML at line 2.*duplicate key 'name'"),
])
def test_unreadable_files(tmp_path, text, match):
    path = tmp_path / ("nope.yaml" if text is None else "x.yaml")
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_recipe(path)


def test_yaml_exponents_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-4`` (no dot) as text; recipes read it as the number users mean."""
    path = tmp_path / "x.yaml"
    path.write_text(write(tmp_path, BASE).read_text().replace("epochs: 3", "epochs: 3\n  weight_decay: 1e-4"))
    r = load_recipe(path, ["search.points_to_evaluate.0.lr=2e-4"])
    assert r.trial["weight_decay"] == 1e-4 and isinstance(r.trial["weight_decay"], float)
    assert r.optuna_points()[0]["lr|mode=finetune"] == 2e-4


# --------------------------------------------------------------------------------------------------
# Invalid recipes: every error names the file and the dotted field
# --------------------------------------------------------------------------------------------------

BAD = [
    ("unknown top-level key", edit(serch={}), r"\[serch\] unknown field \(did you mean search.*\)"),
    ("unknown nested key", edit(data={"root": "d", "rooot": 1}), r"\[data\.rooot\] unknown field \(did you mean root.*\)"),
    ("missing required", edit(data={}), r"\[data\.root\] required field is missing"),
    ("bad name", edit(name="my sweep"), r"\[name\] 'my sweep' must be letters, digits, - and _ only.*'my-sweep'"),
    ("bad value type", edit(seed="zero"), r"\[seed\] Input should be a valid integer.*got 'zero'"),
    ("bad literal", edit(split={"mode": "lesion"}), r"\[split\.mode\] Input should be 'grouped', 'image' or 'official'"),
    ("bad fractions", edit(split={"fractions": [0.5, 0.2, 0.2]}), r"\[split\.fractions\] .*summing to 1"),
    ("both trials and search", edit(trials=[{"backbone": "tiny_vit"}]), r"\[search\] give exactly one of.*not both"),
    ("neither trials nor search", edit(search=DROP), r"\[trials\] give exactly one of.*neither"),
    ("trial key not a field", edit(trial={"learning_rate": 1e-3}),
     r"\[trial\.learning_rate\] 'learning_rate' is not a TrialConfig field"),
    ("trial key is sweep-level", edit(trial={"seed": 3}), r"\[trial\.seed\] seed is set once for the whole sweep: use the top-level seed"),
    ("trial key is data-level", edit(trial={"image_size": 64}), r"\[trial\.image_size\] .*use data\.image_size"),
    ("unknown backbone in trial", edit(search=DROP, trial={"backbone": "resnet-18"}, trials=[{"lr": 1e-3}]),
     r"\[trial\.backbone\] unknown backbone 'resnet-18' \(did you mean resnet18"),
    ("unknown backbone in a choice", edit(search__space={"backbone": {"choice": ["tiny_vit", "tiny_vti"]}},
                                          search__points_to_evaluate=[]),
     r"\[search\.space\.backbone\.choice\[1\]\] unknown backbone 'tiny_vti' \(did you mean tiny_vit"),
    ("trial value invalid", edit(trial={"lr": -1}), r"\[trial\.lr\] Input should be greater than 0"),
    ("trial value wrong type", edit(trial={"epochs": "many"}), r"\[trial\.epochs\] Input should be a valid integer"),
    ("trials entry bad", edit(search=DROP, trials=[{"backbone": "tiny_vit"}, {"mode": "probe"}]),
     r"\[trials\[1\]\.mode\] Input should be 'finetune' or 'linear_probe'"),
    ("trials entry repeated", edit(search=DROP, trials=[{"lr": 1e-3}, {"lr": 0.001}]),
     r"\[trials\[1\]\] is the same configuration as trials\[0\]"),
    ("unknown space param", edit(search__space={"pos_wieght": {"float": [1, 2]}}),
     r"\[search\.space\.pos_wieght\] 'pos_wieght' is not a TrialConfig field \(did you mean pos_weight.*\)"),
    ("space param sweep-level", edit(search__space={"seed": {"int": [0, 3]}}), r"\[search\.space\.seed\] seed is set once"),
    ("lo >= hi", edit(search__space={"lr": {"float": [1e-3, 1e-5]}}),
     r"\[search\.space\.lr\.float\] low 0\.001 must be below high 1e-05; swap them"),
    ("lo == hi", edit(search__space={"warmup_epochs": {"int": [3, 3]}}),
     r"\[search\.space\.warmup_epochs\.int\] low 3 must be below high 3"),
    ("log with lo <= 0", edit(search__space={"weight_decay": {"float": [0.0, 0.1], "log": True}}),
     r"\[search\.space\.weight_decay\.float\] log: true needs low > 0"),
    ("log and step", edit(search__space={"lr": {"float": [0.1, 0.5], "log": True, "step": 0.1}}),
     r"\[search\.space\.lr\.step\] cannot be combined with log"),
    ("two kinds", edit(search__space={"lr": {"float": [0.1, 0.5], "choice": [0.1]}}),
     r"\[search\.space\.lr\] give exactly one of choice, float, int"),
    ("unknown spec key", edit(search__space={"lr": {"float": [0.1, 0.5], "logg": True}}),
     r"\[search\.space\.lr\.logg\] unknown field \(did you mean log\?\); valid: when, float, log, step$"),
    ("float on an int field", edit(search__space={"head_hidden": {"float": [8, 64]}}),
     r"\[search\.space\.head_hidden\.float\] head_hidden is an integer; use int: \[8, 64\]"),
    ("range on a text field", edit(search__space={"optimizer": {"int": [0, 1]}}),
     r"\[search\.space\.optimizer\.int\] optimizer is not a number; use choice"),
    ("choice of wrong type", edit(search__space={"mode": {"choice": ["finetune", "probe"]}}),
     r"\[search\.space\.mode\.choice\[1\]\] Input should be 'finetune' or 'linear_probe'"),
    ("choice bound violates field", edit(search__space={"dropout": {"float": [0.0, 1.0]}}),
     r"\[search\.space\.dropout\.float\] Input should be less than 1"),
    ("choice of a dict", edit(search__space={"backbone_args": {"choice": [{"input_size": 32}]}}),
     r"\[search\.space\.backbone_args\.choice\[0\]\] .*not a plain value.*backbone_args\.input_size"),
    ("when on a later param", edit(search__space={
        "lr": {"when": {"mode": "finetune"}, "float": [1e-4, 1e-2]}, "mode": {"choice": ["finetune", "linear_probe"]}}),
     r"\[search\.space\.lr\.when\.mode\] not an earlier search\.space parameter \(it is sampled later"),
    ("when on an unknown param", edit(search__space={
        "mode": {"choice": ["finetune"]}, "lr": {"when": {"mdoe": "finetune"}, "float": [1e-4, 1e-2]}}),
     r"\[search\.space\.lr\.when\.mdoe\] not an earlier search\.space parameter \(did you mean mode.*\)"),
    ("when value never sampled", edit(search__space={
        "mode": {"choice": ["finetune", "linear_probe"]}, "lr": {"when": {"mode": "fine_tune"}, "float": [1e-4, 1e-2]}}),
     r"\[search\.space\.lr\.when\.mode\] 'fine_tune' is never sampled: mode takes finetune, linear_probe"),
    ("conditional param never applies", edit(search__space={
        "backbone": {"choice": ["tiny_vit", "tiny_resnet"]},
        "mode": [{"when": {"backbone": "tiny_vit"}, "choice": ["linear_probe"]}],
        "lr": {"when": {"mode": "linear_probe", "backbone": "tiny_resnet"}, "float": [1e-4, 1e-2]}}),
     r"\[search\.space\.lr\] never applies: no variant's `when` matches"),
    ("shadowed variant", edit(search__space={
        "mode": {"choice": ["finetune", "linear_probe"]},
        "lr": [{"float": [1e-4, 1e-2]}, {"when": {"mode": "finetune"}, "float": [1e-5, 1e-3]}]}),
     r"\[search\.space\.lr\[1\]\.when\] never used \(mode=finetune\): earlier variants always match first"),
    ("fixed and searched", edit(trial={"lr": 1e-3}), r"\[search\.space\.lr\] lr is both fixed under trial: and searched"),
    ("point misses a param", edit(search__points_to_evaluate=[{"backbone": "tiny_vit", "mode": "finetune", "pos_weight": 2,
                                                               "lr": 1e-4}]),
     r"\[search\.points_to_evaluate\[0\]\] sets no backbone_lr_mult, which applies to it \(mode=finetune\)"),
    ("point sets a param that does not apply", edit(search__points_to_evaluate=[
        {"backbone": "tiny_vit", "mode": "linear_probe", "pos_weight": 2, "lr": 1e-2, "backbone_lr_mult": 1}]),
     r"\[search\.points_to_evaluate\[0\]\.backbone_lr_mult\] does not apply to this point"),
    ("point out of range", edit(search__points_to_evaluate=[
        {"backbone": "tiny_vit", "mode": "linear_probe", "pos_weight": 2, "lr": 1e-5}]),
     r"\[search\.points_to_evaluate\[0\]\.lr\] 1e-05 is outside \[0\.0001, 0\.1\] \(see search\.space\.lr\[1\]\)"),
    ("point sets a fixed field", edit(search__points_to_evaluate=[{"epochs": 3}]),
     r"\[search\.points_to_evaluate\[0\]\.epochs\] epochs is not in search\.space"),
    ("too few samples for the points", edit(search__num_samples=1),
     r"\[search\.num_samples\] 1 is fewer than the 2 points_to_evaluate"),
    ("num_samples < 1", edit(search__num_samples=0), r"\[search\.num_samples\] Input should be greater than or equal to 1"),
    ("empty space", edit(search__space={}, search__points_to_evaluate=[]), r"\[search\.space\] is empty"),
    ("unknown metric", edit(scheduler={"metric": "val_acc"}), r"\[scheduler\.metric\] unknown metric 'val_acc' \(did you mean val_auc.*\); trials report"),
    ("metric against mode", edit(scheduler={"metric": "val_loss", "mode": "max"}), r"\[scheduler\.mode\] max would keep the worst"),
    ("grace beyond max_t", edit(scheduler={"grace_period": 5}), r"\[scheduler\.grace_period\] 5 is beyond max_t 3"),
    ("gpus not a number", edit(resources={"gpus_per_trial": "half"}), r"\[resources\.gpus_per_trial\] expected a number of GPUs"),
    ("gpus per mode incomplete", edit(resources={"gpus_per_trial": {"finetune": 1}}),
     r"\[resources\.gpus_per_trial\.linear_probe\] required field is missing"),
    ("sampler group without multivariate", edit(search__sampler={"multivariate": False}),
     r"\[search\.sampler\.group\] true needs multivariate: true"),
]


@pytest.mark.parametrize("recipe, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_recipe(tmp_path, recipe, match):
    with pytest.raises(ConfigError, match=r"^\S*x\.yaml: " + match) as info:
        load_recipe(write(tmp_path, recipe))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# The search space on a real Optuna study
# --------------------------------------------------------------------------------------------------

def test_define_by_run_conditional_params(base_recipe):
    r = base_recipe
    study = optuna.create_study(direction="maximize", sampler=r.sampler())
    seen = set()
    for _ in range(30):
        t = study.ask()
        r.define_by_run(t)
        p = t.params
        ft = p["mode"] == "finetune"
        assert ("backbone_lr_mult" in p) == ft
        assert set(p) == {"backbone", "mode", "pos_weight", "backbone_lr_mult", "lr|mode=finetune"} if ft else \
            {"backbone", "mode", "pos_weight", "lr|mode=linear_probe"}
        lr = p["lr|mode=finetune"] if ft else p["lr|mode=linear_probe"]
        assert (1e-5 <= lr <= 1e-3) if ft else (1e-4 <= lr <= 1e-1)
        cfg = r.trial_config(r.params_from_optuna(p))
        assert (cfg.lr, cfg.mode, cfg.epochs, cfg.batch_size) == (lr, p["mode"], 3, 16)
        seen.add((p["backbone"], p["mode"]))
        study.tell(t, math.log(p["pos_weight"]) - abs(math.log10(lr) + 3))
    assert len(seen) == 4  # every backbone x mode combination was proposed


def test_optuna_points_are_the_first_trials(base_recipe):
    r = base_recipe
    points = r.optuna_points()
    assert points[0] == {"backbone": "tiny_resnet", "mode": "finetune", "pos_weight": 8.0, "lr|mode=finetune": 1e-4,
                         "backbone_lr_mult": 1.0}
    study = optuna.create_study(direction="maximize", sampler=r.sampler())
    for pt in points:
        study.enqueue_trial(pt)
    for expected in BASE["search"]["points_to_evaluate"]:
        t = study.ask()
        r.define_by_run(t)
        got = r.params_from_optuna(t.params)
        assert got == {k: float(v) if k in ("lr", "pos_weight", "backbone_lr_mult") else v for k, v in expected.items()}
        study.tell(t, 0.5)


def test_sampler_is_deterministic(base_recipe):
    def run(recipe):
        study = optuna.create_study(direction="maximize", sampler=recipe.sampler())
        out = []
        for _ in range(14):  # 10 random startup trials, then TPE
            t = study.ask()
            recipe.define_by_run(t)
            out.append(t.params)
            study.tell(t, t.params["pos_weight"])
        return out

    first = run(base_recipe)
    assert first == run(base_recipe)
    other = SweepRecipe.model_validate({**base_recipe.resolved(), "seed": 1})
    assert run(other) != first


def test_params_from_optuna_and_trial_config(base_recipe):
    r = base_recipe
    assert r.params_from_optuna({"lr|mode=linear_probe": 0.01, "mode": "linear_probe"}) == {
        "lr": 0.01, "mode": "linear_probe"}
    with pytest.raises(ConfigError, match=r"\[params\.lrr\] 'lrr' is not a TrialConfig field \(did you mean lr.*\)"):
        r.params_from_optuna({"lrr": 0.1})
    cfg = r.trial_config({"backbone": "tiny_vit", "backbone_args.input_size": 48})
    assert (cfg.data, cfg.seed, cfg.split_seed, cfg.backbone_args, cfg.device) == (
        r.data.root, 0, 0, {"input_size": 48}, "cpu")  # no GPU share: the trial runs on the CPU
    gpu = load_recipe(SWEEPS / "search.yaml")
    assert gpu.trial_config({"mode": "linear_probe"}).device == "auto"  # the GPU Ray assigns
    assert gpu.trial_config({}, device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match=r"sweep t: invalid trial parameters.*\[lr\] Input should be greater than 0"):
        r.trial_config({"lr": 0})
    with pytest.raises(ConfigError, match=r"\[params\.seed\] seed is set once for the whole sweep"):
        r.trial_config({"seed": 1})


def test_split_other_than_default_needs_a_manifest(tmp_path):
    r = load_recipe(write(tmp_path, edit(split={"mode": "image"})))
    assert r.split_args() == {"split_path": None, "mode": "image", "seed": 0, "fractions": (0.7, 0.15, 0.15)}
    with pytest.raises(ConfigError, match=r"need a manifest.*get_or_create_split"):
        r.trial_config({})
    assert r.trial_config({}, split="/m.parquet").split == "/m.parquet"


def test_dict_field_search_and_resources(tmp_path):
    r = load_recipe(SWEEPS / "demo.yaml")
    study = optuna.create_study(direction="maximize", sampler=r.sampler())
    for _ in range(6):
        t = study.ask()
        r.define_by_run(t)
        cfg = r.trial_config(r.params_from_optuna(t.params))
        assert cfg.backbone_args["input_size"] in (32, 48) and cfg.image_size is None
        assert r.resources(t.params) == {"cpu": 1.0, "gpu": 0.0}
        study.tell(t, 0.5)


def test_ray_optuna_search_uses_the_space():
    """The sweep's contract: OptunaSearch(space=define_by_run, points_to_evaluate=optuna_points())."""
    pytest.importorskip("ray.tune.search.optuna")
    from ray.tune.search.optuna import OptunaSearch

    r = load_recipe(SWEEPS / "demo.yaml")
    searcher = OptunaSearch(space=r.define_by_run, points_to_evaluate=r.optuna_points(), sampler=r.sampler(),
                            metric=r.scheduler.metric, mode=r.scheduler.mode)
    configs = []
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        configs.append(r.trial_config(r.params_from_optuna(config)))
        searcher.on_trial_complete(f"t{i}", {r.scheduler.metric: 0.5 + i / 100})
    expected = [r.trial_config(r.params_from_optuna(p)) for p in r.optuna_points()]
    assert len(expected) == 4 and configs[:len(expected)] == expected
    assert all(c.backbone_args.get("input_size") in (32, 48) for c in configs)


def test_resources_follow_the_trial_mode(tmp_path):
    r = load_recipe(write(tmp_path, edit(trial={"mode": "linear_probe"}, search__space={"lr": {"float": [1e-3, 1e-1]}},
                                         search__points_to_evaluate=[],
                                         resources={"cpus_per_trial": 2, "gpus_per_trial": {"finetune": 1, "linear_probe": 0.25},
                                                    "max_concurrent_trials": 3})))
    assert r.resources.cpus_per_trial == 2 and r.resources.max_concurrent_trials == 3
    for recipe in (r, pickle.loads(pickle.dumps(r)), SweepRecipe.model_validate_json(r.model_dump_json())):
        assert recipe.resources({"lr": 0.01}) == {"cpu": 2.0, "gpu": 0.25}  # trial.mode: linear_probe
        assert recipe.resources({"mode": "finetune"}) == {"cpu": 2.0, "gpu": 1.0}
        assert recipe.resources_for({"mode|backbone=x": "finetune"}) == {"cpus": 2.0, "gpus": 1.0}


def test_recipe_pickles_for_ray(base_recipe):
    r = pickle.loads(pickle.dumps(base_recipe))
    assert r.hash == base_recipe.hash and r.optuna_points() == base_recipe.optuna_points()
    study = optuna.create_study(sampler=r.sampler())
    t = study.ask()
    r.define_by_run(t)  # the parsed space travelled with it
    assert "mode" in t.params


def test_resolved_recipe_round_trips(base_recipe):
    again = SweepRecipe.model_validate(base_recipe.resolved())
    assert again.hash == base_recipe.hash == SweepRecipe.model_validate_json(base_recipe.model_dump_json()).hash
    assert re.fullmatch(r"[0-9a-f]{16}", again.hash)
    assert base_recipe.resolved()["scheduler"]["max_t"] == 3 and base_recipe.resolved()["scheduler"]["mode"] == "max"
    assert "resources" in base_recipe.resolved()


def test_scheduler_defaults_are_resolved_at_load(tmp_path):
    """The runner reads scheduler.mode and scheduler.max_t as given: never None after load."""
    r = load_recipe(write(tmp_path, edit(search=DROP, trials=[{"epochs": 2}, {"epochs": 7}],
                                         scheduler={"metric": "val_loss"})))
    assert (r.scheduler.mode, r.scheduler.max_t) == ("min", 7)  # the longest trial; lower loss is better
    searched = load_recipe(write(tmp_path, edit(trial={"batch_size": 16}, search__space={"epochs": {"int": [2, 30]}},
                                                search__points_to_evaluate=[])))
    assert (searched.scheduler.mode, searched.scheduler.max_t) == ("max", 30)
    again = SweepRecipe.model_validate(searched.resolved())
    assert again.scheduler == searched.scheduler and again.hash == searched.hash
