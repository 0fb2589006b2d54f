"""The HTML page of ``skinsweep evaluate``: one bundle on one labelled dataset.

Built from the report's parts: the same plots (:mod:`skinsweep.report.plots`), table formatting and
stylesheet (:mod:`skinsweep.report.page`, ``templates/_style.html.j2``, ``_macros.html.j2``). Every
number comes from the evaluation dict (:func:`skinsweep.ensemble.evaluate.evaluation_metrics`), which
was computed from the per-image predictions drawn here.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pandas as pd

from skinsweep.metrics import format_ci

PAGE = "index.html"
SHOWN = {"auc": "AUC", "ap": "AP", "recall": "sensitivity", "specificity": "specificity", "precision": "precision",
         "sens_at_spec": "sens @ spec", "ece": "ECE", "brier": "Brier"}


def metrics_table(ev: dict) -> pd.DataFrame:
    """Ensemble and members × metric as "estimate [95% CI]" (members: threshold-free metrics only)."""
    return pd.DataFrame([{"model": model, **{label: format_ci(m.get(k), missing="—") for k, label in SHOWN.items()}}
                         for model, m in ev["metrics"].items()])


def promise_table(ev: dict) -> pd.DataFrame:
    """What the bundle promised on its own test split against what it achieves here."""
    promised = (ev.get("promised") or {}).get("metrics") or {}
    rows = []
    for k in ("recall", "specificity", "auc", "ap", "ece"):
        rows.append({"metric": SHOWN[k], "promised (its own test split)": format_ci(promised.get(k), missing="not recorded"),
                     "here": format_ci(ev["metrics"]["ensemble"].get(k), missing="—")})
    return pd.DataFrame(rows)


def calibration_table(ev: dict) -> pd.DataFrame:
    c = ev["calibration"]
    return pd.DataFrame([
        {"measure": "calibration slope (ideal 1)", "value": format_ci(c["slope"])},
        {"measure": "calibration intercept (ideal 0)", "value": format_ci(c["intercept"])},
        {"measure": "mean predicted probability", "value": f"{c['mean_predicted']:.3f}"},
        {"measure": "observed melanoma fraction", "value": f"{c['observed']:.3f}"},
    ])


def subgroup_frames(ev: dict) -> dict[str, pd.DataFrame]:
    out = {}
    for col, rows in ev["subgroups"].items():
        out[col] = pd.DataFrame([{col: r["group"], "images": r["images"], "melanomas": r["melanomas"],
                                  "sensitivity": format_ci(r["sensitivity"], missing="—"),
                                  "specificity": format_ci(r["specificity"], missing="—"),
                                  "AUC": format_ci(r["auc"], missing="—")} for r in rows])
    return out


def evaluation_page(out: Path, ev: dict, rows: pd.DataFrame, member_labels: dict[str, str]) -> Path:
    """Write ``out/index.html`` and its PNGs in ``out/img/``; returns the page's path."""
    from skinsweep.files import atomic_write_text
    from skinsweep.report import plots
    from skinsweep.report.page import IMG, TILE_WIDTH, environment
    from skinsweep.train.loop import versions

    img = Path(out) / IMG
    shutil.rmtree(img, ignore_errors=True)  # rebuilt whole, never a mix of two runs
    img.mkdir(parents=True)
    y = rows["label"].to_numpy(int)
    cal = rows["calibrated_prob"].to_numpy(float)
    where = Path(ev["data"]).name or "this data"
    curves = {"ensemble (calibrated)": cal} | {label: rows[col].to_numpy(float) for col, label in member_labels.items()}
    figs = {"roc_pr": plots.roc_pr(img, y, curves, where=where),
            "calib": plots.reliability_and_confusion(img, "ensemble", y, cal, ev["threshold"], where=where,
                                                     chosen="the bundle's")}
    html = environment().get_template("evaluation.html.j2").render(
        ev=ev, figs=figs, img=IMG, tile_width=TILE_WIDTH, versions=versions(), where=where,
        metrics=metrics_table(ev), promise=promise_table(ev), calibration=calibration_table(ev),
        subgroups=subgroup_frames(ev), generated=f"{dt.datetime.now():%Y-%m-%d %H:%M}")
    atomic_write_text(Path(out) / PAGE, html)
    return Path(out) / PAGE


__all__ = ["evaluation_page"]
