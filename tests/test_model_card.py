"""Model cards: every bundle (built or recalibrated) carries model_card.json + MODEL_CARD.md under its manifest;
the card's numbers are the ensemble report's / recalibration report's; bundles built before cards get a
minimal card from bundle.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import synth_site
from skinsweep.errors import DataError

CARD_KEYS = ["name", "bundle_hash_note", "intended_use", "out_of_scope_use", "training_data", "members", "selection",
             "test_metrics", "calibration", "operating_point", "subgroups", "limitations", "generated_by"]


@pytest.fixture(autouse=True)
def _shared_cache(tiny_sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(tiny_sweep["cache"]))


@pytest.fixture(scope="module")
def built(tiny_ensembles):
    folder = tiny_ensembles["mean"]
    return folder, json.loads((folder / "report.json").read_text())


def test_a_built_bundle_has_both_card_files_under_its_manifest(built, tmp_path):
    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.ensemble.model_card import load_model_card

    folder, _ = built
    bundle = folder / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    assert {"model_card.json", "MODEL_CARD.md"} <= set(manifest)
    card = load_model_card(bundle)
    assert list(card) == CARD_KEYS and card["generated_by"]["minimal"] is False
    md = (bundle / "MODEL_CARD.md").read_text()
    for heading in ("## Intended use", "## Out-of-scope use", "## Training data", "## Members", "## Test metrics",
                    "## Calibration", "## Operating point", "## Subgroups", "## Known limitations"):
        assert heading in md
    assert "not a medical device" in md.lower()

    for name, edit in (("model_card.json", lambda d: d["operating_point"].update(threshold=0.5)),
                       ("MODEL_CARD.md", None)):
        tampered = tmp_path / name
        shutil.copytree(bundle, tampered)
        if edit is None:
            (tampered / name).write_text((tampered / name).read_text().replace("research tool", "diagnostic device"))
        else:
            d = json.loads((tampered / name).read_text())
            edit(d)
            (tampered / name).write_text(json.dumps(d))
        with pytest.raises(DataError, match=f"modified after it was built.*{name}"):
            load_bundle(tampered)
        with pytest.raises(DataError, match="modified after it was built"):
            load_model_card(tampered)


def test_card_numbers_are_the_reports(built):
    from skinsweep.ensemble.model_card import load_model_card
    from skinsweep.metrics import expected_calibration_error

    folder, rep = built
    card = load_model_card(folder / "bundle")
    ens = rep["test"]["ensemble"]
    for k in ("auc", "ap", "recall", "specificity", "ece", "brier"):
        assert card["test_metrics"]["ensemble"][k] == ens[k], k
    assert card["test_metrics"]["members"] == {m: {k: v for k, v in d.items()} for m, d in rep["test"].items()
                                                 if m != "ensemble"}
    assert card["test_metrics"]["n"] == rep["n"]["test"] and card["test_metrics"]["n_pos"] == rep["n"]["test_pos"]
    op = card["operating_point"]
    assert op["threshold"] == rep["threshold"] and op["rule"] == rep["threshold_rule"]
    assert op["test"]["sensitivity"] == ens["recall"] and op["test"]["specificity"] == ens["specificity"]
    assert card["calibration"]["method"] == rep["calibrator"]["kind"] == "platt"
    assert card["calibration"]["ece"]["val_before"] == rep["val"]["ensemble_uncalibrated"]["ece"]
    assert card["calibration"]["ece"]["val_after"] == rep["val"]["ensemble"]["ece"]
    preds = pd.read_parquet(folder / "predictions.parquet")
    test = preds[preds["split"] == "test"]
    assert card["calibration"]["ece"]["test_before"] == pytest.approx(
        expected_calibration_error(test["label"], test["ensemble_prob"]))
    assert [m["trial_id"] for m in card["members"]] == [m["trial_id"] for m in rep["members"]]
    assert [m["val_auc"] for m in card["members"]] == [m["val_auc"] for m in rep["members"]]
    assert card["selection"]["rule"] == "top_k" and card["selection"]["combiner"]["type"] == "mean_prob"
    # training data: hashes, lesion grouping and class balance per split, as the split manifest has them
    td = card["training_data"]
    assert td["split_hash"] == rep["split_hash"] and td["lesion_grouped"] is True and td["split_mode"] == "grouped"
    assert td["splits"]["test"] == {"images": rep["n"]["test"], "melanoma": rep["n"]["test_pos"],
                                    "prevalence": pytest.approx(rep["n"]["test_pos"] / rep["n"]["test"])}
    assert td["splits"]["val"]["melanoma"] == rep["n"]["val_pos"] and td["splits"]["train"]["images"] > 0
    # subgroups: from the stored test predictions + the dataset's metadata (synthetic data has age, sex, site)
    sg = card["subgroups"]["by"]
    assert {"dx", "age group", "sex", "site"} <= set(sg)
    sex = {r["group"]: r for r in sg["sex"]}
    assert sum(r["images"] for r in sg["sex"]) == len(test)
    meta = pd.read_csv(json.loads((folder / "bundle" / "bundle.json").read_text())["training"]["data"]
                       + "/HAM10000_metadata.csv")
    joined = test.merge(meta[["image_id", "sex"]], on="image_id")
    for s, g in joined.groupby("sex"):
        neg = g[g["label"] == 0]
        assert sex[s]["images"] == len(g)
        assert sex[s]["specificity"]["estimate"] == pytest.approx((neg["calibrated_prob"] < rep["threshold"]).mean())


def test_old_bundles_get_a_minimal_card(built, tmp_path):
    from skinsweep.ensemble.bundle import load_bundle, write_manifest
    from skinsweep.ensemble.model_card import load_model_card, render_model_card_md

    folder, rep = built
    old = tmp_path / "old"
    shutil.copytree(folder / "bundle", old)
    (old / "model_card.json").unlink()
    (old / "MODEL_CARD.md").unlink()
    write_manifest(old)  # as a bundle built before cards was written
    load_bundle(old)
    card = load_model_card(old)
    assert list(card) == CARD_KEYS and card["generated_by"]["minimal"] is True
    assert card["operating_point"]["threshold"] == rep["threshold"]
    assert card["test_metrics"]["ensemble"]["auc"] == rep["test"]["ensemble"]["auc"]
    assert card["subgroups"]["by"] == {} and "before model cards" in card["subgroups"]["note"]
    assert "Minimal card" in render_model_card_md(card)
    json.dumps(card, allow_nan=False)  # strict JSON
    with pytest.raises(DataError, match="not a skinsweep bundle"):
        load_model_card(tmp_path)


def test_a_recalibrated_bundle_describes_its_new_calibration(tiny_ensembles, tmp_path):
    from skinsweep.ensemble.model_card import load_model_card
    from skinsweep.ensemble.recalibrate import recalibrate_bundle

    site = synth_site(tmp_path / "site", n=160, seed=41, first_id=500000)
    parent = tiny_ensembles["stack"] / "bundle"
    rep = recalibrate_bundle(parent, site, tmp_path / "new", method="temperature", n_boot=200)
    card = load_model_card(tmp_path / "new")
    parent_card = load_model_card(parent)
    assert list(card) == CARD_KEYS and "recalibrated on site" in card["name"]
    assert card["calibration"]["method"] == "temperature" and card["calibration"]["ece"]["after"] == rep["after"]["ece"]
    assert card["calibration"]["ece"]["before"] == rep["before"]["ece"]
    assert card["operating_point"]["threshold"] == rep["threshold"]["after"] != parent_card["operating_point"]["threshold"]
    assert card["operating_point"]["test"]["sensitivity"] == rep["after"]["recall"]
    cd = card["training_data"]["calibration_data"]
    assert cd["dataset_hash"] == rep["dataset_hash"] and cd["n"]["images"] == rep["n"]["images"]
    assert card["test_metrics"]["parent_test"] == parent_card["test_metrics"]  # kept, marked as the parent's
    assert card["members"] == parent_card["members"]
    assert sum(r["images"] for r in card["subgroups"]["by"]["dx"]) == rep["n"]["images"]
    assert any("Recalibrated on" in x for x in card["limitations"])
    assert "model_card.json" in json.loads((tmp_path / "new" / "manifest.json").read_text())["files"]
    assert np.isfinite(card["calibration"]["params"]["temperature"])
