"""Patient metadata in the stacking combiner: the encoder (fitted on validation, JSON round trip), the
ensemble build on a hand-made results store whose metadata is informative or pure noise, and the
one-line errors. Bundle / predict with metadata (real tiny members) are in tests/test_ensemble.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from skinsweep.errors import ConfigError, DataError
from skinsweep.ensemble.metadata import MetadataEncoder
from conftest import make_rows, write_isic

SITES = ["back", "face", "trunk", "lower extremity"]


# ----------------------------------------------------------------------------- encoder

def test_encoder_encodes_missing_and_unseen_values_as_unknown():
    val = pd.DataFrame({"age": [40.0, None, 60.0], "sex": ["male", "Female ", None],
                        "site": ["back", "face", ""]})
    enc = MetadataEncoder(features=["site", "age", "sex"]).fit(val)  # encoded in canonical order
    assert enc.features_ == ["age", "sex", "site"]
    assert enc.feature_names_ == ["age", "age_missing", "sex=female", "sex=male", "sex=unknown",
                                  "site=back", "site=face", "site=unknown"]
    new = pd.DataFrame({"age": ["", "35"], "sex": ["other", "MALE"], "site": ["scalp", "Back"]})
    np.testing.assert_array_equal(enc.transform(new), [
        [50.0, 1, 0, 0, 1, 0, 0, 1],   # missing age -> validation mean; unknown sex; unseen site -> unknown
        [35.0, 0, 0, 1, 0, 1, 0, 0],
    ])


def test_encoder_round_trips_through_json():
    rng = np.random.default_rng(0)
    val = pd.DataFrame({"age": rng.normal(50, 15, 40).round(), "sex": rng.choice(["male", "female"], 40),
                        "site": rng.choice(SITES, 40)})
    enc = MetadataEncoder().fit(val)
    back = MetadataEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert back.age_mean_ == enc.age_mean_ and back.feature_names_ == enc.feature_names_
    np.testing.assert_array_equal(back.transform(val), enc.transform(val))
    d = enc.to_dict()
    d["state"]["sites"] = d["state"]["sites"][:-1]
    with pytest.raises(ConfigError, match="feature_names do not match"):
        MetadataEncoder.from_dict(d)
    d = enc.to_dict()
    d["state"]["age_mean"] = None
    with pytest.raises(ConfigError, match="metadata encoder dict is incomplete"):
        MetadataEncoder.from_dict(d)


# What bundles built before the shared estimator contract hold (format version 1).
V1_ENCODER = {"format": "skinsweep.ensemble.metadata/1", "features": ["age", "site"],
              "state": {"feature_names": ["age", "age_missing", "site=back", "site=face", "site=unknown"],
                        "age_mean": 51.25, "sites": ["back", "face", "unknown"]}}


def test_encoder_loads_version_1_json():
    enc = MetadataEncoder.from_dict(V1_ENCODER)
    new = pd.DataFrame({"age": ["", "35"], "sex": ["male", "female"], "site": ["face", "scalp"]})
    np.testing.assert_array_equal(enc.transform(new), [[51.25, 1, 0, 1, 0], [35.0, 0, 0, 0, 1]])
    assert enc.to_dict()["format"] == "skinsweep.metadata/2"


@pytest.mark.parametrize("column, values, message", [
    ("age", [None, "", "n/a"], r"column age has no values for the 3 validation images; drop age"),
    ("sex", ["unknown", None, ""], r"column sex is empty or unknown for all 3 .*drop sex"),
    ("site", [None, None, "unknown"], r"column site \(localization\) is empty or unknown"),
])
def test_encoder_refuses_a_feature_without_values(column, values, message):
    val = pd.DataFrame({"age": [30, 40, 50], "sex": ["male"] * 3, "site": ["back"] * 3}).assign(**{column: values})
    with pytest.raises(DataError, match=message) as e:
        MetadataEncoder().fit(val, source="dataset /data/x")
    assert str(e.value).startswith("dataset /data/x: ") and "\n" not in str(e.value)


def test_metadata_table_takes_ham_columns_and_joins_by_image_id():
    from skinsweep.ensemble.metadata import join_metadata, metadata_table

    ham = pd.DataFrame({"lesion_id": ["l1", "l2"], "image_id": ["a", " b"], "dx": ["nv", "mel"], "age": [30, 40],
                        "sex": ["male", "female"], "localization": ["back", "face"]})
    table = metadata_table(ham, ["age", "site"], "ham.csv")
    assert list(table.columns) == ["age", "site"]
    rows, no_row = join_metadata(table, ["b", "zz", None])
    assert rows["site"].tolist()[0] == "face" and rows["age"].tolist()[0] == 40
    assert no_row.tolist() == [False, True, True]


@pytest.mark.parametrize("table, message", [
    (pd.DataFrame({"image_id": ["a"], "age": [3]}),
     r"^t.csv: missing column\(s\) sex, localization; expected image_id, age, sex, localization \(as in HAM"),
    (pd.DataFrame({"image_id": ["a", "a"], "age": [1, 2], "sex": ["male"] * 2, "site": ["back"] * 2}),
     r"^t.csv: 1 image ids listed more than once \(a\)"),
])
def test_metadata_table_errors_name_the_table(table, message):
    from skinsweep.ensemble.metadata import metadata_table

    with pytest.raises(DataError, match=message):
        metadata_table(table, ["age", "sex", "site"], "t.csv")


# ----------------------------------------------------------------------------- a hand-made sweep

def _make_sweep(base: Path, *, informative: bool, n: int = 800, seed: int = 0) -> tuple[Path, Path]:
    """A dataset (ISIC layout + HAM10000_metadata.csv) and a results store with two weak members.

    Members' logits carry a little signal; metadata either carries a lot (age and site depend on the
    label) or none (drawn independently of it, with many sites, so a stacker could overfit them).
    Val and test are split by lesion; test patients are 10 years older and some sites occur only in
    test, so an encoder that peeked at test rows would show it.
    """
    from skinsweep.data.index import load_index
    from skinsweep.results import ResultsStore

    rng = np.random.default_rng(seed)
    rows = make_rows(n, n_mel=n // 5, seed=seed)
    lesions = sorted({r["lesion_id"] for r in rows})
    test_lesions = set(rng.permutation(lesions)[: len(lesions) // 2])
    noise_sites = [f"site{k:02d}" for k in range(30)]
    for k, r in enumerate(rows):
        y, is_test = r["dx"] == "MEL", r["lesion_id"] in test_lesions
        if informative:
            age = 45 + 20 * y + rng.normal(0, 8)
            site = SITES[0] if y and rng.random() < 0.7 else rng.choice(SITES)
        else:
            age, site = rng.normal(50, 15), rng.choice(noise_sites[:20] if not is_test else noise_sites)
        r.update(age=f"{age + 10 * is_test:.0f}", sex=str(rng.choice(["male", "female"])), localization=site)
        if k % 40 == 1:  # a few images without any metadata
            r.update(age="", sex="", localization="")
    data = write_isic(base / "data", rows, size=(16, 12))
    dataset_hash = load_index(data, verify=False).hash
    y = np.array([r["dx"] == "MEL" for r in rows], dtype=int)
    store = ResultsStore(base / "results" / "s")
    for j, bb in enumerate(("tiny_vit", "tiny_clip")):
        logit = 0.6 * y + rng.normal(0, 1, n)
        preds = pd.DataFrame({"image_id": [r["image_id"] for r in rows], "lesion_id": [r["lesion_id"] for r in rows],
                              "label": y, "dx": [r["dx"] for r in rows], "logit": logit, "prob": 1 / (1 + np.exp(-logit)),
                              "split": ["test" if r["lesion_id"] in test_lesions else "val" for r in rows]})
        summary = {"trial_id": f"m{j}", "status": "completed", "split_hash": "s1", "dataset_hash": dataset_hash,
                   "config": {"data": str(data), "positive": ["MEL"], "backbone": bb, "mode": "finetune"}}
        store.add_trial(summary, predictions=preds)
    return data, store.root


@pytest.fixture(scope="module")
def informative(tmp_path_factory):
    return _make_sweep(tmp_path_factory.mktemp("informative"), informative=True)


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    return _make_sweep(tmp_path_factory.mktemp("noise"), informative=False, seed=1)


def _recipe(tmp_path: Path, **combiner) -> Path:
    body = {"name": "m", "members": {"rule": "explicit", "trials": ["m0", "m1"]},
            "combiner": {"type": "stacking", **combiner}, "report": {"n_boot": 100}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _build(tmp_path, results, name, **combiner) -> dict:
    from skinsweep.ensemble.build import build_ensemble

    return build_ensemble(_recipe(tmp_path, **combiner), results, out=tmp_path / name, bundle=False)


def test_informative_metadata_improves_out_of_fold_validation(informative, tmp_path):
    data, results = informative
    base = _build(tmp_path, results, "base")
    meta = _build(tmp_path, results, "meta", metadata=["age", "sex", "site"])
    oof = {k: r["val"]["ensemble_uncalibrated"]["auc"] for k, r in (("base", base), ("meta", meta))}
    assert oof["meta"] > oof["base"] + 0.1, oof
    assert meta["test"]["ensemble"]["auc"]["estimate"] > base["test"]["ensemble"]["auc"]["estimate"] + 0.1
    assert base["metadata"] is None and meta["metadata"]["features"] == ["age", "sex", "site"]
    assert meta["metadata"]["source"] == str(data)
    # the stacker's coefficients: member logits first, then one per encoded column
    assert len(meta["combiner"]["state"]["coef"]) == 2 + len(meta["metadata"]["columns"])
    preds = pd.read_parquet(tmp_path / "meta" / "predictions.parquet")
    assert {"age", "sex", "site"} <= set(preds.columns)


def test_greedy_selection_with_metadata(informative, noise, tmp_path):
    """members.rule greedy + combiner.metadata: Caruana weights, then a regression on [greedy logit,
    metadata], both re-run per fold; informative metadata helps out of fold, noise metadata does not."""
    from sklearn.metrics import roc_auc_score

    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.ensemble.combiners import Combiner

    def build(results, name, metadata):
        body = {"name": name, "members": {"rule": "greedy", "top_n": 2, "n_iter": 5},
                "combiner": {"metadata": metadata}, "report": {"n_boot": 100}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return build_ensemble(path, results, out=tmp_path / name, bundle=False)

    for (data, results), gain in ((informative, 0.1), (noise, None)):
        base, meta = build(results, "g", []), build(results, "gm", ["age", "sex", "site"])
        assert base["combiner"]["kind"] == "greedy" and meta["combiner"]["kind"] == "greedy_meta"
        oof = {k: r["val"]["ensemble_uncalibrated"]["auc"] for k, r in (("base", base), ("meta", meta))}
        if gain:
            assert oof["meta"] > oof["base"] + gain, oof
        else:
            assert oof["meta"] <= oof["base"] + 0.01, oof
        state = meta["combiner"]["state"]
        assert len(state["coef"]) == 1 + len(meta["metadata"]["columns"]) and len(state["weights"]) == len(meta["members"])
    # the stored combiner (what a bundle loads) reproduces the report's test scores
    from skinsweep.ensemble.metadata import MetadataEncoder

    preds = pd.read_parquet(tmp_path / "gm" / "predictions.parquet")
    test = preds[preds["split"] == "test"]
    P = test[[f"prob_{m['trial_id']}" for m in meta["members"]]].to_numpy()
    extra = MetadataEncoder.from_dict(meta["metadata"]["encoder"]).transform(test)
    logit = Combiner.from_dict(meta["combiner"]).predict_logit(np.log(P / (1 - P)), extra=extra)
    assert roc_auc_score(test["label"], logit) == pytest.approx(meta["test"]["ensemble"]["auc"]["estimate"], abs=1e-9)


def test_encoder_is_fitted_on_validation_rows_only(informative, tmp_path):
    data, results = informative
    rep = _build(tmp_path, results, "meta", metadata=["age", "site"])
    preds = pd.read_parquet(tmp_path / "meta" / "predictions.parquet")
    meta = pd.read_csv(data / "HAM10000_metadata.csv").set_index("image_id")
    val_ids, test_ids = (preds.loc[preds["split"] == s, "image_id"] for s in ("val", "test"))
    state = rep["metadata"]["encoder"]["state"]
    assert state["age_mean"] == pytest.approx(meta.loc[val_ids, "age"].mean())
    assert abs(state["age_mean"] - meta.loc[test_ids, "age"].mean()) > 5  # test patients are older
    assert state["sites"] == sorted(meta.loc[val_ids, "localization"].dropna().unique()) + ["unknown"]
    # images without metadata are scored as unknown and counted
    for split, ids in (("val", val_ids), ("test", test_ids)):
        empty = int(meta.loc[ids, "age"].isna().sum())
        assert empty > 0 and rep["metadata"]["missing"][split]["no_metadata"] == empty


def test_noise_metadata_does_not_leak_into_validation_scores(noise, tmp_path):
    from sklearn.metrics import roc_auc_score

    from skinsweep.ensemble.combiners import Combiner

    _, results = noise
    base = _build(tmp_path, results, "base")
    meta = _build(tmp_path, results, "meta", metadata=["age", "sex", "site"])
    oof = {k: r["val"]["ensemble_uncalibrated"]["auc"] for k, r in (("base", base), ("meta", meta))}
    assert oof["meta"] <= oof["base"] + 0.01, oof
    # ...while the same stacker scored on the rows it was fitted on looks better: cross-fitting matters
    preds = pd.read_parquet(tmp_path / "meta" / "predictions.parquet")
    val = preds[preds["split"] == "val"]
    X = np.log(val[["prob_m0", "prob_m1"]].to_numpy() / (1 - val[["prob_m0", "prob_m1"]].to_numpy()))
    enc = MetadataEncoder.from_dict(meta["metadata"]["encoder"])
    in_sample = Combiner.from_dict(meta["combiner"]).predict_logit(X, extra=enc.transform(val))
    assert roc_auc_score(val["label"], in_sample) > oof["meta"] + 0.01


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("section, message", [
    ({"combiner": {"type": "mean_prob", "metadata": ["age"]}},
     r"\[combiner.metadata\] combiner.metadata is only used by combiner.type stacking or members.rule greedy \(type is mean_prob"),
    ({"combiner": {"metadata": ["age", "age"]}}, r"lists a feature twice"),
    ({"combiner": {"metadata": ["bmi"]}}, r"\[combiner.metadata\[0\]\] Input should be 'age', 'sex' or 'site'"),
])
def test_invalid_metadata_recipes(tmp_path, section, message):
    from skinsweep.ensemble.build import load_ensemble_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "m", **section}))
    with pytest.raises(ConfigError, match=message) as e:
        load_ensemble_recipe(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_dataset_without_the_column_is_a_one_line_error(tmp_path):
    from skinsweep.ensemble.build import build_ensemble

    data, results = _make_sweep(tmp_path, informative=True, n=200)
    meta = pd.read_csv(data / "HAM10000_metadata.csv").assign(localization="unknown")  # site never known
    meta.to_csv(data / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=rf"dataset {data}: column site \(localization\) is empty") as e:
        build_ensemble(_recipe(tmp_path, metadata=["site"]), results, out=tmp_path / "o", bundle=False)
    assert "\n" not in str(e.value)
    meta.drop(columns=["age", "sex", "localization"]).to_csv(data / "HAM10000_metadata.csv", index=False)
    with pytest.raises(DataError, match=r"column age has no values"):
        build_ensemble(_recipe(tmp_path, metadata=["age"]), results, out=tmp_path / "o", bundle=False)


def test_missing_or_other_dataset_is_a_one_line_error(informative, tmp_path):
    from skinsweep.ensemble.build import build_ensemble

    _, results = informative
    other = write_isic(tmp_path / "other", make_rows(30), size=(16, 12))
    with pytest.raises(DataError, match=r"is not the dataset the members were trained on .*pass --data DIR"):
        build_ensemble(_recipe(tmp_path, metadata=["age"]), results, out=tmp_path / "o", bundle=False, data=other)
    with pytest.raises(DataError, match=r"dataset .*/gone .*does not exist here; pass --data DIR"):
        build_ensemble(_recipe(tmp_path, metadata=["age"]), results, out=tmp_path / "o", bundle=False,
                       data=tmp_path / "gone")


def test_cli_build_with_metadata_on_a_mean_combiner_exits_2(informative, tmp_path):
    from typer.testing import CliRunner

    from skinsweep.cli import app

    _, results = informative
    r = CliRunner().invoke(app, ["ensemble", "build", str(_recipe(tmp_path)), "--results", str(results),
                                 "--set", "combiner.type=mean_logit", "--set", "combiner.metadata=[age,sex]"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "combiner.metadata is only used by combiner.type stacking" in lines[0]
