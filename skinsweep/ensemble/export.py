"""Export a bundle as one ONNX graph, for runtimes without skinsweep (``skinsweep export``).

    info = export_bundle_onnx("ensembles/dino_clip/bundle", "deploy/dino_clip")   # model.onnx, export.json
    sess = onnxruntime.InferenceSession("deploy/dino_clip/model.onnx")
    member_probs, ensemble_prob, calibrated_prob, decision = sess.run(None, {"image": batch})  # uint8 (N, S, S, 3)

The graph takes the images **already decoded and resized as the bundle does** (upright RGB, the
member's ``resize_policy`` then PIL bicubic to ``image_size``: :func:`skinsweep.data.cache.decode_resize`),
as uint8 ``(N, S, S, 3)``, and holds everything after that: each member's eval transform (crop,
normalisation; a resize when the member's input size differs from the bundle's image size), the member
with the test-time-augmentation views its trial was scored with (``tta`` flips / dihedral), the combiner
(with a ``metadata`` input of the encoded age / sex / site features when the stacker uses them), the
calibrator and the threshold. Members that share an image size and resize policy share one input
(``image``; several sizes: ``image_<size>_<policy>``). ``export.json`` beside it gives the resize rule,
the threshold, the input and output names and shapes; ``manifest.json`` the sha256 of every file.

The combiner and calibrator run in float64, as in :class:`~skinsweep.ensemble.bundle.Bundle`, so the
graph reproduces ``Bundle.predict`` to float32 rounding of the members (tested to 1e-4). One exception:
a member whose eval transform resizes (``image_size`` differs from ``input_size / crop_pct``) resizes
in float with PIL's per-pass uint8 rounding, where the bundle on a CPU uses torch's uint8 kernels; the
two differ by at most 2 uint8 levels on some pixels (measured: 1 level on 0.6% of the pixels of a 40 -> 32 px
resize; ``export.json`` says ``exact_preprocessing: false``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError, DataError, first_line

FORMATS = ("onnx",)
MODEL_ONNX = "model.onnx"
EXPORT_JSON = "export.json"
OUTPUTS = ("member_probs", "ensemble_prob", "calibrated_prob", "decision")
OPSET = 18


# --------------------------------------------------------------------------------------------------
# The graph: torch modules built from a loaded bundle
# --------------------------------------------------------------------------------------------------

def _resize_matrix(n_in: int, n_out: int, mode: str):
    """(n_out, n_in) float64 matrix of the float antialiased resize (``transforms._interp``) along one axis:
    interpolation is linear, so resizing the identity gives its matrix."""
    import torch

    from skinsweep.data.transforms import _interp

    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    return _interp(eye, (1, n_out), mode).view(n_in, n_out).T.contiguous()


def _member_graph(model, data_config: dict, image_size: int, tta: str):
    """uint8 (N, S, S, 3) -> float32 logits (N,): ``EvalTransform`` + ``tta_logits`` of one member."""
    import torch

    from skinsweep.data.transforms import DataConfig, _eval_geometry, tta_views

    cfg = DataConfig.from_dict(data_config)
    (rh, rw), (top, left) = _eval_geometry(cfg, image_size, image_size)
    s = cfg.input_size
    resize = (rh, rw) != (image_size, image_size)
    # the same float32 constants and formula as transforms._normalize: x * (1 / (255 std)) - mean / std
    m = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)

    class MemberGraph(torch.nn.Module):
        exact = not resize

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("scale", 1.0 / (255.0 * sd))
            self.register_buffer("offset", m / sd)
            if resize:  # PIL's two passes (horizontal first), each rounded to uint8 (transforms._resize)
                self.register_buffer("rw", _resize_matrix(image_size, rw, cfg.interpolation).float())
                self.register_buffer("rh", _resize_matrix(image_size, rh, cfg.interpolation).float())

        def forward(self, img):
            x = img.permute(0, 3, 1, 2).to(torch.float32)
            if resize:
                x = torch.round(torch.clamp(torch.matmul(x, self.rw.T), 0.0, 255.0))
                x = torch.round(torch.clamp(torch.matmul(self.rh, x), 0.0, 255.0))
            x = x[:, :, top:top + s, left:left + s]
            x = x * self.scale - self.offset
            views = tta_views(x, tta)
            total = self.model(views[0]).float()
            for v in views[1:]:  # summed in order, then divided: tta_logits' arithmetic
                total = total + self.model(v).float()
            return total if len(views) == 1 else total / len(views)

    return MemberGraph()


def input_keys(bundle) -> list[tuple[int, str]]:
    """The distinct (image_size, resize_policy) of the members, in member order: one graph input each."""
    return list(dict.fromkeys((int(mm["image_size"]), mm["resize_policy"]) for mm in bundle.model_meta))


def input_name(key: tuple[int, str], keys: Sequence[tuple[int, str]]) -> str:
    return "image" if len(keys) == 1 else f"image_{key[0]}_{key[1].replace('-', '_')}"


def bundle_graph(bundle):
    """The whole bundle as one module: ``forward(*images[, metadata])`` -> (member_probs (N, M) float32,
    ensemble_prob (N,) float32, calibrated_prob (N,) float32, decision (N,) int64)."""
    import torch

    keys = input_keys(bundle)
    members = [_member_graph(model, mm["data_config"], int(mm["image_size"]), mm.get("tta", "none"))
               for model, mm in zip(bundle.models, bundle.model_meta)]
    which = [keys.index((int(mm["image_size"]), mm["resize_policy"])) for mm in bundle.model_meta]
    combiner, calibrator = bundle.combiner.torch_module(), bundle.calibrator.torch_module()
    threshold, n_images, use_meta = bundle.threshold, len(keys), bool(bundle.metadata_features)

    class BundleGraph(torch.nn.Module):
        exact = all(m.exact for m in members)

        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)
            self.combiner, self.calibrator = combiner, calibrator

        def forward(self, *inputs):
            images, meta = inputs[:n_images], (inputs[n_images] if use_meta else None)
            X = torch.stack([m(images[k]) for m, k in zip(self.members, which)], dim=1).to(torch.float64)
            ens = self.combiner(X, meta.to(torch.float64)) if use_meta else self.combiner(X)
            cal = self.calibrator(ens)
            return (torch.sigmoid(X).float(), torch.sigmoid(ens).float(), cal.float(),
                    (cal >= threshold).to(torch.int64))

    return BundleGraph().eval()


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def _prepare_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier export (replaced whole), and writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder for the exported model")
    if out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_JSON).is_file():
            raise ConfigError(f"--out {out} exists and is not an earlier export; choose a new or empty folder")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write --out {out} ({e.strerror or first_line(e)}); choose a writable folder") from None


def _operator(e: BaseException) -> str:
    """The operator an exporter error names (``aten::foo`` / ``aten.foo.default`` / ``torch.ops.…``), if any."""
    text = "\n".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
    for pattern in (r"(aten::[A-Za-z0-9_.]+)", r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)",
                    r"(torch\.ops\.[A-Za-z0-9_.]+)", r"operator[ '`\"]+([A-Za-z0-9_:.]+)"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    summary = re.search(r"## Exception summary\s*\n\s*(?:<class '[^']*'>: )?([^\n]+)", text)
    return "unknown (" + (summary.group(1) if summary else first_line(e))[:200] + ")"


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warnings; the CLI's output is its own."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import logging

        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def _onnx_export(module, args: tuple, path: Path | None, names: list[str], *, opset: int, external: bool,
                 varargs: bool = True):
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} for _ in args)
    if varargs:  # forward(*inputs): one entry, the tuple of per-input specs
        dynamic = (dynamic,)
    with _quiet():
        return torch.onnx.export(module, args, str(path) if path else None, dynamo=True, input_names=names,
                                 output_names=list(OUTPUTS) if path else None, dynamic_shapes=dynamic,
                                 opset_version=opset, external_data=external, optimize=True)


def _example_inputs(bundle, keys, n: int = 2, seed: int = 0) -> tuple:
    import torch

    g = torch.Generator().manual_seed(seed)
    images = tuple(torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=g) for s, _ in keys)
    if bundle.metadata_features:
        width = len(bundle.metadata_encoder.feature_names_)
        return images + (torch.rand(n, width, generator=g, dtype=torch.float32),)
    return images


def _diagnose(bundle, error: BaseException, opset: int) -> str:
    """Which member does not export, and on which operator (each member exported alone)."""
    import torch

    for model, mm, tid in zip(bundle.models, bundle.model_meta, bundle.member_ids):
        s = int(mm["image_size"])
        member = _member_graph(model, mm["data_config"], s, mm.get("tta", "none")).eval()
        try:
            _onnx_export(member, (torch.zeros(2, s, s, 3, dtype=torch.uint8),), None, ["image"], opset=opset,
                         external=False, varargs=False)
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported in one line
            spec = mm.get("backbone", {})
            name = spec.get("name", "?") if isinstance(spec, dict) else str(spec)
            return (f"member {tid} (backbone {name}) does not export to ONNX: operator {_operator(e)} is not "
                    f"supported by torch.onnx (opset {opset}); leave this member out of the ensemble to export it")
    return f"the bundle's combiner or calibrator does not export to ONNX: operator {_operator(error)}"


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_bundle_onnx(bundle: str | Path, out: str | Path, *, fmt: str = "onnx", opset: int = OPSET,
                       log: Callable[[str], None] = lambda m: None) -> dict:
    """Write ``out/model.onnx`` (the whole bundle as one graph), ``out/export.json`` and ``out/manifest.json``.

    Returns the ``export.json`` dict. The graph is checked against the bundle's own torch modules on
    random images with onnxruntime before anything is reported (``check.max_abs_diff``).
    """
    import torch

    from skinsweep.ensemble.bundle import bundle_hash, load_bundle, write_manifest
    from skinsweep.errors import did_you_mean
    from skinsweep.train.loop import versions

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported{did_you_mean(fmt, FORMATS)}; use one of {', '.join(FORMATS)}")
    b = load_bundle(bundle)
    out = Path(out)
    if out.resolve() == Path(bundle).resolve():
        raise ConfigError(f"--out {out} is the bundle itself; export to a new folder")
    graph = bundle_graph(b)  # combiner / calibrator that cannot export fail here, before anything is written
    _prepare_out(out)
    keys = input_keys(b)
    names = [input_name(k, keys) for k in keys] + (["metadata"] if b.metadata_features else [])
    args = _example_inputs(b, keys)
    n_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    log(f"exporting {len(b.models)} member(s), {n_bytes / 2**20:,.1f} MiB of weights, to {out / MODEL_ONNX}")
    try:
        _onnx_export(graph, args, out / MODEL_ONNX, names, opset=opset, external=n_bytes > 1.8 * 2**30)
    except Exception as e:  # noqa: BLE001 - rephrased as one line naming the member and the operator
        shutil.rmtree(out, ignore_errors=True)
        raise ConfigError(_diagnose(b, e, opset)) from None

    # ---- check: onnxruntime against the torch graph, on other random images ---------------------------
    check = _example_inputs(b, keys, n=3, seed=1)
    with torch.no_grad():
        ref = [t.numpy() for t in graph(*check)]
    got = _ort_session(out / MODEL_ONNX).run(None, {n: a.numpy() for n, a in zip(names, check)})
    diff = max(float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) for r, g in zip(ref[:3], got[:3]))
    if not diff < 1e-3:
        raise DataError(f"the exported graph does not reproduce the bundle (max difference {diff:.3g} on random "
                        "images); report this with the bundle's backbones")

    import onnx
    import onnxruntime

    members = [{"trial_id": tid, "backbone": mm.get("backbone"), "mode": mm.get("mode"), "tta": mm.get("tta", "none"),
                "input": names[keys.index((int(mm["image_size"]), mm["resize_policy"]))],
                "data_config": mm["data_config"]}
               for tid, mm in zip(b.member_ids, b.model_meta)]
    inputs = [{"name": names[i], "dtype": "uint8", "shape": ["N", s, s, 3], "layout": "NHWC, RGB, 0..255",
               "resize": {"size": s, "policy": p, "rule": _resize_rule(s, p)},
               "members": [m["trial_id"] for m in members if m["input"] == names[i]]}
              for i, (s, p) in enumerate(keys)]
    if b.metadata_features:
        enc = b.metadata_encoder
        inputs.append({"name": "metadata", "dtype": "float32", "shape": ["N", len(enc.feature_names_)],
                       "columns": list(enc.feature_names_), "encoder": enc.to_dict(),
                       "rule": "skinsweep.ensemble.metadata.MetadataEncoder.transform: age in years (missing: "
                               f"{enc.age_mean_ if enc.age_mean_ is not None else '-'} and age_missing=1), one-hot "
                               "sex and site (unknown / unseen: the =unknown column)"})
    info = {
        "format": "onnx", "opset": opset, "file": MODEL_ONNX, "name": b.meta.get("name"),
        "bundle": str(bundle), "bundle_hash": bundle_hash(bundle),
        "inputs": inputs,
        "outputs": [
            {"name": "member_probs", "dtype": "float32", "shape": ["N", len(members)], "columns": b.member_ids,
             "meaning": "sigmoid of each member's logit (after its test-time augmentation)"},
            {"name": "ensemble_prob", "dtype": "float32", "shape": ["N"], "meaning": "sigmoid of the combiner's logit"},
            {"name": "calibrated_prob", "dtype": "float32", "shape": ["N"], "meaning": "the calibrated melanoma probability"},
            {"name": "decision", "dtype": "int64", "shape": ["N"], "meaning": "1 when calibrated_prob >= threshold"},
        ],
        "threshold": b.threshold, "threshold_rule": b.meta.get("threshold_rule"),
        "members": members, "combiner": b.meta["combiner"]["kind"], "calibrator": b.meta["calibrator"]["kind"],
        "exact_preprocessing": bool(graph.exact),
        "check": {"max_abs_diff": diff, "against": "the bundle's torch modules, 3 random images, onnxruntime CPU"},
        "versions": {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    from skinsweep.files import atomic_write_text, json_safe

    atomic_write_text(out / EXPORT_JSON, json.dumps(json_safe(info), indent=2))
    write_manifest(out, bundle={"path": str(bundle), "hash": info["bundle_hash"]})
    return info


def _resize_rule(size: int, policy: str) -> str:
    crop = ("crop the centre square (side = the shorter side), then " if policy == "center-crop" else "")
    return (f"decode to upright RGB (EXIF orientation applied), {crop}resize to {size}x{size} with PIL bicubic "
            f"(skinsweep.data.cache.decode_resize(path, {size}, '{policy}'))")


# --------------------------------------------------------------------------------------------------
# Scoring files with an export (tests, benchmarks, and anyone with skinsweep installed)
# --------------------------------------------------------------------------------------------------

def verify_export(folder: str | Path) -> dict:
    """Check an export folder's manifest; returns its export.json."""
    from skinsweep.ensemble.bundle import MANIFEST, _sha256

    folder = Path(folder)
    if not (folder / EXPORT_JSON).is_file() or not (folder / MANIFEST).is_file():
        raise DataError(f"{folder} is not a skinsweep export (no {EXPORT_JSON} / {MANIFEST}); run `skinsweep export`")
    files = json.loads((folder / MANIFEST).read_text()).get("files", {})
    bad = [f for f, h in files.items() if not (folder / f).is_file() or _sha256(folder / f) != h]
    if bad or EXPORT_JSON not in files:
        raise DataError(f"export {folder} was modified or is incomplete ({', '.join(bad[:3]) or EXPORT_JSON}); export again")
    return json.loads((folder / EXPORT_JSON).read_text())


class OnnxBundle:
    """An export folder, run with onnxruntime: ``OnnxBundle(dir).predict(paths)`` is ``Bundle.predict``'s table."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.info = verify_export(self.folder)
        self.session = _ort_session(self.folder / self.info["file"])
        self.images = [i for i in self.info["inputs"] if i["dtype"] == "uint8"]
        self.meta_input = next((i for i in self.info["inputs"] if i["name"] == "metadata"), None)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for ``feeds`` (input name -> array)."""
        return dict(zip(OUTPUTS, self.session.run(None, feeds)))

    def feeds(self, images: Sequence[str | Path], metadata: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
        from skinsweep.data.cache import decode_resize

        feeds = {i["name"]: np.stack([decode_resize(p, i["resize"]["size"], i["resize"]["policy"]) for p in images])
                 for i in self.images}
        if self.meta_input is not None:
            from skinsweep.ensemble.metadata import MetadataEncoder, join_metadata, metadata_table

            if metadata is None:
                raise ConfigError("this export stacks patient metadata; pass metadata= (image_id, age, sex, localization)")
            enc = MetadataEncoder.from_dict(self.meta_input["encoder"])
            table = metadata_table(pd.DataFrame(metadata), list(enc.features_), "metadata")
            rows, _ = join_metadata(table, [Path(p).stem for p in images])
            feeds["metadata"] = enc.transform(rows).astype(np.float32)
        return feeds

    def predict(self, images: Sequence[str | Path], metadata: pd.DataFrame | None = None) -> pd.DataFrame:
        out = self.run(self.feeds(images, metadata))
        df = pd.DataFrame({f"prob_{m}": out["member_probs"][:, j]
                           for j, m in enumerate(self.info["outputs"][0]["columns"])})
        df.insert(0, "image", [str(p) for p in images])
        return df.assign(ensemble_prob=out["ensemble_prob"], calibrated_prob=out["calibrated_prob"],
                         decision=out["decision"].astype("int8"))


__all__ = ["EXPORT_JSON", "FORMATS", "MODEL_ONNX", "OnnxBundle", "bundle_graph", "export_bundle_onnx", "verify_export"]
