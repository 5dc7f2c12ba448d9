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
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
PROBABILITY_BUCKETS = tuple(round(i / 10, 1) for i in range(1, 11))
FLUSH_SECONDS = 1.0


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

    def drain_into(self, child: Any) -> None:
        # prometheus_client keeps one value per bucket (non-cumulative) and a sum; add to them.
        for bucket, count in zip(child._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        if any(self.counts):
            child._sum.inc(self.total)
        self.counts = [0] * len(self.counts)
        self.total = 0.0


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, model: str, version: str, digest: str, prediction_buckets: list[float]
    ) -> None:
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
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._latency: dict[str, _Tally] = {}
        self._predictions = _Tally(self.prediction_bounds)
        self._rows = 0
        self._flusher: asyncio.TimerHandle | None = None

    def observe(self, route: str, status: int, seconds: float) -> None:
        self._requests[(route, status)] += 1
        tally = self._latency.get(route)
        if tally is None:
            tally = self._latency[route] = _Tally(LATENCY_BUCKETS)
        tally.add(seconds)
        self._schedule_flush()

    def observe_predictions(self, values: Any) -> None:
        self._rows += len(values)
        for value in values.tolist() if hasattr(values, "tolist") else values:
            self._predictions.add(value)

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
        for (route, status), count in self._requests.items():
            self.requests.labels(route, str(status)).inc(count)
        self._requests.clear()
        for route, tally in self._latency.items():
            tally.drain_into(self.latency.labels(route))
        self._predictions.drain_into(self.predictions)
        if self._rows:
            self.rows.inc(self._rows)
            self._rows = 0

    def render(self) -> bytes:
        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
