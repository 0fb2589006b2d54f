"""`skinsweep report` on a small results store (tiny trials trained here, no Ray): every section is
there, every image it references is a valid PNG, numbers match the stored predictions; Grad-CAM maps
have the image's size and are not constant; bad input gives one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinsweep.errors import ConfigError, DataError

MEMBERS = [("tiny_resnet", "finetune", 2e-3), ("tiny_vit", "finetune", 1e-3), ("tiny_clip", "linear_probe", 1e-2)]
IMAGE_SIZE = (96, 72)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three completed tiny trials, one pruned (history, no predictions), one failed; one ensemble."""
    import os

    from skinsweep.data.synth import synthesize
    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.results import ResultsStore
    from skinsweep.train.config import parse_config
    from skinsweep.train.loop import run_trial

    base = tmp_path_factory.mktemp("report")
    os.environ["SKINSWEEP_CACHE"] = str(base / "cache")
    data = base / "data"
    synthesize(data, 300, seed=7, size=IMAGE_SIZE, workers=1, progress=False)
    store = ResultsStore(base / "results" / "s")
    split_hash = None
    for k, (bb, mode, lr) in enumerate(MEMBERS):
        out = base / "trials" / f"t{k}"
        cfg = parse_config(dict(data=str(data), backbone=bb, mode=mode, lr=lr, epochs=3, batch_size=32,
                                image_size=32, seed=k))
        res = run_trial(cfg, out, trial_id=f"t{k}")
        split_hash = res.summary["split_hash"]
        store.add_trial(res.summary, predictions=out / "predictions.parquet",
                        extra={"checkpoint": str(out / "checkpoint.safetensors")})
    pruned = dict(res.summary, trial_id="p0", status="pruned", test={}, best_epoch=None,
                  history=res.summary["history"][:1])
    store.add_trial(pruned, predictions=None, status="pruned", extra={"pruned_at_epoch": 1})
    store.add_failed("f0", {"backbone": "tiny_vit", "mode": "finetune"},
                     "Traceback …\nRuntimeError: out of memory <script>alert(1)</script>")
    (store.root / "sweep.json").write_text(json.dumps({"name": "s", "dataset": str(data), "split_hash": split_hash,
                                                       "recipe": {"data": {"positive": ["MEL"]}}}))
    recipe = base / "dc.yaml"
    recipe.write_text("name: dc\nmembers: {rule: best_per_backbone, backbones: [tiny_vit, tiny_clip]}\n"
                      "report: {n_boot: 100}\n")
    ens = base / "ens"
    build_ensemble(recipe, store.root, out=ens, bundle=False)
    return {"data": data, "results": store.root, "cache": base / "cache", "ensemble": ens, "base": base}


@pytest.fixture(autouse=True)
def _shared_cache(sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(sweep["cache"]))


class _Page(HTMLParser):
    """What a browser would see of the page's structure: element ids, image sources, table classes."""

    def __init__(self) -> None:
        super().__init__()
        self.ids, self.imgs, self.table_classes = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "table":
            self.table_classes.append(a.get("class"))


def _parse(page: Path) -> tuple[_Page, str]:
    text = page.read_text()
    p = _Page()
    p.feed(text)
    return p, text


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    """The page build_report writes, its log, and the tables it was rendered from (same inputs)."""
    from skinsweep.report.page import build_report
    from skinsweep.report.tables import report_data

    out = tmp_path_factory.mktemp("rep") / "report"
    msgs: list[str] = []
    page = build_report(sweep["results"], ensembles=[sweep["ensemble"]], out=out, gallery=2, log=msgs.append)
    data = report_data(sweep["results"], ensembles=[sweep["ensemble"]], gallery=2, log=lambda m: None)
    return page, msgs, data


def _ensemble_test(sweep) -> tuple[pd.DataFrame, float]:
    ens = pd.read_parquet(sweep["ensemble"] / "predictions.parquet")
    thr = json.loads((sweep["ensemble"] / "report.json").read_text())["threshold"]
    return ens[ens["split"] == "test"], thr


def test_report_page_has_every_section_and_valid_images(report):
    page, msgs, _ = report
    p, text = _parse(page)
    for sid in ("overview", "models", "ensembles", "gallery", "errors"):
        assert sid in p.ids, f"section {sid} missing"
    # every referenced image exists beside the page and is a PNG that decodes
    assert len(p.imgs) >= 10
    for src in p.imgs:
        f = page.parent / src
        assert f.is_file(), src
        with Image.open(f) as im:
            assert im.format == "PNG"
            im.verify()
    names = {Path(s).name for s in p.imgs}
    assert {"best_over_time.png", "hparams.png", "asha.png", "roc_pr.png"} <= names
    assert any(n.startswith("curves_") for n in names) and any(n.startswith("calib_") for n in names)
    assert any(n.startswith("ens_") for n in names)
    # the trials table sorts (the inline script binds to it); the others do not
    assert p.table_classes.count("sortable") == 1 and "addEventListener('click'" in text
    assert any(m.startswith("report: heat maps of") for m in msgs)


def test_report_page_escapes_values(report):
    """A trial's error text is data, not markup: its <script> shows as text and never runs."""
    page, _, data = report
    _, text = _parse(page)
    assert data.failed["error"].tolist() == ["RuntimeError: out of memory <script>alert(1)</script>"]
    assert "out of memory &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert" not in text


def test_report_overview_tables(report):
    _, _, data = report
    assert data.counts == {"completed": 3, "pruned": 1, "failed": 1}
    assert sorted(data.trials_table["trial_id"]) == ["f0", "p0", "t0", "t1", "t2"]
    auc = data.trials_table["val_auc"].dropna()
    assert auc.is_monotonic_decreasing and data.trials_table["val_auc"].iloc[-1:].isna().all()  # failed: no AUC, last
    assert data.pruned["trial_id"].tolist() == ["p0"] and data.pruned["pruned_at_epoch"].tolist() == [1]
    page, _, _ = report  # a small sweep: every trial shown, no "showing … of …" note
    _, text = _parse(page)
    assert ">All trials<" in text and "Showing the best" not in text and 'class="hint capped"' not in text


def test_report_caps_the_per_trial_tables_and_says_so(sweep, tmp_path):
    """Issue #14 (2,000 trials): the per-trial tables hold at most ``table_rows`` rows — the trials table
    the best by val AUC — and the page says how many of how many it shows and where the rest are."""
    from skinsweep.report.page import build_report
    from skinsweep.report.tables import report_data

    data = report_data(sweep["results"], table_rows=2, log=lambda m: None)
    assert len(data.trials) == 5 and data.trials_table["trial_id"].tolist() == \
        data.trials.sort_values("val_auc", ascending=False)["trial_id"].head(2).tolist()
    page = build_report(sweep["results"], out=tmp_path / "r", table_rows=2, gradcam=False, log=lambda m: None)
    _, text = _parse(page)
    assert ">Best 2 of 5 trials<" in text
    assert "Showing the best 2 of 5 trials by val AUC; all are in" in text and "trials.parquet" in text
    rows = text.split('class="sortable"')[1].split("</table>")[0].count("<tr>")
    assert rows == 1 + 2  # header + 2 trials
    capped = report_data(sweep["results"], table_rows=0, log=lambda m: None)
    assert capped.pruned.empty and capped.n_pruned == 1 and capped.failed.empty and capped.n_failed == 1


def test_report_ensemble_table_has_cis_and_delong(report):
    _, _, data = report
    (e,) = data.ensembles
    assert e.table["model"].tolist() == [m["label"] for m in e.report["members"]] + ["ensemble"]
    auc = e.report["test"]["ensemble"]["auc"]
    assert e.table.set_index("model").loc["ensemble", "AUC"] == f"{auc['estimate']:.3f} [{auc['lo']:.3f}, {auc['hi']:.3f}]"
    assert 0 <= e.report["delong_vs_best"]["p_value"] <= 1


def test_report_numbers_come_from_stored_predictions(report, sweep):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from skinsweep.results import load

    _, _, data = report
    models = data.models.set_index("model")
    preds = load(sweep["results"]).predictions
    assert len(models) == 3  # one per backbone
    for label, row in models.iterrows():
        tid = label.split("/")[-1]
        t = preds[(preds["trial_id"] == tid) & (preds["split"] == "test")]
        assert row["test AUC"] == pytest.approx(roc_auc_score(t["label"], t["prob"]), abs=1e-9)
        assert row["test AP"] == pytest.approx(average_precision_score(t["label"], t["prob"]), abs=1e-9)
    # error analysis by diagnosis: counts equal the ensemble's stored test predictions
    test, thr = _ensemble_test(sweep)
    by_dx = data.by_dx.set_index("dx")
    assert set(by_dx.index) == set(test["dx"])
    for dx, g in test.groupby("dx"):
        assert by_dx.loc[dx, "images"] == len(g)
        assert by_dx.loc[dx, "flagged"] == int((g["calibrated_prob"] >= thr).sum())
    # metadata tables exist (the synthetic release has age, sex and site) and cover the test set
    assert list(data.by_meta) == ["age group", "sex", "site"]
    for col, df in data.by_meta.items():
        assert df["images"].sum() == len(test) and df["melanomas"].sum() == test["label"].sum()


def test_gallery_picks_confident_mistakes(report, sweep):
    """The gallery's false negatives are the test melanomas with the lowest ensemble probability (one
    image per lesion), its false positives the benign lesions with the highest; each shown row has its tiles."""
    page, _, data = report
    _, text = _parse(page)
    t, thr = _ensemble_test(sweep)
    fn = t[(t["label"] == 1) & (t["calibrated_prob"] < thr)].sort_values("calibrated_prob").drop_duplicates("lesion_id")
    fp = (t[(t["label"] == 0) & (t["calibrated_prob"] >= thr)].sort_values("calibrated_prob", ascending=False)
          .drop_duplicates("lesion_id"))
    assert data.gallery["fn"]["image_id"].tolist() == fn["image_id"].head(2).tolist()  # gallery=2
    assert data.gallery["fp"]["image_id"].tolist() == fp["image_id"].head(2).tolist()
    assert len(data.gallery["tp"]) == 1 and (data.gallery["tp"]["prob"] >= thr).all()
    assert data.source.explain == [m["trial_id"] for m in data.ensembles[0].report["members"]]
    gallery = text[text.index('id="gallery"'):text.index('id="errors"')]
    for g in data.gallery.values():
        for img in g["image_id"]:
            assert f"g_{img}.png" in gallery and all(f"g_{img}_{m}.png" in gallery for m in data.source.explain)


@pytest.mark.parametrize("k", range(len(MEMBERS)))
def test_gradcam_maps_have_image_size_and_vary(sweep, k):
    from skinsweep.data.index import load_index
    from skinsweep.report.gradcam import gradcam, target_layer
    from skinsweep.train.loop import load_trial_model

    model, meta = load_trial_model(sweep["base"] / "trials" / f"t{k}")
    _, _, method = target_layer(model, meta["data_config"]["input_size"])
    # tiny_resnet at 32 px: layer4 is 1x1, so the deepest stage with a 4x4 map (layer2)
    assert method == ("Grad-CAM on layer2" if MEMBERS[k][0] == "tiny_resnet" else "Grad-CAM (ViT tokens)")
    # the images this model scores highest: Grad-CAM keeps only evidence *for* melanoma (ReLU), so an
    # image nothing in which raises the logit has an all-zero map (the gallery says so)
    preds = pd.read_parquet(sweep["base"] / "trials" / f"t{k}" / "predictions.parquet").sort_values("prob")
    index = load_index(sweep["data"]).df.set_index("image_id")
    paths = index.loc[preds["image_id"].tail(3), "path"].tolist()
    maps = gradcam(model, meta, paths)
    assert len(maps) == 3
    for m in maps:
        assert m.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])
        assert m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 + 1e-6
        assert m.std() > 1e-3  # not constant
    # a linear probe leaves its backbone frozen in training, yet its heat map still gets gradients
    assert not np.allclose(maps[0], maps[1])


def test_center_crop_maps_land_on_the_crop():
    from skinsweep.report.gradcam import _to_original

    m = np.ones((8, 8), np.float32)
    out = _to_original(m, 40, 20, "center-crop")
    assert out.shape == (20, 40)
    assert out[:, :10].max() == 0 and out[:, 30:].max() == 0 and out[:, 10:30].min() > 0.99


def test_report_without_dataset_or_ensemble_still_builds(sweep, tmp_path):
    """Dataset gone (e.g. report built on another machine): the page says why the gallery is missing."""
    from skinsweep.report.page import build_report

    res = tmp_path / "copy"
    shutil.copytree(sweep["results"], res)
    info = json.loads((res / "sweep.json").read_text())
    (res / "sweep.json").write_text(json.dumps(info | {"dataset": str(tmp_path / "gone")}))
    from skinsweep.report.tables import report_data

    page = build_report(res, out=tmp_path / "r", log=lambda m: None)
    p, text = _parse(page)
    assert "ensembles" not in p.ids and {"models", "gallery", "errors"} <= set(p.ids)
    assert "No gallery" in text and "not readable from here" in text
    data = report_data(res, log=lambda m: None)
    assert data.index is None and data.gallery == {} and data.by_meta == {}
    assert data.source.name.startswith("best model")  # error analysis by dx still works from the predictions alone
    assert data.by_dx["images"].sum() == len(data.source.test) and len(data.by_dx) >= 2


def test_report_bad_input(sweep, tmp_path):
    from skinsweep.report.page import build_report

    with pytest.raises(DataError, match="no report.json"):
        build_report(sweep["results"], ensembles=[tmp_path], out=tmp_path / "r")
    other = tmp_path / "other-ens"
    other.mkdir()
    rep = json.loads((sweep["ensemble"] / "report.json").read_text())
    (other / "report.json").write_text(json.dumps(rep | {"split_hash": "deadbeef", "results": "elsewhere"}))
    shutil.copy(sweep["ensemble"] / "predictions.parquet", other / "predictions.parquet")
    with pytest.raises(DataError, match="was built from elsewhere"):
        build_report(sweep["results"], ensembles=[other], out=tmp_path / "r")
    with pytest.raises(ConfigError, match="--trial nope"):
        build_report(sweep["results"], trials=["nope"], out=tmp_path / "r")
    with pytest.raises(DataError, match="no stored val/test predictions"):
        build_report(sweep["results"], trials=["p0"], out=tmp_path / "r")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        build_report(sweep["results"], out=tmp_path / "file")
    assert not (tmp_path / "r").exists()  # nothing written on bad input
    # the CLI: one red line, exit 2, no traceback
    r = subprocess.run([sys.executable, "-m", "skinsweep.cli", "report", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert len((r.stderr + r.stdout).strip().splitlines()) == 1


def test_report_cli_writes_page(sweep, tmp_path):
    r = subprocess.run([sys.executable, "-m", "skinsweep.cli", "report", str(sweep["results"]), "--out",
                        str(tmp_path / "r"), "--no-gradcam", "--trial", "t0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / "index.html").is_file() and "open file://" in r.stdout
    p, _ = _parse(tmp_path / "r" / "index.html")
    assert [i for i in p.ids if i.startswith("m-")] == ["m-t0"]  # only the trial asked for
    assert not list((tmp_path / "r" / "img").glob("g_*_t0.png"))  # no heat maps asked for


@pytest.mark.parametrize("name,method", [("resnet18", "Grad-CAM on layer4"), ("dino_vits16", "Grad-CAM (ViT tokens)"),
                                         ("clip_vitb32", "Grad-CAM (ViT tokens)")])
def test_gradcam_on_the_real_architectures(name, method, sweep):
    """The study's backbones (random init: no hub here) take the same heat-map path at 224 px."""
    from skinsweep.train.backbones import create_backbone
    from skinsweep.data.index import load_index
    from skinsweep.report.gradcam import gradcam, target_layer
    from skinsweep.train.model import Classifier, make_head

    bb = create_backbone(name, weights="none")
    model = Classifier(bb.model, make_head(bb.default_head, bb.num_features), mode="linear_probe")
    assert target_layer(model, bb.data_config.input_size)[2] == method
    meta = {"image_size": bb.data_config.input_size, "resize_policy": "squash", "data_config": bb.data_config.to_dict()}
    path = load_index(sweep["data"]).df["path"].iloc[0]
    (m,) = gradcam(model, meta, [path])
    assert m.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0]) and m.std() > 1e-3


def test_damaged_checkpoint_costs_its_heat_maps_not_the_page(sweep, tmp_path):
    from skinsweep.report.page import build_report

    res = tmp_path / "copy"
    shutil.copytree(sweep["results"], res)
    ckpt_dir = tmp_path / "t1"
    shutil.copytree(sweep["base"] / "trials" / "t1", ckpt_dir)
    (ckpt_dir / "checkpoint.safetensors").write_bytes(b"not a safetensors file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(res / "trials.parquet").to_pandas()
    t.loc[t["trial_id"] == "t1", "checkpoint"] = str(ckpt_dir / "checkpoint.safetensors")
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), res / "trials.parquet")
    page = build_report(res, out=tmp_path / "r", gallery=1, log=lambda m: None)
    text = page.read_text()
    assert "No heat maps for t1 (" in text
    assert re.search(r"g_\w+_t0\.png", text)  # the other models still have theirs
