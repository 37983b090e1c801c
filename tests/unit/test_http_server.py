"""The HTTP server's bounds (app/http_server.py, docs/operations.md, "Limits"): a real uvicorn with the production
protocol on loopback, and raw sockets as careless or hostile clients."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from app import http_server
from tests.conftest import eventually


class CountingServer:
    """A real uvicorn server on the bounded protocol; its app answers the size of the body it read,
    and notes each request whose client went away before the body ended."""

    def __init__(self, gate: asyncio.Event | None = None, clock: Callable[[], float] = time.monotonic,
                 **bounds: float) -> None:
        """`gate`: each request waits for it to be set before it is read; `clock`: its log lines' throttles'."""
        self.bounds, self.disconnects, self.gate, self.clock = bounds, 0, gate, clock

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.gate is not None:
            await self.gate.wait()
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(str(size)))]})
        await send({"type": "http.response.body", "body": str(size).encode()})

    async def __aenter__(self) -> int:
        import socket

        import uvicorn

        from app.http_server import bounded_http_protocol

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        read_s = self.bounds.get("request_read_s", http_server.HTTP_REQUEST_READ_S)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, http=bounded_http_protocol(read_s, self.bounds.get("open_files"),
                                                 idle_grace_s=self.bounds.get("idle_grace_s", 0),
                                                 linger_s=self.bounds.get("linger_s", http_server.HTTP_LINGER_S),
                                                 clock=self.clock), interface="asgi3", lifespan="off", log_level="warning",
            timeout_keep_alive=self.bounds.get("keep_alive_s", http_server.HTTP_KEEP_ALIVE_S)))
        self.serving = asyncio.create_task(self.server.serve(sockets=[sock]))
        await eventually(lambda: self.server.started or self.serving.done())
        return sock.getsockname()[1]

    async def __aexit__(self, *_: object) -> None:
        self.server.should_exit = True
        await self.serving


async def test_a_request_head_past_the_bound_is_refused_and_its_connection_closed() -> None:
    """uvicorn's httptools protocol buffered a request's headers without a bound: a client sending
    one endless header (never ended) held as much memory as it sent."""
    from app.http_server import HTTP_MAX_HEAD_BYTES

    async with CountingServer() as port:

        async def ask(head: bytes, body: bytes = b"", chunk: int = 16 * 1024) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                data = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
                for at in range(0, len(data), chunk):
                    writer.write(data[at : at + chunk])
                    await writer.drain()
                return await asyncio.wait_for(reader.read(), 10)  # until the server closes
            except ConnectionResetError:
                return b"reset"
            finally:
                writer.close()

        small = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: " + b"a" * 8000 + b"\r\n"
        answer = await ask(small, b"b" * 300_000)  # a large body is no head
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"300000"), answer[:200]
        huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (4 * HTTP_MAX_HEAD_BYTES)
        answer = await ask(huge, chunk=4096)
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset", answer[:200]
        many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(4000))
        answer = await ask(many, chunk=4096)
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset", answer[:200]
        # Sent at once, so likely read at once: the read a request began in was not counted, and a head as
        # long as one read (up to 256 KB) passed.
        once = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (3 * HTTP_MAX_HEAD_BYTES // 2) + b"\r\n"
        answer = await ask(once, chunk=len(once) + 100)
        assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset", answer[:200]
        # Requests pipelined after a large body: the head read beside the body's bytes is no longer head.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"b" * 200_000
                     + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: " + b"a" * 8000 + b"\r\n\r\n")
        answers = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answers.count(b"HTTP/1.1 200") == 2, answers[:400]


async def test_requests_pipelined_by_a_client_that_does_not_read_are_not_read_ahead_without_a_bound() -> None:
    """uvicorn stops reading a connection while requests wait behind the one served, and read on
    after each answer: every answer let in another read of queued requests (a read of up to 256 KB,
    ~1,500 of them). 20 clients pipelining /score without reading its answers took a service from
    190 MB to 1.8 GB in 15 s, and the others' answers to 1-2 s."""
    gate = asyncio.Event()
    server = CountingServer(gate)
    async with server as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        batch = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 300
        writer.write(batch)
        protocols = server.server.server_state.connections
        await eventually(lambda: sum(len(p.pipeline) for p in protocols) == 299)  # one served, the rest wait
        writer.write(batch)  # more, while the first wait: not to be read until those are answered
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, sum(len(p.pipeline) for p in protocols))
                await asyncio.sleep(0)

        watching = asyncio.create_task(watch())
        gate.set()
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 600:
            answers += await asyncio.wait_for(reader.read(65536), 10)
        watching.cancel()
        writer.close()
        assert most <= 299, most


async def test_a_client_that_does_not_read_its_answer_is_dropped_once_the_answer_has_waited_long_enough() -> None:
    """uvicorn waits for a client to read on without a bound: one that asked and never read held its
    connection (and its file descriptor, and the requests it had pipelined) for good."""
    import socket

    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b"x" * (32 << 20)  # more than the sockets' buffers hold
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=http_server.bounded_http_protocol(write_stall_s=0.5),
                                           interface="asgi3", lifespan="off", log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or serving.done())
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: len(server.server_state.connections) == 1)
        await eventually(lambda: not server.server_state.connections and not server.server_state.tasks)
        writer.close()
    finally:
        server.should_exit = server.force_exit = True  # not waiting for an answer that may never go
        await serving


async def test_a_request_unread_behind_answers_the_client_does_not_read_is_not_timed_out_mid_answer() -> None:
    """Requests pipelined behind a slow answer are not read until it is sent: the read deadline of
    the one begun behind them fired meanwhile, wrote a 408 into the answers' stream and closed the
    connection, and the answer then written logged "Exception in ASGI application" (a traceback per
    connection of a client that sends /score without reading)."""
    gate = asyncio.Event()
    server = CountingServer(gate, request_read_s=0.3)
    async with server as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET / HTTP/1.1\r\nHost: x\r\n")
        protocols = server.server.server_state.connections
        await eventually(lambda: any(p._read_deadline is not None for p in protocols))
        (protocol,) = protocols
        first = protocol._read_deadline
        await eventually(lambda: protocol._read_deadline is not first)  # its time came, as the first waits
        gate.set()
        answers = await asyncio.wait_for(reader.read(), 10)  # then the one begun is the client's to end
        writer.close()
        assert re.findall(rb"HTTP/1\.1 \d+", answers) == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 408"], answers


async def test_connections_past_what_the_limit_on_open_files_leaves_close_an_idle_one_or_get_503(
        caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn accepted connections until the process had no file descriptor left, then reset each
    new one without a word in the log, and the service's reconnect to NATS failed ("Too many open
    files") for as long as clients kept coming."""
    caplog.set_level(logging.WARNING, logger="tipstream")
    server = CountingServer(open_files=8, keep_alive_s=60)  # 4 connections at most
    async with server as port:
        protocols = server.server.server_state.connections

        async def connect(sent: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            return reader, writer

        begun = b"POST / HTTP/1.1\r\nHost: x\r\n"
        held = [await connect(begun) for _ in range(3)]
        idle = await connect()
        await eventually(lambda: sum(p.timeout_keep_alive_task is None for p in protocols) == 3 == len(protocols) - 1)
        served = await connect(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(served[0].read(), 10)).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(idle[0].read(), 10) == b""  # closed for it, the one idle
        held.append(await connect(begun))
        await eventually(lambda: sum(p.timeout_keep_alive_task is None for p in protocols) == 4)
        refused = await connect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(refused[0].read(), 10)
        assert answer.startswith(b"HTTP/1.1 503") and b"the most its limit on open files leaves" in answer, answer
        held[0][1].write(b"Content-Length: 2\r\n\r\nab")  # those held are served as before
        assert (await asyncio.wait_for(held[0][0].readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        for _, writer in [*held, idle, served, refused]:
            writer.close()
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream"]
    assert len(told) == 1 and "(ulimit -n 8)" in told[0] and "Raise the limit" in told[0], told


async def test_in_a_burst_of_connections_past_the_limit_the_new_ones_are_refused_not_those_just_taken() -> None:
    """Connections are accepted many at a time before any is read: each new one past the limit closed
    one taken a moment before, its request already on its way (2,000 at once: 300-800 closed unanswered)."""
    server = CountingServer(open_files=8, idle_grace_s=60)  # 4 connections at most
    async with server as port:
        taken = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await eventually(lambda: len(server.server.server_state.connections) == 4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 503")
        writer.close()
        taken[0][1].write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(taken[0][0].read(), 10)).startswith(b"HTTP/1.1 200")
        for _, writer in taken:
            writer.close()


async def test_connections_refused_for_the_limit_are_told_once_a_minute_with_those_since(
        caplog: pytest.LogCaptureFixture) -> None:
    """The count of refusals left out is written as every other throttled line writes it
    (`log_throttle.since_last_line`): it read '(2 more in the minute before)'. The minute passes on the
    throttle's clock, not slept."""
    caplog.set_level(logging.WARNING, logger="tipstream")
    now = [0.0]
    server = CountingServer(clock=lambda: now[0], open_files=8, idle_grace_s=60)  # 4 connections at most
    async with server as port:
        taken = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await eventually(lambda: len(server.server.server_state.connections) == 4)
        for at in (0.0, 1.0, 2.0, 61.0):
            now[0] = at
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 503")
            writer.close()
        for _, writer in taken:
            writer.close()
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream"]
    assert len(told) == 2 and "a new connection was answered 503. Raise" in told[0], told
    assert "a new connection was answered 503 (2 more since the last line). Raise" in told[1], told


def test_a_client_warning_after_some_left_out_says_how_many_as_the_other_throttled_lines_do() -> None:
    from streams.log_throttle import LogThrottle

    told: list[str] = []

    class Logger:  # uvicorn's, as the protocol wraps it
        def warning(self, message: str, *args: Any) -> None:
            told.append(message % args)

    now = [0.0]
    warnings = http_server._ClientWarnings(Logger(), LogThrottle(per_window=1, clock=lambda: now[0]))  # type: ignore[arg-type]
    for at in (0.0, 1.0, 2.0, 60.0):
        now[0] = at
        warnings.warning("Invalid HTTP request received from %s.", "a client")
    assert told == ["Invalid HTTP request received from a client.",
                    "Invalid HTTP request received from a client. (2 more since the last line)"], told


async def test_a_client_that_sends_part_of_a_request_or_nothing_is_not_waited_for_for_good() -> None:
    """uvicorn waits without a bound for a request's rest, and arms no idle timer before a first
    answer: connections sending a few bytes, or none, then nothing (slowloris) held a file
    descriptor each for good, and enough of them left the service accepting no client."""
    server = CountingServer(request_read_s=0.6, keep_alive_s=0.6)
    async with server as port:

        async def left_after(sent: bytes) -> bytes:
            """All the server sends before it closes (not waited for past 10 s: it would wait for good)."""
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(sent)
                return await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()

        assert await left_after(b"") == b""  # closed as an idle connection is
        assert (await left_after(b"POST / HTTP/1.1\r\nHost: x\r\n")).startswith(b"HTTP/1.1 408")
        body_short = await left_after(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"b" * 10)
        assert body_short.startswith(b"HTTP/1.1 408") and body_short.endswith(b'{"error": "request not received '
                                                                               b'within 0.6 s", "field": null}'), body_short
        await eventually(lambda: server.disconnects == 1)  # the endpoint was told, and answered nothing
        # A request received in time is answered, and its deadline ends with it: the idle connection
        # is then closed with nothing more sent.
        answer = await left_after(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n3"), answer


async def test_a_request_the_parser_refuses_is_told_why_in_json() -> None:
    """uvicorn answered each with "Invalid HTTP request received." in plain text: a raw 'é' in a
    path, a NUL in a header and an unknown method alike, and a client reading refusals as JSON failed."""
    async with CountingServer() as port:

        async def ask(request: bytes) -> tuple[bytes, dict[str, Any]]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                head, _, body = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n\r\n")
            finally:
                writer.close()
            assert b"content-type: application/json" in head.lower(), head
            return head.split(b"\r\n")[0], json.loads(body)

        for request, reason in [
            (b"GET /users/\xc3\xa9/features HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid char in url path"),
            (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: \x00\r\n\r\n", "Invalid header value char"),
            (b"FETCH /score HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid method encountered"),
            (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
             "Transfer-Encoding can't be present with Content-Length"),
        ]:
            status, refusal = await ask(request)
            assert status == b"HTTP/1.1 400 Bad Request" and refusal["field"] is None, (status, refusal)
            assert refusal["error"].startswith(f"not an HTTP/1.1 request this server can read: {reason}"), refusal
        assert "percent-encode" in (await ask(b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n"))[1]["error"]


async def test_requests_the_parser_refuses_are_warned_of_a_few_times_a_minute() -> None:
    """uvicorn warned of each one: a client sending them decided how fast the log grew."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    async with CountingServer() as port:
        logger.addHandler(handler)  # after uvicorn's logging configuration, which drops a logger's handlers
        try:
            for _ in range(3 * http_server.CLIENT_WARNINGS_PER_MINUTE):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"FETCH / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400")
                writer.close()
        finally:
            logger.removeHandler(handler)
    told = [r.getMessage() for r in records if r.getMessage().startswith("Invalid HTTP request received.")]
    assert len(told) == http_server.CLIENT_WARNINGS_PER_MINUTE, told


async def test_a_request_to_upgrade_to_websocket_is_answered_as_http() -> None:
    """The service has no WebSocket route, yet such a request went to the websockets library: a
    plain-text 400 ("Failed to open a WebSocket connection: invalid request.") for a POST to
    /score, a 403 for a whole handshake, where the API answers JSON."""
    import socket

    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert scope["type"] == "http", scope["type"]
        body = b'{"answered": "%s"}' % scope["method"].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(http_server.http_config(app))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or serving.done())
        upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        handshake = upgrade + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        for request, method in [
                (b"POST /score HTTP/1.1\r\nHost: x\r\n" + upgrade + b"Content-Length: 2\r\n\r\n{}", b"POST"),
                (b"GET /score HTTP/1.1\r\nHost: x\r\n" + handshake + b"\r\n", b"GET")]:
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(1000), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"answered": "%s"}' % method), answer
    finally:
        server.should_exit = True
        await serving


class AnswersAtOnce(CountingServer):
    """Answers 404 without reading the body, as a route that takes none does."""

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"{}"})


async def answer_then_send_the_body(port: int, head: bytes, body_bytes: int) -> bytes:
    """All the server sends for `head`, the body sent only once the answer's head has come (as a client
    writing a request in several writes may), then the client's side ended."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        answer_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        for _ in range(body_bytes // 16384):
            writer.write(b"[" * 16384)
            await writer.drain()
        writer.write_eof()
        return answer_head + await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_a_refusal_sent_while_the_body_still_comes_reaches_the_client_rather_than_a_reset() -> None:
    """Closed with the client's bytes unread, or more of them on the way, a connection is reset by the
    kernel, and the refusal written just before is lost with it: the fuzz suite's client sending a 100 kB
    body behind a header the parser refused read "Connection reset by peer", not the 400. The server now
    ends its side and reads on, dropping what comes, until the client ends its own."""
    from app.http_server import HTTP_MAX_HEAD_BYTES

    async with CountingServer(request_read_s=0.5) as port:
        for head, status in [
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: \x00\r\nContent-Length: 600000\r\n\r\n", b"400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * HTTP_MAX_HEAD_BYTES + b"\r\n"
             b"Content-Length: 600000\r\n\r\n", b"431"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 600000\r\n\r\n", b"408"),
        ]:
            answer = await answer_then_send_the_body(port, head, 600_000)
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"], answer


async def test_an_answer_that_closes_the_connection_before_the_body_is_read_reaches_the_client() -> None:
    """A client asking to close after its request, whose body the route never read (a wrong path), was
    reset as uvicorn closed after the answer, and read "Connection reset by peer" instead of the 404.
    A client that keeps its connection has the body read past and dropped, as before."""
    async with AnswersAtOnce() as port:
        head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 600000\r\n\r\n"
        answer = await answer_then_send_the_body(port, head, 600_000)
        assert answer.startswith(b"HTTP/1.1 404") and answer.endswith(b"\r\n\r\n{}"), answer[:300]


async def test_after_a_refusal_a_client_is_read_past_for_a_bounded_time_and_size() -> None:
    """A client that neither ends its side nor stops sending is not read past for good: its connection
    is closed after the linger, or at once past the bytes a refused request's body is drained for."""
    from app.request_body import DRAIN_MAX_BYTES

    async def refused(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"FETCH / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400")  # the server's side ended
        return reader, writer

    silent_server = CountingServer(linger_s=0.3)
    async with silent_server as port:
        _, silent = await refused(port)
        await eventually(lambda: not silent_server.server.server_state.connections, timeout=5)
        silent.close()

    async with CountingServer(linger_s=60) as port:
        _, writer = await refused(port)
        with pytest.raises(ConnectionError):  # 64 MB: more than the kernel's buffers on both sides hold
            for _ in range(64 * DRAIN_MAX_BYTES // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()
        writer.close()


class AnswersWhenLetGo(CountingServer):
    """Answers each request 200 once `gate` is set, without reading its body."""

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self.gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": b"late"})


async def test_a_refusal_behind_a_request_still_being_answered_is_the_connection_s_last_word(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request the parser refuses, pipelined behind one the app is still answering: the refusal is
    written and the server's side ended, so the answer that comes after it must go nowhere; written to
    the ended side, it raised, and uvicorn logged "Exception in ASGI application" with a traceback."""
    caplog.set_level(logging.WARNING, logger="uvicorn.error")
    gate = asyncio.Event()
    server = AnswersWhenLetGo(gate=gate)
    async with server as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nFETCH / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 10)  # the server's side ends with the refusal
        gate.set()
        await eventually(lambda: not server.server.server_state.tasks, timeout=5)
        writer.close()
    assert received.startswith(b"HTTP/1.1 400") and b"late" not in received, received
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_a_request_s_read_deadline_passing_while_the_server_lingers_says_nothing_more() -> None:
    """The 408 timer of a request refused mid-head fired during the linger, and wrote to the side already
    ended: "Exception in callback" in the log. A refusal ends the request's deadline."""
    failures: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: failures.append(context))
    try:
        server = CountingServer(request_read_s=0.2, linger_s=1.0)
        async with server as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nX-Bad: \x00\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 400")
            # Closed by the linger's end (1 s), well after the read deadline (0.2 s) would have fired.
            await eventually(lambda: not server.server.server_state.connections, timeout=5)
            writer.close()
    finally:
        loop.set_exception_handler(None)
    assert not failures, failures


async def test_a_target_in_absolute_form_names_the_host_the_request_is_for() -> None:
    """RFC 9112 3.2.2: a server takes the host of an absolute-form target (`POST http://name/score`, as sent to a
    proxy), not the Host header. Read by its Host header, a request for http://rebound.example/ passed the Host
    check (app/host_check.py) as one for 127.0.0.1, and was answered."""
    import socket

    import uvicorn

    from app.http_server import bounded_http_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        said = json.dumps({"path": scope["path"], "host": [v.decode() for n, v in scope["headers"] if n == b"host"]})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(said))]})
        await send({"type": "http.response.body", "body": said.encode()})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=bounded_http_protocol(), interface="asgi3", lifespan="off",
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started or serving.done())
    try:
        for target, host in [(b"http://rebound.example/score", ["rebound.example"]),
                             (b"http://rebound.example:8000/score?x=1", ["rebound.example:8000"]),
                             (b"http://[::1]:8000/score", ["[::1]:8000"]), (b"/score", ["127.0.0.1"])]:
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"path": "/score", "host": host}, (target, answer)
    finally:
        server.should_exit = True
        await serving
