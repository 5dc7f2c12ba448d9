"""Adaptive micro-batching: requests that arrive in the same event-loop turn share one
ONNX Runtime call.

No request waits for a batch to fill: a flush is scheduled with `call_soon` when the first
request of a turn arrives, so it runs as soon as the requests already read from the sockets
have been decoded. Under light load a batch is one request; under concurrency the fixed cost of
a session run (about 15 µs for the examples) is shared. Each request is validated before it
joins, so a bad request can never fail its neighbours.

A request hands in a callback, not a future to await: the flush answers every request of its
batch in one pass, where a future would wake each request's task on a later turn of the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelyard.serve.codecs import Rows, Values, columns_of, to_arrays
from modelyard.serve.runtime import Prediction, Runtime

MAX_BATCH_ROWS = 4096
# A request's answer: its slice of the batch's prediction, or why the batch failed.
Done = Callable[[Prediction | Exception], None]
log = logging.getLogger("modelyard.serve")


@dataclass
class _Pending:
    values: Values | Rows  # validated columns, or rows from codecs.SplitDecoder
    rows: int
    done: Done


class Batcher:
    def __init__(
        self, runtime: Runtime, observe: Callable[[Values, Prediction], None] | None = None
    ) -> None:
        """`observe`: called with each batch's inputs and predictions (metrics count a batch
        at a time, not a request at a time)."""
        self.runtime = runtime
        self.observe = observe
        self._pending: list[_Pending] = []
        self._scheduled = False

    def submit(self, values: Values | Rows, rows: int, done: Done) -> None:
        """`values`: one request's validated columns (see codecs.validate) or decoded rows (see
        codecs.SplitDecoder); `done` is called once, on the loop, with the request's prediction
        or the batch's error."""
        self._pending.append(_Pending(values, rows, done))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        pending, self._pending, self._scheduled = self._pending, [], False
        start = 0
        while start < len(pending):
            end, total = start, 0
            while end < len(pending) and (
                end == start or total + pending[end].rows <= MAX_BATCH_ROWS
            ):
                total += pending[end].rows
                end += 1
            self._run(pending[start:end])
            start = end

    def _run(self, batch: list[_Pending]) -> None:
        try:
            joined = self._joined(batch)
            prediction = self.runtime.predict(to_arrays(joined, self.runtime.columns))
            results = (
                [prediction] if len(batch) == 1 else _split(prediction, [p.rows for p in batch])
            )
        except Exception as exc:  # handed to each request, which answers 500
            for item in batch:
                _hand(item.done, exc)
            return
        for item, result in zip(batch, results, strict=True):
            _hand(item.done, result)
        if self.observe is not None:
            # Queued, after the answers just written: they leave before the batch is counted (a
            # 10,000-row batch's drift bins take milliseconds), and a metrics bug never fails a
            # request.
            asyncio.get_running_loop().call_soon(self.observe, joined, prediction)

    def _joined(self, batch: list[_Pending]) -> Values:
        """The batch's columns; decoded rows become columns once for the whole batch."""
        schema = self.runtime.columns
        decoded = [p.values for p in batch if isinstance(p.values, list)]
        if len(decoded) == len(batch):
            rows = decoded[0] if len(decoded) == 1 else [row for rows in decoded for row in rows]
            return columns_of(rows, schema)
        parts = [
            v if not isinstance(v, list) else columns_of(v, schema)
            for v in (p.values for p in batch)
        ]
        if len(parts) == 1:
            return parts[0]
        lists: dict[str, list[Any]] = {c.name: [] for c in schema}
        for part in parts:
            for name, column in lists.items():
                values = part[name]
                # A long numeric column is a float64 array: joined as floats, not as numpy
                # scalars. Inline: this runs per request and column.
                column.extend(values.tolist() if type(values) is np.ndarray else values)
        return lists


def _hand(done: Done, outcome: Prediction | Exception) -> None:
    try:
        done(outcome)
    except Exception:  # one request's failure to answer must not keep the others waiting
        log.exception("answering a batched request failed")


def _split(prediction: Prediction, sizes: list[int]) -> list[Prediction]:
    out, start = [], 0
    values, probabilities = prediction.values, prediction.probabilities
    for size in sizes:
        end = start + size
        out.append(
            Prediction(
                values[start:end], None if probabilities is None else probabilities[start:end]
            )
        )
        start = end
    return out
