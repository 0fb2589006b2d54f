"""``skinsweep evaluate``, ``recalibrate`` and ``compare``: registered on :data:`skinsweep.cli.app` (cli.py
imports this module at its end). Thin, like cli.py: each command parses options and calls one library
function (:mod:`skinsweep.ensemble.evaluate`, :mod:`~skinsweep.ensemble.recalibrate`,
:mod:`~skinsweep.ensemble.compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from skinsweep.cli import FormatOpt, SkipBadOpt, WorkersOpt, _table, app, err, out, user_errors

BundleArg = typer.Argument(..., metavar="BUNDLE", help="Deployment bundle folder (skinsweep ensemble build's bundle/).")
DataArg = typer.Argument(..., metavar="DATA", help="Labelled dataset: ISIC / HAM10000 folder or CSV file (path,label).")
PositiveOpt = typer.Option(None, "--positive", help="Diagnosis codes counted as melanoma (default: the bundle's).")
SplitFileOpt = typer.Option(None, "--split-file", help="Split manifest of DATA for --split (default: its default "
                            "lesion-grouped split; `skinsweep data split DATA --mode official` for a release's own).")
NBootOpt = typer.Option(2000, "--n-boot", min=100, help="Bootstrap resamples of the CIs.")
SeedOpt = typer.Option(0, "--seed", help="Seed of the bootstrap (and of the cross-fitting folds).")


def _positive(positive: Optional[str]):
    return [p for p in positive.split(",") if p.strip()] if positive else None


def _skipped(n: dict, skipped: list) -> None:
    if n.get("skipped"):
        err.print(f"[yellow]warning:[/] dropped {n['skipped']} images (--skip-bad): "
                  + "; ".join(f"{b['image_id']} ({b['reason']})" for b in skipped[:5])
                  + (" …" if n["skipped"] > 5 else ""), highlight=False)


@app.command("evaluate")
@user_errors
def evaluate(
    bundle: Path = BundleArg,
    data: Path = DataArg,
    split: str = typer.Option("all", "--split", help="Images of DATA to score: all, or test / val / train of its split."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default evaluations/<bundle>_on_<data>/)."),
    split_file: Optional[Path] = SplitFileOpt,
    prevalence_factor: float = typer.Option(1.5, "--prevalence-factor", help="Flag a melanoma prevalence this many "
                                            "times higher or lower than where the bundle was calibrated."),
    n_boot: int = NBootOpt,
    seed: int = SeedOpt,
    positive: Optional[str] = PositiveOpt,
    skip_bad: bool = SkipBadOpt,
    fmt: str = FormatOpt,
    workers: Optional[int] = WorkersOpt,
) -> None:
    """External validation: score a bundle on labelled data; metrics with CIs, calibration, subgroups, flags."""
    from skinsweep.ensemble.evaluate import evaluate_bundle
    from skinsweep.metrics import format_ci

    ev = evaluate_bundle(bundle, data, out=out_dir, split=split, positive=_positive(positive), fmt=fmt,
                         skip_bad=skip_bad, split_file=split_file, n_boot=n_boot, seed=seed,
                         prevalence_factor=prevalence_factor, workers=workers, progress=True)
    _skipped(ev["n"], ev["skipped"])
    n = ev["n"]
    metrics = ("auc", "ap", "recall", "specificity", "ece", "sens_at_spec")
    t = _table(f"{ev['bundle_name']} on {escape(ev['data'])} ({ev['split']}: {n['images']:,} images, "
               f"{n['melanoma']:,} melanoma) — 95% bootstrap CIs by {ev['unit']}", "model", *metrics)
    for model, m in ev["metrics"].items():
        t.add_row(escape(model), *(format_ci(m.get(c)) for c in metrics))
    out.print(t)
    promised = ((ev.get("promised") or {}).get("metrics") or {})
    c = ev["calibration"]
    out.print(f"at the bundle's threshold {ev['threshold']:.4f}: sensitivity {format_ci(ev['metrics']['ensemble']['recall'])}"
              f" (promised {format_ci(promised.get('recall'), 'not recorded')}), specificity "
              f"{format_ci(ev['metrics']['ensemble']['specificity'])} (promised "
              f"{format_ci(promised.get('specificity'), 'not recorded')}); calibration slope {format_ci(c['slope'])}, "
              f"intercept {format_ci(c['intercept'])}", highlight=False, soft_wrap=True)
    for f in ev["flags"]:
        out.print(f"[bold yellow]flag:[/] {escape(f['message'])}", highlight=False, soft_wrap=True)
    if not ev["flags"]:
        out.print("[green]no flags[/]: prevalence, calibration, sensitivity and leakage checks passed")
    out.print(f"wrote {ev['out']}/evaluation.json, predictions.parquet" + (", index.html" if ev.get("page") else ""),
              highlight=False)


@app.command("recalibrate")
@user_errors
def recalibrate(
    bundle: Path = BundleArg,
    data: Path = DataArg,
    out_dir: Path = typer.Option(..., "--out", metavar="NEW_BUNDLE", help="Folder of the new bundle."),
    method: str = typer.Option("temperature", "--method", help="temperature, platt or isotonic."),
    target_sensitivity: float = typer.Option(0.95, "--target-sensitivity", help="New threshold: this sensitivity "
                                             "on the site's out-of-fold probabilities."),
    split: str = typer.Option("all", "--split", help="Images of DATA to calibrate on: all, or test / val / train."),
    split_file: Optional[Path] = SplitFileOpt,
    n_splits: int = typer.Option(5, "--n-splits", min=2, help="Cross-fitting folds (grouped by lesion)."),
    n_boot: int = NBootOpt,
    seed: int = SeedOpt,
    positive: Optional[str] = PositiveOpt,
    skip_bad: bool = SkipBadOpt,
    fmt: str = FormatOpt,
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Refit only the calibrator and threshold on a site's labelled data; write a new bundle (parent hash kept)."""
    from skinsweep.ensemble.recalibrate import comparison_rows, recalibrate_bundle

    rep = recalibrate_bundle(bundle, data, out_dir, method=method, target_sensitivity=target_sensitivity, split=split,
                             positive=_positive(positive), fmt=fmt, skip_bad=skip_bad, split_file=split_file,
                             n_splits=n_splits, seed=seed, n_boot=n_boot, workers=workers, progress=True)
    _skipped(rep["n"], rep["skipped"])
    n = rep["n"]
    t = _table(f"{method} recalibration on {escape(rep['data'])} ({n['images']:,} images, {n['melanoma']:,} melanoma)"
               f" — after: out-of-fold ({rep['n_splits']} folds by {rep['unit']}), 95% CIs", "measure",
               "before (parent)", "after (out-of-fold)")
    for row in comparison_rows(rep):
        t.add_row(*row)
    out.print(t)
    out.print(f"AUC with the deployed calibrator {rep['auc']['deployed']:.4f} (parent {rep['auc']['before']:.4f}); "
              f"members and combiner unchanged", highlight=False)
    out.print(f"wrote bundle {rep['bundle']} (parent {rep['parent']}, hash {rep['parent_hash']}), "
              "recalibration.json, recalibration.png", highlight=False)


@app.command("compare")
@user_errors
def compare(
    a: str = typer.Argument(..., metavar="A", help="Ensemble folder, evaluation folder, or trial id (with --results)."),
    b: str = typer.Argument(..., metavar="B", help="The same kind of thing as A, scored on the same images."),
    split: str = typer.Option("test", "--split", help="test, val, train or all."),
    results: Optional[Path] = typer.Option(None, "--results", help="Sweep folder, when A and B are trial ids."),
    out_file: Path = typer.Option(Path("comparison.json"), "--out", help="JSON file to write."),
    spec: float = typer.Option(0.9, "--spec", min=0.01, max=0.99, help="Specificity at which sensitivity is compared."),
    n_boot: int = NBootOpt,
    seed: int = SeedOpt,
) -> None:
    """Paired comparison of A and B: DeLong test of AUC, paired bootstrap CIs of ΔAUC, ΔAP, Δsens@spec, ΔECE."""
    from skinsweep.ensemble.compare import DELTA_METRICS, compare as run_compare
    from skinsweep.files import atomic_write_text, json_safe
    from skinsweep.metrics import format_ci

    r = run_compare(a, b, split=split, results=results, n_boot=n_boot, seed=seed, spec_for_sens=spec)
    n = r["n"]
    label = {"auc": "AUC", "ap": "AP", "sens_at_spec": f"sensitivity @ spec {spec:g}", "ece": "ECE"}
    t = _table(f"A {escape(r['a']['name'])} vs B {escape(r['b']['name'])} on {split} ({n['images']:,} images, "
               f"{n['melanoma']:,} melanoma) — paired bootstrap by {r['unit']}", "metric", "A", "B", "A − B [95% CI]")
    for m in DELTA_METRICS:
        d = r["delta"][m]
        t.add_row(label[m], f"{r['a'][m]:.3f}", f"{r['b'][m]:.3f}",
                  f"{d['estimate']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["lo"] == d["lo"] else format_ci(d))
    out.print(t)
    dl = r["delong"]
    out.print(f"DeLong: ΔAUC {dl['diff']:+.4f} [{dl['ci_lo']:+.4f}, {dl['ci_hi']:+.4f}], z = {dl['z']:.2f}, "
              f"p = {dl['p_value']:.3g}", highlight=False)
    atomic_write_text(out_file, json.dumps(json_safe(r), indent=2))
    out.print(f"wrote {out_file}", highlight=False)
