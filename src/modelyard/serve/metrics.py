"""Prometheus metrics of the serving app; multiprocess-safe when one process runs per core.

Requests only touch plain Python counters (a dict increment and a bisect per histogram); the
totals are folded into prometheus_client's values every `FLUSH_SECONDS` and before this worker
renders /metrics. In multiprocess mode each prometheus_client update is a locked write to a
memory-mapped file, and six of them per request cost more than a small model's prediction.
A scrape may therefore miss up to `FLUSH_SECONDS` of another worker's requests, never lose them.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from modelyard.bins import VECTOR_FROM, Bins, add_slots

if TYPE_CHECKING:
    from modelyard.serve.shadow import Comparison

# 1-2-3-5 steps (no bucket wider than 1.67x) from 0.1 ms to 5 s: a canary's p99 is compared
# with its baseline's at 1.5x, and a wider bucket's interpolation alone can exceed that
# (with 2.5-4x buckets, identical versions around 250 ms differed by 3x in a quarter of trials).
LATENCY_BUCKETS = (
    0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
)  # fmt: skip
PROBABILITY_BUCKETS = tuple(round(i / 10, 1) for i in range(1, 11))
FLUSH_SECONDS = 1.0
# Batches' rows wait until this many have come (or the next flush) to be counted into the
# prediction histogram and the drift bins a column at a time. One-row requests at 32
# connections come in batches of 3-5 rows, and counting each batch value by value cost 12 µs,
# half of what predicting it cost; 1,024 rows counted at once take about 0.45 ms.
BIN_ROWS = 1024


class _Tally:
    """Observations for one histogram child, bucketed locally until the next flush."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_all(self, values: np.ndarray) -> None:
        """`add` for each of a batch's values, a column at a time."""
        if len(values) < VECTOR_FROM:  # the loop costs less per call
            for value in values.tolist():
                self.add(value)
            return
        slots = np.searchsorted(np.asarray(self.bounds), values, side="left")
        slots[np.isnan(values)] = 0  # where `bisect_left` puts a NaN
        add_slots(self.counts, slots)
        self.total += float(values.sum(dtype=np.float64))

    def drain_into(self, child: Any) -> None:
        # prometheus_client keeps one value per bucket (non-cumulative) and a sum; add to them.
        for bucket, count in zip(child._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        if any(self.counts):
            child._sum.inc(self.total)
        self.counts = [0] * len(self.counts)
        self.total = 0.0


class _BinTally:
    """Live rows per drift bin of one signal, as a list indexed like `bins.labels`."""

    __slots__ = ("bins", "counts")

    def __init__(self, bins: Bins) -> None:
        self.bins = bins
        self.counts = [0] * len(bins.labels)

    def add(self, values: Sequence[Any] | np.ndarray) -> None:
        self.bins.count(values, self.counts)

    def drain_into(self, counter: Any, *labels: str) -> None:
        for label, count in zip(self.bins.labels, self.counts, strict=True):
            if count:
                counter.labels(*labels, label).inc(count)
        self.counts = [0] * len(self.counts)


class _Waiting:
    """Batches' rows not counted yet: each input's values joined as batches come (a list per
    input: joining hundreds of small batches' columns at once cost more than counting them),
    and the scores and drift values of the predictions."""

    __slots__ = ("drift", "inputs", "rows", "scores")

    def __init__(self, inputs: Iterable[str]) -> None:
        self.inputs: dict[str, list[Any]] = {name: [] for name in inputs}
        self.scores: list[np.ndarray] = []
        self.drift: list[Sequence[Any] | np.ndarray] = []
        self.rows = 0

    def add(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray], prediction: Any, with_drift: bool
    ) -> None:
        for name, waiting in self.inputs.items():
            values = columns[name]
            waiting.extend(values.tolist() if type(values) is np.ndarray else values)
        self.scores.append(prediction.scores)
        if with_drift:
            self.drift.append(prediction.drift_values)
        self.rows += len(prediction.values)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        model: str,
        version: str,
        digest: str,
        prediction_buckets: list[float],
        reference: dict[str, Any] | None = None,
        monitoring: dict[str, float] | None = None,
        shadow: bool = False,
    ) -> None:
        """`shadow`: this slot compares the copies it gets with the serving version's
        answers (`modelyard.serve.shadow`)."""
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "modelyard_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "modelyard_request_duration_seconds",
            "Request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rows = Counter("modelyard_predicted_rows", "Rows predicted", registry=registry)
        self.prediction_bounds = tuple(float(b) for b in prediction_buckets)
        self.predictions = Histogram(
            "modelyard_prediction",
            "Distribution of predicted values",
            buckets=self.prediction_bounds,
            registry=registry,
        )
        info = Gauge(
            "modelyard_model_info",
            "The model this server runs",
            ["model", "version", "bundle_digest"],
            registry=registry,
            multiprocess_mode="max",
        )
        info.labels(model, version, digest[:16]).set(1)
        # A canary's cost against the baseline's (monitor.canary): min over the workers, each
        # measured alone at its start, before the first request.
        self.row_cost = Gauge(
            "modelyard_model_row_cpu_seconds",
            "CPU seconds one row costs the model, measured at start on the bundle's example",
            registry=registry,
            multiprocess_mode="min",
        )
        self._monitoring_gauges(monitoring or {})
        self._inputs: dict[str, _BinTally] = {}
        self._prediction_bins: _BinTally | None = None
        if reference:
            self._drift_metrics(reference)
        self._shadow: dict[str, float] = {}
        if shadow:
            self._shadow_metrics()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._latency: dict[str, _Tally] = {}
        self._predictions = _Tally(self.prediction_bounds)
        self._rows = 0
        self._waiting = _Waiting(self._inputs)
        self._flusher: asyncio.TimerHandle | None = None

    def observe(self, route: str, status: int, seconds: float) -> None:
        self._requests[(route, status)] += 1
        tally = self._latency.get(route)
        if tally is None:
            tally = self._latency[route] = _Tally(LATENCY_BUCKETS)
        tally.add(seconds)
        if self._flusher is None:  # checked here: this runs for every request
            self._schedule_flush()

    def observe_batch(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray], prediction: Any
    ) -> None:
        """A batch's validated inputs and its Prediction: rows, distribution, drift bins;
        counted with others once BIN_ROWS rows have come, or at the next flush."""
        if len(prediction.values) >= BIN_ROWS:  # counted as it is, its columns likely arrays
            self.observe_predictions(prediction.scores, prediction.drift_values)
            self.observe_inputs(columns)
            return
        waiting = self._waiting
        waiting.add(columns, prediction, with_drift=self._prediction_bins is not None)
        if waiting.rows >= BIN_ROWS:
            self._bin()
        else:
            self._schedule_flush()

    def _bin(self) -> None:
        """The waiting rows counted as one batch."""
        waiting = self._waiting
        if waiting.rows:
            self._waiting = _Waiting(self._inputs)
            drift = _joined(waiting.drift) if waiting.drift else []  # [] without drift bins
            self.observe_predictions(np.concatenate(waiting.scores), drift)
            self.observe_inputs(waiting.inputs)

    def observe_predictions(
        self, scores: np.ndarray, drift_values: Sequence[Any] | np.ndarray
    ) -> None:
        self._rows += len(scores)
        self._predictions.add_all(scores)
        if self._prediction_bins is not None:
            self._prediction_bins.add(drift_values)

    def observe_inputs(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> None:
        """A batch's validated columns, counted into the drift bins."""
        for name, tally in self._inputs.items():
            tally.add(columns[name])

    def observe_shadow(self, comparison: Comparison) -> None:
        """One copied request compared with the serving version's answer."""
        for name in self._shadow:
            self._shadow[name] += getattr(comparison, name)
        self._schedule_flush()

    def _shadow_metrics(self) -> None:
        """The comparison's counters, at 0 from the start: a window judges their growth."""
        self.shadow_counters = {
            name: Counter(metric, help_text, registry=self.registry)
            for name, metric, help_text in (
                ("rows", "modelyard_shadow_compared_rows",
                 "Copied rows predicted by this and the serving version"),
                ("agreed", "modelyard_shadow_agreed_rows",
                 "Compared rows whose class the serving version gave too"),
                ("abs_diff", "modelyard_shadow_abs_diff",
                 "Sum of |this - serving| over compared rows (regressors)"),
                ("unpaired", "modelyard_shadow_unpaired_rows",
                 "Copied rows the serving version could not predict"),
            )
        }  # fmt: skip
        for counter in self.shadow_counters.values():
            counter.inc(0)
        self._shadow = dict.fromkeys(self.shadow_counters, 0.0)

    def _monitoring_gauges(self, monitoring: dict[str, float]) -> None:
        """The bundle's alert thresholds, so alert rules read them per model."""
        for name, key, help_text in (
            ("modelyard_latency_budget_seconds", "latency_budget_seconds",
             "p99 latency above which the model's latency alert fires"),
            ("modelyard_drift_threshold", "drift_threshold",
             "PSI above which an input or the prediction counts as drifted"),
            ("modelyard_drift_min_rows", "drift_min_rows",
             "Live rows a drift window needs before PSI is computed"),
        ):  # fmt: skip
            if key in monitoring:
                gauge = Gauge(name, help_text, registry=self.registry, multiprocess_mode="max")
                gauge.set(float(monitoring[key]))

    def _drift_metrics(self, reference: dict[str, Any]) -> None:
        """Live counts per drift bin and the reference's shares, for PSI in PromQL and the
        monitor flow. Every bin's counter exists from the start at 0: `increase()` needs the
        series before its first increment, and PSI needs the bins no live row fell into."""
        registry = self.registry
        self.input_bins = Counter("modelyard_input_bin", "Live input rows per drift bin",
                                  ["feature", "bin"], registry=registry)  # fmt: skip
        input_reference = Gauge("modelyard_input_reference_ratio",
                                "Share of the reference rows per drift bin", ["feature", "bin"],
                                registry=registry, multiprocess_mode="max")  # fmt: skip
        for name, data in reference.get("features", {}).items():
            self._inputs[name] = _BinTally(Bins.from_json(data))
            _start_bins(self._inputs[name].bins, self.input_bins, input_reference, name)
        if "prediction" in reference:
            self._prediction_bins = _BinTally(Bins.from_json(reference["prediction"]))
            self.prediction_bins = Counter("modelyard_prediction_bin",
                                           "Live predictions per drift bin", ["bin"],
                                           registry=registry)  # fmt: skip
            prediction_reference = Gauge("modelyard_prediction_reference_ratio",
                                         "Share of the reference predictions per drift bin",
                                         ["bin"], registry=registry,
                                         multiprocess_mode="max")  # fmt: skip
            _start_bins(self._prediction_bins.bins, self.prediction_bins, prediction_reference)

    def _schedule_flush(self) -> None:
        if self._flusher is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (direct use): flush right away
                self.flush()
                return
            self._flusher = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._flusher = None
        self._bin()
        for (route, status), count in self._requests.items():
            self.requests.labels(route, str(status)).inc(count)
        self._requests.clear()
        for route, tally in self._latency.items():
            tally.drain_into(self.latency.labels(route))
        self._predictions.drain_into(self.predictions)
        if self._rows:
            self.rows.inc(self._rows)
            self._rows = 0
        for name, counts in self._inputs.items():
            counts.drain_into(self.input_bins, name)
        if self._prediction_bins is not None:
            self._prediction_bins.drain_into(self.prediction_bins)
        for name, grown in self._shadow.items():
            if grown:
                self.shadow_counters[name].inc(grown)
                self._shadow[name] = 0.0

    def render(self) -> bytes:
        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _joined(parts: list[Sequence[Any] | np.ndarray]) -> Sequence[Any] | np.ndarray:
    """Batches' values of one signal as one sequence (one batch's as they are)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts)
    return list(chain.from_iterable(p.tolist() if isinstance(p, np.ndarray) else p for p in parts))


def _start_bins(bins: Bins, counter: Any, reference: Any, *labels: str) -> None:
    """Every bin's live counter at 0 and its reference share, before the first request."""
    for label, share in zip(bins.labels, bins.reference, strict=True):
        counter.labels(*labels, label).inc(0)
        reference.labels(*labels, label).set(share)
