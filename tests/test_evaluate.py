"""skinsweep evaluate: a bundle scored on labelled data; metrics equal scikit-learn's on its own predictions,
the bundle's own test split is reproduced, leakage into "external" data is found (and only then), bad input
is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score
from typer.testing import CliRunner

from conftest import synth_site
from skinsweep.cli import app
from skinsweep.errors import ConfigError, DataError

N_BOOT = 200


@pytest.fixture(autouse=True)
def _shared_cache(tiny_sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(tiny_sweep["cache"]))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A prevalence-shifted second site (40% melanoma, other ids)."""
    return synth_site(tmp_path_factory.mktemp("site") / "b")


@pytest.fixture(scope="module")
def evaluated(tiny_ensembles, site, tmp_path_factory):
    from skinsweep.ensemble.evaluate import evaluate_bundle

    out = tmp_path_factory.mktemp("ev") / "out"
    ev = evaluate_bundle(tiny_ensembles["stack"] / "bundle", site, out=out, n_boot=N_BOOT)
    return ev, pd.read_parquet(out / "predictions.parquet"), out


def test_metrics_equal_sklearn_on_its_own_predictions(evaluated):
    ev, preds, out = evaluated
    y, p, thr = preds["label"].to_numpy(int), preds["calibrated_prob"].to_numpy(float), ev["threshold"]
    m = ev["metrics"]["ensemble"]
    assert m["auc"]["estimate"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["ap"]["estimate"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["brier"]["estimate"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    tn, fp, fn, tp = confusion_matrix(y, (p >= thr).astype(int), labels=[0, 1]).ravel()
    assert m["recall"]["estimate"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"]["estimate"] == pytest.approx(tn / (tn + fp))
    assert (preds["decision"].to_numpy() == (p >= thr)).all()
    for col in [c for c in preds if c.startswith("prob_")]:  # every member, by its label
        label = next(k for k in ev["metrics"] if k.endswith("/" + col.removeprefix("prob_")))
        assert ev["metrics"][label]["auc"]["estimate"] == pytest.approx(roc_auc_score(y, preds[col]), abs=1e-12)
        assert "recall" not in ev["metrics"][label]  # members have no operating point of their own
    # calibration slope = unpenalised logistic regression of y on logit(p)
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)))
    lr = LogisticRegression(C=1e10, max_iter=10_000, tol=1e-10).fit(z[:, None], y)
    assert ev["calibration"]["slope"]["estimate"] == pytest.approx(lr.coef_[0, 0], rel=1e-4, abs=1e-4)
    # subgroups: by sex, sensitivity computed directly
    sex = {r["group"]: r for r in ev["subgroups"]["sex"]}
    for g, r in sex.items():
        sel = (preds["sex"].fillna("unknown") == g).to_numpy() & (y == 1)
        if sel.any():
            assert r["sensitivity"]["estimate"] == pytest.approx((p[sel] >= thr).mean())
    assert {r["group"] for r in ev["subgroups"]["dx"]} == set(preds["dx"])
    assert ev["unit"] == "lesion" and ev["n"]["images"] == len(preds) == 200
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["metrics"]["ensemble"]["auc"]["estimate"] == pytest.approx(m["auc"]["estimate"])
    assert (out / "index.html").is_file() and len(list((out / "img").glob("*.png"))) == 2
    assert "What a reviewer must know" in (out / "index.html").read_text()


def test_prevalence_shift_is_flagged_and_scores_match_the_bundle(evaluated, tiny_ensembles, site):
    from skinsweep.ensemble.bundle import load_bundle

    ev, preds, _ = evaluated
    kinds = [f["kind"] for f in ev["flags"]]
    assert "prevalence" in kinds and ev["prevalence"]["here"] == pytest.approx(0.4, abs=0.02)
    assert ev["leakage"]["checked"] and ev["leakage"]["fit"] == 0 and ev["leakage"]["test"] == 0
    assert "leakage" not in kinds and "own_test" not in kinds
    # decoded and scored exactly as the bundle does
    rows = preds.head(10)
    paths = [str(site / "ISIC2018_Task3_Training_Input" / f"{i}.jpg") for i in rows["image_id"]]
    direct = load_bundle(tiny_ensembles["stack"] / "bundle").predict(paths)
    np.testing.assert_allclose(direct["calibrated_prob"], rows["calibrated_prob"], atol=1e-5)  # other batches: float32 noise


def test_own_test_split_reproduces_the_ensemble_report(tiny_ensembles, tiny_sweep, tmp_path):
    from skinsweep.ensemble.evaluate import evaluate_bundle

    ens = tiny_ensembles["stack"]
    ev = evaluate_bundle(ens / "bundle", tiny_sweep["data"], split="test", out=tmp_path / "own", n_boot=N_BOOT,
                         page=False)
    rep = json.loads((ens / "report.json").read_text())
    assert ev["split_hash"] == rep["split_hash"]
    mine = pd.read_parquet(tmp_path / "own" / "predictions.parquet").set_index("image_id")
    theirs = pd.read_parquet(ens / "predictions.parquet").query("split == 'test'").set_index("image_id")
    assert set(mine.index) == set(theirs.index)
    np.testing.assert_allclose(mine.loc[theirs.index, "calibrated_prob"], theirs["calibrated_prob"], atol=1e-5)
    # its own test split: seen, but not used for fitting
    assert ev["leakage"]["fit"] == 0 and ev["leakage"]["test"] == len(mine)
    assert "own_test" in [f["kind"] for f in ev["flags"]]


def _csv_site(tmp_path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(tmp_path / "site.csv", index=False)
    return tmp_path / "site.csv"


def test_leakage_found_when_data_holds_training_images(tiny_ensembles, tiny_sweep, site, tmp_path):
    from skinsweep.ensemble.evaluate import evaluate_bundle

    bundle = tiny_ensembles["stack"] / "bundle"
    record = pd.read_parquet(bundle / "training_images.parquet")
    assert set(record["split"]) == {"train", "val", "test"} and record["sha256"].str.len().eq(64).all()
    train_dir = tiny_sweep["data"] / "ISIC2018_Task3_Training_Input"
    labels = record.set_index("image_id")["label"]
    same_id = record[record["split"] == "train"]["image_id"].head(5).tolist()
    renamed = record[record["split"] == "val"]["image_id"].head(3).tolist()  # same content, new id and name
    (tmp_path / "copies").mkdir()
    rows = [{"path": str(train_dir / f"{i}.jpg"), "label": int(labels[i]), "image_id": i} for i in same_id]
    for k, i in enumerate(renamed):
        shutil.copy(train_dir / f"{i}.jpg", tmp_path / "copies" / f"other_{k}.jpg")
        rows.append({"path": f"copies/other_{k}.jpg", "label": int(labels[i]), "image_id": f"OTHER_{k}"})
    meta = pd.read_csv(site / "HAM10000_metadata.csv").head(30)
    rows += [{"path": str(site / "ISIC2018_Task3_Training_Input" / f"{r.image_id}.jpg"),
              "label": int(r.dx == "mel"), "image_id": r.image_id} for r in meta.itertuples()]
    ev = evaluate_bundle(bundle, _csv_site(tmp_path, rows), out=tmp_path / "out", n_boot=N_BOOT, page=False)
    leak = ev["leakage"]
    assert leak["checked"] and leak["fit"] == 8 and leak["test"] == 0
    assert leak["same_id"] == 5 and leak["same_content_other_id"] == 3
    line = next(f["message"] for f in ev["flags"] if f["kind"] == "leakage")
    assert line.startswith("leakage: 8 of 38 images were used to fit this bundle (train 5, val 3")
    seen = pd.read_parquet(tmp_path / "out" / "predictions.parquet").set_index("image_id")["seen_by_bundle"]
    assert seen[same_id].eq("train").all() and seen[[f"OTHER_{k}" for k in range(3)]].eq("val").all()
    assert seen.drop(same_id + [f"OTHER_{k}" for k in range(3)]).isna().all()


def test_bundle_without_training_record_says_leakage_was_not_checked(tiny_ensembles, site, tmp_path):
    from skinsweep.ensemble.bundle import load_bundle, write_manifest
    from skinsweep.ensemble.evaluate import evaluate_bundle

    old = tmp_path / "old"
    shutil.copytree(tiny_ensembles["stack"] / "bundle", old)
    (old / "training_images.parquet").unlink()
    with pytest.raises(DataError, match="incomplete: missing training_images.parquet"):  # the manifest covers it
        load_bundle(old)
    meta = json.loads((old / "bundle.json").read_text())
    for k in ("training", "promised"):  # as bundles built before they were recorded
        meta.pop(k)
    (old / "bundle.json").write_text(json.dumps(meta))
    write_manifest(old)
    ev = evaluate_bundle(old, site, out=tmp_path / "out", n_boot=N_BOOT, page=True)
    assert not ev["leakage"]["checked"] and ev["prevalence"]["training"] is None
    assert [f["message"] for f in ev["flags"] if f["kind"] == "leakage_unchecked"] == [
        "leakage not checked: the bundle records no training images (built before skinsweep recorded them)"]
    assert "not recorded" in (tmp_path / "out" / "index.html").read_text()


def test_cli_evaluate_prints_flags_one_line_each(tiny_ensembles, site, tmp_path):
    r = CliRunner().invoke(app, ["evaluate", str(tiny_ensembles["stack"] / "bundle"), str(site), "--out",
                                 str(tmp_path / "e"), "--n-boot", str(N_BOOT)])
    assert r.exit_code == 0, r.output
    flags = [ln for ln in r.output.splitlines() if ln.startswith("flag:")]
    assert any("prevalence 40.0% here" in ln for ln in flags)
    assert "promised" in r.output and (tmp_path / "e" / "evaluation.json").is_file()


def test_skip_bad_counts_dropped_images(tiny_ensembles, site, tmp_path):
    bad = tmp_path / "site"
    shutil.copytree(site, bad)
    victim = sorted((bad / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    run = CliRunner().invoke
    args = ["evaluate", str(tiny_ensembles["stack"] / "bundle"), str(bad), "--out", str(tmp_path / "e"),
            "--n-boot", str(N_BOOT)]
    r = run(app, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "cannot be decoded" in lines[0] and "--skip-bad" in lines[0]
    r = run(app, args + ["--skip-bad"])
    assert r.exit_code == 0, r.output
    assert f"dropped 1 images (--skip-bad): {victim.stem}" in r.output
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["n"]["images"] == 199


@pytest.mark.parametrize("args, message", [
    (["evaluate", "{tmp}", "{site}"], "is not a skinsweep bundle"),
    (["evaluate", "{bundle}", "/no/such/data"], "dataset not found: /no/such/data"),
    (["evaluate", "{bundle}", "{site}", "--split", "tset"], "--split 'tset' is not a split (did you mean test?)"),
    (["evaluate", "{bundle}", "{nolabels}"], "needs a 'label' column"),
    (["evaluate", "{bundle}", "{badcols}"], "unknown column(s) colour"),
    (["evaluate", "{bundle}", "{site}", "--positive", "XYZ"], "no positives"),
])
def test_bad_input_is_one_line(tiny_ensembles, site, tmp_path, args, message):
    img = str(next((site / "ISIC2018_Task3_Training_Input").glob("*.jpg")))
    pd.DataFrame({"path": [img]}).to_csv(tmp_path / "nolabels.csv", index=False)
    pd.DataFrame({"path": [img], "label": [1], "colour": ["red"]}).to_csv(tmp_path / "badcols.csv", index=False)
    fill = {"tmp": tmp_path, "site": site, "bundle": tiny_ensembles["stack"] / "bundle",
            "nolabels": tmp_path / "nolabels.csv", "badcols": tmp_path / "badcols.csv"}
    r = CliRunner().invoke(app, [a.format(**fill) for a in args] + ["--out", str(tmp_path / "o")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error:") and message in lines[0]


def test_library_errors(tiny_ensembles, site):
    from skinsweep.ensemble.evaluate import evaluate_bundle

    with pytest.raises(ConfigError, match="prevalence-factor must be > 1"):
        evaluate_bundle(tiny_ensembles["stack"] / "bundle", site, prevalence_factor=0.5)


def test_metadata_bundle_reads_age_sex_site_from_the_data(tiny_sweep, site, tmp_path):
    import yaml

    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.ensemble.evaluate import evaluate_bundle
    from skinsweep.ensemble.metadata import without_metadata

    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "name": "meta", "members": {"rule": "best_per_backbone", "backbones": ["tiny_vit", "tiny_clip"]},
        "combiner": {"type": "stacking", "metadata": ["age", "sex", "site"]}, "report": {"n_boot": 100}}))
    rep = build_ensemble(tmp_path / "m.yaml", tiny_sweep["results"], out=tmp_path / "ens")
    ev = evaluate_bundle(rep["bundle"], site, out=tmp_path / "e", n_boot=N_BOOT, page=False)
    ham = pd.read_csv(site / "HAM10000_metadata.csv")
    blank = without_metadata(ham.rename(columns={"localization": "site"}), ["age", "sex", "site"])  # synth: ~0.6%
    assert ev["n"]["metadata_missing"] == blank.sum()
    assert ("metadata" in [f["kind"] for f in ev["flags"]]) == bool(blank.any())
    preds = pd.read_parquet(tmp_path / "e" / "predictions.parquet")
    preds = pd.concat([preds[preds["label"] == 1].head(4), preds[preds["label"] == 0].head(4)])
    paths = [str(site / "ISIC2018_Task3_Training_Input" / f"{i}.jpg") for i in preds["image_id"]]
    direct = load_bundle(rep["bundle"]).predict(paths, metadata=ham)
    np.testing.assert_allclose(direct["calibrated_prob"], preds["calibrated_prob"], atol=1e-5)
    # the same images as a CSV without metadata: scored as unknown, and said so
    pd.DataFrame({"path": paths, "label": preds["label"]}).to_csv(tmp_path / "plain.csv", index=False)
    ev = evaluate_bundle(rep["bundle"], tmp_path / "plain.csv", out=tmp_path / "p", n_boot=N_BOOT, page=False)
    line = next(f["message"] for f in ev["flags"] if f["kind"] == "metadata")
    assert line.startswith("8 of 8 images have none of the patient metadata")


def _ev(slope=(1.0, 0.9, 1.1), intercept=(0.0, -0.1, 0.1), sens=(0.95, 0.9, 0.99), promised=0.95) -> dict:
    ci = lambda t: dict(zip(("estimate", "lo", "hi"), t))
    return {"prevalence": {"here": 0.11, "training": 0.11},
            "calibration": {"slope": ci(slope), "intercept": ci(intercept)},
            "promised": {"metrics": {"recall": {"estimate": promised}}},
            "metrics": {"ensemble": {"recall": ci(sens)}}, "n": {"images": 100},
            "leakage": {"checked": True, "fit": 0, "test": 0}}


@pytest.mark.parametrize("changes, kinds, words", [
    ({}, [], None),
    ({"slope": (0.6, 0.4, 0.8)}, ["calibration_slope"], "too extreme"),
    ({"slope": (1.5, 1.2, 1.8)}, ["calibration_slope"], "too timid"),
    ({"slope": (0.6, 0.3, 1.05)}, [], None),                 # far from 1, but the CI holds 1
    ({"slope": (0.85, 0.8, 0.9)}, [], None),                 # the CI excludes 1, but within 1 ± 0.2
    ({"intercept": (0.9, 0.5, 1.3)}, ["calibration_intercept"], "underestimates"),
    ({"intercept": (-0.9, -1.3, -0.5)}, ["calibration_intercept"], "overestimates"),
    ({"sens": (0.80, 0.70, 0.90)}, ["sensitivity"], "below the 0.950 it promised"),
    ({"sens": (0.88, 0.78, 0.96)}, [], None),                # lower, but the CI reaches the promise
])
def test_calibration_and_sensitivity_flags(changes, kinds, words):
    from skinsweep.ensemble.evaluate import make_flags

    flags = make_flags(_ev(**changes))
    assert [f["kind"] for f in flags] == kinds
    if words:
        assert words in flags[0]["message"] and "\n" not in flags[0]["message"]
