"""Export the fitted Pipeline to ONNX with skl2onnx.

Numeric inputs are float64 and categorical inputs strings, one (n, 1) input per feature, in the
spec's order. `package.precision` then makes the graph compute as scikit-learn does (float64
throughout, trees comparing as the estimator compares). ONNX names must be identifiers, so
skl2onnx renames a column such as `mean radius`; the bundle's schema maps every column to its
graph input (`onnx_input_names`), and requests keep the column's own name. Classifiers export
labels and a plain probability matrix (no ZipMap), which is what the serving runtime reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from modelyard.errors import ExportFailed
from modelyard.package import converters
from modelyard.package.precision import Fitted, compares_in_float32, in_float64
from modelyard.spec import Spec

TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}


class ExportError(ExportFailed):
    """The estimator cannot be exported; the message names it and what to do."""


def export_onnx(model: Any, spec: Spec) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, StringTensorType

    kinds = {"numeric": DoubleTensorType, "categorical": StringTensorType}
    inputs = [(f.name, kinds[f.type]([None, 1])) for f in spec.features]
    converters.register()
    estimator = model.steps[-1][1]
    options = {id(estimator): {"zipmap": False}} if spec.task != "regression" else None
    try:
        # Named, not skl2onnx's random uuid: the same model exports to the same bytes, which
        # is what lets a rebuild prove itself bit for bit (modelyard.rebuild).
        graph = convert_sklearn(
            model, initial_types=inputs, options=options, target_opset=TARGET_OPSET,
            name=spec.name,
        )  # fmt: skip
    except Exception as exc:  # skl2onnx raises RuntimeError, NotImplementedError, MissingShape...
        raise ExportError(
            f"cannot export estimator {spec.estimator.class_} to ONNX "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}). "
            "Serving needs ONNX: pick an estimator from docs/models.md or register a converter "
            "for it with skl2onnx."
        ) from exc
    fitted = Fitted(
        trees_in_float32=compares_in_float32(estimator),
        trees=converters.fitted_trees(estimator),
        fills=tuple(np.asarray(i.statistics_, dtype=np.float64) for i in _imputers(model)),
    )
    return in_float64(graph, fitted).SerializeToString()


def _imputers(model: Any) -> list[Any]:
    """The fitted SimpleImputers inside the pipeline (inside its fitted ColumnTransformer)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    if isinstance(model, SimpleImputer):
        return [model]
    if isinstance(model, Pipeline):
        return [i for _, step in model.steps for i in _imputers(step)]
    if isinstance(model, ColumnTransformer):
        return [i for _, part, _ in model.transformers_ for i in _imputers(part)]
    return []


def onnx_input_names(onnx_bytes: bytes) -> list[str]:
    """The graph's inputs in order: one per feature, in the spec's order."""
    return [i.name for i in onnx.load_from_string(onnx_bytes).graph.input]
