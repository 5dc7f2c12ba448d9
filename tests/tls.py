"""TLS clients for the tests: what a server accepts, and the certificate it presents."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509

# Suites OpenSSL offers by default that modelyard's list leaves out: CBC with SHA-1 (ECDSA, as
# the local CA's keys are), and RSA key exchange without forward secrecy.
WEAK_CIPHERS = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:AES128-SHA:AES256-GCM-SHA384"


def client(
    ca: Path | None,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] = (
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ),
    ciphers: str = "",
    certificate: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    """A verifying client: trusting `ca` (the system's when None), speaking `versions`,
    offering `ciphers` (OpenSSL's default list when empty), presenting `certificate`."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version, context.maximum_version = versions
    if versions[0] < ssl.TLSVersion.TLSv1_2 or ciphers:
        # OpenSSL's default security level keeps a client from even offering these.
        context.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
    if certificate:
        context.load_cert_chain(*certificate)
    return context


def handshake(host: str, port: int, context: ssl.SSLContext, name: str = "") -> x509.Certificate:
    """The certificate the server presents to a completed handshake, which raises when the
    server or the client refuses. A TLS 1.3 server asks for a client certificate after the
    handshake: a byte read proves it accepted the client."""
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name or host) as tls,
    ):
        tls.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if not tls.recv(1):
            raise ssl.SSLError("the server closed the connection without an answer")
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def assert_modern_tls_only(host: str, port: int, ca: Path, name: str = "") -> None:
    """TLS 1.2 and 1.3 with strong suites complete, verified against `ca`; TLS 1.0 and 1.1,
    weak suites and a client that does not trust `ca` are refused. Each refusal is checked
    for its reason, so a server that is merely down cannot pass: nginx sends TLS's alert,
    Python's server (uvloop) closes the connection mid-handshake without one."""
    handshake(host, port, client(ca), name)
    handshake(host, port, client(ca, (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)), name)
    old = client(ca, (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1))
    refused(host, port, old, name, "protocol version", "unsupported protocol")
    weak = client(ca, (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2), WEAK_CIPHERS)
    refused(host, port, weak, name, "handshake failure", "no shared cipher", "no cipher")
    refused(host, port, client(None), name, "certificate verify failed")


def refused(host: str, port: int, context: ssl.SSLContext, name: str, *reasons: str) -> str:
    """The error of a handshake the server (or this client) refuses for one of `reasons`."""
    try:
        handshake(host, port, context, name)
    except (ssl.SSLError, ConnectionResetError) as exc:
        text = str(exc).lower()
        reasons += ("eof occurred in violation of protocol",)  # closed mid-handshake
        assert any(r in text for r in reasons), f"refused for another reason: {exc!r}"
        return text
    raise AssertionError(f"{host}:{port} accepted a handshake it should refuse ({reasons})")
