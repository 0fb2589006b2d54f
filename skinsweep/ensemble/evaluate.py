"""External validation: score a bundle on another site's labelled images; say what a reviewer must know.

    ev = evaluate_bundle("ensembles/dino_clip/bundle", "/data/site_b", out="evaluations/site_b")
    ev["metrics"]["ensemble"]["auc"]      # {"estimate", "lo", "hi"}: lesion-grouped bootstrap CI
    ev["flags"]                           # one line each: prevalence, calibration, sensitivity, leakage

Steps:

1. read    — DATA in any layout the data layer reads (labels required; bad images: one-line error, or
             ``skip_bad``); its split manifest (default: the lesion-grouped default split) gives the
             ``split`` column and hash, so ``--split test`` and ``skinsweep compare`` work on it;
2. score   — every image decoded and resized exactly as the bundle does (:meth:`Bundle.score`), member
             probabilities, ensemble, calibrated probability, decision at the bundle's threshold;
3. leakage — each image's id and file sha256 against the bundle's ``training_images.parquet``;
4. metrics — every metric of :func:`skinsweep.ensemble.stats.bootstrap_metrics` with CIs resampled by
             lesion, calibration slope / intercept, subgroups (diagnosis, age, sex, site), and what the
             bundle promised on its own test split;
5. flags   — prevalence shift, calibration drift, sensitivity below the promise, leakage.

The HTML page is :mod:`skinsweep.report.evaluation`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError, SkinsweepError, did_you_mean
from skinsweep.metrics import sigmoid

EVALUATION_JSON = "evaluation.json"
PREDICTIONS = "predictions.parquet"
SPLIT_CHOICES = ("all", "train", "val", "test")
PREVALENCE_FACTOR = 1.5   # flag a prevalence this many times higher or lower than in training
SLOPE_TOLERANCE = 0.2     # flag a calibration slope outside 1 ± this (and its CI excluding 1)
INTERCEPT_TOLERANCE = 0.2  # flag a calibration intercept outside 0 ± this (and its CI excluding 0)
FIT_SPLITS = ("train", "val", "calibration")  # what a bundle was fitted on (calibration: by a recalibration)
SUBGROUPS = ("dx", "age group", "sex", "site")
MEMBER_METRICS = ("auc", "ap", "ece", "brier", "sens_at_spec")  # members have no operating point of their own


@dataclass
class Scored:
    """A bundle's predictions on a labelled dataset (steps 1-3)."""

    rows: pd.DataFrame        # one row per image: ids, label, dx, split, metadata, member probs, ensemble, decision
    logits: np.ndarray        # (N,) ensemble logits, before the calibrator
    index: Any                # the dataset's DatasetIndex (``bad``: images skipped)
    split: str
    split_hash: str | None
    leakage: dict
    member_labels: dict[str, str]  # prob column -> member label (backbone/mode/trial)

    @property
    def groups(self) -> np.ndarray | None:
        """Lesion id per image (image id where missing), or None when the dataset has no lesion ids."""
        lesion = self.rows["lesion_id"]
        return None if lesion.isna().all() else lesion.fillna(self.rows["image_id"]).astype(str).to_numpy()


def check_split(split: str) -> str:
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split {split!r} is not a split{did_you_mean(split, SPLIT_CHOICES)}; "
                          f"use one of {', '.join(SPLIT_CHOICES)}")
    return split


def score_dataset(bundle, data: str | Path, *, split: str = "all", positive: Sequence[str] | None = None,
                  fmt: str = "auto", skip_bad: bool = False, split_file: str | Path | None = None,
                  workers: int | None = None, batch: int = 64, progress: bool = False) -> Scored:
    """Steps 1-3: read ``data`` (labels required), score its ``split`` images with ``bundle``, check leakage.

    ``positive`` defaults to the classes the bundle's members were trained to call melanoma.
    """
    from rich.progress import Progress

    from skinsweep.data.index import load_index
    from skinsweep.data.split import get_or_create_split
    from skinsweep.ensemble.bundle import file_sha256

    check_split(split)
    positive = list(positive or bundle.model_meta[0].get("positive") or ["MEL"])
    index = load_index(data, fmt=fmt, positive=positive, skip_bad=skip_bad, workers=workers, progress=progress)
    df = index.df.copy()
    try:
        manifest, _, _ = get_or_create_split(index, split_path=split_file)
        df = df.merge(manifest.df[["image_id", "split"]], on="image_id", how="left")
        split_hash = manifest.hash
    except SkinsweepError:
        if split != "all" or split_file is not None:
            raise
        df["split"], split_hash = None, None  # too small to split: all images, no split hash
    if split != "all":
        df = df[df["split"] == split].reset_index(drop=True)
        if df.empty:
            raise ConfigError(f"{data}: its split has no {split} images; use --split all")
    cols = ["image_id", "lesion_id", "label", "dx", "split", "age", "sex", "site", "path"]
    rows = df[cols].reset_index(drop=True)
    meta = None
    if bundle.metadata_features:  # DATA's own age / sex / site; an image with none of them has no row
        from skinsweep.ensemble.metadata import without_metadata

        meta = rows[["image_id", "age", "sex", "site"]]
        meta = meta[~without_metadata(meta, bundle.metadata_features)]

    paths, ids = rows["path"].tolist(), rows["image_id"].tolist()
    X, ens, no_row = [], [], []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("scoring", total=len(paths))
        for s in range(0, len(paths), batch):
            x, e, nr = bundle.score(paths[s:s + batch], metadata=meta, image_ids=ids[s:s + batch])
            X.append(x)
            ens.append(e)
            no_row.append(nr)
            bar.advance(task, len(paths[s:s + batch]))
    X, ens = np.concatenate(X), np.concatenate(ens)
    cal = bundle.calibrator.predict_proba(ens)
    labels = _member_labels(bundle)
    rows = rows.assign(**{f"prob_{m}": sigmoid(X[:, j]) for j, m in enumerate(bundle.member_ids)},
                       ensemble_prob=sigmoid(ens), calibrated_prob=cal,
                       decision=(cal >= bundle.threshold).astype("int8"))
    if meta is not None:
        rows["metadata_missing"] = np.concatenate(no_row)
    rows["sha256"] = file_sha256(paths, progress=progress)
    leakage, seen = check_leakage(rows, bundle)
    rows["seen_by_bundle"] = seen
    return Scored(rows=rows.drop(columns="path"), logits=ens, index=index, split=split, split_hash=split_hash,
                  leakage=leakage, member_labels={f"prob_{m}": labels[m] for m in bundle.member_ids})


def _member_labels(bundle) -> dict[str, str]:
    out = {}
    for e in bundle.meta["members"]:
        spec = (e.get("model") or {}).get("backbone") or {}
        name = spec.get("name") if isinstance(spec, dict) else None
        out[e["trial_id"]] = f"{name or 'member'}/{(e.get('model') or {}).get('mode', '?')}/{e['trial_id']}"
    return out


def check_leakage(rows: pd.DataFrame, bundle) -> tuple[dict, list]:
    """Which images the bundle has seen: same image id or same file sha256 (``rows["sha256"]``) as one of
    the images it records (``training_images.parquet``).

    Returns (summary, per image: the split it was seen in, or None). The summary counts images used to
    fit the bundle (train / val / calibration), images of its own test split, and how they matched.
    """
    record = bundle.training_images()
    if record is None:
        note = (bundle.meta.get("training") or {}).get("note") or \
            "the bundle records no training images (built before skinsweep recorded them)"
        return {"checked": False, "note": f"leakage not checked: {note}"}, [None] * len(rows)
    by_id = rows["image_id"].map(record.drop_duplicates("image_id").set_index("image_id")["split"])
    by_hash = rows["sha256"].map(record.drop_duplicates("sha256").set_index("sha256")["split"])
    seen = by_id.where(by_id.notna(), by_hash)
    fit, test = seen.isin(FIT_SPLITS), seen == "test"
    examples = rows.loc[fit | test, "image_id"].head(5).tolist()
    return {"checked": True, "n_images": int(len(rows)), "fit": int(fit.sum()), "test": int(test.sum()),
            "by_split": {str(k): int(v) for k, v in seen.value_counts().items()},
            "same_id": int(by_id.notna().sum()), "same_content": int(by_hash.notna().sum()),
            "same_content_other_id": int((by_hash.notna() & by_id.isna()).sum()),
            "examples": examples}, [None if pd.isna(v) else str(v) for v in seen]


# --------------------------------------------------------------------------------------------------
# Metrics and flags
# --------------------------------------------------------------------------------------------------

def _ci_dict(table: pd.DataFrame, model: str, keep: Sequence[str] | None = None) -> dict:
    t = table[table["model"] == model].set_index("metric")[["estimate", "lo", "hi"]]
    return {k: v for k, v in t.to_dict("index").items() if keep is None or k in keep}


def subgroup_tables(rows: pd.DataFrame, threshold: float, groups: np.ndarray | None, *, n_boot: int,
                    seed: int) -> dict[str, list[dict]]:
    """Per diagnosis, age group, sex and site (those the data records): images, melanomas, sensitivity,
    specificity and AUC with bootstrap CIs (by lesion when ``groups``); AUC only with at least
    ``MIN_CLASS_FOR_AUC`` images of each class."""
    from skinsweep.ensemble.stats import bootstrap_metrics
    from skinsweep.report.tables import AGE_GROUPS, MIN_CLASS_FOR_AUC, age_group

    t = rows.assign(**{"age group": age_group(rows["age"])})
    out: dict[str, list[dict]] = {}
    for col in SUBGROUPS:
        vals = t[col].astype(object).where(t[col].notna() & (t[col].astype(str).str.strip() != ""), "unknown")
        vals = vals.astype(str)
        if col != "dx" and (vals == "unknown").all():
            continue
        order = AGE_GROUPS if col == "age group" else sorted(set(vals) - {"unknown"})
        table = []
        for v in [o for o in [*order, "unknown"] if (vals == o).any()]:
            sel = (vals == v).to_numpy()
            y, p = t.loc[sel, "label"].to_numpy(int), t.loc[sel, "calibrated_prob"].to_numpy(float)
            ci = bootstrap_metrics(y, {"g": p}, groups=None if groups is None else groups[sel],
                                   threshold=threshold, n_boot=n_boot, seed=seed)
            m = _ci_dict(ci, "g")
            enough = min(int(y.sum()), int((1 - y).sum())) >= MIN_CLASS_FOR_AUC
            table.append({"group": v, "images": int(sel.sum()), "melanomas": int(y.sum()),
                          "sensitivity": m["recall"], "specificity": m["specificity"],
                          "auc": m["auc"] if enough else None})
        out[col] = table
    return out


def reference_prevalence(meta: dict) -> float | None:
    """The melanoma prevalence a bundle's probabilities assume: where it was (re)calibrated."""
    prev = (meta.get("calibrated_on") or {}).get("prevalence")
    if prev is not None:
        return float(prev)
    p = (meta.get("training") or {}).get("prevalence") or {}
    v = p.get("val", p.get("train"))
    return None if v is None else float(v)


def make_flags(ev: dict, *, prevalence_factor: float = PREVALENCE_FACTOR) -> list[dict]:
    """The lines a reviewer must read, from an evaluation dict: ``[{"kind", "message"}]``."""
    from skinsweep.metrics import format_ci

    flags = []
    here, train = ev["prevalence"]["here"], ev["prevalence"].get("training")
    if train and here > 0:
        ratio = max(here / train, train / here)
        if ratio > prevalence_factor:
            flags.append({"kind": "prevalence", "message": (
                f"prevalence {here:.1%} here vs {train:.1%} where the bundle was calibrated ({ratio:.1f}× apart, "
                f"more than {prevalence_factor:g}×): its probabilities assume that prevalence; recalibrate for this "
                "site (skinsweep recalibrate)")})
    slope, icpt = ev["calibration"]["slope"], ev["calibration"]["intercept"]
    if _far(slope, 1.0, SLOPE_TOLERANCE):
        how = "too extreme" if slope["estimate"] < 1 else "too timid"
        flags.append({"kind": "calibration_slope", "message": (
            f"calibration slope {format_ci(slope)} (ideal 1): predictions are {how} here; "
            "recalibrate (skinsweep recalibrate)")})
    if _far(icpt, 0.0, INTERCEPT_TOLERANCE):
        how = "underestimates" if icpt["estimate"] > 0 else "overestimates"
        flags.append({"kind": "calibration_intercept", "message": (
            f"calibration intercept {format_ci(icpt)} (ideal 0): the bundle {how} melanoma risk here; "
            "recalibrate (skinsweep recalibrate)")})
    promised = ((ev.get("promised") or {}).get("metrics") or {}).get("recall") or {}
    sens = ev["metrics"]["ensemble"]["recall"]
    if promised.get("estimate") is not None and sens["hi"] is not None and sens["hi"] < promised["estimate"]:
        flags.append({"kind": "sensitivity", "message": (
            f"sensitivity at the bundle's threshold {format_ci(sens)} is below the {promised['estimate']:.3f} "
            "it promised on its own test split (the CI excludes it)")})
    if ev["n"].get("metadata_missing"):
        flags.append({"kind": "metadata", "message": (
            f"{ev['n']['metadata_missing']:,} of {ev['n']['images']:,} images have none of the patient metadata the "
            "bundle stacks (age, sex, site); they were scored as unknown")})
    leak = ev["leakage"]
    if not leak["checked"]:
        flags.append({"kind": "leakage_unchecked", "message": leak["note"]})
    else:
        if leak["fit"]:
            flags.append({"kind": "leakage", "message": (
                f"leakage: {leak['fit']:,} of {leak['n_images']:,} images were used to fit this bundle "
                f"({_split_counts(leak, FIT_SPLITS)}; {leak['same_id']:,} same image id, {leak['same_content']:,} "
                f"identical file content; e.g. {', '.join(leak['examples'][:3])}): not external data — drop them")})
        if leak["test"]:
            flags.append({"kind": "own_test", "message": (
                f"{leak['test']:,} images are in the bundle's own test split: this is not an external evaluation "
                "for them")})
    return flags


def _far(ci: dict, ideal: float, tol: float) -> bool:
    est, lo, hi = ci.get("estimate"), ci.get("lo"), ci.get("hi")
    if est is None or lo is None or hi is None or any(np.isnan(v) for v in (est, lo, hi)):
        return False
    return abs(est - ideal) > tol and not lo <= ideal <= hi


def _split_counts(leak: dict, splits: Sequence[str]) -> str:
    return ", ".join(f"{s} {leak['by_split'][s]:,}" for s in splits if leak["by_split"].get(s))


def evaluation_metrics(sc: Scored, bundle, *, n_boot: int = 2000, seed: int = 0, spec_for_sens: float = 0.9,
                       prevalence_factor: float = PREVALENCE_FACTOR) -> dict:
    """Step 4-5 on scored rows: the evaluation dict written as ``evaluation.json`` (flags included)."""
    from skinsweep.ensemble.bundle import bundle_hash
    from skinsweep.ensemble.stats import bootstrap_metrics, calibration_fit

    rows, thr, groups = sc.rows, bundle.threshold, sc.groups
    y = rows["label"].to_numpy(int)
    probs = {"ensemble": rows["calibrated_prob"].to_numpy(float)} | {
        label: rows[col].to_numpy(float) for col, label in sc.member_labels.items()}
    thresholds = {m: (thr if m == "ensemble" else 0.5) for m in probs}
    ci = bootstrap_metrics(y, probs, groups=groups, threshold=thresholds, n_boot=n_boot, seed=seed,
                           spec_for_sens=spec_for_sens)
    ev = {
        "bundle": str(bundle.path), "bundle_name": bundle.meta.get("name"), "bundle_hash": bundle_hash(bundle.path),
        "data": str(sc.index.root), "format": sc.index.fmt, "dataset_hash": sc.index.hash,
        "positive": list(sc.index.positive), "split": sc.split, "split_hash": sc.split_hash,
        "n": {"images": int(len(y)), "melanoma": int(y.sum()),
              "lesions": None if groups is None else int(len(set(groups))), "skipped": len(sc.index.bad)},
        "skipped": sc.index.bad[:50],
        "prevalence": {"here": float(y.mean()), "training": reference_prevalence(bundle.meta),
                       "factor": prevalence_factor},
        "threshold": thr, "threshold_rule": bundle.meta.get("threshold_rule"),
        "unit": "image" if groups is None else "lesion", "n_boot": n_boot, "seed": seed, "spec_for_sens": spec_for_sens,
        "metrics": {"ensemble": _ci_dict(ci, "ensemble")} | {
            label: _ci_dict(ci, label, MEMBER_METRICS) for label in sc.member_labels.values()},
        "calibration": calibration_fit(y, probs["ensemble"], groups=groups, n_boot=n_boot, seed=seed)
        | {"mean_predicted": float(probs["ensemble"].mean()), "observed": float(y.mean())},
        "promised": bundle.meta.get("promised"),
        "subgroups": subgroup_tables(rows, thr, groups, n_boot=min(n_boot, 1000), seed=seed),
        "leakage": sc.leakage,
    }
    if "metadata_missing" in rows:
        ev["n"]["metadata_missing"] = int(rows["metadata_missing"].sum())
    ev["flags"] = make_flags(ev, prevalence_factor=prevalence_factor)
    return ev


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def evaluate_bundle(bundle: str | Path, data: str | Path, *, out: str | Path | None = None, split: str = "all",
                    positive: Sequence[str] | None = None, fmt: str = "auto", skip_bad: bool = False,
                    split_file: str | Path | None = None, n_boot: int = 2000, seed: int = 0,
                    spec_for_sens: float = 0.9, prevalence_factor: float = PREVALENCE_FACTOR,
                    workers: int | None = None, progress: bool = False, page: bool = True,
                    log: Callable[[str], None] = lambda m: None) -> dict:
    """Score ``bundle`` on the labelled dataset ``data`` and write ``out`` (default
    ``evaluations/<bundle name>_on_<data name>/``): ``evaluation.json``, ``predictions.parquet`` and (``page``)
    ``index.html`` with its plots in ``img/``. Returns the evaluation dict (``out``: where it went)."""
    from skinsweep.ensemble.bundle import load_bundle
    from skinsweep.files import atomic_path, atomic_write_text, json_safe

    check_split(split)
    if prevalence_factor <= 1:
        raise ConfigError(f"--prevalence-factor must be > 1, got {prevalence_factor}; e.g. 1.5")
    b = load_bundle(bundle)
    sc = score_dataset(b, data, split=split, positive=positive, fmt=fmt, skip_bad=skip_bad, split_file=split_file,
                       workers=workers, progress=progress)
    log(f"scored {len(sc.rows):,} images of {data}")
    ev = evaluation_metrics(sc, b, n_boot=n_boot, seed=seed, spec_for_sens=spec_for_sens,
                            prevalence_factor=prevalence_factor)
    out = Path(out) if out else Path("evaluations") / f"{b.meta.get('name') or 'bundle'}_on_{Path(data).stem}"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PREDICTIONS) as tmp:
        sc.rows.to_parquet(tmp, index=False)
    if page:
        from skinsweep.report.evaluation import evaluation_page

        ev["page"] = str(evaluation_page(out, ev, sc.rows, sc.member_labels))
    ev["out"] = str(out)
    atomic_write_text(out / EVALUATION_JSON, json.dumps(json_safe(ev), indent=2))
    return ev


__all__ = ["Scored", "check_leakage", "evaluate_bundle", "evaluation_metrics", "make_flags", "reference_prevalence",
           "score_dataset", "subgroup_tables"]
