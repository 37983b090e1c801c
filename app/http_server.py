"""The service's HTTP server: uvicorn's httptools protocol with the bounds a server open to any
client needs (docs/operations.md, "Limits"), and the process's limit on open files, which caps its connections.
Each bound is what uvicorn left unbounded, and what a careless or hostile client did with it."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from app.request_body import DRAIN_MAX_BYTES
from streams.log_throttle import LogThrottle, since_last_line

# uvicorn's default: an idle HTTP connection is closed after this long. A client keeping idle
# connections as long may send on one the server is closing, and reads an empty answer.
HTTP_KEEP_ALIVE_S = 5
# A request's line and headers, at most: uvicorn's httptools protocol buffered them without a
# bound (three connections sending 100 MB of one header, never ended, held 300 MB).
HTTP_MAX_HEAD_BYTES = 64 * 1024
# A request's line, headers and body, from its first byte to its last, at most. uvicorn waits for
# them without a bound: a client sending a few bytes of a request and then nothing (slowloris) held
# its connection, a file descriptor, for good; enough of them and the service accepted no client.
HTTP_REQUEST_READ_S = 30.0
# How long an answer may wait for its client to read on (the socket's buffers full) before the
# connection is dropped: uvicorn waits without a bound, so a client that asks and never reads held
# its connection, with the requests it had pipelined, for good.
HTTP_WRITE_STALL_S = 30.0
# At the most connections the limit on open files leaves, one idle this long is closed for a new one.
# Not sooner: in a burst, connections are accepted many at a time before any is read, and each new one
# closed one accepted a moment before, its request already on its way (2,000 at once: 300-800 closed).
HTTP_IDLE_GRACE_S = 1.0
# uvicorn warns once for each request it cannot read ("Invalid HTTP request received.",
# "Unsupported upgrade request."): a client sending such requests decided how fast the log grew.
CLIENT_WARNINGS_PER_MINUTE = 6
# File descriptors kept from HTTP connections for the service's own: an idle service holds ~20 (NATS,
# the embedded nats-server's pipes, the lock, log and spool files), and its database up to ~60 more
# at a peak (PostgreSQL: the lock's connection and a pool of up to 20; SQLite: a file and its WAL
# for each of 15 connections). Without a reserve, clients took the last one, and a reconnect to
# NATS failed with "Too many open files" for as long as they came.
FD_RESERVE = 128
# After a refusal the server ends its side and reads on, dropping what comes, until the client ends its
# own, for at most this long (and DRAIN_MAX_BYTES): closed with the client's bytes unread or still on
# their way, a connection is reset by the kernel, and the refusal written just before is lost with it.
# A client sending a 100 kB body behind a header the parser refused read "Connection reset by peer".
HTTP_LINGER_S = 2.0

log = logging.getLogger("tipstream")


class _ClientWarnings:
    """The HTTP protocol's logger, its warnings (each one a client's request) at most
    CLIENT_WARNINGS_PER_MINUTE a minute for each text, with how many were left out told after."""

    def __init__(self, logger: logging.Logger, throttle: Any) -> None:
        self._logger, self._throttle = logger, throttle

    def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        left_out = self._throttle.allow(message)
        if left_out is None:
            return
        self._logger.warning(f"{message}{since_last_line(left_out)}", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # errors, levels: the logger's own
        return getattr(self._logger, name)


def raise_open_files_limit() -> tuple[int, int, int]:
    """The soft limit on open files raised to the hard one, as Go programs (nats-server among them)
    do at start: shells and systemd start services at a soft 1024 with a far higher hard limit, and
    each HTTP connection holds a file descriptor. (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit above the kernel's nr_open: left as it was
            return soft, soft, hard
    return soft, hard, hard


def take_open_files() -> None:
    """`raise_open_files_limit`, and the log's word on what the limit leaves for HTTP connections."""
    before, soft, hard = raise_open_files_limit()
    if soft == resource.RLIM_INFINITY:
        return
    if before != soft:
        log.info("limit on open files raised from %d to %d, the hard limit (ulimit -Hn)", before, soft)
    if max_http_connections(soft) < 1000:
        log.warning("the limit on open files is %d (ulimit -n; hard limit %s): the service takes at most %d HTTP "
                    "connections at once. Raise the hard limit (systemd's LimitNOFILE=, docker's --ulimit nofile=) "
                    "for more.", soft, "none" if hard == resource.RLIM_INFINITY else hard, max_http_connections(soft))


def open_files_limit() -> int | None:
    """The soft limit on open files; None when there is none."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def max_http_connections(files: int) -> int:
    """HTTP connections held at once under a limit of `files` open files: all but FD_RESERVE.

    >>> max_http_connections(1024), max_http_connections(256), max_http_connections(100)
    (896, 128, 50)
    """
    return max(files - FD_RESERVE, files // 2)


def _cancelled(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


class _EndsAfterTheBody:
    """A connection's transport as the request being answered sees it: an answer that closes the
    connection (the client sent `Connection: close`) before its request's body was all read ends the
    server's side and drops the rest as it comes (`_linger`), rather than the reset that lost the answer."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self.write = protocol.transport.write  # the transport's own, bound: no extra call on each answer's writes

    def close(self) -> None:
        self._protocol.close_after_the_body()

    def is_closing(self) -> bool:  # once its side has ended: nothing more can be written (a 100 Continue)
        return self._protocol.lingering or self._protocol.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol.transport, name)


def bounded_http_protocol(request_read_s: float = HTTP_REQUEST_READ_S, open_files: int | None = None,
                          write_stall_s: float = HTTP_WRITE_STALL_S, idle_grace_s: float = HTTP_IDLE_GRACE_S,
                          linger_s: float = HTTP_LINGER_S, clock: Callable[[], float] = time.monotonic) -> type:
    """uvicorn's httptools protocol, with bounds uvicorn lacks on what a client can hold:

    - a request line and headers past HTTP_MAX_HEAD_BYTES: 431, and the connection closed. A head
      that ends is measured as parsed; one that has not ended yet by the bytes read after the read it
      began in (where it starts in that read is not known: it may follow another request's bytes);
    - a request not all received `request_read_s` after its first byte: 408, and the connection
      closed (the endpoint, if it was reading the body, reads a disconnect);
    - a new connection that sends nothing: closed after the keep-alive timeout, as an idle one is
      after an answer (uvicorn arms that timer only after a response);
    - a request the parser refuses: 400 with the parser's reason, and uvicorn's warning for it
      at most CLIENT_WARNINGS_PER_MINUTE a minute;
    - a refusal, or an answer closing the connection before the request's body was read: the server's
      side ended, and what the client still sends dropped for `linger_s` at most (closed at once,
      the kernel reset the connection, and the answer was lost with it);
    - requests pipelined behind the one served: no more is read until they are answered (uvicorn
      read on after each answer, so a client sending without reading queued requests without a bound);
    - an answer the client has not read on for `write_stall_s`, its buffers full: the connection dropped;
    - a request-target in absolute-form (`POST http://name/score`, as a client sends it to a proxy): its
      authority is the request's Host, as RFC 9112 3.2.2 has a server read it, so that the Host check judges
      the name the request is for (read by its Host header, `http://rebound.example/` was answered);
    - at most `max_http_connections(open_files)` connections: past it, the one idle longest (at
      least `idle_grace_s`) is closed for the new one, or with none idle the new one gets 503 and is closed, and the log says
      to raise the limit, at most once a minute (uvicorn accepted until the process had no file
      descriptor left, then reset every new connection without a word, and the service's own
      reconnects to NATS and its database failed).

    `clock` times the once-a-minute bounds on its log lines (a test's, to pass a minute without waiting)."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    client_warnings = LogThrottle(per_window=CLIENT_WARNINGS_PER_MINUTE, clock=clock)
    full_warnings = LogThrottle(clock=clock)
    most = None if open_files is None else max_http_connections(open_files)

    def refusal(status: int, message: str) -> bytes:
        # In the API's own shape: a client reading every 4xx as JSON failed on a plain-text one.
        text = json.dumps({"error": message, "field": None}).encode()
        return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                         b"content-length: %d\r\n" % len(text), b"connection: close\r\n\r\n", text])

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes, _head_size, _in_head, _feeding, _refused = 0, 0, True, 0, False
        _dropped: int | None = None  # bytes read and dropped since a refusal
        _linger_deadline: asyncio.TimerHandle | None = None
        _read_deadline: asyncio.TimerHandle | None = None
        _write_deadline: asyncio.TimerHandle | None = None
        _answering: Any = None  # the request answered now
        _as_answers_see_it: _EndsAfterTheBody

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = _ClientWarnings(self.logger, client_warnings)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._as_answers_see_it = _EndsAfterTheBody(self)
            if most is not None and len(self.connections) > most and not self._room_made():
                self._refuse_connection()
                return
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def _room_made(self) -> bool:
            """The connection idle longest (its keep-alive timer due first) closed, if one has been idle
            `idle_grace_s`."""
            due = self.loop.time() + self.timeout_keep_alive - idle_grace_s  # armed `idle_grace_s` ago
            idle = [p for p in self.connections if p.timeout_keep_alive_task is not None
                    and p.timeout_keep_alive_task.when() <= due and not p.transport.is_closing()]
            if not idle:
                return False
            min(idle, key=lambda p: p.timeout_keep_alive_task.when()).transport.close()
            return True

        def _refuse_connection(self) -> None:
            self.transport.write(refusal(503, f"this service holds {most} connections, the most its limit on open "
                                              "files leaves room for: try again later"))
            self.transport.close()  # at once, not lingered over (`_refuse`): file descriptors are what is short
            left_out = full_warnings.allow("full")
            if left_out is not None:
                log.warning("HTTP: %d connections open, none idle, the most that the limit on open files (ulimit -n "
                            "%d) leaves room for beside the %d the service keeps for NATS, its database and files: a new "
                            "connection was answered 503%s. Raise the limit (ulimit -n; systemd's LimitNOFILE=, "
                            "docker's --ulimit nofile=), or serve slow clients through a proxy that holds them (nginx).",
                            len(self.connections) - 1, open_files, open_files - most,
                            since_last_line(left_out))

        def connection_lost(self, exc: Exception | None) -> None:
            self._let_go()
            self._end_read_deadline()
            self._write_deadline = _cancelled(self._write_deadline)
            self._linger_deadline = _cancelled(self._linger_deadline)
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_deadline is None:
                self._write_deadline = self.loop.call_later(write_stall_s, self._write_stalled)

        def _write_stalled(self) -> None:
            self._write_deadline = None
            self._let_go()
            self.transport.abort()  # close() would wait for the buffer to be read first

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._answering = cycle
            cycle.transport = self._as_answers_see_it
            super()._start_asgi_task(cycle, app)

        def _let_go(self) -> None:
            # The request being answered is told its client is gone. uvicorn tells only `self.cycle`, the last
            # request read, which may be one queued behind it: the answer then went on to a closed connection,
            # "Exception in ASGI application" and a traceback.
            if self._answering is not None:
                self._answering.disconnected = True

        def resume_writing(self) -> None:
            super().resume_writing()
            self._write_deadline = _cancelled(self._write_deadline)

        def data_received(self, data: bytes) -> None:
            if self._dropped is not None:
                self._dropped += len(data)
                if self._dropped > DRAIN_MAX_BYTES:
                    self.transport.close()
                return
            self._feeding = len(data)
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > HTTP_MAX_HEAD_BYTES:
                self._refuse_head()

        def _refuse_head(self) -> None:
            self._refused = True
            self._refuse(refusal(431, f"request line and headers larger than {HTTP_MAX_HEAD_BYTES} bytes"))

        def _refuse(self, answer: bytes) -> None:
            self._let_go()  # an answer still being given to a request read before goes nowhere: this one is the last
            self._linger(answer)

        def close_after_the_body(self) -> None:
            if self._read_deadline is not None and not self.transport.is_closing():  # a request still being read
                self._linger(b"")
            else:
                self.transport.close()

        @property
        def lingering(self) -> bool:
            return self._dropped is not None

        def _linger(self, last: bytes) -> None:
            """`last` written, and the server's side ended; the client's bytes then read and dropped until it
            ends its own, or for `linger_s` and DRAIN_MAX_BYTES at most, past which the reset is the answer."""
            if self._dropped is not None or self.transport.is_closing():  # its side has ended: nothing more to say
                return
            self._end_read_deadline()
            self.transport.write(last)
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write_eof()
            self._dropped = 0
            self._linger_deadline = self.loop.call_later(linger_s, self.transport.close)
            self.flow.resume_reading()

        def send_400_response(self, msg: str) -> None:
            # Called as uvicorn catches the parser's error. Its own answer, "Invalid HTTP request
            # received." in plain text, said nothing of what was wrong (the parser's error does).
            error = sys.exc_info()[1]
            reason = str(error) if error is not None and str(error) else msg
            if "url" in reason.lower():
                reason += " (a path and query string are printable ASCII: percent-encode any other byte, as UTF-8)"
            self._refuse(refusal(400, f"not an HTTP/1.1 request this server can read: {reason}"))

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn's, with ws "none": "No supported WebSocket library detected. Please use pip
            # install 'uvicorn[standard]'", which sent the operator to install what is not wanted.
            asked = self._get_upgrade()  # None for a CONNECT, which the parser takes for an upgrade too
            self.logger.warning("A request asked to switch protocols (%s); this service serves HTTP/1.1 only, and "
                                "answered it as such.", f"Upgrade: {asked.decode('latin-1')}" if asked else "CONNECT")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes, self._head_size = True, -self._feeding, 0
            self._end_read_deadline()
            self._read_deadline = self.loop.call_later(request_read_s, self._read_too_slow)

        # Measured as parsed: a head sent in one read (uvloop's are up to 256 KB) ends before the count of
        # the bytes after that read sees it, and 200 KB of one header sent at once was answered 200.
        def on_url(self, url: bytes) -> None:
            self._head_size += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_size += len(name) + len(value) + 4  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._refused or self._head_size > HTTP_MAX_HEAD_BYTES:  # no request to serve: no cycle
                if not self._refused:
                    self._refuse_head()
                return
            if self.url[:1] != b"/" and self.url != b"*":
                self._host_from_target()
            super().on_headers_complete()

        def _host_from_target(self) -> None:
            try:
                target = httptools.parse_url(self.url)
            except httptools.HttpParserInvalidURLError:
                return  # uvicorn's own parse of it refuses the request
            host = target.host or b""
            authority = (b"[" + host + b"]" if b":" in host else host) + (b":%d" % target.port if target.port else b"")
            # The scope holds this very list: every Host header sent is replaced by the one the target names.
            self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"]
            self.headers.append((b"host", authority))

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._end_read_deadline()
            if not self._refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # reads on, and starts the next request queued, if any
            if self.pipeline:
                self.flow.pause_reading()

        def _end_read_deadline(self) -> None:
            self._read_deadline = _cancelled(self._read_deadline)

        def _read_too_slow(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            if self.flow.read_paused:  # the server reads no further (answers to send first): not the client's delay
                self._read_deadline = self.loop.call_later(request_read_s, self._read_too_slow)
                return
            cycle = None if self._in_head else self.cycle  # the request's own, once its head was read
            if cycle is None or not cycle.response_started:
                if cycle is not None:  # the endpoint reads a disconnect, and its answer goes nowhere
                    cycle.disconnected = True
                    cycle.message_event.set()
                self._refuse(refusal(408, f"request not received within {request_read_s:g} s"))
            else:
                self.transport.close()

    return BoundedHttpToolsProtocol


def http_config(app: Any) -> Any:
    """uvicorn's configuration of the service's HTTP server (a `uvicorn.Config`)."""
    import uvicorn

    # access_log off: uvicorn formats each line's arguments (path quoting included) before the
    # logger drops it at "warning", a few µs on every request. ws "none": the service has no
    # WebSocket route, yet a request with `Upgrade: websocket` went to the websockets library,
    # which refused it in plain text ("Failed to open a WebSocket connection: invalid request.",
    # or a 403 for a whole handshake); it is now answered as the HTTP request it also is.
    return uvicorn.Config(app, log_level="warning", http=bounded_http_protocol(
        write_stall_s=HTTP_WRITE_STALL_S, open_files=open_files_limit()),
                          ws="none", lifespan="on", access_log=False, timeout_keep_alive=HTTP_KEEP_ALIVE_S)
