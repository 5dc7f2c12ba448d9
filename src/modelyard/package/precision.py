"""Make an exported graph compute what scikit-learn computes, to the last bit where it can.

Numeric inputs enter the graph as float64, as they leave a JSON request and as scikit-learn
reads them. skl2onnx writes such a graph, but ONNX Runtime lacks float64 kernels for a few
ai.onnx.ml operators, converters round fitted values to float32, and tree operators must compare
the way the estimator compares. The rewrites, each proven afterwards by the parity check on the
whole evaluation split:

- `Imputer` becomes `IsNaN` + `Where`, which run in float64, with the fitted fill values (the
  converter rounds them to float32).
- Tree estimators that cast X to float32 before comparing it with float64 thresholds (all of
  scikit-learn's but HistGradientBoosting) get a float32 tree operator fed a float32 cast of the
  (float64-imputed) input, exactly the values scikit-learn compares. skl2onnx writes thresholds
  `w` such that `float32(x) <= t` exactly when `x <= w`; for a float32 `x` that is `x <= floor32(w)`
  (the largest float32 not above `w`), which is what the float32 operator is given. The
  operator's float32 sums are cast back to float64.
- Tree estimators that compare float64 inputs with float64 thresholds (HistGradientBoosting,
  LightGBM) keep float64 inputs and get the fitted thresholds, which their converters round.
- Operators ONNX Runtime runs only in float32 get float32 inputs and their outputs cast back.

(Before this, a StandardScaler in front of a tree ran in float32 in the graph and in float64 in
scikit-learn; values a rounding apart from a threshold took different branches. Trees now get
no scaler: see `modelyard.estimators`.)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ML = "ai.onnx.ml"
# op -> its float output (a classifier's other output is the label)
TREE_OPS = {"TreeEnsembleRegressor": 0, "TreeEnsembleClassifier": 1}
FLOAT32_ONLY = {"SVMRegressor": 0, "SVMClassifier": 1}  # ORT has no float64 kernel for these
_TREE_TENSORS = ("nodes_values", "base_values", "target_weights", "class_weights",
                 "nodes_hitrates")  # fmt: skip


def compares_in_float32(estimator: Any) -> bool:
    """Whether the estimator's trees compare a float32 copy of each input (scikit-learn's tree
    estimators and XGBoost cast X to float32; HistGradientBoosting and LightGBM do not)."""
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
    from sklearn.ensemble._forest import BaseForest
    from sklearn.tree import BaseDecisionTree

    kinds = (BaseDecisionTree, BaseForest, GradientBoostingClassifier, GradientBoostingRegressor)
    # XGBoost reads its input as float32 and keeps float32 split values.
    return isinstance(estimator, kinds) or type(estimator).__module__.startswith("xgboost.")


def float32_floor(values: np.ndarray) -> np.ndarray:
    """The largest float32 not above each value."""
    values = np.asarray(values, dtype=np.float64)
    rounded = values.astype(np.float32)
    over = rounded.astype(np.float64) > values
    rounded[over] = np.nextafter(rounded[over], np.float32(-np.inf))
    return rounded


# --- the graph side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceTree:
    """A fitted tree as its library holds it: split key -> (threshold, left key, right key);
    keys missing from `splits` are leaves."""

    root: Hashable
    splits: dict[Hashable, tuple[float, Hashable, Hashable]]


@dataclass(frozen=True)
class Fitted:
    """What the fitted pipeline knows in float64 that converters write rounded to float32."""

    trees_in_float32: bool = False  # see compares_in_float32
    trees: list[ReferenceTree] | None = None  # of an estimator that compares in float64
    fills: tuple[np.ndarray, ...] = ()  # each imputer's fill values, in its columns' order


def in_float64(model: onnx.ModelProto, fitted: Fitted) -> onnx.ModelProto:
    """The rewrites above, on a graph whose numeric inputs are float64. Imputers fill gaps with
    the fitted fill values, and trees that compare in float64 get the fitted thresholds, matched
    to the converters' rounded ones: a median a rounding away from a threshold that equals it
    took the other branch."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain == ML and node.op_type == "Imputer":
            nodes += _imputer(graph, node, fitted.fills)
        elif node.domain == ML and node.op_type in TREE_OPS:
            if fitted.trees is not None:
                _float64_thresholds(node, fitted.trees)
                _require_ml_opset(model, 3)  # the first with `*_as_tensor` attributes
            nodes += _tree(node, fitted.trees_in_float32)
        elif node.domain == ML and node.op_type in FLOAT32_ONLY:
            nodes += _in_float32(node, [0], [FLOAT32_ONLY[node.op_type]])
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _declare_outputs(graph)
    return model


def _imputer(
    graph: onnx.GraphProto, node: onnx.NodeProto, fills: tuple[np.ndarray, ...]
) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    replaced = attrs.get("replaced_value_float", float("nan"))
    if not np.isnan(replaced):
        return [node]  # only NaN gaps reach an imputer here (modelyard's own pipeline)
    fill = f"{node.name}_fill"
    rounded = np.asarray(attrs["imputed_value_floats"], dtype=np.float32)
    exact = [
        f for f in fills if f.shape == rounded.shape and (f.astype(np.float32) == rounded).all()
    ]
    values = (exact[0] if exact else rounded).astype(np.float64).reshape(1, -1)
    graph.initializer.append(numpy_helper.from_array(values, fill))
    gaps = f"{node.name}_gaps"
    return [
        helper.make_node("IsNaN", [node.input[0]], [gaps], name=f"{node.name}_isnan"),
        helper.make_node("Where", [gaps, fill, node.input[0]], [node.output[0]], name=node.name),
    ]


def _tree(node: onnx.NodeProto, in_float32: bool) -> list[onnx.NodeProto]:
    if in_float32:
        _float_attributes(node)
        return _in_float32(node, [0], [TREE_OPS[node.op_type]])
    return _in_float32(node, [], [TREE_OPS[node.op_type]])  # float64 in; sums come out float32


def _float64_thresholds(node: onnx.NodeProto, trees: list[ReferenceTree]) -> None:
    """Each split's threshold taken from the fitted tree, found by walking the graph's tree and
    the fitted one side by side from their roots (a converter may number nodes its own way)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "nodes_values_as_tensor" in attrs:
        values = numpy_helper.to_array(attrs["nodes_values_as_tensor"]).astype(np.float64)
    else:
        values = np.asarray(attrs["nodes_values"], dtype=np.float64)
    ids = zip(attrs["nodes_treeids"], attrs["nodes_nodeids"], strict=True)
    where = {(tree, node): i for i, (tree, node) in enumerate(ids)}
    children: dict[int, set[int]] = {t: set() for t in attrs["nodes_treeids"]}
    for i, tree in enumerate(attrs["nodes_treeids"]):
        if attrs["nodes_modes"][i] != b"LEAF":
            children[tree] |= {attrs["nodes_truenodeids"][i], attrs["nodes_falsenodeids"][i]}
    if sorted(children) != list(range(len(trees))):
        raise ValueError(f"the graph has {len(children)} trees, the estimator {len(trees)}")
    for tree, reference in enumerate(trees):
        nodes = {n for (t, n) in where if t == tree}
        (root,) = nodes - children[tree]
        pending = [(root, reference.root)]
        while pending:
            graph_node, fitted = pending.pop()
            i = where[(tree, graph_node)]
            if attrs["nodes_modes"][i] == b"LEAF":
                continue
            if attrs["nodes_modes"][i] != b"BRANCH_LEQ" or fitted not in reference.splits:
                raise ValueError(f"tree {tree}: the graph's node {graph_node} does not match")
            values[i], left, right = reference.splits[fitted]
            pending += [(attrs["nodes_truenodeids"][i], left),
                        (attrs["nodes_falsenodeids"][i], right)]  # fmt: skip
    for name in ("nodes_values", "nodes_values_as_tensor"):
        if name in attrs:
            node.attribute.remove(next(a for a in node.attribute if a.name == name))
    node.attribute.append(
        helper.make_attribute("nodes_values_as_tensor", numpy_helper.from_array(values))
    )


def _require_ml_opset(model: onnx.ModelProto, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain == ML:
            opset.version = max(opset.version, version)


def _float_attributes(node: onnx.NodeProto) -> None:
    """`*_as_tensor` (float64) attributes as the float lists a float32 tree operator reads:
    thresholds floored (see above), weights rounded."""
    for attribute in list(node.attribute):
        base = attribute.name.removesuffix("_as_tensor")
        if base != attribute.name and base in _TREE_TENSORS:
            values = numpy_helper.to_array(attribute.t).ravel()
            wanted = float32_floor if base == "nodes_values" else _float32
            narrowed = wanted(values)
            node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute(base, narrowed.tolist()))


def _in_float32(
    node: onnx.NodeProto, inputs: Iterable[int], outputs: Iterable[int]
) -> list[onnx.NodeProto]:
    """`node` fed float32 casts of the given inputs, its given outputs cast back to float64."""
    before, after = [], []
    for i in inputs:
        cast = f"{node.input[i]}_as_float32_{node.name}"
        before.append(helper.make_node("Cast", [node.input[i]], [cast], to=TensorProto.FLOAT,
                                       name=f"{node.name}_cast_in{i}"))  # fmt: skip
        node.input[i] = cast
    for i in outputs:
        wanted = node.output[i]
        node.output[i] = f"{wanted}_float32"
        after.append(helper.make_node("Cast", [node.output[i]], [wanted], to=TensorProto.DOUBLE,
                                      name=f"{node.name}_cast_out{i}"))  # fmt: skip
    return [*before, node, *after]


def _declare_outputs(graph: onnx.GraphProto) -> None:
    """Numeric graph outputs are float64 now (converters declared some float32), and
    intermediate type annotations the rewrites made stale are left for ONNX Runtime to infer."""
    del graph.value_info[:]
    for output in graph.output:
        if output.type.tensor_type.elem_type == TensorProto.FLOAT:
            output.type.tensor_type.elem_type = TensorProto.DOUBLE


def _float32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)
