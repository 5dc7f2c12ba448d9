"""Metrics and per-row losses, shared by training, the model gate and the behaviour tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.pipeline import Pipeline

from modelyard.data import model_input
from modelyard.spec import METRICS, Spec

_EPS = 1e-15


def scores(model: Pipeline, features: pd.DataFrame, task: str) -> np.ndarray:
    """What the model is judged on: predicted value, probability of the positive class, or
    (multiclass) a row of probabilities per row, one column per class of `classes_of(model)`."""
    features = model_input(features)
    if task == "regression":
        return np.asarray(model.predict(features), dtype=float)
    probabilities = np.asarray(model.predict_proba(features), dtype=float)
    return probabilities if task == "multiclass_classification" else probabilities[:, 1]


def target_values(spec: Spec, frame: pd.DataFrame) -> np.ndarray:
    """The target as metrics take it: numbers, or a multiclass target's labels as they are."""
    if spec.task == "multiclass_classification":
        return frame[spec.target].to_numpy()
    return frame[spec.target].to_numpy(dtype=float)


def classes_of(model: Pipeline) -> list:
    """A classifier's labels in the order of its probability columns (plain Python values)."""
    return np.asarray(model.classes_).tolist()


def compute_metrics(
    task: str, y_true: np.ndarray, score: np.ndarray, classes: list | None = None
) -> dict[str, float]:
    if task == "multiclass_classification":
        return _multiclass_metrics(np.asarray(y_true), score, classes or [])
    y_true = np.asarray(y_true, dtype=float)
    if task == "regression":
        return {
            "rmse": float(np.sqrt(skm.mean_squared_error(y_true, score))),
            "mae": float(skm.mean_absolute_error(y_true, score)),
            "r2": float(skm.r2_score(y_true, score)),
        }
    labels = (score >= 0.5).astype(int)
    out = {
        "f1": float(skm.f1_score(y_true, labels, zero_division=0)),
        "accuracy": float(skm.accuracy_score(y_true, labels)),
        "precision": float(skm.precision_score(y_true, labels, zero_division=0)),
        "recall": float(skm.recall_score(y_true, labels, zero_division=0)),
        "log_loss": float(skm.log_loss(y_true, np.clip(score, _EPS, 1 - _EPS), labels=[0, 1])),
    }
    # ROC-AUC is undefined on a single class (a small slice can have one); report NaN, not crash.
    out["roc_auc"] = (
        float(skm.roc_auc_score(y_true, score)) if len(np.unique(y_true)) == 2 else float("nan")
    )
    return out


def resampled_metrics(
    task: str, y_true: np.ndarray, score: np.ndarray, draws: np.ndarray
) -> dict[str, np.ndarray] | None:
    """`compute_metrics` on every resample at once: `draws` holds one resample's row numbers
    per row, and each metric comes back with one value per resample, the numbers the
    per-resample call gives (tests/test_evaluation.py holds them equal). For the card's
    bootstrap, where 200 calls of scikit-learn's metrics took 1.8 s. None where only the
    per-resample call knows the metrics: multiclass, or a binary target not coded 0/1."""
    if task == "regression":
        return _resampled_regression(np.asarray(y_true, dtype=float)[draws], score[draws])
    if task != "binary_classification" or not np.isin(y_true, (0, 1)).all():
        return None
    positive, score = np.asarray(y_true, dtype=float)[draws] == 1, score[draws]
    predicted = score >= 0.5
    tp = (positive & predicted).sum(axis=1)
    fp = (~positive & predicted).sum(axis=1)
    fn = (positive & ~predicted).sum(axis=1)
    p = np.clip(score, _EPS, 1 - _EPS)
    return {
        "f1": _share(2 * tp, 2 * tp + fp + fn),
        "accuracy": (predicted == positive).mean(axis=1),
        "precision": _share(tp, tp + fp),
        "recall": _share(tp, tp + fn),
        "log_loss": -np.where(positive, np.log(p), np.log(1 - p)).mean(axis=1),
        "roc_auc": _resampled_auc(positive, score),
    }


def _share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """part / whole, 0 where whole is 0 (scikit-learn's zero_division=0)."""
    return np.where(whole > 0, part / np.maximum(whole, 1), 0.0)


def _resampled_regression(y: np.ndarray, score: np.ndarray) -> dict[str, np.ndarray]:
    error = y - score
    squared = error**2
    residual = squared.sum(axis=1)
    total = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    # scikit-learn's r2 on a constant target: 1 for a perfect fit, else 0 (force_finite).
    r2 = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), 1.0 * (residual == 0))
    return {"rmse": np.sqrt(squared.mean(axis=1)), "mae": np.abs(error).mean(axis=1), "r2": r2}


def _resampled_auc(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC-AUC per row as the Mann-Whitney statistic (ties count a half, as the trapezoids of
    scikit-learn's curve do); NaN where a resample holds one class only."""
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=1)
    n_pos = positive.sum(axis=1)
    n_neg = positive.shape[1] - n_pos
    won = (ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2
    pairs = n_pos * n_neg
    return np.where(pairs > 0, won / np.maximum(pairs, 1), np.nan)


def _multiclass_metrics(y_true: np.ndarray, score: np.ndarray, classes: list) -> dict[str, float]:
    predicted = np.asarray(classes)[score.argmax(axis=1)]
    truth = y_true if y_true.dtype != object else y_true.astype(str)  # text labels
    out = {
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "f1_macro": float(skm.f1_score(truth, predicted, average="macro", zero_division=0)),
        "f1_weighted": float(skm.f1_score(truth, predicted, average="weighted", zero_division=0)),
        "log_loss": float(skm.log_loss(truth, np.clip(score, _EPS, 1), labels=classes)),
    }
    # One-vs-rest ROC-AUC needs every class among the rows (a slice may lack one): NaN then.
    present = set(truth.tolist()) >= set(classes)
    out["roc_auc_ovr"] = (
        float(skm.roc_auc_score(truth, score, multi_class="ovr", labels=classes))
        if present
        else float("nan")
    )
    return out


def row_losses(
    task: str, y_true: np.ndarray, score: np.ndarray, classes: list | None = None
) -> np.ndarray:
    """Per-row loss for paired comparisons: squared error, or log-loss (a proper scoring rule)."""
    if task == "multiclass_classification":
        column = {label: i for i, label in enumerate(classes or [])}
        index = [column.get(label, -1) for label in np.asarray(y_true).tolist()]
        chance = np.array([score[row, i] if i >= 0 else 0.0 for row, i in enumerate(index)])
        return -np.log(np.clip(chance, _EPS, 1))  # a class the model never saw: the worst loss
    y_true = np.asarray(y_true, dtype=float)
    if task == "regression":
        return (y_true - score) ** 2
    p = np.clip(score, _EPS, 1 - _EPS)
    return -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))


def passes(metric: str, value: float, minimum: float | None, maximum: float | None) -> bool:
    if np.isnan(value):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def better_direction(task: str, metric: str) -> str:
    return METRICS[task][metric]
