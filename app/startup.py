"""`tipstream run` up to serving: the data directory held, the port bound, the service started,
and each failure the operator can fix told as one message (`app.start_errors`)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.start_errors import StartupError, explain

if TYPE_CHECKING:
    from app.bootstrap import Service
    from app.settings import Settings

# In the data directory, locked while a service uses it; it holds that service's pid.
LOCK_FILE = "tipstream.lock"
# How long a start waits for a nats-server found on the embedded store to end (that of a service
# just killed ends on its own: the kernel sends it SIGTERM) before taking it for a running service's.
STORE_SERVER_WAIT_S = 10.0
# SIGHUP too: the terminal that ran `tipstream run` closing (an ssh session lost) sends it, and its
# default ended the process at once, with no last checkpoint and the decisions' batch unsent.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
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
        if left_out:
            message = f"{message} ({left_out} more in the minute before, left out)"
        self._logger.warning(message, *args, **kwargs)

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


def bounded_http_protocol(request_read_s: float = HTTP_REQUEST_READ_S, open_files: int | None = None,
                          write_stall_s: float = HTTP_WRITE_STALL_S, idle_grace_s: float = HTTP_IDLE_GRACE_S) -> type:
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
    - requests pipelined behind the one served: no more is read until they are answered (uvicorn
      read on after each answer, so a client sending without reading queued requests without a bound);
    - an answer the client has not read on for `write_stall_s`, its buffers full: the connection dropped;
    - at most `max_http_connections(open_files)` connections: past it, the one idle longest (at
      least `idle_grace_s`) is closed for the new one, or with none idle the new one gets 503 and is closed, and the log says
      to raise the limit, at most once a minute (uvicorn accepted until the process had no file
      descriptor left, then reset every new connection without a word, and the service's own
      reconnects to NATS and its database failed)."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    from app.log_throttle import LogThrottle

    client_warnings = LogThrottle(per_window=CLIENT_WARNINGS_PER_MINUTE)
    full_warnings = LogThrottle()
    most = None if open_files is None else max_http_connections(open_files)

    def refusal(status: int, message: str) -> bytes:
        # In the API's own shape: a client reading every 4xx as JSON failed on a plain-text one.
        text = json.dumps({"error": message, "field": None}).encode()
        return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                         b"content-length: %d\r\n" % len(text), b"connection: close\r\n\r\n", text])

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes, _head_size, _in_head, _feeding, _refused = 0, 0, True, 0, False
        _read_deadline: asyncio.TimerHandle | None = None
        _write_deadline: asyncio.TimerHandle | None = None
        _answering: Any = None  # the request answered now

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = _ClientWarnings(self.logger, client_warnings)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
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
            self.transport.close()
            left_out = full_warnings.allow("full")
            if left_out is not None:
                log.warning("HTTP: %d connections open, none idle, the most that the limit on open files (ulimit -n "
                            "%d) leaves room for beside the %d the service keeps for NATS, its database and files: a new "
                            "connection was answered 503%s. Raise the limit (ulimit -n; systemd's LimitNOFILE=, "
                            "docker's --ulimit nofile=), or serve slow clients through a proxy that holds them (nginx).",
                            len(self.connections) - 1, open_files, open_files - most,
                            f" ({left_out} more in the minute before)" if left_out else "")

        def connection_lost(self, exc: Exception | None) -> None:
            self._let_go()
            self._end_read_deadline()
            self._write_deadline = _cancelled(self._write_deadline)
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
            self._feeding = len(data)
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > HTTP_MAX_HEAD_BYTES:
                self._refuse_head()

        def _refuse_head(self) -> None:
            self._refused = True
            self.transport.write(refusal(431, f"request line and headers larger than {HTTP_MAX_HEAD_BYTES} bytes"))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            # Called as uvicorn catches the parser's error. Its own answer, "Invalid HTTP request
            # received." in plain text, said nothing of what was wrong (the parser's error does).
            error = sys.exc_info()[1]
            reason = str(error) if error is not None and str(error) else msg
            if "url" in reason.lower():
                reason += " (a path and query string are printable ASCII: percent-encode any other byte, as UTF-8)"
            self.transport.write(refusal(400, f"not an HTTP/1.1 request this server can read: {reason}"))
            self.transport.close()

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
            super().on_headers_complete()

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
                self.transport.write(refusal(408, f"request not received within {request_read_s:g} s"))
            self.transport.close()

    return BoundedHttpToolsProtocol


def http_url(host: str, port: int) -> str:
    """The service's address as a URL, to print and to pass as `tipstream models --url`.

    >>> http_url("127.0.0.1", 8000), http_url("::1", 8000)
    ('http://127.0.0.1:8000', 'http://[::1]:8000')
    """
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # IPv6 in brackets, as URLs write it


def hold_data_dir(data_dir: Path) -> int:
    """Lock the data directory for this process's life; its file descriptor, to keep open.

    Two services on one directory would share the embedded NATS store and the SQLite file. The
    lock is the kernel's (flock), so it goes with the process however it ends: a crash or SIGKILL
    leaves no stale lock behind, and the file itself is left in place (removing it would let a
    third start lock a new file while the second still holds the old one).
    """
    try:
        # Owner-only when this creates it: it holds the users' events (the embedded NATS store) and
        # their features (the SQLite file), which the umask's usual 022 left readable to every local
        # user. One that exists keeps the mode its owner gave it.
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise StartupError(f"Cannot use the data directory {data_dir} (TIPSTREAM_DATA_DIR): {error.strerror}. "
                           "Set TIPSTREAM_DATA_DIR to a directory this user can write.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise StartupError(
            f"The data directory {data_dir.resolve()} is in use by another tipstream"
            f"{f' (pid {holder})' if holder.isdigit() else ''}: two would share its NATS store and database. "
            "Stop that one, or set TIPSTREAM_DATA_DIR to another directory.") from None
    except OSError as error:  # ENOLCK or EOPNOTSUPP: a network file system without locks
        os.close(fd)
        raise StartupError(
            f"Cannot lock the data directory {data_dir.resolve()} (TIPSTREAM_DATA_DIR): {error.strerror}. Its file "
            "system does not take locks (NFS without a lock daemon does not); set TIPSTREAM_DATA_DIR to a "
            "directory on a local disk.") from None
    # Ours before the wait below: through it, another start or `migrate base` named the pid the file
    # still held, of a service gone since.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        _no_server_on_the_store(data_dir)
    except StartupError:
        os.close(fd)
        raise
    return fd


def _no_server_on_the_store(data_dir: Path) -> None:
    """A release from before the lock (2026-12-04) takes none, so a service of one still running on
    the directory is told by its embedded nats-server instead: started anyway, a second server ran on
    the same JetStream store and two services wrote one database (an upgrade started before the old
    release was stopped). A server whose service was just killed is given time to end."""
    import time

    from app.embedded_nats import STORE_DIR, runs_on_store, server_on_store, started_by

    store = data_dir / STORE_DIR
    deadline = time.monotonic() + STORE_SERVER_WAIT_S
    pid = server_on_store(store)
    if pid is not None:
        log.info(
            "a nats-server (pid %d) runs on %s: waiting up to %g s for it to end (a service just killed), else this "
            "start stops", pid, store.resolve(), STORE_SERVER_WAIT_S)
    while pid is not None and time.monotonic() < deadline:
        time.sleep(0.1)
        # Until it has exited, not only removed its ports file: it may still be writing the store.
        if not runs_on_store(pid, store):
            pid = server_on_store(store)
    if pid is not None:
        # The service to stop is the server's parent: stopped alone, the server left that service running
        # without NATS, and this start free to begin a second server under it.
        service = started_by(pid)
        by, one = ("", "one") if service is None else (f", started by pid {service}", f"service (pid {service})")
        raise StartupError(
            f"The data directory {data_dir.resolve()} is in use by another tipstream: a nats-server (pid {pid}{by}) "
            f"runs on its NATS store {store.resolve()}, as a service of a release from before 2026-12-04 (which takes "
            f"no lock on the directory) runs it: two would share its NATS store and database. Stop that {one}, or set "
            "TIPSTREAM_DATA_DIR to another directory.")


def data_dir_holder(data_dir: Path) -> str | None:
    """Which service holds `data_dir` ("pid 123", "pid ?"), None when none does; creates nothing. A
    service of a release from before the lock is named by its embedded nats-server (`hold_data_dir`)."""
    from app.embedded_nats import STORE_DIR, server_on_store, started_by

    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"pid {os.read(fd, 32).decode(errors='replace').strip() or '?'}"
        except OSError:  # a file system without locks: as hold_data_dir, nothing to tell
            return None
        finally:
            os.close(fd)
    server = server_on_store(data_dir / STORE_DIR)
    if server is None:
        return None
    service = started_by(server)
    return (f"{'' if service is None else f'pid {service}, '}its nats-server's pid {server}; "
            "a release from before 2026-12-04")


def listen_socket(settings: Settings) -> socket.socket:
    """The HTTP socket, bound before the service starts: a taken port fails in a moment, not
    after migrations and NATS, and with `TIPSTREAM_PORT=0` the port is known before serving."""
    host, port = settings.host, settings.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise StartupError(f"Port {port} on {host} is already in use (TIPSTREAM_PORT={port}): stop what "
                               "listens there, or set TIPSTREAM_PORT to a free port (0 picks one).") from None
        raise StartupError(f"Cannot listen on {host}:{port} (TIPSTREAM_HOST, TIPSTREAM_PORT): "
                           f"{error.strerror or error}. Set TIPSTREAM_HOST to an address of this machine "
                           "(127.0.0.1, or 0.0.0.0 for all) and TIPSTREAM_PORT to a free port above 1023.") from None
    sock.set_inheritable(True)
    return sock


class Stopper:
    """SIGINT, SIGTERM and SIGHUP, from the start of `tipstream run` to its end: what was received, and
    what it stops (the start while it runs, the server once it serves).

    One handler throughout, so no signal falls between two: one that came as the start ended
    was run after the start's handler had gone and was lost (the service went on to serve), and
    one between that and uvicorn's own ended the process with no last checkpoint. uvicorn puts
    this handler back after serving and raises the signal it caught again; Python's default for
    SIGINT then ended the process with a KeyboardInterrupt traceback.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.starting: asyncio.Future[Any] | None = None
        self.server: Any = None  # uvicorn.Server, once there is one
        self.failed: str | None = None  # why the service stopped itself (`fail`)

    def __call__(self, sig: int, frame: Any = None) -> None:
        self.received.append(sig)
        if self.starting is not None:
            self.starting.cancel()
        if self.server is not None:
            self.server.should_exit = True

    def fail(self, message: str) -> None:
        """The serving service cannot go on (`Service.on_fatal`): stop the server, exit code 1."""
        self.failed = message
        if self.server is not None:
            self.server.should_exit = True

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the first signal; 1 for a service that stopped
        itself (`fail`); else 0."""
        if self.received:
            return 128 + self.received[0]
        return 1 if self.failed else 0


async def start(service: Service, stopper: Stopper) -> int | None:
    """Start the service; on a stop signal (`STOP_SIGNALS`) meanwhile, stop what has started and return the signal.

    uvicorn's own signal handlers come with the server, after the start: until then a signal
    waited for the start to end, and waiting for NATS can last. A failed start is stopped too
    (the embedded nats-server, connections) and raised as a StartupError when the operator can
    fix it. Started, the handlers stay (`Stopper`): a signal that comes as the start ends is
    handled once the loop reads it, and stops the server `serve` starts.
    """
    loop = asyncio.get_running_loop()
    starting = stopper.starting = asyncio.ensure_future(service.start())
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopper, sig)
    try:
        await starting
    except BaseException as error:  # noqa: BLE001 - stopped below, then raised again
        failed = error
    else:
        # The handlers stay: one whose signal came as the start ended runs later, and stops the server.
        stopper.starting = None
        if not stopper.received:
            return None
        failed = asyncio.CancelledError()
    for sig in STOP_SIGNALS:  # a second signal while stopping ends the process at once
        loop.remove_signal_handler(sig)
    await service.stop()
    if stopper.received:
        return stopper.received[0]
    raise explain(failed, service.settings) or failed


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


async def serve(settings: Settings, sock: socket.socket, demo_rate: float) -> int:
    """Start, then serve on `sock` until a stop signal (`STOP_SIGNALS`); the exit code."""
    import uvicorn

    from app.api import create_app
    from app.bootstrap import Service

    try:
        service = Service(settings)  # the database engine: a URL of no known kind fails here
    except Exception as error:  # noqa: BLE001 - raised again, as a message where the operator can fix it
        raise explain(error, settings) or error from None
    stopper = Stopper()
    if await start(service, stopper) is not None:
        return stopper.exit_code
    port = sock.getsockname()[1]
    app = create_app(settings, service, started=True)
    config = http_config(app)
    line = f"tipstream on {http_url(settings.host, port)} (data in {settings.data_dir})"

    class Server(uvicorn.Server):
        # The line once the socket listens: printed before, it named a port nothing answered on
        # yet, or ever (a start that failed).
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                print(line, flush=True)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            # uvicorn skips the lifespan's shutdown on a second Ctrl-C: the service's stop (its decisions'
            # flush, the last checkpoint) then ran only as the loop closed, with its tasks cancelled under
            # it, and Starlette logged that as a CancelledError traceback. The second one skips the wait
            # for open connections; the stop still runs.
            if not self.lifespan.shutdown_event.is_set():
                await self.lifespan.shutdown()

    server = Server(config)
    stopper.server = server
    for sig in STOP_SIGNALS:  # Python's handler now, which uvicorn keeps and puts back (`Stopper`)
        signal.signal(sig, stopper)
    if stopper.received:  # came between the start and here: serve nothing, stop as on a signal
        server.should_exit = True
    service.on_fatal = stopper.fail
    if service.fatal is not None:  # came as the start ended
        stopper.fail(service.fatal)
    if demo_rate:
        from app.demo import attach_demo

        attach_demo(app, rate=demo_rate, stopping=lambda: server.should_exit, port=port)
    await server.serve(sockets=[sock])
    return stopper.exit_code
