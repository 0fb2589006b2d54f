"""``skinsweep report``: one HTML page (PNGs beside it in ``img/``) for a sweep and its ensembles.

Sections: sweep overview (status counts, sortable trials table, best val AUC over time,
hyperparameters vs val AUC, what ASHA stopped and when) → per selected model (training curves,
ROC/PR, reliability, confusion matrices at 0.5 and at the validation-chosen operating point) →
ensembles (from their ``report.json``) → interpretability (Grad-CAM gallery of the most confident
false negatives / false positives and a few true positives) → error analysis (by diagnosis, and by
age / sex / site when the dataset has them).

Every number is computed here from the stored per-image predictions (``predictions/``,
``history/``, an ensemble's ``predictions.parquet``), or read from the ensemble's report, which was
computed from its predictions the same way. Thresholds are chosen on validation; curves, tables and
galleries are on test.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError, DataError, SkinsweepError

REPORT_HTML = "index.html"
IMG = "img"


@dataclass
class Selected:
    """A trial shown in the per-model section (and explained in the gallery)."""

    trial_id: str
    label: str
    row: pd.Series
    val: pd.DataFrame    # this trial's val predictions, image order
    test: pd.DataFrame
    threshold: float     # chosen on val


@dataclass
class Source:
    """Whose test predictions the gallery and error analysis show: an ensemble's or a model's."""

    name: str
    test: pd.DataFrame   # image_id, lesion_id, label, dx, prob
    threshold: float
    explain: list[str]   # trial ids whose heat maps the gallery shows


def build_report(
    results: str | Path,
    *,
    ensembles: Sequence[str | Path] = (),
    out: str | Path | None = None,
    trials: Sequence[str] | None = None,
    target_sensitivity: float = 0.95,
    gallery: int = 4,
    gradcam: bool = True,
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
        log: progress messages.
    """
    from skinsweep.results import load

    res = load(results)
    out = Path(out) if out else res.path / "report"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder for the report")
    trials_df = res.trials
    if trials_df.empty:
        raise DataError(f"{res.path} has no trials yet; run the sweep first")
    ens = [_load_ensemble(Path(e), res, trials_df) for e in ensembles]  # bad input fails before any write
    selected = _select(res, trials_df, trials, target_sensitivity)
    source = _source(ens, selected)
    history = res.store.history()
    sweep = res.sweep
    log(f"report: {len(trials_df)} trials in {res.path}")
    index, index_note = _dataset_index(sweep, log)
    img = out / IMG
    shutil.rmtree(img, ignore_errors=True)  # a report is rebuilt whole, never a mix of two runs
    img.mkdir(parents=True)

    sections = [
        ("overview", "Sweep overview", _overview(img, trials_df, history, sweep)),
        ("models", "Selected models", _models(img, selected, history, target_sensitivity)),
    ]
    if ens:
        sections.append(("ensembles", "Ensembles", "".join(_ensemble_section(img, e) for e in ens)))
    if source is not None:
        log("report: heat maps" if gradcam else "report: gallery (no heat maps)")
        sections.append(("gallery", "Interpretability: the model's most confident mistakes",
                         _gallery(img, source, trials_df, index, index_note, gallery, gradcam, log)))
        sections.append(("errors", "Error analysis", _errors(source, index, index_note)))
    page = _page(sweep.get("name") or res.path.name, res.path, sweep, trials_df, sections)
    out.mkdir(parents=True, exist_ok=True)
    from skinsweep.files import atomic_write_text

    atomic_write_text(out / REPORT_HTML, page)
    log(f"report: wrote {out / REPORT_HTML} and {len(list(img.glob('*.png')))} images in {img}")
    return out / REPORT_HTML


# ----------------------------------------------------------------------------- inputs


def _dataset_index(sweep: dict, log) -> tuple[pd.DataFrame | None, str]:
    """The sweep's dataset index (image paths and metadata), or None with the reason."""
    root = sweep.get("dataset")
    if not root:
        return None, "the sweep folder has no sweep.json naming its dataset"
    try:
        from skinsweep.data.index import load_index

        positive = (sweep.get("recipe") or {}).get("data", {}).get("positive") or ["MEL"]
        return load_index(root, positive=positive, skip_bad=True, progress=False).df, ""
    except SkinsweepError as e:
        log(f"report: dataset not readable, so no images or metadata ({e})")
        return None, f"the dataset {root} is not readable from here ({e})"


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def _select(res, trials_df: pd.DataFrame, ids: Sequence[str] | None, target_sensitivity: float) -> list[Selected]:
    from skinsweep.ensemble.calibrators import choose_threshold

    done = trials_df[trials_df["status"] == "completed"]
    if ids:
        unknown = sorted(set(ids) - set(trials_df["trial_id"]))
        if unknown:
            raise ConfigError(f"--trial {', '.join(unknown)}: not in {res.path}; list them with `skinsweep results show`")
        chosen = list(ids)
    else:
        best = done.dropna(subset=["val_auc"]).sort_values("val_auc", ascending=False).groupby("backbone", sort=False).head(1)
        chosen = best.sort_values("val_auc", ascending=False)["trial_id"].tolist()
    out = []
    preds = res.store.predictions(chosen) if chosen else pd.DataFrame()
    for t in chosen:
        p = preds[preds["trial_id"] == t]
        val, test = (p[p["split"] == s].sort_values("image_id").reset_index(drop=True) for s in ("val", "test"))
        if val.empty or test.empty:
            if ids:
                raise DataError(f"trial {t} has no stored val/test predictions (status "
                                f"{trials_df.set_index('trial_id').loc[t, 'status']}); pick a completed trial")
            continue
        row = trials_df.set_index("trial_id").loc[t]
        thr = float(choose_threshold(val["label"].to_numpy(int), val["prob"].to_numpy(float),
                                     target_sensitivity=target_sensitivity))
        out.append(Selected(t, f"{row['backbone']}/{row['mode']}/{t}", row, val, test, thr))
    return out


@dataclass
class _Ensemble:
    name: str
    path: Path
    report: dict
    preds: pd.DataFrame


def _load_ensemble(path: Path, res, trials_df: pd.DataFrame) -> _Ensemble:
    rep_file, pred_file = path / "report.json", path / "predictions.parquet"
    if not rep_file.is_file() or not pred_file.is_file():
        raise DataError(f"--ensemble {path}: no report.json + predictions.parquet there; pass the folder "
                        "`skinsweep ensemble build` wrote (ensembles/<name>/)")
    rep = json.loads(rep_file.read_text())
    ours = set(trials_df["split_hash"].dropna())
    if rep.get("split_hash") not in ours or not {m["trial_id"] for m in rep["members"]} <= set(trials_df["trial_id"]):
        raise DataError(f"--ensemble {path} was built from {rep.get('results')}, not from {res.path} (other trials "
                        "or split); rebuild it with `skinsweep ensemble build … --results` this sweep")
    return _Ensemble(rep.get("name") or path.name, path, rep, pd.read_parquet(pred_file))


def _source(ens: list[_Ensemble], selected: list[Selected]) -> Source | None:
    if ens:
        e = ens[0]
        t = e.preds[e.preds["split"] == "test"].rename(columns={"calibrated_prob": "prob"})
        return Source(f"ensemble {e.name}", t[["image_id", "lesion_id", "label", "dx", "prob"]].reset_index(drop=True),
                      float(e.report["threshold"]), [m["trial_id"] for m in e.report["members"]][:4])
    if selected:
        s = selected[0]
        return Source(f"best model {s.label}", s.test[["image_id", "lesion_id", "label", "dx", "prob"]],
                      s.threshold, [x.trial_id for x in selected[:4]])
    return None


# ----------------------------------------------------------------------------- sections


def _overview(img: Path, trials: pd.DataFrame, history: pd.DataFrame, sweep: dict) -> str:
    from skinsweep.report import plots

    colors = plots.backbone_colors(trials["backbone"].dropna())
    counts = trials["status"].value_counts()
    cards = "".join(f'<div class="card {s}"><b>{counts.get(s, 0)}</b>{s}</div>'
                    for s in ("completed", "pruned", "failed", "diverged") if s != "diverged" or counts.get(s))
    figs = [_fig(plots.best_over_time(img, trials), "Each trial's val AUC at the time it finished (pruned trials: "
                 "the AUC of the epoch at which ASHA stopped them); the line is the best completed trial so far.")]
    if trials["val_auc"].notna().any():
        figs.append(_fig(plots.hparam_plots(img, trials, colors),
                         "Val AUC against learning rate, class weight and backbone lr multiplier (fine-tuning only). "
                         "Colour: backbone; circle: fine-tune, triangle: linear probe; hollow: stopped early or failed."))
    asha = plots.asha_curves(img, history, trials, colors)
    if asha:
        figs.append(_fig(asha, "Validation AUC per epoch of every trial; dashed lines ending in × were stopped by ASHA."))
    pruned = trials[trials["status"] == "pruned"]
    pruned_tbl = ""
    if len(pruned):
        cols = [c for c in ("trial_id", "backbone", "mode", "lr", "pos_weight", "pruned_at_epoch", "val_auc") if c in pruned]
        pruned_tbl = ("<h3>Stopped early by ASHA</h3><p>A trial is stopped at a rung (epoch) when its val AUC is "
                      "below the better fraction of the trials that reached that rung; its val AUC here is "
                      "the one at the stopping epoch.</p>" + _table(pruned[cols].sort_values("pruned_at_epoch"
                      if "pruned_at_epoch" in cols else "trial_id"), sortable=False))
    failed = trials[trials["status"] == "failed"]
    failed_tbl = ""
    if len(failed):
        f = failed[["trial_id", "backbone", "mode", "error"]].copy()
        f["error"] = f["error"].fillna("").map(lambda e: e.strip().splitlines()[-1][:200] if e.strip() else "")
        failed_tbl = "<h3>Failed trials</h3>" + _table(f, sortable=False)
    cols = [c for c in ("trial_id", "status", "backbone", "mode", "lr", "pos_weight", "backbone_lr_mult",
                        "backbone_args", "best_epoch", "epochs_run", "pruned_at_epoch", "val_auc", "val_ap",
                        "test_auc", "test_ap", "runtime_s", "node") if c in trials]
    table = trials[cols].sort_values("val_auc", ascending=False, na_position="last")
    if "backbone_args" in table:
        table = table.assign(backbone_args=table["backbone_args"].map(_kv))
    return (f'<div class="cards">{cards}</div>'
            f"<h3>All trials</h3><p class='hint'>Click a column header to sort. Val/test metrics are at each trial's "
            "selected (best-val) epoch; pruned trials have no test score.</p>"
            f"{_table(table)}{''.join(figs)}{pruned_tbl}{failed_tbl}")


def _models(img: Path, selected: list[Selected], history: pd.DataFrame, target_sensitivity: float) -> str:
    from skinsweep.report import plots
    from skinsweep.metrics import binary_metrics

    if not selected:
        return "<p>No completed trial has val and test predictions, so there is nothing to show per model.</p>"
    rows = []
    for s in selected:
        yv, pv = s.val["label"].to_numpy(int), s.val["prob"].to_numpy(float)
        yt, pt = s.test["label"].to_numpy(int), s.test["prob"].to_numpy(float)
        mv, mt = binary_metrics(yv, pv), binary_metrics(yt, pt, threshold=s.threshold)
        rows.append({"model": s.label, "val AUC": mv["auc"], "val AP": mv["ap"], "test AUC": mt["auc"],
                     "test AP": mt["ap"], "test ECE": mt["ece"], "threshold (val)": s.threshold,
                     "test sensitivity": mt["recall"], "test specificity": mt["specificity"],
                     "test n (melanoma)": f"{mt['n']:,} ({mt['n_pos']:,})"})
    intro = (f"<p>The best completed trial per backbone by val AUC (or those passed with <code>--trial</code>). "
             f"The operating point of each model is the highest threshold reaching {target_sensitivity:.0%} "
             "sensitivity on validation; sensitivity and specificity are then measured on test.</p>")
    parts = [intro, _table(pd.DataFrame(rows), sortable=False),
             _fig(plots.roc_pr(img, selected[0].test["label"].to_numpy(int),
                               {s.label: _aligned_prob(s, selected[0]) for s in selected}),
                  "Test ROC and precision–recall curves of the selected models.")]
    for s in selected:
        h = history[history["trial_id"] == s.trial_id] if len(history) else history
        figs = []
        if len(h):
            figs.append(_fig(plots.training_curves(img, s.trial_id, h, s.row.get("best_epoch")),
                             "Training loss and validation loss / AUC per epoch; the dotted line marks the epoch "
                             "whose weights and predictions were kept."))
        figs.append(_fig(plots.reliability_and_confusion(img, s.trial_id, s.test["label"].to_numpy(int),
                                                         s.test["prob"].to_numpy(float), s.threshold),
                         "Reliability on test (10 quantile bins; ECE with 15 equal-width bins), and confusion "
                         "matrices at 0.5 and at the operating point chosen on validation."))
        parts.append(f"<h3 id='m-{html.escape(s.trial_id)}'>{html.escape(s.label)}</h3>{_params(s.row)}{''.join(figs)}")
    return "".join(parts)


def _aligned_prob(s: Selected, ref: Selected) -> np.ndarray:
    """``s``'s test probabilities in ``ref``'s image order (all trials of a sweep share the split)."""
    p = s.test.set_index("image_id")["prob"]
    missing = set(ref.test["image_id"]) - set(p.index)
    if missing:
        raise DataError(f"trial {s.trial_id} has no test predictions for {len(missing)} images that trial "
                        f"{ref.trial_id} has; were they run on different splits?")
    return p.loc[ref.test["image_id"]].to_numpy(float)


def _kv(v) -> str:
    """``{"input_size": 48}`` (JSON text in trials.parquet) as ``input_size=48``."""
    try:
        d = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        return str(v)
    return ", ".join(f"{k}={x}" for k, x in d.items()) if isinstance(d, dict) else ("" if d is None else str(d))


def _params(row: pd.Series) -> str:
    keys = ["backbone", "mode", "lr", "pos_weight", "backbone_lr_mult", "backbone_args", "epochs", "batch_size",
            "best_epoch", "runtime_s"]
    items = [f"<b>{k}</b> {html.escape(_kv(row.get(k)) if k == 'backbone_args' else _fmt(row.get(k)))}" for k in keys if k in row.index and _present(row.get(k))]
    return f"<p class='params'>{' · '.join(items)}</p>"


def _ensemble_section(img: Path, e: _Ensemble) -> str:
    rep = e.report
    metrics = [("auc", "AUC"), ("ap", "AP"), ("recall", "sensitivity"), ("specificity", "specificity"),
               ("sens_at_spec", "sens @ spec"), ("ece", "ECE"), ("brier", "Brier")]
    rows = []
    for model, m in rep["test"].items():
        rows.append({"model": model, **{label: _ci(m.get(k)) for k, label in metrics}})
    dl = rep.get("delong_vs_best") or {}
    val = rep.get("val", {})
    ece_before, ece_after = (val.get("ensemble_uncalibrated") or {}).get("ece"), (val.get("ensemble") or {}).get("ece")
    figs = []
    for key in ("roc", "pr", "reliability", "confusion"):
        f = (rep.get("plots") or {}).get(key)
        if f and (e.path / f).is_file():
            dst = f"ens_{_slug(e.name)}_{f}"
            shutil.copy2(e.path / f, img / dst)
            figs.append(_fig(dst, {"roc": "ROC on test, members vs ensemble", "pr": "Precision–recall on test",
                                   "reliability": "Reliability before / after calibration (validation, out-of-fold)",
                                   "confusion": "Confusion matrix on test at the chosen threshold"}[key], small=True))
    rule = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (rep.get("threshold_rule") or {}).items())
    meta = (rep.get("metadata") or {}).get("features")
    stacker = f" The stacker also sees the patient metadata: {html.escape(', '.join(meta))}." if meta else ""
    n = rep.get("n", {})
    return (f"<h3>{html.escape(e.name)} <span class='hint'>({html.escape(str(e.path))})</span></h3>"
            f"<p>Members: {', '.join(html.escape(m['label']) for m in rep['members'])}. Combiner "
            f"<b>{html.escape(str(rep['combiner'].get('kind', '?')))}</b>, calibration "
            f"<b>{html.escape(str(rep['calibrator'].get('kind', '?')))}</b>, threshold "
            f"<b>{rep['threshold']:.4f}</b> (chosen on validation: {html.escape(rule)}). Test: {n.get('test', '?'):,} images, "
            f"{n.get('test_pos', '?'):,} melanomas. 95% CIs by a lesion-grouped bootstrap.{stacker}</p>"
            + _table(pd.DataFrame(rows), sortable=False)
            + f"<p>DeLong test, ensemble vs best single member ({html.escape(rep['best_member']['label'])}, chosen on "
              f"validation): ΔAUC {_fmt(dl.get('diff'))} [{_fmt(dl.get('ci_lo'))}, {_fmt(dl.get('ci_hi'))}], "
              f"<b>p = {_fmt(dl.get('p_value'))}</b>. Calibration (validation, out-of-fold ECE): "
              f"{_fmt(ece_before)} before → {_fmt(ece_after)} after.</p>"
            + f"<div class='grid2'>{''.join(figs)}</div>")


def _gallery(img: Path, src: Source, trials: pd.DataFrame, index: pd.DataFrame | None, note: str,
             n: int, gradcam: bool, log) -> str:
    from skinsweep.data.index import read_rgb
    from skinsweep.report.gradcam import overlay

    if index is None:
        return f"<p>No gallery: {html.escape(note)}.</p>"
    t = src.test.merge(index[["image_id", "path"]], on="image_id", how="left")
    thr = src.threshold
    def top(rows: pd.DataFrame, k: int, ascending: bool) -> pd.DataFrame:
        # one image per lesion: HAM10000 photographs a lesion several times, and near-copies teach nothing
        rows = rows.sort_values("prob", ascending=ascending)
        return rows.drop_duplicates("lesion_id").head(k) if rows["lesion_id"].notna().all() else rows.head(k)

    groups = [
        ("Most confident false negatives (melanomas scored lowest)", top(t[(t["label"] == 1) & (t["prob"] < thr)], n, True)),
        ("Most confident false positives (benign lesions scored highest)",
         top(t[(t["label"] == 0) & (t["prob"] >= thr)], n, False)),
        ("True positives (melanomas scored highest)", top(t[(t["label"] == 1) & (t["prob"] >= thr)], max(1, n // 2), False)),
    ]
    shown = pd.concat([g for _, g in groups]).drop_duplicates("image_id")
    shown = shown[shown["path"].notna()]
    cams, method_note = {}, ""
    if gradcam and len(shown):
        cams, method_note = _heatmaps(src.explain, trials, shown["path"].tolist(), log)
    names = [m for m in src.explain if m in cams]
    backbone = trials.set_index("trial_id")["backbone"]
    tile = 176
    out = [f"<p>Ranked by {html.escape(src.name)} on test (threshold {thr:.4f}, chosen on validation), one image per "
           "lesion. Each row: the image, then each model's Grad-CAM heat map for the melanoma logit (red: regions that raised it). "
           f"{html.escape(method_note)}</p>"]
    for title, g in groups:
        out.append(f"<h3>{html.escape(title)}</h3>")
        if g.empty:
            out.append("<p class='hint'>none on test at this threshold.</p>")
            continue
        for _, r in g.iterrows():
            if not isinstance(r["path"], str):
                continue
            rgb = np.asarray(read_rgb(r["path"]))  # as the heat maps were mapped: EXIF orientation applied
            stem = _slug(r["image_id"])
            cells = [_tile(img, f"g_{stem}.png", rgb, tile, "image")]
            for m in names:
                cam = cams[m][r["path"]]
                flat = " · nothing raised the logit" if cam.max() <= 0 else ""
                cells.append(_tile(img, f"g_{stem}_{_slug(m)}.png", overlay(rgb, cam), tile,
                                   f"{backbone[m]} ({m}){flat}"))
            out.append(f"<div class='row'><div class='cap'><b>{html.escape(r['image_id'])}</b><br>dx "
                       f"{html.escape(str(r['dx']))}<br>p(melanoma) <b>{r['prob']:.3f}</b><br>lesion "
                       f"{html.escape(str(r['lesion_id']))}</div>{''.join(cells)}</div>")
    return "".join(out)


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


def _tile(img: Path, name: str, rgb: np.ndarray, width: int, caption: str) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    im = im.resize((width, max(1, round(im.height * width / im.width))), Image.BILINEAR)
    im.save(img / name)
    return f"<figure class='tile'><img src='{IMG}/{name}' width='{width}' alt=''><figcaption>{html.escape(caption)}</figcaption></figure>"


def _errors(src: Source, index: pd.DataFrame | None, note: str) -> str:
    from sklearn.metrics import roc_auc_score

    t = src.test.copy()
    t["flagged"] = (t["prob"] >= src.threshold).astype(int)
    by_dx = t.groupby("dx").agg(images=("label", "size"), melanoma=("label", "max"),
                                flagged=("flagged", "sum"), mean_prob=("prob", "mean")).reset_index()
    by_dx["rate"] = by_dx["flagged"] / by_dx["images"]
    by_dx["melanoma"] = by_dx["melanoma"].map({1: "yes", 0: "no"})
    by_dx = by_dx.sort_values("rate", ascending=False)
    by_dx = pd.DataFrame({"dx": by_dx["dx"], "melanoma": by_dx["melanoma"], "images": by_dx["images"],
                          "flagged": by_dx["flagged"], "flagged as melanoma": by_dx["rate"].map("{:.1%}".format),
                          "mean p(melanoma)": by_dx["mean_prob"]})
    out = [f"<p>{html.escape(src.name)} on test at threshold {src.threshold:.4f} (chosen on validation). "
           "For the melanoma rows the flagged fraction is the sensitivity; for the others it is the false-positive "
           "rate of that diagnosis.</p><h3>By diagnosis</h3>", _table(by_dx, sortable=False)]
    if index is None:
        out.append(f"<p class='hint'>No analysis by age, sex or site: {html.escape(note)}.</p>")
        return "".join(out)
    meta = t.merge(index[["image_id", "age", "sex", "site"]], on="image_id", how="left")
    meta["age group"] = pd.cut(pd.to_numeric(meta["age"], errors="coerce"), [-1, 29, 44, 59, 74, 200],
                               labels=["<30", "30–44", "45–59", "60–74", "75+"]).astype(object)
    shown = False
    for col in ("age group", "sex", "site"):
        vals = meta[col].where(meta[col].notna() & (meta[col].astype(str).str.strip() != ""), "unknown")
        if (vals == "unknown").all():
            continue
        rows = []
        order = ["<30", "30–44", "45–59", "60–74", "75+"] if col == "age group" else sorted(set(vals.astype(str)) - {"unknown"})
        groups = dict(list(meta.groupby(vals.astype(str))))
        for v in [o for o in order + ["unknown"] if o in groups]:
            g = groups[v]
            y, p, f = g["label"].to_numpy(int), g["prob"].to_numpy(float), g["flagged"].to_numpy(int)
            pos, neg = y == 1, y == 0
            rows.append({col: v, "images": len(g), "melanomas": int(pos.sum()),
                         "sensitivity": f[pos].mean() if pos.any() else np.nan,
                         "specificity": 1 - f[neg].mean() if neg.any() else np.nan,
                         "AUC": roc_auc_score(y, p) if pos.sum() >= 5 and neg.sum() >= 5 else np.nan})
        out.append(f"<h3>By {col}</h3>" + _table(pd.DataFrame(rows), sortable=False))
        shown = True
    out.append("<p class='hint'>AUC only where a group has at least 5 melanomas and 5 benign lesions; small groups "
               "are noisy (no CIs here — see the ensemble section for bootstrap CIs).</p>" if shown else
               "<p class='hint'>The dataset has no age, sex or site metadata.</p>")
    return "".join(out)


# ----------------------------------------------------------------------------- HTML


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and v is not pd.NaT


def _fmt(v) -> str:
    if not _present(v):
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


def _ci(m: dict | None) -> str:
    if not m or not _present(m.get("estimate")):
        return "—"
    return f"{m['estimate']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(s))


def _table(df: pd.DataFrame, sortable: bool = True) -> str:
    cls = "sortable" if sortable else "plain"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            sort = f" data-v='{float(v)}'" if num and _present(v) else ""
            cells.append(f"<td class='{'num' if num else ''}'{sort}>{html.escape(_fmt(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<div class='tw'><table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _fig(name: str, caption: str, small: bool = False) -> str:
    return (f"<figure class='{'small' if small else 'fig'}'><img src='{IMG}/{html.escape(name)}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
header{background:#17324d;color:#fff;padding:18px 32px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;color:#c9d6e3;font-size:13px}nav{padding:8px 32px;background:#e9eef4;position:sticky;top:0;z-index:2}
nav a{margin-right:18px;color:#17324d;text-decoration:none;font-weight:600}main{padding:8px 32px 48px;max-width:1280px}
h2{border-bottom:2px solid #17324d;padding-bottom:4px;margin-top:36px}h3{margin:24px 0 8px}
.cards{display:flex;gap:12px;margin:12px 0}.card{background:#fff;border:1px solid #d5dde6;border-radius:6px;padding:8px 16px;min-width:90px}
.card b{display:block;font-size:24px}.card.completed b{color:#1b7a3a}.card.pruned b{color:#a86b00}.card.failed b{color:#b3261e}
.tw{overflow-x:auto;max-height:520px;overflow-y:auto;border:1px solid #d5dde6;border-radius:4px;background:#fff}
table{border-collapse:collapse;font-size:12.5px;width:100%}table.plain{width:auto}.tw:has(table.plain){display:inline-block;max-width:100%}th,td{padding:4px 8px;border-bottom:1px solid #eef1f4;white-space:nowrap;text-align:left}
th{background:#f1f4f8;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}table.sortable th:hover{background:#dfe7f0}th.asc:after{content:" ▲"}th.desc:after{content:" ▼"}
figure{margin:14px 0}figure.fig img{max-width:100%;border:1px solid #e3e8ee;background:#fff}
figcaption{font-size:12.5px;color:#4a5568;max-width:900px}.grid2{display:grid;grid-template-columns:repeat(2,minmax(0,460px));gap:12px}
figure.small img{width:100%;border:1px solid #e3e8ee;background:#fff}.params{font-size:13px;color:#333}
.row{display:flex;gap:10px;align-items:flex-start;margin:8px 0;padding:8px;background:#fff;border:1px solid #e3e8ee;border-radius:4px}
.cap{width:170px;font-size:12.5px}.tile{margin:0}.tile figcaption{font-size:11px;text-align:center;width:176px}
.hint{color:#5a6573;font-size:12.5px}code{background:#eef1f4;padding:1px 4px;border-radius:3px}
"""

# Column sorting for the trials table: no library in this project does it for a static page, and it
# is a dozen lines (numbers sort by their data-v value, text alphabetically, blanks last).
_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var asc=!th.classList.contains('asc');t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});
    th.classList.add(asc?'asc':'desc');var b=t.tBodies[0],rows=Array.from(b.rows);
    rows.sort(function(a,c){var x=a.cells[i],y=c.cells[i],u=x.dataset.v,v=y.dataset.v;
      if(u===undefined&&v===undefined){return asc?x.textContent.localeCompare(y.textContent):y.textContent.localeCompare(x.textContent)}
      if(u===undefined)return 1;if(v===undefined)return -1;return asc?u-v:v-u});
    rows.forEach(function(r){b.appendChild(r)})})})});
"""


def _page(name: str, path: Path, sweep: dict, trials: pd.DataFrame, sections: list[tuple[str, str, str]]) -> str:
    from skinsweep.train.loop import versions

    v = versions()
    nav = "".join(f"<a href='#{sid}'>{html.escape(title.split(':')[0])}</a>" for sid, title, _ in sections)
    body = "".join(f"<h2 id='{sid}'>{html.escape(title)}</h2>{content}" for sid, title, content in sections)
    meta = (f"dataset {html.escape(str(sweep.get('dataset', '?')))} · split {html.escape(str(sweep.get('split_hash', '?'))[:12])} · "
            f"recipe {html.escape(str(sweep.get('recipe_file', '?')))} · {len(trials)} trials")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>skinsweep report: {html.escape(name)}</title>"
            f"<style>{_CSS}</style></head><body><header><h1>skinsweep report — {html.escape(name)}</h1><p>{meta}</p>"
            f"<p>results {html.escape(str(path))} · generated {dt.datetime.now():%Y-%m-%d %H:%M} · skinsweep "
            f"{html.escape(str(v.get('skinsweep')))}, torch {html.escape(str(v.get('torch')))}</p></header><nav>{nav}</nav>"
            f"<main>{body}</main><script>{_JS}</script></body></html>")


__all__ = ["build_report"]
