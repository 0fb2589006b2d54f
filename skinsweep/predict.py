"""Scoring files with a bundle: folders expanded, unreadable files reported per row, the rest scored."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from skinsweep.data.index import IMAGE_EXTENSIONS, read_rgb
from skinsweep.errors import DataError


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
