"""``make demo``: the whole product, end to end, on a laptop CPU, on synthetic lesions.

    python -m skinsweep.demo [--root results] [--n 4000] [--epochs 10] [--num-samples 10]

Steps: synthesise lesions (ISIC 2018 layout) → index + lesion-grouped split → inspect → one trial
(``skinsweep train``) → a sweep (``sweeps/demo.yaml``: Ray Tune + Optuna + ASHA, tiny backbones, both
modes) → query its Parquet results → two ensembles (``ensembles/best.yaml``: greedy selection;
``ensembles/dino_clip.yaml``: the DINO and CLIP stand-ins stacked), each with its report and bundle →
score new images with a bundle → a second synthetic site (other seed and ids, 30% melanoma): evaluate the
dino_clip bundle on it, recalibrate it for it → compare the two ensembles → the HTML report → a summary.

Everything is written under ``--root`` (default ``results/``): the dataset, the cache (via
``$SKINSWEEP_CACHE``), the sweep, the ensembles, the report, matplotlib's cache. Ray's session
files and the trials' scratch folders go to a private temporary folder (``$RAY_TMPDIR`` and
``$TMPDIR``) that is deleted at the end, so the demo leaves nothing else behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("results"), help="where everything is written")
    ap.add_argument("--n", type=int, default=4000, help="synthetic images")
    ap.add_argument("--size", default="200x150", help="synthetic image size WxH (the release is 600x450)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per sweep trial")
    ap.add_argument("--num-samples", type=int, default=10, help="sweep trials")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the ensemble reports")
    ap.add_argument("--site-n", type=int, default=400, help="images of the second synthetic site")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    root = args.root
    data, sweep_dir = root / "demo" / "data", root / "demo-sweep"
    ens_root = root / "demo-ensembles"
    env = dict(os.environ)
    env.setdefault("SKINSWEEP_CACHE", str((root / ".cache").resolve()))
    env.setdefault("MPLCONFIGDIR", str((root / ".cache" / "matplotlib").resolve()))
    # Ray's session folder (logs, sockets) and the trials' scratch: private, a short path (unix sockets cap
    # it at ~100 bytes, so not under --root), removed at the end
    scratch = Path(tempfile.mkdtemp(prefix="skinsweep-demo-"))
    env["RAY_TMPDIR"] = env["TMPDIR"] = str(scratch)

    def step(title: str, *cli: str) -> None:
        """Run ``skinsweep CLI…`` as a user would (a subprocess, output streamed live)."""
        console.rule(f"[bold]{title}[/]")
        console.print("$ skinsweep " + " ".join(shlex.quote(c) for c in cli), markup=False, highlight=False)
        r = subprocess.run([sys.executable, "-m", "skinsweep.cli", *cli], env=env)
        if r.returncode != 0:
            raise SystemExit(f"demo step failed (exit {r.returncode}): skinsweep {' '.join(cli)}")

    try:
        if not (data / "ISIC2018_Task3_Training_GroundTruth").is_dir():
            step("1. synthesise a lesion dataset", "data", "synth", str(data), "--n", str(args.n), "--size", args.size)
        else:
            console.rule(f"[bold]1. synthetic dataset already in {data}[/]")
        step("2. split by lesion (70/15/15, stratified)", "data", "split", str(data))
        step("3. inspect", "data", "inspect", str(data))
        trial_out = root / "demo" / "trial-tiny_resnet"
        step("4. one trial: tiny ResNet, fine-tuned", "train", "--data", str(data), "--out", str(trial_out),
             "--backbone", "tiny_resnet", "--epochs", "4", "--lr", "2e-3", "--overwrite")
        shutil.rmtree(sweep_dir, ignore_errors=True)  # the demo's own sweep: start afresh on every run
        step(f"5. a sweep: Ray Tune + Optuna + ASHA, {args.num_samples} trials over tiny backbones, both modes",
             "sweep", "sweeps/demo.yaml", "--set", f"data.root={data}", "--set", f"storage={root}",
             "--set", "name=demo-sweep", "--set", f"trial.epochs={args.epochs}",
             "--set", f"scheduler.grace_period={max(1, args.epochs * 3 // 5)}",  # the ASHA rung at 60% of training
             "--set", f"search.num_samples={args.num_samples}")
        step("6. query the results store (DuckDB over Parquet)", "results", "query", str(sweep_dir),
             "SELECT backbone, mode, count(*) AS trials, count(*) FILTER (status = 'completed') AS completed, "
             "round(max(val_auc), 3) AS best_val_auc FROM trials GROUP BY 1, 2 ORDER BY best_val_auc DESC")
        step("7. ensemble best.yaml: greedy selection over the sweep, calibrated, 95% sensitivity on validation",
             "ensemble", "build", "ensembles/best.yaml", "--results", str(sweep_dir), "--out", str(ens_root / "best"),
             "--set", f"report.n_boot={args.n_boot}")
        backbones = _dino_clip_members(sweep_dir)
        step(f"8. ensemble dino_clip.yaml: {' + '.join(backbones or ['best per backbone'])}, stacked, calibrated",
             "ensemble", "build", "ensembles/dino_clip.yaml", "--results", str(sweep_dir),
             "--out", str(ens_root / "dino_clip"), "--set", f"report.n_boot={args.n_boot}",
             "--set", f"members.backbones={'[' + ','.join(backbones) + ']' if backbones else 'null'}")
        new = root / "demo" / "new-images"
        if not new.is_dir():
            from skinsweep.data.synth import synthesize

            synthesize(new / "synth", 8, seed=99, size=tuple(int(v) for v in args.size.split("x")), progress=False)
        step("9. score new images with the dino_clip deployment bundle", "predict", str(ens_root / "dino_clip" / "bundle"),
             str(new / "synth" / "ISIC2018_Task3_Training_Input"), "--out", str(ens_root / "new-predictions.csv"))
        site = root / "demo" / "site-b"
        if not (site / "ISIC2018_Task3_Training_GroundTruth").is_dir():
            step("10. a second site: other lesions, other ids, 30% melanoma", "data", "synth", str(site),
                 "--n", str(args.site_n), "--seed", "7", "--melanoma-rate", "0.3", "--first-id", "100000",
                 "--size", args.size)
        else:
            console.rule(f"[bold]10. second site already in {site}[/]")
        step("11. external validation of the dino_clip bundle on the second site", "evaluate",
             str(ens_root / "dino_clip" / "bundle"), str(site), "--out", str(ens_root / "site-b-evaluation"),
             "--n-boot", str(args.n_boot))
        step("12. recalibrate the bundle for the second site (calibrator and threshold only)", "recalibrate",
             str(ens_root / "dino_clip" / "bundle"), str(site), "--out", str(ens_root / "dino_clip-site-b"),
             "--n-boot", str(args.n_boot))
        step("13. compare the two ensembles on test: paired DeLong + bootstrap", "compare", str(ens_root / "dino_clip"),
             str(ens_root / "best"), "--split", "test", "--out", str(ens_root / "comparison.json"),
             "--n-boot", str(args.n_boot))
        step("14. the HTML report: sweep, models, ensembles, Grad-CAM, error analysis", "report", str(sweep_dir),
             "--ensemble", str(ens_root / "dino_clip"), "--ensemble", str(ens_root / "best"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _summary(sweep_dir, ens_root, time.perf_counter() - t0)


def _dino_clip_members(sweep_dir: Path) -> list[str] | None:
    """The tiny stand-ins of DINO and CLIP (tiny_vit, tiny_clip) when both have a completed trial; else
    None (dino_clip.yaml then takes the best completed trial of every backbone), said out loud."""
    import pandas as pd

    t = pd.read_parquet(sweep_dir / "trials.parquet")
    done = set(t.loc[t["status"] == "completed", "backbone"])
    if {"tiny_vit", "tiny_clip"} <= done:
        return ["tiny_vit", "tiny_clip"]
    console.print(f"(no completed trial for {', '.join(sorted({'tiny_vit', 'tiny_clip'} - done))}: the ensemble takes "
                  "the best completed trial of every backbone instead)", highlight=False)
    return None


def _summary(sweep_dir: Path, ens_root: Path, wall: float) -> None:
    import pandas as pd

    from skinsweep.metrics import format_ci

    console.rule("[bold green]demo finished[/]")
    t = pd.read_parquet(sweep_dir / "trials.parquet")
    counts = t["status"].value_counts().to_dict()
    best = t[t["status"] == "completed"].sort_values("val_auc", ascending=False).head(3)
    tb = Table(title=f"best trials of {len(t)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    for c in ("trial", "backbone", "mode", "lr", "pos_weight", "val AUC", "test AUC", "test AP"):
        tb.add_column(c, justify="right" if c not in ("trial", "backbone", "mode") else "left")
    for _, r in best.iterrows():
        tb.add_row(r["trial_id"], r["backbone"], r["mode"], f"{r['lr']:.2g}", f"{r['pos_weight']:.3g}",
                   f"{r['val_auc']:.3f}", f"{r['test_auc']:.3f}", f"{r['test_ap']:.3f}")
    console.print(tb)
    te = Table(title="ensembles vs their best single member, on test (95% CIs, lesion-grouped bootstrap)")
    for c in ("ensemble", "model", "AUC", "AP", "ECE", "DeLong p"):
        te.add_column(c)
    for name in ("dino_clip", "best"):
        rep = json.loads((ens_root / name / "report.json").read_text())
        best_label = rep["best_member"]["label"]
        for model, label in (("ensemble", f"ensemble of {len(rep['members'])}"),
                             (best_label, f"best member {rep['best_member']['trial_id']}")):
            m = rep["test"][model]
            te.add_row(name if model == "ensemble" else "", label, *(format_ci(m[k]) for k in ("auc", "ap", "ece")),
                       f"{rep['delong_vs_best']['p_value']:.3g}" if model == "ensemble" else "")
    console.print(te)
    _site_lines(ens_root)
    report = (sweep_dir / "report" / "index.html").resolve()
    console.print(f"wall time {wall / 60:.1f} min\n"
                  f"report:   {report}  (open it in a browser)\n"
                  f"bundle:   {ens_root / 'dino_clip' / 'bundle'}/  (skinsweep predict BUNDLE IMAGES…)\n"
                  f"scores:   {ens_root / 'new-predictions.csv'} (8 new images)\n"
                  f"sweep:    {sweep_dir}/ (trials.parquet, predictions/, history/) — try: skinsweep results show "
                  f"{sweep_dir} --where \"mode = 'linear_probe'\"", highlight=False, markup=False)


def _site_lines(ens_root: Path) -> None:
    """One line each: the evaluation on the second site, its recalibration, the comparison of the ensembles."""
    from skinsweep.metrics import format_ci

    ev = json.loads((ens_root / "site-b-evaluation" / "evaluation.json").read_text())
    m = ev["metrics"]["ensemble"]
    kinds = ", ".join(f["kind"].replace("_", " ") for f in ev["flags"]) or "none"
    console.print(f"second site ({ev['n']['images']:,} images, {ev['prevalence']['here']:.0%} melanoma): dino_clip AUC "
                  f"{format_ci(m['auc'])}, sensitivity {format_ci(m['recall'])}, ECE {format_ci(m['ece'])}; "
                  f"flags: {kinds}", highlight=False, markup=False, soft_wrap=True)
    rc = json.loads((ens_root / "dino_clip-site-b" / "recalibration.json").read_text())
    console.print(f"recalibrated for it ({rc['method']}): ECE {rc['before']['ece']['estimate']:.3f} → "
                  f"{rc['after']['ece']['estimate']:.3f} (out-of-fold), AUC {rc['auc']['before']:.3f} → "
                  f"{rc['auc']['deployed']:.3f}, threshold {rc['threshold']['before']:.3f} → {rc['threshold']['after']:.3f}",
                  highlight=False, markup=False, soft_wrap=True)
    c = json.loads((ens_root / "comparison.json").read_text())
    d = c["delta"]["auc"]
    console.print(f"compare {c['a']['name']} vs {c['b']['name']} on test: ΔAUC {d['estimate']:+.3f} "
                  f"[{d['lo']:+.3f}, {d['hi']:+.3f}], DeLong p = {c['delong']['p_value']:.3g}, ΔECE "
                  f"{c['delta']['ece']['estimate']:+.3f}", highlight=False, markup=False, soft_wrap=True)


if __name__ == "__main__":
    main()
