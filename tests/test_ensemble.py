"""Ensembles end to end on a small results store (tiny members trained here, no Ray): build, report,
plots, bundle round trip and tamper checks, predict with a corrupt file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinsweep.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tiny_sweep):
    """conftest's session-wide results store of four tiny trials (shared with the evaluate/compare tests)."""
    return tiny_sweep


@pytest.fixture(autouse=True)
def _shared_cache(sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(sweep["cache"]))


def recipe(tmp_path: Path, **sections) -> Path:
    body = {"name": "t", "members": {"rule": "best_per_backbone", "backbones": ["tiny_vit", "tiny_clip"]},
            "report": {"n_boot": 200}} | sections
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(body))
    return path


def test_build_report_plots_and_threshold(sweep, tmp_path):
    from skinsweep.ensemble.build import build_ensemble

    rep = build_ensemble(recipe(tmp_path), sweep["results"], out=tmp_path / "out", bundle=False)
    assert [m["backbone"] for m in rep["members"]] == ["tiny_vit", "tiny_clip"] or \
        sorted(m["backbone"] for m in rep["members"]) == ["tiny_clip", "tiny_vit"]
    assert "ensemble" in rep["test"] and len(rep["test"]) == 3
    for model, m in rep["test"].items():
        for k in ("auc", "ap", "accuracy", "precision", "recall", "specificity", "f1", "ece", "brier", "sens_at_spec"):
            assert k in m, (model, k)
            # ECE is biased upwards under resampling, so its interval may sit above the estimate
            if k != "ece" and m[k]["estimate"] is not None and m[k]["lo"] is not None:
                assert m[k]["lo"] - 1e-9 <= m[k]["estimate"] <= m[k]["hi"] + 1e-9, (model, k)
    assert 0 <= rep["delong_vs_best"]["p_value"] <= 1
    for f in ("roc.png", "pr.png", "reliability.png", "confusion.png"):
        with Image.open(tmp_path / "out" / f) as im:
            assert im.format == "PNG" and im.size[0] > 200
    preds = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert set(preds["split"]) == {"val", "test"}
    assert {"ensemble_prob", "calibrated_prob", "decision"} <= set(preds.columns)
    # the threshold (chosen on validation) reaches the target sensitivity there
    val = preds[(preds["split"] == "val") & (preds["label"] == 1)]
    assert (val["calibrated_prob"] >= rep["threshold"]).mean() >= 0.95
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["threshold"] == pytest.approx(rep["threshold"])


@pytest.mark.parametrize("combiner", ["mean_prob", "mean_logit", "stacking"])
@pytest.mark.parametrize("calibration", ["none", "temperature", "platt", "isotonic"])
def test_each_combiner_and_calibrator(sweep, tmp_path, combiner, calibration):
    import warnings

    from skinsweep.ensemble.build import build_ensemble

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isotonic warns about few positives on this small set
        rep = build_ensemble(recipe(tmp_path, combiner={"type": combiner}, calibration={"method": calibration},
                                    members={"rule": "top_k", "k": 2}),
                             sweep["results"], out=tmp_path / "o", bundle=False)
    assert rep["test"]["ensemble"]["auc"]["estimate"] is not None


def test_greedy_selection_recipe(sweep, tmp_path):
    from skinsweep.ensemble.build import build_ensemble

    rep = build_ensemble(ROOT / "ensembles" / "best.yaml", sweep["results"], out=tmp_path / "g", bundle=False,
                         overrides=["report.n_boot=200"])
    w = [m["weight"] for m in rep["members"]]
    assert len(w) >= 1 and abs(sum(w) - 1) < 1e-9 and min(w) > 0


def test_bundle_round_trip_and_tamper(sweep, tmp_path):
    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.ensemble.build import build_ensemble

    rep = build_ensemble(recipe(tmp_path), sweep["results"], out=tmp_path / "e")
    bundle_dir = Path(rep["bundle"])
    preds = pd.read_parquet(tmp_path / "e" / "predictions.parquet")
    test = preds[preds["split"] == "test"].head(12)
    paths = [str(next((sweep["data"] / "ISIC2018_Task3_Training_Input").glob(f"{i}.jpg"))) for i in test["image_id"]]
    out = load_bundle(bundle_dir).predict(paths)
    # what is deployed is what was evaluated
    np.testing.assert_allclose(out["calibrated_prob"].to_numpy(), test["calibrated_prob"].to_numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["decision"].to_numpy(), test["decision"].to_numpy())

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    ck = next(tampered.glob("members/*/checkpoint.safetensors"))
    raw = bytearray(ck.read_bytes())
    raw[-1] ^= 0xFF
    ck.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="modified after it was built"):
        load_bundle(tampered)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(bundle_dir, incomplete)
    next(incomplete.glob("members/*/model.json")).unlink()
    with pytest.raises(DataError, match="incomplete"):
        load_bundle(incomplete)
    with pytest.raises(DataError, match="not a skinsweep bundle"):
        load_bundle(tmp_path)


def test_predict_cli_with_a_corrupt_file(sweep, tmp_path):
    from typer.testing import CliRunner

    from skinsweep.cli import app
    from skinsweep.ensemble.build import build_ensemble

    rep = build_ensemble(recipe(tmp_path), sweep["results"], out=tmp_path / "e")
    folder = tmp_path / "new"
    folder.mkdir()
    for f in sorted((sweep["data"] / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:4]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    r = CliRunner().invoke(app, ["predict", rep["bundle"], str(folder), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 1, r.output
    df = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == 5 and df["error"].notna().sum() == 1
    assert df.loc[df["image"].str.endswith("broken.jpg"), "calibrated_prob"].isna().all()
    assert df["calibrated_prob"].notna().sum() == 4 and "1 of 5 files could not be scored" in r.output


META = ["age", "sex", "site"]


@pytest.fixture(scope="module")
def meta_bundle(sweep, tmp_path_factory):
    """An ensemble whose stacker uses age, sex and site (from the synthetic HAM10000_metadata.csv)."""
    from skinsweep.ensemble.build import build_ensemble

    out = tmp_path_factory.mktemp("meta") / "e"
    rep = build_ensemble(recipe(out.parent, combiner={"type": "stacking", "metadata": META}), sweep["results"], out=out)
    return rep, pd.read_parquet(out / "predictions.parquet")


def _image_paths(sweep, ids) -> list[str]:
    return [str(sweep["data"] / "ISIC2018_Task3_Training_Input" / f"{i}.jpg") for i in ids]


def test_bundle_with_metadata_reproduces_the_report(sweep, meta_bundle, tmp_path):
    from skinsweep.ensemble.bundle import load_bundle

    rep, preds = meta_bundle
    assert rep["metadata"]["features"] == META and json.loads(Path(rep["bundle"], "bundle.json").read_text())["metadata"]
    b = load_bundle(rep["bundle"])
    assert b.metadata_features == META
    rows = preds[preds["split"] == "test"].head(16)  # val rows are stored out-of-fold, by design
    paths = _image_paths(sweep, rows["image_id"])
    meta = pd.read_csv(sweep["data"] / "HAM10000_metadata.csv")  # image_id, age, sex, localization, ...
    out = b.predict(paths, metadata=meta)
    # what is deployed is what was evaluated, metadata included
    np.testing.assert_allclose(out["calibrated_prob"].to_numpy(), rows["calibrated_prob"].to_numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["decision"].to_numpy(), rows["decision"].to_numpy())
    assert not out["metadata_missing"].any()
    # the metadata are used: scoring every image as unknown changes the scores, and says so
    blank = b.predict(paths, metadata=meta.head(0))
    assert blank["metadata_missing"].all()
    assert np.abs(blank["ensemble_prob"].to_numpy() - out["ensemble_prob"].to_numpy()).max() > 1e-4
    with pytest.raises(ConfigError, match=r"stacks patient metadata \(age, sex, site\).*metadata="):
        b.predict(paths)
    # the encoder's JSON is covered by the manifest
    tampered = tmp_path / "tampered"
    shutil.copytree(rep["bundle"], tampered)
    d = json.loads((tampered / "bundle.json").read_text())
    d["metadata"]["state"]["age_mean"] += 1.0
    (tampered / "bundle.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="modified after it was built"):
        load_bundle(tampered)


def test_predict_cli_with_metadata(sweep, meta_bundle, tmp_path):
    from typer.testing import CliRunner

    from skinsweep.cli import app

    rep, preds = meta_bundle
    test = preds[preds["split"] == "test"].head(4)
    folder = tmp_path / "new"
    folder.mkdir()
    for p in _image_paths(sweep, test["image_id"]):
        shutil.copy(p, folder)
    meta = pd.read_csv(sweep["data"] / "HAM10000_metadata.csv")
    first = test["image_id"].iloc[0]
    meta[meta["image_id"] != first].to_csv(tmp_path / "meta.csv", index=False)
    run = CliRunner().invoke
    r = run(app, ["predict", rep["bundle"], str(folder), "--metadata", str(tmp_path / "meta.csv"),
                  "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    assert "1 of 4 images have no row in" in r.output
    df = pd.read_csv(tmp_path / "p.csv").set_index(test["image_id"].to_numpy())  # files sorted = ids sorted
    assert df["metadata_missing"].tolist() == [True, False, False, False]
    np.testing.assert_allclose(df["calibrated_prob"].iloc[1:], test["calibrated_prob"].iloc[1:], atol=1e-5)

    r = run(app, ["predict", rep["bundle"], str(folder)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "stacks patient metadata" in lines[0] and "--metadata" in lines[0]
    meta[["image_id", "age"]].to_csv(tmp_path / "bad.csv", index=False)
    r = run(app, ["predict", rep["bundle"], str(folder), "--metadata", str(tmp_path / "bad.csv")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1
    assert f"{tmp_path / 'bad.csv'}: missing column(s) sex, localization; expected image_id, age, sex, localization" in lines[0]


@pytest.mark.parametrize("section, message", [
    ({"members": {"rule": "explicit"}}, r"rule explicit needs"),
    ({"members": {"rule": "best_per_backbone", "by": "test_auc"}}, r"validation metrics only"),
    ({"threshold": {"target_sensitivity": 0.9, "youden": True}}, r"choose one of"),
    ({"calibration": {"method": "beta"}}, r"\[calibration.method\]"),
    ({"colour": 1}, r"\[colour\] unknown field; valid: name, members"),
])
def test_invalid_ensemble_recipes(tmp_path, section, message):
    from skinsweep.ensemble.build import load_ensemble_recipe

    with pytest.raises(ConfigError, match=message):
        load_ensemble_recipe(recipe(tmp_path, **section))


def test_members_must_share_images_and_split():
    from skinsweep.ensemble.build import aligned_logits

    rows = [{"image_id": f"i{k}", "lesion_id": None, "label": k % 2, "dx": "NV", "logit": 0.1 * k, "split": "val",
             "trial_id": t, "split_hash": h} for t, h in (("a", "h1"), ("b", "h2")) for k in range(6)]
    with pytest.raises(ConfigError, match="members used different splits"):
        aligned_logits(pd.DataFrame(rows), ["a", "b"], "val")
    rows = [r | {"split_hash": "h"} for r in rows if not (r["trial_id"] == "b" and r["image_id"] == "i0")]
    with pytest.raises(ConfigError, match="members scored different val images"):
        aligned_logits(pd.DataFrame(rows), ["a", "b"], "val")


def test_build_reads_only_the_candidates_prediction_files(sweep, tmp_path):
    """At scale (issue #14: 2,000 trials) ensemble build must not read every trial's predictions: a
    corrupt predictions file of a trial that is not a candidate (t0, tiny_resnet) is never opened."""
    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.results import ResultsStore

    results = tmp_path / "s"
    shutil.copytree(sweep["results"], results)
    (results / "predictions" / "t0.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception):  # the file really is unreadable: reading the whole store fails
        ResultsStore(results).predictions()
    rep = build_ensemble(recipe(tmp_path), results, out=tmp_path / "out", bundle=False)
    assert sorted(m["backbone"] for m in rep["members"]) == ["tiny_clip", "tiny_vit"]
