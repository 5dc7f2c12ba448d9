"""Evaluation plots as PNG files: residuals for regression, ROC and calibration for classifiers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import EngFormatter
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve


def render(
    task: str, y_true: np.ndarray, score: np.ndarray, out_dir: Path, classes: list | None = None
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == "regression":
        return [_residuals(y_true, score, out_dir / "residuals.png")]
    if task == "multiclass_classification":
        return [_confusion(y_true, score, classes or [], out_dir / "confusion_matrix.png")]
    return [
        _roc(y_true, score, out_dir / "roc.png"),
        _calibration(y_true, score, out_dir / "calibration.png"),
    ]


def save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _residuals(y_true: np.ndarray, score: np.ndarray, path: Path) -> Path:
    residual = np.asarray(y_true, dtype=float) - score
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(score, residual, s=6, alpha=0.4)
    left.axhline(0, color="black", linewidth=1)
    left.set(xlabel="predicted", ylabel="actual − predicted", title="Residuals vs predicted")
    right.hist(residual, bins=50)
    right.set(xlabel="actual − predicted", ylabel="rows", title="Residual distribution")
    # Targets like prices run to six digits; 250k reads better than overlapping 250000s.
    for axis in (left.xaxis, left.yaxis, right.xaxis):
        axis.set_major_formatter(EngFormatter())
    return save(fig, path)


def _roc(y_true: np.ndarray, score: np.ndarray, path: Path) -> Path:
    fpr, tpr, _ = roc_curve(y_true, score)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"model (AUC {roc_auc_score(y_true, score):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    return save(fig, path)


def _calibration(y_true: np.ndarray, score: np.ndarray, path: Path) -> Path:
    observed, predicted = calibration_curve(y_true, score, n_bins=10, strategy="quantile")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(predicted, observed, marker="o", label="model")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.set(
        xlabel="mean predicted probability", ylabel="observed positive rate", title="Calibration"
    )
    ax.legend(loc="upper left")
    return save(fig, path)


def _confusion(y_true: np.ndarray, score: np.ndarray, classes: list, path: Path) -> Path:
    """Rows: the true class; columns: the predicted one; each row as shares of that class."""
    from sklearn.metrics import confusion_matrix

    predicted = np.asarray(classes)[score.argmax(axis=1)]
    truth = y_true if y_true.dtype != object else y_true.astype(str)  # text labels
    matrix = confusion_matrix(truth, predicted, labels=classes, normalize="true")
    size = 2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    names = [str(c) for c in classes]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (row, column), share in np.ndenumerate(matrix):
        ax.text(column, row, f"{share:.0%}", ha="center", va="center",
                color="white" if share > 0.5 else "black", fontsize=8)  # fmt: skip
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (share of each true class)")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    return save(fig, path)
