"""Run the serving app: verify the bundle, then one worker process per core, each serving HTTP
with `modelyard.serve.http` on uvloop.

Each worker binds its own SO_REUSEPORT socket with TCP_NODELAY set before listening (accepted
connections inherit it). A socket shared without TCP_NODELAY (uvicorn's own `--workers`) makes
keep-alive clients wait on Nagle's algorithm for ~40 ms per response.

With MODELYARD_SERVE_SOCKET the workers also accept on one shared Unix socket: the deploy
role's nginx front door reaches the live slot through a symlink to it, so moving traffic
between slots is a rename, not an nginx reload that would drop clients' idle connections.

With a certificate (MODELYARD_SERVE_TLS_CERT and _KEY, as PEM text or as *_FILE paths) the TCP
port speaks TLS 1.2+ only, and with MODELYARD_SERVE_CLIENT_CA it asks every client for a
certificate (that port is for the deploy's checks and Prometheus; clients use the front door).
The Unix socket stays plain: nginx ended TLS already, and the socket never leaves the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# The supervisor imports as little as it can: every page it holds is counted again in each
# worker it forks (RSS). Its signature check (cryptography) runs in a child of its own
# (`_refusal_apart`); the workers check the files against what that child verified (hashlib),
# and load cryptography only to open an encrypted bundle or serve TLS.
if TYPE_CHECKING:  # the app's module loads ONNX Runtime: workers import it, the parent need not
    from modelyard.manifest import VerifiedBundle
    from modelyard.serve.app import ServingApp

log = logging.getLogger("modelyard.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Serving settings from MODELYARD_* variables; secrets are never logged."""

    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    tokens: list[str] = field(default_factory=list, repr=False)
    trusted_keys: str = field(default="", repr=False)
    max_body_bytes: int = 5 * 1024 * 1024
    max_rows: int = 10_000
    socket: str = ""
    # A shadow's slot: the serving version's bundle, which copied requests are compared with.
    reference: Path | None = None
    # TLS on the TCP port (PEM): certificate chain, key, and the CA client certificates need.
    # Keys that may open an encrypted bundle (base64, MODELYARD_BUNDLE_KEY), not parsed yet.
    bundle_keys: str = field(default="", repr=False)
    tls_cert: bytes = field(default=b"", repr=False)
    tls_key: bytes = field(default=b"", repr=False)
    client_ca: bytes = field(default=b"", repr=False)
    # (manifest digest, signing key id) of the bundle and the reference, once the supervisor's
    # child has verified their signatures: the workers check the files against those digests
    # (modelyard.manifest.vouched) and never load cryptography.
    vouched: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, bundle: Path, **overrides: object) -> ServeConfig:
        env = os.environ
        values: dict[str, object] = {
            "bundle": bundle,
            "host": env.get("MODELYARD_SERVE_HOST", "127.0.0.1"),
            "port": int(env.get("MODELYARD_SERVE_PORT", "8080")),
            "workers": int(env.get("MODELYARD_SERVE_WORKERS", str(os.cpu_count() or 1))),
            # Several comma-separated tokens are all accepted: rotate without downtime.
            "tokens": [t for t in env.get("MODELYARD_SERVE_TOKEN", "").split(",") if t.strip()],
            "trusted_keys": env.get("MODELYARD_TRUSTED_KEYS", "") or _read_keys_file(bundle),
            "max_body_bytes": int(env.get("MODELYARD_SERVE_MAX_BODY_BYTES", str(5 * 1024 * 1024))),
            "max_rows": int(env.get("MODELYARD_SERVE_MAX_ROWS", "10000")),
            "socket": env.get("MODELYARD_SERVE_SOCKET", ""),
            "reference": _path(env.get("MODELYARD_SHADOW_REFERENCE", "")),
            "bundle_keys": _pem("MODELYARD_BUNDLE_KEY").decode(),
            "tls_cert": _pem("MODELYARD_SERVE_TLS_CERT"),
            "tls_key": _pem("MODELYARD_SERVE_TLS_KEY"),
            "client_ca": _pem("MODELYARD_SERVE_CLIENT_CA"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _path(value: str) -> Path | None:
    return Path(value) if value else None


def _pem(name: str) -> bytes:
    """A secret's text from the variable `name`, else from the file `name`_FILE names (a
    process slot's, readable by its user alone; a container gets the text in its environment)."""
    if text := os.environ.get(name, ""):
        return text.encode()
    path = os.environ.get(f"{name}_FILE", "")
    return Path(path).read_bytes() if path else b""


def _read_keys_file(bundle: Path) -> str:
    path = Path(os.environ.get("MODELYARD_TRUSTED_KEYS_FILE", "/etc/modelyard/trusted_keys"))
    return path.read_text() if path.is_file() else ""


def build_app(config: ServeConfig) -> ServingApp:
    """Verify, then load: nothing in the bundle is read before its signature checks out."""
    from modelyard.serve.app import ServingApp
    from modelyard.serve.runtime import Runtime

    bundle, reference = _verified(config)
    return ServingApp(Runtime(bundle), config.tokens, config.max_body_bytes, config.max_rows,
                      None if reference is None else Runtime(reference))  # fmt: skip


def _verified(config: ServeConfig) -> tuple[VerifiedBundle, VerifiedBundle | None]:
    """The bundle and the shadow's reference (if any), each checked against the trusted keys
    and opened with the bundle keys, or against the digests the supervisor vouched for (an
    encrypted bundle is opened, so checked, with the keys all the same); BundleError if either
    fails."""
    paths = [config.bundle, *([config.reference] if config.reference else [])]
    if config.vouched:
        from modelyard.manifest import vouched

        checked = []
        for path, (digest, key_id) in zip(paths, config.vouched, strict=True):
            bundle = vouched(path, digest, key_id)
            if bundle is None:
                break
            checked.append(bundle)
        else:
            return checked[0], checked[1] if len(checked) > 1 else None
    from modelyard.bundle import parse_bundle_keys, parse_public_keys, verify

    keys = parse_public_keys(config.trusted_keys)
    opening = parse_bundle_keys(config.bundle_keys)
    bundle, *reference = [verify(path, keys, opening) for path in paths]
    return bundle, reference[0] if reference else None


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _port_refusal(config: ServeConfig) -> int:
    """3, said on stderr, if something listens on the port already; else 0.

    The workers bind with SO_REUSEPORT, which lets any process of the same user bind the port
    beside them: a second server started on it (another model, a slot left running) would not
    fail but take a share of the connections, answers and metrics scrapes mixed between the
    two. This bind, without SO_REUSEPORT, fails while anything listens there."""
    probe = socket.socket(_family(config.host), socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
    try:
        probe.bind((config.host, config.port))
    except OSError as exc:
        print(f"refusing to serve: {config.host}:{config.port} is taken ({exc.strerror}); stop "
              "what listens there or choose another MODELYARD_SERVE_PORT / --port",
              file=sys.stderr)  # fmt: skip
        return 3
    finally:
        probe.close()
    return 0


def unix_socket(path: str) -> socket.socket:
    """A listening Unix socket anyone who can reach its folder may connect to."""
    target = Path(path)
    if target.is_socket():
        target.unlink()  # left by a server that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)  # the folder decides who gets in; nginx workers run as another user
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run_worker(config: ServeConfig, shared: list[socket.socket]) -> None:
    import uvloop

    from modelyard.serve import http

    app = build_app(config)
    app.start()  # warmed up and ready before the first connection is accepted
    context = None
    if config.tls_cert:  # modelyard.certs loads cryptography: only for a TLS port
        from modelyard.certs import server_context

        context = server_context(config.tls_cert, config.tls_key, config.client_ca)
    _settle_garbage_collector()
    # The front door's Unix socket stays plain: nginx ended TLS already.
    listeners = [(listening_socket(config.host, config.port), context)]
    listeners += [(sock, None) for sock in shared]
    uvloop.run(http.serve(app, listeners))


# Allocations between young-generation collections (CPython's default: 700). A 10,000-row
# request makes about 20,000 lists and tuples: 25 collections per request at the default, one
# at this, and most of what it allocated is gone by then.
GC_YOUNG_THRESHOLD = 10_000


def _settle_garbage_collector() -> None:
    """What the worker loaded to serve (modules, ONNX Runtime's session, the app) lives as long
    as the worker: frozen, no collection scans it again. Measured on a 10,000-row request:
    collections took 4.7 ms of its 20 (a full one scanned the whole heap for 16 ms, once every
    five requests), 0.8 ms with these two settings."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code. Refuses an unverifiable bundle."""
    if config.workers <= 1:
        refused = _refusal(config)
    else:
        refused, vouched = _refusal_apart(config)
        config = dataclasses.replace(config, vouched=vouched)
    refused = refused or _port_refusal(config)
    if refused:
        return refused
    shared = [unix_socket(config.socket)] if config.socket else []
    try:
        if config.workers <= 1:
            _run_worker(config, shared)
            return 0
        # Metrics of all workers are merged from files in this folder.
        os.environ.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="modelyard-metrics-")
        )
        return _supervise(config, shared)
    finally:
        if config.socket:
            Path(config.socket).unlink(missing_ok=True)


def _refusal(config: ServeConfig, verified: list[tuple[str, str]] | None = None) -> int:
    """3, said on stderr, if the bundle (or the shadow's reference) does not verify or the TLS
    settings cannot be used; else 0, with the bundles' (digest, key id) added to `verified`."""
    import ssl

    from modelyard.bundle import BundleError
    from modelyard.certs import server_context

    try:
        bundles = _verified(config)
        if verified is not None:
            verified += [(b.digest, b.key_id) for b in bundles if b is not None]
    except BundleError as exc:
        print(f"refusing to serve: {exc}", file=sys.stderr)
        return 3
    if config.tls_cert or config.tls_key:
        try:
            server_context(config.tls_cert, config.tls_key, config.client_ca)
        except (ssl.SSLError, ValueError, OSError) as exc:
            print(f"refusing to serve: MODELYARD_SERVE_TLS_CERT, _KEY or MODELYARD_SERVE_CLIENT_CA "
                  f"cannot be used: {exc}", file=sys.stderr)  # fmt: skip
            return 3
    return 0


def _refusal_apart(config: ServeConfig) -> tuple[int, tuple[tuple[str, str], ...]]:
    """`_refusal` in a forked child, so that the supervisor never loads what it checks with
    (33 MB of RSS with it, 14 MB without; 0.04 s more to ready), and what the child verified,
    for the workers to check the bundles against (`ServeConfig.vouched`)."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reading)
        verified: list[tuple[str, str]] = []
        try:
            code = _refusal(config, verified)
        except BaseException:  # as the supervisor would have failed: a traceback, exit 1
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os.write(writing, json.dumps(verified).encode())
        os._exit(code)
    os.close(writing)
    with os.fdopen(reading, "rb") as told:
        said = told.read()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return code, tuple((digest, key_id) for digest, key_id in json.loads(said or b"[]"))


def _stop_with(supervisor: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies (killed outright, or by the OOM killer):
    a worker left behind would keep serving unsupervised and keep the port, which the server's
    restart would then find taken (`_port_refusal`)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no such request
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _supervise(config: ServeConfig, shared: list[socket.socket]) -> int:
    children: dict[int, int] = {}
    stopping = False

    supervisor = os.getpid()

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _stop_with(supervisor)
            try:
                _run_worker(config, shared)
            finally:
                os._exit(0)
        children[pid] = slot

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(config.workers):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:  # not a worker of ours
            continue
        lost = children.pop(pid)
        if not stopping:
            log.warning("worker %s exited (%s); restarting it", pid, status)
            time.sleep(0.5)
            spawn(lost)
    return 0
