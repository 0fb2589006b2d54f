"""The ``skinsweep`` command line. Thin: each command parses options and calls one library function.

User errors (:class:`skinsweep.errors.SkinsweepError`) print one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from skinsweep.errors import ConfigError, SkinsweepError

app = typer.Typer(help="Sweeps and ensembles of melanoma classifiers for dermoscopic images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets: synthesise, split, cache and inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")
results_app = typer.Typer(help="Query a sweep's Parquet results.", no_args_is_help=True)
app.add_typer(results_app, name="results")
ensemble_app = typer.Typer(help="Ensembles: stack, calibrate, threshold, report, bundle.", no_args_is_help=True)
app.add_typer(ensemble_app, name="ensemble")

# Tables are wide: outside a terminal (pipes, CI logs) rich would wrap them at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def user_errors(fn: Callable) -> Callable:
    """Turn SkinsweepError into one red line on stderr and exit status 2; Ctrl-C into status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SkinsweepError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


# ---- shared options -------------------------------------------------------------------------------
PositiveOpt = typer.Option("MEL", "--positive", help="Diagnosis codes counted as melanoma (label 1), comma-separated.")
SkipBadOpt = typer.Option(False, "--skip-bad", help="Drop missing, unlisted or undecodable images (and list them) instead of failing.")
FormatOpt = typer.Option("auto", "--format", help="Dataset layout: auto, isic, ham or csv.")
WorkersOpt = typer.Option(None, "--workers", help="Worker processes (default: all cores).")


def _index(root: Path, positive: str, skip_bad: bool, fmt: str, workers: Optional[int]):
    from skinsweep.data.index import load_index

    index = load_index(root, fmt=fmt, positive=[p for p in positive.split(",") if p.strip()], skip_bad=skip_bad,
                       workers=workers, progress=True)
    if index.bad:
        err.print(f"[yellow]warning:[/] dropped {len(index.bad)} images (--skip-bad): "
                  + "; ".join(f"{b['image_id']} ({b['reason']})" for b in index.bad[:5])
                  + (" …" if len(index.bad) > 5 else ""), highlight=False)
    return index


def _table(title: Optional[str], first: str, *numbers: str) -> Table:
    """A table whose first column is a left-aligned label and the rest right-aligned numbers."""
    t = Table(title=title)
    t.add_column(first)
    for c in numbers:
        t.add_column(c, justify="right")
    return t


def _split_table(summary) -> Table:
    t = _table(None, "split", "images", "melanoma", "prevalence", "lesions")
    for name, r in summary.iterrows():
        t.add_row(name, f"{int(r['images']):,}", f"{int(r['melanoma']):,}", f"{100 * r['prevalence']:.1f}%",
                  "-" if r["lesions"] is None or r["lesions"] != r["lesions"] else f"{int(r['lesions']):,}")
    return t


def _leak_line(mode: str, leaked: int) -> str:
    if leaked == 0:
        return "[green]leakage check: no lesion has images in two splits[/]"
    note = " (image mode does not group by lesion — use it only to reproduce the reference study)" if mode == "image" else ""
    return f"[bold yellow]leakage check: {leaked:,} lesions have images in more than one split{note}[/]"


# ---- data commands --------------------------------------------------------------------------------
@data_app.command("synth")
@user_errors
def data_synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Folder to write (ISIC 2018 Task 3 layout)."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of images (default 2000, or every row of --like)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    size: str = typer.Option("600x450", "--size", help="Image size WIDTHxHEIGHT (the release is 600x450)."),
    like: Optional[Path] = typer.Option(None, "--like", help="Copy ids, lesions and diagnoses from a real HAM10000_metadata.csv."),
    official: bool = typer.Option(False, "--official", help="Also write Validation and Test folders (for --mode official)."),
    melanoma_rate: float = typer.Option(0.111, "--melanoma-rate", help="Share of melanoma images (HAM10000: 0.111); "
                                        "another value makes a prevalence-shifted site."),
    first_id: int = typer.Option(24306, "--first-id", help="Number of the first image id (ISIC_0024306); give a "
                                 "second synthetic site other ids, e.g. 100000."),
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Write a synthetic dermoscopy dataset in the ISIC 2018 Task 3 layout (with HAM10000 metadata)."""
    from skinsweep.data.synth import synthesize

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {size!r} is not WIDTHxHEIGHT; use e.g. 600x450") from None
    s = synthesize(out_dir, n, seed=seed, size=(w, h), like=like, official=official, workers=workers, progress=True,
                   melanoma_rate=melanoma_rate, first_id=first_id)
    out.print(f"wrote {s.n_images:,} images ({s.n_melanoma:,} melanoma, {s.n_lesions:,} lesions) to {s.out}")


@data_app.command("split")
@user_errors
def data_split(
    root: Path = typer.Argument(..., metavar="DIR", help="Dataset folder (ISIC / HAM10000 layout) or CSV file."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Manifest path (default: in the skinsweep cache, see README)."),
    mode: str = typer.Option("grouped", "--mode", help="grouped (by lesion), image (reference study, leaks lesions) or official."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    fractions: str = typer.Option("0.7,0.15,0.15", "--fractions", help="train,val,test fractions."),
    positive: str = PositiveOpt,
    skip_bad: bool = SkipBadOpt,
    fmt: str = FormatOpt,
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Split a dataset into train/val/test and save the manifest (Parquet, with its content hash)."""
    from skinsweep.data.split import default_split_path, make_split

    index = _index(root, positive, skip_bad, fmt, workers)
    fr = fractions.split(",")
    manifest = make_split(index, mode=mode, fractions=fr, seed=seed)
    path = manifest.save(out_file or default_split_path(index, mode, seed, fr))
    out.print(_split_table(manifest.summary()))
    out.print(_leak_line(mode, manifest.meta["leaked_lesions"]))
    if mode == "image":
        err.print("[yellow]warning:[/] image mode splits images, not lesions: test scores will be optimistic")
    out.print(f"split {manifest.hash} ({mode}, seed {seed}) → {path}")


@data_app.command("cache")
@user_errors
def data_cache(
    root: Path = typer.Argument(..., metavar="DIR", help="Dataset folder or CSV file."),
    size: int = typer.Option(224, "--size", help="Side of the cached square images, in pixels."),
    policy: str = typer.Option("squash", "--policy", help="squash (whole frame to a square) or center-crop."),
    positive: str = PositiveOpt,
    skip_bad: bool = SkipBadOpt,
    fmt: str = FormatOpt,
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Decode and resize every image once into the image cache (reused by every epoch and trial)."""
    from skinsweep.data.cache import build_cache

    index = _index(root, positive, skip_bad, fmt, workers)
    cache = build_cache(index, size=size, policy=policy, workers=workers, progress=True)
    mb = cache.images.nbytes / 2**20
    out.print(f"image cache: {len(cache):,} images at {size}×{size} ({policy}), {mb:,.0f} MiB → {cache.path}")


@data_app.command("inspect")
@user_errors
def data_inspect(
    root: Path = typer.Argument(..., metavar="DIR", help="Dataset folder or CSV file."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split manifest (default: the default grouped split)."),
    positive: str = PositiveOpt,
    skip_bad: bool = SkipBadOpt,
    fmt: str = FormatOpt,
    workers: Optional[int] = WorkersOpt,
) -> None:
    """Counts per class and split, lesions per split, a leakage check and image sizes."""
    from skinsweep.data.inspect import inspect_dataset
    from skinsweep.data.split import get_or_create_split

    index = _index(root, positive, skip_bad, fmt, workers)
    manifest, path, _ = get_or_create_split(index, split_path=split)
    r = inspect_dataset(index, manifest)
    lesions = f" from {r.n_melanoma_lesions:,} lesions" if r.n_melanoma_lesions is not None else ""
    total_l = f", {r.n_lesions:,} lesions" if r.n_lesions is not None else ", no lesion ids"
    out.print(f"[bold]{index.root}[/] ({index.fmt}): {r.n_images:,} images{total_l}; "
              f"{r.n_melanoma:,} melanomas ({100 * r.n_melanoma / r.n_images:.1f}%){lesions}")
    t = _table("images per diagnosis and split", "dx", "label", "train", "val", "test", "all")
    for dx, row in r.classes.iterrows():
        t.add_row(str(dx), str(row["label"]), *(f"{row[c]:,}" for c in ("train", "val", "test", "all")))
    out.print(t)
    out.print(_split_table(r.splits))
    out.print(_leak_line(r.split_mode, r.leaked_lesions))
    s = r.sizes
    out.print(f"image sizes: width {s.loc['width', 'min']}–{s.loc['width', 'max']} (median {s.loc['width', 'median']:g}), "
              f"height {s.loc['height', 'min']}–{s.loc['height', 'max']} (median {s.loc['height', 'median']:g}); "
              "most common " + ", ".join(f"{k} ×{v:,}" for k, v in r.common_sizes.head(3).items()))
    out.print(f"split {r.split_hash} ({r.split_mode}) from {path}")


# ---- training -------------------------------------------------------------------------------------
def _trial_fields() -> str:
    """The ``train --help`` epilog: every TrialConfig field, its default and help, from the model itself."""
    from skinsweep.train.config import TrialConfig

    rows = []
    for name, f in TrialConfig.model_fields.items():
        default = "required" if f.is_required() else json.dumps(f.default)
        rows.append(f"{name} = {default}: {f.description}")
    return escape("Settings (--set NAME=VALUE, or a YAML mapping in --config):\n\n" + "\n".join(rows))


def _short(name: str, flag: str) -> typer.models.OptionInfo:
    """A short form of ``--set NAME=VALUE``, with the field's own help."""
    from skinsweep.train.config import TrialConfig

    return typer.Option(None, flag, metavar="VALUE", show_default=False,
                        help=f"{TrialConfig.model_fields[name].description} Same as --set {name}=VALUE.")


@app.command("train", epilog=_trial_fields())
@user_errors
def train(
    out_dir: Path = typer.Option(..., "--out", help="Output folder for predictions, checkpoint and summary."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML mapping of TrialConfig settings (see below)."),
    set_: List[str] = typer.Option([], "--set", metavar="NAME=VALUE", help="A setting NAME=VALUE (YAML value; repeatable), e.g. --set lr=3e-4 "
                                   "or --set backbone_args.input_size=96; wins over --config and the short forms."),
    data: Optional[str] = _short("data", "--data"),
    split: Optional[str] = _short("split", "--split"),
    backbone: Optional[str] = _short("backbone", "--backbone"),
    mode: Optional[str] = _short("mode", "--mode"),
    epochs: Optional[str] = _short("epochs", "--epochs"),
    lr: Optional[str] = _short("lr", "--lr"),
    pos_weight: Optional[str] = _short("pos_weight", "--pos-weight"),
    image_size: Optional[str] = _short("image_size", "--image-size"),
    backbone_arg: List[str] = typer.Option([], "--backbone-arg", metavar="KEY=VALUE", help="Same as --set backbone_args.KEY=VALUE "
                                           "(repeatable), e.g. --backbone-arg input_size=96."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different trial already in --out."),
) -> None:
    """Train and evaluate one configuration; write predictions.parquet, summary.json, checkpoint and model.json.

    Every setting listed below can be given with --set NAME=VALUE or in a --config YAML file.
    """
    from skinsweep.config import apply_override, read_config, validate_config
    from skinsweep.train.config import TrialConfig
    from skinsweep.train.loop import run_trial

    source = str(config) if config else "skinsweep train"
    raw, sets = read_config(config, what="trial config") if config else ({}, [])
    shorts = {"data": data, "split": split, "backbone": backbone, "mode": mode, "epochs": epochs, "lr": lr,
              "pos_weight": pos_weight, "image_size": image_size}
    for name, value in shorts.items():
        if value is not None:  # paths are text as given, never YAML
            text = json.dumps(value) if name in ("data", "split") else value
            sets.append(apply_override(raw, f"{name}={text}", source, label=f"--{name.replace('_', '-')} {value}"))
    sets += [apply_override(raw, f"backbone_args.{item}", source, label=f"--backbone-arg {item}")
             for item in backbone_arg]
    sets += [apply_override(raw, item, source) for item in set_]
    cfg = validate_config(TrialConfig, raw, source, sets)
    res = run_trial(cfg, out_dir, progress=True, overwrite=overwrite)
    s = res.summary
    out.print(f"trial {res.trial_id}: {res.status}, best epoch {res.best_epoch} of {s['epochs_run']} "
              f"(by val {s['select_metric']}), {s['runtime_s']:.1f} s on {s['device']}"
              + (f", embedding cache {s['embedding_cache']}" if s.get("embedding_cache") else ""))
    cols = ("auc", "ap", "accuracy", "precision", "recall", "specificity", "ece", "brier", "n", "n_pos")
    t = _table(f"{cfg.backbone} · {cfg.mode} · metrics at the selected epoch (threshold 0.5)", "split", *cols)
    for name in ("val", "test"):
        m = getattr(res, name)
        if m:
            t.add_row(name, *(_fmt(m.get(c)) for c in cols))
    out.print(t)
    out.print(f"wrote {out_dir}/predictions.parquet, summary.json, checkpoint.safetensors, model.json")


# ---- sweeps and results ------------------------------------------------------------------------------
@app.command("sweep")
@user_errors
def sweep(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Sweep recipe (sweeps/*.yaml)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join a Ray cluster (default: RAY_ADDRESS, else a local Ray)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep without repeating finished trials."),
    set_: List[str] = typer.Option([], "--set", metavar="NAME=VALUE", help="Override a recipe field, e.g. --set search.num_samples=50 (repeatable)."),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help="With s3:// storage: the local copy of the results store (default results/<name>), mirrored to <storage>/<name>/."),
    budget: Optional[str] = typer.Option(None, "--budget", metavar="DURATION", help="Wall-time budget, e.g. 60m or 8h (= --set search.time_budget=…): no trial starts after it, running trials stop at it; on --resume, the time already used counts."),
) -> None:
    """Run a hyperparameter sweep with Ray Tune + Optuna (+ ASHA early stopping); results go to Parquet."""
    from skinsweep.results import show, validation_noise
    from skinsweep.sweep.runner import run_sweep

    if budget is not None:
        from skinsweep.sweep.recipe import load_recipe

        if load_recipe(recipe, set_).search is None:  # else the override would read as a half-written search:
            raise ConfigError(f"--budget: {recipe} lists fixed trials: (no search:), which all run to their end; "
                              "a time budget applies to search: recipes")
        set_ = [*set_, f"search.time_budget={budget}"]
    outcome = run_sweep(recipe, overrides=set_, address=address, resume=resume, console=out, results_dir=results_dir)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.counts.items()))
    out.print(f"sweep finished in {outcome.wall_s / 60:.1f} min: {outcome.n_trials} trials ({counts}) → {outcome.out_dir}"
              + (f" (mirrored to {outcome.storage_uri})" if outcome.storage_uri else ""))
    if outcome.budget_s:
        from skinsweep.sweep.space import format_duration

        out.print(f"time budget {format_duration(outcome.budget_s)}: used {format_duration(outcome.budget_used_s)}, "
                  f"left {format_duration(max(0.0, outcome.budget_s - outcome.budget_used_s))}"
                  + (" — the budget ended the sweep" if outcome.budget_spent else ""))
    _print_frame(show(outcome.out_dir, top=10), title="best trials by val AUC (test scored once, at the selected epoch)")
    if noise := validation_noise(outcome.out_dir):
        out.print(noise)
    out.print(f"query them: skinsweep results show {outcome.out_dir} --where \"mode = 'finetune'\"  |  "
              f"pandas.read_parquet('{outcome.out_dir}/predictions')")


@results_app.command("show")
@user_errors
def results_show(
    path: Path = typer.Argument(..., metavar="DIR", help="Sweep folder (results/<sweep>)."),
    top: int = typer.Option(10, "--top", help="Rows to show (0 = all)."),
    by: str = typer.Option("val_auc", "--by", help="Column to sort by."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL filter, e.g. \"backbone = 'dino_vits16'\"."),
) -> None:
    """Print the trials table: top N by a metric, optionally filtered."""
    from skinsweep.results import show, validation_noise

    _print_frame(show(path, top=top or None, by=by, where=where), title=f"{path} — top {top or 'all'} by {by}")
    if by == "val_auc" and not where and (noise := validation_noise(path, top=top or 10)):
        out.print(noise)


@results_app.command("query")
@user_errors
def results_query(
    path: Path = typer.Argument(..., metavar="DIR", help="Sweep folder (results/<sweep>)."),
    sql: str = typer.Argument(..., help="DuckDB SQL over the views `trials` and `predictions`."),
) -> None:
    """Run SQL (DuckDB) over trials.parquet and predictions/."""
    from skinsweep.results import query

    _print_frame(query(path, sql), title=None)


@results_app.command("sync")
@user_errors
def results_sync(
    path: Path = typer.Argument(..., metavar="DIR", help="Sweep folder (results/<sweep>, or the sweep's --results-dir)."),
    storage: Optional[str] = typer.Option(None, "--storage", metavar="URI", help="Object store to copy to, as a recipe's storage: (s3://bucket/prefix; the sweep's name is appended). Default: where the sweep mirrored to (its sweep.json)."),
) -> None:
    """Copy what the object-store mirror of a sweep lacks (after an outage, or to a new bucket)."""
    from skinsweep.sweep.storage import sync_store

    r = sync_store(path, storage)
    out.print(f"synced {path} → {r['uri']}: {r['uploaded']} of {r['files']} files copied, "
              f"{r['files'] - r['uploaded']} already there", highlight=False)


def _print_frame(df, title: Optional[str]) -> None:
    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), justify="right" if df[c].dtype.kind in "iuf" else "left")
    for _, row in df.iterrows():
        t.add_row(*(_fmt(v) for v in row.tolist()))
    out.print(t)


# ---- ensembles and prediction --------------------------------------------------------------------
@ensemble_app.command("build")
@user_errors
def ensemble_build(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="Ensemble recipe (ensembles/*.yaml)."),
    results: Path = typer.Option(..., "--results", help="Sweep folder (results/<sweep>)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default ensembles/<name>/)."),
    set_: List[str] = typer.Option([], "--set", metavar="NAME=VALUE", help="Override a recipe field, e.g. --set calibration.method=isotonic."),
    no_bundle: bool = typer.Option(False, "--no-bundle", help="Skip writing the deployment bundle."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset to read combiner.metadata from (default: the sweep's)."),
) -> None:
    """Fit an ensemble on validation predictions, report it on test (with CIs), export a bundle."""
    from skinsweep.ensemble.build import build_ensemble
    from skinsweep.metrics import format_ci

    rep = build_ensemble(recipe, results, out=out_dir, overrides=set_, bundle=not no_bundle, data=data)
    metrics = ("auc", "ap", "recall", "specificity", "ece", "brier", "sens_at_spec")
    t = _table(f"ensemble {rep['name']} on test ({rep['n']['test']:,} images, {rep['n']['test_pos']:,} melanoma) — "
               "95% bootstrap CIs by lesion", "model", *metrics)
    for model, m in rep["test"].items():
        t.add_row(escape(model), *(format_ci(m.get(c)) for c in metrics))
    out.print(t)
    d = rep["delong_vs_best"]
    out.print(f"threshold {rep['threshold']:.4f} (chosen on validation: {rep['threshold_rule']}); "
              f"DeLong ensemble vs best member {rep['best_member']['label']}: ΔAUC {d['diff']:+.4f}, p = {d['p_value']:.3g}",
              highlight=False)
    if rep.get("metadata"):
        out.print(f"stacked with metadata {', '.join(rep['metadata']['features'])} from {rep['metadata']['source']}",
                  highlight=False)
    where = Path(out_dir) if out_dir else Path("ensembles") / rep["name"]
    out.print(f"wrote {where}/report.json, predictions.parquet, roc.png, pr.png, reliability.png, confusion.png"
              + (f", bundle {rep['bundle']}" if rep.get("bundle") else ""))


@app.command("predict")
@user_errors
def predict(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Deployment bundle folder."),
    inputs: List[Path] = typer.Argument(..., metavar="IMAGE_OR_FOLDER...", help="Images or folders of images."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write predictions to .csv or .parquet."),
    tta: bool = typer.Option(False, "--tta", help="Average the logit of each member that was trained without tta over the image and its mirror (members with tta: flips / dihedral already average their own views)."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="CSV with image_id (= file stem), age, sex, "
                                            "localization, as HAM10000_metadata.csv; needed by bundles that stack metadata."),
) -> None:
    """Score images with a bundle: member probabilities, ensemble, calibrated probability, decision.

    With --out: every row goes to the file and a summary is printed (images scored, positive and negative
    decisions, errors by kind); without it: the first 20 rows. The bundle's MODEL_CARD.md says what it is for.
    """
    from skinsweep.ensemble.bundle import load_bundle, predict_files
    from skinsweep.ensemble.metadata import read_metadata_csv

    if out_file:  # before scoring anything
        if out_file.suffix not in (".csv", ".parquet"):
            raise ConfigError(f"--out {out_file}: use a .csv or .parquet file name")
        folder = out_file.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"cannot write --out {out_file} ({folder} {'is not writable' if folder.is_dir() else 'does not exist'}); "
                              "choose a writable folder")
    b = load_bundle(bundle)
    if metadata and not b.metadata_features:
        err.print(f"[yellow]note:[/] bundle {bundle} uses no metadata; --metadata {metadata} is ignored",
                  highlight=False, soft_wrap=True)
    meta = read_metadata_csv(metadata, b.metadata_features) if metadata and b.metadata_features else None
    df = predict_files(b, inputs, tta=tta, progress=True, metadata=meta)
    n_err = int(df["error"].notna().sum())
    n_nometa = int(df["metadata_missing"].sum()) if "metadata_missing" in df else 0
    if n_nometa:
        err.print(f"[yellow]warning:[/] {n_nometa} of {len(df)} images have no row in {metadata}; scored with unknown "
                  f"{'/'.join(b.metadata_features)} (column metadata_missing)", highlight=False, soft_wrap=True)
    if out_file:
        try:
            df.to_parquet(out_file, index=False) if out_file.suffix == ".parquet" else df.to_csv(out_file, index=False)
        except OSError as e:
            raise ConfigError(f"cannot write --out {out_file} ({e.strerror or e}); choose a writable file") from None
        _predict_summary(df, b.threshold, out_file)
    else:
        shown = df[["image", "calibrated_prob", "decision", "error"]].head(PREDICT_ROWS)
        _print_frame(shown, title=f"{len(df):,} images, threshold {b.threshold:.4f}"
                     + (f" — showing {PREDICT_ROWS} (--out FILE writes all)" if len(df) > PREDICT_ROWS else ""))
    if (Path(bundle) / "MODEL_CARD.md").is_file():
        out.print(f"model card (intended use, test results, limitations): {Path(bundle) / 'MODEL_CARD.md'}",
                  highlight=False, markup=False, soft_wrap=True)
    if n_err:
        err.print(f"[bold red]error:[/] {n_err} of {len(df)} files could not be scored (see the error column)")
        raise typer.Exit(1)


PREDICT_ROWS = 20  # rows `predict` prints without --out


def _predict_summary(df, threshold: float, out_file: Path) -> None:
    """`predict --out`: counts instead of one row per image."""
    scored = df[df["error"].isna()]
    pos = int((scored["decision"] == 1).sum())
    kinds = df.loc[df["error"].notna(), "error"].astype(str).str.split(":").str[0].value_counts()
    t = _table(f"predictions written to {escape(str(out_file))}", "", "count")
    t.add_row("images", f"{len(df):,}")
    t.add_row("scored", f"{len(scored):,}")
    t.add_row(f"positive (calibrated_prob ≥ {threshold:.4g})", f"{pos:,}")
    t.add_row("negative", f"{len(scored) - pos:,}")
    for kind, n in kinds.items():
        t.add_row(f"error: {escape(kind)}", f"{n:,}")
    out.print(t)
    out.print(f"threshold {threshold:.4g}; wrote {len(df):,} rows to {out_file}", highlight=False, markup=False,
              soft_wrap=True)


@app.command("report")
@user_errors
def report(
    results: Path = typer.Argument(..., metavar="DIR", help="Sweep folder (results/<sweep>)."),
    ensemble: List[Path] = typer.Option([], "--ensemble", help="Ensemble folder built from this sweep (repeatable)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Report folder (default DIR/report/)."),
    trial: List[str] = typer.Option([], "--trial", help="Trial id for the per-model section (repeatable; "
                                    "default: the best completed trial per backbone)."),
    sensitivity: float = typer.Option(0.95, "--sensitivity", min=0.5, max=1.0,
                                      help="Single models' operating point: this sensitivity on validation."),
    gallery: int = typer.Option(4, "--gallery", min=0, help="Images per gallery row (false negatives / positives)."),
    no_gradcam: bool = typer.Option(False, "--no-gradcam", help="Gallery without heat maps (no checkpoints needed)."),
) -> None:
    """Write an HTML report (index.html + PNGs): sweep overview, per-model curves, ensembles, Grad-CAM, errors."""
    from skinsweep.report.page import build_report

    page = build_report(results, ensembles=ensemble, out=out_dir, trials=trial or None, target_sensitivity=sensitivity,
                        gallery=gallery, gradcam=not no_gradcam, log=lambda m: out.print(m, highlight=False, markup=False))
    out.print(f"open {page.resolve().as_uri()}", highlight=False, markup=False)


@app.command("backbones")
@user_errors
def backbones_cmd() -> None:
    """List the registered backbones (any timm or open_clip model also works as timm:NAME / open_clip:NAME)."""
    from skinsweep.train.backbones import list_backbones

    for name in list_backbones():
        out.print(name)


def _fmt(v) -> str:
    import pandas as pd

    if v is None or (not isinstance(v, (list, dict, tuple)) and pd.isna(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return escape(str(v))


# Commands in their own modules, imported last (they use app / user_errors / out / err from here) and
# registered on `app` when imported: evaluate / recalibrate / compare, serve, the `weights` sub-app, export.
import skinsweep.cli_deploy  # noqa: E402,F401  (export)
import skinsweep.cli_eval  # noqa: E402,F401
import skinsweep.cli_serve  # noqa: E402,F401  (serve)
import skinsweep.cli_weights  # noqa: E402,F401  (weights fetch / check)


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    # `python -m skinsweep.cli` runs this file as __main__; cli_eval registered its commands on the
    # imported module skinsweep.cli, so run that module's app.
    from skinsweep.cli import main as _main

    sys.exit(_main())
