"""Ensembles: pick members from a sweep, combine, calibrate, choose the operating point, report.

Everything is fitted on **validation** predictions only; **test** is scored once, for the report:

1. members   — explicit trial ids, a rule over ``trials.parquet`` (best completed trial per backbone,
               top-k), or greedy ensemble selection (Caruana et al. 2004) on validation;
2. align     — every member must have scored the same images with the same split hash;
3. combine   — mean of probabilities / logits, weighted mean, or logistic stacking on member logits
               (optionally with patient age / sex / site, :mod:`skinsweep.ensemble.metadata`),
               cross-fitted on validation (out-of-fold, grouped by lesion) so validation scores are
               honest; the final combiner is fitted on all validation rows;
4. calibrate — none / temperature / Platt / isotonic, cross-fitted the same way;
5. threshold — chosen on validation (target sensitivity, default 0.95; or specificity; or Youden);
6. report    — each member and the ensemble on test with 95% bootstrap CIs (resampled by lesion),
               a paired DeLong test of ensemble vs best member, plots, ``predictions.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from skinsweep.ensemble.recipe import MembersSpec, load_ensemble_recipe
from skinsweep.errors import ConfigError, short_list
from skinsweep.files import atomic_path, atomic_write_text, json_safe
from skinsweep.metrics import sigmoid

REPORT_JSON = "report.json"
PREDICTIONS = "predictions.parquet"


# --------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------

def select_candidates(trials: pd.DataFrame, spec: MembersSpec) -> list[str]:
    """Trial ids chosen by the rule (for greedy: the top-N candidates), using validation metrics only."""
    done = trials[trials["status"] == "completed"]
    if spec.by not in done.columns:
        raise ConfigError(f"members.by {spec.by!r} is not a trials.parquet column; use val_auc, val_ap, …")
    if spec.rule == "explicit":
        missing = [t for t in spec.trials if t not in set(done["trial_id"])]
        if missing:
            raise ConfigError(f"members.trials: {short_list(missing)} are not completed trials of this sweep; "
                              "see `skinsweep results show DIR`")
        return list(dict.fromkeys(spec.trials))
    pool = done
    if spec.backbones:
        pool = pool[pool["backbone"].isin(spec.backbones)]
        absent = sorted(set(spec.backbones) - set(pool["backbone"]))
        if absent:
            raise ConfigError(f"members.backbones: no completed trials of {', '.join(absent)} in this sweep "
                              f"(it has {', '.join(sorted(set(done['backbone'])))})")
    if spec.modes:
        pool = pool[pool["mode"].isin(spec.modes)]
    ascending = spec.by.removeprefix("val_") in ("loss", "ece", "brier")
    pool = pool.sort_values([spec.by, "trial_id"], ascending=[ascending, True], na_position="last")
    if spec.rule == "best_per_backbone":
        ids = pool.groupby("backbone", sort=False).head(1)["trial_id"].tolist()
    elif spec.rule == "top_k":
        ids = pool.groupby("backbone", sort=False).head(spec.k)["trial_id"].tolist()
    else:
        ids = pool.head(spec.top_n)["trial_id"].tolist()
    if not ids:
        raise ConfigError(f"members: no completed trials match rule {spec.rule}; check the sweep's statuses")
    return ids


def aligned_logits(preds: pd.DataFrame, members: list[str], split: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, X): rows = image_id/lesion_id/label/dx per image, X = member logits (N, M), same image order.

    Raises ConfigError naming the mismatch when members did not score the same images or split.
    """
    p = preds[(preds["split"] == split) & (preds["trial_id"].isin(members))]
    hashes = p.groupby("trial_id")["split_hash"].first()
    if hashes.nunique() > 1:
        raise ConfigError(f"members used different splits ({', '.join(f'{t}: {h}' for t, h in hashes.items())}); "
                          "choose members from one sweep / split")
    sets = p.groupby("trial_id")["image_id"].apply(frozenset)
    missing = [m for m in members if m not in sets.index]
    if missing:
        raise ConfigError(f"members {short_list(missing)} have no {split} predictions (pruned or failed trials)")
    if len(set(sets.values)) > 1:
        ref = sets.iloc[0]
        odd = [t for t, s in sets.items() if s != ref]
        raise ConfigError(f"members scored different {split} images: {short_list(odd)} differ from {sets.index[0]}; "
                          "use members of one sweep")
    wide = p.pivot(index="image_id", columns="trial_id", values="logit")[members]
    rows = (p.drop_duplicates("image_id").set_index("image_id")[["lesion_id", "label", "dx"]]
            .loc[wide.index].reset_index())
    return rows, wide.to_numpy(dtype=np.float64)


def _groups(rows: pd.DataFrame) -> np.ndarray:
    return rows["lesion_id"].fillna(rows["image_id"]).astype(str).to_numpy()


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------

def build_ensemble(recipe_path: str | Path, results_dir: str | Path, *, out: str | Path | None = None,
                   overrides: list[str] = (), bundle: bool = True, data: str | Path | None = None) -> dict:
    """Fit the ensemble described by ``recipe_path`` on a sweep's validation predictions; report on test.

    Writes ``report.json``, ``predictions.parquet``, PNG plots and (``bundle=True``) a deployment bundle
    under ``out`` (default ``ensembles/<name>/``). Returns the report dict. ``data`` is the dataset
    folder to read ``combiner.metadata`` from (default: the one the members were trained on).
    """
    from skinsweep.ensemble.calibrators import choose_threshold, make_calibrator
    from skinsweep.ensemble.combiners import Combiner, make_combiner
    from skinsweep.ensemble.stats import bootstrap_metrics, delong_test
    from skinsweep.metrics import binary_metrics
    from skinsweep.results import load

    recipe = load_ensemble_recipe(recipe_path, list(overrides))
    res = load(results_dir)
    out = Path(out) if out else Path("ensembles") / recipe.name
    trials = res.trials

    # ---- 1-2. members, aligned -------------------------------------------------------------------
    candidates = select_candidates(trials, recipe.members)
    # only the candidates' prediction files are read (e.g. 50 of 2,000 trials), never the whole store
    preds = res.store.predictions(candidates)
    val_rows, Xv = aligned_logits(preds, candidates, "val")
    test_rows, Xt = aligned_logits(preds, candidates, "test")
    yv, yt = val_rows["label"].to_numpy(int), test_rows["label"].to_numpy(int)
    gv = _groups(val_rows)
    weights = None
    meta = None
    if recipe.combiner.metadata:  # age/sex/site joined from the dataset index; encoder fitted on val only
        from skinsweep.ensemble.metadata import prepare_metadata

        meta = prepare_metadata(recipe.combiner.metadata, res, candidates,
                                {"val": val_rows["image_id"], "test": test_rows["image_id"]}, data)
    extra = meta.extra if meta else {"val": None, "test": None}

    # ---- 3. combine (cross-fitted on val: out-of-fold logits for honest validation scores) ----------
    if recipe.members.rule == "greedy":
        # Caruana selection averages probabilities; cross-fitting re-runs the selection in every fold
        # candidates are already the top_n trials by members.by; with metadata, a regression on
        # [greedy logit, age/sex/site] follows the selection (both re-run in every fold)
        greedy = {"metric": recipe.members.metric, "n_iter": recipe.members.n_iter, "top_n": None}
        combiner = (make_combiner("greedy_meta", C=recipe.combiner.C, **greedy) if recipe.combiner.metadata
                    else make_combiner("greedy", **greedy))
    else:
        combiner = make_combiner(recipe.combiner.type, **({"C": recipe.combiner.C} if recipe.combiner.type == "stacking" else {}))
    ens_val = combiner.fit_crossfit(Xv, yv, gv, n_splits=recipe.combiner.n_splits, seed=recipe.seed,
                                    extra=extra["val"])
    members = candidates
    if recipe.members.rule == "greedy":  # deploy only the members the final selection kept
        keep = np.flatnonzero(combiner.weights_ > 0)
        d = combiner.to_dict()
        d["state"].update(weights=(combiner.weights_[keep] / combiner.weights_[keep].sum()).tolist(),
                          n_members=len(keep))
        combiner = Combiner.from_dict(d)
        members, weights = [candidates[i] for i in keep], combiner.weights_
        Xv, Xt = Xv[:, keep], Xt[:, keep]
    ens_test = combiner.predict_logit(Xt, extra=extra["test"])

    # ---- 4. calibrate (cross-fitted on val, on the out-of-fold ensemble logits) ------------------
    calibrator = make_calibrator(recipe.calibration.method)
    cal_val = calibrator.fit_crossfit(ens_val, yv, gv, n_splits=recipe.combiner.n_splits, seed=recipe.seed)
    cal_test = calibrator.predict_proba(ens_test)

    # ---- 5. operating point on val ---------------------------------------------------------------
    Pv, Pt = sigmoid(Xv), sigmoid(Xt)  # member probabilities (N, M)
    thr = float(choose_threshold(yv, cal_val, **recipe.threshold.kwargs()))
    member_thr = {m: float(choose_threshold(yv, Pv[:, j], **recipe.threshold.kwargs())) for j, m in enumerate(members)}

    # ---- 6. report on test -----------------------------------------------------------------------
    by_id = trials.set_index("trial_id")
    label = {m: f"{by_id.loc[m, 'backbone']}/{by_id.loc[m, 'mode']}/{m}" for m in members}
    member_test = {label[m]: Pt[:, j] for j, m in enumerate(members)}
    thresholds = {label[m]: member_thr[m] for m in members} | {"ensemble": thr}
    ci = bootstrap_metrics(yt, member_test | {"ensemble": cal_test}, groups=_groups(test_rows), threshold=thresholds,
                           n_boot=recipe.report.n_boot, seed=recipe.report.seed,
                           spec_for_sens=recipe.report.spec_for_sens)
    val_auc = {m: binary_metrics(yv, Pv[:, j])["auc"] for j, m in enumerate(members)}
    best = max(members, key=lambda m: val_auc[m])  # "best single member" is chosen on validation too
    dl = delong_test(yt, cal_test, Pt[:, members.index(best)])

    report = {
        "name": recipe.name, "recipe": json.loads(recipe.model_dump_json()), "recipe_hash": recipe.hash,
        "results": str(Path(results_dir)), "members": [
            {"trial_id": m, "label": label[m], "backbone": by_id.loc[m, "backbone"], "mode": by_id.loc[m, "mode"],
             "weight": None if weights is None else float(weights[j]), "val_auc": val_auc[m], "threshold": member_thr[m]}
            for j, m in enumerate(members)],
        "best_member": {"trial_id": best, "label": label[best], "chosen_by": "val AUC"},
        "combiner": combiner.to_dict(), "metadata": meta.summary() if meta else None,
        "calibrator": calibrator.to_dict(), "threshold": thr,
        "threshold_rule": recipe.threshold.kwargs(),
        "split_hash": str(preds.loc[preds["trial_id"] == members[0], "split_hash"].iloc[0]),
        "val": {"ensemble_uncalibrated": binary_metrics(yv, sigmoid(ens_val), threshold=0.5),
                "ensemble": binary_metrics(yv, cal_val, threshold=thr)},
        "test": {model: t.set_index("metric")[["estimate", "lo", "hi"]].to_dict("index")
                 for model, t in ci.groupby("model", sort=False)},
        "delong_vs_best": dl,
        "n": {"val": int(len(yv)), "val_pos": int(yv.sum()), "test": int(len(yt)), "test_pos": int(yt.sum())},
    }
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for split, rows, P, ens, cal in (("val", val_rows, Pv, ens_val, cal_val), ("test", test_rows, Pt, ens_test, cal_test)):
        raw = {f: meta.rows[split][f].to_numpy() for f in meta.encoder.features_} if meta else {}
        df = rows.assign(split=split, **raw, **{f"prob_{m}": P[:, j] for j, m in enumerate(members)},
                         ensemble_prob=sigmoid(ens), calibrated_prob=cal, decision=(cal >= thr).astype("int8"))
        table.append(df)
    table = pd.concat(table, ignore_index=True)
    with atomic_path(out / PREDICTIONS) as tmp:
        table.to_parquet(tmp, index=False)
    from skinsweep.report.plots import ensemble_plots

    report["plots"] = ensemble_plots(out, yv, yt, member_test,
                                     ens_val_uncal=sigmoid(ens_val), cal_val=cal_val, cal_test=cal_test, threshold=thr)
    if bundle:
        from skinsweep.ensemble.bundle import export_bundle

        report["bundle"] = str(export_bundle(out / "bundle", res, members, combiner, calibrator, thr, recipe, report,
                                             metadata=meta.encoder if meta else None, predictions=table))
    atomic_write_text(out / REPORT_JSON, json.dumps(json_safe(report), indent=2))
    return report


__all__ = ["aligned_logits", "build_ensemble", "load_ensemble_recipe", "select_candidates"]
