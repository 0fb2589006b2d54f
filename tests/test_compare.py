"""skinsweep compare: ΔAUC is the difference of the two AUCs, the p-value is delong_test's, the bootstrap is
paired; ensemble folders, evaluation folders and trial ids; mismatched image sets or splits are one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from conftest import synth_site
from skinsweep.cli import app
from skinsweep.ensemble.stats import delong_test
from skinsweep.errors import ConfigError
from skinsweep.metrics import expected_calibration_error, sensitivity_at_specificity

N_BOOT = 300


@pytest.fixture(autouse=True)
def _shared_cache(tiny_sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(tiny_sweep["cache"]))


def _test_rows(folder):
    p = pd.read_parquet(folder / "predictions.parquet")
    return p[p["split"] == "test"].set_index("image_id").sort_index()


def test_delta_auc_is_the_difference_and_p_is_delong(tiny_ensembles):
    from skinsweep.ensemble.compare import compare

    a, b = tiny_ensembles["stack"], tiny_ensembles["mean"]
    r = compare(a, b, split="test", n_boot=N_BOOT)
    ra, rb = _test_rows(a), _test_rows(b).loc[_test_rows(a).index]
    y, pa, pb = ra["label"].to_numpy(int), ra["calibrated_prob"].to_numpy(), rb["calibrated_prob"].to_numpy()
    assert r["n"]["images"] == len(y) and r["unit"] == "lesion"
    assert r["delta"]["auc"]["estimate"] == pytest.approx(roc_auc_score(y, pa) - roc_auc_score(y, pb), abs=1e-12)
    assert r["delta"]["ap"]["estimate"] == pytest.approx(
        average_precision_score(y, pa) - average_precision_score(y, pb), abs=1e-12)
    assert r["delta"]["ece"]["estimate"] == pytest.approx(
        expected_calibration_error(y, pa) - expected_calibration_error(y, pb), abs=1e-12)
    assert r["delta"]["sens_at_spec"]["estimate"] == pytest.approx(
        sensitivity_at_specificity(y, pa, 0.9) - sensitivity_at_specificity(y, pb, 0.9), abs=1e-12)
    dl = delong_test(y, pa, pb)
    assert r["delong"]["p_value"] == pytest.approx(dl["p_value"], abs=1e-12)
    assert r["delong"]["diff"] == pytest.approx(r["delta"]["auc"]["estimate"], abs=1e-12)
    for m in ("auc", "ap", "sens_at_spec", "ece"):
        assert r["delta"][m]["lo"] <= r["delta"][m]["hi"]
    # paired and antisymmetric: B vs A is the mirror image, with the same p-value
    s = compare(b, a, split="test", n_boot=N_BOOT)
    assert s["delong"]["p_value"] == pytest.approx(r["delong"]["p_value"], abs=1e-12)
    for m in ("auc", "ap", "sens_at_spec", "ece"):
        assert s["delta"][m]["estimate"] == pytest.approx(-r["delta"][m]["estimate"], abs=1e-12)
        assert s["delta"][m]["lo"] == pytest.approx(-r["delta"][m]["hi"], abs=1e-12)


def test_a_model_against_itself_is_no_difference(tiny_ensembles):
    from skinsweep.ensemble.compare import compare

    r = compare(tiny_ensembles["stack"], tiny_ensembles["stack"], n_boot=N_BOOT)
    assert r["delong"]["p_value"] == 1.0
    assert all(r["delta"][m]["lo"] == r["delta"][m]["hi"] == 0 for m in ("auc", "ap", "sens_at_spec", "ece"))


def test_trial_ids_of_one_sweep(tiny_sweep):
    from skinsweep.ensemble.compare import compare
    from skinsweep.results import load

    r = compare("t1", "t2", split="val", results=tiny_sweep["results"], n_boot=N_BOOT)
    p = load(tiny_sweep["results"]).predictions.query("split == 'val'")
    wide = p.pivot(index="image_id", columns="trial_id", values="prob")
    y = p.drop_duplicates("image_id").set_index("image_id").loc[wide.index, "label"].to_numpy(int)
    assert r["delta"]["auc"]["estimate"] == pytest.approx(roc_auc_score(y, wide["t1"]) - roc_auc_score(y, wide["t2"]),
                                                          abs=1e-12)
    assert r["delong"]["p_value"] == pytest.approx(delong_test(y, wide["t1"], wide["t2"])["p_value"], abs=1e-12)


def test_evaluation_folders_of_two_bundles_on_the_same_data(tiny_ensembles, tmp_path):
    from skinsweep.ensemble.compare import compare
    from skinsweep.ensemble.evaluate import evaluate_bundle

    site = synth_site(tmp_path / "site", n=120, seed=41, first_id=500000)
    for name in ("stack", "mean"):
        evaluate_bundle(tiny_ensembles[name] / "bundle", site, out=tmp_path / name, n_boot=100, page=False)
    r = compare(tmp_path / "stack", tmp_path / "mean", split="all", n_boot=N_BOOT)
    a, b = (pd.read_parquet(tmp_path / n / "predictions.parquet").set_index("image_id") for n in ("stack", "mean"))
    y = a["label"].to_numpy(int)
    assert r["n"]["images"] == 120 and r["a"]["name"] == "stack on site"
    assert r["delta"]["auc"]["estimate"] == pytest.approx(
        roc_auc_score(y, a["calibrated_prob"]) - roc_auc_score(y, b.loc[a.index, "calibrated_prob"]), abs=1e-12)
    # an evaluation on other images than an ensemble's test split: a one-line error naming both
    with pytest.raises(ConfigError, match=r"A and B scored different all images \(A stack on site: 120, B stack"):
        compare(tmp_path / "stack", tiny_ensembles["stack"], split="all")


def test_mismatches_are_one_line_errors(tiny_ensembles, tiny_sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_ensembles["mean"], other)
    rep = json.loads((other / "report.json").read_text())
    rep["split_hash"] = "0123456789abcdef"
    (other / "report.json").write_text(json.dumps(rep))
    fewer = tmp_path / "fewer"
    shutil.copytree(tiny_ensembles["mean"], fewer)
    p = pd.read_parquet(fewer / "predictions.parquet")
    drop = p[p["split"] == "test"]["image_id"].iloc[0]
    p[p["image_id"] != drop].to_parquet(fewer / "predictions.parquet")
    a = str(tiny_ensembles["stack"])
    cases = [
        ([a, str(other)], "A and B use different split manifests"),
        ([a, str(fewer)], f"only in A: 1 {drop}; only in B: 0"),
        ([a, str(tiny_ensembles["mean"] / "bundle")], "is a bundle, which holds no predictions: evaluate it first"),
        ([a, str(tmp_path)], "no report.json or evaluation.json"),
        (["t1", "t9", "--results", str(tiny_sweep["results"])], "B 't9' is not a trial of"),
        (["t1", "t2"], "is not a folder; pass an ensemble or evaluation folder, or a trial id with --results"),
        ([a, a, "--split", "tets"], "--split 'tets' is not a split (did you mean test?)"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(app, ["compare", *args, "--out", str(tmp_path / "c.json"), "--n-boot", "100"])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.output)
        assert lines[0].startswith("error:") and message in lines[0], (args, lines[0])


def test_cli_prints_a_table_and_writes_json(tiny_ensembles, tmp_path):
    r = CliRunner().invoke(app, ["compare", str(tiny_ensembles["stack"]), str(tiny_ensembles["mean"]), "--out",
                                 str(tmp_path / "c.json"), "--n-boot", str(N_BOOT)])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "c.json").read_text())
    assert "DeLong: ΔAUC" in r.output and f"p = {saved['delong']['p_value']:.3g}" in r.output
    assert "A − B [95% CI]" in r.output and set(saved["delta"]) == {"auc", "ap", "sens_at_spec", "ece"}
    assert np.isfinite(saved["delta"]["auc"]["estimate"])
