"""One settings object for the whole tool, read from `MODELYARD_*` environment variables.

Standard variables of the systems we drive (`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`) are honoured
too, so an existing MLflow or Prefect set-up needs no modelyard-specific configuration.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelyard.stackstate import running_url

# Telemetry that would call out to the internet; off unless the user turned it on explicitly.
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class Settings(BaseSettings):
    """Where modelyard keeps its state and which servers it talks to."""

    model_config = SettingsConfigDict(env_prefix="MODELYARD_", extra="ignore")

    workspace: Path = Field(
        default=Path(".modelyard"),
        description="Folder for all local state: MLflow SQLite db, artifacts, Prefect db, logs.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow server; else MLFLOW_TRACKING_URI, else SQLite in the workspace.",
    )
    prefect_api_url: str | None = Field(
        default=None,
        description="Prefect API; else PREFECT_API_URL, else a local Prefect in the workspace.",
    )
    git_commit: str | None = Field(
        default=None, description="Commit to record; CI sets it when the checkout has no .git."
    )
    git_branch: str | None = Field(default=None, description="Branch to record.")
    signing_key: SecretStr | None = Field(
        default=None, description="Ed25519 private key (PEM) that signs bundles."
    )
    signing_key_file: Path | None = Field(default=None, description="File holding that key.")
    trusted_keys: str = Field(
        default="", description="Extra base64 Ed25519 public keys whose bundles are accepted."
    )
    serve_token: SecretStr | None = Field(
        default=None, description="Bearer token(s), comma-separated, for prediction routes."
    )
    actor: str | None = Field(
        default=None,
        description="Who deploys and approves, for the release ledger; else the CI's user "
        "(GITHUB_ACTOR, GITLAB_USER_LOGIN, BUILD_USER_ID), else the login name.",
    )
    base_image: str = Field(default="python:3.11-slim", description="Base of the serving image.")
    docker_host: str | None = Field(default=None, description="Docker engine; else DOCKER_HOST.")
    image_registry: str | None = Field(
        default=None,
        description="Where serving images are pushed and hosts pull them from, by digest: "
        "`stack` (the local stack's registry), `ecr` (Amazon ECR of the AWS account and "
        "region), or a registry host[:port]. Unset: images stay on the building engine.",
    )
    image_push_host: str | None = Field(
        default=None,
        description="Registry host[:port] to push to and pull from instead of the one "
        "`image_registry` names (a mirror or proxy in front of ECR).",
    )
    ansible_collections: Path | None = Field(
        default=None,
        description="Where the amazon.aws collection is installed for the AWS target; "
        "default <workspace>/ansible/collections.",
    )
    wheelhouse: Path | None = Field(
        default=None, description="Wheels for the serving image; default <workspace>/wheelhouse."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Shared secret of the GitHub webhook (X-Hub-Signature-256)."
    )
    stack_host: str = Field(default="127.0.0.1", description="Address the local stack binds.")
    stack_prefect_port: int = Field(default=4200, description="Prefect server (API and UI).")
    stack_mlflow_port: int = Field(default=5000, description="MLflow tracking server and UI.")
    stack_registry_port: int = Field(default=5001, description="Docker registry.")
    stack_prometheus_port: int = Field(default=9090, description="Prometheus.")
    stack_start_timeout: float = Field(default=120, description="Seconds a service may take.")
    prometheus_interval: int = Field(
        default=15, ge=1, description="Seconds between the stack Prometheus scrapes and rule runs."
    )
    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus the monitor flow queries; default: the stack's when it runs.",
    )
    mlflow_username: str | None = Field(
        default=None,
        description="MLflow user modelyard signs in as (basic auth); the admin the stack's "
        "MLflow server is created with. Else MLFLOW_TRACKING_USERNAME.",
    )
    mlflow_password: SecretStr | None = Field(
        default=None,
        description="That user's password. With it set, `stack up` starts MLflow with its "
        "basic-auth app. Else MLFLOW_TRACKING_PASSWORD.",
    )
    prefect_auth_string: SecretStr | None = Field(
        default=None,
        description="'user:password' for the Prefect API. With it set, `stack up` starts the "
        "Prefect server requiring it. Else PREFECT_API_AUTH_STRING.",
    )
    prefect_database_url: SecretStr | None = Field(
        default=None,
        description="Scale-out: the Prefect server's database, "
        "e.g. postgresql+asyncpg://user:pass@host/prefect; default SQLite in the workspace.",
    )
    mlflow_backend_store_uri: SecretStr | None = Field(
        default=None,
        description="Scale-out: the MLflow server's store, e.g. "
        "postgresql://user:pass@host/mlflow; default SQLite in the workspace.",
    )
    artifacts_destination: str | None = Field(
        default=None,
        description="Scale-out: where the MLflow server keeps artifacts, e.g. s3://bucket/mlflow "
        "(S3-compatible stores: MLFLOW_S3_ENDPOINT_URL); default <workspace>/artifacts.",
    )
    build_image: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Build and infra-validate the serving image: 'auto' when a Docker engine "
        "and the base image are available, 'always' (fail without them) or 'never'.",
    )

    @cached_property
    def workspace_dir(self) -> Path:
        """The workspace, made if missing: for whoever writes to it."""
        path = self.workspace_path
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def workspace_path(self) -> Path:
        """The workspace, as is: reading it, or naming it to a child process, makes nothing."""
        return self.workspace.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        """The configured MLflow, else the stack's server while it runs, else embedded SQLite."""
        explicit = self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return (
            explicit or self._stack_url("mlflow") or f"sqlite:///{self.workspace_dir / 'mlflow.db'}"
        )

    @property
    def prometheus(self) -> str | None:
        """The Prometheus to query: configured, else the running stack's, else none."""
        return self.prometheus_url or self._stack_url("prometheus")

    def _stack_url(self, service: str) -> str | None:
        return running_url(self.workspace_path, service)

    @property
    def artifact_root(self) -> str:
        """Where experiments created against the embedded SQLite store keep their artifacts."""
        return (self.workspace_dir / "artifacts").as_uri()

    @property
    def dev_key_path(self) -> Path:
        return self.workspace_dir / "keys" / "signing-dev.pem"

    @property
    def api_url(self) -> str | None:
        """The configured Prefect API, else the stack's server while it runs, else None (a
        local ephemeral API)."""
        explicit = self.prefect_api_url or os.environ.get("PREFECT_API_URL")
        if explicit:
            return explicit
        server = self._stack_url("prefect")
        return f"{server}/api" if server else None

    def orchestrator_env(self) -> dict[str, str]:
        """Environment for Prefect: the configured API, else a local one in the workspace."""
        env = dict(TELEMETRY_OFF)
        workspace = self.workspace_path  # Prefect makes what it uses
        if self.api_url:
            env["PREFECT_API_URL"] = self.api_url
        else:
            # The ephemeral API keeps its SQLite db here, so `prefect server start` with the same
            # PREFECT_HOME later shows every run in the UI.
            env["PREFECT_HOME"] = str(workspace / "prefect")
        # Cached task results live in the workspace, next to the runs they belong to.
        if self.prefect_auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.prefect_auth_string.get_secret_value()
        env["PREFECT_LOGGING_EXTRA_LOGGERS"] = "modelyard"  # core progress shows in the UI
        env["PREFECT_LOCAL_STORAGE_PATH"] = str(workspace / "prefect" / "storage")
        # Without a server, each run starts an embedded one; Prefect waits 20 s for it, which a
        # busy machine (a CI runner, a laptop mid-build) can miss, failing a run that did nothing.
        startup = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        env[startup] = os.environ.get(startup, "120")
        return env

    @property
    def mlflow_credentials(self) -> tuple[str, str] | None:
        """MLflow basic-auth user and password: the settings, else MLflow's own variables."""
        user = self.mlflow_username or os.environ.get("MLFLOW_TRACKING_USERNAME")
        configured = self.mlflow_password.get_secret_value() if self.mlflow_password else None
        password = configured or os.environ.get("MLFLOW_TRACKING_PASSWORD")
        return (user, password) if user and password else None

    @property
    def prefect_auth(self) -> str | None:
        """'user:password' for the Prefect API: the setting, else PREFECT_API_AUTH_STRING."""
        configured = (
            self.prefect_auth_string.get_secret_value() if self.prefect_auth_string else None
        )
        return configured or os.environ.get("PREFECT_API_AUTH_STRING")

    def mlflow_credentials_env(self) -> dict[str, str]:
        """The MLflow client reads basic-auth credentials from these variables only."""
        env = {}
        if self.mlflow_username:
            env["MLFLOW_TRACKING_USERNAME"] = self.mlflow_username
        if self.mlflow_password:
            env["MLFLOW_TRACKING_PASSWORD"] = self.mlflow_password.get_secret_value()
        return env


def disable_telemetry() -> None:
    """Switch off outbound telemetry of the libraries we import, unless the user set it."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    # MLflow warns on every pickle-format model; ours stays in the registry and never reaches a
    # serving image (that gets ONNX), so the warning is noise in every run's log.
    logging.getLogger("mlflow.sklearn").addFilter(_drop_pickle_warning)


def _drop_pickle_warning(record: logging.LogRecord) -> bool:
    return "pickle or cloudpickle format" not in record.getMessage()


def get_settings() -> Settings:
    return Settings()
