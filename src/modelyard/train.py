"""Fit the spec's estimator inside a preprocessing Pipeline and evaluate it on held-out rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from modelyard import estimators
from modelyard.data import Splits, features_of
from modelyard.evaluation import classes_of, compute_metrics, scores, target_values
from modelyard.spec import Spec, resolve_estimator


@dataclass
class TrainResult:
    model: Pipeline
    metrics: dict[str, float]
    params: dict[str, str]
    fit_seconds: float
    eval_scores: np.ndarray = field(repr=False)
    classes: list | None = None  # a classifier's labels, in its probability columns' order


def build_pipeline(spec: Spec) -> Pipeline:
    """Impute (and, where the estimator needs it, scale) numerics and one-hot categoricals
    (unknown levels ignored), then estimate."""
    numeric = [f.name for f in spec.features if f.type == "numeric"]
    categorical = [f.name for f in spec.features if f.type == "categorical"]
    transformers = []
    if numeric:
        steps = [("impute", SimpleImputer(strategy="median"))]
        if estimators.scaled(spec.estimator.class_):  # trees compare raw values (see estimators)
            steps.append(("scale", StandardScaler()))
        transformers.append(("numeric", Pipeline(steps), numeric))
    if categorical:
        transformers.append(
            (
                "categorical",
                # A missing category arrives as "" (see data.model_input) and is a level of its
                # own: often informative, and exportable to ONNX, where strings cannot be NaN.
                OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                categorical,
            )
        )
    estimator = resolve_estimator(spec.estimator.class_)(**estimator_params(spec))
    return Pipeline([("preprocess", ColumnTransformer(transformers)), ("estimator", estimator)])


def estimator_params(spec: Spec) -> dict[str, Any]:
    """The spec's parameters, with `random_state` set to `split.seed` where the estimator takes
    one and the spec leaves it out: the same commit and data train the same model."""
    params = dict(spec.estimator.params)
    takes = resolve_estimator(spec.estimator.class_)().get_params(deep=False)
    if "random_state" in takes and "random_state" not in params:
        params["random_state"] = spec.split.seed
    return params


def fit_and_evaluate(spec: Spec, splits: Splits) -> TrainResult:
    estimators.require_exportable(spec.estimator.class_, spec.task)
    if spec.task == "multiclass_classification":
        labels = splits.train[spec.target].unique().tolist()
        estimators.require_labels(spec.estimator.class_, labels)
    model = build_pipeline(spec)
    started = time.perf_counter()
    model.fit(features_of(splits.train, spec), splits.train[spec.target].to_numpy())
    fit_seconds = time.perf_counter() - started
    eval_scores = scores(model, features_of(splits.eval, spec), spec.task)
    classes = None if spec.task == "regression" else classes_of(model)
    y_true = target_values(spec, splits.eval)
    return TrainResult(
        model=model,
        metrics=compute_metrics(spec.task, y_true, eval_scores, classes),
        params=training_params(spec, splits),
        fit_seconds=fit_seconds,
        eval_scores=eval_scores,
        classes=classes,
    )


def training_params(spec: Spec, splits: Splits) -> dict[str, str]:
    params = {f"estimator.{k}": str(v) for k, v in sorted(estimator_params(spec).items())}
    params.update(
        {
            "estimator": spec.estimator.class_,
            "task": spec.task,
            "features": ",".join(spec.feature_names),
            "target": spec.target,
            "split.test_size": str(spec.split.test_size),
            "split.seed": str(spec.split.seed),
            "rows.train": str(len(splits.train)),
            "rows.eval": str(len(splits.eval)),
        }
    )
    return params
