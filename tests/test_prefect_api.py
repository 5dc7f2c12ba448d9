"""The REST client triggers use rides out a busy Prefect server: a 503 (its SQLite database
locked under load, as seen in CI) or a dropped connection is retried; a real refusal is not."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from modelyard import trigger
from modelyard.config import Settings
from modelyard.errors import ModelyardError
from modelyard.ports import free_port
from modelyard.trigger import PrefectApi


class Busy(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next status of the class's script, then 200."""

    script: ClassVar[list[int]] = []
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Busy.seen.append(self.path)
        status = Busy.script.pop(0) if Busy.script else 200
        body = json.dumps({"ok": status == 200}).encode()
        self.send_response(status)
        if status == 503:
            self.send_header("retry-after", "0")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The backoff's steps, a hundredth as long: the tests count the calls, not the seconds.
    monkeypatch.setattr(trigger, "RETRY_DELAYS", tuple(d / 100 for d in trigger.RETRY_DELAYS))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Busy)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    Busy.seen.clear()
    yield f"http://127.0.0.1:{httpd.server_port}/api"
    httpd.shutdown()


def test_a_busy_server_is_asked_again(server: str) -> None:
    Busy.script = [503, 503, 429]
    response = PrefectApi(server, Settings()).post("deployments/filter", {})
    assert response.json() == {"ok": True} and len(Busy.seen) == 4


def test_a_refusal_is_not_retried_and_names_the_call(server: str) -> None:
    Busy.script = [404]
    with pytest.raises(ModelyardError, match="Prefect refused deployments/x/create_flow_run: 404"):
        PrefectApi(server, Settings()).post("deployments/x/create_flow_run", {})
    assert len(Busy.seen) == 1
