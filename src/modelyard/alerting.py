"""Alertmanager's configuration for the stack: the shipped routes, receivers from settings.

Prometheus evaluates infra/prometheus/rules.yml and sends what fires to Alertmanager, whose
routes (infra/prometheus/alertmanager.yml, or a team's own file) group, repeat and inhibit.
The receiver `people` gets the channels the settings name: a webhook, and mail through an
SMTP relay. Secrets go to files of their own that the configuration points at wherever
Alertmanager 0.25 (Debian 12's) reads one: the relay's password and the webhook's bearer
token. A webhook URL has no file form before 0.26, so the configuration is private too.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

from modelyard.config import Settings

RECEIVER = "people"
SMTP_PASSWORD_FILE = "smtp-password"
WEBHOOK_TOKEN_FILE = "webhook-token"

Document = dict[str, Any]  # a YAML mapping as loaded: Alertmanager's schema, not ours


def problems(settings: Settings, routes: object, source: Path) -> list[str]:
    """What keeps these settings and routes from a working configuration, each naming the
    setting or the file to change."""
    if routes is None:
        return [f"{source} cannot be read as YAML (MODELYARD_ALERT_ROUTES chooses the file)"]
    found = []
    if not _has_receiver(routes):
        found.append(
            f"{source} has no receiver named `{RECEIVER}`: add `receivers: [{{name: {RECEIVER}}}]` "
            "and route to it (MODELYARD_ALERT_ROUTES chooses the file)"
        )
    if settings.alert_email_to and not settings.alert_smtp_relay:
        found.append(
            "MODELYARD_ALERT_EMAIL_TO needs MODELYARD_ALERT_SMTP_RELAY, the host:port of the "
            "SMTP relay that sends the mail"
        )
    if settings.alert_smtp_relay and not _host_and_port(settings.alert_smtp_relay):
        found.append(
            f"MODELYARD_ALERT_SMTP_RELAY={settings.alert_smtp_relay!r} is not host:port "
            "(e.g. smtp.example.com:587)"
        )
    if settings.alert_smtp_password and not settings.alert_smtp_username:
        found.append("MODELYARD_ALERT_SMTP_PASSWORD needs MODELYARD_ALERT_SMTP_USERNAME")
    if settings.alert_webhook_token and not settings.alert_webhook_url:
        found.append("MODELYARD_ALERT_WEBHOOK_TOKEN needs MODELYARD_ALERT_WEBHOOK_URL")
    return found


def configuration(
    settings: Settings, routes: Document, folder: Path
) -> tuple[Document, dict[str, str]]:
    """Alertmanager's configuration document, and the secret files (name: content) to write
    beside it in `folder`, which the document names by absolute path."""
    config = copy.deepcopy(routes)
    secrets: dict[str, str] = {}
    receiver = next(r for r in config["receivers"] if r.get("name") == RECEIVER)
    if settings.alert_webhook_url:
        receiver["webhook_configs"] = [_webhook(settings, folder, secrets)]
    if settings.alert_email_to and settings.alert_smtp_relay:
        config["global"] = config.get("global") or {}
        config["global"] |= _smtp(settings, folder, secrets)
        mail = {"to": _addresses(settings.alert_email_to), "send_resolved": True}
        receiver["email_configs"] = [mail]
    return config, secrets


def channels(settings: Settings) -> list[str]:
    """Where alerts go, in words, with no secret in them: for `stack up`'s progress."""
    named = []
    if settings.alert_webhook_url:
        named.append("a webhook")
    if settings.alert_email_to and settings.alert_smtp_relay:
        named.append(f"mail to {_addresses(settings.alert_email_to)}")
    return named


def _webhook(settings: Settings, folder: Path, secrets: dict[str, str]) -> Document:
    assert settings.alert_webhook_url is not None
    url = settings.alert_webhook_url.get_secret_value()
    webhook: Document = {"url": url, "send_resolved": True}
    if settings.alert_webhook_token:
        secrets[WEBHOOK_TOKEN_FILE] = settings.alert_webhook_token.get_secret_value()
        token = {"type": "Bearer", "credentials_file": str(folder / WEBHOOK_TOKEN_FILE)}
        webhook["http_config"] = {"authorization": token}
    return webhook


def _smtp(settings: Settings, folder: Path, secrets: dict[str, str]) -> Document:
    smtp: Document = {
        "smtp_smarthost": settings.alert_smtp_relay,
        "smtp_from": settings.alert_email_from or f"modelyard-alerts@{socket.gethostname()}",
        "smtp_require_tls": settings.alert_smtp_tls,
    }
    if settings.alert_smtp_username:
        smtp["smtp_auth_username"] = settings.alert_smtp_username
    if settings.alert_smtp_password:
        secrets[SMTP_PASSWORD_FILE] = settings.alert_smtp_password.get_secret_value()
        smtp["smtp_auth_password_file"] = str(folder / SMTP_PASSWORD_FILE)
    return smtp


def _addresses(value: str) -> str:
    return ", ".join(a.strip() for a in value.split(",") if a.strip())


def _has_receiver(routes: object) -> bool:
    receivers = routes.get("receivers") if isinstance(routes, dict) else None
    return isinstance(receivers, list) and any(
        isinstance(r, dict) and r.get("name") == RECEIVER for r in receivers
    )


def _host_and_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit()
