"""The server's own TLS on its TCP port (a slot's port, for the deploy's checks and
Prometheus): modern TLS only, mutual TLS when asked, the front door's Unix socket plain."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard import certs
from tests.serving import TOKEN, Built, Server, build_example
from tests.tls import assert_modern_tls_only, client, handshake, refused


@pytest.fixture(scope="module")
def ads(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_example("ad_clicks", tmp_path_factory.mktemp("ads"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ca")


def tls_server(ads: Built, ca: Path, tmp_path: Path, **env: str) -> Server:
    files = certs.local_server_files(ca, ["127.0.0.1", "localhost"], name="slot")
    server = Server(ads.bundle.path, ads.public_key, workers=1,
                    MODELYARD_SERVE_TLS_CERT_FILE=str(files.certificate),
                    MODELYARD_SERVE_TLS_KEY=files.key.read_text(),
                    MODELYARD_SERVE_SOCKET=str(tmp_path / "slot.sock"), **env)  # fmt: skip
    # The parent binds the Unix socket; the worker the TCP port, after loading the model.
    deadline = time.monotonic() + 60
    while not _accepts("127.0.0.1", server.port):
        assert server.process.poll() is None and time.monotonic() < deadline, server.stop()
        time.sleep(0.2)
    return server


def _example(built: Built) -> dict[str, Any]:
    return json.loads((built.bundle.path / "schema.json").read_text())["example"]


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def test_the_port_speaks_modern_tls_only_and_the_socket_stays_plain(ads, ca, tmp_path):
    server = tls_server(ads, ca, tmp_path)
    try:
        assert_modern_tls_only("127.0.0.1", server.port, ca / "ca.pem")
        https = httpx.post(f"https://127.0.0.1:{server.port}/invocations",
                           json={"inputs": _example(ads)}, verify=client(ca / "ca.pem"),
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)  # fmt: skip
        assert https.status_code == 200, https.text
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP gets no answer
            httpx.get(f"http://127.0.0.1:{server.port}/health/ready", timeout=10)
        over_socket = httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "slot.sock")))
        assert over_socket.get("http://slot/version").json()["model_version"] == "7"
    finally:
        server.stop()


def test_with_a_client_ca_the_port_asks_every_client_for_a_certificate(ads, ca, tmp_path):
    modelyard = certs.local_client_files(ca, "modelyard-scraper")
    other_ca = certs.local_client_files(tmp_path / "other", "stranger")
    server = tls_server(ads, ca, tmp_path, MODELYARD_SERVE_CLIENT_CA_FILE=str(ca / "ca.pem"))
    try:
        trusted = (modelyard.certificate, modelyard.key)
        handshake("127.0.0.1", server.port, client(ca / "ca.pem", certificate=trusted))
        for certificate in (None, (other_ca.certificate, other_ca.key)):
            refused("127.0.0.1", server.port, client(ca / "ca.pem", certificate=certificate), "",
                    "certificate required", "unknown ca", "closed the connection")  # fmt: skip
        # The front door's socket is on the host only: no certificate asked there.
        over_socket = httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "slot.sock")))
        assert over_socket.get("http://slot/metrics").status_code == 200
    finally:
        server.stop()


def test_a_key_that_is_not_the_certificates_is_refused_at_start(ads, ca, tmp_path):
    files = certs.local_server_files(ca, ["127.0.0.1"], name="slot")
    other = certs.local_server_files(tmp_path, ["127.0.0.1"], name="other")
    server = Server(ads.bundle.path, ads.public_key, workers=1,
                    MODELYARD_SERVE_TLS_CERT_FILE=str(files.certificate),
                    MODELYARD_SERVE_TLS_KEY_FILE=str(other.key))  # fmt: skip
    assert server.process.wait(timeout=60) == 3
    out = server.stop()
    assert "refusing to serve: MODELYARD_SERVE_TLS_CERT, _KEY" in out
    assert other.key.read_text() not in out
