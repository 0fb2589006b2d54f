"""``make demo``: the pipeline end to end on the embedded synthetic dataset, on a laptop CPU.

    python -m skinsweep.demo [--out results/demo] [--n 1500] [--epochs 4]

Steps: synthesise lesions (ISIC 2018 layout) → index + lesion-grouped split → inspect → one trial
(``skinsweep train``) → a sweep (``sweeps/demo.yaml``: Ray Tune + Optuna + ASHA, tiny backbones, both
modes) → query its Parquet results → a stacked, calibrated ensemble with its report and bundle → score
new images with the bundle. Everything is written under ``results/`` (the cache too, via
``$SKINSWEEP_CACHE`` set by ``make demo``). The HTML report joins when that milestone lands.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(width=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/demo"))
    ap.add_argument("--n", type=int, default=1500, help="synthetic images")
    ap.add_argument("--size", default="300x225", help="synthetic image size WxH (the release is 600x450)")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    data = args.out / "data"

    def step(title: str, *cli: str) -> None:
        """Run ``skinsweep CLI…`` as a user would (a subprocess, output streamed live)."""
        console.rule(f"[bold]{title}[/]")
        console.print("$ skinsweep " + " ".join(shlex.quote(c) for c in cli), markup=False, highlight=False)
        r = subprocess.run([sys.executable, "-m", "skinsweep.cli", *cli])
        if r.returncode != 0:
            raise SystemExit(f"demo step failed (exit {r.returncode}): skinsweep {' '.join(cli)}")

    if not (data / "ISIC2018_Task3_Training_GroundTruth").is_dir():
        step("1. synthesise a lesion dataset", "data", "synth", str(data), "--n", str(args.n), "--size", args.size)
    else:
        console.rule(f"[bold]1. synthetic dataset already in {data}[/]")
    step("2. split by lesion (70/15/15, stratified)", "data", "split", str(data))
    step("3. inspect", "data", "inspect", str(data))
    trial_out = args.out / "trial-tiny_resnet"
    step("4. one trial: tiny ResNet, fine-tuned", "train", "--data", str(data), "--out", str(trial_out),
         "--backbone", "tiny_resnet", "--epochs", str(args.epochs), "--lr", "1e-3", "--overwrite")
    sweep_dir = Path("results") / "demo-sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # the demo's own sweep: start afresh on every run
    step("5. a sweep: Ray Tune + Optuna + ASHA over tiny backbones, both modes", "sweep", "sweeps/demo.yaml",
         "--set", f"data.root={data}", "--set", "storage=results", "--set", "name=demo-sweep")
    step("6. query the results store (DuckDB over Parquet)", "results", "query", str(sweep_dir),
         "SELECT t.backbone, t.mode, count(*) AS trials, round(max(t.val_auc), 3) AS best_val_auc "
         "FROM trials t GROUP BY 1, 2 ORDER BY best_val_auc DESC")
    ens_dir = Path("results") / "demo-ensemble"
    # dino_clip.yaml names the real backbones; here: the best completed trial of each tiny backbone
    step("7. ensemble: best trial per backbone, stacked, calibrated, 95% sensitivity on validation",
         "ensemble", "build", "ensembles/dino_clip.yaml", "--results", str(sweep_dir), "--out", str(ens_dir),
         "--set", "members.backbones=null", "--set", "report.n_boot=1000")
    new = args.out / "new-images"
    if not new.is_dir():
        from skinsweep.data.synth import synthesize

        synthesize(new / "synth", 8, seed=99, size=(300, 225), progress=False)
    step("8. score new images with the deployment bundle", "predict", str(ens_dir / "bundle"),
         str(new / "synth" / "ISIC2018_Task3_Training_Input"), "--out", str(ens_dir / "new-predictions.csv"))
    console.rule("[bold green]demo finished[/]")
    console.print(f"wall time {time.perf_counter() - t0:.0f} s. Outputs: dataset {data}/, one trial {trial_out}/ "
                  f"(predictions.parquet, summary.json, checkpoint.safetensors, model.json), sweep {sweep_dir}/ "
                  "(trials.parquet, predictions/, split.parquet, sweep.json), ensemble "
                  f"{ens_dir}/ (report.json, plots, predictions.parquet, bundle/).")
    console.print(f"Try: skinsweep results show {sweep_dir} --where \"mode = 'linear_probe'\"")


if __name__ == "__main__":
    main()
