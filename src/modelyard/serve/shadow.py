"""A shadow's comparison with the version that serves, on the very requests it is copied.

nginx copies a sample of live requests to the shadow's slot (marked `X-Modelyard-Shadow`) and
drops its answers. To judge how closely the shadow follows the serving version, the shadow
slot also loads the serving version's bundle (the *reference*) and predicts each copied request
with both, after its answer has gone. Pairing the two slots' answers by request instead would
need every worker of the serving slot to keep and hand out its answers, and would put work on
the slot clients depend on; the reference costs the shadow's slot alone, and ONNX Runtime is
deterministic, so the reference's answer is the serving slot's.

What is counted (Prometheus, per slot): rows compared, rows whose class agreed (classifiers),
the sum of |new - serving| (regressors), and rows the reference could not predict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from modelyard.serve import codecs
from modelyard.serve.codecs import ClientError
from modelyard.serve.runtime import Prediction, Runtime

log = logging.getLogger("modelyard.serve")
HEADER = b"x-modelyard-shadow"  # set by the front door on the copies it sends a shadow


@dataclass(frozen=True)
class Comparison:
    rows: int  # rows both versions predicted
    agreed: int  # of them, rows with the same class (classifiers; 0 for regressors)
    abs_diff: float  # sum of |new - serving| over them (regressors; 0.0 for classifiers)
    unpaired: int  # rows the reference could not predict (its schema refused the request)


class Reference:
    """The serving version's model, loaded beside the shadow's own."""

    def __init__(self, runtime: Runtime, max_rows: int) -> None:
        self.runtime = runtime
        self.max_rows = max_rows

    def compare(self, columns: codecs.Columns, rows: int, prediction: Prediction) -> Comparison:
        """The shadow's `prediction` of `rows` rows against the reference's on the same
        `columns` (decoded from the request)."""
        try:
            feeds, _ = codecs.to_feeds(columns, self.runtime.columns, self.max_rows)
        except ClientError as exc:  # e.g. the new version takes a column the old one lacks
            log.debug("the reference refused a copied request: %s", exc)
            return Comparison(0, 0, 0.0, rows)
        return compare(prediction, self.runtime.predict(feeds), self.runtime.classes is None)


class Comparer:
    """Compares copies off the event loop, on one thread of its own (ONNX Runtime releases the
    GIL while it predicts), so that a copy's comparison never delays the next copy's answer:
    the shadow's latency, which its analysis judges against the baseline's, is its own. At
    most `backlog` wait; beyond that a copy is counted unpaired instead of queued."""

    def __init__(
        self, reference: Reference, record: Callable[[Comparison], None], backlog: int = 256
    ) -> None:
        self.reference, self.record, self.backlog = reference, record, backlog
        self._pending = 0
        self._executor: ThreadPoolExecutor | None = None  # made in the worker, after any fork

    def submit(self, columns: codecs.Columns, rows: int, prediction: Prediction) -> None:
        if self._pending >= self.backlog:
            self.record(Comparison(0, 0, 0.0, rows))
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="modelyard-shadow")
        self._pending += 1
        compared = asyncio.get_running_loop().run_in_executor(
            self._executor, self.reference.compare, columns, rows, prediction
        )
        compared.add_done_callback(self._done)  # called on the loop: the tallies stay its own

    def _done(self, compared: asyncio.Future[Comparison]) -> None:
        self._pending -= 1
        try:
            self.record(compared.result())
        except Exception:  # a comparison never takes the slot down; the counts show the gap
            log.exception("comparing a copied request with the serving version failed")


def compare(new: Prediction, serving: Prediction, regression: bool) -> Comparison:
    """Row by row: class agreement for classifiers, absolute difference for regressors."""
    rows = min(len(new.values), len(serving.values))
    if regression:
        diff = np.abs(new.values[:rows].astype(float) - serving.values[:rows].astype(float))
        return Comparison(rows, 0, float(diff.sum()), 0)
    # tolist(): labels compare as Python values, so 1 == 1 whatever the integer width, and a
    # text label never equals a number.
    pairs = zip(new.values[:rows].tolist(), serving.values[:rows].tolist(), strict=True)
    return Comparison(rows, sum(a == b for a, b in pairs), 0.0, 0)


def is_copy(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(key == HEADER for key, _ in headers)
