"""The local stack: a Prefect server, an MLflow tracking server, a Docker registry, Prometheus and
Alertmanager.

Each service runs as a detached process on the stack's host (127.0.0.1 by default) with its own
folder `<workspace>/stack/<name>/` holding its log, its data and `state.json` (pid and URL).
While the stack is up, `Settings` points modelyard at these servers instead of the embedded
SQLite store and the ephemeral Prefect API, so `modelyard run`, workers and the UIs share state.

The embedded defaults are kept: the Prefect server uses the workspace's Prefect database and the
MLflow server the workspace's `mlflow.db`, so runs made before `stack up` show in the UIs.
PostgreSQL and S3 are the scale-out settings (`MODELYARD_PREFECT_DATABASE_URL`,
`MODELYARD_MLFLOW_BACKEND_STORE_URI`, `MODELYARD_ARTIFACTS_DESTINATION`).
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelyard import alerting, servetls, signin, stackstate
from modelyard.atomic import replace_file
from modelyard.config import TELEMETRY_OFF, Settings
from modelyard.errors import ModelyardError

SERVICES = ("prefect", "mlflow", "registry", "prometheus", "alertmanager")
# Debian packages that provide the system services (installed by `make stack`).
PACKAGES = {
    "registry": "docker-registry",
    "prometheus": "prometheus",
    "alertmanager": "prometheus-alertmanager",
}
Progress = Callable[[str], None]


class StackError(ModelyardError):
    """A stack service could not start, or is not installed."""


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    health: str  # path that answers 200 once the service is ready
    command: list[str]
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold database passwords
    # Config files written (mode 0600) before start; some hold secrets.
    files: dict[str, str] = field(default_factory=dict, repr=False)

    def folder(self, settings: Settings) -> Path:
        return stack_dir(settings) / self.name


@dataclass(frozen=True)
class Status:
    name: str
    url: str
    up: bool
    pid: int | None
    detail: str = ""


# infra/prometheus: in the wheel (pyproject's force-include), else in the source checkout.
_SHIPPED = (
    Path(__file__).parent / "monitor" / "prometheus",
    Path(__file__).resolve().parents[2] / "infra" / "prometheus",
)


def stack_dir(settings: Settings) -> Path:
    return stackstate.stack_dir(settings.workspace)


def prometheus_targets_dir(settings: Settings) -> Path:
    """Where deploys write file-based discovery and the stack's Prometheus reads it."""
    return stack_dir(settings) / "prometheus" / "targets"


def plan(settings: Settings) -> list[Service]:
    """What `up` starts, in order: the registry, Prometheus and Alertmanager first, they are
    fastest."""
    # Hashed once for the three: bcrypt is slow on purpose.
    hashed = signin.password_hash(settings) if signin.access(settings) else None
    return [
        _registry(settings, hashed),
        _prometheus(settings, hashed),
        _alertmanager(settings, hashed),
        _mlflow(settings),
        _prefect(settings),
    ]


def up(
    settings: Settings, names: list[str] | None = None, progress: Progress = print
) -> list[Status]:
    """Start the services that are not running and wait until each answers its health route.

    The settings and every binary are checked before anything starts, and a service that fails
    to come up is stopped again, so a failed `up` leaves only what was already running.
    """
    services = _select(settings, names)
    # The settings first: a mistake there is named the same on a machine without the servers.
    _check_auth(settings, services)
    _check_alerting(settings, services, progress)
    _check_signin(settings, services)
    _check_serving_tls(settings, services)
    _check_installed(services)
    _check_same_settings(settings, services)
    if any(s.name == "mlflow" for s in services):
        ensure_bucket(settings.artifacts_destination, settings.artifacts_kms_key,
                      settings.artifacts_bucket_policy == "kms-only")  # fmt: skip
    waiting: list[Service] = []  # ours, not answering yet: started now, or still starting
    to_start: list[Service] = []
    for service in services:
        current = _status(settings, service)
        if current.up:
            progress(f"{service.name}: already up at {service.url}")
        elif current.pid:  # its process lives (an earlier `up` still starting): wait for it
            waiting.append(service)
        else:
            _check_port_free(service)
            to_start.append(service)
    waiting += to_start
    try:
        for service in to_start:  # all start at once: Prefect and MLflow take seconds each
            progress(f"{service.name}: starting on {service.url} …")
            _start(settings, service)
        for service in waiting:
            _wait_healthy(settings, service, progress)
            progress(f"{service.name}: up at {service.url}")
    except StackError:
        for service in to_start:
            _stop(settings, service)
        raise
    return [_status(settings, s) for s in services]


def down(settings: Settings, names: list[str] | None = None, progress: Progress = print) -> None:
    for service in reversed(_select(settings, names)):
        if _stop(settings, service):
            progress(f"{service.name}: stopped")


def status(settings: Settings) -> list[Status]:
    return [_status(settings, s) for s in plan(settings)]


def running_url(settings: Settings, name: str) -> str | None:
    """The URL of a stack service whose process is alive, else None (cheap: no HTTP)."""
    return stackstate.running_url(settings.workspace, name)


# --- the services -------------------------------------------------------------------------------


def _url(settings: Settings, port: int, signs_in: bool = False) -> str:
    scheme = "https" if signs_in else "http"
    return f"{scheme}://{_address(settings, port)}"


def _address(settings: Settings, port: int) -> str:
    return f"{settings.stack_host}:{port}"


def _python_tool(module: str) -> list[str]:
    # The interpreter modelyard runs in has Prefect and MLflow; `-m` needs no PATH lookup.
    return [sys.executable, "-m", module]


def _prefect(settings: Settings) -> Service:
    port = settings.stack_prefect_port
    env = {
        "PREFECT_HOME": str(settings.workspace / "prefect"),
        # The UI finds the API through this, not through --port: on any port but 4200 it
        # would otherwise load and then show nothing.
        "PREFECT_UI_API_URL": f"{_url(settings, port)}/api",
        "PREFECT_SERVER_API_HOST": settings.stack_host,
        "PREFECT_SERVER_API_PORT": str(port),
    }
    if settings.prefect_database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            settings.prefect_database_url.get_secret_value()
        )
    if settings.prefect_auth_string:  # every API call then needs it; the UI asks for it once
        env["PREFECT_SERVER_API_AUTH_STRING"] = settings.prefect_auth_string.get_secret_value()
    return Service(
        name="prefect",
        url=_url(settings, port),
        health="/api/health",
        command=[
            *_python_tool("prefect"),
            "server",
            "start",
            "--host",
            settings.stack_host,
            "--port",
            str(port),
        ],
        env=env,
    )


def _mlflow(settings: Settings) -> Service:
    backend = (
        settings.mlflow_backend_store_uri.get_secret_value()
        if settings.mlflow_backend_store_uri
        else f"sqlite:///{settings.workspace / 'mlflow.db'}"
    )
    artifacts = settings.artifacts_destination or str(settings.workspace / "artifacts")
    port = settings.stack_mlflow_port
    command = [
        *_python_tool("mlflow"), "server", "--host", settings.stack_host, "--port", str(port),
        "--artifacts-destination", artifacts, "--workers", "2",
    ]  # fmt: skip
    # The backend URI goes in the environment, not argv: a PostgreSQL password in argv would
    # show in `ps` to every user of the machine. So do the auth app's credentials.
    env = {"MLFLOW_BACKEND_STORE_URI": backend}
    # MLflow 3 starts a job runner beside the server (10 consumers polling its queue) for
    # GenAI evaluation and trace roll-ups, which modelyard never asks for: off unless the user
    # turns it on. It took more CPU than the server itself in the test suite (441 s of 3458 s).
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = os.environ.get(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"
    )
    if settings.artifacts_kms_key:  # every artifact it puts in S3 asks for SSE-KMS with the key
        env["MLFLOW_S3_UPLOAD_EXTRA_ARGS"] = json.dumps(
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": settings.artifacts_kms_key}
        )
    files = {}
    if settings.mlflow_password:
        command += ["--app-name", "basic-auth"]
        config = stack_dir(settings) / "mlflow" / "auth.ini"
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            # Read when the user store is empty: the first start creates this admin.
            "MLFLOW_AUTH_ADMIN_USERNAME": settings.mlflow_username or "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": settings.mlflow_password.get_secret_value(),
            # CSRF tokens must verify on every worker and across restarts: a stable key, derived
            # (one-way) from the admin password so there is no extra secret to keep.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": hmac.new(
                settings.mlflow_password.get_secret_value().encode(), b"mlflow-csrf", "sha256"
            ).hexdigest(),
        }
        files["auth.ini"] = _MLFLOW_AUTH.format(database=config.with_name("auth.db"))
    return Service(
        name="mlflow", url=_url(settings, port), health="/health", command=command, env=env,
        files=files,
    )  # fmt: skip


# Teammates read every experiment and model; writing needs a grant (`mlflow` auth REST API).
_MLFLOW_AUTH = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def _registry(settings: Settings, hashed: str | None) -> Service:
    folder = stack_dir(settings) / "registry"
    port = settings.stack_registry_port
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(folder / "data")},
            "delete": {"enabled": True},
        },
        "http": {
            "addr": _address(settings, port),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    files = {}
    if hashed:
        signed = signin.registry_config(settings, folder / "htpasswd")
        config["http"] |= {"tls": signed["tls"]}
        config["auth"] = signed["auth"]
        files["htpasswd"] = f"{settings.stack_username}:{hashed}\n"
    return Service(
        name="registry",
        url=_url(settings, port, signs_in=bool(hashed)),
        health="/v2/",
        command=["docker-registry", "serve", str(folder / "config.yml")],
        files={"config.yml": json.dumps(config, indent=2), **files},  # JSON is YAML
    )


def _prometheus(settings: Settings, hashed: str | None) -> Service:
    folder = stack_dir(settings) / "prometheus"
    targets = prometheus_targets_dir(settings)
    port = settings.stack_prometheus_port
    config = _prometheus_config(settings, signs_in=bool(hashed))
    return Service(
        name="prometheus",
        url=_url(settings, port, signs_in=bool(hashed)),
        health="/-/ready",
        command=[
            "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={_address(settings, port)}",
            "--web.enable-lifecycle",
            *_web_config_flag(folder, hashed),
        ],
        files={
            "prometheus.yml": json.dumps(config, indent=2),
            str(targets.relative_to(folder) / ".keep"): "",
            **_web_config_files(settings, hashed),
            **(signin.client_files(settings) if hashed else {}),
        },
    )


def _prometheus_config(settings: Settings, signs_in: bool) -> dict[str, Any]:
    folder = stack_dir(settings) / "prometheus"
    interval = f"{settings.prometheus_interval}s"
    alertmanager = _address(settings, settings.stack_alertmanager_port)
    itself = _address(settings, settings.stack_prometheus_port)
    # Its scrape of itself and its alerts to Alertmanager sign in like any client.
    client = signin.prometheus_client(settings, folder) if signs_in else {}
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        # Alerts and the drift recording rules (PSI per feature and of the predictions).
        "rule_files": [str(shipped_file("rules.yml"))],
        # What fires goes to the stack's Alertmanager (started with it by a plain `stack up`).
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}], **client}]
        },
        "scrape_configs": [
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [itself]}],
                **client,
            },
            _services_job(settings),
        ],
    }


def _services_job(settings: Settings) -> dict[str, Any]:
    """Deployed model servers: the deploy stage writes one file per service in the targets
    folder, and Prometheus picks files up and drops them without a restart. With serving TLS
    it verifies their certificates (and shows its own, under mutual TLS); each target says
    whether it speaks https (`__scheme__`), so services deployed before TLS still count."""
    return {
        "job_name": "modelyard",
        "file_sd_configs": [{"files": [str(prometheus_targets_dir(settings) / "*.json")]}],
        **servetls.scrape_config(settings),
    }


def refresh_services_scrape(settings: Settings, progress: Progress) -> None:
    """Bring a running stack Prometheus's scrape of the services in line with the settings
    (serving TLS turned on after it started): its configuration is written again and
    reloaded, with no restart and no lost data. Nothing happens when it already is."""
    folder = stack_dir(settings) / "prometheus"
    path = folder / "prometheus.yml"
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # never started here: `stack up` writes it as the settings say
    wanted = _services_job(settings)
    if wanted in current.get("scrape_configs", []):
        return
    state = stackstate.read_state(folder)
    if not state or not stackstate.alive(state.get("pid")):
        return  # written afresh when it next starts
    servetls.prepare(settings)
    current["scrape_configs"] = [
        job for job in current["scrape_configs"] if job.get("job_name") != wanted["job_name"]
    ] + [wanted]
    replace_file(path, json.dumps(current, indent=2).encode(), 0o600)
    request, context = _signed_in(settings, str(state["url"]) + "/-/reload", "POST")
    with urllib.request.urlopen(request, timeout=30, context=context):
        pass
    progress("prometheus: reloaded to scrape the services as the settings say (serving TLS)")


def _web_config_flag(folder: Path, hashed: str | None) -> list[str]:
    return [f"--web.config.file={folder / 'web.yml'}"] if hashed else []


def _web_config_files(settings: Settings, hashed: str | None) -> dict[str, str]:
    """Prometheus's and Alertmanager's TLS and user."""
    if not hashed:
        return {}
    return {"web.yml": json.dumps(signin.web_config(settings, hashed), indent=2)}


def _alertmanager(settings: Settings, hashed: str | None) -> Service:
    folder = stack_dir(settings) / "alertmanager"
    port = settings.stack_alertmanager_port
    routes, problems = _routes(settings)
    files = {}
    # Else `up` refuses, naming the problems; `status` and `down` need no configuration.
    if isinstance(routes, dict) and not problems:
        config, secrets = alerting.configuration(settings, routes, folder)
        files = {"alertmanager.yml": json.dumps(config, indent=2), **secrets}
    url = _url(settings, port, signs_in=bool(hashed))
    return Service(
        name="alertmanager",
        url=url,
        health="/-/ready",
        command=[
            _first_installed("prometheus-alertmanager", "alertmanager"),
            f"--config.file={folder / 'alertmanager.yml'}",
            f"--storage.path={folder / 'data'}",
            f"--web.listen-address={_address(settings, port)}",
            f"--web.external-url={url}",  # the links in its messages
            # No high-availability gossip: it would listen on 0.0.0.0:9094.
            "--cluster.listen-address=",
            *_web_config_flag(folder, hashed),
        ],
        files=files | _web_config_files(settings, hashed),
    )


def _routes(settings: Settings) -> tuple[object, list[str]]:
    """Alertmanager's routes as read (None when unreadable), and what keeps them and the
    settings from a working configuration."""
    source = settings.alert_routes or shipped_file("alertmanager.yml")
    try:
        routes = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError):
        routes = None
    return routes, alerting.problems(settings, routes, source)


def _first_installed(*commands: str) -> str:
    """Debian names the binary prometheus-alertmanager; upstream's tarball, alertmanager."""
    return next((c for c in commands if shutil.which(c)), commands[0])


def shipped_file(name: str) -> Path:
    """A file of infra/prometheus (rules.yml, alertmanager.yml), from the wheel or the checkout."""
    for folder in _SHIPPED:
        if (folder / name).is_file():
            return folder / name
    raise ModelyardError(f"modelyard's infra/prometheus/{name} is missing from this install")


def ensure_bucket(
    destination: str | None, kms_key: str | None = None, kms_only_policy: bool = True
) -> None:
    """An S3 artifact destination's bucket, created on first use with versioning (an
    overwritten artifact can be recovered) and default server-side encryption on. With
    `kms_key`, that encryption is SSE-KMS with the key, and (`kms_only_policy`) the bucket's
    policy refuses a put that does not ask for it (modelyard's statements only; the policy's
    others are kept).

    Credentials and endpoint come from the standard AWS chain and `MLFLOW_S3_ENDPOINT_URL`
    (S3-compatible stores), as the MLflow server will use them.
    """
    if not destination or not destination.startswith("s3://"):
        return
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise StackError(
            "an s3:// artifacts destination needs boto3: pip install 'modelyard[scale-out]'"
        ) from None
    bucket = destination.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)
    try:
        if not _bucket_exists(s3, bucket):
            region = s3.meta.region_name
            where = (
                {}
                if region in (None, "us-east-1")
                else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            )
            s3.create_bucket(Bucket=bucket, **where)
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        elif not kms_key:
            return
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": _default_encryption(kms_key),
                       "BucketKeyEnabled": bool(kms_key)}]})  # fmt: skip
        if kms_key and kms_only_policy:
            s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(_kms_only_policy(s3, bucket)))
    except (BotoCoreError, ClientError) as exc:
        raise StackError(f"S3 bucket {bucket} for the artifacts: {exc}") from None


def _bucket_exists(s3: Any, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        return False
    return True


def _default_encryption(kms_key: str | None) -> dict[str, str]:
    if kms_key:
        return {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key}
    return {"SSEAlgorithm": "AES256"}


_KMS_ONLY = "ModelyardArtifactsSseKms"  # the Sid prefix of modelyard's statements


def _kms_only_policy(s3: Any, bucket: str) -> dict[str, Any]:
    """The bucket's policy with statements that deny a put not asking for SSE-KMS (AWS's
    documented pair: another encryption asked for, or none), replacing any earlier ones of
    modelyard's and keeping everyone else's."""
    from botocore.exceptions import ClientError

    try:
        policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    except ClientError:
        policy = {"Version": "2012-10-17", "Statement": []}
    header = "s3:x-amz-server-side-encryption"
    ours = [
        {"Sid": f"{_KMS_ONLY}{name}", "Effect": "Deny", "Principal": {"AWS": "*"},
         "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*",
         "Condition": condition}
        for name, condition in (("Other", {"StringNotEquals": {header: "aws:kms"}}),
                                ("Missing", {"Null": {header: "true"}}))
    ]  # fmt: skip
    kept = [
        s for s in policy.get("Statement", []) if not str(s.get("Sid", "")).startswith(_KMS_ONLY)
    ]
    return policy | {"Statement": kept + ours}


# --- processes ----------------------------------------------------------------------------------


def _select(settings: Settings, names: list[str] | None) -> list[Service]:
    unknown = sorted(set(names or []) - set(SERVICES))
    if unknown:
        raise StackError(f"unknown stack service(s) {unknown}; choose from {list(SERVICES)}")
    return [s for s in plan(settings) if not names or s.name in names]


def _check_installed(services: list[Service]) -> None:
    signs_in = any("basic-auth" in s.command for s in services)
    if signs_in and importlib.util.find_spec("flask_wtf") is None:
        raise StackError("MLflow's sign-in needs Flask-WTF: pip install 'modelyard[team]'")
    missing = [s for s in services if shutil.which(s.command[0]) is None]
    if missing:
        packages = " ".join(PACKAGES[s.name] for s in missing)
        raise StackError(
            f"not installed: {', '.join(s.command[0] for s in missing)}; install with "
            f"`make stack` or `apt-get install {packages}`"
        )


def _check_auth(settings: Settings, services: list[Service]) -> None:
    """Beyond loopback, anyone on the network reaches the stack: MLflow and Prefect then
    must require sign-in."""
    if ipaddress.ip_address(_resolved(settings.stack_host)).is_loopback:
        return
    needed = {"mlflow": "MODELYARD_MLFLOW_PASSWORD", "prefect": "MODELYARD_PREFECT_AUTH_STRING"}
    needed |= dict.fromkeys(signin.SERVICES, "MODELYARD_STACK_PASSWORD")
    configured = {"mlflow": settings.mlflow_password, "prefect": settings.prefect_auth_string}
    configured |= dict.fromkeys(signin.SERVICES, settings.stack_password)
    missing = list(dict.fromkeys(
        needed[s.name] for s in services if s.name in needed and not configured[s.name]
    ))  # fmt: skip
    if missing:
        raise StackError(
            f"the stack would listen on {settings.stack_host} without sign-in: set "
            f"{' and '.join(missing)} (see docs/security.md), or keep MODELYARD_STACK_HOST "
            "on 127.0.0.1"
        )


def _resolved(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:  # unknown (an IPv6 literal too): count it as reachable from the network
        return "0.0.0.0"


def _check_alerting(settings: Settings, services: list[Service], progress: Progress) -> None:
    if not any(s.name == "alertmanager" for s in services):
        return
    _, found = _routes(settings)
    if found:
        raise StackError("alertmanager: " + "; ".join(found))
    channels = alerting.channels(settings)
    progress(
        f"alertmanager: alerts go to {' and '.join(channels)}"
        if channels
        else "alertmanager: no receiver set (MODELYARD_ALERT_WEBHOOK_URL or "
        "MODELYARD_ALERT_EMAIL_TO): alerts show in its UI only"
    )


def _check_signin(settings: Settings, services: list[Service]) -> None:
    """TLS and password settings that work, and the local CA's certificate when needed."""
    if not any(s.name in signin.SERVICES for s in services):
        return
    found = signin.problems(settings)
    if found:
        raise StackError("; ".join(found))
    signin.prepare(settings)


def _check_serving_tls(settings: Settings, services: list[Service]) -> None:
    """Prometheus scrapes the services over TLS with files that must exist when it starts."""
    if not any(s.name == "prometheus" for s in services):
        return
    if found := servetls.problems(settings):
        raise StackError("; ".join(found))
    servetls.prepare(settings)


def _check_same_settings(settings: Settings, services: list[Service]) -> None:
    """A running service started with other settings (sign-in turned on or off, another port)
    would never answer these: say so at once instead of waiting for it."""
    for service in services:
        state = stackstate.read_state(service.folder(settings))
        if state and stackstate.alive(state.get("pid")) and state.get("url") != service.url:
            raise StackError(
                f"{service.name} runs at {state.get('url')}, started with other settings than "
                f"these ({service.url}): `modelyard stack down {service.name}`, then `stack up` "
                "again"
            )


def _check_port_free(service: Service) -> None:
    host, port = urllib.parse.urlsplit(service.url).netloc.rsplit(":", 1)
    with socket.socket() as probe:
        if probe.connect_ex((host, int(port))) == 0:
            raise StackError(
                f"{service.name}: port {port} on {host} is taken by another program; free it or "
                f"choose another with MODELYARD_STACK_{service.name.upper()}_PORT"
            )


def _start(settings: Settings, service: Service) -> None:
    folder = service.folder(settings)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    write_files(service, folder)
    env = {**os.environ, **TELEMETRY_OFF, **service.env}
    with (folder / "log").open("ab") as log:
        process = subprocess.Popen(
            service.command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; stopped as a group by `down`
        )
    state = {"pid": process.pid, "url": service.url, "started": time.time()}
    (folder / "state.json").write_text(json.dumps(state))


def write_files(service: Service, folder: Path) -> None:
    """The service's configuration files, private to the stack's user: some hold secrets."""
    for name, text in service.files.items():
        replace_file(folder / name, text.encode(), 0o600)


def _wait_healthy(settings: Settings, service: Service, progress: Progress) -> None:
    folder = service.folder(settings)
    deadline = time.monotonic() + settings.stack_start_timeout
    announced = time.monotonic()
    while time.monotonic() < deadline:
        state = stackstate.read_state(folder)
        if not state or not stackstate.alive(state["pid"]):
            raise StackError(f"{service.name} exited while starting:\n{_tail(folder / 'log')}")
        if _healthy(settings, service):
            return
        if time.monotonic() - announced > 10:
            progress(f"{service.name}: still starting …")
            announced = time.monotonic()
        time.sleep(0.3)
    raise StackError(
        f"{service.name} did not answer {service.url}{service.health} within "
        f"{settings.stack_start_timeout:.0f} s:\n{_tail(folder / 'log')}"
    )


def _signed_in(
    settings: Settings, url: str, method: str = "GET"
) -> tuple[urllib.request.Request, ssl.SSLContext | None]:
    """A request to a stack service, with the stack's sign-in when it speaks https."""
    request = urllib.request.Request(url, method=method)
    access = signin.access(settings)
    if access and url.startswith("https://"):
        request.add_header("Authorization", access.header())
        return request, access.ssl_context()
    return request, None


def _healthy(settings: Settings, service: Service) -> bool:
    request, context = _signed_in(settings, service.url + service.health)
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(settings: Settings, service: Service) -> bool:
    folder = service.folder(settings)
    state = stackstate.read_state(folder)
    (folder / "state.json").unlink(missing_ok=True)
    pid = state.get("pid") if state else None
    if not stackstate.alive(pid):
        return False
    assert pid is not None
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while stackstate.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if stackstate.alive(pid):
        _signal_group(pid, signal.SIGKILL)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the service and the workers it forked


def _status(settings: Settings, service: Service) -> Status:
    state = stackstate.read_state(service.folder(settings))
    pid = state.get("pid") if state else None
    if not stackstate.alive(pid):
        return Status(service.name, service.url, False, None, "not running")
    healthy = _healthy(settings, service)
    return Status(service.name, service.url, healthy, pid, "" if healthy else "not answering")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
