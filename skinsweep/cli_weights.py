"""``skinsweep weights``: pretrained weights for clusters without internet (see :mod:`skinsweep.train.offline`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from skinsweep.cli import app, err, out, user_errors

weights_app = typer.Typer(help="Pretrained weights for clusters without internet: fetch, copy, check.",
                          no_args_is_help=True)


@weights_app.command("fetch")
@user_errors
def fetch_cmd(
    names: List[str] = typer.Argument(..., metavar="BACKBONE...", help="Backbone names (see `skinsweep backbones`), "
                                      "or timm:NAME / open_clip:NAME@TAG."),
    to: Optional[Path] = typer.Option(None, "--to", help="Folder to download into, used as HF_HOME (files land in "
                                      "DIR/hub); default this machine's Hugging Face cache."),
) -> None:
    """Download backbones' pretrained weights into a Hugging Face cache folder you can copy to a cluster."""
    from skinsweep.train.offline import fetch_weights, hub_cache_dir

    for f in fetch_weights(names, to):
        out.print(f"{f.backbone}: {f.repo_id}/{f.file} ({f.size / 2**20:,.1f} MiB) → {f.path}",
                  highlight=False, markup=False, soft_wrap=True)
    # --to DIR is an HF_HOME; without it the files went to this machine's hub cache (HF_HUB_CACHE)
    folder, var = (to, "HF_HOME") if to is not None else (hub_cache_dir(), "HF_HUB_CACHE")
    out.print(f"copy {folder} to the cluster, then: HF_HUB_OFFLINE=1 {var}=<its path there> "
              f"skinsweep weights check {' '.join(names)}", highlight=False, markup=False, soft_wrap=True)


@weights_app.command("check")
@user_errors
def check_cmd(
    names: Optional[List[str]] = typer.Argument(None, metavar="[BACKBONE...]", help="Backbones to check (default: "
                                                "every registered backbone with hub weights)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="HF_HOME-like folder (or a hub cache) to check; "
                                         "default this machine's (HF_HOME / HF_HUB_CACHE)."),
    load: bool = typer.Option(True, "--load/--no-load", help="Also build each backbone from its file, offline."),
) -> None:
    """Per backbone: are its pretrained weights in the Hugging Face cache, and do they load offline?

    Exits 1 when a named backbone is missing, or any found file does not load.
    """
    from skinsweep.train.offline import check_weights, hub_cache_dir

    rows = check_weights(names or None, cache, load=load)
    t = Table(title=f"pretrained weights in {hub_cache_dir(cache)} (offline)")
    for c in ("backbone", "hub repo", "present", "loads", "where"):
        t.add_column(c)
    for r in rows:
        loads = "-" if r.loads is None else "yes" if r.loads else f"[red]no[/]: {escape(r.error)}"
        t.add_row(r.backbone, r.repo_id, escape(r.file) if r.file else "[red]missing[/]", loads,
                  escape(r.path or "-"))
    out.print(t)
    missing = [r.backbone for r in rows if r.file is None]
    broken = [r.backbone for r in rows if r.loads is False]
    if missing:
        err.print(f"{'' if names else 'note: '}missing: {' '.join(missing)}; on a machine with internet run "
                      f"`skinsweep weights fetch {' '.join(missing)} --to DIR` and copy DIR here "
                      "(HF_HOME=DIR or --cache DIR)", highlight=False, markup=False, soft_wrap=True)
    if broken:
        err.print(f"does not load: {' '.join(broken)} (see the loads column); fetch it again",
                      highlight=False, markup=False, soft_wrap=True)
    if broken or (missing and names):
        raise typer.Exit(1)


app.add_typer(weights_app, name="weights")
