"""A sweep's ensemble against the hand-written baseline on the same test images (issue #11's targets).

    .venv/bin/python benchmarks/baseline_plain.py --budget 60m --out results/baseline-plain
    sh scripts/loopback.sh .venv/bin/skinsweep sweep sweeps/ham-cpu.yaml
    .venv/bin/skinsweep ensemble build ensembles/best.yaml --results results/ham-cpu --out results/ham-cpu-best
    .venv/bin/python benchmarks/compare_to_baseline.py --ensemble results/ham-cpu-best \\
        --baseline results/baseline-plain --sweep results/ham-cpu

Reads only stored predictions: the ensemble's ``predictions.parquet`` (its calibrated probability,
fitted on validation) and the baseline's. Prints, on the test split, AUC and AP with 95% lesion-level
bootstrap CIs (2,000 resamples, paired across the two), ECE (15 bins), the paired DeLong test of
ensemble vs baseline AUC, the ensemble's best single member, the wall time each took, and whether
each of the issue's targets (AUC ≥ 0.90, AP ≥ 0.55, ECE ≤ 0.05, DeLong p < 0.05 in the ensemble's
favour) is met.

Given several ``--ensemble`` folders (e.g. ``best`` and ``best-meta``: the same sweep with and without
patient metadata), the one with the higher out-of-fold validation AUC in its ``report.json`` is the
pick the targets are checked on; it is chosen and printed before any test number is read, and every
candidate is still reported on test beside it. Nothing here chooses anything on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"auc": 0.90, "ap": 0.55, "ece": 0.05, "p": 0.05}


def main() -> None:
    from skinsweep.ensemble.stats import bootstrap_metrics, delong_test
    from skinsweep.metrics import expected_calibration_error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ensemble", type=Path, required=True, action="append",
                    help="skinsweep ensemble build output folder; repeat to let validation choose among several")
    ap.add_argument("--baseline", type=Path, required=True, help="benchmarks/baseline_plain.py output folder")
    ap.add_argument("--sweep", type=Path, help="the sweep's results folder (for its wall time and trial counts)")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    needed = [e / n for e in args.ensemble for n in ("predictions.parquet", "report.json")]
    for f in needed + [args.baseline / "predictions.parquet"]:
        if not f.is_file():
            sys.exit(f"error: {f} not found; run the commands in this script's docstring first")

    # ---- the pick, on validation only (out-of-fold AUC of the calibrated ensemble) ----------------
    reports = {e: json.loads((e / "report.json").read_text()) for e in args.ensemble}
    val_auc = {e: r["val"]["ensemble"]["auc"] for e, r in reports.items()}
    chosen = max(args.ensemble, key=lambda e: val_auc[e])
    if len(args.ensemble) > 1:
        print("chosen on validation (out-of-fold AUC): " + ", ".join(
            f"{e.name} {val_auc[e]:.4f}{' ← pick' if e == chosen else ''}" for e in args.ensemble))

    base = pd.read_parquet(args.baseline / "predictions.parquet")
    base = base[base["split"] == "test"].set_index("image_id")
    tables = {}
    for e in args.ensemble:
        t = pd.read_parquet(e / "predictions.parquet")
        tables[e] = t[t["split"] == "test"].set_index("image_id")
        if set(tables[e].index) != set(base.index):
            sys.exit(f"error: {e} and the baseline scored different test images ({len(tables[e])} vs {len(base)}); "
                     "they must use the same split manifest")
    ens = tables[chosen]
    base = base.loc[ens.index]
    if not (ens["label"].to_numpy() == base["label"].to_numpy()).all():
        sys.exit("error: labels differ between the two prediction files; they come from different datasets")
    y = ens["label"].to_numpy().astype(int)
    probs = {"ensemble": ens["calibrated_prob"].to_numpy(), "baseline": base["prob"].to_numpy()}
    for e in args.ensemble:
        if e != chosen:
            probs[f"other: {e.name}"] = tables[e].loc[ens.index, "calibrated_prob"].to_numpy()
    report = reports[chosen]
    best = report["best_member"]["trial_id"]
    if f"prob_{best}" in ens:
        probs[f"best member {best}"] = ens[f"prob_{best}"].to_numpy()

    ci = bootstrap_metrics(y, probs, groups=ens["lesion_id"].to_numpy(), n_boot=args.n_boot, seed=0)
    print(f"test split: {len(y)} images, {int(y.sum())} melanoma; 95% CIs from {args.n_boot} lesion-level "
          "bootstrap resamples (paired)")
    print(f"ensemble: {chosen} ({len(report['members'])} members: "
          f"{', '.join(m['trial_id'] for m in report['members'])}; calibrated on validation)")
    for name, p in probs.items():
        t = ci[ci["model"] == name].set_index("metric")
        fmt = lambda k: f"{t.loc[k, 'estimate']:.3f} [{t.loc[k, 'lo']:.3f}, {t.loc[k, 'hi']:.3f}]"
        print(f"  {name:24s} AUC {fmt('auc')}   AP {fmt('ap')}   ECE {expected_calibration_error(y, p):.3f}")
    for name in ["ensemble"] + [n for n in probs if n.startswith("other: ")]:
        d = delong_test(y, probs[name], probs["baseline"])
        print(f"paired DeLong, {name.removeprefix('other: ')} − baseline: ΔAUC {d['diff']:+.4f} "
              f"[{d['ci_lo']:+.4f}, {d['ci_hi']:+.4f}], z {d['z']:.2f}, p {d['p_value']:.4f}")
        if name == "ensemble":
            dl = d

    e = ci[ci["model"] == "ensemble"].set_index("metric")["estimate"]
    ece = expected_calibration_error(y, probs["ensemble"])
    checks = {f"AUC ≥ {TARGETS['auc']}": e["auc"] >= TARGETS["auc"], f"AP ≥ {TARGETS['ap']}": e["ap"] >= TARGETS["ap"],
              f"ECE ≤ {TARGETS['ece']}": ece <= TARGETS["ece"],
              f"beats the baseline (DeLong p < {TARGETS['p']}, ΔAUC > 0)": dl["p_value"] < TARGETS["p"] and dl["diff"] > 0}
    print("targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))

    bs = json.loads((args.baseline / "summary.json").read_text()) if (args.baseline / "summary.json").is_file() else {}
    wall = bs.get("wall_s") or bs.get("runtime_s")
    if wall:
        print(f"baseline wall time: {wall / 60:.1f} min")
    if args.sweep is not None and (args.sweep / "trials.parquet").is_file():
        trials = pd.read_parquet(args.sweep / "trials.parquet")
        budget = json.loads((args.sweep / "budget.json").read_text()) if (args.sweep / "budget.json").is_file() else {}
        used = budget.get("used_s")
        print(f"sweep: {len(trials)} trials ({', '.join(f'{k} {v}' for k, v in trials['status'].value_counts().items())})"
              + (f", wall time {used / 60:.1f} min of a {budget['budget_s'] / 60:.0f}-min budget" if used else ""))


if __name__ == "__main__":
    main()
