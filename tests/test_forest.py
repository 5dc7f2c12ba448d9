"""The tree kernel (modelyard.serve.forest, package.forest): generated TreeEnsemble graphs of
every kind the kernel takes (regressors and classifiers; every comparison mode; missing values
sent either way; base values; averaging; the post transforms; text and integer labels; float
and double inputs) answer through it bit for bit as ONNX Runtime answers the whole graph, on
data with ties at the thresholds and missing values. What it does not take is named and left to
ONNX Runtime; a planted bug is caught by the packaging proof, a mismatch at load by the server.
The estimators' own graphs are covered by tests/test_models.py's conformance matrix.
In-process: no Docker, no servers."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from modelyard import estimators
from modelyard.bundle import load_or_create_key, parse_public_keys, public_key_text, verify
from modelyard.package import forest as packaging
from modelyard.package.build import build_bundle, frame_columns
from modelyard.serve import codecs, forest
from modelyard.serve import runtime as runtime_module
from modelyard.serve.runtime import Runtime, session_options
from modelyard.train import fit_and_evaluate
from tests.test_models import spec_for, splits_for

pytestmark = pytest.mark.skipif(forest.kernel() is None, reason="the tree kernel is not built")

GRID = np.array([-2.5, -1.0, 0.0, 0.5, 1.0, 3.0])  # thresholds: data lands on them too
MODES = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT")


@dataclass
class Case:
    """A generated ensemble: `targets` classes (or regression targets) and how leaves vote."""

    operator: str
    targets: int
    votes: str = "one"  # "one": a leaf adds to one class/target; "all": to every one
    post_transform: str = "NONE"
    base_values: list[float] = field(default_factory=list)
    aggregate: str = "SUM"
    labels: str = "int"  # "int" | "text"
    positive_only: bool = False  # two classes: weights in [0, 1] only (a forest's votes)
    doubles: bool = False  # thresholds and weights as double tensors
    x_type: int = TensorProto.DOUBLE
    modes: tuple[str, ...] = MODES


CASES = {
    "regressor-sum-base": Case("TreeEnsembleRegressor", 1, base_values=[0.25]),
    "regressor-2-targets-average": Case(
        "TreeEnsembleRegressor",
        2,
        votes="all",
        aggregate="AVERAGE",
        base_values=[1.0, -1.0],
        doubles=True,
    ),
    "regressor-float-input": Case("TreeEnsembleRegressor", 1, x_type=TensorProto.FLOAT),
    "binary-votes": Case("TreeEnsembleClassifier", 2, positive_only=True),
    "binary-logistic": Case("TreeEnsembleClassifier", 2, post_transform="LOGISTIC", doubles=True),
    "binary-logistic-base": Case(
        "TreeEnsembleClassifier", 2, post_transform="LOGISTIC", base_values=[-0.3]
    ),
    "binary-margins": Case("TreeEnsembleClassifier", 2, labels="text"),
    "multiclass-softmax": Case(
        "TreeEnsembleClassifier",
        3,
        post_transform="SOFTMAX",
        base_values=[0.1, -0.2, 0.3],
        labels="text",
    ),
    "multiclass-votes": Case("TreeEnsembleClassifier", 4, votes="all"),
    "multiclass-logistic-float-input": Case(
        "TreeEnsembleClassifier", 3, post_transform="LOGISTIC", x_type=TensorProto.FLOAT
    ),
    "multiclass-doubles": Case("TreeEnsembleClassifier", 3, votes="all", doubles=True),
}


def ensemble(case: Case, seed: int, n_trees: int = 12, n_features: int = 5) -> bytes:
    """A graph X -> Identity -> the operator (-> a Cast of its numbers to double)."""
    rng = np.random.default_rng(seed)
    nodes: dict[str, list] = {k: [] for k in ("treeids", "nodeids", "featureids", "modes",
                                              "values", "truenodeids", "falsenodeids",
                                              "missing_value_tracks_true")}  # fmt: skip
    weights: dict[str, list] = {"treeids": [], "nodeids": [], "ids": [], "weights": []}
    for tree in range(n_trees):
        _grow(rng, case, tree, nodes, weights, depth=0, max_depth=int(rng.integers(1, 7)),
              n_features=n_features)  # fmt: skip
    attributes = _operator_attributes(case, nodes, weights)
    x_in = helper.make_tensor_value_info("X_in", case.x_type, [None, n_features])
    prefix = "class" if case.operator == "TreeEnsembleClassifier" else "target"
    outputs = ["label", "scores"] if prefix == "class" else ["scores"]
    tree = helper.make_node(case.operator, ["X"], outputs, domain="ai.onnx.ml", **attributes)
    cast = helper.make_node("Cast", ["scores"], ["scores_double"], to=TensorProto.DOUBLE)
    graph_outputs = [helper.make_tensor_value_info("scores_double", TensorProto.DOUBLE, None)]
    if prefix == "class":
        kind = TensorProto.STRING if case.labels == "text" else TensorProto.INT64
        graph_outputs.insert(0, helper.make_tensor_value_info("label", kind, None))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X_in"], ["X"]), tree, cast], "generated", [x_in],
        graph_outputs,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    return model.SerializeToString()


def _grow(rng: np.random.Generator, case: Case, tree: int, nodes: dict, weights: dict,
          depth: int, max_depth: int, n_features: int) -> int:  # fmt: skip
    """Adds a subtree in preorder; returns its root's node id."""
    node_id = sum(1 for t in nodes["treeids"] if t == tree)
    for name in nodes:
        nodes[name].append(0)
    at = len(nodes["treeids"]) - 1
    nodes["treeids"][at], nodes["nodeids"][at] = tree, node_id
    if depth == max_depth or (depth > 0 and rng.random() < 0.25):
        nodes["modes"][at], nodes["values"][at] = "LEAF", 0.0
        _vote(rng, case, tree, node_id, weights)
        return node_id
    nodes["modes"][at] = str(rng.choice(case.modes))
    nodes["featureids"][at] = int(rng.integers(n_features))
    nodes["values"][at] = float(rng.choice(GRID))
    nodes["missing_value_tracks_true"][at] = int(rng.random() < 0.5)
    nodes["truenodeids"][at] = _grow(rng, case, tree, nodes, weights, depth + 1, max_depth,
                                     n_features)  # fmt: skip
    nodes["falsenodeids"][at] = _grow(rng, case, tree, nodes, weights, depth + 1, max_depth,
                                      n_features)  # fmt: skip
    return node_id


def _vote(rng: np.random.Generator, case: Case, tree: int, node_id: int, weights: dict) -> None:
    if case.targets == 2 and case.operator == "TreeEnsembleClassifier":
        targets = [0]  # a two-class ensemble scores the positive class only
    elif case.votes == "all":
        targets = list(range(case.targets))
    else:
        targets = [int(rng.integers(case.targets))]
    for target in targets:
        value = rng.random() if case.positive_only else rng.normal(0, 1)
        weights["treeids"].append(tree)
        weights["nodeids"].append(node_id)
        weights["ids"].append(target)
        weights["weights"].append(float(value))


def _operator_attributes(case: Case, nodes: dict, weights: dict) -> dict[str, Any]:
    prefix = "class" if case.operator == "TreeEnsembleClassifier" else "target"
    attributes: dict[str, Any] = {f"nodes_{k}": v for k, v in nodes.items() if k != "values"}
    attributes |= {f"{prefix}_{k}": v for k, v in weights.items() if k != "weights"}
    numbers = {"nodes_values": nodes["values"], f"{prefix}_weights": weights["weights"]}
    if case.base_values:
        numbers["base_values"] = case.base_values
    for name, values in numbers.items():
        if case.doubles:
            attributes[f"{name}_as_tensor"] = helper.make_tensor(
                f"{name}_as_tensor", TensorProto.DOUBLE, [len(values)], values
            )
        else:
            attributes[name] = values
    attributes["post_transform"] = case.post_transform
    if prefix == "target":
        attributes |= {"n_targets": case.targets, "aggregate_function": case.aggregate}
    elif case.labels == "text":
        attributes["classlabels_strings"] = [f"class {i}" for i in range(case.targets)]
    else:
        attributes["classlabels_int64s"] = [3 * i + 1 for i in range(case.targets)]
    return attributes


def rows(n: int, n_features: int, x_type: int, seed: int) -> np.ndarray:
    """Values on the thresholds, next to them and between them, a tenth of them missing."""
    rng = np.random.default_rng(seed)
    values = rng.choice(GRID, (n, n_features)) + rng.choice(
        [0, 0, 1e-9, -1e-9, 0.4], (n, n_features)
    )
    values[rng.random((n, n_features)) < 0.1] = np.nan
    return values.astype(np.float32 if x_type == TensorProto.FLOAT else np.float64)


def whole_graph(graph: bytes, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"X_in": x}))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_generated_ensemble_answers_through_the_kernel_as_onnx_runtime_does(name, seed) -> None:
    case = CASES[name]
    graph = ensemble(case, seed)
    exported = packaging.export_forest(graph, seed=seed)
    assert exported.archive is not None, exported.note
    assert exported.note.startswith("12 trees")
    assert packaging.export_forest(graph, seed=seed).archive == exported.archive  # no clock
    path = forest.TreePath(exported.archive, session_options())
    x = rows(3000, 5, case.x_type, seed)
    expected = whole_graph(graph, x)
    # Trees of at most 64 leaves: both ways, walked and QuickScorer's (where AVX2 is).
    assert path.trees.quickscorer == forest.quickscorer_here()
    for quickscorer in (False, True)[: 1 + path.trees.quickscorer]:
        got = path.run({"X_in": x}, quickscorer)
        for want, have in zip(expected, got, strict=True):
            assert want.dtype == have.dtype or want.dtype.kind == have.dtype.kind == "O"
            np.testing.assert_array_equal(want, have)


@pytest.mark.parametrize(
    ("case", "why"),
    [
        (Case("TreeEnsembleRegressor", 1, modes=("BRANCH_EQ", "BRANCH_LEQ")), "node modes"),
        (Case("TreeEnsembleRegressor", 1, aggregate="MAX"), "aggregate_function MAX"),
        (Case("TreeEnsembleClassifier", 3, post_transform="PROBIT"), "post_transform PROBIT"),
    ],
    ids=["equality-splits", "max", "probit"],
)
def test_what_the_kernel_does_not_take_is_named_and_left_to_onnx_runtime(case, why) -> None:
    exported = packaging.export_forest(ensemble(case, seed=0))
    assert exported.archive is None
    assert why in exported.describe() and "not used" in exported.describe()


def test_a_graph_without_trees_gets_no_forest() -> None:
    x = helper.make_tensor_value_info("X", TensorProto.DOUBLE, [None, 2])
    y = helper.make_tensor_value_info("Y", TensorProto.DOUBLE, [None, 2])
    graph = helper.make_graph([helper.make_node("Abs", ["X"], ["Y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    exported = packaging.export_forest(model.SerializeToString())
    assert exported.archive is None and "no tree ensemble" in exported.note


def test_the_packaging_proof_catches_a_planted_bug(monkeypatch) -> None:
    """One node sending rows the wrong way must fail the proof: it has teeth."""
    flatten = packaging._flatten

    def planted(attributes: dict, operator: str, in_float32: bool) -> tuple[dict, dict]:
        arrays, finish = flatten(attributes, operator, in_float32)
        arrays["nodes"]["next"][0, [0, 1]] = arrays["nodes"]["next"][0, [1, 0]]
        return arrays, finish

    monkeypatch.setattr(packaging, "_flatten", planted)
    exported = packaging.export_forest(ensemble(CASES["multiclass-softmax"], seed=1))
    assert exported.archive is None and "differ from ONNX Runtime" in exported.note


def _stored(archive: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(archive)) as stored:
        return {name: stored[name] for name in stored.files}


def test_inconsistent_trees_are_refused_before_the_kernel_reads_them() -> None:
    exported = packaging.export_forest(ensemble(CASES["regressor-sum-base"], seed=1))
    assert exported.archive is not None
    arrays = _stored(exported.archive)
    finish = json.loads(arrays["meta"].tobytes())["finish"]
    trees = forest.Trees(finish=finish, **{k: arrays[k] for k in forest.ARRAYS})
    with pytest.raises(forest.ForestMismatch, match="1 input columns; the trees read 5"):
        trees.sums(np.zeros((3, 1)))
    arrays["nodes"]["next"][0, 0] = 10**6  # past every node and leaf
    with pytest.raises(forest.ForestMismatch, match="inconsistent"):
        forest.TreePath(packaging._npz(arrays), session_options())
    older = {**arrays, "meta": packaging._bytes_array(json.dumps({"finish": finish}).encode())}
    with pytest.raises(forest.ForestMismatch, match="another format"):
        forest.TreePath(packaging._npz(older), session_options())


@pytest.fixture(scope="module")
def forest_bundle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random forest's sealed bundle, through the same build the pipeline runs."""
    supported = next(s for s in estimators.MATRIX if s.name == "RandomForestClassifier")
    spec = spec_for(supported, "binary_classification")
    splits = splits_for(spec)
    trained = fit_and_evaluate(spec, splits)
    folder = tmp_path_factory.mktemp("forest")
    key = load_or_create_key(folder / "signing.pem")
    built = build_bundle(spec, trained.model, splits.eval, folder, key, {"model_version": "1"})
    keys = parse_public_keys(public_key_text(key.public_key()))
    return verify(built.path, keys), splits.eval.loc[:, spec.feature_names]


def _feeds(runtime: Runtime, frame: Any, n: int) -> dict[str, np.ndarray]:
    many = frame.sample(n, replace=True, random_state=0)
    return codecs.to_feeds(frame_columns(many), runtime.columns, max_rows=n)[0]


def test_a_forest_bundle_serves_large_batches_through_the_kernel(forest_bundle) -> None:
    bundle, frame = forest_bundle
    assert bundle.holds(forest.BUNDLE_FILE)
    assert bundle.read_json("metadata.json")["tree_kernel"].startswith("15 trees")
    runtime = Runtime(bundle)
    feeds = _feeds(runtime, frame, runtime_module.TREE_ROWS)
    runtime.check_trees(feeds)
    assert runtime.trees is not None and runtime._runner(len(feeds["a_b"])) == runtime.trees.run
    assert runtime._runner(runtime_module.TREE_ROWS - 1) == runtime._run_session
    for want, have in zip(runtime._run_session(feeds), runtime.trees.run(feeds), strict=True):
        np.testing.assert_array_equal(want, have)


def test_a_kernel_that_answers_otherwise_at_load_is_not_used(forest_bundle, monkeypatch) -> None:
    bundle, frame = forest_bundle
    runtime = Runtime(bundle)
    assert runtime.trees is not None
    runtime.trees.trees.weight_value[:] += 1e-3  # what a miscompiled kernel would answer
    feeds = _feeds(runtime, frame, 5)
    runtime.check_trees(feeds)
    assert runtime.trees is None
    assert runtime.predict(_feeds(runtime, frame, 300)).values.shape == (300,)


def test_large_trees_are_walked_and_small_ones_too_without_avx2(forest_bundle, monkeypatch):
    bundle, _ = forest_bundle
    runtime = Runtime(bundle)
    assert runtime.trees is not None and not runtime.trees.trees.quickscorer  # > 64 leaves
    small = packaging.export_forest(ensemble(CASES["binary-logistic"], seed=1)).archive
    assert small is not None
    monkeypatch.setattr(forest, "_has_avx2", lambda library: False)
    assert not forest.TreePath(small, session_options()).trees.quickscorer
    # Packed where AVX2 is missing, the QuickScorer layout is left out: nobody proved it.
    unproven = packaging.export_forest(ensemble(CASES["binary-logistic"], seed=1)).archive
    monkeypatch.undo()
    assert unproven is not None
    assert not forest.TreePath(unproven, session_options()).trees.quickscorer


def test_without_the_kernel_onnx_runtime_serves_everything(forest_bundle, monkeypatch) -> None:
    bundle, frame = forest_bundle
    monkeypatch.setattr(forest, "kernel", lambda: None)
    runtime = Runtime(bundle)
    assert runtime.trees is None
    assert runtime.predict(_feeds(runtime, frame, 300)).values.shape == (300,)
    exported = packaging.export_forest(bundle.read_bytes("model.onnx"))
    assert exported.archive is None and "not built on this machine" in exported.note


def test_a_forest_file_of_another_format_is_served_by_onnx_runtime(forest_bundle, monkeypatch):
    bundle, frame = forest_bundle
    monkeypatch.setattr(forest, "FORMAT", forest.FORMAT + 1)  # as a later modelyard would read it
    runtime = Runtime(bundle)
    assert runtime.trees is None
    assert runtime.predict(_feeds(runtime, frame, 300)).values.shape == (300,)
