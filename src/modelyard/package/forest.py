"""The bundle's `forest.npz`: a tree-ensemble graph prepared for the serving runtime's kernel.

modelyard.serve.forest explains what it is for. Here, at packaging time (the `onnx` package is
not in the serving image), the graph is cut around its one TreeEnsemble operator, the
operator's trees become flat arrays, and the kernel with the operator's final step is proven
against ONNX Runtime's operator on probe rows that sit on, just below and just above every
threshold, with missing values among them. A graph the kernel does not cover, or a proof that
fails, gets no `forest.npz` and is served by ONNX Runtime alone; `describe` says why.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, shape_inference
from onnx.utils import Extractor

from modelyard.serve import forest as serving
from modelyard.serve.runtime import session_options

OPERATORS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")
_SWAPPED = {"BRANCH_LEQ": False, "BRANCH_LT": False, "BRANCH_GT": True, "BRANCH_GTE": True}
_STRICT = {"BRANCH_LT", "BRANCH_GTE"}  # `<`: compared as `<=` the next number down
_TRANSFORMS = {"TreeEnsembleClassifier": {"NONE", "LOGISTIC", "SOFTMAX"},
               "TreeEnsembleRegressor": {"NONE"}}  # fmt: skip
PROBE_ROWS = 4096
_STEPS_PAST_SHALLOWEST = 2
_QS_LEAVES = 64  # a tree's leaves fit one bit mask


class Unsupported(Exception):
    """The graph is outside what the kernel covers; the message says what."""


@dataclass(frozen=True)
class ForestExport:
    archive: bytes | None  # forest.npz, or None: ONNX Runtime serves the whole graph
    note: str  # what was prepared, or why not

    def describe(self) -> str:
        return f"tree kernel: {self.note}"


def export_forest(onnx_bytes: bytes, seed: int = 0) -> ForestExport:
    model = onnx.load_from_string(onnx_bytes)
    trees = [n for n in model.graph.node if n.op_type in OPERATORS and n.domain == "ai.onnx.ml"]
    if not trees:
        return ForestExport(None, "not used (no tree ensemble in the graph)")
    if serving.kernel() is None:
        return ForestExport(None, "not used (the kernel is not built on this machine)")
    try:
        if len(trees) > 1:
            raise Unsupported(f"{len(trees)} tree operators in one graph")
        archive, summary = _prepare(model, trees[0], seed)
    except Unsupported as exc:
        return ForestExport(None, f"not used ({exc})")
    return ForestExport(archive, summary)


def _prepare(model: onnx.ModelProto, node: onnx.NodeProto, seed: int) -> tuple[bytes, str]:
    attributes = _attributes(node)
    inferred = shape_inference.infer_shapes(model)
    x_name = node.input[0]
    x_type = _elem_type(inferred, x_name)
    if x_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        raise Unsupported(f"the trees' input is of ONNX type {x_type}, not float or double")
    arrays, finish = _flatten(attributes, node.op_type, x_type == onnx.TensorProto.FLOAT)
    if not serving.quickscorer_here():  # unproven here, so left out: a host with AVX2 would take it
        arrays = {k: v for k, v in arrays.items() if not k.startswith("qs_")}
    trees = serving.Trees(finish=finish, **arrays)
    alone = _operator_alone(model, node, inferred)
    _prove(trees, alone, _probes(arrays["nodes"], max(trees.n_features, 1), x_type, seed))
    before, after = _cut(model, node, inferred)
    meta = {"format": serving.FORMAT, "tree_input": x_name, "tree_outputs": list(node.output),
            "model_outputs": [o.name for o in model.graph.output], "finish": finish}  # fmt: skip
    stored: dict[str, Any] = {
        "meta": _bytes_array(json.dumps(meta).encode()),
        "before": _bytes_array(before.SerializeToString()),
        "after": _bytes_array(after.SerializeToString() if after else b""),
        **{name: getattr(trees, name) for name in serving.ARRAYS},
    }
    archive = _npz(stored)
    ways = "walked and QuickScorer" if trees.quickscorer else "walked"
    summary = (f"{len(arrays['roots'])} trees ({ways}), {trees.n_internal} internal nodes, "
               f"proven on {PROBE_ROWS} probe rows against ONNX Runtime "
               f"{ort.__version__}")  # fmt: skip
    return archive, summary


def _cut(
    model: onnx.ModelProto, node: onnx.NodeProto, inferred: onnx.ModelProto
) -> tuple[onnx.ModelProto, onnx.ModelProto | None]:
    """The graph before the operator (its inputs to the trees' input) and after it (the trees'
    outputs to the model's other outputs; None when the operator's outputs are the model's)."""
    known = {i.name for i in [*inferred.graph.value_info, *inferred.graph.output]}
    inferred.graph.value_info.extend(o for o in _declared_outputs(node) if o.name not in known)
    extractor = Extractor(inferred)
    before = extractor.extract_model([i.name for i in model.graph.input], [node.input[0]])
    rest = [o.name for o in model.graph.output if o.name not in node.output]
    if not rest:
        return before, None
    after = extractor.extract_model(list(node.output), rest)
    if not {i.name for i in after.graph.input} <= set(node.output):
        raise Unsupported("the graph after the trees reads more than the trees' outputs")
    return before, after


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        values[attribute.name] = value
    return values


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    graph = model.graph
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.name == name:
            return int(info.type.tensor_type.elem_type)
    raise Unsupported(f"the type of the trees' input {name!r} is not known")


def _either(attributes: dict[str, Any], name: str, default: Any = ()) -> np.ndarray:
    """An attribute given as floats or as a double tensor (`<name>_as_tensor`)."""
    value = attributes.get(f"{name}_as_tensor", attributes.get(name, default))
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _flatten(
    attributes: dict[str, Any], operator: str, in_float32: bool
) -> tuple[dict[str, np.ndarray], dict]:
    """The kernel's arrays (see serve.forest.Trees) and how the operator finishes its sums."""
    modes = np.asarray(attributes["nodes_modes"])
    unknown = set(modes.tolist()) - {*_SWAPPED, "LEAF"}
    if unknown:
        raise Unsupported(f"node modes {sorted(unknown)}")
    tree_ids = np.asarray(attributes["nodes_treeids"], dtype=np.int64)
    node_ids = np.asarray(attributes["nodes_nodeids"], dtype=np.int64)
    count = len(tree_ids)
    is_leaf = modes == "LEAF"
    internal, leaves = np.flatnonzero(~is_leaf), np.flatnonzero(is_leaf)
    renumbered = np.empty(count, dtype=np.int64)
    renumbered[internal] = np.arange(len(internal))
    renumbered[leaves] = len(internal) + np.arange(len(leaves))
    find = _finder(tree_ids, node_ids, renumbered)
    thresholds = _either(attributes, "nodes_values")
    tracks = np.asarray(attributes.get("nodes_missing_value_tracks_true", [0] * count), dtype=bool)
    true = find(tree_ids, np.asarray(attributes["nodes_truenodeids"], dtype=np.int64))
    false = find(tree_ids, np.asarray(attributes["nodes_falsenodeids"], dtype=np.int64))
    swapped = np.array([_SWAPPED.get(m, False) for m in modes.tolist()])
    strict = np.isin(modes, list(_STRICT))
    nodes = np.zeros(count, dtype=serving.NODE)  # internal nodes, then leaves
    inner = slice(0, len(internal))
    nodes["threshold"][inner] = np.where(strict, np.nextafter(thresholds, -np.inf), thresholds)[
        internal
    ]
    nodes["feature"][inner] = np.asarray(attributes["nodes_featureids"], dtype=np.int32)[internal]
    nodes["next"][inner, 0] = np.where(swapped, false, true)[internal]
    nodes["next"][inner, 1] = np.where(swapped, true, false)[internal]
    nodes["next"][inner, 2] = np.where(tracks, true, false)[internal]
    nodes["next"][len(internal) :] = np.arange(len(internal), count)[:, None]  # a leaf stays
    order = sorted(set(tree_ids.tolist()), key=tree_ids.tolist().index)  # as they first appear
    roots = find(np.asarray(order), np.zeros(len(order), dtype=np.int64)).astype(np.int32)
    prefix = "class" if operator == "TreeEnsembleClassifier" else "target"
    weights = _leaf_weights(attributes, prefix, find, len(internal), len(leaves))
    first_steps = _first_steps(nodes, len(internal), roots)
    arrays = {"nodes": nodes, "roots": roots, "first_steps": first_steps, **weights}
    if np.bincount(np.unique(tree_ids[is_leaf], return_inverse=True)[1]).max() <= _QS_LEAVES:
        arrays |= _quickscorer(nodes, len(internal), roots)
    return arrays, _finish(attributes, operator, prefix, len(order), in_float32)


def _finder(tree_ids: np.ndarray, node_ids: np.ndarray, renumbered: np.ndarray) -> Any:
    """(tree id, node id) -> the node's new number."""
    keys = tree_ids * (int(node_ids.max(initial=0)) + 1) + node_ids
    order = np.argsort(keys)

    def find(trees: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        wanted = trees * (int(node_ids.max(initial=0)) + 1) + nodes
        at = np.searchsorted(keys, wanted, sorter=order)
        at = np.minimum(at, len(keys) - 1)
        if not np.array_equal(keys[order[at]], wanted):
            raise Unsupported("a child or a weight names a node that does not exist")
        return renumbered[order[at]]

    return find


def _first_steps(nodes: np.ndarray, n_internal: int, roots: np.ndarray) -> np.ndarray:
    """How many steps the kernel takes for every row of a block before it checks which rows
    reached a leaf (a row at a leaf stays there): the tree's shallowest leaf's depth plus
    `_STEPS_PAST_SHALLOWEST`, at most its deepest. Checking costs more per step than the steps
    a row at a leaf wastes: on the bench's 10,000 rows, one core, +2 took 10 % off the forest's
    time and 7 % off LightGBM's against checking from the shallowest leaf on."""
    shallowest = np.full(len(roots), -1, dtype=np.int32)
    deepest = np.zeros(len(roots), dtype=np.int32)
    frontier, owner, depth = roots.astype(np.int64), np.arange(len(roots)), 0
    while len(frontier):
        at_leaf = frontier >= n_internal
        reached = np.unique(owner[at_leaf])
        shallowest[reached[shallowest[reached] < 0]] = depth
        deepest[np.unique(owner)] = depth
        inner, owners = frontier[~at_leaf], owner[~at_leaf]
        frontier = nodes["next"][inner, :2].reshape(-1).astype(np.int64)
        owner, depth = np.repeat(owners, 2), depth + 1
    return np.minimum(shallowest + _STEPS_PAST_SHALLOWEST, deepest).astype(np.int32)


def _quickscorer(nodes: np.ndarray, n_internal: int, roots: np.ndarray) -> dict[str, Any]:
    """The QuickScorer layout of trees of at most 64 leaves (serve.forest.Trees, _forest.c)."""
    tree_of = np.zeros(n_internal, dtype=np.int32)
    left_of = np.zeros(n_internal, dtype=np.uint64)
    leaf_base, leaves = [0], []
    for tree, root in enumerate(roots.tolist()):
        order = serving.leaves_under(nodes, n_internal, root)
        position = {leaf: bit for bit, leaf in enumerate(order)}
        for node, under_left in _left_subtrees(nodes, n_internal, root):
            tree_of[node] = tree
            left_of[node] = sum(1 << position[leaf] for leaf in under_left)
        leaves += [leaf - n_internal for leaf in order]
        leaf_base.append(len(leaves))
    inner = nodes[:n_internal]
    n_features = serving.features_read(nodes, n_internal)
    nan_left = (inner["next"][:, 2] == inner["next"][:, 0]).astype(np.int64)  # else: right
    ranked = np.lexsort((inner["threshold"], nan_left, inner["feature"]))
    groups = 2 * inner["feature"].astype(np.int64) + nan_left
    starts = np.searchsorted(groups[ranked], np.arange(2 * n_features + 1))
    return {
        "qs_start": starts.astype(np.int64),
        "qs_threshold": inner["threshold"][ranked].astype(np.float64),
        "qs_tree": tree_of[ranked],
        "qs_left": left_of[ranked],
        "qs_leaf_base": np.asarray(leaf_base, dtype=np.int64),
        "qs_leaves": np.asarray(leaves, dtype=np.int32),
    }


def _left_subtrees(nodes: np.ndarray, n_internal: int, root: int) -> list[tuple[int, list[int]]]:
    """Each internal node of a tree with the leaves under its `x <= threshold` child."""
    return [
        (node, serving.leaves_under(nodes, n_internal, int(nodes["next"][node, 0])))
        for node in _internal_nodes(nodes, n_internal, root)
    ]


def _internal_nodes(nodes: np.ndarray, n_internal: int, root: int) -> list[int]:
    found, pending = [], [root]
    while pending:
        node = pending.pop()
        if node < n_internal:
            found.append(node)
            pending += [int(nodes["next"][node, 0]), int(nodes["next"][node, 1])]
    return found


def _leaf_weights(
    attributes: dict[str, Any], prefix: str, find: Any, n_internal: int, n_leaves: int
) -> dict[str, np.ndarray]:
    trees = np.asarray(attributes[f"{prefix}_treeids"], dtype=np.int64)
    leaf = find(trees, np.asarray(attributes[f"{prefix}_nodeids"], dtype=np.int64)) - n_internal
    if (leaf < 0).any():
        raise Unsupported("a weight sits on a node that is not a leaf")
    order = np.argsort(leaf, kind="stable")  # a leaf's weights in the operator's order
    start = np.zeros(n_leaves + 1, dtype=np.int64)
    start[1:] = np.cumsum(np.bincount(leaf, minlength=n_leaves))
    return {
        "weight_start": start,
        "weight_target": np.asarray(attributes[f"{prefix}_ids"], dtype=np.int32)[order],
        "weight_value": _either(attributes, f"{prefix}_weights")[order],
    }


def _finish(
    attributes: dict[str, Any], operator: str, prefix: str, n_trees: int, in_float32: bool
) -> dict:
    post_transform = attributes.get("post_transform", "NONE")
    if post_transform not in _TRANSFORMS[operator]:
        raise Unsupported(f"post_transform {post_transform}")
    base = _either(attributes, "base_values").tolist()
    targets = set(np.asarray(attributes[f"{prefix}_ids"]).tolist())
    finish: dict[str, Any] = {
        "operator": operator, "post_transform": post_transform, "base_values": base,
        "n_trees": n_trees,
        # ONNX Runtime's operator computes in the input's precision (float thresholds and
        # weights become doubles for a double input; a float input takes no double tensors).
        "in_float32": in_float32,
    }  # fmt: skip
    if operator == "TreeEnsembleRegressor":
        finish["n_targets"] = int(attributes.get("n_targets", 1))
        finish["aggregate"] = attributes.get("aggregate_function", "SUM")
        if finish["aggregate"] not in ("SUM", "AVERAGE"):
            raise Unsupported(f"aggregate_function {finish['aggregate']}")
        if len(base) not in (0, finish["n_targets"]):
            raise Unsupported(f"{len(base)} base values for {finish['n_targets']} targets")
        return finish
    labels = attributes.get("classlabels_strings") or [
        int(v) for v in attributes.get("classlabels_int64s", [])
    ]
    finish.update(labels=labels, n_targets=len(labels), binary=len(labels) == 2)
    if finish["binary"]:
        if targets != {0} or len(base) > 1:
            raise Unsupported("a two-class ensemble with weights for both classes")
        finish["positive_weights"] = bool((_either(attributes, f"{prefix}_weights") >= 0).all())
    elif len(labels) < 2 or len(base) not in (0, len(labels)):
        raise Unsupported(f"{len(labels)} classes with {len(base)} base values")
    return finish


def _operator_alone(
    model: onnx.ModelProto, node: onnx.NodeProto, inferred: onnx.ModelProto
) -> ort.InferenceSession:
    """ONNX Runtime's session of the operator by itself: what the kernel must reproduce."""
    x = helper.make_tensor_value_info(node.input[0], _elem_type(inferred, node.input[0]), None)
    graph = helper.make_graph([node], "trees", [x], _declared_outputs(node))
    alone = helper.make_model(graph, opset_imports=list(model.opset_import))
    alone.ir_version = model.ir_version
    # As the server runs it: one thread, so the trees' sums are added in the same order.
    return ort.InferenceSession(
        alone.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )


def _declared_outputs(node: onnx.NodeProto) -> list[onnx.ValueInfoProto]:
    """The operator's outputs with their types, from ai.onnx.ml's schemas: shape inference
    leaves them out of some converters' graphs."""
    types = [onnx.TensorProto.FLOAT]  # a regressor's values, a classifier's probabilities
    if node.op_type == "TreeEnsembleClassifier":
        texts = any(a.name == "classlabels_strings" for a in node.attribute)
        types = [onnx.TensorProto.STRING if texts else onnx.TensorProto.INT64, *types]
    return [
        helper.make_tensor_value_info(name, kind, None)
        for name, kind in zip(node.output, types, strict=True)
    ]


def _probes(nodes: np.ndarray, n_features: int, x_type: int, seed: int) -> np.ndarray:
    """Rows whose every value is one of its feature's thresholds, the next number either side
    (in the input's precision) or missing: each comparison in the trees is tried both ways."""
    number = np.float32 if x_type == onnx.TensorProto.FLOAT else np.float64
    rng = np.random.default_rng(seed)
    rows = np.empty((PROBE_ROWS, n_features), dtype=number)
    for feature in range(n_features):
        thresholds = nodes["threshold"][nodes["feature"] == feature].astype(number)
        if not thresholds.size:
            thresholds = np.zeros(1, dtype=number)
        candidates = np.concatenate([
            thresholds, np.nextafter(thresholds, number(-np.inf)),
            np.nextafter(thresholds, number(np.inf)), np.array([np.nan], dtype=number),
        ])  # fmt: skip
        rows[:, feature] = rng.choice(candidates, PROBE_ROWS)
    return rows


def _prove(trees: serving.Trees, alone: ort.InferenceSession, probes: np.ndarray) -> None:
    """Both ways of the kernel this machine can take (a serving host may take either)."""
    expected = [np.asarray(e) for e in alone.run(None, {alone.get_inputs()[0].name: probes})]
    for quickscorer in (False, True)[: 1 + trees.quickscorer]:
        if not serving.same_answers(expected, trees.outputs(probes, quickscorer)):
            raise Unsupported("the kernel's answers differ from ONNX Runtime's on the probe rows")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """What np.savez writes, with no clock in it: the same model gives the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w") as file:
                np.lib.format.write_array(file, array, allow_pickle=False)
    return buffer.getvalue()


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)
