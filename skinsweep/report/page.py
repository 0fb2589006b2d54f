"""``skinsweep report``: one HTML page (PNGs beside it in ``img/``) for a sweep and its ensembles.

Sections: sweep overview (status counts, sortable trials table, best val AUC over time,
hyperparameters vs val AUC, what ASHA stopped and when) → per selected model (training curves,
ROC/PR, reliability, confusion matrices at 0.5 and at the validation-chosen operating point) →
ensembles (from their ``report.json``) → interpretability (Grad-CAM gallery of the most confident
false negatives / false positives and a few true positives) → error analysis (by diagnosis, and by
age / sex / site when the dataset has them).

Three steps: :func:`skinsweep.report.tables.report_data` computes every table, :func:`draw` writes
the figures, and ``templates/report.html.j2`` (autoescaped Jinja2) lays them out.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError, SkinsweepError
from skinsweep.report.tables import MIN_CLASS_FOR_AUC, TABLE_ROWS, ReportData, aligned_prob, is_missing, report_data

REPORT_HTML = "index.html"
IMG = "img"
TILE_WIDTH = 176  # px, gallery images and heat maps


def build_report(
    results: str | Path,
    *,
    ensembles: Sequence[str | Path] = (),
    out: str | Path | None = None,
    trials: Sequence[str] | None = None,
    target_sensitivity: float = 0.95,
    gallery: int = 4,
    gradcam: bool = True,
    table_rows: int = TABLE_ROWS,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the report; returns the path of its ``index.html``.

    Args:
        results: a sweep folder (``results/<sweep>``).
        ensembles: ensemble output folders (``skinsweep ensemble build``'s ``--out``), built from this sweep.
        out: the report folder (default ``<results>/report``); its ``index.html`` and ``img/`` are replaced.
        trials: trial ids for the per-model section (default: the best completed trial per backbone by val AUC).
        target_sensitivity: the operating point of single models, chosen on validation.
        gallery: images per gallery row (false negatives, false positives; true positives get half).
        gradcam: compute heat maps (needs the trials' checkpoints).
        table_rows: at most this many rows in each per-trial table (all trials, stopped early, failed);
            the page says how many it shows of how many (all stay in trials.parquet).
        log: progress messages.
    """
    from skinsweep.files import atomic_write_text

    data = report_data(results, ensembles=ensembles, trials=trials, target_sensitivity=target_sensitivity,
                       gallery=gallery, table_rows=table_rows, log=log)  # bad input fails before any write
    out = Path(out) if out else data.results / "report"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder for the report")
    img = out / IMG
    shutil.rmtree(img, ignore_errors=True)  # a report is rebuilt whole, never a mix of two runs
    img.mkdir(parents=True)
    figs = draw(img, data, gradcam, log)
    atomic_write_text(out / REPORT_HTML, render(data, figs))
    log(f"report: wrote {out / REPORT_HTML} and {len(list(img.glob('*.png')))} images in {img}")
    return out / REPORT_HTML


# ----------------------------------------------------------------------------- figures


def draw(img: Path, data: ReportData, gradcam: bool, log) -> dict:
    """Write every figure of the page into ``img``; returns their file names as the template reads them:
    ``best_over_time``, ``hparams``, ``asha``, ``roc_pr`` (a name or None), ``curves`` and ``calib``
    ({trial: name}), ``ens`` ({ensemble: {plot: name}}), ``tiles`` ({image_id: [(name, caption)]}), and
    ``heatmap_note`` (the Grad-CAM methods, and the models without heat maps and why)."""
    from skinsweep.report import plots

    t, history = data.trials, data.history
    colors = plots.backbone_colors(t["backbone"].dropna())
    figs = {"best_over_time": plots.best_over_time(img, t),
            "hparams": plots.hparam_plots(img, t, colors) if t["val_auc"].notna().any() else None,
            "asha": plots.asha_curves(img, history, t, colors), "roc_pr": None, "curves": {}, "calib": {}, "ens": {}}
    if data.selected:
        ref = data.selected[0]
        figs["roc_pr"] = plots.roc_pr(img, ref.test["label"].to_numpy(int),
                                      {s.label: aligned_prob(s, ref) for s in data.selected})
    for s in data.selected:
        h = history[history["trial_id"] == s.trial_id] if len(history) else history
        if len(h):
            figs["curves"][s.trial_id] = plots.training_curves(img, s.trial_id, h, s.row.get("best_epoch"))
        figs["calib"][s.trial_id] = plots.reliability_and_confusion(
            img, s.trial_id, s.test["label"].to_numpy(int), s.test["prob"].to_numpy(float), s.threshold)
    for e in data.ensembles:  # drawn by `ensemble build` from the same predictions: copied, not redrawn
        figs["ens"][e.name] = {}
        for key in ("roc", "pr", "reliability", "confusion"):
            f = (e.report.get("plots") or {}).get(key)
            if f and (e.path / f).is_file():
                dst = figs["ens"][e.name][key] = f"ens_{slug(e.name)}_{f}"
                shutil.copy2(e.path / f, img / dst)
    if data.source is not None:
        log("report: heat maps" if gradcam else "report: gallery (no heat maps)")
    figs["tiles"], figs["heatmap_note"] = _gallery_tiles(img, data, gradcam, log)
    return figs


def _gallery_tiles(img: Path, data: ReportData, gradcam: bool, log) -> tuple[dict, str]:
    """Each gallery image, then each explained model's heat map on it, as PNG tiles."""
    from skinsweep.data.index import read_rgb
    from skinsweep.report.gradcam import overlay

    if not data.gallery:
        return {}, ""
    shown = pd.concat(data.gallery.values()).drop_duplicates("image_id")
    shown = shown[shown["path"].notna()]
    cams, note = {}, ""
    if gradcam and len(shown):
        cams, note = _heatmaps(data.source.explain, data.trials, shown["path"].tolist(), log)
    explained = [m for m in data.source.explain if m in cams]
    backbone = data.trials.set_index("trial_id")["backbone"]
    tiles = {}
    for image_id, path in zip(shown["image_id"], shown["path"]):
        rgb = np.asarray(read_rgb(path))  # as the heat maps were mapped: EXIF orientation applied
        stem = slug(image_id)
        tiles[image_id] = [_tile(img, f"g_{stem}.png", rgb, "image")]
        for m in explained:
            cam = cams[m][path]
            flat = " · nothing raised the logit" if cam.max() <= 0 else ""
            tiles[image_id].append(_tile(img, f"g_{stem}_{slug(m)}.png", overlay(rgb, cam), f"{backbone[m]} ({m}){flat}"))
    return tiles, note


def _heatmaps(trial_ids: list[str], trials: pd.DataFrame, paths: list[str], log) -> tuple[dict, str]:
    """{trial: {path: map}} for every trial whose checkpoint is readable; a note on what was skipped."""
    from skinsweep.report.gradcam import gradcam, target_layer
    from skinsweep.train.loop import load_trial_model

    rows = trials.set_index("trial_id")
    cams, skipped, methods = {}, [], set()
    for t in trial_ids:
        ckpt = rows.loc[t].get("checkpoint")
        if not isinstance(ckpt, str) or not Path(ckpt).is_file():
            skipped.append(f"{t} (checkpoint not readable here)")
            continue
        try:
            model, meta = load_trial_model(Path(ckpt).parent)
            methods.add(target_layer(model, int(meta["data_config"]["input_size"]))[2])
            cams[t] = dict(zip(paths, gradcam(model, meta, paths)))
            log(f"report: heat maps of {t} ({len(paths)} images)")
        except SkinsweepError as e:  # a damaged checkpoint costs its heat maps, not the page
            skipped.append(f"{t} ({e})")
    note = f"Methods: {', '.join(sorted(methods))}." if methods else ""
    if skipped:
        note += f" No heat maps for {'; '.join(skipped)}."
    return cams, note


def _tile(img: Path, name: str, rgb: np.ndarray, caption: str) -> tuple[str, str]:
    from PIL import Image

    im = Image.fromarray(rgb)
    im.resize((TILE_WIDTH, max(1, round(im.height * TILE_WIDTH / im.width))), Image.BILINEAR).save(img / name)
    return name, caption


def slug(s) -> str:
    """``s`` as a file-name part: letters, digits, ``-`` and ``_``."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(s))


# ----------------------------------------------------------------------------- page


def fmt(v) -> str:
    """A table cell or number in prose: 4 significant decimals, integers plain, tiny/huge in e-notation, "—" if missing."""
    if is_missing(v):
        return "—"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v.is_integer() and abs(v) < 1e5:  # counts and epochs of a column that also holds nulls
            return f"{int(v)}"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, (pd.Timestamp, dt.datetime)):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def cells(df: pd.DataFrame) -> list[list[tuple[str, bool, float | None]]]:
    """Each row of ``df`` as ``(text, is a number, sort key)`` per cell; the key is None for text and blanks."""
    def cell(v):
        num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        return fmt(v), num, float(v) if num and not is_missing(v) else None

    return [[cell(v) for v in row] for row in df.itertuples(index=False, name=None)]


def environment():
    """The Jinja2 environment of the report pages (``templates/``): autoescaped, strict, with ``fmt`` and ``cells``."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("skinsweep.report"),
                             autoescape=jinja2.select_autoescape(["html.j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.globals["cells"] = cells
    env.globals["min_class_for_auc"] = MIN_CLASS_FOR_AUC
    return env


def render(data: ReportData, figs: dict) -> str:
    """The page: ``templates/report.html.j2`` filled with ``data`` and ``figs`` (every value autoescaped)."""
    from skinsweep.train.loop import versions

    return environment().get_template("report.html.j2").render(
        d=data, figs=figs, img=IMG, tile_width=TILE_WIDTH, versions=versions(),
        generated=f"{dt.datetime.now():%Y-%m-%d %H:%M}")


__all__ = ["build_report"]
