"""Metrics and per-row losses, shared by training, the model gate and the behaviour tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.pipeline import Pipeline

from modelyard.data import model_input
from modelyard.spec import METRICS

_EPS = 1e-15


def scores(model: Pipeline, features: pd.DataFrame, task: str) -> np.ndarray:
    """What the model is judged on: predicted value, or probability of the positive class."""
    features = model_input(features)
    if task == "regression":
        return np.asarray(model.predict(features), dtype=float)
    return np.asarray(model.predict_proba(features)[:, 1], dtype=float)


def compute_metrics(task: str, y_true: np.ndarray, score: np.ndarray) -> dict[str, float]:
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


def row_losses(task: str, y_true: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per-row loss for paired comparisons: squared error, or log-loss (a proper scoring rule)."""
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
