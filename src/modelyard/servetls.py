"""HTTPS for deployed model services: the certificate from settings or the local CA, what
clients verify it with, and mutual TLS for /metrics and the slots' ports.

TLS ends at each host's nginx front door, and at each slot's own port (the deploy's checks
and Prometheus use those; clients use the front door). Between nginx and a slot a request
crosses a Unix socket on the host and stays plain. With `MODELYARD_SERVE_TLS=local` each model
and environment gets a certificate from the workspace's local CA naming its hosts; otherwise
`MODELYARD_SERVE_TLS_CERT` and `_KEY` (PEM text, or `*_FILE` paths) serve every host of
every environment and must name the address each host is reached at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard import certs, signin
from modelyard.config import Settings
from modelyard.errors import DeployFailed

CLIENT_NAME = "modelyard-client"  # the local CA's client certificate: checks and Prometheus


@dataclass(frozen=True)
class ServingTLS:
    certificate: str  # the chain, PEM
    key: str = field(repr=False)
    trust: Path | None  # CA file clients verify the chain with; None: the system's
    plain_http: str  # refuse | redirect
    client_ca: str = ""  # PEM; set: /metrics and the slots' ports ask for a certificate
    client: certs.ServerFiles | None = None  # what modelyard and Prometheus present then


def enabled(settings: Settings) -> bool:
    if settings.serve_tls == "auto":
        return bool(settings.serve_tls_cert or settings.serve_tls_cert_file)
    return settings.serve_tls == "local"


def problems(settings: Settings) -> list[str]:
    """Serving TLS settings that cannot work, each naming the setting and the fix."""
    found = _certificate_problems(settings) + _client_problems(settings)
    named = {"MODELYARD_SERVE_TLS_CERT_FILE": settings.serve_tls_cert_file,
             "MODELYARD_SERVE_TLS_KEY_FILE": settings.serve_tls_key_file,
             "MODELYARD_SERVE_TLS_CA": settings.serve_tls_ca,
             "MODELYARD_SERVE_CLIENT_CERT": settings.serve_client_cert,
             "MODELYARD_SERVE_CLIENT_KEY": settings.serve_client_key}  # fmt: skip
    if settings.serve_client_ca not in (None, "", "local"):
        named["MODELYARD_SERVE_CLIENT_CA"] = Path(str(settings.serve_client_ca))
    return found + [f"{name}={path} cannot be read" for name, path in named.items()
                    if path is not None and not signin.readable(path)]  # fmt: skip


def _certificate_problems(settings: Settings) -> list[str]:
    has_cert = bool(settings.serve_tls_cert or settings.serve_tls_cert_file)
    has_key = bool(settings.serve_tls_key or settings.serve_tls_key_file)
    if settings.serve_tls == "local" and (has_cert or has_key):
        return ["MODELYARD_SERVE_TLS=local issues the certificate itself: unset "
                "MODELYARD_SERVE_TLS_CERT and _KEY (and their _FILE forms), or set "
                "MODELYARD_SERVE_TLS=auto to serve them"]  # fmt: skip
    found = []
    for name, text, path in (
        ("CERT", settings.serve_tls_cert, settings.serve_tls_cert_file),
        ("KEY", settings.serve_tls_key, settings.serve_tls_key_file),
    ):
        if text and path:
            found.append(f"MODELYARD_SERVE_TLS_{name} and MODELYARD_SERVE_TLS_{name}_FILE are "
                         "both set: keep one")  # fmt: skip
    if settings.serve_tls != "off" and has_cert != has_key:
        found.append("MODELYARD_SERVE_TLS_CERT and MODELYARD_SERVE_TLS_KEY go together (or "
                     "their _FILE forms): set both, or MODELYARD_SERVE_TLS=local for "
                     "certificates from the workspace's local CA")  # fmt: skip
    return found


def _client_problems(settings: Settings) -> list[str]:
    if not settings.serve_client_ca:
        return []
    if not enabled(settings):
        return ["MODELYARD_SERVE_CLIENT_CA asks for mutual TLS, which needs TLS: set "
                "MODELYARD_SERVE_TLS=local or MODELYARD_SERVE_TLS_CERT and _KEY"]  # fmt: skip
    own = (settings.serve_client_cert, settings.serve_client_key)
    if settings.serve_client_ca != "local" and not all(own):
        return ["MODELYARD_SERVE_CLIENT_CA is a CA of your own: set MODELYARD_SERVE_CLIENT_CERT "
                "and _KEY to a client certificate it signed, which the deploy's checks and "
                "Prometheus present (or MODELYARD_SERVE_CLIENT_CA=local)"]  # fmt: skip
    if settings.serve_client_ca == "local" and any(own):
        return ["MODELYARD_SERVE_CLIENT_CA=local issues the client certificate itself: unset "
                "MODELYARD_SERVE_CLIENT_CERT and _KEY"]  # fmt: skip
    return []


def serving_tls(
    settings: Settings, model: str, environment: str, hosts: list[str]
) -> ServingTLS | None:
    """The TLS material one environment's services get, or None for plain HTTP. `hosts`: the
    addresses its hosts are reached at, which the certificate must name."""
    if not enabled(settings):
        return None
    if found := problems(settings):
        raise DeployFailed("; ".join(found))
    if settings.serve_tls == "local":
        names = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
        files = certs.local_server_files(signin.tls_dir(settings), names,
                                         name=f"serve-{model}-{environment}")  # fmt: skip
        chain, key = files.certificate.read_bytes(), files.key.read_bytes()
    else:
        chain, key = _configured_pair(settings)
        found = certs.problems(chain, key, hosts, "MODELYARD_SERVE_TLS_CERT", trust(settings))
        if found:
            raise DeployFailed("; ".join(found))
    return ServingTLS(
        certificate=chain.decode(),
        key=key.decode(),
        trust=trust(settings),
        plain_http=settings.serve_plain_http,
        client_ca=_client_ca(settings),
        client=client_files(settings),
    )


def _configured_pair(settings: Settings) -> tuple[bytes, bytes]:
    chain = (settings.serve_tls_cert or "").encode() or _read(settings.serve_tls_cert_file)
    key = settings.serve_tls_key.get_secret_value().encode() if settings.serve_tls_key else b""
    return chain, key or _read(settings.serve_tls_key_file)


def _read(path: Path | None) -> bytes:
    return path.read_bytes() if path else b""


def trust(settings: Settings) -> Path | None:
    """The CA file the services' certificates are verified with; None: the system's."""
    if settings.serve_tls_ca:
        return settings.serve_tls_ca
    if settings.serve_tls == "local":
        return certs.local_files(signin.tls_dir(settings)).ca
    return None


def _client_ca(settings: Settings) -> str:
    if not settings.serve_client_ca:
        return ""
    if settings.serve_client_ca == "local":
        return certs.local_files(signin.tls_dir(settings)).ca.read_text()
    return Path(settings.serve_client_ca).read_text()


def client_files(settings: Settings) -> certs.ServerFiles | None:
    """The client certificate the deploy's checks and Prometheus present under mutual TLS."""
    if not settings.serve_client_ca:
        return None
    if settings.serve_client_ca == "local":
        return certs.local_client_files(signin.tls_dir(settings), CLIENT_NAME)
    assert settings.serve_client_cert and settings.serve_client_key  # problems() said so
    return certs.ServerFiles(settings.serve_client_cert, settings.serve_client_key,
                             Path(settings.serve_client_ca))  # fmt: skip


def role_vars(tls: ServingTLS | None) -> dict[str, Any]:
    """The deploy role's model_service_tls_* variables ("" everywhere: plain HTTP)."""
    if tls is None:
        return {"model_service_tls_cert": ""}
    client = tls.client
    return {
        "model_service_tls_cert": tls.certificate,
        "model_service_tls_key": tls.key,
        "model_service_tls_trust": tls.trust.read_text() if tls.trust else "",
        "model_service_tls_plain_http": tls.plain_http,
        "model_service_tls_ciphers": certs.CIPHERS,
        "model_service_tls_client_ca": tls.client_ca,
        "model_service_tls_client_cert": client.certificate.read_text() if client else "",
        "model_service_tls_client_key": client.key.read_text() if client else "",
    }


def secrets(variables: dict[str, Any]) -> tuple[str, ...]:
    """The private keys among the role's variables, as they would show in Ansible's output
    (whole, and JSON-escaped), for it to be scrubbed of them."""
    keys = [str(variables.get(k, "")) for k in ("model_service_tls_key",
                                                  "model_service_tls_client_key")]  # fmt: skip
    return tuple(form for key in keys if key for form in (key, key.replace("\n", "\\n")))


def prepare(settings: Settings) -> None:
    """The local CA (and its client certificate under mutual TLS) before Prometheus reads them."""
    if settings.serve_tls == "local":
        certs.local_ca(signin.tls_dir(settings))
    client_files(settings)


def scrape_config(settings: Settings) -> dict[str, Any]:
    """What Prometheus's job for the services adds to reach them over TLS: the CA to verify
    with and, under mutual TLS, the client certificate ({} for plain HTTP)."""
    if not enabled(settings):
        return {}
    found: dict[str, str] = {}
    if ca := trust(settings):
        found["ca_file"] = str(ca)
    if client := client_files(settings):
        found |= {"cert_file": str(client.certificate), "key_file": str(client.key)}
    return {"tls_config": found} if found else {}
