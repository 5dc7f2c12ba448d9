"""ONNX Runtime session for a verified bundle, tuned for many small requests."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from modelyard.manifest import VerifiedBundle
from modelyard.serve import forest
from modelyard.values import category_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Column:
    name: str  # as requests name it: the dataset's column name, whatever characters it has
    kind: str  # "numeric" | "categorical"
    nullable: bool
    categories: frozenset[str] | None
    onnx_name: str = ""  # the graph input it feeds (ONNX names are sanitised); "" means `name`
    number_type: Any = np.float32  # a numeric input's element type, as the graph declares it

    # Cached: read for every column of every batch.
    @functools.cached_property
    def feed(self) -> str:
        return self.onnx_name or self.name

    @functools.cached_property
    def dtype(self) -> Any:
        return self.number_type if self.kind == "numeric" else object


class Prediction(NamedTuple):
    """Values as the model's users expect them: a number (regression) or a label (0/1 for a
    binary classifier; a multiclass model's own labels, text or integers), and the probabilities
    of classifiers: the positive class's (binary), or a row per row with a column per class
    (multiclass). A NamedTuple: one is made per request."""

    values: np.ndarray
    probabilities: np.ndarray | None

    @property
    def scores(self) -> np.ndarray:
        """One number per row for the prediction histogram: the value, the positive class's
        probability, or a multiclass model's confidence (its top probability)."""
        if self.probabilities is None:
            return self.values
        return self.probabilities if self.probabilities.ndim == 1 else self.probabilities.max(1)

    @property
    def drift_values(self) -> np.ndarray | list[str]:
        """What the prediction drift bins count: the scores, or a multiclass model's labels."""
        if self.probabilities is not None and self.probabilities.ndim == 2:
            labels = self.values.tolist()
            texts = {label: category_text(label) for label in set(labels)}  # a few classes
            return [texts[label] for label in labels]
        return self.scores


class Runtime:
    def __init__(self, bundle: VerifiedBundle) -> None:
        self.schema = bundle.read_json("schema.json")
        self.metadata = bundle.read_json("metadata.json")
        self.digest = bundle.digest
        self.task: str = self.schema["task"]
        # From memory: an encrypted bundle's model exists decrypted nowhere else.
        self.session = ort.InferenceSession(
            bundle.read_bytes("model.onnx"), session_options(), providers=["CPUExecutionProvider"]
        )
        # A tree ensemble's large batches go through modelyard's tree kernel (serve.forest).
        self.trees = _tree_path(bundle)
        # Named, not None: ONNX Runtime would list the graph's outputs again on every run.
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._session_run = _direct_run(self.session)
        graph_types = {i.name: i.type for i in self.session.get_inputs()}
        self.columns = [_column(entry, graph_types) for entry in self.schema["inputs"]]
        # A classifier's labels in the order of its probability columns.
        self.classes: list[Any] | None = (
            None if self.task == "regression" else self.schema.get("classes", [0, 1])
        )

    @property
    def label_datatype(self) -> str:
        """The V2 datatype of `predict`: numbers, integer labels or text labels."""
        if self.classes is None:
            return "FP64"
        return "INT64" if all(isinstance(c, int) for c in self.classes) else "BYTES"

    @property
    def name(self) -> str:
        return self.metadata["model_name"]

    @property
    def version(self) -> str:
        return str(self.metadata["model_version"])

    def predict(self, feeds: dict[str, np.ndarray]) -> Prediction:
        """`feeds`: an (n, 1) array per graph input: numbers as the graph declares them (float64
        in current bundles, float32 in older ones), str objects for categorical."""
        outputs = self._outputs(feeds)  # new arrays: converted in place where they already fit
        if self.task == "regression":
            values = outputs[0].reshape(-1).astype(np.float64, copy=False)
            return Prediction(values=values, probabilities=None)
        labels, probabilities = outputs[0].reshape(-1), outputs[1].astype(np.float64, copy=False)
        if self.task == "binary_classification":
            labels = labels.astype(np.int64, copy=False)
            return Prediction(values=labels, probabilities=probabilities[:, 1])
        return Prediction(values=labels, probabilities=probabilities)

    def check_trees(self, feeds: dict[str, np.ndarray]) -> None:
        """Serve large batches through the tree kernel only if it answers `feeds` (the bundle's
        example) bit for bit as ONNX Runtime does; packaging proved it more widely."""
        if self.trees is None:
            return
        tiled = _tiled(feeds, TREE_ROWS)
        expected = list(self.session.run(None, tiled))
        if not forest.same_answers(expected, self.trees.run(tiled)):
            log.warning("the tree kernel's answers differ from ONNX Runtime's: not used")
            self.trees = None

    def _outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs; a batch of 2 × `PART_ROWS` rows or more runs in parts, one
        per core, side by side."""
        rows = len(next(iter(feeds.values())))
        run = self._runner(rows)
        parts = min(_CORES, rows // PART_ROWS)
        if parts < 2:
            return run(feeds)
        cuts = np.linspace(0, rows, parts + 1, dtype=int).tolist()
        pieces = [{k: v[a:b] for k, v in feeds.items()} for a, b in pairwise(cuts)]
        later = [_parts_pool().submit(run, piece) for piece in pieces[1:]]
        answered = [run(pieces[0]), *(f.result() for f in later)]
        return [np.concatenate(output) for output in zip(*answered, strict=True)]

    def _runner(self, rows: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
        if self.trees is not None and rows >= TREE_ROWS:
            return self.trees.run
        return self._run_session

    def _run_session(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session_run(self._output_names, feeds, None))


# The session has one thread, so a one-row request pays no thread hand-offs, but a large batch
# (a 10,000-row request, a batch-scoring chunk) would then use one core. `run` releases the GIL
# and may be called from several threads, so such a batch runs in parts on every core at once,
# on the same session: no second copy of the model in memory (a forest's 10,000 rows: 83 ms in
# one part, 40 ms in two on two cores). Rows are predicted independently, so the parts' outputs
# put back in order are the whole batch's.
PART_ROWS = 1024
# From this many rows a tree ensemble's batch goes through the tree kernel: below it, the three
# steps (the graph before the trees, the kernel, the graph after) cost more than they save.
TREE_ROWS = 128
_CORES = os.cpu_count() or 1  # as the server counts them for its default number of workers


@functools.cache
def _parts_pool() -> ThreadPoolExecutor:
    """Threads for a large batch's other parts (the caller's thread runs the first), made at
    first use: in a serving worker, after the fork."""
    return ThreadPoolExecutor(max_workers=max(_CORES - 1, 1), thread_name_prefix="onnx-part")


def _tree_path(bundle: VerifiedBundle) -> forest.TreePath | None:
    if not bundle.holds(forest.BUNDLE_FILE) or forest.kernel() is None:
        return None
    try:
        return forest.TreePath(bundle.read_bytes(forest.BUNDLE_FILE), session_options())
    except forest.ForestMismatch as exc:
        log.warning("%s: large batches run in ONNX Runtime", exc)
        return None


def _direct_run(session: ort.InferenceSession) -> Callable[..., list[np.ndarray]]:
    """The session's compiled `run`, without the Python wrapper's checks on every call: that
    every input is fed and no OrtValue belongs to another session (our feeds are numpy arrays
    for every input, by construction), which cost 2-3 µs of a one-row batch's 13. The compiled
    run checks the feeds again itself. The wrapper where a release has no `_sess`."""
    compiled = getattr(session, "_sess", None)
    run = getattr(compiled, "run", None)
    return run if callable(run) else session.run


_NUMBER_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}


def _column(entry: dict[str, Any], graph_types: dict[str, str]) -> Column:
    feed = entry.get("onnx_name", entry["name"])  # older bundles named inputs as columns
    return Column(
        name=entry["name"],
        kind=entry["type"],
        nullable=entry["nullable"],
        categories=frozenset(entry["categories"]) if entry.get("categories") else None,
        onnx_name=feed,
        number_type=_NUMBER_TYPES.get(graph_types.get(feed, ""), np.float32),
    )


def session_options() -> Any:
    options = ort.SessionOptions()
    # One thread per request, no spinning: the server runs one process per core, and spinning
    # threads would steal the core from the event loop between requests.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


# What a row costs the model, measured at start (ServingApp._warm_up): the example tiled to
# COST_ROWS rows, so a run's fixed cost weighs little, timed up to COST_RUNS times or until
# COST_BUDGET_S of CPU is spent (a heavy model's start is not held up for long).
COST_ROWS = 128
COST_RUNS = 20
COST_BUDGET_S = 0.25


def row_cost(runtime: Runtime, feeds: dict[str, np.ndarray]) -> float:
    """CPU seconds one row of `feeds` costs the model: the fastest run, on this thread's CPU
    clock. ONNX Runtime computes on the calling thread (one intra-op thread), so time spent
    waiting for a core that other processes hold is not counted: two versions measured on a
    busy host compare as they would on an idle one, which their p99 does not."""
    tiled = _tiled(feeds, COST_ROWS)
    fastest, spent = float("inf"), 0.0
    for _ in range(COST_RUNS):
        started = time.thread_time()
        runtime.predict(tiled)
        took = time.thread_time() - started
        fastest, spent = min(fastest, took), spent + took
        if spent > COST_BUDGET_S:
            break
    return fastest / COST_ROWS


def _tiled(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`feeds` repeated to `rows` rows."""
    repeats = -(-rows // len(next(iter(feeds.values()))))
    return {name: np.concatenate([feed] * repeats)[:rows] for name, feed in feeds.items()}
