"""How the flows retry a task that talks to a server (MLflow, Prometheus): a blip in the
connection is ridden out, a real outage fails the run within about 20 seconds."""

from __future__ import annotations

from typing import TypedDict


class Retries(TypedDict):
    retries: int
    retry_delay_seconds: list[float]


TRANSIENT: Retries = {"retries": 3, "retry_delay_seconds": [2, 5, 10]}
