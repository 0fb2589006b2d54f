"""Plots for reports (matplotlib, Agg backend, one consistent style). Every curve is drawn from stored
per-image predictions; numbers in legends are computed from the same arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STYLE = {"figure.figsize": (5.2, 4.4), "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "font.size": 9, "legend.fontsize": 7.5}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def ensemble_plots(out: Path, y_val: np.ndarray, y_test: np.ndarray, member_probs_test: dict[str, np.ndarray], *,
                   ens_val_uncal: np.ndarray, cal_val: np.ndarray, cal_test: np.ndarray, threshold: float) -> dict:
    """ROC and PR curves (test, members vs ensemble), reliability before/after calibration (validation,
    out-of-fold), confusion matrix at the chosen threshold (test). Returns {name: file name}."""
    plt = _plt()
    files = {}
    curves = dict(member_probs_test) | {"ensemble (calibrated)": cal_test}

    def bold(name: str) -> float:  # the ensemble stands out from its members
        return 2.2 if name.startswith("ensemble") else 1.2

    fig, ax = plt.subplots()
    _roc(ax, y_test, curves, lw=bold)
    ax.set(xlabel="1 − specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title="ROC on test")
    files["roc"] = _save(fig, out / "roc.png")

    fig, ax = plt.subplots()
    _precision_recall(ax, y_test, curves, lw=bold)
    ax.set(title="Precision–recall on test")
    files["pr"] = _save(fig, out / "pr.png")

    fig, ax = plt.subplots()
    _reliability(ax, y_val, {"before calibration": ens_val_uncal, "after calibration": cal_val})
    ax.set(title="Reliability (validation, out-of-fold)")
    files["reliability"] = _save(fig, out / "reliability.png")

    fig, ax = plt.subplots(figsize=(4, 3.6))
    _confusion(ax, y_test, cal_test >= threshold, f"Test at threshold {threshold:.3f}")
    files["confusion"] = _save(fig, out / "confusion.png")
    return files


def _roc(ax, y: np.ndarray, probs: dict[str, np.ndarray], lw=lambda name: 1.5) -> None:
    """One ROC curve per model (AUC in the legend) and the chance diagonal."""
    from sklearn.metrics import roc_auc_score, roc_curve

    for name, p in probs.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=lw(name), label=f"{name}  AUC {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.legend(loc="lower right")


def _precision_recall(ax, y: np.ndarray, probs: dict[str, np.ndarray], lw=lambda name: 1.5) -> None:
    """One precision-recall curve per model (AP in the legend) and the prevalence line."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    for name, p in probs.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, lw=lw(name), label=f"{name}  AP {average_precision_score(y, p):.3f}")
    ax.axhline(y.mean(), color="k", ls=":", lw=0.8, label=f"prevalence {y.mean():.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision")
    ax.legend(loc="upper right")


def _reliability(ax, y: np.ndarray, probs: dict[str, np.ndarray]) -> None:
    """Reliability diagram (10 quantile bins), ECE in the legend, and the diagonal."""
    from sklearn.calibration import calibration_curve

    from skinsweep.metrics import expected_calibration_error

    for name, p in probs.items():
        frac, mean = calibration_curve(y, p, n_bins=10, strategy="quantile")
        ax.plot(mean, frac, "o-", ms=3, label=f"{name}  ECE {expected_calibration_error(y, p):.3f}".strip())
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed melanoma fraction")
    ax.legend(loc="upper left")


def _save(fig, path: Path, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# ----------------------------------------------------------------------------- sweep report plots

_STATUS_STYLE = {"completed": ("o", 1.0), "pruned": ("x", 0.8), "out_of_budget": ("+", 0.8), "diverged": ("v", 0.8),
                 "failed": ("s", 0.5)}
_MODE_MARKER = {"finetune": "o", "linear_probe": "^"}


def _label(metric: str) -> str:
    return metric.replace("_auc", " AUC").replace("_ap", " AP").replace("_", " ")


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Log axis with plain numbers (0.001, 3, 10) instead of 3x10^0 labels that collide; 1-2-5 ticks
    within about a decade, powers of ten beyond."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = np.log10(hi / lo) if lo > 0 and hi > 0 else 0
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 1.3 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def backbone_colors(backbones) -> dict:
    """One colour per backbone, the same in every plot of a report (matplotlib's tab10 cycle)."""
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {b: cycle[i % len(cycle)] for i, b in enumerate(sorted(set(map(str, backbones))))}


def best_over_time(out: Path, trials, metric: str = "val_auc") -> str:
    """Every trial's ``metric`` against when it finished, and the running best of completed trials."""
    import pandas as pd

    plt = _plt()
    t = trials.dropna(subset=["finished_at"]).sort_values("finished_at")
    start = (t["started_at"].min() if t["started_at"].notna().any() else t["finished_at"].min())
    seconds = (t["finished_at"] - start).dt.total_seconds()
    unit, minutes = ("minutes", seconds / 60) if seconds.max() > 300 else ("seconds", seconds)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for status, (marker, alpha) in _STATUS_STYLE.items():
        sel = (t["status"] == status).to_numpy() & t[metric].notna().to_numpy()
        if sel.any():
            ax.scatter(minutes[sel], t[metric][sel], marker=marker, alpha=alpha, s=28, label=f"{status} ({sel.sum()})")
    comp = t[t["status"] == "completed"]
    if len(comp) and comp[metric].notna().any():
        best = comp[metric].cummax()
        x = pd.concat([minutes[comp.index], pd.Series([minutes.max()])]).to_numpy()
        ax.step(x, [*best, best.iloc[-1]], where="post", color="k", lw=1.4, label="best completed so far")
    ax.set(xlabel=f"{unit} since the first trial started", ylabel=_label(metric),
           title=f"Best {_label(metric)} over time")
    ax.legend(loc="lower right")
    return _save(fig, out / "best_over_time.png")


def hparam_plots(out: Path, trials, colors: dict, metric: str = "val_auc") -> str:
    """``metric`` against learning rate and positive-class weight (log axes); colour = backbone,
    marker = mode, hollow = stopped early (pruned)."""
    plt = _plt()
    params = [p for p in ("lr", "pos_weight", "backbone_lr_mult") if p in trials and trials[p].notna().any()]
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.6), sharey=True, squeeze=False)
    t = trials[trials[metric].notna()]
    for ax, p in zip(axes[0], params):
        for (bb, mode, status), g in t.groupby(["backbone", "mode", "status"]):
            g = g[g[p].notna()]
            if len(g):
                ax.scatter(g[p], g[metric], marker=_MODE_MARKER.get(mode, "s"), s=32,
                           facecolors=colors[str(bb)] if status == "completed" else "none", edgecolors=colors[str(bb)])
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis, float(t[p].min()), float(t[p].max()))
        ax.set(xlabel=p.replace("_", " "), title=f"{_label(metric)} vs {p.replace('_', ' ')}")
    axes[0][0].set_ylabel(_label(metric))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=c, label=b) for b, c in colors.items()]
    handles += [Line2D([], [], ls="", marker=m, color="grey", label=mode) for mode, m in _MODE_MARKER.items()]
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", color="grey", label="stopped early / failed")]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.0))
    return _save(fig, out / "hparams.png", tight=False)


def asha_curves(out: Path, history, trials, colors: dict, metric: str = "val_auc") -> str | None:
    """Validation ``metric`` per epoch for every trial: completed solid, pruned dashed ending in x."""
    if history is None or not len(history) or metric not in history:
        return None
    plt = _plt()
    status = trials.set_index("trial_id")["status"]
    backbone = trials.set_index("trial_id")["backbone"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for tid, h in history.groupby("trial_id"):
        if tid not in status.index:
            continue
        h = h.sort_values("epoch")
        pruned = status[tid] in ("pruned", "out_of_budget")  # stopped before its last epoch
        c = colors.get(str(backbone[tid]), "grey")
        ax.plot(h["epoch"], h[metric], ls="--" if pruned else "-", color=c, lw=1.0, alpha=0.85)
        if pruned:
            ax.plot(h["epoch"].iloc[-1:], h[metric].iloc[-1:], "x", color=c, ms=7)
    for b, c in colors.items():
        ax.plot([], [], color=c, label=b)
    ax.plot([], [], "k--x", lw=1, label="stopped by ASHA")
    ax.set(xlabel="epoch", ylabel=_label(metric), title="Per-epoch validation AUC: what ASHA stopped, and when")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right")
    return _save(fig, out / "asha.png")


def training_curves(out: Path, name: str, h, best_epoch) -> str:
    """Training and validation loss, and validation AUC, per epoch for one trial."""
    plt = _plt()
    h = h.sort_values("epoch")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for col, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if col in h and h[col].notna().any():
            a1.plot(h["epoch"], h[col], "o-", ms=3, label=label)
    a1.set(xlabel="epoch", ylabel="loss (weighted BCE)", title="Loss")
    a1.legend()
    if "val_auc" in h:
        a2.plot(h["epoch"], h["val_auc"], "o-", ms=3, color="C2", label="val AUC")
    if best_epoch is not None and best_epoch == best_epoch:
        a2.axvline(best_epoch, color="k", ls=":", lw=1, label=f"selected epoch {int(best_epoch)}")
    a2.set(xlabel="epoch", ylabel="ROC-AUC", title="Validation AUC")
    a2.legend(loc="lower right")
    for a in (a1, a2):
        a.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out / f"curves_{name}.png")


def roc_pr(out: Path, y: np.ndarray, probs: dict[str, np.ndarray], where: str = "test") -> str:
    """ROC and precision-recall curves on ``where`` side by side, AUC / AP in the legends."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 4.0))
    _roc(a1, y, probs)
    _precision_recall(a2, y, probs)
    a1.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"ROC on {where}")
    a2.set(title=f"Precision–recall on {where}")
    return _save(fig, out / "roc_pr.png")


def reliability_and_confusion(out: Path, name: str, y: np.ndarray, p: np.ndarray, threshold: float,
                              where: str = "test", chosen: str = "chosen on val") -> str:
    """Reliability diagram (with ECE) and confusion matrices at 0.5 and at ``threshold`` (``chosen``: where
    it came from), on the ``where`` images."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4), gridspec_kw={"width_ratios": [1.25, 1, 1]})
    _reliability(axes[0], y, {"": p})
    axes[0].set(title=f"Reliability ({where})")
    for ax, thr, title in ((axes[1], 0.5, "at 0.5"), (axes[2], threshold, f"at {threshold:.3f} ({chosen})")):
        _confusion(ax, y, p >= thr, f"{where[:1].upper() + where[1:]} {title}")
    return _save(fig, out / f"calib_{name}.png")


def reliability(out: Path, name: str, y: np.ndarray, probs: dict[str, np.ndarray], title: str) -> str:
    """Reliability diagram of several probability columns for the same images (e.g. before/after)."""
    plt = _plt()
    fig, ax = plt.subplots()
    _reliability(ax, y, probs)
    ax.set(title=title)
    return _save(fig, out / f"{name}.png")


def _confusion(ax, y: np.ndarray, flagged: np.ndarray, title: str) -> None:
    """Confusion matrix of labels ``y`` against ``flagged`` (predicted melanoma), counts in the cells."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, flagged.astype(int), labels=[0, 1])
    ax.imshow(cm, cmap="Blues")
    ax.grid(False)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "melanoma"], yticklabels=["benign", "melanoma"],
           xlabel="predicted", ylabel="true", title=title)
