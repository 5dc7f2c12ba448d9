"""modelyard.serve.http, the model server's HTTP/1.1 layer, against raw sockets on loopback:
what HTTP asks of a server beyond one request per connection (the serving app's routes are
test_serve's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from modelyard.serve import http
from modelyard.serve.server import listening_socket

MAX_BODY = 64


class EchoApp:
    """Answers with what it was asked; `/slow` takes a while first."""

    max_body = MAX_BODY

    def __init__(self) -> None:
        self.answered_routes: list[str] = []
        self.slow_started = asyncio.Event()

    def handle(
        self, scope: dict[str, Any], body: bytes, respond: Callable[[http.Answer], None]
    ) -> None:
        said = f"{scope['method']} {scope['path']} {len(body)}".encode()
        answer = scope["path"], 200, said, [(b"content-type", b"text/plain")]
        if scope["path"] == "/slow":  # answered later, as a batched prediction is
            self.slow_started.set()
            asyncio.get_running_loop().call_later(0.2, respond, answer)
        else:
            respond(answer)

    def answered(self, route: str, status: int, started: float) -> None:
        self.answered_routes.append(route)


Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def with_server(test: Callable[[int, EchoApp, asyncio.Event], Awaitable[None]]) -> EchoApp:
    """Run `test(port, app, stop)` against a server on a free loopback port, on uvloop as the
    workers run; the server must have stopped by the time the test returns."""
    app = EchoApp()

    async def main() -> None:
        sock = listening_socket("127.0.0.1", 0)
        stop = asyncio.Event()
        server = asyncio.create_task(http.serve(app, [(sock, None)], stop))
        await test(sock.getsockname()[1], app, stop)
        stop.set()
        await asyncio.wait_for(server, timeout=10)

    uvloop.run(main())
    return app


async def connect(port: int) -> Client:
    return await asyncio.open_connection("127.0.0.1", port)


async def response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)).decode()
    status, *lines = head.strip().split("\r\n")
    pairs = (line.split(": ", 1) for line in lines)
    headers = {name.lower(): value for name, value in pairs}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET /fast HTTP/1.1\r\nhost: x\r\n\r\n")
        first, second = await response(reader), await response(reader)
        assert (first[2], second[2]) == (b"GET /slow 0", b"GET /fast 0")
        assert "connection" not in second[1]  # kept alive
        assert first[1]["date"].endswith(" GMT") and first[1]["content-type"] == "text/plain"
        writer.close()

    assert with_server(test).answered_routes == ["/slow", "/fast"]


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body() -> None:
    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        reader, writer = await connect(port)
        writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
                     b"Expect: 100-Continue\r\n\r\n")  # fmt: skip
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert (await response(reader))[2] == b"POST /p 5"
        writer.close()

    with_server(test)


def test_chunked_bodies_are_joined_and_an_oversized_one_is_cut_one_byte_past_the_limit() -> None:
    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        reader, writer = await connect(port)
        writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")  # fmt: skip
        assert (await response(reader))[2] == b"POST /p 7"
        big = b"x" * (MAX_BODY * 10)
        writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(big) + big)
        # The app sees one byte over its limit (it answers 413 in its own words), never all of it.
        assert (await response(reader))[2] == f"POST /p {MAX_BODY + 1}".encode()
        writer.close()

    with_server(test)


def test_after_a_large_body_is_answered_its_memory_is_given_back(monkeypatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(http, "TRIM_AFTER_BYTES", MAX_BODY // 2)
    monkeypatch.setattr(http, "_MALLOC_TRIM", trims.append)

    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        reader, writer = await connect(port)
        for size in (MAX_BODY // 2 - 1, MAX_BODY // 2):
            writer.write(b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % size
                         + b"x" * size)  # fmt: skip
            assert (await response(reader))[2] == f"POST /p {size}".encode()
        await asyncio.sleep(0)  # the trim is queued behind the answer
        assert trims == [0]  # after the large body alone
        writer.close()

    with_server(test)


def test_http_1_0_and_connection_close_end_the_connection_after_the_answer() -> None:
    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        for request in (b"GET /a HTTP/1.0\r\n\r\n",
                        b"GET /a HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"):  # fmt: skip
            reader, writer = await connect(port)
            writer.write(request)
            status, headers, _body = await response(reader)
            assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the server
            writer.close()

    with_server(test)


def test_head_gets_no_body_and_a_malformed_request_gets_400_and_a_closed_connection() -> None:
    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        reader, writer = await connect(port)
        writer.write(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nGET /after HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert b"content-length: 9\r\n" in head  # what GET would have sent, no body follows
        assert (await response(reader))[2] == b"GET /after 0"
        writer.close()
        reader, writer = await connect(port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), timeout=5)).startswith(
            b"HTTP/1.1 400 Bad Request\r\n"
        )
        writer.close()

    with_server(test)


def test_a_stop_answers_the_request_in_flight_and_closes_idle_connections() -> None:
    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        idle_reader, idle_writer = await connect(port)
        reader, writer = await connect(port)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(app.slow_started.wait(), timeout=5)  # the request is in the app
        stop.set()
        _status, headers, body = await response(reader)
        assert body == b"GET /slow 0" and headers["connection"] == "close"
        assert await asyncio.wait_for(idle_reader.read(), timeout=5) == b""
        try:  # no new connection is accepted
            refused = await connect(port)
        except OSError:
            pass
        else:
            assert await asyncio.wait_for(refused[0].read(), timeout=5) == b""
        for w in (writer, idle_writer):
            w.close()

    with_server(test)


def test_a_connection_idle_past_the_keep_alive_is_closed_and_a_used_one_is_not(
    monkeypatch,
) -> None:
    monkeypatch.setattr(http, "KEEP_ALIVE_SECONDS", 1.0)

    async def test(port: int, app: EchoApp, stop: asyncio.Event) -> None:
        idle_reader, idle_writer = await connect(port)
        reader, writer = await connect(port)
        for _ in range(5):  # 2.5 s of requests, never 1 s apart
            writer.write(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await response(reader))[2] == b"GET /a 0"
            await asyncio.sleep(0.5)
        # Closed by the sweep after 1-2 s idle; the busy connection was never closed.
        assert await asyncio.wait_for(idle_reader.read(), timeout=5) == b""
        writer.write(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await response(reader))[2] == b"GET /b 0"
        for w in (writer, idle_writer):
            w.close()

    with_server(test)
