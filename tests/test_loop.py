"""One trial without Ray: each tiny backbone × mode, artefacts, metrics from Parquet, caches, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from skinsweep.errors import BackboneError, ConfigError, DataError
from skinsweep.metrics import binary_metrics
from skinsweep.train.config import parse_config
from skinsweep.train.loop import CHECKPOINT, MODEL_JSON, PREDICTIONS, SUMMARY, load_trial_model, run_trial


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from skinsweep.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "isic"
    synthesize(root, 160, seed=1, size=(96, 72), workers=1, progress=False)
    return root


def cfg(data, **kw):
    base = dict(data=str(data), backbone="tiny_resnet", mode="finetune", epochs=2, batch_size=16, lr=1e-3,
                image_size=32)
    return parse_config({**base, **kw})


@pytest.mark.parametrize("backbone", ["tiny_resnet", "tiny_vit", "tiny_clip"])
@pytest.mark.parametrize("mode", ["finetune", "linear_probe"])
def test_each_backbone_and_mode_trains_and_metrics_match_parquet(synth_dir, tmp_path, backbone, mode):
    seen = []
    res = run_trial(cfg(synth_dir, backbone=backbone, mode=mode), tmp_path / "t", callback=seen.append)
    assert res.status == "completed"
    assert [r["epoch"] for r in seen] == [1, 2]
    assert {"train_loss", "val_loss", "val_auc", "val_ap", "val_accuracy", "val_precision", "val_recall",
            "val_specificity", "val_ece", "val_brier"} <= set(seen[0])
    for name in (PREDICTIONS, SUMMARY, CHECKPOINT, MODEL_JSON):
        assert (tmp_path / "t" / name).is_file(), name
    preds = pd.read_parquet(tmp_path / "t" / PREDICTIONS)
    summary = json.loads((tmp_path / "t" / SUMMARY).read_text())
    assert set(preds["split"]) == {"val", "test"}
    assert (preds["epoch"] == summary["best_epoch"]).all()
    assert preds["trial_id"].nunique() == 1 and (preds["backbone"] == backbone).all() and (preds["mode"] == mode).all()
    assert summary["n_images"]["val"] == (preds["split"] == "val").sum()
    for split in ("val", "test"):
        p = preds[preds["split"] == split]
        recomputed = binary_metrics(p["label"].to_numpy(), p["prob"].to_numpy())
        for k in ("auc", "ap", "accuracy", "precision", "recall", "specificity", "ece", "brier"):
            assert summary[split][k] == pytest.approx(recomputed[k], abs=1e-6), (split, k)
    # the best epoch's validation metrics are what the callback saw for that epoch
    best = seen[summary["best_epoch"] - 1]
    assert summary["val"]["auc"] == pytest.approx(best["val_auc"], abs=1e-6)
    if mode == "linear_probe":
        assert summary["n_trainable"] < summary["n_params"]


def test_linear_probe_embedding_cache_hit(synth_dir, tmp_path, monkeypatch):
    first = run_trial(cfg(synth_dir, backbone="tiny_vit", mode="linear_probe"), tmp_path / "a")
    assert first.summary["embedding_cache"] == "miss"
    import skinsweep.train.model as model_mod

    calls = []
    real = model_mod.Classifier.features
    monkeypatch.setattr(model_mod.Classifier, "features", lambda self, x: calls.append(1) or real(self, x))
    second = run_trial(cfg(synth_dir, backbone="tiny_vit", mode="linear_probe", lr=3e-3), tmp_path / "b")
    assert second.summary["embedding_cache"] == "hit" and calls == []  # backbone never ran
    # a different seed means a different random backbone: not a hit
    third = run_trial(cfg(synth_dir, backbone="tiny_vit", mode="linear_probe", seed=5), tmp_path / "c")
    assert third.summary["embedding_cache"] == "miss"


def test_deterministic_on_cpu(synth_dir, tmp_path):
    a = run_trial(cfg(synth_dir), tmp_path / "a")
    b = run_trial(cfg(synth_dir), tmp_path / "b")
    pa = pd.read_parquet(tmp_path / "a" / PREDICTIONS)
    pb = pd.read_parquet(tmp_path / "b" / PREDICTIONS)
    np.testing.assert_array_equal(pa["logit"].to_numpy(), pb["logit"].to_numpy())
    assert a.history == b.history
    run_trial(cfg(synth_dir, seed=1), tmp_path / "c")
    assert not np.array_equal(pd.read_parquet(tmp_path / "c" / PREDICTIONS)["logit"], pa["logit"])


def test_divergence_is_recorded_not_raised(synth_dir, tmp_path):
    res = run_trial(cfg(synth_dir, lr=1e30, epochs=3), tmp_path / "d")
    assert res.status == "diverged"
    summary = json.loads((tmp_path / "d" / SUMMARY).read_text())
    assert summary["status"] == "diverged" and summary["epochs_run"] < 3


def test_saved_model_reproduces_predictions(synth_dir, tmp_path):
    from skinsweep.data.cache import build_cache
    from skinsweep.data.index import load_index
    from skinsweep.data.transforms import eval_transform

    run_trial(cfg(synth_dir, backbone="tiny_clip"), tmp_path / "t")
    model, meta = load_trial_model(tmp_path / "t")
    preds = pd.read_parquet(tmp_path / "t" / PREDICTIONS)
    test = preds[preds["split"] == "test"]
    cache = build_cache(load_index(synth_dir), size=meta["image_size"], policy=meta["resize_policy"])
    from skinsweep.data.transforms import DataConfig

    x = eval_transform(DataConfig.from_dict(meta["data_config"]))(torch.from_numpy(cache.get(test["image_id"].tolist())))
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(logits, test["logit"].to_numpy(), atol=1e-5)


def test_same_trial_is_reused_different_trial_refused(synth_dir, tmp_path):
    first = run_trial(cfg(synth_dir, epochs=1), tmp_path / "t")
    again = run_trial(cfg(synth_dir, epochs=1), tmp_path / "t")
    assert again.summary["runtime_s"] == first.summary["runtime_s"]  # read back, not retrained
    with pytest.raises(ConfigError, match=r"already holds a different trial .*--overwrite"):
        run_trial(cfg(synth_dir, epochs=1, lr=5e-4), tmp_path / "t")
    assert json.loads((tmp_path / "t" / SUMMARY).read_text())["config_hash"] == first.summary["config_hash"]
    replaced = run_trial(cfg(synth_dir, epochs=1, lr=5e-4), tmp_path / "t", overwrite=True)
    assert replaced.summary["config_hash"] != first.summary["config_hash"]


@pytest.mark.parametrize("kw, error, message", [
    ({"lr": 0}, ConfigError, r"\[lr\] Input should be greater than 0"),
    ({"epochs": 0}, ConfigError, r"\[epochs\] Input should be greater than or equal to 1"),
    ({"mode": "probe"}, ConfigError, r"\[mode\] Input should be 'finetune' or 'linear_probe'"),
    ({"select_metric": "f2"}, ConfigError, r"\[select_metric\] .*unknown metric 'f2'"),
    ({"colour": "red"}, ConfigError, r"\[colour\] unknown field"),
])
def test_invalid_options(synth_dir, kw, error, message):
    with pytest.raises(error, match=message):
        cfg(synth_dir, **kw)


def test_unknown_backbone_and_mismatched_split(synth_dir, tmp_path, isic_dir):
    with pytest.raises(BackboneError, match=r"unknown backbone 'tiny_resnt'.*tiny_resnet"):
        run_trial(cfg(synth_dir, backbone="tiny_resnt"), tmp_path / "x")
    from skinsweep.data.index import load_index
    from skinsweep.data.split import make_split

    other = make_split(load_index(isic_dir)).save(tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"does not match dataset"):
        run_trial(cfg(synth_dir, split=str(other)), tmp_path / "y")


def test_train_cli(synth_dir, tmp_path):
    from typer.testing import CliRunner

    from skinsweep.cli import app

    r = CliRunner().invoke(app, ["train", "--data", str(synth_dir), "--out", str(tmp_path / "o"), "--backbone",
                                 "tiny_resnet", "--epochs", "1", "--image-size", "32", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    assert "completed" in r.output and "auc" in r.output and (tmp_path / "o" / PREDICTIONS).is_file()
    r = CliRunner().invoke(app, ["train", "--data", str(synth_dir), "--out", str(tmp_path / "o"), "--lr", "-1"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "[lr]" in r.output


# --------------------------------------------------------------------------------------------------
# Wider search space (#11): onecycle, label smoothing, flips/light augmentation, TTA
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total, warmup", [(100, 0), (57, 0), (33, 5), (120, 40), (7, 0), (2, 0)])
def test_onecycle_matches_torch_one_cycle_lr(total, warmup):
    from skinsweep.train.loop import lr_factor

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total,
                                                **({"pct_start": warmup / total} if warmup else {}))
    ours, theirs = [], []
    for step in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(lr_factor(step, total, warmup, "onecycle"))
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    if total >= 10:  # (with 2 steps OneCycleLR itself never reaches lr/25 or lr)
        assert ours[0] == pytest.approx(1 / 25) and max(ours) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_label_smoothing_targets(synth_dir, loss):
    from torchvision.ops import sigmoid_focal_loss

    from skinsweep.train.loop import loss_fn

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, generator=g), (torch.rand(64, generator=g) < 0.3).float()
    c = cfg(synth_dir, loss=loss, label_smoothing=0.1)
    soft = y * 0.9 + 0.05
    ref = (sigmoid_focal_loss(logits, soft, alpha=8 / 9, gamma=2.0, reduction="mean") if loss == "focal" else
           torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, pos_weight=torch.tensor(8.0)))
    torch.testing.assert_close(loss_fn(logits, y, c), ref)
    plain = loss_fn(logits, y, cfg(synth_dir, loss=loss))
    torch.testing.assert_close(loss_fn(logits, y, c, smoothing=0.0), plain)
    assert abs(float(plain - ref)) > 1e-3
    with pytest.raises(ConfigError, match=r"\[label_smoothing\]"):
        cfg(synth_dir, label_smoothing=0.5)


def test_new_fields_keep_old_config_hashes(synth_dir):
    """Fields added later are out of the hash at their defaults: trials that ran before keep their ids."""
    from skinsweep.train.config import parse_config as parse

    old = parse(dict(data="d", backbone="tiny_resnet", epochs=2))
    assert old.hash == "ce337ec42877a458"  # computed before label_smoothing and tta existed
    assert parse(dict(data="d", backbone="tiny_resnet", epochs=2, tta="flips")).hash != old.hash
    assert parse(dict(data="d", backbone="tiny_resnet", epochs=2, label_smoothing=0.1)).hash != old.hash


def test_config_hash_depends_on_split_content_not_its_path(synth_dir, tmp_path):
    """Each node of a cluster reads the sweep's manifest from its own cache folder: the same trial must
    hash the same there (and be reused, not retrained, from its folder), a different split must not."""
    import shutil

    from skinsweep.data.index import load_index
    from skinsweep.data.split import make_split

    index = load_index(synth_dir)
    node_a = make_split(index, seed=0).save(tmp_path / "node_a" / "cache" / "sweep-x.parquet")
    node_b = tmp_path / "node_b" / "elsewhere" / "copy.parquet"
    node_b.parent.mkdir(parents=True)
    shutil.copy(node_a, node_b)
    other = make_split(index, seed=7).save(tmp_path / "other.parquet")

    a, b, c = (cfg(synth_dir, epochs=1, split=str(p)) for p in (node_a, node_b, other))
    assert a.split != b.split and a.hash == b.hash
    assert c.hash != a.hash
    assert a.hash != cfg(synth_dir, epochs=1).hash  # an explicit manifest is not the default split
    first = run_trial(a, tmp_path / "t")
    again = run_trial(b, tmp_path / "t")  # the other node, its own copy of the manifest
    assert again.summary["runtime_s"] == first.summary["runtime_s"]  # read back, not retrained
    assert again.summary["config_hash"] == first.summary["config_hash"] == a.hash
    with pytest.raises(ConfigError, match="already holds a different trial"):
        run_trial(c, tmp_path / "t")
    # a folder written before the split counted by content recorded the path-based hash: still reused
    summary = json.loads((tmp_path / "t" / SUMMARY).read_text())
    assert a.path_hash != a.hash
    (tmp_path / "t" / SUMMARY).write_text(json.dumps({**summary, "config_hash": a.path_hash}))
    assert run_trial(a, tmp_path / "t").summary["runtime_s"] == first.summary["runtime_s"]
    with pytest.raises(ConfigError, match="already holds a different trial"):
        run_trial(b, tmp_path / "t")  # the old hash named node A's path: node B's copy cannot tell


def _plain_and_tta_logits(out, synth_dir, ids, tta):
    """The trial's saved model on the cached test images: plain logits and the mean over its TTA views."""
    from skinsweep.data.cache import build_cache
    from skinsweep.data.index import load_index
    from skinsweep.data.transforms import DataConfig, eval_transform

    model, meta = load_trial_model(out)
    cache = build_cache(load_index(synth_dir), size=meta["image_size"], policy=meta["resize_policy"])
    x = eval_transform(DataConfig.from_dict(meta["data_config"]))(torch.from_numpy(cache.get(ids)))
    views = {"flips": [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)],
             "dihedral": [torch.rot90(x, k, (2, 3)).flip(-1) if f else torch.rot90(x, k, (2, 3))
                          for k in range(4) for f in (0, 1)]}[tta]
    with torch.no_grad():
        return model(x).numpy(), torch.stack([model(v) for v in views]).mean(0).numpy()


def test_onecycle_smoothing_flips_and_tta_trial(synth_dir, tmp_path):
    """One trial with the new options: TTA scores only the selected epoch, and is recorded everywhere;
    val losses are on the true labels; the flips augmentation and onecycle schedule run."""
    out = tmp_path / "t"
    seen = []
    c = cfg(synth_dir, epochs=2, schedule="onecycle", augment="flips", label_smoothing=0.2, tta="flips")
    res = run_trial(c, out, callback=seen.append)
    assert res.status == "completed" and res.summary["augment"] == "flips" and res.summary["tta"] == "flips"
    assert json.loads((out / MODEL_JSON).read_text())["tta"] == "flips"
    preds = pd.read_parquet(out / PREDICTIONS)
    assert (preds["tta_used"] == "flips").all()
    # final scoring: stored logits are the mean over the 4 flips (and differ from the plain logits)
    for split in ("val", "test"):
        p = preds[preds["split"] == split]
        plain, tta = _plain_and_tta_logits(out, synth_dir, p["image_id"].tolist(), "flips")
        np.testing.assert_allclose(p["logit"].to_numpy(), tta, atol=1e-5)
        assert np.abs(plain - tta).max() > 1e-4
        # reported losses: the plain (unsmoothed) loss of the stored logits on the true labels
        w = np.where(p["label"] == 1, 8.0, 1.0)
        z, lab = p["logit"].to_numpy().astype(np.float64), p["label"].to_numpy()
        bce = np.mean(w * lab * np.logaddexp(0, -z) + (1 - lab) * np.logaddexp(0, z))
        assert res.summary[split]["loss"] == pytest.approx(bce, rel=1e-5)
        if split == "val":  # the per-epoch validation of the selected epoch was without TTA
            pv = float(torch.nn.functional.binary_cross_entropy_with_logits(
                torch.from_numpy(plain), torch.from_numpy(lab.astype(np.float32)), pos_weight=torch.tensor(8.0)))
            assert seen[res.best_epoch - 1]["val_loss"] == pytest.approx(pv, rel=1e-5)


def test_cached_linear_probe_with_tta_embeds_the_views(synth_dir, tmp_path):
    res = run_trial(cfg(synth_dir, backbone="tiny_vit", mode="linear_probe", tta="dihedral"), tmp_path / "p")
    assert res.summary["embedding_cache"] == "miss" and res.summary["tta"] == "dihedral"
    test = pd.read_parquet(tmp_path / "p" / PREDICTIONS).query("split == 'test'")
    _, tta = _plain_and_tta_logits(tmp_path / "p", synth_dir, test["image_id"].tolist(), "dihedral")
    np.testing.assert_allclose(test["logit"].to_numpy(), tta, atol=1e-5)


@pytest.mark.parametrize("augment", ["light"])
def test_light_augmentation_trains(synth_dir, tmp_path, augment):
    res = run_trial(cfg(synth_dir, epochs=1, augment=augment), tmp_path / "a")
    assert res.status == "completed" and res.summary["augment"] == augment
