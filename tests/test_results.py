"""Tests for skinsweep.results: the Parquet results store (schemas, replace, atomicity) and show / query / load.

Trials are fake summaries and prediction frames shaped like skinsweep.train.loop's output; nothing trains.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from skinsweep.errors import ConfigError, DataError, StoreWriteError
from skinsweep.results import (
    METRICS,
    PREDICTIONS_SCHEMA,
    TRIAL_COLUMNS,
    ResultsStore,
    load,
    query,
    show,
)

# A TrialConfig dump (skinsweep.train.loop.TrialConfig.model_dump()), written out so the tests need no torch.
BASE_CONFIG = {
    "data": "/data/ham", "split": None, "positive": ["MEL"], "backbone": "resnet18", "weights": None,
    "backbone_args": {}, "mode": "finetune", "head": "auto", "head_hidden": 512, "loss": "bce",
    "pos_weight": 8.0, "focal_gamma": 2.0, "lr": 1e-4, "backbone_lr_mult": 1.0, "epochs": 3,
    "embedding_cache": True, "seed": 0, "device": "auto",
}
PARAMS = [{"split": "split_file"}.get(k, k) for k in BASE_CONFIG]  # "split" would clash with val/test
VERSIONS = {"skinsweep": "0.1.0", "torch": "2.5.0", "timm": "1.0.9", "open_clip": "2.29.0", "python": "3.11.9"}


def metrics(auc: float, ece: float, n: int) -> dict:
    return {"auc": auc, "ap": auc / 2, "accuracy": 0.8, "precision": 0.3, "recall": 0.7, "specificity": 0.8,
            "f1": 0.4, "ece": ece, "brier": 0.1, "n": n, "n_pos": n // 5, "loss": 0.5}


def summary(trial_id: str, *, status: str = "completed", val_auc: float = 0.8, ece: float = 0.1,
            n_val: int = 10, n_test: int = 6, drop: tuple[str, ...] = (), **config) -> dict:
    cfg = {k: v for k, v in {**BASE_CONFIG, **config}.items() if k not in drop}
    return {
        "trial_id": trial_id, "status": status, "config": cfg, "config_hash": f"c-{trial_id}",
        "split": "/cache/split.parquet", "split_hash": "s123", "dataset_hash": "d456", "select_metric": "auc",
        "best_epoch": 2, "epochs_run": 3, "val": metrics(val_auc, ece, n_val), "test": metrics(val_auc - 0.05, ece, n_test),
        "history": [{"epoch": 1, "val_auc": 0.6}], "runtime_s": 12.5, "device": "cpu", "augment": "none",
        "head": "linear", "embedding_cache": None, "n_params": 1000, "n_trainable": 1000,
        "n_images": {"train": 30, "val": n_val, "test": n_test}, "versions": VERSIONS,
        "artefacts": {"predictions": "predictions.parquet", "checkpoint": "checkpoint.safetensors"},
    }


def preds(s: dict, *, recipe_hash: str | None = "r789", **extra_cols) -> pd.DataFrame:
    """Predictions as skinsweep.train.loop writes them (plus the sweep's extra constant columns)."""
    rows = []
    rng = np.random.default_rng(len(s["trial_id"]))
    for split in ("val", "test"):
        n = s["n_images"][split]
        logit = rng.normal(size=n).astype("float32")
        rows.append(pd.DataFrame({
            "image_id": [f"ISIC_{i:07d}" for i in range(n)], "lesion_id": [f"HAM_{i // 2:07d}" for i in range(n)],
            "label": (np.arange(n) % 5 == 0).astype("int8"), "dx": "NV", "logit": logit,
            "prob": (1 / (1 + np.exp(-logit))).astype("float32"), "split": split, "epoch": np.int32(2),
            "trial_id": s["trial_id"], "backbone": s["config"]["backbone"], "mode": s["config"]["mode"],
            "split_hash": s["split_hash"], "config_hash": s["config_hash"],
            **({"recipe_hash": recipe_hash, "sweep": "demo"} if recipe_hash else {}), **extra_cols,
        }))
    return pd.concat(rows, ignore_index=True)


def add(store: ResultsStore, s: dict, **kw) -> None:
    store.add_trial(s, predictions=preds(s), extra={"node": "n1", "cpus": 2, "gpus": 0.5, **kw})


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep folder with: two completed trials, a linear probe, a pruned trial, a failed trial, and one
    completed trial whose config lacks backbone_lr_mult (an older TrialConfig)."""
    store = ResultsStore(tmp_path / "demo")
    add(store, summary("t1", val_auc=0.90, ece=0.20, lr=1e-3))
    add(store, summary("t2", val_auc=0.70, ece=0.05, backbone="dino_vits16", lr=1e-5))
    add(store, summary("t3", val_auc=0.80, ece=0.10, backbone="dino_vits16", mode="linear_probe", lr=1e-2))
    full = summary("t4", val_auc=0.60)  # a pruned trial's summary as skinsweep.sweep.runner builds it: no head, no test
    pruned = {"trial_id": "t4", "status": "pruned", "config": full["config"], "config_hash": "c-t4",
              "best_epoch": None, "epochs_run": 1, "val": full["val"], "test": {}, "runtime_s": 3.0, "split_hash": None}
    store.add_trial(pruned, predictions=None, status="pruned", extra={"pruned_at_epoch": 1})
    store.add_failed("t5", {k: v for k, v in BASE_CONFIG.items() if k != "lr"}, "CUDA out of memory",
                     extra={"attempts": 2})
    add(store, summary("t6", val_auc=0.85, ece=0.30, drop=("backbone_lr_mult",), backbone="clip_vitb32"))
    (tmp_path / "demo" / "sweep.json").write_text(json.dumps({"name": "demo", "recipe_hash": "r789",
                                                              "split_hash": "s123"}))
    return tmp_path / "demo"


N_PRED = {"t1": 16, "t2": 16, "t3": 16, "t6": 16}  # rows per trial with predictions (10 val + 6 test)


# ----------------------------------------------------------------------------- trials.parquet


def test_trials_parquet_exact_schema(sweep: Path) -> None:
    table = pq.read_table(sweep / "trials.parquet")
    fixed = [c for c in TRIAL_COLUMNS if c not in ("trial_id", "status")]
    assert table.column_names == ["trial_id", "status", *PARAMS, *fixed, "pruned_at_epoch", "attempts"]
    assert table.num_rows == 6
    types = dict(zip(table.column_names, table.schema.types))
    expect = {"lr": pa.float64(), "epochs": pa.int64(), "backbone": pa.string(), "backbone_args": pa.string(),
              "positive": pa.string(), "embedding_cache": pa.bool_(), "weights": pa.string(),
              "backbone_lr_mult": pa.float64(), "val_auc": pa.float64(), "test_ece": pa.float64(),
              "val_n": pa.int64(), "best_epoch": pa.int64(), "gpus": pa.float64(), "torch_version": pa.string(),
              "started_at": pa.timestamp("us", tz="UTC"), "pruned_at_epoch": pa.int64(), "attempts": pa.int64()}
    assert {k: types[k] for k in expect} == expect
    assert {f"{s}_{m}" for s in ("val", "test") for m in METRICS} <= set(table.column_names)


def test_hyperparameters_are_columns_null_where_absent_or_not_applicable(sweep: Path) -> None:
    df = ResultsStore(sweep).trials().set_index("trial_id")
    assert df.loc["t1", "lr"] == 1e-3 and df.loc["t3", "mode"] == "linear_probe"
    assert pd.isna(df.loc["t5", "lr"])                     # failed trial whose config lacked lr
    assert pd.isna(df.loc["t6", "backbone_lr_mult"])       # missing from an older config
    assert pd.isna(df.loc["t3", "backbone_lr_mult"])       # linear probe: backbone lr does not apply
    assert df.loc["t1", "backbone_lr_mult"] == 1.0
    assert df["focal_gamma"].isna().all()                  # bce everywhere
    assert pd.isna(df.loc["t1", "head_hidden"])            # resolved head is linear, not mlp
    assert df.loc["t4", "head_hidden"] == 512              # head "auto" never resolved (pruned): kept
    assert df.loc["t3", "embedding_cache"] == True and pd.isna(df.loc["t1", "embedding_cache"])  # noqa: E712
    assert json.loads(df.loc["t1", "positive"]) == ["MEL"] and json.loads(df.loc["t1", "backbone_args"]) == {}
    assert df["status"].to_dict() == {"t1": "completed", "t2": "completed", "t3": "completed", "t4": "pruned",
                                      "t5": "failed", "t6": "completed"}
    assert df.loc["t5", "error"] == "CUDA out of memory" and df.loc["t5", "attempts"] == 2
    assert df.loc["t4", "pruned_at_epoch"] == 1 and pd.isna(df.loc["t4", "test_auc"]) and df.loc["t4", "val_auc"] == 0.6
    assert df.loc["t1", "torch_version"] == "2.5.0" and df.loc["t1", "recipe_hash"] == "r789"  # from predictions
    assert df.loc["t1", "val_auc"] == 0.9 and df.loc["t1", "test_n"] == 6
    assert df.loc["t1", "node"] == "n1" and df.loc["t1", "gpus"] == 0.5
    started, finished = df.loc["t1", "started_at"], df.loc["t1", "finished_at"]
    assert (finished - started).total_seconds() == pytest.approx(12.5) and str(finished.tz) == "UTC"


def test_column_types_unify_across_trials(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.add_trial(summary("a"), predictions=None, extra={"score": 1, "note": None})
    store.add_trial(summary("b", image_size=96), predictions=None, extra={"score": 2.5, "note": "x"})
    types = dict(zip(pq.read_schema(tmp_path / "trials.parquet").names, pq.read_schema(tmp_path / "trials.parquet").types))
    assert types["score"] == pa.float64() and types["note"] == pa.string() and types["image_size"] == pa.int64()
    df = store.trials().set_index("trial_id")
    assert df.loc["a", "score"] == 1.0 and pd.isna(df.loc["a", "image_size"]) and df.loc["b", "image_size"] == 96


# The hyperparameter column types the store wrote when it still inferred them from the values (captured
# from skinsweep 9f5ea5e for full TrialConfig dumps, each field non-null in some trial): deriving them from
# TrialConfig's annotations must keep every stored file the same.
STORED_PARAM_TYPES = {
    "data": "string", "split_file": "string", "split_seed": "int64", "positive": "string", "skip_bad": "bool",
    "image_size": "int64", "resize_policy": "string", "backbone": "string", "weights": "string",
    "backbone_args": "string", "mode": "string", "head": "string", "head_hidden": "int64", "dropout": "double",
    "loss": "string", "pos_weight": "double", "focal_gamma": "double", "optimizer": "string", "lr": "double",
    "backbone_lr_mult": "double", "weight_decay": "double", "batch_size": "int64", "epochs": "int64",
    "warmup_epochs": "int64", "schedule": "string", "augment": "string", "select_metric": "string",
    "embedding_cache": "bool", "seed": "int64", "device": "string", "eval_batch_size": "int64",
}


def trial_config(**kw) -> dict:
    from skinsweep.train.config import TrialConfig

    return TrialConfig(data="/data/ham", **kw).model_dump()


def param_types(path: Path) -> dict[str, str]:
    schema = pq.read_schema(path / "trials.parquet")
    params = json.loads(schema.metadata[b"skinsweep"])["params"]
    return {name: str(schema.field(name).type) for name in params}


def test_param_column_types_come_from_trial_config_and_match_stored_files(tmp_path: Path) -> None:
    from skinsweep.results import PARAM_TYPES

    store = ResultsStore(tmp_path)
    for tid, cfg in (("a", trial_config(weights="hub", split="/s.parquet", image_size=64, backbone_args={"x": 1})),
                     ("b", trial_config(mode="linear_probe", head="mlp", loss="focal"))):
        store.add_trial({**summary(tid), "config": cfg}, predictions=None)
    written = param_types(tmp_path)
    assert written == {k: str(v) for k, v in PARAM_TYPES.items()}  # one column per TrialConfig field, typed by it
    assert {k: v for k, v in written.items() if k in STORED_PARAM_TYPES} == \
        {k: v for k, v in STORED_PARAM_TYPES.items() if k in written}


def test_all_null_optional_param_has_its_declared_type(tmp_path: Path) -> None:
    """image_size is Optional[int]: int64 even while every trial leaves it unset (it was string, by its
    first value, until a trial set it)."""
    store = ResultsStore(tmp_path)
    store.add_trial({**summary("a"), "config": trial_config()}, predictions=None)
    assert param_types(tmp_path)["image_size"] == "int64"
    store.add_trial({**summary("b"), "config": trial_config(image_size=96)}, predictions=None)
    image_size = store.trials().set_index("trial_id")["image_size"]
    assert pd.isna(image_size["a"]) and image_size["b"] == 96 and param_types(tmp_path)["image_size"] == "int64"


def test_store_written_by_older_code_loads_and_takes_new_trials(tmp_path: Path) -> None:
    """An older trials.parquet: image_size stored as string (all null), no dropout column (an older TrialConfig),
    an extra column typed by its values. New trials append with the declared types; old rows keep their values."""
    store = ResultsStore(tmp_path)
    store.add_trial({**summary("old"), "config": trial_config()}, predictions=None, extra={"score": 1})
    table = pq.read_table(tmp_path / "trials.parquet")
    i = table.column_names.index("image_size")
    old = table.set_column(i, "image_size", pa.nulls(1, pa.string())).drop(["dropout"])
    pq.write_table(old.replace_schema_metadata(table.schema.metadata), tmp_path / "trials.parquet")
    assert len(load(tmp_path).trials) == 1 and show(tmp_path)["trial_id"].tolist() == ["old"]

    store.add_trial({**summary("new"), "config": trial_config(image_size=96, dropout=0.1)}, predictions=None,
                    extra={"score": 2.5})
    types = param_types(tmp_path)
    assert types["image_size"] == "int64" and types["dropout"] == "double"
    df = store.trials().set_index("trial_id")
    assert df.loc["new", "image_size"] == 96 and pd.isna(df.loc["old", "image_size"])
    assert df.loc["new", "dropout"] == 0.1 and pd.isna(df.loc["old", "dropout"])
    assert df["score"].tolist() == [1.0, 2.5] and df.loc["old", "lr"] == 1e-4


# ----------------------------------------------------------------------------- predictions


def test_predictions_fixed_schema_readable_in_one_call(sweep: Path) -> None:
    pdir = sweep / "predictions"
    assert sorted(p.name for p in pdir.iterdir()) == [f"{t}.parquet" for t in sorted(N_PRED)]
    for f in pdir.iterdir():
        assert pq.read_schema(f).remove_metadata() == PREDICTIONS_SCHEMA
    total = sum(N_PRED.values())
    by_pandas = pd.read_parquet(pdir)
    assert len(by_pandas) == total and str(by_pandas["label"].dtype) == "int8" and str(by_pandas["prob"].dtype) == "float32"
    assert ds.dataset(pdir).to_table().num_rows == total
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{pdir}/*.parquet')").fetchall() == [(total,)]
    assert by_pandas.groupby("trial_id").size().to_dict() == N_PRED
    assert set(by_pandas["recipe_hash"]) == {"r789"} and set(by_pandas["sweep"]) == {"demo"}


@pytest.mark.parametrize("trial_ids, split, n", [
    (None, None, 64), ("t1", None, 16), (["t1", "t3"], "val", 20), (None, "test", 24), (["t4", "t5"], None, 0),
])
def test_store_predictions_filters(sweep: Path, trial_ids, split, n) -> None:
    df = ResultsStore(sweep).predictions(trial_ids, split=split)
    assert len(df) == n and list(df.columns) == PREDICTIONS_SCHEMA.names
    if split:
        assert set(df["split"]) == {split}


def test_predictions_from_file_fill_missing_columns_and_move_constants(tmp_path: Path) -> None:
    s = summary("f1")
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    frame = preds(s, recipe_hash=None, fold=3).drop(columns=["trial_id", "epoch", "backbone"])
    frame.to_parquet(trial_dir / "predictions.parquet", index=False)
    (trial_dir / "checkpoint.safetensors").write_bytes(b"x")
    store = ResultsStore(tmp_path / "sweep")
    store.add_trial(s, predictions=trial_dir, extra={"recipe_hash": "rh"})
    p = store.predictions()
    assert set(p["trial_id"]) == {"f1"} and set(p["epoch"]) == {2} and set(p["backbone"]) == {"resnet18"}
    assert set(p["recipe_hash"]) == {"rh"} and p["sweep"].isna().all()
    row = store.trials().iloc[0]
    assert row["fold"] == 3  # a per-trial constant the fixed schema lacks becomes a trials column
    assert row["checkpoint"] == str((trial_dir / "checkpoint.safetensors").resolve())


# ----------------------------------------------------------------------------- replace, atomicity, locking


def test_readding_a_trial_replaces_row_and_predictions(sweep: Path) -> None:
    store = ResultsStore(sweep)
    s = summary("t1", val_auc=0.95, n_val=4, n_test=2, lr=1e-3)
    add(store, s)
    df = store.trials()
    assert len(df) == 6 and (df["trial_id"] == "t1").sum() == 1
    assert df.set_index("trial_id").loc["t1", "val_auc"] == 0.95
    assert len(store.predictions("t1")) == 6 and len(pd.read_parquet(sweep / "predictions")) == 64 - 16 + 6
    store.add_failed("t1", BASE_CONFIG, "killed")  # a re-run that failed: its old predictions go too
    assert not (sweep / "predictions" / "t1.parquet").exists() and store.trial_ids() == {f"t{i}" for i in range(1, 7)}


def test_crash_while_writing_keeps_previous_trials(sweep: Path, monkeypatch) -> None:
    before = pq.read_table(sweep / "trials.parquet")
    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the predictions file lands, then the trials.parquet rewrite "crashes"
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    store = ResultsStore(sweep)
    with pytest.raises(StoreWriteError, match="disk full"):  # one line (skinsweep.errors), not an OSError traceback
        add(store, summary("t7"))
    monkeypatch.setattr(os, "replace", real_replace)

    assert pq.read_table(sweep / "trials.parquet").equals(before)
    assert not [p.name for p in sweep.rglob("*.tmp")]
    assert "t7" not in store.trial_ids()
    # predictions land first, never a bare row; the failed write took its orphan back (a killed writer leaves it)
    assert not (sweep / "predictions" / "t7.parquet").exists()
    (sweep / "predictions" / "t7.parquet").write_bytes((sweep / "predictions" / "t1.parquet").read_bytes())  # killed writer
    assert "t7" not in set(store.predictions()["trial_id"])  # the orphan file is not served
    assert query(sweep, "SELECT count(*) AS n FROM predictions")["n"][0] == 64
    (sweep / ".trials.parquet.999.tmp").write_bytes(b"half")    # as a SIGKILLed writer would leave it
    add(store, summary("t8"))                                   # the next write tidies both up
    assert set(pd.read_parquet(sweep / "predictions")["trial_id"]) == {"t1", "t2", "t3", "t6", "t8"}
    assert not (sweep / ".trials.parquet.999.tmp").exists()
    add(store, summary("t7"))                                   # resume: the trial is added again
    assert "t7" in store.trial_ids() and len(store.predictions("t7")) == 16


def test_concurrent_adds_lose_no_rows(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    threads = [threading.Thread(target=add, args=(store, summary(f"c{i}"))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.trial_ids() == {f"c{i}" for i in range(6)}


# ----------------------------------------------------------------------------- show / query / load


@pytest.mark.parametrize("kwargs, expected", [
    ({}, ["t1", "t6", "t3", "t2", "t4", "t5"]),                                 # val_auc desc, nulls last
    ({"top": 2}, ["t1", "t6"]),
    ({"by": "val_ece", "top": None}, ["t2", "t3", "t4", "t1", "t6", "t5"]),     # ece: lower is better
    ({"by": "test_auc"}, ["t1", "t6", "t3", "t2", "t4", "t5"]),
    ({"where": "mode = 'finetune' AND status = 'completed'"}, ["t1", "t6", "t2"]),
    ({"where": "backbone = 'dino_vits16' AND lr < 1e-3", "by": "val_loss"}, ["t2"]),
    ({"by": "lr", "where": "lr IS NOT NULL"}, ["t2", "t4", "t6", "t1", "t3"]),  # non-metric: ascending
    ({"by": "val_auc", "ascending": True, "top": 1}, ["t4"]),
])
def test_show(sweep: Path, kwargs, expected) -> None:
    df = show(sweep, **kwargs)
    assert df["trial_id"].tolist() == expected


def test_show_columns_and_header(sweep: Path) -> None:
    df = show(sweep, by="val_ece")
    assert list(df.columns) == ["trial_id", "status", "backbone", "mode", "lr", "pos_weight", "best_epoch",
                                "val_auc", "val_ap", "test_auc", "test_ap", "runtime_s", "val_ece"]
    assert list(show(sweep, columns=["trial_id", "node"]).columns) == ["trial_id", "node"]
    assert df.attrs["header"] == ("sweep demo: 6 trials (completed 4, pruned 1, failed 1) · recipe hash r789 · "
                                  "split hash s123")


def test_query_joins_trials_and_predictions(sweep: Path) -> None:
    got = query(sweep, "SELECT backbone, count(*) AS n, avg(prob) AS p FROM predictions JOIN trials USING (trial_id) "
                       "WHERE split = 'val' GROUP BY 1 ORDER BY 1")
    p = pd.read_parquet(sweep / "predictions")
    want = p[p["split"] == "val"].groupby("backbone")["prob"].agg(["size", "mean"])
    assert got["backbone"].tolist() == want.index.tolist() == ["clip_vitb32", "dino_vits16", "resnet18"]
    assert got["n"].tolist() == want["size"].tolist()
    np.testing.assert_allclose(got["p"], want["mean"], rtol=1e-6)


def test_load_reads_predictions_lazily(sweep: Path) -> None:
    res = load(sweep / "trials.parquet")
    assert res.path == sweep and len(res.trials) == 6 and "predictions" not in vars(res)
    assert len(res.predictions) == 64 and res.sweep["name"] == "demo"


def test_validation_noise_reads_the_best_trials_stored_val_predictions(sweep: Path) -> None:
    from skinsweep.ensemble.stats import auc_se
    from skinsweep.results import validation_noise

    val = ResultsStore(sweep).predictions("t1", split="val")  # t1: the best completed trial by val_auc
    est = auc_se(val["label"].to_numpy(), val["prob"].to_numpy())
    line = validation_noise(sweep)
    assert f"val AUC {est['auc']:.3f}" in line and f"standard error of {est['se']:.3f}" in line
    assert "(10 images, 2 melanoma)" in line
    assert "top 4 completed trials span 0.700–0.900" in line  # t4 (pruned) and t5 (failed) are not counted
    assert f"~{2 * est['se']:.3f}" in line
    assert "top 2 completed trials span 0.850–0.900" in validation_noise(sweep, top=2)


def test_results_show_prints_the_validation_noise_line_only_for_the_val_auc_ranking(sweep: Path) -> None:
    from typer.testing import CliRunner

    from skinsweep.cli import app

    run = lambda *a: CliRunner().invoke(app, ["results", "show", str(sweep), *a], env={"COLUMNS": "300"})
    plain, by_ece, filtered = run(), run("--by", "val_ece"), run("--where", "lr < 1e-2")
    assert plain.exit_code == by_ece.exit_code == filtered.exit_code == 0
    assert "validation noise: the best trial's val AUC" in plain.output
    assert "validation noise" not in by_ece.output and "validation noise" not in filtered.output


def test_validation_noise_without_completed_trials_is_none(tmp_path: Path) -> None:
    from skinsweep.results import validation_noise

    store = ResultsStore(tmp_path / "s")
    store.add_failed("t1", dict(BASE_CONFIG), "boom")
    assert validation_noise(tmp_path / "s") is None


def test_empty_store(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "new")
    assert store.trial_ids() == set() and len(store.trials()) == 0 and "val_auc" in store.trials()
    assert len(store.predictions()) == 0 and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, exc, match", [
    (lambda d: load(d.parent), DataError, r"is not a skinsweep sweep folder \(no trials.parquet\); did you mean .*demo"),
    (lambda d: load(d / "nope"), DataError, r"does not exist"),
    (lambda d: show(d, by="val_acu"), ConfigError, r"cannot sort by 'val_acu'.*did you mean val_auc"),
    (lambda d: show(d, columns=["trial_id", "lrr"]), ConfigError, r"unknown column\(s\) lrr.*did you mean lr"),
    (lambda d: show(d, where="backbon = 'x'"), ConfigError, r"not a valid filter.*backbon"),
    (lambda d: show(d, top=0), ConfigError, r"top must be a positive"),
    (lambda d: query(d, "SELEC 1"), ConfigError, r"query on .* failed: Parser Error"),
    (lambda d: query(d, "SELECT nope FROM trials"), ConfigError, r"nope"),
    (lambda d: ResultsStore(d).predictions("t99"), DataError, r"no trial\(s\) t99"),
    (lambda d: ResultsStore(d).predictions(split="train"), ConfigError, r"split must be one of val, test"),
    (lambda d: ResultsStore(d).add_trial(summary("x"), predictions=None, status="done"), ConfigError, "status 'done'"),
    (lambda d: ResultsStore(d).add_trial(summary("../x"), predictions=None), ConfigError, "cannot name a predictions file"),
    (lambda d: ResultsStore(d).add_trial(summary("x"), predictions=preds(summary("y"))), DataError, "rows of trial"),
    (lambda d: ResultsStore(d).add_trial(summary("x"), predictions=preds(summary("x")).drop(columns="prob")),
     DataError, r"lacks column\(s\) prob"),
    (lambda d: ResultsStore(d).add_trial(summary("x"), predictions=preds(summary("x")).assign(z=range(16))),
     DataError, "column 'z' varies"),
    (lambda d: ResultsStore(d).add_trial(summary("x"), predictions=d / "missing.parquet"), DataError, "does not exist"),
    (lambda d: ResultsStore(d).add_trial(summary("x"), predictions=None, extra={"cpus": "many"}), ConfigError,
     "column cpus: expected double"),
])
def test_errors_are_one_line(sweep: Path, call, exc, match) -> None:
    with pytest.raises(exc, match=match) as info:
        call(sweep)
    assert "\n" not in str(info.value)


def test_every_metric_has_columns() -> None:
    from skinsweep.metrics import HIGHER_IS_BETTER, METRIC_KEYS

    assert set(HIGHER_IS_BETTER) | set(METRIC_KEYS) <= set(METRICS)


def test_remove_trials_drops_rows_and_predictions(tmp_path):
    import numpy as np

    from skinsweep.results import ResultsStore

    store = ResultsStore(tmp_path / "s")
    for k in range(3):
        preds = pd.DataFrame({"image_id": [f"i{j}" for j in range(4)], "lesion_id": None, "label": [0, 1, 0, 1],
                              "dx": "NV", "logit": np.zeros(4), "prob": np.full(4, 0.5), "split": "val", "epoch": 1,
                              "trial_id": f"t{k}", "backbone": "tiny_vit", "mode": "finetune", "split_hash": "h",
                              "config_hash": "c"})
        store.add_trial({"trial_id": f"t{k}", "status": "completed", "config": {"lr": 0.1}}, predictions=preds)
    store.remove_trials({"t1"})
    assert store.trial_ids() == {"t0", "t2"}
    assert sorted(p.stem for p in (tmp_path / "s" / "predictions").glob("*.parquet")) == ["t0", "t2"]
    assert set(pd.read_parquet(tmp_path / "s" / "predictions")["trial_id"]) == {"t0", "t2"}


def test_history_per_epoch_stored_deduplicated_and_removed(tmp_path):
    """Per-epoch records go to history/<trial>.parquet (pruned trials too); a retried trial's repeated
    epochs keep the last attempt; removing a trial removes its history."""
    store = ResultsStore(tmp_path / "h")
    s = summary("t1", val_auc=0.9)
    s["history"] = [{"epoch": 1, "train_loss": 0.9, "val_auc": 0.6}, {"epoch": 2, "train_loss": 0.7, "val_auc": 0.8}]
    add(store, s)
    pruned = {"trial_id": "t2", "status": "pruned", "config": s["config"], "val": {"auc": 0.5}, "test": {},
              "history": [{"epoch": 1, "train_loss": 1.0, "val_auc": 0.4, "node": "n1"},      # first attempt
                          {"epoch": 1, "train_loss": 0.95, "val_auc": 0.5}]}                # its retry
    store.add_trial(pruned, predictions=None, status="pruned")
    store.add_failed("t3", s["config"], "boom")
    h = store.history()
    assert sorted(h.columns) == ["epoch", "train_loss", "trial_id", "val_auc"]  # numeric values only
    assert h[h["trial_id"] == "t1"]["val_auc"].tolist() == [0.6, 0.8]
    assert h[h["trial_id"] == "t2"][["epoch", "val_auc"]].values.tolist() == [[1, 0.5]]
    assert "t3" not in set(h["trial_id"]) and len(store.history(["t1"])) == 2
    store.remove_trials(["t1"])
    assert not (tmp_path / "h" / "history" / "t1.parquet").exists()
    assert set(store.history()["trial_id"]) == {"t2"}


def test_history_of_trials_with_different_columns_reads_as_one_frame(tmp_path):
    """history() reads every file in one Arrow concat (fast at 2,000 trials, issue #14): the same frame as
    concatenating the files one by one in pandas — columns unified, missing values NaN, trial order."""
    store = ResultsStore(tmp_path / "h")
    store.add_trial({"trial_id": "b", "status": "pruned", "history": [
        {"epoch": 1, "val_auc": 0.6, "val_ap": 0.2}, {"epoch": 2, "val_auc": 0.7, "val_ap": 0.3}]}, predictions=None)
    store.add_trial({"trial_id": "a", "status": "pruned", "history": [{"epoch": 1, "train_loss": 0.5, "val_auc": 0.6}]},
                    predictions=None)
    h = store.history()
    one_by_one = pd.concat([pd.read_parquet(tmp_path / "h" / "history" / f"{t}.parquet") for t in ("a", "b")],
                           ignore_index=True)
    pd.testing.assert_frame_equal(h, one_by_one)
    assert h.columns.tolist() == ["trial_id", "epoch", "train_loss", "val_auc", "val_ap"]
    assert h["epoch"].dtype == "int64" and h["val_ap"].isna().tolist() == [True, False, False]
