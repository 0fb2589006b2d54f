"""What one replica of the HTTP service does, without Ray or HTTP: check uploads, score them, explain them.

:class:`Scorer` wraps a verified :class:`~skinsweep.ensemble.bundle.Bundle`. Uploads are checked one by
one (:meth:`Scorer.check_upload`: empty, too large, wrong content type, not an image, truncated) and
raise :class:`RequestError` (an HTTP status, a code, a message naming the file); the images that pass
are scored together (:meth:`Scorer.score`, one forward pass per batch) exactly as ``skinsweep
predict`` scores files: the upload's bytes go through the same decoder as a file's
(:func:`~skinsweep.ensemble.bundle.decode_bytes`), the same resize and the same members.

The client's file name is only ever a label in the response: nothing is read from or written to a
path it names.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

# Content types a browser or curl sends for an image file; anything else (text/plain, application/pdf …)
# is refused before decoding, with 415.
IMAGE_TYPES = ("image/", "application/octet-stream")
SEXES = ("female", "male", "unknown", "")
# Decoded size limit: a small file can hold a huge image (a 30 KB PNG of 20,000 x 20,000 decodes to 1.2 GB).
# Dermatoscope photographs are at most ~24 MP; PIL's own guard (DecompressionBombError) starts at 179 MP.
MAX_PIXELS = 64_000_000
HEATMAP_SIDE = 512  # longest side of a returned heat-map PNG, in pixels (keeps responses small)


class RequestError(Exception):
    """A bad request: ``status`` (4xx), ``code`` (stable, for clients), message, and the file it concerns."""

    def __init__(self, status: int, code: str, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.file = status, code, message, file

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "file": self.file}}


@dataclass
class Upload:
    """One checked image: its display name, bytes, decoded RGB image and metadata row (or None)."""

    name: str
    data: bytes
    image: Any  # PIL.Image.Image, RGB
    metadata: dict | None = None


@dataclass
class Limits:
    max_upload_mb: float = 20.0
    max_files: int = 64

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def display_name(filename: str | None, k: int) -> str:
    """A label for the k-th upload (0-based): the client's base name without control characters, at most
    120 characters; ``file <k+1>`` when it sent none. Never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:120] or f"file {k + 1}"


class Scorer:
    """A bundle ready to score uploads. ``lock`` serialises model use (a batch's forward pass and a
    Grad-CAM pass share the members' modules and hooks)."""

    def __init__(self, bundle, *, limits: Limits | None = None) -> None:
        from skinsweep.ensemble.bundle import bundle_hash

        self.bundle = bundle
        self.limits = limits or Limits()
        self.hash = bundle_hash(bundle.path)
        self.name = str(bundle.meta.get("name"))
        self.lock = threading.Lock()
        self.batches = self.images = 0  # scored by this replica: the mean batch size shows batching at work
        self.card = model_card(bundle, self.hash)
        self.members = [{"trial_id": e["trial_id"], "backbone": _backbone_name(mm), "mode": mm.get("mode")}
                        for e, mm in zip(bundle.meta["members"], bundle.model_meta)]

    # ---- checks -----------------------------------------------------------------------------------
    def check_upload(self, name: str, content_type: str | None, data: bytes) -> Upload:
        """Refuse an empty, oversized, non-image or undecodable upload (RequestError naming ``name``)."""
        from skinsweep.ensemble.bundle import decode_bytes

        ctype = (content_type or "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith(IMAGE_TYPES):
            raise RequestError(415, "unsupported_media_type",
                               f"{name}: content type {ctype} is not an image; send JPEG or PNG files "
                               "(image/jpeg, image/png)", name)
        if not data:
            raise RequestError(400, "empty_file", f"{name} is empty (0 bytes)", name)
        if len(data) > self.limits.max_upload_bytes:
            raise RequestError(413, "file_too_large", f"{name} is larger than the service's limit of "
                               f"{self.limits.max_upload_mb:g} MB (--max-upload-mb)", name)
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as probe:  # the header only: size before pixels
                w, h = probe.size
            if w * h > MAX_PIXELS:
                raise RequestError(413, "image_too_large", f"{name} is {w}x{h} pixels ({w * h / 1e6:.0f} MP); the "
                                   f"service decodes at most {MAX_PIXELS / 1e6:.0f} MP per image", name)
            image = decode_bytes(data)
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem, reported as such
            from PIL import UnidentifiedImageError

            reason = str(e).splitlines()[0] if str(e) else "unreadable"
            if isinstance(e, UnidentifiedImageError):
                raise RequestError(400, "not_an_image", f"{name} is not an image PIL can read (JPEG, PNG, …)",
                                   name) from None
            raise RequestError(400, "corrupt_image", f"{name} could not be decoded ({type(e).__name__}: "
                               f"{reason}); the file is truncated or damaged", name) from None
        return Upload(name=name, data=data, image=image)

    def metadata_rows(self, names: Sequence[str], fields: dict[str, list[str]]) -> list[dict | None]:
        """Per upload, the metadata row the bundle's stacker needs (None per upload when it needs none).

        ``fields`` maps ``age`` / ``sex`` / ``localization`` to one value per file, in file order; an
        empty value means unknown (scored as ``skinsweep predict`` scores a blank cell).
        """
        needed = self.bundle.metadata_features
        if not needed:
            return [None] * len(names)
        rows: list[dict] = [{} for _ in names]
        for f in needed:
            form = "localization" if f == "site" else f
            values = fields.get(form, [])
            if len(values) != len(names):
                missing = names[len(values)] if len(values) < len(names) else None
                raise RequestError(422, "missing_metadata",
                                   f"bundle {self.name} stacks {', '.join(needed)} with the images: send one "
                                   f"'{form}' field per file ({len(names)} files, {len(values)} '{form}' values; "
                                   "an empty value means unknown)", missing)
            for row, name, v in zip(rows, names, values):
                v = v.strip()
                if f == "age" and v:
                    try:
                        age = float(v)
                    except ValueError:
                        age = math.nan
                    if not (math.isfinite(age) and 0 <= age <= 130):
                        raise RequestError(422, "bad_metadata", f"{name}: age {v!r} is not a number of years "
                                           "between 0 and 130 (or empty for unknown)", name)
                if f == "sex" and v.lower() not in SEXES:
                    raise RequestError(422, "bad_metadata", f"{name}: sex {v!r} is not one of female, male, "
                                       "unknown (or empty)", name)
                row[f] = v
        return rows

    # ---- scoring ------------------------------------------------------------------------------------
    def score(self, uploads: Sequence[Upload]) -> list[dict]:
        """Score checked uploads in one pass; one result dict per upload (see the README's response)."""
        meta = ids = None
        if self.bundle.metadata_features:
            ids = [f"upload-{k}" for k in range(len(uploads))]
            meta = pd.DataFrame([{"image_id": i, **(u.metadata or {})} for i, u in zip(ids, uploads)])
        from skinsweep.ensemble.bundle import Decoded

        with self.lock:  # each upload was decoded once, by check_upload (decode_bytes); that decode is scored
            df = self.bundle.predict([Decoded(u.image) for u in uploads], metadata=meta, image_ids=ids)
            self.batches += 1
            self.images += len(uploads)
        out = []
        for k, u in enumerate(uploads):
            r = df.iloc[k]
            members = [{**m, "prob": float(r[f"prob_{m['trial_id']}"])} for m in self.members]
            res = {"file": u.name, "width": u.image.width, "height": u.image.height, "members": members,
                   "ensemble_prob": float(r["ensemble_prob"]), "calibrated_prob": float(r["calibrated_prob"]),
                   "decision": int(r["decision"]),
                   "decision_label": "above threshold: melanoma suspected" if int(r["decision"]) else
                   "below threshold", "threshold": self.bundle.threshold,
                   "threshold_rule": self.bundle.meta.get("threshold_rule"), "bundle": self.name,
                   "bundle_hash": self.hash}
            if u.metadata is not None:
                res["metadata"] = {("localization" if k2 == "site" else k2): v for k2, v in u.metadata.items()}
            out.append(res)
        return out

    def explain(self, uploads: Sequence[Upload]) -> list[list[dict]]:
        """Per upload, one Grad-CAM heat map per member (``report``'s code): the image with the map
        blended on top, as a base64 PNG (longest side at most 512 px)."""
        from skinsweep.report.gradcam import gradcam, overlay

        images = [u.image for u in uploads]
        per_member = []
        with self.lock:
            for model, mm in zip(self.bundle.models, self.bundle.model_meta):
                per_member.append(gradcam(model, mm, images))
        out = []
        for k, u in enumerate(uploads):
            rgb = np.asarray(u.image, dtype=np.uint8)
            out.append([{"trial_id": m["trial_id"], "backbone": m["backbone"], "method": "Grad-CAM",
                         "png_base64": _png_b64(overlay(rgb, maps[k]))}
                        for m, maps in zip(self.members, per_member)])
        return out

    def info(self) -> dict:
        return self.card

    def health(self) -> dict:
        return {"status": "ready", "bundle": self.name, "bundle_hash": self.hash,
                "members": len(self.members), "metadata_features": self.bundle.metadata_features,
                "replica": {"batches": self.batches, "images": self.images}}


def model_card(bundle, bundle_hash: str) -> dict:
    """The bundle's model card (``model_card.json``; for a bundle built before cards, the minimal card
    :func:`~skinsweep.ensemble.model_card.load_model_card` makes from bundle.json, ``generated_by.minimal``
    true), with the bundle's hash added: the card is in the manifest, so it cannot hold that hash itself."""
    from skinsweep.ensemble.model_card import load_model_card

    card = load_model_card(bundle.path, verify=False)  # the replica verified the whole bundle on load
    return {**card, "bundle_hash": bundle_hash}


def _backbone_name(model_meta: dict) -> str | None:
    spec = model_meta.get("backbone")
    return spec.get("name") if isinstance(spec, dict) else spec


def _png_b64(rgb: np.ndarray) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    if max(im.size) > HEATMAP_SIDE:
        im.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
