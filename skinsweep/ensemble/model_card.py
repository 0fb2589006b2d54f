"""Model cards: what a bundle is for, what it was fitted and tested on, and how well it did.

Every bundle carries ``model_card.json`` and the same card rendered as ``MODEL_CARD.md``, both listed in
its ``manifest.json`` (a changed card makes :func:`~skinsweep.ensemble.bundle.load_bundle` refuse the
bundle). No number in a card is typed by hand: :func:`build_model_card` reads them from the ensemble's
report dict (``report.json``: test metrics with CIs, ECE, threshold) and from its stored per-image test
predictions (subgroups by age group, sex, site and diagnosis; the test ECE before calibration). A
recalibrated bundle's card describes its new calibrator and threshold and the data they were fitted on
(the recalibration report and the site's out-of-fold predictions) and keeps the parent's members,
selection and test results, marked as the parent's::

    card = load_model_card("ensembles/dino_clip/bundle")     # dict; minimal for bundles built before cards
    card["operating_point"]["test"]["sensitivity"]            # {"estimate", "lo", "hi"}
    print(render_model_card_md(card))

Top-level keys (:data:`CARD_KEYS`, always all present): ``name, bundle_hash_note, intended_use,
out_of_scope_use, training_data, members, selection, test_metrics, calibration, operating_point,
subgroups, limitations, generated_by``. ``generated_by.minimal`` is true for a card rebuilt from an
older bundle's ``bundle.json`` alone (no subgroups, no members' validation AUCs).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinsweep.errors import DataError

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
CARD_KEYS = ("name", "bundle_hash_note", "intended_use", "out_of_scope_use", "training_data", "members", "selection",
             "test_metrics", "calibration", "operating_point", "subgroups", "limitations", "generated_by")
CARD_FORMAT = 1
METRICS = ("auc", "ap", "recall", "specificity", "precision", "accuracy", "f1", "ece", "brier", "sens_at_spec")
SUBGROUP_BOOT = 1000  # resamples for subgroup CIs (at most; the recipe's n_boot when smaller)

BUNDLE_HASH_NOTE = ("The bundle's identity is the sha256 of its manifest.json (first 16 hex digits), which lists the "
                    "sha256 of every file, this card included; so the hash cannot be written inside the card. Get it "
                    "with skinsweep.ensemble.bundle.bundle_hash(BUNDLE) or `sha256sum BUNDLE/manifest.json`.")
OUT_OF_SCOPE = [
    "Diagnosis, or any clinical decision without a clinician: this is a research tool, not a medical device, and it "
    "has no regulatory clearance.",
    "Images other than dermoscopic photographs of a single skin lesion (clinical close-ups, whole-body photographs, "
    "histology, non-skin images): their scores mean nothing.",
    "Populations, sites, devices and lesion types it was not evaluated on, until it has been evaluated there on "
    "labelled data (skinsweep evaluate) and, where needed, recalibrated (skinsweep recalibrate).",
    "Telling melanoma apart from other skin cancers: every non-positive class, malignant or not, is the negative class.",
]


def _ci(d: dict | None) -> dict | None:
    """``{estimate, lo, hi}`` (floats or None) of a report entry."""
    if not isinstance(d, dict):
        return None
    return {k: (None if d.get(k) is None else float(d[k])) for k in ("estimate", "lo", "hi")}


def _metrics(m: dict | None) -> dict:
    return {k: _ci(m.get(k)) for k in METRICS if k in (m or {})}


def _positive(meta: dict) -> list[str]:
    for e in meta.get("members") or []:
        pos = (e.get("model") or {}).get("positive")
        if pos:
            return list(pos)
    return ["MEL"]


def _members_from_meta(meta: dict, report_members: list[dict] | None = None) -> list[dict]:
    by_id = {m["trial_id"]: m for m in report_members or []}
    out = []
    for e in meta.get("members") or []:
        mm, r = e.get("model") or {}, by_id.get(e["trial_id"], {})
        spec = mm.get("backbone")
        out.append({
            "trial_id": e["trial_id"], "label": r.get("label"),
            "backbone": r.get("backbone") or (spec.get("name") if isinstance(spec, dict) else spec),
            "mode": r.get("mode") or mm.get("mode"), "weight": r.get("weight"), "val_auc": r.get("val_auc"),
            "member_threshold": r.get("threshold"), "image_size": mm.get("image_size"),
            "resize_policy": mm.get("resize_policy"), "input_size": (mm.get("data_config") or {}).get("input_size"),
            "tta": mm.get("tta", "none"), "epoch": mm.get("epoch"),
        })
    return out


def _selection(meta: dict, report: dict | None) -> dict:
    recipe = meta.get("recipe") or {}
    comb, members = recipe.get("combiner") or {}, recipe.get("members") or {}
    rule = members.get("rule")
    how = {"explicit": "the trial ids listed in the recipe",
           "best_per_backbone": f"the best completed trial per backbone by {members.get('by')} (validation)",
           "top_k": f"the best {members.get('k')} completed trials per backbone by {members.get('by')} (validation)",
           "greedy": (f"greedy forward selection with replacement (Caruana et al. 2004) from the top "
                      f"{members.get('top_n')} trials by {members.get('by')}, optimising validation "
                      f"{members.get('metric')}; members never picked are left out")}.get(rule, rule)
    return {
        "rule": rule, "description": how, "members_recipe": members,
        "combiner": {"type": meta.get("combiner", {}).get("kind"), "params": meta.get("combiner", {}).get("params"),
                     "metadata": comb.get("metadata") or [],
                     "fitted_on": f"validation split, cross-fitted in {comb.get('n_splits')} folds grouped by lesion"},
        "best_member": (report or {}).get("best_member"),
        "delong_vs_best": (report or {}).get("delong_vs_best"),
        "recipe_hash": meta.get("recipe_hash"),
    }


def _training_data(meta: dict, report: dict | None, test: pd.DataFrame | None) -> dict:
    tr = meta.get("training") or {}
    n, n_pos, prev = tr.get("n") or {}, tr.get("n_pos") or {}, tr.get("prevalence") or {}
    rn = (report or {}).get("n") or {}
    splits = {}
    for s in ("train", "val", "test"):
        images = n.get(s, rn.get(s))
        pos = n_pos.get(s, rn.get(f"{s}_pos"))
        if pos is None and images is not None and prev.get(s) is not None:
            pos = int(round(images * prev[s]))
        if images is not None:
            splits[s] = {"images": int(images), "melanoma": None if pos is None else int(pos),
                         "prevalence": prev.get(s, (pos / images) if pos is not None and images else None)}
    mode = tr.get("split_mode")
    has_lesions = None if test is None or "lesion_id" not in test else bool(test["lesion_id"].notna().any())
    grouped = None if mode is None else (mode == "grouped" and has_lesions is not False)
    return {
        "data": tr.get("data"), "dataset_hash": tr.get("dataset_hash"), "split_hash": tr.get("split_hash") or meta.get("split_hash"),
        "split_mode": mode, "lesion_grouped": grouped,
        "lesion_grouped_note": {True: "no lesion has images on two sides of the split",
                                False: "image-level split: images of one lesion may sit in train and test",
                                None: "unknown: the split manifest was not readable when the bundle was built"}[grouped],
        "positive_classes": _positive(meta), "splits": splits, "note": tr.get("note"),
    }


def _subgroups(rows: pd.DataFrame | None, threshold: float, *, n_boot: int, seed: int, where: str) -> dict:
    """Sensitivity / specificity / AUC with CIs per diagnosis, age group, sex and site of ``rows``
    (label, calibrated_prob, dx, [lesion_id, age, sex, site]), :func:`skinsweep.ensemble.evaluate.subgroup_tables`."""
    if rows is None or rows.empty:
        return {"split": where, "by": {}, "note": "no per-image predictions were available to compute subgroups"}
    from skinsweep.ensemble.evaluate import subgroup_tables

    rows = rows.copy()
    for c in ("dx", "age", "sex", "site"):
        if c not in rows:
            rows[c] = None
    groups = rows["lesion_id"].fillna(rows["image_id"]).astype(str).to_numpy() if "lesion_id" in rows else None
    by = subgroup_tables(rows.reset_index(drop=True), threshold, groups, n_boot=n_boot, seed=seed)
    known = [c for c in ("age group", "sex", "site") if c in by]
    missing = [c for c in ("age group", "sex", "site") if c not in by]
    return {"split": where, "images": int(len(rows)), "threshold": float(threshold), "n_boot": n_boot,
            "by": by, "note": ("sensitivity and specificity at the bundle's threshold, 95% bootstrap CIs"
                               + (" by lesion" if groups is not None else "") + "; AUC only with at least 5 images "
                               "of each class" + (f"; the data record no {', '.join(missing)}" if missing else "")),
            "known": known}


def _limitations(card: dict, meta: dict) -> list[str]:
    td, tm, op = card["training_data"], card["test_metrics"], card["operating_point"]
    data = Path(td["data"]).name if td.get("data") else "one dataset"
    out = [f"Trained, selected, calibrated and tested on one source ({data}, dataset hash {td.get('dataset_hash')}); "
           "it has not been validated on other populations, sites, dermatoscopes or skin types. Evaluate it on "
           "labelled data from where it will be used first (skinsweep evaluate)."]
    prev = (meta.get("calibrated_on") or {}).get("prevalence")
    if prev is None:
        prev = ((td.get("splits") or {}).get("val") or {}).get("prevalence")
    if prev is not None:
        out.append(f"Its probabilities are calibrated to a melanoma prevalence of {prev:.1%}; where melanoma is more "
                   "or less common every probability is biased (recalibrate with skinsweep recalibrate).")
    if td.get("lesion_grouped") is False:
        out.append("The split was not grouped by lesion: images of one lesion may be in both training and test, "
                   "so the test metrics may be optimistic.")
    n_pos = tm.get("n_pos")
    if n_pos is not None and n_pos < 100:
        out.append(f"The test results rest on {n_pos} melanoma images: the confidence intervals are wide.")
    sens = (op.get("test") or {}).get("sensitivity") or {}
    if sens.get("lo") is not None:
        out.append(f"The threshold was chosen on validation; on test its sensitivity is {sens['estimate']:.3f} "
                   f"(95% CI {sens['lo']:.3f}–{sens['hi']:.3f}), and will differ again on new data.")
    if card["selection"]["combiner"].get("metadata"):
        feats = ", ".join(card["selection"]["combiner"]["metadata"])
        out.append(f"The stacker uses patient metadata ({feats}); images scored without it are treated as unknown, "
                   "which changes their scores.")
    out.append("Binary task: " + ", ".join(td.get("positive_classes") or ["MEL"]) + " against everything else; other "
               "malignancies (e.g. basal cell carcinoma) count as negatives and are not targeted.")
    out.append("Subgroups with few melanomas have wide or missing CIs and no AUC; small differences between groups "
               "are not evidence of a difference.")
    return out


def _intended_use(meta: dict) -> dict:
    pos = ", ".join(_positive(meta))
    return {
        "summary": ("Research tool: estimates the probability that a dermoscopic image shows melanoma "
                    f"(positive classes {pos}) and flags images at or above a validation-chosen threshold, for "
                    "research on melanoma classifiers (comparing models and ensembles, calibration, subgroup "
                    "behaviour, external validation)."),
        "users": "ML engineers and researchers in dermatology AI",
        "input": "a dermoscopic RGB image of one lesion (any size; decoded and resized as the bundle records)",
        "output": "each member's probability, the ensemble probability, the calibrated probability and a 0/1 decision",
        "not_a_medical_device": True,
    }


def _generated_by(minimal: bool, sources: list[str]) -> dict:
    from skinsweep import __version__

    return {"tool": "skinsweep", "version": __version__, "format": CARD_FORMAT,
            "function": "skinsweep.ensemble.model_card." + ("minimal_model_card" if minimal else "build_model_card"),
            "sources": sources, "minimal": minimal,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    from skinsweep.metrics import expected_calibration_error

    return float(expected_calibration_error(y, p))


def build_model_card(meta: dict, report: dict, predictions: pd.DataFrame | None = None, *,
                     parent: dict | None = None) -> dict:
    """The model card of a bundle (JSON-safe dict with :data:`CARD_KEYS`).

    Args:
        meta: the bundle's ``bundle.json`` dict.
        report: the ensemble report (``build_ensemble``'s dict / ``report.json``) or, for a recalibrated
            bundle (``meta`` has ``calibrated_on``), the recalibration report (``recalibration.json``).
        predictions: per-image rows the metrics were computed on: the ensemble's ``predictions.parquet``
            (its test rows are used) or the recalibration data with out-of-fold ``calibrated_prob``; columns
            ``image_id, label, calibrated_prob`` and, where known, ``lesion_id, dx, ensemble_prob, age, sex, site``.
        parent: a recalibrated bundle's parent card (its members, selection and test results are kept).
    """
    from skinsweep.files import json_safe

    if meta.get("calibrated_on"):
        return json_safe(_recalibrated_card(meta, report, predictions, parent))
    recipe = meta.get("recipe") or {}
    n_boot = min(int((recipe.get("report") or {}).get("n_boot", SUBGROUP_BOOT)), SUBGROUP_BOOT)
    seed = int((recipe.get("report") or {}).get("seed", 0))
    test = None
    if predictions is not None:
        test = predictions[predictions["split"] == "test"] if "split" in predictions else predictions
    rn = report.get("n") or {}
    ens_test = (report.get("test") or {}).get("ensemble") or {}
    ece_before_test = None
    if test is not None and "ensemble_prob" in test and len(test):
        ece_before_test = _ece(test["label"].to_numpy(int), test["ensemble_prob"].to_numpy(float))
    val = report.get("val") or {}
    card: dict[str, Any] = {
        "name": meta.get("name") or report.get("name"),
        "bundle_hash_note": BUNDLE_HASH_NOTE,
        "intended_use": _intended_use(meta),
        "out_of_scope_use": list(OUT_OF_SCOPE),
        "training_data": _training_data(meta, report, test),
        "members": _members_from_meta(meta, report.get("members")),
        "selection": _selection(meta, report),
        "test_metrics": {
            "split": "test", "n": rn.get("test"), "n_pos": rn.get("test_pos"),
            "ci": f"95% bootstrap ({(recipe.get('report') or {}).get('n_boot')} resamples, by lesion where known)",
            "ensemble": _metrics(ens_test),
            "members": {k: _metrics(v) for k, v in (report.get("test") or {}).items() if k != "ensemble"},
            "spec_for_sens": (recipe.get("report") or {}).get("spec_for_sens"),
            "source": "report.json test",
        },
        "calibration": {
            "method": (meta.get("calibrator") or {}).get("kind"), "params": (meta.get("calibrator") or {}).get("state"),
            "fitted_on": (f"validation split ({rn.get('val')} images, {rn.get('val_pos')} melanoma), "
                          "cross-fitted by lesion; the deployed calibrator is fitted on all of it"),
            "ece": {"val_before": (val.get("ensemble_uncalibrated") or {}).get("ece"),
                    "val_after": (val.get("ensemble") or {}).get("ece"),
                    "test_before": ece_before_test, "test_after": _ci(ens_test.get("ece"))},
            "ece_note": ("val: out-of-fold, before = sigmoid of the ensemble logit, after = calibrated; test: before "
                         "from the stored ensemble_prob, after from the report (with CI); 15 equal-width bins"),
        },
        "operating_point": {
            "threshold": float(meta["threshold"]), "rule": meta.get("threshold_rule"),
            "chosen_on": "validation split (out-of-fold calibrated probabilities)",
            "decision": "melanoma when calibrated_prob >= threshold",
            "test": {"sensitivity": _ci(ens_test.get("recall")), "specificity": _ci(ens_test.get("specificity")),
                     "precision": _ci(ens_test.get("precision")), "n": rn.get("test"), "n_pos": rn.get("test_pos")},
        },
        "subgroups": _subgroups(test, float(meta["threshold"]), n_boot=n_boot, seed=seed, where="test"),
        "limitations": [],
        "generated_by": _generated_by(False, ["report.json", "predictions.parquet (test rows)", "bundle.json"]),
    }
    card["limitations"] = _limitations(card, meta)
    return json_safe(card)


def _recalibrated_card(meta: dict, rep: dict, rows: pd.DataFrame | None, parent: dict | None) -> dict:
    """A recalibrated bundle: the parent's members, selection and test results; the new calibrator,
    threshold and their out-of-fold results on the calibration data; subgroups on that data."""
    parent = parent or minimal_model_card({k: v for k, v in meta.items() if k != "calibrated_on"})
    on = meta["calibrated_on"]
    after, before = rep.get("after") or {}, rep.get("before") or {}
    data = on.get("data")
    card = {k: parent.get(k) for k in CARD_KEYS}
    card["name"] = f"{meta.get('name')} (recalibrated on {Path(data).name if data else 'new data'})"
    card["bundle_hash_note"] = BUNDLE_HASH_NOTE
    card["training_data"] = dict(parent.get("training_data") or {}, calibration_data={
        "data": data, "dataset_hash": on.get("dataset_hash"), "split": on.get("split"), "split_hash": on.get("split_hash"),
        "n": on.get("n"), "prevalence": on.get("prevalence"),
        "note": "the calibrator and threshold were refitted on these images; members and combiner are the parent's"})
    card["test_metrics"] = {
        "split": "calibration data, out-of-fold", "n": (rep.get("n") or {}).get("images"),
        "n_pos": (rep.get("n") or {}).get("melanoma"),
        "ci": f"95% bootstrap ({rep.get('n_boot')} resamples, by {rep.get('unit')})",
        "ensemble": _metrics(after), "members": {},
        "auc_deployed": (rep.get("auc") or {}).get("deployed"),
        "parent_test": parent.get("test_metrics"),
        "note": ("out-of-fold on the calibration data (each image scored by a calibrator fitted without its lesion); "
                 "parent_test holds the parent's own test split results under the parent's calibrator — its ranking "
                 "metrics (AUC, AP) still hold for a monotone calibrator, its probabilities and threshold do not"),
        "source": "recalibration.json after",
    }
    cal = rep.get("calibration") or {}
    card["calibration"] = {
        "method": rep.get("method"), "params": (meta.get("calibrator") or {}).get("state"),
        "fitted_on": (f"{data} ({on.get('n', {}).get('images')} images, {on.get('n', {}).get('melanoma')} melanoma, "
                      f"split {on.get('split')}), cross-fitted in {on.get('n_splits')} folds by lesion; the deployed "
                      "calibrator is fitted on all of it"),
        "ece": {"before": _ci(before.get("ece")), "after": _ci(after.get("ece"))},
        "slope": {"before": _ci(cal.get("before", {}).get("slope")), "after": _ci(cal.get("after", {}).get("slope"))},
        "intercept": {"before": _ci(cal.get("before", {}).get("intercept")),
                      "after": _ci(cal.get("after", {}).get("intercept"))},
        "ece_note": "before: the parent bundle on the calibration data; after: out-of-fold",
        "parent": {"calibrator": (meta.get("parent") or {}).get("calibrator"), "hash": (meta.get("parent") or {}).get("hash"),
                   "path": (meta.get("parent") or {}).get("path")},
    }
    card["operating_point"] = {
        "threshold": float(meta["threshold"]), "rule": meta.get("threshold_rule"),
        "chosen_on": "the calibration data (out-of-fold calibrated probabilities)",
        "decision": "melanoma when calibrated_prob >= threshold",
        "test": {"sensitivity": _ci(after.get("recall")), "specificity": _ci(after.get("specificity")),
                 "precision": _ci(after.get("precision")), "n": card["test_metrics"]["n"],
                 "n_pos": card["test_metrics"]["n_pos"], "on": "calibration data, out-of-fold"},
        "parent": {"threshold": (meta.get("parent") or {}).get("threshold"),
                   "rule": (meta.get("parent") or {}).get("threshold_rule")},
    }
    card["subgroups"] = _subgroups(rows, float(meta["threshold"]), n_boot=min(int(rep.get("n_boot") or 1000), SUBGROUP_BOOT),
                                   seed=int(rep.get("seed") or 0), where="calibration data, out-of-fold")
    card["limitations"] = _limitations(card, meta) + [
        f"Recalibrated on {(rep.get('n') or {}).get('images')} images of one site ({data}): score it on other images "
        "of that site before relying on it (the calibration images are reported as leakage by skinsweep evaluate)."]
    card["generated_by"] = _generated_by(False, ["recalibration.json", "the calibration data's out-of-fold predictions",
                                                 "bundle.json", "the parent's model card"])
    from skinsweep.files import json_safe

    return json_safe(card)


def minimal_model_card(meta: dict) -> dict:
    """A card from ``bundle.json`` alone (bundles built before cards): what the bundle records, with
    ``generated_by.minimal`` true; no subgroups, no members' validation results."""
    from skinsweep.files import json_safe

    promised = meta.get("promised") or {}
    m = promised.get("metrics") or {}
    card: dict[str, Any] = {
        "name": meta.get("name"), "bundle_hash_note": BUNDLE_HASH_NOTE, "intended_use": _intended_use(meta),
        "out_of_scope_use": list(OUT_OF_SCOPE), "training_data": _training_data(meta, None, None),
        "members": _members_from_meta(meta), "selection": _selection(meta, None),
        "test_metrics": {"split": promised.get("split"), "n": promised.get("n"), "n_pos": promised.get("n_pos"),
                         "ensemble": _metrics(m), "members": {}, "source": "bundle.json promised"},
        "calibration": {"method": (meta.get("calibrator") or {}).get("kind"),
                        "params": (meta.get("calibrator") or {}).get("state"), "ece": {"after": _ci(m.get("ece"))}},
        "operating_point": {"threshold": float(meta["threshold"]), "rule": meta.get("threshold_rule"),
                            "test": {"sensitivity": _ci(m.get("recall")), "specificity": _ci(m.get("specificity")),
                                     "n": promised.get("n"), "n_pos": promised.get("n_pos")}},
        "subgroups": {"by": {}, "note": "not recorded: this bundle was built before model cards; rebuild it "
                      "(skinsweep ensemble build) for subgroup results"},
        "limitations": [],
        "generated_by": _generated_by(True, ["bundle.json"]),
    }
    card["limitations"] = _limitations(card, meta) + [
        "Minimal card: rebuilt from bundle.json of a bundle built before model cards."]
    return json_safe(card)


def write_model_card(folder: str | Path, card: dict) -> None:
    """Write ``model_card.json`` and ``MODEL_CARD.md`` into a bundle folder (before its manifest)."""
    from skinsweep.files import atomic_write_text

    folder = Path(folder)
    atomic_write_text(folder / CARD_JSON, json.dumps(card, indent=2))
    atomic_write_text(folder / CARD_MD, render_model_card_md(card))


def load_model_card(bundle_dir: str | Path, *, verify: bool = True) -> dict:
    """The bundle's ``model_card.json`` (after checking its manifest when ``verify``), or for older bundles
    without one a :func:`minimal_model_card` from ``bundle.json``."""
    from skinsweep.ensemble.bundle import BUNDLE_JSON, verify_bundle

    path = Path(bundle_dir)
    if verify:
        meta = verify_bundle(path)
    elif (path / BUNDLE_JSON).is_file():
        meta = json.loads((path / BUNDLE_JSON).read_text())
    else:
        raise DataError(f"{path} is not a skinsweep bundle (no {BUNDLE_JSON}); build one with `skinsweep ensemble build`")
    if (path / CARD_JSON).is_file():
        return json.loads((path / CARD_JSON).read_text())
    return minimal_model_card(meta)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------

def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fci(d: dict | None) -> str:
    if not d or d.get("estimate") is None:
        return "–"
    if d.get("lo") is None:
        return f"{d['estimate']:.3f}"
    return f"{d['estimate']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _rule(rule: Any) -> str:
    """``{"target_sensitivity": 0.95}`` -> ``target sensitivity 0.95``."""
    if not isinstance(rule, dict):
        return str(rule)
    return ", ".join(k.replace("_", " ") + ("" if v is True else f" {v}") for k, v in rule.items() if v is not None)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def render_model_card_md(card: dict) -> str:
    """The card as Markdown (``MODEL_CARD.md``): the same numbers as the JSON, formatted."""
    L: list[str] = [f"# Model card: {card.get('name')}", ""]
    gb = card.get("generated_by") or {}
    if gb.get("minimal"):
        L += ["> **Minimal card**: rebuilt from `bundle.json` of a bundle built before model cards.", ""]
    L += [f"_Generated by {gb.get('tool')} {gb.get('version')} on {gb.get('date')} from "
          f"{', '.join(gb.get('sources') or [])}._ {card.get('bundle_hash_note')}", ""]
    iu = card.get("intended_use") or {}
    L += ["## Intended use", "", iu.get("summary", ""), "",
          f"- Users: {iu.get('users')}", f"- Input: {iu.get('input')}", f"- Output: {iu.get('output')}",
          "- **Not a medical device**: not for diagnosis or clinical decisions.", "",
          "## Out-of-scope use", ""] + [f"- {x}" for x in card.get("out_of_scope_use") or []] + [""]
    td = card.get("training_data") or {}
    L += ["## Training data", "",
          f"- Data: `{td.get('data')}` (dataset hash `{td.get('dataset_hash')}`), split hash `{td.get('split_hash')}`",
          f"- Split: {td.get('split_mode') or 'unknown'}; lesion-grouped: {_f(td.get('lesion_grouped'))} "
          f"({td.get('lesion_grouped_note')})",
          f"- Positive classes: {', '.join(td.get('positive_classes') or [])}", ""]
    if td.get("splits"):
        L += _table(["split", "images", "melanoma", "prevalence"],
                    [[s, _f(v.get("images")), _f(v.get("melanoma")),
                      "–" if v.get("prevalence") is None else f"{v['prevalence']:.1%}"] for s, v in td["splits"].items()])
        L += [""]
    if td.get("note"):
        L += [f"Note: {td['note']}", ""]
    cd = td.get("calibration_data")
    if cd:
        L += [f"Calibration data: `{cd.get('data')}` (dataset hash `{cd.get('dataset_hash')}`, split {cd.get('split')}, "
              f"{_f((cd.get('n') or {}).get('images'))} images, prevalence "
              f"{'–' if cd.get('prevalence') is None else format(cd['prevalence'], '.1%')}); {cd.get('note')}", ""]
    L += ["## Members", ""]
    L += _table(["trial", "backbone", "mode", "weight", "val AUC", "image size", "TTA"],
                [[m.get("trial_id"), m.get("backbone"), m.get("mode"), _f(m.get("weight")), _f(m.get("val_auc")),
                  _f(m.get("image_size")), m.get("tta")] for m in card.get("members") or []])
    sel = card.get("selection") or {}
    comb = sel.get("combiner") or {}
    L += ["", f"Chosen by rule `{sel.get('rule')}`: {sel.get('description')}. Combiner `{comb.get('type')}`"
          + (f" with metadata {', '.join(comb['metadata'])}" if comb.get("metadata") else "")
          + (f", fitted on the {comb.get('fitted_on')}" if comb.get("fitted_on") else "") + "."]
    if sel.get("best_member"):
        d = sel.get("delong_vs_best") or {}
        L += [f"Best single member (by {sel['best_member'].get('chosen_by')}): {sel['best_member'].get('label')}; "
              f"DeLong ensemble vs it on test: ΔAUC {_f(d.get('diff'), 4)}, p = {_f(d.get('p_value'), 3)}."]
    tm = card.get("test_metrics") or {}
    L += ["", "## Test metrics", "",
          f"On {tm.get('split')}: {_f(tm.get('n'))} images, {_f(tm.get('n_pos'))} melanoma; {tm.get('ci', '95% CIs')}.", ""]
    names = {"auc": "ROC-AUC", "ap": "AP", "recall": "sensitivity", "specificity": "specificity",
             "precision": "precision", "accuracy": "accuracy", "f1": "F1", "ece": "ECE", "brier": "Brier",
             "sens_at_spec": f"sensitivity at specificity {tm.get('spec_for_sens') or ''}".strip()}
    models = {"ensemble": tm.get("ensemble") or {}} | (tm.get("members") or {})
    keys = [k for k in names if any(k in m for m in models.values())]
    L += _table(["model"] + [names[k] for k in keys], [[mod] + [_fci(m.get(k)) for k in keys] for mod, m in models.items()])
    if tm.get("note"):
        L += ["", tm["note"]]
    cal = card.get("calibration") or {}
    L += ["", "## Calibration", "", f"Method `{cal.get('method')}`, fitted on {cal.get('fitted_on', '–')}.", ""]
    ece = cal.get("ece") or {}
    L += _table(["ECE", "value"], [[k.replace("_", " "), _fci(v) if isinstance(v, dict) else _f(v)] for k, v in ece.items()])
    if cal.get("ece_note"):
        L += ["", cal["ece_note"]]
    op = card.get("operating_point") or {}
    t = op.get("test") or {}
    L += ["", "## Operating point", "",
          f"Threshold **{op.get('threshold'):.4g}** ({_rule(op.get('rule'))}), chosen on {op.get('chosen_on', '–')}; "
          f"{op.get('decision', 'melanoma when calibrated_prob >= threshold')}.", "",
          f"On {t.get('on', 'test')}: sensitivity {_fci(t.get('sensitivity'))}, specificity {_fci(t.get('specificity'))}"
          + (f", precision {_fci(t.get('precision'))}" if t.get("precision") else "") + ".", ""]
    sg = card.get("subgroups") or {}
    L += ["## Subgroups", "", f"On {sg.get('split', '–')}. {sg.get('note', '')}", ""]
    for col, rows in (sg.get("by") or {}).items():
        L += [f"**{col}**", ""]
        L += _table([col, "images", "melanoma", "sensitivity", "specificity", "AUC"],
                    [[r.get("group"), _f(r.get("images")), _f(r.get("melanomas")), _fci(r.get("sensitivity")),
                      _fci(r.get("specificity")), _fci(r.get("auc"))] for r in rows])
        L += [""]
    L += ["## Known limitations", ""] + [f"- {x}" for x in card.get("limitations") or []] + [""]
    return "\n".join(L)


__all__ = ["CARD_JSON", "CARD_KEYS", "CARD_MD", "build_model_card", "load_model_card", "minimal_model_card",
           "render_model_card_md", "write_model_card"]
