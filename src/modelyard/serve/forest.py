"""Large batches of a tree-ensemble model through modelyard's own tree kernel.

ONNX Runtime's TreeEnsemble operator walks each row through every tree with a branch per node;
for a 10,000-row request to a forest that is most of the answer's time. A bundle whose graph
has one such operator also carries `forest.npz` (made by modelyard.package.forest): the graph
cut in two around the operator (the part before it, the part after it) and the operator's
trees as flat arrays. Here the part before runs in ONNX Runtime, the trees in the kernel
(`_forest.c`, compiled when modelyard is built, loaded with ctypes), the operator's last step
(base values, averaging, the post transform, the label) in numpy and the kernel's float32
transforms, as ONNX Runtime takes it, and the part after in ONNX Runtime again. Packaging
proved all of it bit for bit against ONNX Runtime's operator on inputs at every threshold;
loading checks it again on the bundle's example rows. Without the kernel (no C compiler where
modelyard was built, another architecture) the whole graph runs in ONNX Runtime, as for any
other model.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

BUNDLE_FILE = "forest.npz"
FORMAT = 2  # of forest.npz: a bundle with another is served by ONNX Runtime alone
ABI = 2  # _forest.c's modelyard_forest_abi(): the layout of NODE below
# A node as the kernel reads it: `x <= threshold` goes to next[0], a larger x to next[1], a
# missing value to next[2]; nodes past the internal ones are leaves, which lead to themselves.
NODE = np.dtype([("threshold", "<f8"), ("feature", "<i4"), ("next", "<i4", (3,))])
# forest.npz's arrays besides `meta`, `before` and `after` (see Trees).
ARRAYS = (
    *("nodes", "roots", "first_steps", "weight_start", "weight_target", "weight_value"),
    *("qs_start", "qs_threshold", "qs_tree", "qs_left", "qs_leaf_base", "qs_leaves"),
)
_KERNEL_FILE = Path(__file__).with_name("_forest.so")
_POINTER = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32


class ForestMismatch(RuntimeError):
    """The kernel's answer differs from ONNX Runtime's: the bundle is served by ONNX Runtime."""


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (said once in the log) where it cannot be loaded."""
    try:
        library = ctypes.CDLL(str(_KERNEL_FILE))
    except OSError as exc:
        log.info("tree kernel unavailable (%s): tree ensembles run in ONNX Runtime alone", exc)
        return None
    library.modelyard_forest_abi.restype = _I32
    if library.modelyard_forest_abi() != ABI:
        log.warning("tree kernel %s is of another build: not used", _KERNEL_FILE)
        return None
    library.modelyard_forest_scores.restype = None
    library.modelyard_forest_scores.argtypes = [
        _POINTER, _I64, _I64, _POINTER, _I32, _POINTER, _POINTER, _I64, _POINTER, _POINTER,
        _POINTER, _I64, _I32, _POINTER, _POINTER,
    ]  # fmt: skip
    library.modelyard_forest_has_avx2.restype = _I32
    library.modelyard_forest_qs_scores.restype = None
    library.modelyard_forest_qs_scores.argtypes = [
        _POINTER, _I64, _I64, _I64, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER, _POINTER,
        _I64, _POINTER, _POINTER, _POINTER, _I64, _I32, _POINTER, _POINTER, _POINTER, _POINTER,
        _POINTER,
    ]  # fmt: skip
    library.modelyard_forest_logistic.restype = None
    library.modelyard_forest_logistic.argtypes = [_POINTER, _I64]
    library.modelyard_forest_softmax.restype = None
    library.modelyard_forest_softmax.argtypes = [_POINTER, _I64, _I64]
    return library


@dataclass(frozen=True)
class Trees:
    """The operator's trees as the kernel reads them, and how it finishes the sums."""

    nodes: np.ndarray  # NODE: the internal nodes, then the leaves (which lead to themselves)
    roots: np.ndarray  # int32: each tree's first node
    first_steps: np.ndarray  # int32: steps taken before the kernel checks for leaves
    weight_start: np.ndarray  # int64, one more than leaves: each leaf's slice of the two below
    weight_target: np.ndarray  # int32: the class or target a leaf weight adds to
    weight_value: np.ndarray  # float64
    finish: dict[str, Any]  # see `finish`
    # The QuickScorer layout (_forest.c), empty when a tree has more than 64 leaves: the nodes
    # by feature, missing values' side and threshold (`qs_start` delimits them), each with its
    # tree and the bit mask of its left subtree's leaves; each tree's leaves, left to right.
    qs_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    qs_threshold: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    qs_tree: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    qs_left: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    qs_leaf_base: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    qs_leaves: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self) -> None:
        """The kernel trusts its arrays: any index out of range would read outside them."""
        ends = len(self.nodes)
        starts = self.weight_start
        if not (
            0 <= self.n_internal <= ends
            and ((self.nodes["next"] >= 0) & (self.nodes["next"] < ends)).all()
            and ((self.roots >= 0) & (self.roots < ends)).all()
            and (self.nodes["feature"] >= 0).all()
            and len(self.first_steps) == len(self.roots)
            and starts[0] == 0
            and (np.diff(starts) >= 0).all()
            and starts[-1] == len(self.weight_target) == len(self.weight_value)
            and ((self.weight_target >= 0) & (self.weight_target < self.n_targets)).all()
            and self._quickscorer_consistent()
        ):
            raise ForestMismatch("forest.npz's trees are inconsistent")

    def _quickscorer_consistent(self) -> bool:
        if not self.qs_leaves.size:
            return True
        leaves = len(self.weight_start) - 1
        return bool(
            len(self.qs_start) == 2 * self.n_features + 1
            and self.qs_start[0] == 0
            and (np.diff(self.qs_start) >= 0).all()
            and self.qs_start[-1] == len(self.qs_threshold) == len(self.qs_tree)
            and len(self.qs_left) == len(self.qs_tree)
            and ((self.qs_tree >= 0) & (self.qs_tree < len(self.roots))).all()
            and len(self.qs_leaf_base) == len(self.roots) + 1
            and (np.diff(self.qs_leaf_base) > 0).all()
            and (np.diff(self.qs_leaf_base) <= 64).all()
            and self.qs_leaf_base[-1] == len(self.qs_leaves)
            and ((self.qs_leaves >= 0) & (self.qs_leaves < leaves)).all()
        )

    @functools.cached_property
    def _tree_targets(self) -> list[int] | None:
        """With one weight per leaf and one target per tree (boosting), each tree's target;
        else None."""
        if not (np.diff(self.weight_start) == 1).all():
            return None
        targets = self.weight_target[self.weight_start[:-1]]  # each leaf's
        per_tree = [set(targets[self._leaves(root)].tolist()) for root in self.roots.tolist()]
        if any(len(found) != 1 for found in per_tree):
            return None
        return [found.pop() for found in per_tree]

    def _leaves(self, root: int) -> np.ndarray:
        """A tree's leaves, as indexes of `weight_start`."""
        return np.asarray(leaves_under(self.nodes, self.n_internal, root)) - self.n_internal

    def _has(self, marked: np.ndarray) -> np.ndarray:
        """Which targets got a weight: the kernel marks them, but where every tree has one
        target every row has the same ones (QuickScorer's direct look-up marks none)."""
        if self._tree_targets is not None:
            marked[:, self._tree_targets] = 1
        return marked

    @functools.cached_property
    def _direct(self) -> tuple[np.ndarray, np.ndarray] | None:
        """For QuickScorer with one weight per leaf and one target per tree: each leaf
        position's weight and each tree's target, looked up without the weights' index."""
        if self._tree_targets is None:
            return None
        leaf_weight = self.weight_value[self.weight_start[:-1]]
        return (
            np.ascontiguousarray(leaf_weight[self.qs_leaves], dtype=np.float64),
            np.asarray(self._tree_targets, dtype=np.int32),
        )

    @property
    def quickscorer(self) -> bool:
        """Whether `sums` takes the QuickScorer way: the trees are small enough and this CPU
        has AVX2."""
        return bool(self.qs_leaves.size) and quickscorer_here()

    @property
    def n_internal(self) -> int:
        return len(self.nodes) - (len(self.weight_start) - 1)  # the rest are leaves

    @property
    def n_targets(self) -> int:
        return int(self.finish["n_targets"])

    @property
    def n_features(self) -> int:
        """The columns an input needs: one past the highest feature a node reads."""
        return features_read(self.nodes, self.n_internal)

    def sums(self, x: np.ndarray, quickscorer: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per row and target: the sum of the leaf weights reached (in the operator's
        precision), and whether any leaf gave that target a weight. `quickscorer`: which way
        (both answer the same bit for bit); by default the faster one this machine can take."""
        library = _library()
        x = np.ascontiguousarray(x, dtype=np.float64)
        rows, features = x.shape
        if features < self.n_features:
            raise ForestMismatch(f"{features} input columns; the trees read {self.n_features}")
        scores = np.zeros((rows, self.n_targets), dtype=np.float64)
        has = np.zeros((rows, self.n_targets), dtype=np.uint8)
        if self.quickscorer if quickscorer is None else quickscorer:
            masks = np.empty(len(self.roots) * 8, dtype=np.uint64)
            library.modelyard_forest_qs_scores(
                x.ctypes.data, rows, features, self.n_features, self.qs_start.ctypes.data,
                self.qs_threshold.ctypes.data, self.qs_tree.ctypes.data,
                self.qs_left.ctypes.data, self.qs_leaf_base.ctypes.data,
                self.qs_leaves.ctypes.data, len(self.roots), self.weight_start.ctypes.data,
                self.weight_target.ctypes.data, self.weight_value.ctypes.data, self.n_targets,
                int(self.finish["in_float32"]),
                *((a.ctypes.data for a in self._direct) if self._direct else (None, None)),
                scores.ctypes.data, has.ctypes.data, masks.ctypes.data,
            )  # fmt: skip
            return scores, self._has(has)
        library.modelyard_forest_scores(
            x.ctypes.data, rows, features, self.nodes.ctypes.data, self.n_internal,
            self.roots.ctypes.data, self.first_steps.ctypes.data, len(self.roots),
            self.weight_start.ctypes.data, self.weight_target.ctypes.data,
            self.weight_value.ctypes.data, self.n_targets, int(self.finish["in_float32"]),
            scores.ctypes.data, has.ctypes.data,
        )  # fmt: skip
        return scores, has

    def outputs(self, x: np.ndarray, quickscorer: bool | None = None) -> list[np.ndarray]:
        """What the operator outputs for `x`: [labels, probabilities] or [values]."""
        scores, has = self.sums(x, quickscorer)
        return finish(scores, has, self.finish)


def leaves_under(nodes: np.ndarray, n_internal: int, node: int) -> list[int]:
    """The leaves under `node` (itself, if a leaf), left to right: the `x <= threshold` side
    first."""
    found, pending = [], [node]
    while pending:
        at = pending.pop()
        if at >= n_internal:
            found.append(at)
        else:
            pending += [int(nodes["next"][at, 1]), int(nodes["next"][at, 0])]
    return found


def finish(scores: np.ndarray, has: np.ndarray, how: Mapping[str, Any]) -> list[np.ndarray]:
    """The TreeEnsemble operator's last step, as ONNX Runtime takes it (its
    tree_ensemble_aggregator.h), for the cases modelyard.package.forest accepts."""
    number: Any = np.float32 if how["in_float32"] else np.float64
    sums: Any = scores.astype(number)
    base: Any = np.asarray(how["base_values"], dtype=number)
    if how["operator"] == "TreeEnsembleRegressor":
        if how["aggregate"] == "AVERAGE":
            sums = sums / number(how["n_trees"])
        return [(sums + base if base.size else sums).astype(np.float32)]
    texts = any(isinstance(label, str) for label in how["labels"])
    labels = np.asarray(how["labels"], dtype=object if texts else np.int64)
    if how["binary"]:
        score = sums[:, 0] + base[0] if base.size else sums[:, 0]
        positive, probabilities = _binary(score, how)
        return [labels[positive.astype(np.intp)], probabilities]
    if base.size:
        sums = sums + base
        has = has | (np.arange(sums.shape[1]) < base.size)
    chosen = np.where(has.astype(bool), sums, -np.inf).argmax(axis=1)  # the first of equals
    return [labels[chosen], _transform(sums, how["post_transform"]).astype(np.float32)]


def _binary(score: Any, how: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A two-class ensemble's one score per row (the positive class's): which rows are
    positive, and the two probability columns."""
    if how["positive_weights"]:  # votes: the score is the positive class's share
        positive = score > 0.5
        columns = [1 - score, score]
    elif how["post_transform"] == "LOGISTIC":
        positive = score > 0
        columns = [_logistic(-score), _logistic(score)]
    else:  # margins, winning or not
        positive = score > 0
        columns = [-score, score]
    return positive, np.stack(columns, axis=1).astype(np.float32)


@functools.cache
def _has_avx2(library: ctypes.CDLL) -> bool:
    return bool(library.modelyard_forest_has_avx2())


def features_read(nodes: np.ndarray, n_internal: int) -> int:
    """One past the highest feature the internal nodes read (the leaves read none)."""
    return int(nodes["feature"][:n_internal].max(initial=-1)) + 1


def quickscorer_here() -> bool:
    """Whether this machine can take the QuickScorer way (the kernel, and AVX2)."""
    library = kernel()
    return library is not None and _has_avx2(library)


def _logistic(values: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(values, dtype=np.float32).copy()
    _library().modelyard_forest_logistic(out.ctypes.data, out.size)
    return out


def _transform(sums: np.ndarray, post_transform: str) -> np.ndarray:
    if post_transform == "LOGISTIC":
        return _logistic(sums)
    if post_transform == "SOFTMAX":
        out = np.ascontiguousarray(sums, dtype=np.float32).copy()
        _library().modelyard_forest_softmax(out.ctypes.data, *out.shape)
        return out
    return sums


def _library() -> ctypes.CDLL:
    library = kernel()
    if library is None:
        raise ForestMismatch("the tree kernel is not available")
    return library


class TreePath:
    """A bundle's graph with its TreeEnsemble operator evaluated by the kernel: `run` answers
    as `session.run(None, feeds)` does."""

    def __init__(self, archive: bytes, options: Any) -> None:
        with np.load(io.BytesIO(archive), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        if meta.get("format") != FORMAT or set(arrays) != {*ARRAYS, "before", "after"}:
            raise ForestMismatch(f"{BUNDLE_FILE} is of another format than {FORMAT}")
        self.tree_input: str = meta["tree_input"]
        self.tree_outputs: list[str] = meta["tree_outputs"]
        self.model_outputs: list[str] = meta["model_outputs"]
        self.before = _session(arrays.pop("before"), options)
        after = arrays.pop("after")
        self.after = _session(after, options) if after.size else None
        self._after_io = (
            ([i.name for i in self.after.get_inputs()], [o.name for o in self.after.get_outputs()])
            if self.after is not None
            else ([], [])
        )
        self.trees = Trees(finish=meta["finish"], **arrays)

    def run(
        self, feeds: Mapping[str, np.ndarray], quickscorer: bool | None = None
    ) -> list[np.ndarray]:
        (x,) = self.before.run([self.tree_input], dict(feeds))
        produced = dict(zip(self.tree_outputs, self.trees.outputs(x, quickscorer), strict=True))
        if self.after is not None:
            wanted, gives = self._after_io
            finals = self.after.run(None, {name: produced[name] for name in wanted})
            produced.update(zip(gives, finals, strict=True))
        return [produced[name] for name in self.model_outputs]


def _session(graph: np.ndarray, options: Any) -> ort.InferenceSession:
    return ort.InferenceSession(graph.tobytes(), options, providers=["CPUExecutionProvider"])


def same_answers(expected: list[np.ndarray], got: list[np.ndarray]) -> bool:
    """The same outputs, bit for bit: a row's answer must not depend on the batch it came in."""
    return all(
        want.shape == have.shape and np.array_equal(want, have, equal_nan=want.dtype.kind == "f")
        for want, have in zip(expected, got, strict=True)
    )
