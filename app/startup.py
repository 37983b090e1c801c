"""`tipstream run` up to serving: the data directory held, the port bound, the service started,
and each failure the operator can fix told as one message (`app.start_errors`)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from app.http_server import http_config
from app.start_errors import StartupError, data_dir_is_a_file, explain, shown_database_url

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
log = logging.getLogger("tipstream")


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
        raise StartupError(f"Cannot use the data directory {data_dir} (TIPSTREAM_DATA_DIR): "
                           + (data_dir_is_a_file(data_dir) or f"{error.strerror}. Set TIPSTREAM_DATA_DIR to a "
                              "directory this user can write.")) from None
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
        raise _cannot_listen(error, host, port) from None
    sock.set_inheritable(True)
    return sock


def _cannot_listen(error: OSError, host: str, port: int) -> StartupError:
    if error.errno == errno.EADDRINUSE:
        return StartupError(f"Port {port} on {host} is already in use (TIPSTREAM_PORT={port}): stop what "
                            "listens there, or set TIPSTREAM_PORT to a free port (0 picks one).")
    return StartupError(f"Cannot listen on {host}:{port} (TIPSTREAM_HOST, TIPSTREAM_PORT): "
                        f"{error.strerror or error}. Set TIPSTREAM_HOST to an address of this machine "
                        "(127.0.0.1, or 0.0.0.0 for all) and TIPSTREAM_PORT to a free port above 1023.")


def listen(sock: socket.socket, host: str, backlog: int) -> None:
    """Listen on the socket `listen_socket` bound. Bound is not held: another program binding the port with
    SO_REUSEADDR while the service started, and listening first, left this listen to fail, and uvloop's
    `create_server` drops that failure: the service ran on, printing its address, deaf to every request."""
    try:
        sock.listen(backlog)
    except OSError as error:
        raise _cannot_listen(error, host, sock.getsockname()[1]) from None


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
    from nats.errors import TimeoutError as NatsTimeout

    if isinstance(failed, NatsTimeout) and service.nc is not None:  # connected, and a JetStream call unanswered
        raise service.nats_connection.unanswered() from None
    raise explain(failed, service.settings) or failed


async def serve(settings: Settings, sock: socket.socket, demo_rate: float) -> int:
    """Start, then serve on `sock` until a stop signal (`STOP_SIGNALS`); the exit code."""
    from app.bootstrap import Service

    try:
        service = Service(settings)  # the database engine: a URL of no known kind fails here
    except Exception as error:  # noqa: BLE001 - raised again, as a message where the operator can fix it
        raise explain(error, settings) or error from None
    stopper = Stopper()
    if await start(service, stopper) is not None:
        return stopper.exit_code
    try:
        code = await _serve_started(settings, service, stopper, sock, demo_rate)
    finally:
        # Whichever way serving ended: uvicorn's lifespan stops the service only once uvicorn has started.
        # Its start failing (the port not ours to listen on, its lifespan failing) left the service running
        # as the process ended: no last checkpoint, nor the embedded nats-server's or the database lock's end.
        await service.stop()
    if service.database_hangs:
        end_now(code)
    return code


def end_now(code: int) -> NoReturn:
    """End the process with `code` without the interpreter's exit, which joins every worker thread: those stuck in
    a statement to a database that hangs would hold it for as long as the database does (for ever, unthawed)."""
    log.info("stopping: ending without the worker threads that wait on the database (their sessions end with the "
             "process)")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def started_line(url: str, data_dir: Path, database_url: str | None) -> str:
    """The line printed once the service answers, with where its data is: the database first when it is not the
    SQLite file in the data directory, which then holds only a lock and a spool ("data in" it sent a backup there)."""
    if not database_url:  # set empty, it is unset (`Settings.sqlalchemy_url`)
        return f"tipstream on {url} (data in {data_dir})"
    return f"tipstream on {url} (database {shown_database_url(database_url)}; data directory {data_dir})"


async def _serve_started(settings: Settings, service: Service, stopper: Stopper, sock: socket.socket,
                         demo_rate: float) -> int:
    import uvicorn

    from app.api import create_app

    port = sock.getsockname()[1]
    app = create_app(settings, service, started=True)
    config = http_config(app)
    line = started_line(http_url(settings.host, port), settings.data_dir, settings.database_url)

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
    listen(sock, settings.host, config.backlog)
    await server.serve(sockets=[sock])
    return stopper.exit_code
