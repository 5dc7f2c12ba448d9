"""One settings object for the whole tool, read from `MODELYARD_*` environment variables.

Standard variables of the systems we drive (`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`) are honoured
too, so an existing MLflow or Prefect set-up needs no modelyard-specific configuration.

`Settings` is a plain value: every variable is read when it is built, and no property reads a
file, the environment or `/proc`. What depends on the machine's state (which stack services
run) is found once per process by `runtime()`, the runtime context the CLI and each flow run
build at their start and pass down.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
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

    model_config = SettingsConfigDict(
        env_prefix="MODELYARD_", extra="ignore", populate_by_name=True
    )

    workspace: Path = Field(
        default=Path(".modelyard"),
        description="Folder for all local state: MLflow SQLite db, artifacts, Prefect db, logs.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MODELYARD_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow server; else MLFLOW_TRACKING_URI, else the running stack's, else "
        "SQLite in the workspace.",
    )
    prefect_api_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MODELYARD_PREFECT_API_URL", "PREFECT_API_URL"),
        description="Prefect API; else PREFECT_API_URL, else the running stack's, else a local "
        "Prefect in the workspace.",
    )
    git_commit: str | None = Field(
        default=None, description="Commit to record; CI sets it when the checkout has no .git."
    )
    git_branch: str | None = Field(default=None, description="Branch to record.")
    signing_key: SecretStr | None = Field(
        default=None, description="Ed25519 private key (PEM) that signs bundles."
    )
    signing_key_file: Path | None = Field(default=None, description="File holding that key.")
    bundle_key: SecretStr | None = Field(
        default=None,
        description="Encrypt bundles: base64 of a 32-byte AES-256-GCM key (openssl rand -base64 "
        "32); comma-separated, the first seals and every one opens (a rotation).",
    )
    bundle_key_file: Path | None = Field(default=None, description="File holding that key.")
    bundle_kms_key: str | None = Field(
        default=None,
        description="Encrypt bundles with a data key per bundle from this AWS KMS key (id, ARN "
        "or alias/…), kept in the manifest as KMS wrapped it; a deploy unwraps it.",
    )
    trusted_keys: str = Field(
        default="", description="Extra base64 Ed25519 public keys whose bundles are accepted."
    )
    ledger_keys: str = Field(
        default="",
        description="Base64 Ed25519 public keys the release ledger's records may also be signed "
        "by (a signing key retired by a rotation): trusted by `history --verify`, not for bundles.",
    )
    serve_token: SecretStr | None = Field(
        default=None, description="Bearer token(s), comma-separated, for prediction routes."
    )
    serve_tls: Literal["auto", "local", "off"] = Field(
        default="auto",
        description="HTTPS at deployed services' front doors and slot ports: `auto` when a "
        "certificate is set (serve_tls_cert or serve_tls_cert_file), `local` with one per "
        "model and environment from the workspace's local CA, `off` plain HTTP.",
    )
    serve_tls_cert: str | None = Field(
        default=None,
        description="Certificate chain (PEM text) the services present; it must name each "
        "host's address as the inventory gives it (ansible_host), which the deploy's checks "
        "and Prometheus connect to.",
    )
    serve_tls_cert_file: Path | None = Field(default=None, description="File holding that chain.")
    serve_tls_key: SecretStr | None = Field(default=None, description="Its private key (PEM).")
    serve_tls_key_file: Path | None = Field(default=None, description="File holding that key.")
    serve_tls_ca: Path | None = Field(
        default=None,
        description="CA (PEM) the deploy's checks and Prometheus verify the services' "
        "certificates with; default the local CA with serve_tls=local, else the system's.",
    )
    serve_plain_http: Literal["refuse", "redirect"] = Field(
        default="refuse",
        description="What a plain-HTTP request to a TLS front door gets: `refuse` (400 naming "
        "https) or `redirect` (308 to the https URL; the request, with any token in it, has "
        "already crossed the network in the clear).",
    )
    serve_client_ca: str | None = Field(
        default=None,
        description="Mutual TLS for /metrics at the front door and for the slots' ports: the "
        "CA (PEM file) client certificates must chain to, or `local` for the local CA.",
    )
    serve_client_cert: Path | None = Field(
        default=None,
        description="Client certificate (PEM) modelyard's checks and Prometheus present; "
        "issued by the local CA with serve_client_ca=local.",
    )
    serve_client_key: Path | None = Field(default=None, description="Its private key (PEM).")
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
    ansible_strategy: Literal["mitogen", "linear"] = Field(
        default="mitogen",
        description="How deploys run their tasks: 'mitogen' keeps one Python per host for the "
        "whole playbook (about 3x faster); 'linear' is Ansible's own, for a host Mitogen "
        "cannot drive.",
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
    stack_alertmanager_port: int = Field(default=9093, description="Alertmanager.")
    stack_password: SecretStr | None = Field(
        default=None,
        description="With it set, `stack up` serves the registry, Prometheus and Alertmanager "
        "over TLS and each requires this password (basic auth, user `stack_username`).",
    )
    stack_username: str = Field(default="modelyard", description="That sign-in's user.")
    stack_tls_cert: Path | None = Field(
        default=None,
        description="Certificate chain (PEM) those three present; default: one from a local CA "
        "that `stack up` creates in <workspace>/stack/tls/.",
    )
    stack_tls_key: Path | None = Field(default=None, description="Its private key (PEM).")
    stack_ca: Path | None = Field(
        default=None,
        description="CA (PEM) modelyard trusts for the stack's TLS; default the local CA, or "
        "the system's when stack_tls_cert is set.",
    )
    stack_start_timeout: float = Field(
        default=120,
        description="Seconds a service may take to start: the stack's, and the embedded Prefect "
        "server a run starts when none is configured.",
    )
    prometheus_interval: int = Field(
        default=15, ge=1, description="Seconds between the stack Prometheus scrapes and rule runs."
    )
    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus the monitor flow queries; default: the stack's when it runs.",
    )
    alert_routes: Path | None = Field(
        default=None,
        description="Alertmanager routing file for `stack up` (route, inhibit_rules, a receiver "
        "named `people`); default the shipped infra/prometheus/alertmanager.yml.",
    )
    alert_webhook_url: SecretStr | None = Field(
        default=None,
        description="Where Alertmanager posts alerts (its webhook JSON), firing and resolved. "
        "Kept secret: such URLs often carry a token.",
    )
    alert_webhook_token: SecretStr | None = Field(
        default=None, description="Bearer token Alertmanager sends with each webhook post."
    )
    alert_email_to: str | None = Field(
        default=None, description="Addresses, comma-separated, that alerts are mailed to."
    )
    alert_email_from: str | None = Field(
        default=None, description="Sender of alert mail; default modelyard-alerts@<hostname>."
    )
    alert_smtp_relay: str | None = Field(
        default=None, description="host:port of the SMTP relay alert mail goes through."
    )
    alert_smtp_username: str | None = Field(default=None, description="Sign-in at the relay.")
    alert_smtp_password: SecretStr | None = Field(default=None, description="Its password.")
    alert_smtp_tls: bool = Field(
        default=True,
        description="Require STARTTLS at the relay; off only for a relay on this machine.",
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
    # The libraries' own credential variables, read with the rest: the clients fall back on
    # them, but `stack up` never starts a server with them (only the MODELYARD_ ones do that).
    library_mlflow_username: str | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_USERNAME", exclude=True, repr=False
    )
    library_mlflow_password: SecretStr | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_PASSWORD", exclude=True
    )
    library_prefect_auth: SecretStr | None = Field(
        default=None, validation_alias="PREFECT_API_AUTH_STRING", exclude=True
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
    artifacts_kms_key: str | None = Field(
        default=None,
        description="AWS KMS key (ARN, id or alias/…) the MLflow server writes every S3 artifact "
        "with (SSE-KMS); the bucket's default encryption and its policy then refuse other puts.",
    )
    artifacts_bucket_policy: Literal["kms-only", "leave"] = Field(
        default="kms-only",
        description="With artifacts_kms_key: `kms-only` adds statements to the bucket's policy "
        "that deny a put without SSE-KMS; `leave` does not touch the policy (it is managed "
        "elsewhere, e.g. by Terraform).",
    )
    build_image: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Build and infra-validate the serving image: 'auto' when a Docker engine "
        "and the base image are available, 'always' (fail without them) or 'never'.",
    )

    @field_validator("workspace")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once, so a later chdir (a checkout, a test) cannot move the workspace.
        return value.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        """The configured MLflow (or the stack's, once `runtime()` found it), else SQLite."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.workspace / 'mlflow.db'}"

    @property
    def prometheus(self) -> str | None:
        """The Prometheus to query: configured (or the stack's, found by `runtime()`), or none."""
        return self.prometheus_url

    @property
    def api_url(self) -> str | None:
        """The configured Prefect API (or the stack's, found by `runtime()`), else None: a run
        then starts an embedded one."""
        return self.prefect_api_url

    @property
    def artifact_root(self) -> str:
        """Where experiments created against the embedded SQLite store keep their artifacts."""
        return (self.workspace / "artifacts").as_uri()

    @property
    def dev_key_path(self) -> Path:
        return self.workspace / "keys" / "signing-dev.pem"

    def orchestrator_env(self) -> dict[str, str]:
        """Environment for Prefect: the configured API, else a local one in the workspace."""
        env = dict(TELEMETRY_OFF)
        if self.api_url:
            env["PREFECT_API_URL"] = self.api_url
        else:
            # The ephemeral API keeps its SQLite db here, so `prefect server start` with the same
            # PREFECT_HOME later shows every run in the UI.
            env["PREFECT_HOME"] = str(self.workspace / "prefect")
            # Each run starts an embedded server; Prefect waits 20 s for it, which a busy machine
            # (a CI runner, a laptop mid-build) can miss, failing a run that did nothing.
            env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = (
                f"{self.stack_start_timeout:g}"
            )
        if self.prefect_auth:
            env["PREFECT_API_AUTH_STRING"] = self.prefect_auth
        env["PREFECT_LOGGING_EXTRA_LOGGERS"] = "modelyard"  # core progress shows in the UI
        # Cached task results live in the workspace, next to the runs they belong to.
        env["PREFECT_LOCAL_STORAGE_PATH"] = str(self.workspace / "prefect" / "storage")
        return env

    @property
    def mlflow_credentials(self) -> tuple[str, str] | None:
        """MLflow basic-auth user and password: the settings, else MLflow's own variables."""
        user = self.mlflow_username or self.library_mlflow_username
        password = _secret(self.mlflow_password) or _secret(self.library_mlflow_password)
        return (user, password) if user and password else None

    @property
    def prefect_auth(self) -> str | None:
        """'user:password' for the Prefect API: the setting, else PREFECT_API_AUTH_STRING."""
        return _secret(self.prefect_auth_string) or _secret(self.library_prefect_auth)

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


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def runtime(settings: Settings | None = None) -> Settings:
    """This process's runtime context: the settings, with the running stack's MLflow, Prefect
    and Prometheus filled in where none is configured. The only I/O settings need happens
    here, once; the CLI and each flow run pass the result down. It makes nothing: whoever
    writes into the workspace makes the folder it writes to."""
    declared = settings or Settings()
    workspace = declared.workspace
    found = {
        "mlflow_tracking_uri": declared.mlflow_tracking_uri or running_url(workspace, "mlflow"),
        "prometheus_url": declared.prometheus_url or running_url(workspace, "prometheus"),
        "prefect_api_url": declared.prefect_api_url or _prefect_api(workspace),
    }
    return declared.model_copy(update=found)


def _prefect_api(workspace: Path) -> str | None:
    server = running_url(workspace, "prefect")
    return f"{server}/api" if server else None
