"""skinsweep export: one ONNX graph per bundle that onnxruntime runs to the bundle's own predictions (1e-4),
members' TTA views, metadata, every combiner and calibrator included; one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from skinsweep.cli import app
from skinsweep.errors import ConfigError, DataError

pytest.importorskip("onnxruntime")

TOL = 1e-4
PROBS = ["ensemble_prob", "calibrated_prob"]


@pytest.fixture(autouse=True)
def _shared_cache(tiny_sweep, monkeypatch):
    monkeypatch.setenv("SKINSWEEP_CACHE", str(tiny_sweep["cache"]))


def _images(tiny_sweep, n: int = 12) -> list[str]:
    return [str(p) for p in sorted((tiny_sweep["data"] / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:n]]


def _set_member(bundle: Path, k: int, **model: object) -> None:
    """Edit member k's model.json (and bundle.json's copy), then re-sign the bundle, as a build would write it."""
    from skinsweep.ensemble.bundle import write_manifest

    meta = json.loads((bundle / "bundle.json").read_text())
    e = meta["members"][k]
    e["model"].update(model)
    (bundle / e["path"] / "model.json").write_text(json.dumps(e["model"]))
    (bundle / "bundle.json").write_text(json.dumps(meta))
    write_manifest(bundle)


@pytest.fixture(scope="module")
def meta_bundle(tiny_sweep, tmp_path_factory):
    """tiny_resnet + tiny_clip stacked with age/sex/site, isotonic calibration; the resnet scores with tta flips
    and the clip with dihedral (edited in: the graph must hold every view)."""
    import yaml

    from skinsweep.ensemble.build import build_ensemble

    base = tmp_path_factory.mktemp("exp")
    recipe = {"name": "m", "members": {"rule": "best_per_backbone", "backbones": ["tiny_resnet", "tiny_clip"]},
              "combiner": {"type": "stacking", "metadata": ["age", "sex", "site"]},
              "calibration": {"method": "isotonic"}, "report": {"n_boot": 100}}
    (base / "m.yaml").write_text(yaml.safe_dump(recipe))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isotonic warns about few positives
        build_ensemble(base / "m.yaml", tiny_sweep["results"], out=base / "m")
    bundle = base / "m" / "bundle"
    _set_member(bundle, 0, tta="flips")
    _set_member(bundle, 1, tta="dihedral")
    return bundle


def _compare(bundle_dir: Path, export_dir: Path, images: list[str], metadata=None) -> dict:
    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.ensemble.export import OnnxBundle

    ref = load_bundle(bundle_dir).predict(images, metadata=metadata)
    got = OnnxBundle(export_dir).predict(images, metadata=metadata)
    cols = [c for c in ref if c.startswith("prob_")] + PROBS
    diff = {c: float(np.abs(ref[c].to_numpy() - got[c].to_numpy()).max()) for c in cols}
    assert max(diff.values()) < TOL, diff
    clear = np.abs(ref["calibrated_prob"].to_numpy() - json.loads((export_dir / "export.json").read_text())["threshold"]) > TOL
    np.testing.assert_array_equal(ref["decision"].to_numpy()[clear], got["decision"].to_numpy()[clear])
    return diff


@pytest.mark.parametrize("which", ["stack", "mean"])
def test_onnx_reproduces_the_bundle(tiny_sweep, tiny_ensembles, tmp_path, which):
    """stack: tiny_vit + tiny_clip, stacking, no calibrator; mean: four members, mean_prob, Platt."""
    from skinsweep.ensemble.export import export_bundle_onnx

    bundle = tiny_ensembles[which] / "bundle"
    info = export_bundle_onnx(bundle, tmp_path / "onnx")
    assert [i["name"] for i in info["inputs"]] == ["image"] and info["inputs"][0]["shape"] == ["N", 32, 32, 3]
    assert info["exact_preprocessing"] and info["check"]["max_abs_diff"] < TOL
    assert {o["name"] for o in info["outputs"]} == {"member_probs", "ensemble_prob", "calibrated_prob", "decision"}
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.onnx", "export.json"}
    _compare(bundle, tmp_path / "onnx", _images(tiny_sweep))
    # batch of one, straight through onnxruntime
    from skinsweep.data.cache import decode_resize
    from skinsweep.ensemble.export import OnnxBundle

    one = OnnxBundle(tmp_path / "onnx").run({"image": decode_resize(_images(tiny_sweep, 1)[0], 32, "squash")[None]})
    assert one["member_probs"].shape == (1, len(info["members"])) and one["calibrated_prob"].shape == (1,)


def test_onnx_with_metadata_isotonic_and_tta_views(tiny_sweep, meta_bundle, tmp_path):
    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.ensemble.export import export_bundle_onnx

    info = export_bundle_onnx(meta_bundle, tmp_path / "onnx")
    assert [i["name"] for i in info["inputs"]] == ["image", "metadata"]
    assert info["inputs"][1]["columns"][:2] == ["age", "age_missing"]
    assert [m["tta"] for m in info["members"]] == ["flips", "dihedral"] and info["calibrator"] == "isotonic"
    meta = pd.read_csv(tiny_sweep["data"] / "HAM10000_metadata.csv")
    images = _images(tiny_sweep, 16)
    _compare(meta_bundle, tmp_path / "onnx", images, metadata=meta)
    # the views are in the graph: without them the bundle's member probabilities differ from the export's
    plain = load_bundle(meta_bundle)
    plain.model_meta[0]["tta"] = plain.model_meta[1]["tta"] = "none"
    from skinsweep.ensemble.export import OnnxBundle

    got = OnnxBundle(tmp_path / "onnx").predict(images, metadata=meta)
    no_tta = plain.predict(images, metadata=meta)
    assert np.abs(no_tta.filter(like="prob_").to_numpy() - got.filter(like="prob_").to_numpy()).max() > 1e-4


@pytest.mark.parametrize("kind", ["mean_prob", "mean_logit", "weighted", "stacking", "greedy", "greedy_meta"])
def test_every_combiner_has_a_torch_form(kind):
    from skinsweep.ensemble.combiners import make_combiner

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)) * 3
    y = (X.sum(1) + rng.normal(size=200) > 1).astype(int)
    E = rng.integers(0, 2, size=(200, 2)).astype(float) if kind in ("stacking", "greedy_meta") else None
    c = make_combiner(kind).fit(X, y, extra=E)
    out = c.torch_module()(torch.tensor(X), None if E is None else torch.tensor(E)).numpy()
    np.testing.assert_allclose(out, c.predict_logit(X, extra=E), atol=1e-12)


@pytest.mark.parametrize("kind", ["none", "temperature", "platt", "isotonic"])
def test_every_calibrator_has_a_torch_form(kind):
    from skinsweep.ensemble.calibrators import make_calibrator

    rng = np.random.default_rng(1)
    z = rng.normal(size=400) * 2
    y = (z + rng.normal(size=400) > 0.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = make_calibrator(kind).fit(z, y)
    # also exactly at the isotonic knots (steps, ties) and far outside the fitted range
    knots = getattr(cal, "X_thresholds_", np.array([0.5])).clip(1e-12, 1 - 1e-12)
    zz = np.concatenate([z, np.log(knots / (1 - knots)), [-60.0, 60.0]])
    np.testing.assert_allclose(cal.torch_module()(torch.tensor(zz)).numpy(), cal.predict_proba(zz), atol=1e-12)


def test_a_backbone_that_does_not_export_is_one_line(tiny_ensembles, tmp_path, monkeypatch):
    import skinsweep.ensemble.bundle as bundle_mod
    from skinsweep.ensemble.export import export_bundle_onnx

    class Histogram(torch.nn.Module):  # aten.histc has no ONNX translation
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, f):
            return self.head(f) + 0 * torch.histc(f, bins=4).sum()

    real = bundle_mod.load_bundle

    def with_histc(path):
        b = real(path)
        b.models[1].head = Histogram(b.models[1].head)
        return b

    monkeypatch.setattr(bundle_mod, "load_bundle", with_histc)
    bundle = tiny_ensembles["stack"] / "bundle"
    second = json.loads((bundle / "bundle.json").read_text())["members"][1]["trial_id"]
    with pytest.raises(ConfigError, match=rf"member {second} \(backbone tiny_\w+\) does not export to ONNX: operator "
                                          r"aten\.histc"):
        export_bundle_onnx(bundle, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_export_errors_are_one_line(tiny_ensembles, tmp_path):
    bundle = tiny_ensembles["stack"] / "bundle"
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / "bundle.json").write_text((tampered / "bundle.json").read_text().replace('"threshold": ', '"threshold": 1'))
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    for args, message in [
        ([bundle, "--format", "tflite", "--out", tmp_path / "o"], "--format 'tflite' is not supported; use one of onnx"),
        ([tmp_path / "nope", "--out", tmp_path / "o"], "is not a skinsweep bundle"),
        ([tampered, "--out", tmp_path / "o"], "was modified after it was built"),
        ([bundle, "--out", tmp_path / "file"], "is a file; pass a folder"),
        ([bundle, "--out", tmp_path / "full"], "exists and is not an earlier export"),
        ([bundle, "--out", tmp_path / "file" / "sub"], "cannot write --out"),
    ]:
        r = CliRunner().invoke(app, ["export", *map(str, args)])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, r.output)


def test_export_cli(tiny_ensembles, tmp_path):
    from skinsweep.ensemble.export import verify_export

    r = CliRunner().invoke(app, ["export", str(tiny_ensembles["mean"] / "bundle"), "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    assert "input  image: uint8 (N, 32, 32, 3)" in r.output and "wrote" in r.output
    info = verify_export(tmp_path / "onnx")
    assert info["threshold"] == json.loads((tiny_ensembles["mean"] / "bundle" / "bundle.json").read_text())["threshold"]
    # an earlier export is replaced; a changed file is refused
    r = CliRunner().invoke(app, ["export", str(tiny_ensembles["mean"] / "bundle"), "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    (tmp_path / "onnx" / "export.json").write_text("{}")
    with pytest.raises(DataError, match="was modified or is incomplete"):
        verify_export(tmp_path / "onnx")


@pytest.mark.slow
def test_full_size_resnet18_at_224(tiny_sweep, tiny_ensembles, tmp_path):
    """A random-init ResNet-18 at 224 px next to a 32 px tiny_clip: two image inputs, one graph, same numbers."""
    from safetensors.torch import save_model

    from skinsweep.ensemble.export import export_bundle_onnx
    from skinsweep.train.backbones import create_backbone
    from skinsweep.train.model import Classifier, make_head

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_ensembles["stack"] / "bundle", bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    torch.manual_seed(0)
    bb = create_backbone("resnet18", weights="none")
    model = Classifier(bb.model, make_head("linear", bb.num_features))
    member = bundle / meta["members"][0]["path"]
    save_model(model, str(member / "checkpoint.safetensors"))
    _set_member(bundle, 0, backbone=bb.spec(), head={"kind": "linear", "hidden": 512, "dropout": 0.0},
                data_config=bb.data_config.to_dict(), image_size=224, tta="flips")
    info = export_bundle_onnx(bundle, tmp_path / "onnx")
    assert [i["name"] for i in info["inputs"]] == ["image_224_squash", "image_32_squash"]
    _compare(bundle, tmp_path / "onnx", _images(tiny_sweep, 6))


def test_a_member_that_resizes_matches_the_float_replay_of_pils_resize():
    """image_size 40, input 32: the graph resizes in float with PIL's per-pass uint8 rounding (transforms._resize,
    native=False) exactly, and stays within 2 uint8 levels of the uint8 kernels the bundle uses on a CPU."""
    from skinsweep.data.transforms import DataConfig, _as_nchw, _normalize, _resize
    from skinsweep.ensemble.export import _member_graph

    class Grab(torch.nn.Module):
        def forward(self, x):
            self.x = x
            return x.mean((1, 2, 3))

    cfg = DataConfig(input_size=32, crop_pct=1.0)
    grab = Grab()
    graph = _member_graph(grab, cfg.to_dict(), 40, "none")
    assert not graph.exact
    x = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    graph(x)
    levels = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    for native, most in ((False, 1e-3), (True, 2.0 + 1e-3)):
        ref = _normalize(_resize(_as_nchw(x), (32, 32), "bicubic", native=native), cfg.mean, cfg.std, 255.0)
        assert float(((grab.x - ref).abs() * levels).max()) <= most, native
