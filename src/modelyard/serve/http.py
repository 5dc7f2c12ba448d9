"""HTTP/1.1 for the serving app on asyncio (uvloop) and httptools' parser, without ASGI between.

uvicorn turned each request into ASGI messages and each answer into two socket writes (head,
then body). On two cores, runs alternated with nginx's `return 200` beside them: `/invocations`
at 32 connections 13-17k requests/s with uvicorn, 15-22k with this protocol; a no-op route
27-36k against 45-49k; nginx 63-65k. granian (Rust, RSGI) served 9-10k and 14-18k: its hand-off
between the Rust runtime and Python cost more than it saved on two cores.

What HTTP asks of a server and the app relies on is here: keep-alive (HTTP/1.0 and
`Connection: close` honoured), pipelined requests answered in order, `Expect: 100-continue`,
chunked request bodies (httptools decodes them), a body limit that answers 413 without holding
the excess, a `Date` header, a keep-alive timeout, back-pressure from slow readers, and a
graceful stop: listeners close, idle connections close, requests in flight are answered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import email.utils
import functools
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import httptools

Headers = list[tuple[bytes, bytes]]
# The app's answer: (route as metrics name it, status, body, headers besides date and length).
Answer = tuple[str, int, bytes, Headers]

KEEP_ALIVE_SECONDS = 75.0
# Pipelined requests held per connection before reading pauses.
MAX_QUEUED = 16
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
# After a large request (a 10,000-row body is about 440 KB) the C allocator keeps the pages its
# decoding used; glibc's malloc_trim gives the free ones back: about 4 MB a worker after
# 10,000-row requests, for 0.1 ms. Other C libraries (musl) have no such call and need none.
TRIM_AFTER_BYTES = 256 * 1024
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


class App(Protocol):
    """What the protocol needs of the serving app (modelyard.serve.app.ServingApp)."""

    max_body: int

    def handle(
        self, scope: dict[str, Any], body: bytes, respond: Callable[[Answer], None]
    ) -> None: ...

    def answered(self, route: str, status: int, started: float) -> None: ...


@dataclass(eq=False)
class _Request:
    scope: dict[str, Any]
    body: bytes
    keep_alive: bool


@dataclass
class _Shared:
    """What a worker's connections share: the app, the open connections, the `Date` header."""

    app: App
    connections: set[Connection] = field(default_factory=set)
    stopping: bool = False
    _date: bytes = b""
    _date_second: int = -1

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:  # formatted once a second, not per response
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def close_idle(self) -> None:
        """Close the connections that have waited over KEEP_ALIVE_SECONDS for a request."""
        oldest = time.monotonic() - KEEP_ALIVE_SECONDS
        for connection in list(self.connections):
            if connection.idle_since is not None and connection.idle_since < oldest:
                connection._close()


class Connection(asyncio.Protocol):
    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[_Request] = collections.deque()
        self.busy = False
        self.reading = True
        self.closing = False
        # Since when it has waited for a request (monotonic seconds); the worker's sweep closes
        # it after KEEP_ALIVE_SECONDS. A timer per request cost a handle and a cancel each.
        self.idle_since: float | None = None
        self.paused = False  # the client reads slower than we write: answer nothing more yet
        self.answering = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.body: list[bytes] = []
        self.size = 0

    # --- asyncio's callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.shared.connections.add(self)
        self._wait_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.connections.discard(self)
        self.closing = True
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        self.idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # answered as a plain request; nothing after it is read
        except httptools.HttpParserError:
            self._refuse()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._next()

    # --- httptools' callbacks ------------------------------------------------------------------

    # No on_message_begin or on_headers_complete: each callback httptools finds costs a Python
    # call per request. A request's fields are reset once it is queued (`_reset`).

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        # Clients that ask wait for this before sending a body (curl, for bodies over 1 KiB).
        # httptools calls on_header with a whole header once the next begins or the head ends.
        if name == b"expect" and value.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        # Held up to one byte over the limit: the app then answers 413 in its own words.
        room = self.shared.app.max_body + 1 - self.size
        if room > 0:
            self.body.append(chunk[:room])
        self.size += len(chunk)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("ascii")
        target = httptools.parse_url(self.url)
        scope = {
            "type": "http",
            "method": method,
            "path": target.path.decode("latin-1"),
            "query_string": target.query or b"",
            "headers": self.headers,
        }
        keep_alive = self.parser.should_keep_alive() and not self.closing
        self.queue.append(_Request(scope, b"".join(self.body), keep_alive))
        self._reset()
        if len(self.queue) > MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False
        self._next()

    # --- answering -----------------------------------------------------------------------------

    def _next(self) -> None:
        """Hand the app the queued requests one at a time, in order. No task per request: the
        app answers through `_respond`, at once or when the request's batch has run."""
        if self.answering:  # `_respond` called from inside the loop below: it goes on
            return
        self.answering = True
        try:
            while self.queue and not (self.busy or self.paused or self.transport_gone):
                request = self.queue.popleft()
                if not self.reading and len(self.queue) <= MAX_QUEUED // 2 and self.transport:
                    self.transport.resume_reading()
                    self.reading = True
                self.busy = True
                started = time.perf_counter()
                respond = functools.partial(self._respond, request, started)
                self.shared.app.handle(request.scope, request.body, respond)
        finally:
            self.answering = False
        if self.busy or (self.queue and not self.transport_gone):
            return
        if self.shared.stopping:
            self._close()
        else:  # also when the client has left: connection_lost takes it out of the sweep
            self._wait_idle()

    @property
    def transport_gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _respond(self, request: _Request, started: float, answer: Answer) -> None:
        self.busy = False
        route, status, content, headers = answer
        transport = self.transport
        if transport is not None and not transport.is_closing():  # else the client left
            self._write(request, status, content, headers)
            self.shared.app.answered(route, status, started)
            if len(request.body) >= TRIM_AFTER_BYTES and _MALLOC_TRIM is not None:
                # Queued: by the time it runs, this request's objects are gone.
                asyncio.get_running_loop().call_soon(_MALLOC_TRIM, 0)
        self._next()

    def _write(self, request: _Request, status: int, content: bytes, headers: Headers) -> None:
        assert self.transport is not None
        # `closing`: an upgrade was asked for (it is not granted; nothing after it is read).
        keep_alive = request.keep_alive and not (self.closing or self.shared.stopping)
        head = [
            b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-length: %d\r\n"
            % (status, _REASONS.get(status, b""), self.shared.date(), len(content))
        ]
        head += [b"%s: %s\r\n" % (name, value) for name, value in headers]
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if request.scope["method"] != "HEAD":
            head.append(content)
        self.transport.write(b"".join(head))  # one write: head and body leave in one segment
        if not keep_alive:
            self._close()

    def _refuse(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_BAD_REQUEST)
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _wait_idle(self) -> None:
        self.idle_since = time.monotonic()

    def stop(self) -> None:
        """A graceful stop: an idle connection closes now, a busy one after its answers (also
        those queued behind a client that reads slowly)."""
        if not self.busy and not self.queue:
            self._close()


def _sweep_every_second(shared: _Shared) -> asyncio.Task[None]:
    async def sweep() -> None:
        while True:
            await asyncio.sleep(1.0)
            shared.close_idle()

    return asyncio.get_running_loop().create_task(sweep())


async def serve(
    app: App,
    listeners: list[tuple[socket.socket, ssl.SSLContext | None]],
    stop: asyncio.Event | None = None,
) -> None:
    """Accept on every listener until `stop` is set (default: SIGTERM or SIGINT), then stop
    gracefully."""
    loop = asyncio.get_running_loop()
    shared = _Shared(app)
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    servers = [
        await loop.create_server(lambda: Connection(shared), sock=sock, ssl=context, backlog=2048)
        for sock, context in listeners
    ]
    sweeping = _sweep_every_second(shared)
    await stop.wait()
    sweeping.cancel()
    shared.stopping = True
    for server in servers:
        server.close()
    for connection in list(shared.connections):
        connection.stop()
    while shared.connections:  # requests in flight are answered, then their connections close
        await asyncio.sleep(0.01)
    for server in servers:
        with contextlib.suppress(Exception):
            await server.wait_closed()
