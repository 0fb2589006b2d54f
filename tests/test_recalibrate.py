"""skinsweep recalibrate: on a prevalence-shifted synthetic site, a new calibrator and threshold lower the
ECE (out of fold, and on fresh images of that site) while the AUC stays exactly as it was; the new bundle
records its parent and data and keeps members and combiner untouched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import synth_site
from skinsweep.cli import app
from skinsweep.errors import ConfigError, DataError

N_BOOT = 200


@pytest.fixture(autouse=True)
def _shared_cache(tiny_sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(tiny_sweep["cache"]))


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Two independent samples of one shifted site (40% melanoma): B to calibrate on, C to check on."""
    base = tmp_path_factory.mktemp("sites")
    return (synth_site(base / "b", n=240, seed=31, first_id=300000),
            synth_site(base / "c", n=240, seed=32, first_id=400000))


@pytest.fixture(scope="module")
def recalibrated(tiny_ensembles, sites, tmp_path_factory):
    from skinsweep.ensemble.recalibrate import recalibrate_bundle

    out = tmp_path_factory.mktemp("recal") / "bundle"
    rep = recalibrate_bundle(tiny_ensembles["stack"] / "bundle", sites[0], out, method="temperature", n_boot=N_BOOT)
    return rep, out


def test_recalibration_lowers_ece_and_keeps_auc(recalibrated, tiny_ensembles, sites, tmp_path):
    from skinsweep.ensemble.evaluate import evaluate_bundle

    rep, new = recalibrated
    before, after = rep["before"]["ece"]["estimate"], rep["after"]["ece"]["estimate"]
    assert before > 0.1 and after < before / 2, (before, after)  # the shift is visible, and fixed out of fold
    assert rep["auc"]["deployed"] == pytest.approx(rep["auc"]["before"], abs=1e-12)  # a monotone map: same ranks
    assert rep["calibration"]["before"]["intercept"]["estimate"] > 0.5  # the bundle underestimates risk here
    assert abs(rep["calibration"]["after"]["intercept"]["estimate"]) < abs(rep["calibration"]["before"]["intercept"]["estimate"])
    # on fresh images of the same site: calibration better, AUC identical (same members, combiner, ranks)
    old = evaluate_bundle(tiny_ensembles["stack"] / "bundle", sites[1], out=tmp_path / "old", n_boot=N_BOOT, page=False)
    fixed = evaluate_bundle(new, sites[1], out=tmp_path / "new", n_boot=N_BOOT, page=False)
    assert fixed["metrics"]["ensemble"]["ece"]["estimate"] < old["metrics"]["ensemble"]["ece"]["estimate"] / 2
    assert fixed["metrics"]["ensemble"]["auc"]["estimate"] == pytest.approx(old["metrics"]["ensemble"]["auc"]["estimate"],
                                                                          abs=1e-12)
    assert "prevalence" in [f["kind"] for f in old["flags"]]
    assert "prevalence" not in [f["kind"] for f in fixed["flags"]]  # calibrated at this site's prevalence now
    p_old = pd.read_parquet(tmp_path / "old" / "predictions.parquet")
    p_new = pd.read_parquet(tmp_path / "new" / "predictions.parquet")
    np.testing.assert_allclose(p_new["ensemble_prob"], p_old["ensemble_prob"], atol=1e-12)  # combiner untouched


def test_after_sensitivity_is_out_of_fold(recalibrated, tiny_ensembles, sites, tmp_path):
    """The "after" operating point: every fold's images judged by a calibrator and threshold fitted on the
    other folds (recomputed here from the parent's scores), not by the threshold chosen on all rows, which
    meets the target sensitivity on those rows by construction."""
    from skinsweep.ensemble.calibrators import choose_threshold, make_calibrator
    from skinsweep.ensemble.estimator import crossfit_folds
    from skinsweep.ensemble.evaluate import evaluate_bundle

    rep, _ = recalibrated
    evaluate_bundle(tiny_ensembles["stack"] / "bundle", sites[0], out=tmp_path / "b", n_boot=N_BOOT, page=False)
    rows = pd.read_parquet(tmp_path / "b" / "predictions.parquet")
    y, p = rows["label"].to_numpy(int), rows["ensemble_prob"].to_numpy(float)
    z = np.log(p / (1 - p))
    target = rep["threshold"]["target_sensitivity"]
    decided = np.zeros(len(y), bool)
    for fit, score in crossfit_folds(y, rows["lesion_id"].to_numpy(), n_splits=rep["n_splits"], seed=rep["seed"]):
        cal = make_calibrator(rep["method"]).fit(z[fit], y[fit])
        decided[score] = cal.predict_proba(z[score]) >= choose_threshold(y[fit], cal.predict_proba(z[fit]),
                                                                         target_sensitivity=target)
    assert rep["after"]["recall"]["estimate"] == pytest.approx(decided[y == 1].mean(), abs=1e-9)
    assert rep["after"]["specificity"]["estimate"] == pytest.approx(1 - decided[y == 0].mean(), abs=1e-9)
    assert rep["after"]["recall"]["lo"] <= rep["after"]["recall"]["estimate"] <= rep["after"]["recall"]["hi"]


def test_new_bundle_records_parent_and_data(recalibrated, tiny_ensembles, sites):
    from skinsweep.ensemble.bundle import bundle_hash, load_bundle

    rep, new = recalibrated
    parent_dir = tiny_ensembles["stack"] / "bundle"
    parent, child = load_bundle(parent_dir), load_bundle(new)
    assert child.meta["parent"]["hash"] == bundle_hash(parent_dir) == rep["parent_hash"]
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["parent"]["hash"] == rep["parent_hash"] and manifest["calibrated_on"]["data"] == str(sites[0])
    assert child.meta["parent"]["calibrator"] == parent.meta["calibrator"]
    assert child.meta["calibrated_on"]["data"] == str(sites[0]) and child.meta["calibrated_on"]["method"] == "temperature"
    assert child.meta["calibrator"] != parent.meta["calibrator"] and child.threshold == rep["threshold"]["after"]
    assert child.meta["combiner"] == parent.meta["combiner"] and child.meta["members"] == parent.meta["members"]
    for f in parent_dir.glob("members/*/*"):
        assert (new / f.relative_to(parent_dir)).read_bytes() == f.read_bytes()
    assert child.meta["promised"]["metrics"]["recall"] == rep["after"]["recall"]
    record = child.training_images()
    assert (record["split"] == "calibration").sum() == 240 and len(record) == 240 + len(parent.training_images())
    assert json.loads((new / "recalibration.json").read_text())["parent_hash"] == rep["parent_hash"]
    # the manifest covers the new files
    d = json.loads((new / "bundle.json").read_text())
    d["threshold"] = 0.5
    (new.parent / "t").mkdir()
    tampered = new.parent / "t" / "b"
    shutil.copytree(new, tampered)
    (tampered / "bundle.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="modified after it was built"):
        load_bundle(tampered)


def test_recalibrated_bundle_flags_its_calibration_images(recalibrated, sites, tmp_path):
    from skinsweep.ensemble.evaluate import evaluate_bundle

    _, new = recalibrated
    ev = evaluate_bundle(new, sites[0], out=tmp_path / "e", n_boot=N_BOOT, page=False)
    assert ev["leakage"]["fit"] == 240 and ev["leakage"]["by_split"] == {"calibration": 240}


def test_cli_recalibrate_prints_before_and_after(tiny_ensembles, sites, tmp_path):
    r = CliRunner().invoke(app, ["recalibrate", str(tiny_ensembles["mean"] / "bundle"), str(sites[0]), "--out",
                                 str(tmp_path / "nb"), "--method", "platt", "--n-boot", str(N_BOOT)])
    assert r.exit_code == 0, r.output
    assert "before (parent)" in r.output and "ECE" in r.output and "calibration slope" in r.output
    assert "members and combiner unchanged" in r.output and (tmp_path / "nb" / "manifest.json").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "platypus"}, r"--method 'platypus' is not a calibrator \(did you mean platt\?\)"),
    ({"target_sensitivity": 1.5}, r"--target-sensitivity must be in \(0, 1\]"),
])
def test_bad_options(tiny_ensembles, sites, tmp_path, kwargs, message):
    from skinsweep.ensemble.recalibrate import recalibrate_bundle

    with pytest.raises(ConfigError, match=message):
        recalibrate_bundle(tiny_ensembles["stack"] / "bundle", sites[0], tmp_path / "x", **kwargs)


def test_out_must_be_a_new_folder(tiny_ensembles, sites, tmp_path):
    bundle = tiny_ensembles["stack"] / "bundle"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    run = CliRunner().invoke
    for target, message in ((bundle, "is the bundle being recalibrated"), (tmp_path / "notes", "exists and is not a bundle")):
        r = run(app, ["recalibrate", str(bundle), str(sites[0]), "--out", str(target)])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], r.output
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
