"""The estimators modelyard supports: exported to ONNX and proven on every run (docs/models.md).

Each entry says how the training pipeline treats the estimator's inputs: linear models, kernels,
neighbours and neural networks get standardised numerics; trees and boosted trees do not (they
are invariant to it, and a scaler in front of a tree would make the export's comparisons differ
from scikit-learn's by a rounding). The conformance tests (tests/test_models.py) fit, export,
prove and serve every entry for every task it takes.

An estimator outside the matrix may still be used when skl2onnx has a converter for it: the
package stage proves it the same way. One without a converter is refused before training.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.errors import SpecError

REGRESSION = ("regression",)
CLASSIFICATION = ("binary_classification", "multiclass_classification")


@dataclass(frozen=True)
class Supported:
    path: str
    tasks: tuple[str, ...]
    family: str  # linear | tree | boosting | kernel | neighbours | neural
    extra: str | None = None  # the pip extra that installs it
    no_pmml: str | None = None  # why a PMML export cannot reproduce its scores, if it cannot
    coded_labels: bool = False  # its classifier takes only the labels 0, 1, ..., k-1

    @property
    def scaled(self) -> bool:
        return self.family not in ("tree", "boosting")

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]


def _pair(
    module: str, stem: str, family: str, extra: str | None = None, coded: bool = False
) -> list[Supported]:
    return [
        Supported(f"{module}.{stem}Regressor", REGRESSION, family, extra),
        Supported(f"{module}.{stem}Classifier", CLASSIFICATION, family, extra, coded_labels=coded),
    ]


MATRIX: tuple[Supported, ...] = (
    Supported("sklearn.linear_model.LinearRegression", REGRESSION, "linear"),
    Supported("sklearn.linear_model.Ridge", REGRESSION, "linear"),
    Supported("sklearn.linear_model.Lasso", REGRESSION, "linear"),
    Supported("sklearn.linear_model.ElasticNet", REGRESSION, "linear"),
    Supported("sklearn.linear_model.LogisticRegression", CLASSIFICATION, "linear"),
    *_pair("sklearn.linear_model", "SGD", "linear"),
    *_pair("sklearn.tree", "DecisionTree", "tree"),
    *_pair("sklearn.ensemble", "RandomForest", "tree"),
    *_pair("sklearn.ensemble", "ExtraTrees", "tree"),
    *_pair("sklearn.ensemble", "GradientBoosting", "boosting"),
    *_pair("sklearn.ensemble", "HistGradientBoosting", "boosting"),
    Supported("sklearn.svm.SVR", REGRESSION, "kernel"),
    Supported(
        "sklearn.svm.SVC",
        CLASSIFICATION,
        "kernel",
        no_pmml=(
            "JPMML scores an SVC's labels, not the Platt-scaled probabilities modelyard serves"
        ),
    ),
    Supported("sklearn.neighbors.KNeighborsRegressor", REGRESSION, "neighbours"),
    Supported(
        "sklearn.neighbors.KNeighborsClassifier",
        CLASSIFICATION,
        "neighbours",
        no_pmml=(
            "JPMML gives a neighbours classifier's label and neighbours, not class probabilities"
        ),
    ),
    *_pair("sklearn.neural_network", "MLP", "neural"),
    *_pair("xgboost", "XGB", "boosting", extra="boosting", coded=True),
    *_pair("lightgbm", "LGBM", "boosting", extra="boosting"),
)
_BY_PATH = {s.path: s for s in MATRIX}


def support(path: str) -> Supported | None:
    return _BY_PATH.get(path)


def scaled(path: str) -> bool:
    """Whether numeric inputs are standardised for this estimator (unknown ones: yes)."""
    found = support(path)
    return True if found is None else found.scaled


def require_exportable(path: str, task: str) -> None:
    """Refuse, before any training, an estimator the matrix lacks and skl2onnx cannot convert,
    or a matrix estimator given a task it does not take."""
    found = support(path)
    if found is not None:
        if task not in found.tasks:
            raise SpecError(
                f"estimator.class: {found.name} is for {' and '.join(found.tasks)}, not {task}; "
                f"for {task} use one of {', '.join(names_for(task))}"
            )
        return
    from skl2onnx import supported_converters

    if path.rpartition(".")[2] not in supported_converters(from_sklearn=True):
        raise SpecError(
            f"estimator.class: {path} cannot be exported to ONNX (skl2onnx has no converter for "
            f"it), and serving needs ONNX. For {task} use one of {', '.join(names_for(task))} "
            "(docs/models.md)."
        )


def names_for(task: str) -> list[str]:
    return [s.name for s in MATRIX if task in s.tasks]


def pmml_gap(path: str) -> str | None:
    """Why PMML cannot reproduce this estimator's scores (None: it can, or it is untested)."""
    found = support(path)
    return None if found is None else found.no_pmml


def require_labels(path: str, labels: list) -> None:
    """Refuse, before training, labels an estimator cannot take (XGBoost: only 0..k-1)."""
    found = support(path)
    if found is not None and found.coded_labels and sorted(labels) != list(range(len(labels))):
        raise SpecError(
            f"estimator.class: {found.name} takes class labels 0 to {len(labels) - 1} only, and "
            f"the target has {sorted(map(str, labels))[:10]}: recode the target, or use another "
            "estimator (LightGBM and scikit-learn's take any labels)"
        )
