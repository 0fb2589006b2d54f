"""Is A really better than B? Paired comparison of two models scored on the same images.

    cmp = compare("ensembles/dino_clip", "ensembles/best", split="test")
    cmp["delong"]["p_value"], cmp["delta"]["auc"]      # {"estimate", "lo", "hi"}: A - B, 95% bootstrap CI

A and B are each one of

* an ensemble folder (``skinsweep ensemble build --out``: ``report.json`` + ``predictions.parquet``;
  its calibrated probabilities);
* an evaluation folder (``skinsweep evaluate --out``: ``evaluation.json`` + ``predictions.parquet``;
  its calibrated probabilities), e.g. two bundles evaluated on the same data;
* a trial id of the sweep given as ``results`` (its stored probabilities).

Both must have scored the same images (same ids and labels) with the same split manifest; anything
else is a one-line error naming the mismatch. Then: DeLong's paired test of the AUCs
(:func:`~skinsweep.ensemble.stats.delong_test`) and paired bootstrap CIs (one set of resamples for both,
by lesion when lesion ids are known: :func:`~skinsweep.ensemble.stats.bootstrap_values`) of ΔAUC, ΔAP,
Δsensitivity at a fixed specificity and ΔECE, all A − B.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skinsweep.errors import ConfigError, DataError, did_you_mean, short_list

DELTA_METRICS = ("auc", "ap", "sens_at_spec", "ece")
SPLITS = ("test", "val", "train", "all")


@dataclass
class Side:
    """One side of a comparison: its per-image probabilities on one split."""

    name: str
    kind: str                # "ensemble" | "evaluation" | "trial"
    source: str              # the folder, or the sweep folder of a trial
    rows: pd.DataFrame       # image_id, lesion_id, label, prob
    split_hash: str | None


def load_side(spec: str | Path, *, split: str = "test", results: str | Path | None = None, which: str = "A") -> Side:
    """Resolve ``spec`` (ensemble folder, evaluation folder, or trial id of ``results``) to its rows on ``split``."""
    p = Path(spec)
    if p.is_dir():
        preds = p / "predictions.parquet"
        if (p / "report.json").is_file() and preds.is_file():
            rep = json.loads((p / "report.json").read_text())
            return _side(which, rep.get("name") or p.name, "ensemble", str(p), pd.read_parquet(preds),
                         "calibrated_prob", split, rep.get("split_hash"))
        if (p / "evaluation.json").is_file() and preds.is_file():
            ev = json.loads((p / "evaluation.json").read_text())
            name = f"{ev.get('bundle_name') or 'bundle'} on {Path(ev.get('data') or p.name).name}"
            return _side(which, name, "evaluation", str(p), pd.read_parquet(preds), "calibrated_prob", split,
                         ev.get("split_hash"))
        if (p / "manifest.json").is_file():
            raise ConfigError(f"{which} {p} is a bundle, which holds no predictions: evaluate it first "
                              f"(skinsweep evaluate {p} DATA --out DIR) and compare the DIR folders")
        raise DataError(f"{which} {p}: no report.json or evaluation.json with a predictions.parquet; pass an "
                        "ensemble folder (skinsweep ensemble build --out), an evaluation folder (skinsweep "
                        "evaluate --out) or a trial id with --results")
    if results is None:
        raise ConfigError(f"{which} {spec!r} is not a folder; pass an ensemble or evaluation folder, or a trial id "
                          "with --results results/<sweep>")
    from skinsweep.results import load

    res = load(results)
    ids = res.trials["trial_id"].tolist()
    if str(spec) not in ids:
        raise ConfigError(f"{which} {spec!r} is not a trial of {results}{did_you_mean(spec, ids)}; "
                          f"list them with `skinsweep results show {results}`")
    preds = res.store.predictions(str(spec))
    if preds.empty:
        raise DataError(f"{which}: trial {spec} has no stored predictions (pruned or failed); pick a completed trial")
    hashes = preds["split_hash"].dropna().unique()
    return _side(which, str(spec), "trial", str(results), preds, "prob", split, hashes[0] if len(hashes) else None)


def _side(which: str, name: str, kind: str, source: str, preds: pd.DataFrame, prob: str, split: str,
          split_hash: str | None) -> Side:
    if split != "all":
        if "split" not in preds or preds["split"].isna().all():
            raise ConfigError(f"{which} {source} has no split column (its data could not be split); use --split all")
        preds = preds[preds["split"] == split]
        if preds.empty:
            raise ConfigError(f"{which} {source} has no {split} images; use --split with one of "
                              f"{', '.join(sorted(set(preds['split'].dropna())) or ['all'])}")
    rows = preds[["image_id", "lesion_id", "label", prob]].rename(columns={prob: "prob"})
    return Side(name, kind, source, rows.drop_duplicates("image_id").reset_index(drop=True), split_hash)


def align(a: Side, b: Side, split: str) -> pd.DataFrame:
    """One row per image: image_id, lesion_id, label, prob_a, prob_b; a one-line error on any mismatch: other
    images, other split manifests (for one split; ``all`` compares whole image sets), other labels."""
    ia, ib = set(a.rows["image_id"]), set(b.rows["image_id"])
    if ia != ib:
        only_a, only_b = sorted(ia - ib), sorted(ib - ia)
        raise ConfigError(f"A and B scored different {split} images (A {a.name}: {len(ia):,}, B {b.name}: {len(ib):,}; "
                          f"only in A: {len(only_a):,} {short_list(only_a, 3)}; only in B: {len(only_b):,} "
                          f"{short_list(only_b, 3)}); compare models scored on the same data and split")
    if split != "all" and a.split_hash and b.split_hash and a.split_hash != b.split_hash:
        raise ConfigError(f"A and B use different split manifests (A {a.name}: split {a.split_hash}, B {b.name}: "
                          f"split {b.split_hash}); compare models scored on the same split")
    df = a.rows.merge(b.rows[["image_id", "label", "prob"]], on="image_id", suffixes=("_a", "_b"))
    bad = df.loc[df["label_a"] != df["label_b"], "image_id"]
    if len(bad):
        raise DataError(f"A and B disagree on the label of {len(bad):,} images ({short_list(bad, 3)}); they were "
                        "scored with different positive classes or different data")
    return df.rename(columns={"label_a": "label"}).drop(columns="label_b")


def compare(a: str | Path, b: str | Path, *, split: str = "test", results: str | Path | None = None,
            n_boot: int = 2000, seed: int = 0, spec_for_sens: float = 0.9, alpha: float = 0.05) -> dict:
    """Paired DeLong test and paired bootstrap CIs of ΔAUC, ΔAP, Δsens@spec and ΔECE (A − B).

    Returns a JSON-able dict: ``a`` / ``b`` (name, kind, source, their metrics), ``n``, ``split``,
    ``split_hash``, ``unit`` (lesion or image), ``delong`` (:func:`delong_test`'s dict) and ``delta``
    (metric -> ``estimate, lo, hi``; the estimate is the difference of the two full-data values).
    """
    from skinsweep.ensemble.stats import bootstrap_values, delong_test
    from skinsweep.metrics import binary_metrics, sensitivity_at_specificity

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} is not a split{did_you_mean(split, SPLITS)}; use one of {', '.join(SPLITS)}")
    sa = load_side(a, split=split, results=results, which="A")
    sb = load_side(b, split=split, results=results, which="B")
    df = align(sa, sb, split)
    y = df["label"].to_numpy(int)
    pa, pb = df["prob_a"].to_numpy(float), df["prob_b"].to_numpy(float)
    groups = None if df["lesion_id"].isna().all() else df["lesion_id"].fillna(df["image_id"]).astype(str).to_numpy()

    def point(p: np.ndarray) -> dict:
        m = binary_metrics(y, p)
        return {"auc": m["auc"], "ap": m["ap"], "ece": m["ece"], "sens_at_spec": sensitivity_at_specificity(y, p, spec_for_sens)}

    est = {"A": point(pa), "B": point(pb)}
    vals = bootstrap_values(y, {"A": pa, "B": pb}, groups=groups, n_boot=n_boot, seed=seed, spec_for_sens=spec_for_sens)
    delta = {}
    for m in DELTA_METRICS:
        d = vals["A"][m] - vals["B"][m]
        d = d[np.isfinite(d)]
        lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2]) if d.size else (math.nan, math.nan)
        delta[m] = {"estimate": est["A"][m] - est["B"][m], "lo": float(lo), "hi": float(hi), "n_boot_valid": int(d.size)}
    return {
        "a": {"name": sa.name, "kind": sa.kind, "source": sa.source, **est["A"]},
        "b": {"name": sb.name, "kind": sb.kind, "source": sb.source, **est["B"]},
        "split": split, "split_hash": sa.split_hash or sb.split_hash,
        "n": {"images": int(len(y)), "melanoma": int(y.sum()),
              "lesions": None if groups is None else int(len(set(groups)))},
        "unit": "image" if groups is None else "lesion", "n_boot": n_boot, "seed": seed, "alpha": alpha,
        "spec_for_sens": spec_for_sens, "delong": delong_test(y, pa, pb, alpha=alpha), "delta": delta,
    }


__all__ = ["DELTA_METRICS", "Side", "align", "compare", "load_side"]
