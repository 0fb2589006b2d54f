"""The CLI: commands call the library, print tables, and turn user errors into one line + exit 2."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from conftest import shared
from skinsweep.cli import app
from skinsweep.data.split import SplitManifest
from skinsweep.errors import SkinsweepError
from skinsweep.train.config import TrialConfig

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_data_split_writes_manifest_and_prints_table(isic_dir, tmp_path):
    out = tmp_path / "split.parquet"
    r = run("data", "split", isic_dir, "--out", out, "--seed", "3")
    assert r.exit_code == 0, r.output
    m = SplitManifest.load(out)
    assert m.meta["seed"] == 3 and m.hash in r.output
    assert "no lesion has images in two splits" in r.output
    for word in ("train", "val", "test", "prevalence", "lesions"):
        assert word in r.output


def test_data_split_image_mode_warns_about_leak(isic_dir, tmp_path):
    r = run("data", "split", isic_dir, "--mode", "image", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    assert "image mode" in r.output


def test_data_inspect(isic_dir):
    r = run("data", "inspect", isic_dir)
    assert r.exit_code == 0, r.output
    assert "60 images" in r.output and "melanomas" in r.output and "60x45" in r.output
    assert "leakage check" in r.output


def test_data_cache(isic_dir):
    r = run("data", "cache", isic_dir, "--size", "32", "--policy", "center-crop")
    assert r.exit_code == 0, r.output
    assert "60 images at 32×32 (center-crop)" in r.output


@pytest.mark.parametrize("args, message", [
    (["data", "split", "/no/such/dir"], "dataset not found"),
    (["data", "split", "{isic}", "--fractions", "0.5,0.5,0.5"], "summing to 1"),
    (["data", "split", "{isic}", "--mode", "official"], "official split needs"),
    (["data", "split", "{isic}", "--positive", "XYZ"], "no positives"),
    (["data", "inspect", "{isic}", "--split", "/no/split.parquet"], "split manifest not found"),
    (["data", "cache", "{isic}", "--policy", "stretch"], "unknown resize policy"),
])
def test_user_errors_are_one_line_exit_2(isic_dir, args, message):
    r = run(*[a.format(isic=isic_dir) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert r.output.strip().startswith("error:")


def test_skip_bad_reports_what_was_dropped(isic_dir, tmp_path):
    (isic_dir / "ISIC2018_Task3_Training_Input" / "ISIC_0024306.jpg").write_bytes(b"junk")
    r = run("data", "split", isic_dir, "--out", tmp_path / "s.parquet")
    assert r.exit_code == 2 and "cannot be decoded" in r.output
    r = run("data", "split", isic_dir, "--out", tmp_path / "s.parquet", "--skip-bad")
    assert r.exit_code == 0, r.output
    assert "dropped 1 images" in r.output and "ISIC_0024306" in r.output
    m = SplitManifest.load(tmp_path / "s.parquet")
    assert len(m.df) == 59 and m.meta["dropped_images"][0]["image_id"] == "ISIC_0024306"


@pytest.mark.slow
@pytest.mark.realdata
def test_inspect_real_images():
    r = run("data", "inspect", shared("ham10000_200x150"))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "10,015 images" in text and "1,113 melanomas (11.1%) from 614 lesions" in text
    assert "no lesion has images in two splits" in text


# ---- train: every TrialConfig field through --set / --config, short forms, help from the model ----------
def test_train_help_lists_every_setting_from_the_model():
    r = run("train", "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for name, field in TrialConfig.model_fields.items():
        default = "required" if field.is_required() else json.dumps(field.default)
        assert f"{name} = {default}: {' '.join(field.description.split())}" in text


def test_train_settings_from_config_short_forms_and_set(tmp_path, monkeypatch):
    import skinsweep.train.loop as loop

    seen = {}

    def fake_run_trial(cfg, out_dir, **kwargs):
        seen["cfg"] = cfg
        raise SkinsweepError("stopped before training")

    monkeypatch.setattr(loop, "run_trial", fake_run_trial)
    (tmp_path / "t.yaml").write_text("data: /d\nlr: 1.0e-3\nepochs: 2\nhead: mlp\nbackbone_args: {input_size: 32}\n")
    r = run("train", "--out", tmp_path / "o", "--config", tmp_path / "t.yaml", "--data", "/my data: x", "--lr", "2e-3",
            "--set", "epochs=5", "--set", "weight_decay=1e-4", "--backbone-arg", "pretrained=false", "--epochs", "3")
    assert r.exit_code == 2 and "stopped before training" in r.output, r.output
    cfg = seen["cfg"]
    assert (cfg.data, cfg.lr, cfg.epochs, cfg.weight_decay, cfg.head, cfg.backbone_args) == (
        "/my data: x", 2e-3, 5, 1e-4, "mlp", {"input_size": 32, "pretrained": False})  # --set wins over --epochs


@pytest.mark.parametrize("args, line", [
    (["--set", "lrr=1"], r"skinsweep train: \[lrr\] unknown field \(did you mean lr\?\); valid: data, .*, lr, .* "
                         r"\(from --set lrr=1\)"),
    (["--set", "no_such_field=1"], r"skinsweep train: \[no_such_field\] unknown field; valid: data, split, .*, "
                                   r"eval_batch_size \(from --set no_such_field=1\)"),
    (["--data", "d", "--epochs", "0"], r"skinsweep train: \[epochs\] Input should be greater than or equal to 1, got 0 "
                                       r"\(from --epochs 0\)"),
    (["--data", "d", "--set", "mode=probe"], r"skinsweep train: \[mode\] Input should be 'finetune' or 'linear_probe', "
                                             r"got 'probe' \(from --set mode=probe\)"),
    (["--set", "lr=1e-3"], r"skinsweep train: \[data\] required field is missing"),
    (["--config", "{tmp}/dup.yaml"], r"\S+dup\.yaml: invalid YAML at line 2, column 1: duplicate key 'lr'"),
    (["--config", "{tmp}/bad.yaml", "--set", "seed=1"], r"\S+bad\.yaml: \[lr\] Input should be greater than 0, got 0"),
])
def test_train_setting_errors_are_one_line(tmp_path, args, line):
    (tmp_path / "dup.yaml").write_text("lr: 1\nlr: 2\n")
    (tmp_path / "bad.yaml").write_text("data: d\nlr: 0\n")
    r = run("train", "--out", tmp_path / "o", *[a.format(tmp=tmp_path) for a in args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert re.fullmatch("error: " + line, lines[0]), lines[0]


def test_predict_out_prints_a_summary_not_rows(tiny_sweep, tiny_ensembles, tmp_path):
    import shutil

    import pandas as pd

    bundle = tiny_ensembles["stack"] / "bundle"
    folder = tmp_path / "new"
    folder.mkdir()
    files = sorted((tiny_sweep["data"] / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:25]
    for f in files:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "empty.png").write_bytes(b"")
    r = run("predict", bundle, folder, "--out", tmp_path / "p.csv")
    assert r.exit_code == 1, r.output  # two files could not be scored
    df = pd.read_csv(tmp_path / "p.csv")
    scored = df[df["error"].isna()]
    threshold = json.loads((bundle / "bundle.json").read_text())["threshold"]
    pos = int((scored["calibrated_prob"] >= threshold).sum())
    counts = {row[0].strip(): row[1].strip() for row in re.findall(r"│ ([^│]+?)\s+│\s+([\d,]+) │", r.output)}
    assert counts["images"] == "27" and counts["scored"] == "25"
    assert counts[f"positive (calibrated_prob ≥ {threshold:.4g})"] == str(pos) and counts["negative"] == str(25 - pos)
    assert counts["error: UnidentifiedImageError"] == "2"
    assert f"wrote 27 rows to {tmp_path / 'p.csv'}" in r.output and "2 of 27 files could not be scored" in r.output
    assert "ISIC_" not in r.output  # no per-image rows
    assert f"model card (intended use, test results, limitations): {bundle / 'MODEL_CARD.md'}" in r.output

    r = run("predict", bundle, folder)  # without --out: the first 20 rows
    assert r.exit_code == 1 and "showing 20 (--out FILE writes all)" in r.output
    assert len(re.findall(r"ISIC_\d+\.jpg", r.output)) == 20

    for out, message in [(tmp_path / "p.txt", "use a .csv or .parquet file name"),
                         (tmp_path / "no" / "p.csv", "does not exist); choose a writable folder")]:
        r = run("predict", bundle, folder, "--out", out)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], r.output
