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
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score,
                                 roc_curve)

    from skinsweep.metrics import expected_calibration_error

    plt = _plt()
    files = {}
    curves = dict(member_probs_test) | {"ensemble (calibrated)": cal_test}

    fig, ax = plt.subplots()
    for name, p in curves.items():
        fpr, tpr, _ = roc_curve(y_test, p)
        ax.plot(fpr, tpr, lw=2.2 if name.startswith("ensemble") else 1.2,
                label=f"{name}  AUC {roc_auc_score(y_test, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 − specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title="ROC on test")
    ax.legend(loc="lower right")
    files["roc"] = _save(fig, out / "roc.png")

    fig, ax = plt.subplots()
    for name, p in curves.items():
        prec, rec, _ = precision_recall_curve(y_test, p)
        ax.plot(rec, prec, lw=2.2 if name.startswith("ensemble") else 1.2,
                label=f"{name}  AP {average_precision_score(y_test, p):.3f}")
    ax.axhline(y_test.mean(), color="k", ls=":", lw=0.8, label=f"prevalence {y_test.mean():.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision–recall on test")
    ax.legend(loc="upper right")
    files["pr"] = _save(fig, out / "pr.png")

    fig, ax = plt.subplots()
    for name, p in (("before calibration", ens_val_uncal), ("after calibration", cal_val)):
        frac, mean = calibration_curve(y_val, p, n_bins=10, strategy="quantile")
        ax.plot(mean, frac, "o-", ms=3, label=f"{name}  ECE {expected_calibration_error(y_val, p):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed melanoma fraction",
           title="Reliability (validation, out-of-fold)")
    ax.legend(loc="upper left")
    files["reliability"] = _save(fig, out / "reliability.png")

    cm = confusion_matrix(y_test, (cal_test >= threshold).astype(int), labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    ax.grid(False)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v:,}", ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "melanoma"], yticklabels=["benign", "melanoma"],
           xlabel="predicted", ylabel="true", title=f"Test at threshold {threshold:.3f}")
    files["confusion"] = _save(fig, out / "confusion.png")
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
