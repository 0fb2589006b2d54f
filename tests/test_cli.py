"""The CLI: commands call the library, print tables, and turn user errors into one line + exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import shared
from skinsweep.cli import app
from skinsweep.data.split import SplitManifest

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
