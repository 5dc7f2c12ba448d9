"""ONNX Runtime session for a verified bundle, tuned for many small requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from modelyard.bundle import VerifiedBundle


@dataclass(frozen=True)
class Column:
    name: str  # as requests name it: the dataset's column name, whatever characters it has
    kind: str  # "numeric" | "categorical"
    nullable: bool
    categories: frozenset[str] | None
    onnx_name: str = ""  # the graph input it feeds (ONNX names are sanitised); "" means `name`
    number_type: Any = np.float32  # a numeric input's element type, as the graph declares it

    @property
    def feed(self) -> str:
        return self.onnx_name or self.name

    @property
    def dtype(self) -> Any:
        return self.number_type if self.kind == "numeric" else object


class Prediction(NamedTuple):
    """Values as the model's users expect them: a number (regression) or a 0/1 label, and the
    positive-class probability for classifiers. A NamedTuple: one is made per request."""

    values: np.ndarray
    probabilities: np.ndarray | None


class Runtime:
    def __init__(self, bundle: VerifiedBundle) -> None:
        self.schema = bundle.read_json("schema.json")
        self.metadata = bundle.read_json("metadata.json")
        self.digest = bundle.digest
        self.task: str = self.schema["task"]
        self.session = ort.InferenceSession(
            str(bundle.path / "model.onnx"), _session_options(), providers=["CPUExecutionProvider"]
        )
        graph_types = {i.name: i.type for i in self.session.get_inputs()}
        self.columns = [_column(entry, graph_types) for entry in self.schema["inputs"]]

    @property
    def name(self) -> str:
        return self.metadata["model_name"]

    @property
    def version(self) -> str:
        return str(self.metadata["model_version"])

    def predict(self, feeds: dict[str, np.ndarray]) -> Prediction:
        """`feeds`: an (n, 1) array per graph input: numbers as the graph declares them (float64
        in current bundles, float32 in older ones), str objects for categorical."""
        outputs = self.session.run(None, feeds)
        if self.task == "regression":
            return Prediction(values=outputs[0].reshape(-1).astype(np.float64), probabilities=None)
        probabilities = outputs[1][:, 1].astype(np.float64)
        return Prediction(
            values=outputs[0].reshape(-1).astype(np.int64), probabilities=probabilities
        )


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


def _session_options() -> Any:
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
