"""What ``skinsweep report`` shows, computed before any markup: :func:`report_data` returns a
:class:`ReportData` of DataFrames and plain values, which :mod:`skinsweep.report.page` draws and renders.

Every number is computed here from the stored per-image predictions (``predictions/``, an
ensemble's ``predictions.parquet``), or read from the ensemble's report, which was computed from its
predictions the same way. Thresholds are chosen on validation; tables and galleries are on test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError, DataError, SkinsweepError
from skinsweep.metrics import format_ci

AGE_GROUPS = ["<30", "30–44", "45–59", "60–74", "75+"]
MIN_CLASS_FOR_AUC = 5  # a metadata group's AUC needs this many melanomas and this many benign lesions
TABLE_ROWS = 100  # per-trial tables (all trials, stopped early, failed) show at most this many rows; the page says so


@dataclass
class Selected:
    """A trial shown in the per-model section (and explained in the gallery)."""

    trial_id: str
    label: str
    row: pd.Series       # its trials.parquet row
    val: pd.DataFrame    # this trial's val predictions, image order
    test: pd.DataFrame
    threshold: float     # chosen on val

    @property
    def params(self) -> dict:
        """The settings shown under this model's heading (those the trial has)."""
        keys = ["backbone", "mode", "lr", "pos_weight", "backbone_lr_mult", "backbone_args", "epochs", "batch_size",
                "best_epoch", "runtime_s"]
        return {k: backbone_args_text(self.row[k]) if k == "backbone_args" else self.row[k]
                for k in keys if k in self.row.index and not is_missing(self.row[k])}


@dataclass
class Ensemble:
    """An ensemble folder (``skinsweep ensemble build``'s ``--out``) and its test metrics with CIs."""

    name: str
    path: Path
    report: dict          # its report.json
    preds: pd.DataFrame   # its predictions.parquet

    @property
    def table(self) -> pd.DataFrame:
        """Members and ensemble × test metric, as "0.912 [0.880, 0.940]" (estimate [95% CI])."""
        metrics = {"auc": "AUC", "ap": "AP", "recall": "sensitivity", "specificity": "specificity",
                   "sens_at_spec": "sens @ spec", "ece": "ECE", "brier": "Brier"}
        return pd.DataFrame([{"model": model, **{label: format_ci(m.get(k), missing="—") for k, label in metrics.items()}}
                             for model, m in self.report["test"].items()])

    @property
    def threshold_rule(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (self.report.get("threshold_rule") or {}).items())


@dataclass
class Source:
    """Whose test predictions the gallery and error analysis show: an ensemble's or a model's."""

    name: str
    test: pd.DataFrame   # image_id, lesion_id, label, dx, prob
    threshold: float
    explain: list[str]   # trial ids whose heat maps the gallery shows


@dataclass
class ReportData:
    """Everything on the page but the figures. Tables are DataFrames of raw values (the page formats them)."""

    results: Path
    sweep: dict                          # sweep.json
    trials: pd.DataFrame                 # trials.parquet, all of it
    history: pd.DataFrame                # per-epoch metrics of every trial
    counts: dict[str, int]               # trials per status
    trials_table: pd.DataFrame           # the sortable table of the trials, best val AUC first (≤ table_rows)
    pruned: pd.DataFrame                 # stopped by ASHA (≤ table_rows, earliest stop first)
    failed: pd.DataFrame                 # with the last line of their error (≤ table_rows)
    target_sensitivity: float
    selected: list[Selected]
    models: pd.DataFrame | None          # one row of val/test metrics per selected model
    ensembles: list[Ensemble]
    source: Source | None                # None: no model or ensemble has test predictions
    index: pd.DataFrame | None           # the dataset index (paths, metadata); None: not readable
    index_note: str                      # why it is None
    gallery: dict[str, pd.DataFrame]     # "fn" / "fp" / "tp" → source test rows (with "path")
    by_dx: pd.DataFrame | None
    by_meta: dict[str, pd.DataFrame]     # "age group" / "sex" / "site" → per-group metrics
    table_rows: int = TABLE_ROWS         # the cap on the per-trial tables

    @property
    def name(self) -> str:
        return self.sweep.get("name") or self.results.name

    @property
    def n_pruned(self) -> int:
        """Trials stopped by ASHA (the ``pruned`` table shows at most ``table_rows`` of them)."""
        return int(self.counts.get("pruned", 0))

    @property
    def n_failed(self) -> int:
        return int(self.counts.get("failed", 0))


def report_data(results: str | Path, *, ensembles: Sequence[str | Path] = (), trials: Sequence[str] | None = None,
                target_sensitivity: float = 0.95, gallery: int = 4, table_rows: int = TABLE_ROWS,
                log: Callable[[str], None] = print) -> ReportData:
    """Load a sweep (and ensembles built from it) and compute every table of its report; bad input raises
    a one-line :class:`~skinsweep.errors.SkinsweepError`. Arguments as :func:`skinsweep.report.page.build_report`'s;
    ``table_rows`` caps the per-trial tables (a sweep of thousands of trials would make a page no browser
    sorts or scrolls usefully; all trials stay in trials.parquet)."""
    from skinsweep.results import load

    res = load(results)
    trials_df = res.trials
    if trials_df.empty:
        raise DataError(f"{res.path} has no trials yet; run the sweep first")
    ens = [_load_ensemble(Path(e), res.path, trials_df) for e in ensembles]
    selected = _select(res, trials_df, trials, target_sensitivity)
    source = _source(ens, selected)
    log(f"report: {len(trials_df)} trials in {res.path}")
    index, index_note = _dataset_index(res.sweep, log)
    pruned, failed = (t.head(table_rows) for t in stopped_and_failed(trials_df))
    return ReportData(
        results=res.path, sweep=res.sweep, trials=trials_df, history=res.store.history(),
        counts=trials_df["status"].value_counts().to_dict(), trials_table=trials_table(trials_df).head(table_rows),
        pruned=pruned, failed=failed, target_sensitivity=target_sensitivity,
        selected=selected, models=model_metrics(selected) if selected else None, ensembles=ens, source=source,
        index=index, index_note=index_note,
        gallery=gallery_rows(source, index, gallery) if source is not None and index is not None else {},
        by_dx=by_diagnosis(source) if source is not None else None,
        by_meta=by_metadata(source, index) if source is not None and index is not None else {},
        table_rows=table_rows,
    )


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


def _select(res, trials_df: pd.DataFrame, ids: Sequence[str] | None, target_sensitivity: float) -> list[Selected]:
    """The trials given, or the best completed trial per backbone by val AUC, with their predictions."""
    from skinsweep.ensemble.calibrators import choose_threshold

    rows = trials_df.set_index("trial_id")
    if ids:
        unknown = sorted(set(ids) - set(rows.index))
        if unknown:
            raise ConfigError(f"--trial {', '.join(unknown)}: not in {res.path}; list them with `skinsweep results show`")
        chosen = list(ids)
    else:
        done = trials_df[trials_df["status"] == "completed"].dropna(subset=["val_auc"])
        best = done.sort_values("val_auc", ascending=False).groupby("backbone", sort=False).head(1)
        chosen = best["trial_id"].tolist()
    out = []
    preds = res.store.predictions(chosen) if chosen else pd.DataFrame()
    for t in chosen:
        p = preds[preds["trial_id"] == t]
        val, test = (p[p["split"] == s].sort_values("image_id").reset_index(drop=True) for s in ("val", "test"))
        if val.empty or test.empty:
            if ids:
                raise DataError(f"trial {t} has no stored val/test predictions (status "
                                f"{rows.loc[t, 'status']}); pick a completed trial")
            continue
        row = rows.loc[t]
        thr = float(choose_threshold(val["label"].to_numpy(int), val["prob"].to_numpy(float),
                                     target_sensitivity=target_sensitivity))
        out.append(Selected(t, f"{row['backbone']}/{row['mode']}/{t}", row, val, test, thr))
    return out


def _load_ensemble(path: Path, results: Path, trials_df: pd.DataFrame) -> Ensemble:
    rep_file, pred_file = path / "report.json", path / "predictions.parquet"
    if not rep_file.is_file() or not pred_file.is_file():
        raise DataError(f"--ensemble {path}: no report.json + predictions.parquet there; pass the folder "
                        "`skinsweep ensemble build` wrote (ensembles/<name>/)")
    rep = json.loads(rep_file.read_text())
    ours = set(trials_df["split_hash"].dropna())
    if rep.get("split_hash") not in ours or not {m["trial_id"] for m in rep["members"]} <= set(trials_df["trial_id"]):
        raise DataError(f"--ensemble {path} was built from {rep.get('results')}, not from {results} (other trials "
                        "or split); rebuild it with `skinsweep ensemble build … --results` this sweep")
    return Ensemble(rep.get("name") or path.name, path, rep, pd.read_parquet(pred_file))


def _source(ens: list[Ensemble], selected: list[Selected]) -> Source | None:
    cols = ["image_id", "lesion_id", "label", "dx", "prob"]
    if ens:
        e = ens[0]
        t = e.preds[e.preds["split"] == "test"].rename(columns={"calibrated_prob": "prob"})
        return Source(f"ensemble {e.name}", t[cols].reset_index(drop=True), float(e.report["threshold"]),
                      [m["trial_id"] for m in e.report["members"]][:4])
    if selected:
        s = selected[0]
        return Source(f"best model {s.label}", s.test[cols], s.threshold, [x.trial_id for x in selected[:4]])
    return None


# ----------------------------------------------------------------------------- tables


def backbone_args_text(v) -> str:
    """``{"input_size": 48}`` (JSON text in trials.parquet) as ``input_size=48``."""
    try:
        d = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        return str(v)
    return ", ".join(f"{k}={x}" for k, x in d.items()) if isinstance(d, dict) else ("" if d is None else str(d))


def trials_table(trials: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("trial_id", "status", "backbone", "mode", "lr", "pos_weight", "backbone_lr_mult",
                        "backbone_args", "best_epoch", "epochs_run", "pruned_at_epoch", "val_auc", "val_ap",
                        "test_auc", "test_ap", "runtime_s", "node") if c in trials]
    table = trials[cols].sort_values("val_auc", ascending=False, na_position="last")
    if "backbone_args" in table:
        table = table.assign(backbone_args=table["backbone_args"].map(backbone_args_text))
    return table


def stopped_and_failed(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials ASHA stopped (by stopping epoch), and the failed ones with the last line of their error."""
    pruned = trials[trials["status"] == "pruned"]
    cols = [c for c in ("trial_id", "backbone", "mode", "lr", "pos_weight", "pruned_at_epoch", "val_auc") if c in pruned]
    pruned = pruned[cols].sort_values("pruned_at_epoch" if "pruned_at_epoch" in cols else "trial_id")
    failed = trials.loc[trials["status"] == "failed", ["trial_id", "backbone", "mode", "error"]]
    last_line = failed["error"].fillna("").map(lambda e: e.strip().splitlines()[-1][:200] if e.strip() else "")
    return pruned, failed.assign(error=last_line)


def is_missing(v) -> bool:
    return v is None or v is pd.NaT or (isinstance(v, float) and np.isnan(v))


def model_metrics(selected: list[Selected]) -> pd.DataFrame:
    """Val AUC/AP, and test AUC/AP/ECE and sensitivity/specificity at the validation-chosen threshold."""
    from skinsweep.metrics import binary_metrics

    rows = []
    for s in selected:
        mv = binary_metrics(s.val["label"].to_numpy(int), s.val["prob"].to_numpy(float))
        mt = binary_metrics(s.test["label"].to_numpy(int), s.test["prob"].to_numpy(float), threshold=s.threshold)
        rows.append({"model": s.label, "val AUC": mv["auc"], "val AP": mv["ap"], "test AUC": mt["auc"],
                     "test AP": mt["ap"], "test ECE": mt["ece"], "threshold (val)": s.threshold,
                     "test sensitivity": mt["recall"], "test specificity": mt["specificity"],
                     "test n (melanoma)": f"{mt['n']:,} ({mt['n_pos']:,})"})
    return pd.DataFrame(rows)


def aligned_prob(s: Selected, ref: Selected) -> np.ndarray:
    """``s``'s test probabilities in ``ref``'s image order (all trials of a sweep share the split)."""
    p = s.test.set_index("image_id")["prob"]
    missing = set(ref.test["image_id"]) - set(p.index)
    if missing:
        raise DataError(f"trial {s.trial_id} has no test predictions for {len(missing)} images that trial "
                        f"{ref.trial_id} has; were they run on different splits?")
    return p.loc[ref.test["image_id"]].to_numpy(float)


def gallery_rows(src: Source, index: pd.DataFrame, n: int) -> dict[str, pd.DataFrame]:
    """The ``n`` most confident false negatives and false positives and ``n // 2`` (at least 1) true
    positives on test, one image per lesion: HAM10000 photographs a lesion several times, and
    near-copies teach nothing."""
    t = src.test.merge(index[["image_id", "path"]], on="image_id", how="left")
    pos, flagged = t["label"] == 1, t["prob"] >= src.threshold

    def top(rows: pd.DataFrame, k: int, ascending: bool) -> pd.DataFrame:
        rows = rows.sort_values("prob", ascending=ascending)
        return rows.drop_duplicates("lesion_id").head(k) if rows["lesion_id"].notna().all() else rows.head(k)

    return {"fn": top(t[pos & ~flagged], n, True), "fp": top(t[~pos & flagged], n, False),
            "tp": top(t[pos & flagged], max(1, n // 2), False)}


def by_diagnosis(src: Source) -> pd.DataFrame:
    """Images, flagged images and mean probability per diagnosis, highest flagged rate first."""
    t = src.test.assign(flagged=(src.test["prob"] >= src.threshold).astype(int))
    g = t.groupby("dx").agg(images=("label", "size"), melanoma=("label", "max"),
                            flagged=("flagged", "sum"), mean_prob=("prob", "mean")).reset_index()
    g["rate"] = g["flagged"] / g["images"]
    g = g.sort_values("rate", ascending=False)
    return pd.DataFrame({"dx": g["dx"], "melanoma": g["melanoma"].map({1: "yes", 0: "no"}), "images": g["images"],
                         "flagged": g["flagged"], "flagged as melanoma": g["rate"].map("{:.1%}".format),
                         "mean p(melanoma)": g["mean_prob"]})


def age_group(age: pd.Series) -> pd.Series:
    """Ages in years as :data:`AGE_GROUPS` labels (object dtype; missing stays missing)."""
    return pd.cut(pd.to_numeric(age, errors="coerce"), [-1, 29, 44, 59, 74, 200], labels=AGE_GROUPS).astype(object)


def by_metadata(src: Source, index: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Sensitivity, specificity and AUC per age group, sex and site (those the dataset records)."""
    from sklearn.metrics import roc_auc_score

    meta = src.test.merge(index[["image_id", "age", "sex", "site"]], on="image_id", how="left")
    meta["flagged"] = (meta["prob"] >= src.threshold).astype(int)
    meta["age group"] = age_group(meta["age"])
    out = {}
    for col in ("age group", "sex", "site"):
        vals = meta[col].where(meta[col].notna() & (meta[col].astype(str).str.strip() != ""), "unknown").astype(str)
        if (vals == "unknown").all():
            continue
        groups = dict(list(meta.groupby(vals)))
        order = AGE_GROUPS if col == "age group" else sorted(set(vals) - {"unknown"})
        rows = []
        for v in [o for o in order + ["unknown"] if o in groups]:
            g = groups[v]
            y, p, f = g["label"].to_numpy(int), g["prob"].to_numpy(float), g["flagged"].to_numpy(int)
            pos, neg = y == 1, y == 0
            enough = pos.sum() >= MIN_CLASS_FOR_AUC and neg.sum() >= MIN_CLASS_FOR_AUC
            rows.append({col: v, "images": len(g), "melanomas": int(pos.sum()),
                         "sensitivity": f[pos].mean() if pos.any() else np.nan,
                         "specificity": 1 - f[neg].mean() if neg.any() else np.nan,
                         "AUC": roc_auc_score(y, p) if enough else np.nan})
        out[col] = pd.DataFrame(rows)
    return out
