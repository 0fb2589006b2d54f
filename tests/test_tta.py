"""Test-time augmentation end to end: a deployed bundle scores an image exactly as the member's trial
scored it (its recorded ``tta``), and a model.json from before ``tta`` existed means none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

MEMBERS = [("tiny_resnet", "finetune", "flips"), ("tiny_vit", "linear_probe", "dihedral"),
           ("tiny_clip", "finetune", "none")]


@pytest.fixture(scope="module")
def tta_bundle(tmp_path_factory):
    """Three tiny trials, one per TTA mode, and an ensemble bundle of all three."""
    import os

    from skinsweep.data.synth import synthesize
    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.results import ResultsStore
    from skinsweep.train.config import parse_config
    from skinsweep.train.loop import run_trial

    base = tmp_path_factory.mktemp("tta")
    old_cache = os.environ.get("SKINSWEEP_CACHE")
    os.environ["SKINSWEEP_CACHE"] = str(base / "cache")
    try:
        data = base / "data"
        synthesize(data, 200, seed=3, size=(96, 72), workers=1, progress=False)
        store = ResultsStore(base / "results" / "s")
        stored = {}
        for k, (bb, mode, tta) in enumerate(MEMBERS):
            out = base / "trials" / f"t{k}"
            cfg = parse_config(dict(data=str(data), backbone=bb, mode=mode, lr=1e-2 if mode == "linear_probe" else 1e-3,
                                    epochs=2, batch_size=32, image_size=32, seed=k, tta=tta))
            res = run_trial(cfg, out, trial_id=f"t{k}")
            store.add_trial(res.summary, predictions=out / "predictions.parquet",
                            extra={"checkpoint": str(out / "checkpoint.safetensors")})
            stored[f"t{k}"] = pd.read_parquet(out / "predictions.parquet").query("split == 'test'")
        recipe = base / "r.yaml"
        recipe.write_text(yaml.safe_dump({"name": "tta", "report": {"n_boot": 100}, "combiner": {"type": "mean_logit"}, "members": {
            "rule": "best_per_backbone", "backbones": [m[0] for m in MEMBERS]}}))
        rep = build_ensemble(recipe, store.root, out=base / "e")
        yield {"data": data, "bundle": Path(rep["bundle"]), "stored": stored, "cache": base / "cache",
               "ensemble": pd.read_parquet(base / "e" / "predictions.parquet").query("split == 'test'")}
    finally:
        if old_cache is None:
            os.environ.pop("SKINSWEEP_CACHE", None)
        else:
            os.environ["SKINSWEEP_CACHE"] = old_cache


def _paths(data: Path, ids) -> list[str]:
    return [str(data / "ISIC2018_Task3_Training_Input" / f"{i}.jpg") for i in ids]


def test_bundle_members_reproduce_their_trials_tta_predictions(tta_bundle):
    from skinsweep.ensemble.bundle import load_bundle

    b = load_bundle(tta_bundle["bundle"])
    assert sorted(b.member_ids) == ["t0", "t1", "t2"]
    assert {m["trial_id"]: m.get("tta") for m in b.model_meta} == {"t0": "flips", "t1": "dihedral", "t2": "none"}
    ids = tta_bundle["stored"]["t0"]["image_id"].head(12).tolist()
    X = b.member_logits(_paths(tta_bundle["data"], ids))
    for j, m in enumerate(b.member_ids):
        stored = tta_bundle["stored"][m].set_index("image_id").loc[ids, "logit"].to_numpy()
        np.testing.assert_allclose(X[:, j], stored, atol=1e-5, err_msg=m)
    # and so the deployed ensemble is what was evaluated
    ens = tta_bundle["ensemble"].set_index("image_id").loc[ids]
    out = b.predict(_paths(tta_bundle["data"], ids))
    np.testing.assert_allclose(out["calibrated_prob"].to_numpy(), ens["calibrated_prob"].to_numpy(), atol=1e-5)


def test_model_json_without_tta_means_none_and_predict_tta_flag(tta_bundle):
    from skinsweep.ensemble.bundle import load_bundle

    b = load_bundle(tta_bundle["bundle"])
    paths = _paths(tta_bundle["data"], tta_bundle["stored"]["t0"]["image_id"].head(6))
    recorded = b.member_logits(paths)
    mirrored = b.member_logits(paths, tta=True)
    j = {m: i for i, m in enumerate(b.member_ids)}
    # --tta adds the mirror only where the member had no TTA; flips/dihedral are closed under mirroring
    np.testing.assert_allclose(mirrored[:, [j["t0"], j["t1"]]], recorded[:, [j["t0"], j["t1"]]], atol=1e-5)
    assert np.abs(mirrored[:, j["t2"]] - recorded[:, j["t2"]]).max() > 1e-5
    for mm in b.model_meta:  # a model.json written before `tta` existed
        mm.pop("tta")
    plain = b.member_logits(paths)
    np.testing.assert_array_equal(plain[:, j["t2"]], recorded[:, j["t2"]])
    assert np.abs(plain[:, j["t0"]] - recorded[:, j["t0"]]).max() > 1e-5  # t0's flips were really applied
    meta = json.loads((tta_bundle["bundle"] / "members" / "t0" / "model.json").read_text())
    assert meta["tta"] == "flips"
