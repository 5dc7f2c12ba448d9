"""ONNX Runtime session for a verified bundle, tuned for many small requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from modelyard.bundle import VerifiedBundle


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "numeric" | "categorical"
    nullable: bool
    categories: frozenset[str] | None


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
        self.columns = [
            Column(
                name=c["name"],
                kind=c["type"],
                nullable=c["nullable"],
                categories=frozenset(c["categories"]) if c.get("categories") else None,
            )
            for c in self.schema["inputs"]
        ]
        self.session = ort.InferenceSession(
            str(bundle.path / "model.onnx"), _session_options(), providers=["CPUExecutionProvider"]
        )

    @property
    def name(self) -> str:
        return self.metadata["model_name"]

    @property
    def version(self) -> str:
        return str(self.metadata["model_version"])

    def predict(self, feeds: dict[str, np.ndarray]) -> Prediction:
        """`feeds`: an (n, 1) array per input: float32 for numeric, str objects for categorical."""
        outputs = self.session.run(None, feeds)
        if self.task == "regression":
            return Prediction(values=outputs[0].reshape(-1).astype(np.float64), probabilities=None)
        probabilities = outputs[1][:, 1].astype(np.float64)
        return Prediction(
            values=outputs[0].reshape(-1).astype(np.int64), probabilities=probabilities
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
