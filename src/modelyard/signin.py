"""The stack's sign-in: TLS and a password for its registry, Prometheus and Alertmanager.

With `MODELYARD_STACK_PASSWORD` set, each of the three serves HTTPS only and asks for basic
auth. Each does both itself (Prometheus's and Alertmanager's web configuration, the
registry's `http.tls` and `htpasswd`), so no plain port is left behind a proxy for a local
user to go round it. The password reaches the servers only as a bcrypt hash; modelyard's own
clients (the health checks, the push, the drift and canary queries, Prometheus's scrape of
itself and its alerts to Alertmanager) present it and trust the stack's CA.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard import certs, stackstate
from modelyard.config import Settings
from modelyard.errors import ModelyardError

SERVICES = ("registry", "prometheus", "alertmanager")
PASSWORD_FILE = "stack-password"  # Prometheus's own client reads it: scraping and alerting
_BCRYPT_ROUNDS = 10  # checked on every request by the registry; cost 10 takes ~50 ms


@dataclass(frozen=True)
class Access:
    """How a client signs in to the stack: credentials, and the CA to trust (None: the
    system's)."""

    username: str
    password: str = field(repr=False)
    ca: Path | None

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.password

    def credentials(self) -> str:
        """base64 of `user:password`: basic auth's token, and a Docker config's `auth`."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def header(self) -> str:
        return "Basic " + self.credentials()

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def access(settings: Settings) -> Access | None:
    """The sign-in the stack's settings ask for, or None when it has none."""
    if not settings.stack_password:
        return None
    return Access(settings.stack_username, settings.stack_password.get_secret_value(),
                  trusted_ca(settings))  # fmt: skip


def trusted_ca(settings: Settings) -> Path | None:
    if settings.stack_ca:
        return settings.stack_ca
    if settings.stack_tls_cert:
        return None  # a certificate of the team's own: the system's trust store knows its CA
    return _local_files(settings).ca


def server_files(settings: Settings) -> certs.ServerFiles:
    """Where the servers' certificate and key are: the settings', else the local CA's."""
    if settings.stack_tls_cert and settings.stack_tls_key:
        ca = settings.stack_ca or settings.stack_tls_cert
        return certs.ServerFiles(settings.stack_tls_cert, settings.stack_tls_key, ca)
    return _local_files(settings)


def problems(settings: Settings) -> list[str]:
    """Sign-in settings that cannot work, each naming the setting."""
    if not settings.stack_password:
        return []
    if bool(settings.stack_tls_cert) != bool(settings.stack_tls_key):
        return ["MODELYARD_STACK_TLS_CERT and MODELYARD_STACK_TLS_KEY go together: set both, "
                "or neither for a certificate from the stack's local CA"]  # fmt: skip
    named = {"MODELYARD_STACK_TLS_CERT": settings.stack_tls_cert,
             "MODELYARD_STACK_TLS_KEY": settings.stack_tls_key,
             "MODELYARD_STACK_CA": settings.stack_ca}  # fmt: skip
    return [f"{name}={path} cannot be read" for name, path in named.items()
            if path is not None and not readable(path)]  # fmt: skip


def prepare(settings: Settings) -> None:
    """The local CA and the host's certificate from it, when the settings bring none."""
    if settings.stack_password and not settings.stack_tls_cert:
        hosts = list(dict.fromkeys([settings.stack_host, "localhost", "127.0.0.1"]))
        certs.local_server_files(tls_dir(settings), hosts)


def password_hash(settings: Settings) -> str:
    try:
        import bcrypt  # the `team` extra
    except ImportError:
        raise ModelyardError(
            "the stack's sign-in (MODELYARD_STACK_PASSWORD) needs bcrypt: "
            "pip install 'modelyard[team]'"
        ) from None
    assert settings.stack_password is not None
    secret = settings.stack_password.get_secret_value().encode()
    return bcrypt.hashpw(secret, bcrypt.gensalt(_BCRYPT_ROUNDS)).decode()


def web_config(settings: Settings, hashed: str) -> dict[str, Any]:
    """Prometheus's and Alertmanager's `--web.config.file`: TLS 1.2 or newer, one user."""
    files = server_files(settings)
    return {
        "tls_server_config": {
            "cert_file": str(files.certificate),
            "key_file": str(files.key),
            "min_version": "TLS12",
        },
        "basic_auth_users": {settings.stack_username: hashed},
    }


def registry_config(settings: Settings, htpasswd: Path) -> dict[str, Any]:
    """The registry's `http.tls` and `auth` sections."""
    files = server_files(settings)
    return {
        "tls": {"certificate": str(files.certificate), "key": str(files.key),
                "minimumtls": "tls1.2"},
        "auth": {"htpasswd": {"realm": "modelyard stack", "path": str(htpasswd)}},
    }  # fmt: skip


def prometheus_client(settings: Settings, folder: Path) -> dict[str, Any]:
    """What Prometheus adds to a scrape or an Alertmanager entry to reach a signed-in
    service: HTTPS, the password from a file beside its configuration, the stack's CA."""
    client: dict[str, Any] = {
        "scheme": "https",
        "basic_auth": {"username": settings.stack_username,
                       "password_file": str(folder / PASSWORD_FILE)},
    }  # fmt: skip
    ca = trusted_ca(settings)
    if ca:
        client["tls_config"] = {"ca_file": str(ca)}
    return client


def client_files(settings: Settings) -> dict[str, str]:
    """The file beside Prometheus's configuration its own client reads the password from."""
    found = access(settings)
    return {PASSWORD_FILE: found.password} if found else {}


def _local_files(settings: Settings) -> certs.ServerFiles:
    return certs.local_files(tls_dir(settings))


def tls_dir(settings: Settings) -> Path:
    """The workspace's local CA and the certificates it issued (the stack's, the services')."""
    return stackstate.stack_dir(settings.workspace) / "tls"


def readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True
