"""Converters registered with skl2onnx before an export: ones it lacks (XGBoost and LightGBM,
through onnxmltools, when the `boosting` extra is installed) and one it gets wrong.

skl2onnx 1.20's HistGradientBoosting converter writes Python booleans (each leaf's missing-value
flag) into an integer attribute, which onnx refuses ("Expected an int, got a boolean"). The same
converter is registered again behind a container that passes those flags on as 0/1; nothing else
about the conversion changes.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

from modelyard.package.precision import ReferenceTree

_HIST = {
    "SklearnHistGradientBoostingRegressor": "HistGradientBoostingRegressor",
    "SklearnHistGradientBoostingClassifier": "HistGradientBoostingClassifier",
}


@functools.cache
def register() -> None:
    """Once per process: the fixed converters, and the boosting libraries' where installed."""
    _register_hist_gradient_boosting()
    _register_boosting_libraries()


class _IntegerFlags:
    """A converter container whose nodes get 0/1 where a converter wrote True/False."""

    def __init__(self, container: Any) -> None:
        self._container = container

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, *args: Any, **attrs: Any) -> Any:
        fixed = {k: [int(v) if isinstance(v, bool) else v for v in value]
                 if isinstance(value, list) else value for k, value in attrs.items()}  # fmt: skip
        return self._container.add_node(*args, **fixed)


def _register_hist_gradient_boosting() -> None:
    from skl2onnx import update_registered_converter
    from skl2onnx.common._registration import get_converter, get_shape_calculator
    from sklearn import ensemble

    for alias, name in _HIST.items():
        original = get_converter(alias)
        update_registered_converter(
            getattr(ensemble, name), alias, get_shape_calculator(alias), _flags_fixed(original),
            options=original.get_allowed_options(),
        )  # fmt: skip


def _flags_fixed(original: Any) -> Any:
    def convert(scope: Any, operator: Any, container: Any) -> None:
        original(scope, operator, _IntegerFlags(container))

    return convert


_CLASSIFIER_OPTIONS = {"nocl": [True, False], "zipmap": [True, False, "columns"]}


def _register_boosting_libraries() -> None:
    """XGBoost's and LightGBM's scikit-learn estimators, through onnxmltools's converters, when
    the `boosting` extra put them here."""
    import importlib.util

    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes as classifier_shapes,
    )
    from skl2onnx.common.shape_calculator import (
        calculate_linear_regressor_output_shapes as regressor_shapes,
    )

    if importlib.util.find_spec("onnxmltools") is None:
        return
    if importlib.util.find_spec("xgboost") is not None:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from xgboost import XGBClassifier, XGBRegressor

        update_registered_converter(XGBRegressor, "XGBoostXGBRegressor", regressor_shapes,
                                    convert_xgboost)  # fmt: skip
        update_registered_converter(XGBClassifier, "XGBoostXGBClassifier", classifier_shapes,
                                    convert_xgboost, options=_CLASSIFIER_OPTIONS)  # fmt: skip
    if importlib.util.find_spec("lightgbm") is not None:
        from lightgbm import LGBMClassifier, LGBMRegressor
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm

        update_registered_converter(LGBMRegressor, "LightGbmLGBMRegressor", regressor_shapes,
                                    convert_lightgbm, options={"split": None})  # fmt: skip
        update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier", classifier_shapes,
                                    convert_lightgbm, options=_CLASSIFIER_OPTIONS)  # fmt: skip


def fitted_trees(estimator: Any) -> list[ReferenceTree] | None:
    """The trees of an estimator that compares in float64 but whose converter writes float32
    thresholds (HistGradientBoosting, LightGBM), in the order the converter numbers them; None
    for any other estimator."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    if isinstance(estimator, HistGradientBoostingClassifier | HistGradientBoostingRegressor):
        # skl2onnx numbers the trees iteration by iteration, one per class score.
        return [_hist_tree(tree.nodes) for stage in estimator._predictors for tree in stage]
    if type(estimator).__module__.startswith("lightgbm."):
        dump = estimator.booster_.dump_model()
        return [_lightgbm_tree(info["tree_structure"]) for info in dump["tree_info"]]
    return None


def _hist_tree(nodes: Any) -> ReferenceTree:
    splits: dict[Hashable, tuple[float, Hashable, Hashable]] = {
        i: (float(n["num_threshold"]), int(n["left"]), int(n["right"]))
        for i, n in enumerate(nodes) if not n["is_leaf"]}  # fmt: skip
    return ReferenceTree(0, splits)


def _lightgbm_tree(root: dict[str, Any]) -> ReferenceTree:
    splits: dict[Any, tuple[float, Any, Any]] = {}
    pending = [root]
    while pending:
        node = pending.pop()
        if "split_index" in node:  # leaves have leaf_index instead
            left, right = node["left_child"], node["right_child"]
            splits[id(node)] = (float(node["threshold"]), id(left), id(right))
            pending += [left, right]
    return ReferenceTree(id(root), splits)
