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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

BUNDLE_FILE = "forest.npz"
FORMAT = 1  # of forest.npz: a bundle with another is served by ONNX Runtime alone
ABI = 1  # _forest.c's modelyard_forest_abi(): the layout of NODE below
# A node as the kernel reads it: `x <= threshold` goes to next[0], a larger x to next[1], a
# missing value to next[2]; nodes past the internal ones are leaves, which lead to themselves.
NODE = np.dtype([("threshold", "<f8"), ("feature", "<i4"), ("next", "<i4", (3,))])
# forest.npz's arrays besides `meta`, `before` and `after` (see Trees).
ARRAYS = ("nodes", "roots", "first_steps", "weight_start", "weight_target", "weight_value")
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
        ):
            raise ForestMismatch("forest.npz's trees are inconsistent")

    @property
    def n_internal(self) -> int:
        return len(self.nodes) - (len(self.weight_start) - 1)  # the rest are leaves

    @property
    def n_targets(self) -> int:
        return int(self.finish["n_targets"])

    @property
    def n_features(self) -> int:
        """The columns an input needs: one past the highest feature a node reads."""
        return int(self.nodes["feature"][: self.n_internal].max(initial=-1)) + 1

    def sums(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row and target: the sum of the leaf weights reached (in the operator's
        precision), and whether any leaf gave that target a weight."""
        library = _library()
        x = np.ascontiguousarray(x, dtype=np.float64)
        rows, features = x.shape
        if features < self.n_features:
            raise ForestMismatch(f"{features} input columns; the trees read {self.n_features}")
        scores = np.zeros((rows, self.n_targets), dtype=np.float64)
        has = np.zeros((rows, self.n_targets), dtype=np.uint8)
        library.modelyard_forest_scores(
            x.ctypes.data, rows, features, self.nodes.ctypes.data, self.n_internal,
            self.roots.ctypes.data, self.first_steps.ctypes.data, len(self.roots),
            self.weight_start.ctypes.data, self.weight_target.ctypes.data,
            self.weight_value.ctypes.data, self.n_targets, int(self.finish["in_float32"]),
            scores.ctypes.data, has.ctypes.data,
        )  # fmt: skip
        return scores, has

    def outputs(self, x: np.ndarray) -> list[np.ndarray]:
        """What the operator outputs for `x`: [labels, probabilities] or [values]."""
        scores, has = self.sums(x)
        return finish(scores, has, self.finish)


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
        self.trees = Trees(finish=meta["finish"], **arrays)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = self.before.run([self.tree_input], dict(feeds))
        produced = dict(zip(self.tree_outputs, self.trees.outputs(x), strict=True))
        if self.after is not None:
            wanted = [i.name for i in self.after.get_inputs()]
            finals = self.after.run(None, {name: produced[name] for name in wanted})
            produced.update(zip([o.name for o in self.after.get_outputs()], finals, strict=True))
        return [produced[name] for name in self.model_outputs]


def _session(graph: np.ndarray, options: Any) -> ort.InferenceSession:
    return ort.InferenceSession(graph.tobytes(), options, providers=["CPUExecutionProvider"])


def same_answers(expected: list[np.ndarray], got: list[np.ndarray]) -> bool:
    """The same outputs, bit for bit: a row's answer must not depend on the batch it came in."""
    return all(
        want.shape == have.shape and np.array_equal(want, have, equal_nan=want.dtype.kind == "f")
        for want, have in zip(expected, got, strict=True)
    )
