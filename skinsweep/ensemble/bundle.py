"""Deployment bundles: everything needed to score a new image, in JSON + safetensors (no pickle).

Layout::

    bundle.json                      members (backbone spec, data config, head), combiner and calibrator
                                     parameters, metadata encoder (when the stacker uses age/sex/site),
                                     threshold, recipe, split/recipe hashes, library versions
    members/<trial_id>/model.json    the trial's own model description (as written by the trial)
    members/<trial_id>/checkpoint.safetensors
    manifest.json                    sha256 of every file above

:func:`load_bundle` verifies the manifest first and refuses a tampered or incomplete bundle.
``Bundle.predict`` reproduces the evaluation path exactly: decode + resize as the image cache does,
the member's eval transform, member logits (averaged over the views of the member's recorded ``tta``,
as its trial scored val and test), combiner, calibrator, threshold. A bundle whose stacker
uses patient metadata needs it at predict time (``metadata=``, matched to images by file stem).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from skinsweep.data.index import IMAGE_EXTENSIONS, read_rgb
from skinsweep.errors import ConfigError, DataError
from skinsweep.files import atomic_write_text
from skinsweep.metrics import sigmoid

BUNDLE_JSON = "bundle.json"
MANIFEST = "manifest.json"
FORMAT = 1


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def export_bundle(folder: str | Path, results, members: list[str], combiner, calibrator, threshold: float,
                  recipe, report: dict, *, metadata=None) -> Path:
    """Write a bundle for ``members`` (trial ids of ``results``) with the fitted combiner/calibrator and,
    when the combiner stacks patient metadata, the fitted :class:`~skinsweep.ensemble.metadata.MetadataEncoder`."""
    from skinsweep.train.loop import versions

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # a bundle is rebuilt whole; never a mix of two builds
    (folder / "members").mkdir(parents=True)
    trials = results.trials.set_index("trial_id")
    entries = []
    for m in members:
        ckpt = Path(str(trials.loc[m, "checkpoint"]))
        model_json = ckpt.with_name("model.json")
        if not ckpt.is_file() or not model_json.is_file():
            raise DataError(f"member {m}: checkpoint {ckpt} (or its model.json) is missing; the sweep's storage "
                            "must be readable from here")
        dst = folder / "members" / m
        dst.mkdir()
        shutil.copy2(ckpt, dst / "checkpoint.safetensors")
        shutil.copy2(model_json, dst / "model.json")
        entries.append({"trial_id": m, "path": f"members/{m}", "model": json.loads(model_json.read_text())})
    meta = {
        "format": FORMAT, "name": recipe.name, "members": entries, "combiner": combiner.to_dict(),
        "metadata": metadata.to_dict() if metadata is not None else None,
        "calibrator": calibrator.to_dict(), "threshold": float(threshold), "threshold_rule": recipe.threshold.kwargs(),
        "recipe": json.loads(recipe.model_dump_json()), "recipe_hash": recipe.hash,
        "split_hash": report.get("split_hash"), "versions": versions(),
    }
    atomic_write_text(folder / BUNDLE_JSON, json.dumps(meta, indent=2))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {"format": FORMAT, "files": {str(p.relative_to(folder)): _sha256(p) for p in files}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    return folder


@dataclass
class Bundle:
    path: Path
    meta: dict
    models: list[Any]            # Classifier per member, eval mode
    model_meta: list[dict]
    combiner: Any
    calibrator: Any
    metadata_encoder: Any = None  # MetadataEncoder when the stacker uses age/sex/site, else None

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def metadata_features(self) -> list[str]:
        """Patient metadata the bundle needs at predict time (``[]``: images only)."""
        return list(self.metadata_encoder.features_) if self.metadata_encoder is not None else []

    @property
    def member_ids(self) -> list[str]:
        return [e["trial_id"] for e in self.meta["members"]]

    def member_logits(self, images: Sequence, *, tta: bool = False, batch_size: int = 32) -> np.ndarray:
        """Logits (N, M) for ``images`` (file paths or PIL images).

        Each member applies the test-time augmentation its trial was scored with (model.json ``tta``;
        absent: none), so a member's logit is its trial's stored prediction. ``tta=True`` adds the mirror
        image for members without one; members with ``flips``/``dihedral`` already average over sets
        closed under mirroring, where it would change nothing.
        """
        import torch

        from skinsweep.data.cache import decode_resize
        from skinsweep.data.transforms import DataConfig, eval_transform, tta_logits

        out = np.zeros((len(images), len(self.models)), dtype=np.float64)
        decoded: dict[tuple, np.ndarray] = {}
        for j, (model, mm) in enumerate(zip(self.models, self.model_meta)):
            key = (int(mm["image_size"]), mm["resize_policy"])
            if key not in decoded:  # members sharing a size/policy share one decode
                decoded[key] = np.stack([_decode(im, *key, decode_resize) for im in images])
            t = eval_transform(DataConfig.from_dict(mm["data_config"]))
            views = mm.get("tta", "none")
            arr = decoded[key]
            for s in range(0, len(arr), batch_size):
                x = t(torch.from_numpy(arr[s:s + batch_size].copy()))
                with torch.no_grad():
                    logit = tta_logits(model, x, views)
                    if tta and views == "none":
                        logit = (logit + model(torch.flip(x, dims=[-1]))) / 2
                out[s:s + batch_size, j] = logit.double().numpy()
        return out

    def predict(self, images: Sequence, *, tta: bool = False, metadata: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per image: member probabilities, ensemble probability, calibrated probability, decision.

        ``metadata`` (needed when :attr:`metadata_features` is not empty, ignored otherwise): a table
        with ``image_id`` and those columns (``site`` may be called ``localization``, as in
        HAM10000_metadata.csv), matched to each image by its file stem. Images without a row are scored
        with unknown metadata and marked in the ``metadata_missing`` column.
        """
        extra, no_row = self._metadata_features(images, metadata)
        X = self.member_logits(images, tta=tta)
        ens = self.combiner.predict_logit(X, extra=extra)
        cal = self.calibrator.predict_proba(ens)
        df = pd.DataFrame({f"prob_{m}": sigmoid(X[:, j]) for j, m in enumerate(self.member_ids)})
        df.insert(0, "image", [str(i) if isinstance(i, (str, Path)) else f"<image {k}>" for k, i in enumerate(images)])
        df["ensemble_prob"] = sigmoid(ens)
        df["calibrated_prob"] = cal
        df["decision"] = (cal >= self.threshold).astype("int8")
        if extra is not None:
            df["metadata_missing"] = no_row
        return df

    def check_metadata(self, metadata: pd.DataFrame | None) -> None:
        """Raise ConfigError when the bundle needs metadata and none is given (before any scoring)."""
        if self.metadata_features and metadata is None:
            cols = ", ".join("localization" if f == "site" else f for f in self.metadata_features)
            raise ConfigError(f"bundle {self.path} stacks patient metadata ({', '.join(self.metadata_features)}) "
                              f"with the images; pass a table with image_id, {cols} (skinsweep predict --metadata "
                              "meta.csv, as HAM10000_metadata.csv; Bundle.predict(images, metadata=df))")

    def _metadata_features(self, images: Sequence, metadata) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(extra (N, F), no_row (N,)) for the stacker, or (None, None) for a bundle without metadata."""
        from skinsweep.ensemble.metadata import join_metadata, metadata_table

        self.check_metadata(metadata)
        if not self.metadata_features:
            return None, None
        table = metadata_table(pd.DataFrame(metadata), self.metadata_features, "metadata")
        stems = [Path(i).stem if isinstance(i, (str, Path)) else None for i in images]  # in-memory: no id
        rows, no_row = join_metadata(table, stems)
        return self.metadata_encoder.transform(rows), no_row


def _decode(image, size: int, policy: str, decode_resize) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return decode_resize(image, size, policy)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".png") as f:  # same decode path for in-memory images
        image.save(f.name)
        return decode_resize(f.name, size, policy)


def verify_bundle(path: str | Path) -> dict:
    """Check the manifest: every listed file present with its sha256, bundle.json listed. Returns bundle.json."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise DataError(f"{path} is not a skinsweep bundle (no {MANIFEST}); build one with `skinsweep ensemble build`")
    manifest = json.loads((path / MANIFEST).read_text())
    files = manifest.get("files", {})
    if BUNDLE_JSON not in files:
        raise DataError(f"{path}/{MANIFEST} does not list {BUNDLE_JSON}; the bundle is incomplete — rebuild it")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise DataError(f"bundle {path} is incomplete: missing {', '.join(missing[:3])}; rebuild it")
    changed = [f for f, h in files.items() if _sha256(path / f) != h]
    if changed:
        raise DataError(f"bundle {path} was modified after it was built ({', '.join(changed[:3])} fail the sha256 "
                        "check); rebuild it with `skinsweep ensemble build`")
    return json.loads((path / BUNDLE_JSON).read_text())


def load_bundle(path: str | Path) -> Bundle:
    """Verify and load a bundle (CPU). ``load_bundle(p).predict([...])`` scores images."""
    from skinsweep.ensemble.calibrators import Calibrator
    from skinsweep.ensemble.combiners import Combiner
    from skinsweep.ensemble.metadata import MetadataEncoder
    from skinsweep.train.loop import load_trial_model

    path = Path(path)
    meta = verify_bundle(path)
    models, model_meta = [], []
    for e in meta["members"]:
        model, mm = load_trial_model(path / e["path"])
        models.append(model)
        model_meta.append(mm)
    return Bundle(path=path, meta=meta, models=models, model_meta=model_meta,
                  combiner=Combiner.from_dict(meta["combiner"]), calibrator=Calibrator.from_dict(meta["calibrator"]),
                  metadata_encoder=MetadataEncoder.from_dict(meta["metadata"]) if meta.get("metadata") else None)


# --------------------------------------------------------------------------------------------------
# Scoring files: folders expanded, unreadable files reported per row, the rest scored
# --------------------------------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders → their image files (sorted, recursive)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist; pass image files or folders of images")
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def predict_files(bundle, inputs: Sequence[str | Path], *, tta: bool = False, batch: int = 64,
                  progress: bool = False, metadata: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per file: ``image, prob_<member>…, ensemble_prob, calibrated_prob, decision, error``.

    A file that is not a readable image gets a row with its ``error`` and no scores; the others are
    scored in batches of ``batch`` (with a progress bar when ``progress``). ``metadata`` (image_id =
    file stem, age, sex, localization) is required by bundles whose stacker uses it; those add a
    ``metadata_missing`` column (True: no row for the image, scored with unknown metadata).
    """
    from rich.progress import Progress

    bundle.check_metadata(metadata)  # fail before decoding anything
    files = expand_inputs(inputs)
    good, errors = [], {}
    for f in files:
        try:
            read_rgb(f)
            good.append(f)
        except Exception as e:  # noqa: BLE001 - any decoder failure is reported on the file's row
            errors[str(f)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    parts = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("scoring", total=len(good))
        for s in range(0, len(good), batch):
            parts.append(bundle.predict([str(f) for f in good[s:s + batch]], tta=tta, metadata=metadata))
            bar.advance(task, len(good[s:s + batch]))
    scored = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["image"])
    failed = pd.DataFrame({"image": list(errors), "error": list(errors.values())})
    df = pd.concat([scored.assign(error=None), failed], ignore_index=True)
    df["decision"] = df["decision"].astype("Int8")  # stays an integer column beside error rows (<NA>)
    if "metadata_missing" in df:
        df["metadata_missing"] = df["metadata_missing"].astype("boolean")
    order = {str(f): k for k, f in enumerate(files)}
    return df.sort_values("image", key=lambda c: c.map(order)).reset_index(drop=True)
