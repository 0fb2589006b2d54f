"""Site recalibration: refit a bundle's calibrator and threshold on a site's labelled data, nothing else.

    rep = recalibrate_bundle("ensembles/dino_clip/bundle", "/data/site_b", "bundles/dino_clip_site_b",
                             method="temperature", target_sensitivity=0.95)
    rep["before"]["ece"], rep["after"]["ece"]    # before: the parent as is; after: out-of-fold on the site

The members and the combiner stay as they are, so the ensemble logit of every image is unchanged and a
monotone calibrator (temperature, Platt) leaves the ranking, and hence the AUC, exactly as it was; it
moves the probabilities (a different melanoma prevalence alone shifts every one of them) and the
threshold. The calibrator is cross-fitted on the site's images (folds grouped by lesion, stratified,
:meth:`~skinsweep.ensemble.calibrators.Calibrator.fit_crossfit`) and the threshold is chosen on those
out-of-fold probabilities, so every "after" number is out-of-fold; the deployed calibrator is then
fitted on all the site's images.

The new bundle is the parent's files with a new ``bundle.json`` (calibrator, threshold, ``parent``:
its path and hash, ``calibrated_on``: the data, its hash and the settings, ``promised``: the
out-of-fold numbers), the site's images added to ``training_images.parquet`` as ``calibration``, a
``recalibration.json`` report, a before/after reliability plot and a new model card (the new calibrator,
threshold and calibration data; the parent's members and test results), all under a new manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError

RECALIBRATION_JSON = "recalibration.json"
RELIABILITY_PNG = "recalibration"  # .png
METHODS = ("temperature", "platt", "isotonic")


def _prepare_out(out: Path, parent: Path) -> None:
    """``out`` must be new, empty or an earlier bundle (replaced whole), and not the parent itself."""
    from skinsweep.ensemble.bundle import MANIFEST

    if out.resolve() == parent.resolve():
        raise ConfigError(f"--out {out} is the bundle being recalibrated; write the new bundle to a new folder")
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise ConfigError(f"--out {out} exists and is not a bundle; choose a new folder for the recalibrated bundle")
        shutil.rmtree(out)


def recalibrate_bundle(bundle: str | Path, data: str | Path, out: str | Path, *, method: str = "temperature",
                       target_sensitivity: float = 0.95, split: str = "all", positive: Sequence[str] | None = None,
                       fmt: str = "auto", skip_bad: bool = False, split_file: str | Path | None = None,
                       n_splits: int = 5, seed: int = 0, n_boot: int = 2000, workers: int | None = None,
                       progress: bool = False, log: Callable[[str], None] = lambda m: None) -> dict:
    """Write ``out``: ``bundle`` with its calibrator and threshold refitted on ``data``'s labelled images.

    Returns the recalibration report (also ``out/recalibration.json``): before / after (out-of-fold)
    metrics with bootstrap CIs by lesion, calibration slope and intercept, thresholds, and the AUC of
    the deployed calibrator on the site (equal to the parent's for temperature and Platt).
    """
    from skinsweep.ensemble.bundle import BUNDLE_JSON, TRAINING_IMAGES, bundle_hash, load_bundle, write_manifest
    from skinsweep.ensemble.calibrators import choose_threshold, make_calibrator
    from skinsweep.ensemble.evaluate import reference_prevalence, score_dataset
    from skinsweep.ensemble.stats import bootstrap_metrics, calibration_fit
    from skinsweep.errors import did_you_mean
    from skinsweep.files import atomic_path, atomic_write_text, json_safe
    from skinsweep.metrics import binary_metrics

    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not a calibrator{did_you_mean(method, METHODS)}; "
                          f"use one of {', '.join(METHODS)}")
    if not 0 < target_sensitivity <= 1:
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}; e.g. 0.95")
    parent, out = Path(bundle), Path(out)
    b = load_bundle(parent)
    _prepare_out(out, parent)

    # ---- score the site (members and combiner as they are) ---------------------------------------
    sc = score_dataset(b, data, split=split, positive=positive, fmt=fmt, skip_bad=skip_bad, split_file=split_file,
                       workers=workers, progress=progress)
    log(f"scored {len(sc.rows):,} images of {data}")
    y, z, groups = sc.rows["label"].to_numpy(int), sc.logits, sc.groups
    before = sc.rows["calibrated_prob"].to_numpy(float)

    # ---- refit calibrator + threshold, cross-fitted by lesion -------------------------------------
    cal = make_calibrator(method)
    oof = cal.fit_crossfit(z, y, groups, n_splits=n_splits, seed=seed)  # cal ends fitted on all rows
    thr = float(choose_threshold(y, oof, target_sensitivity=target_sensitivity))  # the deployed threshold
    deployed = cal.predict_proba(z)
    decided = _out_of_fold_decisions(method, z, y, groups, target_sensitivity, n_splits=n_splits, seed=seed)

    # ---- before / after ---------------------------------------------------------------------------
    ci = bootstrap_metrics(y, {"before": before, "after": oof}, groups=groups,
                           threshold={"before": b.threshold, "after": thr}, n_boot=n_boot, seed=seed)
    table = {m: t.set_index("metric")[["estimate", "lo", "hi"]].to_dict("index") for m, t in ci.groupby("model")}
    # "after" at a threshold: each fold's decisions come from a threshold chosen without that fold (the same
    # lesion resamples, so still paired with "before"); a threshold picked on all rows would meet the target
    # sensitivity on them by construction
    at_thr = bootstrap_metrics(y, {"after": decided}, groups=groups, threshold=0.5, n_boot=n_boot, seed=seed)
    table["after"].update({k: v for k, v in at_thr.set_index("metric")[["estimate", "lo", "hi"]].to_dict("index").items()
                           if k in DECISION_METRICS})
    calib = {"before": calibration_fit(y, before, groups=groups, n_boot=n_boot, seed=seed),
             "after": calibration_fit(y, oof, groups=groups, n_boot=n_boot, seed=seed)}
    prevalence = float(y.mean())
    report = {
        "bundle": str(out), "parent": str(parent), "parent_hash": bundle_hash(parent), "method": method,
        "data": str(sc.index.root), "dataset_hash": sc.index.hash, "split": split, "split_hash": sc.split_hash,
        "n": {"images": int(len(y)), "melanoma": int(y.sum()),
              "lesions": None if groups is None else int(len(set(groups))), "skipped": len(sc.index.bad)},
        "skipped": sc.index.bad[:50],
        "prevalence": {"here": prevalence, "parent": reference_prevalence(b.meta)},
        "threshold": {"before": b.threshold, "after": thr, "target_sensitivity": target_sensitivity},
        "before": table["before"], "after": table["after"], "calibration": calib,
        "auc": {"before": binary_metrics(y, before)["auc"], "deployed": binary_metrics(y, deployed)["auc"],
                "out_of_fold": table["after"]["auc"]["estimate"]},
        "n_splits": n_splits, "seed": seed, "n_boot": n_boot, "unit": "image" if groups is None else "lesion",
        "leakage": sc.leakage,
    }

    # ---- the new bundle -----------------------------------------------------------------------------
    shutil.copytree(parent, out)
    for stale in (RECALIBRATION_JSON, f"{RELIABILITY_PNG}.png"):
        (out / stale).unlink(missing_ok=True)  # the parent's own, when it was recalibrated itself
    meta = json.loads((out / BUNDLE_JSON).read_text())
    meta["parent"] = {"path": str(parent), "hash": report["parent_hash"], "name": meta.get("name"),
                      "calibrator": meta["calibrator"], "threshold": meta["threshold"],
                      "threshold_rule": meta.get("threshold_rule")}
    meta.update(calibrator=cal.to_dict(), threshold=thr, threshold_rule={"target_sensitivity": target_sensitivity})
    meta["calibrated_on"] = {"data": report["data"], "dataset_hash": sc.index.hash, "format": sc.index.fmt,
                             "split": split, "split_hash": sc.split_hash, "n": report["n"], "prevalence": prevalence,
                             "method": method, "n_splits": n_splits, "seed": seed}
    meta["promised"] = {"split": "calibration data, out-of-fold", "n": int(len(y)), "n_pos": int(y.sum()),
                        "metrics": table["after"]}
    record = b.training_images()
    if record is not None:  # the site's images are now "seen": evaluate flags them as used to fit
        site = pd.DataFrame({"image_id": sc.rows["image_id"], "split": "calibration",
                             "label": sc.rows["label"].astype("int8"), "sha256": sc.rows["sha256"]})
        with atomic_path(out / TRAINING_IMAGES) as tmp:
            pd.concat([record[record["split"] != "calibration"], site], ignore_index=True).to_parquet(tmp, index=False)
    else:
        meta.setdefault("training", {})["note"] = ((meta.get("training") or {}).get("note") or
                                                   "the parent bundle records no training images")
    atomic_write_text(out / BUNDLE_JSON, json.dumps(json_safe(meta), indent=2))
    from skinsweep.report.plots import reliability

    report["plot"] = reliability(out, RELIABILITY_PNG, y, {"before (parent)": before, "after (out-of-fold)": oof},
                                 f"Reliability on {Path(report['data']).name}")
    atomic_write_text(out / RECALIBRATION_JSON, json.dumps(json_safe(report), indent=2))
    from skinsweep.ensemble.model_card import build_model_card, load_model_card, write_model_card

    # the card: the parent's members and test results, the new calibrator / threshold and their out-of-fold
    # results and subgroups on the site (the parent's card, or a minimal one for bundles built before cards)
    card = build_model_card(json.loads((out / BUNDLE_JSON).read_text()), json.loads((out / RECALIBRATION_JSON).read_text()),
                            sc.rows.assign(calibrated_prob=oof), parent=load_model_card(parent, verify=False))
    write_model_card(out, card)
    write_manifest(out, parent={"path": str(parent), "hash": report["parent_hash"]},
                   calibrated_on={"data": report["data"], "dataset_hash": sc.index.hash, "split": split})
    load_bundle(out)  # what was written loads and verifies
    return report


DECISION_METRICS = ("accuracy", "precision", "recall", "specificity", "f1")


def _out_of_fold_decisions(method: str, z: np.ndarray, y: np.ndarray, groups, target_sensitivity: float, *,
                           n_splits: int, seed: int) -> np.ndarray:
    """0/1 decisions, each row's from a calibrator and threshold fitted on the other folds (the folds of
    ``fit_crossfit``), so the reported sensitivity / specificity at the threshold are out-of-fold too."""
    from skinsweep.ensemble.calibrators import choose_threshold, make_calibrator
    from skinsweep.ensemble.estimator import crossfit_folds

    decided = np.zeros(len(y), dtype=np.float64)
    for fit, score in crossfit_folds(y, groups, n_splits=n_splits, seed=seed):
        cal = make_calibrator(method).fit(z[fit], y[fit])
        t = choose_threshold(y[fit], cal.predict_proba(z[fit]), target_sensitivity=target_sensitivity)
        decided[score] = cal.predict_proba(z[score]) >= t
    return decided


def comparison_rows(rep: dict) -> list[tuple[str, str, str]]:
    """(measure, before, after) rows of the before/after table, formatted."""
    from skinsweep.metrics import format_ci

    rows = [("ECE", format_ci(rep["before"]["ece"]), format_ci(rep["after"]["ece"])),
            ("calibration slope", format_ci(rep["calibration"]["before"]["slope"]),
             format_ci(rep["calibration"]["after"]["slope"])),
            ("calibration intercept", format_ci(rep["calibration"]["before"]["intercept"]),
             format_ci(rep["calibration"]["after"]["intercept"])),
            ("Brier", format_ci(rep["before"]["brier"]), format_ci(rep["after"]["brier"])),
            ("threshold", f"{rep['threshold']['before']:.4f}", f"{rep['threshold']['after']:.4f}"),
            ("sensitivity", format_ci(rep["before"]["recall"]), format_ci(rep["after"]["recall"])),
            ("specificity", format_ci(rep["before"]["specificity"]), format_ci(rep["after"]["specificity"])),
            ("AUC", format_ci(rep["before"]["auc"]), format_ci(rep["after"]["auc"]))]
    return rows


__all__ = ["DECISION_METRICS", "METHODS", "comparison_rows", "recalibrate_bundle"]
