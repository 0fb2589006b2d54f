"""Deployment bundles: everything needed to score a new image, in JSON + safetensors (no pickle).

Layout::

    bundle.json                      members (backbone spec, data config, head), combiner and calibrator
                                     parameters, metadata encoder (when the stacker uses age/sex/site),
                                     threshold, recipe, split/recipe hashes, library versions
    members/<trial_id>/model.json    the trial's own model description (as written by the trial)
    members/<trial_id>/checkpoint.safetensors
    model_card.json, MODEL_CARD.md   the model card (:mod:`skinsweep.ensemble.model_card`): intended use, data,
                                     members, test metrics with CIs, calibration, operating point, subgroups
    training_images.parquet          image_id, split, label, sha256 of every image of the members' split
                                     manifest (train/val/test; ``calibration`` rows after a recalibration),
                                     so ``skinsweep evaluate`` can tell when "external" data holds them;
                                     absent when the dataset was not readable at export (or older bundles)
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
from skinsweep.errors import ConfigError, DataError, first_line
from skinsweep.files import atomic_path, atomic_write_text, json_safe
from skinsweep.metrics import sigmoid

BUNDLE_JSON = "bundle.json"
MANIFEST = "manifest.json"
TRAINING_IMAGES = "training_images.parquet"
FORMAT = 1


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def export_bundle(folder: str | Path, results, members: list[str], combiner, calibrator, threshold: float,
                  recipe, report: dict, *, metadata=None, predictions: pd.DataFrame | None = None) -> Path:
    """Write a bundle for ``members`` (trial ids of ``results``) with the fitted combiner/calibrator and,
    when the combiner stacks patient metadata, the fitted :class:`~skinsweep.ensemble.metadata.MetadataEncoder`.

    It also records what the bundle was fitted and tested on (``training`` in bundle.json and
    ``training_images.parquet``) and what it promised on its own test split (``promised``: the ensemble's
    test metrics with CIs), which ``skinsweep evaluate`` checks new data against, and writes the model
    card from ``report`` and ``predictions`` (the ensemble's per-image table; its test rows give the
    subgroup results, with age / sex / site joined from the dataset index when the table lacks them).
    """
    from skinsweep.ensemble.model_card import build_model_card, write_model_card
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
    record, training = training_record(results, members, report.get("split_hash"))
    if record is not None:
        with atomic_path(folder / TRAINING_IMAGES) as tmp:
            record.to_parquet(tmp, index=False)
    n = report.get("n") or {}
    if record is None and n.get("val"):  # prevalence the calibrator was fitted at, at least
        training["prevalence"] = {"val": n["val_pos"] / n["val"]}
    meta = {
        "format": FORMAT, "name": recipe.name, "members": entries, "combiner": combiner.to_dict(),
        "metadata": metadata.to_dict() if metadata is not None else None,
        "calibrator": calibrator.to_dict(), "threshold": float(threshold), "threshold_rule": recipe.threshold.kwargs(),
        "recipe": json.loads(recipe.model_dump_json()), "recipe_hash": recipe.hash,
        "split_hash": report.get("split_hash"), "versions": versions(),
        "training": training,
        "promised": {"split": "test", "n": n.get("test"), "n_pos": n.get("test_pos"),
                     "metrics": (report.get("test") or {}).get("ensemble")},
    }
    atomic_write_text(folder / BUNDLE_JSON, json.dumps(json_safe(meta), indent=2))
    if predictions is not None:
        predictions = _with_metadata(predictions, results, members)
    write_model_card(folder, build_model_card(json.loads((folder / BUNDLE_JSON).read_text()), report, predictions))
    write_manifest(folder)
    return folder


def _with_metadata(predictions: pd.DataFrame, results, members: list[str]) -> pd.DataFrame:
    """``predictions`` with the dataset's age / sex / site joined on image_id where it lacks them (for the
    card's subgroups); unchanged when the dataset is not readable here."""
    from skinsweep.ensemble.metadata import members_index
    from skinsweep.errors import SkinsweepError

    missing = [c for c in ("age", "sex", "site") if c not in predictions]
    if not missing:
        return predictions
    try:
        index = members_index(results, members, what="model card")
    except (SkinsweepError, OSError):
        return predictions
    cols = ["image_id"] + [c for c in missing if c in index.df]
    return predictions.merge(index.df[cols], on="image_id", how="left")


def write_manifest(folder: str | Path, **extra: Any) -> Path:
    """(Re)write ``manifest.json``: the sha256 of every other file of the bundle, and ``extra`` keys
    (a recalibrated bundle's ``parent`` hash and ``calibrated_on`` data)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, **extra, "files": {str(p.relative_to(folder)): _sha256(p) for p in files}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    return folder / MANIFEST


def bundle_hash(path: str | Path) -> str:
    """The bundle's identity: sha256 (16 hex) of its manifest, which holds the sha256 of every file."""
    return _sha256(Path(path) / MANIFEST)[:16]


def file_sha256(paths: Sequence[str | Path], *, progress: bool = False, label: str = "hashing images") -> list[str]:
    """sha256 of each file's bytes (the content hash leakage checks compare)."""
    from rich.progress import Progress

    out = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(label, total=len(paths))
        for p in paths:
            out.append(_sha256(Path(p)))
            bar.advance(task)
    return out


def training_record(results, members: list[str], split_hash: str | None) -> tuple[pd.DataFrame | None, dict]:
    """(image_id, split, label, sha256 per image of the members' split manifest, or None; bundle.json's
    ``training`` section: data root, hashes, prevalence per split, or why there is no record).

    The manifest is the sweep's ``split.parquet``, else the members' ``split`` setting, else the default
    split of their dataset; it must have the members' split hash. A dataset that is not readable here
    costs only the record (the bundle still scores images), and evaluate says leakage was not checked.
    """
    from skinsweep.data.split import SplitManifest, get_or_create_split
    from skinsweep.ensemble.metadata import members_index, trial_value
    from skinsweep.errors import SkinsweepError

    info: dict[str, Any] = {"split_hash": split_hash, "images": None}
    try:
        index = members_index(results, members, what="training record")
        info.update(data=str(index.root), dataset_hash=index.hash)
        trials = results.trials.set_index("trial_id").loc[list(members)]
        sweep_split = Path(results.path) / "split.parquet"
        if sweep_split.is_file():
            manifest = SplitManifest.load(sweep_split)
        elif "split" in trials and trials["split"].notna().any():
            manifest = SplitManifest.load(str(trials["split"].dropna().iloc[0]))
        else:
            manifest = get_or_create_split(index, seed=int(trial_value(trials, "split_seed", 0)))[0]
        if split_hash and manifest.hash != split_hash:
            raise DataError(f"the split found ({manifest.hash}) is not the members' split ({split_hash})")
        info["split_mode"] = manifest.meta.get("mode")
        df = manifest.df[["image_id", "split", "label"]].merge(index.df[["image_id", "path"]], on="image_id")
        df = df.assign(label=df["label"].astype("int8"), sha256=file_sha256(df["path"].tolist())).drop(columns="path")
    except (SkinsweepError, OSError) as e:  # e.g. the dataset is not mounted where the ensemble is built
        info["note"] = f"no training record: {first_line(e)}"
        return None, info
    info.update(images=TRAINING_IMAGES, n={s: int((df["split"] == s).sum()) for s in ("train", "val", "test")},
                n_pos={s: int(df.loc[df["split"] == s, "label"].sum()) for s in ("train", "val", "test")},
                prevalence={s: float(df.loc[df["split"] == s, "label"].mean()) for s in ("train", "val", "test")
                            if (df["split"] == s).any()})
    return df.reset_index(drop=True), info


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
        """Logits (N, M) for ``images`` (file paths, the bytes of image files, :class:`Decoded`, or PIL images).

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

    def score(self, images: Sequence, *, tta: bool = False, metadata: pd.DataFrame | None = None,
              image_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(member logits (N, M), ensemble logits (N,), no_row (N,) or None): :meth:`predict` before the
        calibrator. ``image_ids`` match ``metadata`` rows (default: each file's stem)."""
        extra, no_row = self._metadata_features(images, metadata, image_ids)
        X = self.member_logits(images, tta=tta)
        return X, self.combiner.predict_logit(X, extra=extra), no_row

    def predict(self, images: Sequence, *, tta: bool = False, metadata: pd.DataFrame | None = None,
                image_ids: Sequence[str] | None = None) -> pd.DataFrame:
        """Per image: member probabilities, ensemble probability, calibrated probability, decision.

        ``images``: file paths, the bytes of image files (decoded exactly as the file would be), their
        :class:`Decoded` images, or PIL images. ``metadata`` (needed when :attr:`metadata_features` is
        not empty, ignored otherwise): a table with ``image_id`` and those columns (``site`` may be called ``localization``, as in
        HAM10000_metadata.csv), matched to each image by its file stem, or by ``image_ids`` when given
        (in-memory images have no stem). Images without a row are scored with unknown metadata and
        marked in the ``metadata_missing`` column.
        """
        X, ens, no_row = self.score(images, tta=tta, metadata=metadata, image_ids=image_ids)
        cal = self.calibrator.predict_proba(ens)
        df = pd.DataFrame({f"prob_{m}": sigmoid(X[:, j]) for j, m in enumerate(self.member_ids)})
        df.insert(0, "image", [str(i) if isinstance(i, (str, Path)) else f"<image {k}>" for k, i in enumerate(images)])
        df["ensemble_prob"] = sigmoid(ens)
        df["calibrated_prob"] = cal
        df["decision"] = (cal >= self.threshold).astype("int8")
        if no_row is not None:
            df["metadata_missing"] = no_row
        return df

    def training_images(self) -> pd.DataFrame | None:
        """``training_images.parquet`` (image_id, split, label, sha256), or None when the bundle has none."""
        path = self.path / TRAINING_IMAGES
        return pd.read_parquet(path) if path.is_file() else None

    def check_metadata(self, metadata: pd.DataFrame | None) -> None:
        """Raise ConfigError when the bundle needs metadata and none is given (before any scoring)."""
        if self.metadata_features and metadata is None:
            cols = ", ".join("localization" if f == "site" else f for f in self.metadata_features)
            raise ConfigError(f"bundle {self.path} stacks patient metadata ({', '.join(self.metadata_features)}) "
                              f"with the images; pass a table with image_id, {cols} (skinsweep predict --metadata "
                              "meta.csv, as HAM10000_metadata.csv; Bundle.predict(images, metadata=df))")

    def _metadata_features(self, images: Sequence, metadata,
                           image_ids: Sequence[str] | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(extra (N, F), no_row (N,)) for the stacker, or (None, None) for a bundle without metadata."""
        from skinsweep.ensemble.metadata import join_metadata, metadata_table

        self.check_metadata(metadata)
        if not self.metadata_features:
            return None, None
        table = metadata_table(pd.DataFrame(metadata), self.metadata_features, "metadata")
        stems = [Path(i).stem if isinstance(i, (str, Path)) else None for i in images]  # in-memory: no id
        rows, no_row = join_metadata(table, list(image_ids) if image_ids is not None else stems)
        return self.metadata_encoder.transform(rows), no_row


@dataclass(frozen=True)
class Decoded:
    """An image file's RGB PIL image exactly as :func:`read_rgb` / :func:`decode_bytes` returned it, for
    :meth:`Bundle.predict` to resize without decoding the file a second time (the HTTP service decodes
    each upload once, to check it, then scores that decode)."""

    image: Any


def decode_bytes(data: bytes):
    """The RGB PIL image of an image file's bytes, decoded exactly as :func:`read_rgb` decodes the file
    (same decoder, EXIF orientation, mode conversion): what the HTTP service scores. Raises what PIL
    raises for bytes that are not a complete image."""
    import io

    return read_rgb(io.BytesIO(data))


def _decode(image, size: int, policy: str, decode_resize) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return decode_resize(image, size, policy)
    if isinstance(image, (bytes, bytearray, memoryview, Decoded)):  # a file's bytes: the file's own decode path
        from skinsweep.data.cache import resize_like_cache

        rgb = image.image if isinstance(image, Decoded) else decode_bytes(bytes(image))
        return resize_like_cache(rgb, size, policy)
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
