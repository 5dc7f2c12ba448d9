"""The settings are a plain value; the runtime context finds what the machine runs, once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelyard.config import Settings, runtime

FOREIGN = (
    "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in FOREIGN:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _pretend_running(workspace: Path, service: str, url: str) -> None:
    """What `modelyard stack up` leaves for a running service (this process stands in for it)."""
    folder = workspace / "stack" / service
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"url": url, "pid": os.getpid()}))


def test_settings_read_the_environment_once_and_then_never(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    clean_env.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    clean_env.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    settings = Settings(workspace=tmp_path / "ws")
    for name in FOREIGN:
        clean_env.delenv(name, raising=False)
    # Read at construction: later changes to the environment do not move a built value.
    assert settings.tracking_uri == "http://127.0.0.1:5999"
    assert settings.mlflow_credentials == ("ann", "pw")
    # Nothing was made by reading it.
    assert settings.workspace.is_absolute() and not settings.workspace.exists()


def test_the_modelyard_variable_wins_and_the_library_credentials_start_no_server(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    clean_env.setenv("MODELYARD_MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    clean_env.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    clean_env.setenv("PREFECT_API_AUTH_STRING", "u:p")
    settings = Settings()
    assert settings.tracking_uri == "http://127.0.0.1:2"
    # `stack up` turns auth on only for the MODELYARD_ settings; the clients use both.
    assert settings.mlflow_password is None and settings.prefect_auth_string is None
    assert settings.prefect_auth == "u:p"
    assert settings.orchestrator_env()["PREFECT_API_AUTH_STRING"] == "u:p"
    assert "s3cret-pw" not in repr(settings) and "u:p" not in repr(settings)


def test_the_runtime_finds_the_running_stack(clean_env, tmp_path):
    workspace = tmp_path / "ws"
    declared = Settings(workspace=workspace)
    assert declared.tracking_uri == f"sqlite:///{workspace}/mlflow.db"
    assert declared.api_url is None and declared.prometheus is None
    _pretend_running(workspace, "mlflow", "http://127.0.0.1:5000")
    _pretend_running(workspace, "prefect", "http://127.0.0.1:4200")
    resolved = runtime(declared)
    assert resolved.tracking_uri == "http://127.0.0.1:5000"
    assert resolved.api_url == "http://127.0.0.1:4200/api"
    assert resolved.prometheus is None  # not running: none
    assert resolved.orchestrator_env()["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    # A configured server wins over the stack's, and the declared value is left as it was.
    configured = runtime(Settings(workspace=workspace, mlflow_tracking_uri="http://mlflow.test"))
    assert configured.tracking_uri == "http://mlflow.test"
    assert declared.mlflow_tracking_uri is None


def test_without_a_server_a_run_starts_prefect_in_the_workspace(clean_env, tmp_path):
    env = runtime(Settings(workspace=tmp_path / "ws", stack_start_timeout=300)).orchestrator_env()
    assert "PREFECT_API_URL" not in env
    assert env["PREFECT_HOME"] == str(tmp_path / "ws" / "prefect")
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "300"
    assert not (tmp_path / "ws").exists()  # resolving makes nothing
