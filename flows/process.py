"""What a flow run sets up for its process before it does anything."""

from __future__ import annotations

import os

from modelyard.config import Settings, runtime


def run_settings() -> Settings:
    """The run's runtime context, built once at its start and passed to its tasks. MLflow's
    client reads credentials from the environment only, so a flow run (the entry point of a
    worker's process, like the CLI of its own) puts the configured ones there once; the core
    never writes the environment."""
    settings = runtime()
    os.environ.update(settings.mlflow_credentials_env())
    return settings
