"""A webhook endpoint for GitHub push events: a verified push starts the pipeline once.

`POST /hooks/github` checks `X-Hub-Signature-256` (HMAC-SHA256 of the raw body with the shared
secret, compared in constant time) before reading anything else; a missing or wrong signature
is a 401. Each `X-GitHub-Delivery` id is recorded in SQLite before the trigger runs, so a
replayed or redelivered delivery is answered 200 and starts nothing. If the trigger fails the
record is removed and the answer is a 502, so GitHub's redelivery can try again.

The app knows nothing of Prefect: the CLI passes `on_push`, which starts the runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("modelyard.webhook")
MAX_BODY = 5 * 1024 * 1024
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Push:
    delivery: str
    repository: str  # clone URL
    aliases: tuple[str, ...]  # the same repository's other URLs (ssh, git, html)
    branch: str
    commit: str
    pusher: str


OnPush = Callable[[Push], list[str]]  # returns what it started, for the response


class Deliveries:
    """Delivery ids already acted on; the primary key makes a concurrent replay lose."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY, received REAL, event TEXT)"
        )

    def claim(self, delivery: str, event: str) -> bool:
        try:
            self.db.execute(
                "INSERT INTO deliveries VALUES (?, ?, ?)", (delivery, time.time(), event)
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def release(self, delivery: str) -> None:
        self.db.execute("DELETE FROM deliveries WHERE id = ?", (delivery,))


class GitHubWebhook:
    def __init__(
        self, secret: str, deliveries: Deliveries, on_push: OnPush, branches: list[str]
    ) -> None:
        if not secret:
            raise ValueError("a webhook needs a secret")
        self.secret = secret.encode()
        self.deliveries = deliveries
        self.on_push = on_push
        self.branches = set(branches)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, answer = await self._handle(scope, receive)
        body = json.dumps(answer).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: dict[str, Any], receive: Receive) -> tuple[int, dict[str, Any]]:
        if scope["path"] != "/hooks/github":
            return 404, {"error": "no such route; GitHub deliveries go to /hooks/github"}
        if scope["method"] != "POST":
            return 405, {"error": "POST only"}
        body = await _body(receive)
        if body is None:
            return 413, {"error": f"payload over {MAX_BODY} bytes"}
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self._signed(body, headers.get("x-hub-signature-256", "")):
            log.warning("refused a delivery with a missing or wrong signature")
            return 401, {"error": "missing or invalid X-Hub-Signature-256"}
        event = headers.get("x-github-event", "")
        delivery = headers.get("x-github-delivery", "")
        if event == "ping":
            return 200, {"ok": True, "zen": "pong"}
        if event != "push":
            return 202, {"ignored": f"event {event!r}; only push events start runs"}
        if not delivery:
            return 400, {"error": "missing X-GitHub-Delivery"}
        try:
            push = parse_push(json.loads(body), delivery)
        except (ValueError, KeyError, TypeError) as exc:
            return 400, {"error": f"not a GitHub push payload: {exc}"}
        if push is None or push.branch not in self.branches:
            return 202, {"ignored": "not a push of a watched branch's head"}
        if not self.deliveries.claim(delivery, event):
            log.info("delivery %s seen before: ignored", delivery)
            return 200, {"duplicate": delivery}
        try:
            # In a thread: the trigger talks to Prefect synchronously, and blocks for a second.
            started = await asyncio.to_thread(self.on_push, push)
        except Exception as exc:  # the CLI's trigger: server down, no deployment, …
            self.deliveries.release(delivery)  # let GitHub's redelivery try again
            log.error("delivery %s: the pipeline did not start: %s", delivery, exc)
            return 502, {"error": f"the pipeline did not start: {exc}"}
        log.info("delivery %s: %s@%s started %s", delivery, push.branch, push.commit[:8], started)
        return 200, {"started": started}

    def _signed(self, body: bytes, header: str) -> bool:
        scheme, _, supplied = header.partition("=")
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return scheme == "sha256" and hmac.compare_digest(supplied.encode(), expected.encode())


def parse_push(payload: dict[str, Any], delivery: str) -> Push | None:
    """The branch head a push moved, or None for tags and deleted branches."""
    ref: str = payload["ref"]
    if not ref.startswith("refs/heads/") or payload.get("deleted"):
        return None
    repo = payload["repository"]
    urls = [repo.get(k) for k in ("clone_url", "ssh_url", "git_url", "html_url")]
    urls = [u for u in urls if isinstance(u, str) and u]
    return Push(
        delivery=delivery,
        repository=urls[0],
        aliases=tuple(urls[1:]),
        branch=ref.removeprefix("refs/heads/"),
        commit=str(payload["after"]),
        pusher=str((payload.get("pusher") or {}).get("name", "")),
    )


async def _body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def sign(secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 value GitHub would send (for tests and `curl` checks)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
