"""Export the fitted Pipeline to ONNX with skl2onnx.

Numeric inputs are float32 (ONNX Runtime's ML operators, the imputer among them, run in float32);
categorical inputs are strings. Classifiers export labels and a plain probability matrix
(no ZipMap), which is what the serving runtime reads.
"""

from __future__ import annotations

from typing import Any

from modelyard.errors import ModelyardError
from modelyard.spec import Spec

TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}


class ExportError(ModelyardError):
    """The estimator cannot be exported; the message names it and what to do."""


def export_onnx(model: Any, spec: Spec) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    inputs = [
        (f.name, FloatTensorType([None, 1]) if f.type == "numeric" else StringTensorType([None, 1]))
        for f in spec.features
    ]
    estimator = model.steps[-1][1]
    options = {id(estimator): {"zipmap": False}} if spec.task == "binary_classification" else None
    try:
        graph = convert_sklearn(
            model, initial_types=inputs, options=options, target_opset=TARGET_OPSET
        )
    except (
        Exception
    ) as exc:  # skl2onnx raises RuntimeError, NotImplementedError, MissingShapeCalculator...
        raise ExportError(
            f"cannot export estimator {spec.estimator.class_} to ONNX "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}). "
            "Serving needs ONNX: pick an estimator skl2onnx supports "
            "(https://onnx.ai/sklearn-onnx/supported.html) or register a converter for it."
        ) from exc
    return graph.SerializeToString()
