"""Prometheus metrics of the serving app; multiprocess-safe when one process runs per core."""

from __future__ import annotations

import os
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


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, model: str, version: str, digest: str, prediction_buckets: list[float]
    ) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelyard_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelyard_request_duration_seconds",
            "Request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter("modelyard_predicted_rows", "Rows predicted", registry=self.registry)
        self.predictions = Histogram(
            "modelyard_prediction",
            "Distribution of predicted values",
            buckets=tuple(prediction_buckets),
            registry=self.registry,
        )
        info = Gauge(
            "modelyard_model_info",
            "The model this server runs",
            ["model", "version", "bundle_digest"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        info.labels(model, version, digest[:16]).set(1)
        self._children: dict[tuple[str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(route, str(status))
        counter.inc()
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = self.latency.labels(route)
        timer.observe(seconds)

    def observe_predictions(self, values: Any) -> None:
        self.rows.inc(len(values))
        for value in values:
            self.predictions.observe(float(value))

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
