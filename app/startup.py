"""`tipstream run` up to serving: the data directory held, the port bound, the service started,
and each failure the operator can fix told as one message (what failed, which setting, what to do)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
# uvicorn warns once for each request it cannot read ("Invalid HTTP request received.",
# "Unsupported upgrade request."): a client sending such requests decided how fast the log grew.
CLIENT_WARNINGS_PER_MINUTE = 6


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


def bounded_http_protocol(request_read_s: float = HTTP_REQUEST_READ_S) -> type:
    """uvicorn's httptools protocol, with bounds uvicorn lacks on what a client can hold:

    - a request line and headers past HTTP_MAX_HEAD_BYTES: 431, and the connection closed. A head
      that ends is measured as parsed; one that has not ended yet by the bytes read after the read it
      began in (where it starts in that read is not known: it may follow another request's bytes);
    - a request not all received `request_read_s` after its first byte: 408, and the connection
      closed (the endpoint, if it was reading the body, reads a disconnect);
    - a new connection that sends nothing: closed after the keep-alive timeout, as an idle one is
      after an answer (uvicorn arms that timer only after a response);
    - a request the parser refuses: 400 with the parser's reason, and uvicorn's warning for it
      at most CLIENT_WARNINGS_PER_MINUTE a minute."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    from app.log_throttle import LogThrottle

    client_warnings = LogThrottle(per_window=CLIENT_WARNINGS_PER_MINUTE)

    def refusal(status: int, message: str) -> bytes:
        # In the API's own shape: a client reading every 4xx as JSON failed on a plain-text one.
        text = json.dumps({"error": message, "field": None}).encode()
        return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                         b"content-length: %d\r\n" % len(text), b"connection: close\r\n\r\n", text])

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes, _head_size, _in_head, _feeding, _refused = 0, 0, True, 0, False
        _read_deadline: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = _ClientWarnings(self.logger, client_warnings)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Exception | None) -> None:
            self._end_read_deadline()
            super().connection_lost(exc)

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

        def _end_read_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_too_slow(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            cycle = None if self._in_head else self.cycle  # the request's own, once its head was read
            if cycle is None or not cycle.response_started:
                if cycle is not None:  # the endpoint reads a disconnect, and its answer goes nowhere
                    cycle.disconnected = True
                    cycle.message_event.set()
                self.transport.write(refusal(408, f"request not received within {request_read_s:g} s"))
            self.transport.close()

    return BoundedHttpToolsProtocol


class StartupError(RuntimeError):
    """A start that cannot go on: the message names what failed, the setting and the fix."""


def shown_url(url: str) -> str:
    """`url` for a message or the log: without the password or token it may carry, as the
    database's is left out.

    >>> shown_url("nats://tipstream:hunter2@nats.internal:4222"), shown_url("nats://s3cret@h:4222")
    ('nats://tipstream:***@nats.internal:4222', 'nats://***@h:4222')
    >>> shown_url("nats://127.0.0.1:4222")
    'nats://127.0.0.1:4222'

    A password may hold an '@' (nats-py, as urllib, reads the host after the last one):

    >>> shown_url("nats://tipstream:p@ss@nats.internal:4222,nats://b:pw@h2:4222")
    'nats://tipstream:***@nats.internal:4222,nats://b:***@h2:4222'
    """
    return re.sub(r"(?<=://)([^/@:]*:)?[^/]*@", lambda found: f"{found.group(1) or ''}***@", url)


def shown_database_url(url: str) -> str:
    """A database URL for a message, without its password.

    >>> shown_database_url("postgresql+psycopg://tipstream:hunter2@db/tipstream")
    'postgresql+psycopg://tipstream:***@db/tipstream'

    libpq also takes the password as a query parameter, which `hide_password` leaves as it is:

    >>> shown_database_url("postgresql+psycopg://tipstream@db/tipstream?password=hunter2&sslmode=require")
    'postgresql+psycopg://tipstream@db/tipstream?password=***&sslmode=require'
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    secret = {key: "***" for key in parsed.query if key.lower() in _SECRET_QUERY_KEYS}
    if secret:
        parsed = parsed.update_query_dict(secret)
    return parsed.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


_SECRET_QUERY_KEYS = ("password", "sslpassword")


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
        logging.getLogger("tipstream").info(
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


def explain(error: BaseException, settings: Settings) -> StartupError | None:
    """A start-up failure the operator can fix, as a message; None for anything else (a bug: its
    traceback is the useful report)."""
    if isinstance(error, StartupError):
        return error
    from app.embedded_nats import EmbeddedNatsError

    if isinstance(error, EmbeddedNatsError):
        return StartupError(f"{str(error)[:1].upper()}{str(error)[1:]}. Or set NATS_URL to a NATS server with "
                            "JetStream, and tipstream uses it instead of starting its own.")
    from nats.js.errors import APIError
    from sqlalchemy.exc import ArgumentError, DBAPIError

    if (isinstance(error, (ArgumentError, DBAPIError, ValueError)) and settings.database_url
            and _at_in_userinfo(settings.database_url)):
        # Neither the URL nor the error shown: both hold what followed the password's '@', read as the host.
        return StartupError(
            "DATABASE_URL has an '@' in its user or password: a URL ends them at the first '@', so the rest of "
            "the password was read as the host (and the port), the database could not be reached, and what the "
            "driver said would show that rest. Percent-encode the password's reserved characters (@ %40, : %3A, / %2F, "
            "? %3F, # %23, % %25, [ %5B, ] %5D): `python3 -c 'import urllib.parse, getpass; "
            "print(urllib.parse.quote(getpass.getpass(), safe=\"\"))'` prints it so.")
    if isinstance(error, ArgumentError):  # not echoed: the URL may hold a password
        url = settings.database_url or ""
        # SQLAlchemy's "Could not parse" for a URL with a space or line break around it said nothing of them.
        spaced = " It has spaces or a line break around it: remove them." if url != url.strip() else ""
        return StartupError(f"DATABASE_URL is not a database URL tipstream can use ({error}).{spaced} Write it as "
                            "`postgresql+psycopg://user:password@host/database`, or unset it for SQLite under "
                            "TIPSTREAM_DATA_DIR.")
    if isinstance(error, DBAPIError):
        return _database_error(error, settings)
    from app.db import DatabaseEncodingError, DatabaseReadOnlyError

    if isinstance(error, (DatabaseEncodingError, DatabaseReadOnlyError)):
        return StartupError(str(error))
    from alembic.util import CommandError

    from app.migrate import MigrationBlocked

    if isinstance(error, MigrationBlocked):
        return StartupError(f"Cannot migrate the database {shown_database_url(settings.sqlalchemy_url)}: {error}")
    if isinstance(error, CommandError):  # e.g. a revision this release does not know: a newer one migrated it
        from app.migrate import revisions

        where, other = ("DATABASE_URL", "database") if settings.database_url else ("TIPSTREAM_DATA_DIR", "directory")
        # A release rolled back finds the database its successor migrated: "run that release" is no fix
        # for a rollback, and the downgrade only that release's migrations know how to do was not named.
        head = revisions()[-1]
        return StartupError(f"Cannot migrate the database {shown_database_url(settings.sqlalchemy_url)} ({where}): "
                            f"{error}. Another release of tipstream wrote it (a newer one, if this one does not know "
                            f"its revision): run that release on it, or set {where} to another {other}. To go back "
                            f"to this release on it, stop the service, then take the database down to this release's "
                            f"schema with the newer release's migrations: `.venv/bin/alembic downgrade {head}` in its "
                            "directory (README, \"Upgrading\").")
    if isinstance(error, ValueError) and not _parses(settings.sqlalchemy_url):  # e.g. a port that is not a number
        return StartupError(f"DATABASE_URL cannot be read ({error}). Write it as "
                            "`postgresql+psycopg://user:password@host:5432/database`, or unset it for SQLite under "
                            "TIPSTREAM_DATA_DIR.")
    if isinstance(error, APIError):
        return _jetstream_error(error, settings)
    return None


def _at_in_userinfo(url: str) -> bool:
    """Whether the URL has an '@' before the one that ends its user and password, which is how a password
    holding '@' reads unencoded.

    >>> _at_in_userinfo("postgresql+psycopg://tipstream:p@ss@db/tipstream")
    True
    >>> _at_in_userinfo("postgresql+psycopg://tipstream:p@ss#w/rd:1?@db:5432/tipstream")
    True
    >>> _at_in_userinfo("postgresql+psycopg://tipstream:p%40ss@db/tipstream?options=-csearch_path%3Dtips")
    False
    >>> _at_in_userinfo("postgresql+psycopg:///tipstream?host=/run/postgresql&user=tips")
    False
    """
    rest = url.split("://", 1)[-1]
    return not rest.startswith("/") and rest.count("@") > 1


def _parses(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        make_url(url)
    except ValueError:
        return False
    return True


# PostgreSQL's SQLSTATEs for a user without the right to create in a schema or write a table
# (insufficient_privilege), or without USAGE on any schema of its search_path (invalid_schema_name:
# "no schema has been selected to create in").
NOT_ALLOWED = ("42501", "3F000")


def _database_error(error: Any, settings: Settings) -> StartupError:
    from sqlalchemy.engine import make_url

    url = shown_database_url(settings.sqlalchemy_url)
    cause = _cause(error)
    if getattr(getattr(error.orig, "diag", None), "sqlstate", None) in NOT_ALLOWED:
        user = make_url(settings.sqlalchemy_url).username or "<user>"
        if owned := re.fullmatch(r"must be owner of \w+ (.+)", cause):
            # A GRANT gives no right to drop or alter a table: telling one did nothing for a migration (or
            # `tipstream migrate base`) run as a user that may only read and write tables the owner made.
            owner = _owner_of(settings.sqlalchemy_url, owned.group(1))
            return StartupError(
                f"The database {url} (DATABASE_URL) refused tipstream's user: {cause}. Creating, changing and "
                f"dropping tipstream's tables (a migration, `tipstream migrate base`) is for their owner"
                f"{f', {owner}' if owner else ''}: run `tipstream migrate` (or `migrate base`) with DATABASE_URL "
                f"naming {owner or 'that user'}. A user that only reads and writes them (SELECT, INSERT, UPDATE, "
                "DELETE, and USAGE on their sequences) runs the service once the owner has migrated them to its "
                "release.")
        schema, exists = _schema_to_grant(settings.sqlalchemy_url, cause)
        if not exists:
            return StartupError(
                f"The database {url} (DATABASE_URL) refused tipstream's user: {cause}. Schema {schema}, the first of "
                f"the user's search_path, does not exist: create it (`CREATE SCHEMA {schema} AUTHORIZATION {user}`), "
                "or name one that does in DATABASE_URL (`?options=-csearch_path%3D<schema>`).")
        where = ("PostgreSQL 15 and later let only the database's owner create in `public`: " if schema == "public"
                 else f"schema {schema} is the first of the user's search_path: ")
        return StartupError(
            f"The database {url} (DATABASE_URL) refused tipstream's user: {cause}. tipstream creates and "
            f"writes its own tables: grant that ({where}`GRANT USAGE, CREATE ON SCHEMA {schema} TO {user}`, and on "
            f"tables another user made, `GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {user}` and the same ON ALL "
            "SEQUENCES), or set DATABASE_URL to the owner's user.")
    from app.db import refused_by_setting

    # A migration on a read-only database: why, and the fix, as a start at head is told.
    if getattr(error.orig, "sqlstate", None) == "25006" and (why := _read_only(settings.sqlalchemy_url)):
        return StartupError(why)
    if (setting := refused_by_setting(error, make_url(settings.sqlalchemy_url).username)) is not None:
        return StartupError(f"The database {url} (DATABASE_URL) refused tipstream: {cause}: {setting}.")
    if cause == "database is locked":  # SQLite, after its 30 s busy timeout: the path is fine
        where = "DATABASE_URL" if settings.database_url else "SQLite under TIPSTREAM_DATA_DIR"
        return StartupError(f"The database {url} ({where}) stayed locked by another process for 30 s: a "
                            "migration, a tool holding a write transaction open, or another tipstream on a copy "
                            "of this data directory. Stop it (or let it finish) and start again.")
    if cause in ("attempt to write a readonly database", "unable to open database file"):
        # Files another user made (`sudo tipstream migrate` once): "a directory this user can write" missed them.
        database = Path(make_url(settings.sqlalchemy_url).database or "")
        theirs = [path for path in (database, *(database.with_name(database.name + end) for end in ("-wal", "-shm")))
                  if path.exists() and not os.access(path, os.R_OK | os.W_OK)]
        if theirs:
            owners = ", ".join(f"{path.name} (uid {path.stat().st_uid}, mode {path.stat().st_mode & 0o777:o})"
                               for path in theirs)
            fix = (f"Make them writable (`chmod u+rw {database}*`)" if all(p.stat().st_uid == os.getuid() for p in theirs)
                   else f"Give them to it (`chown {os.getuid()} {database}*`), or run tipstream as the user that "
                        "owns them")
            return StartupError(f"Cannot write the database {url}: {cause}; this user (uid {os.getuid()}) may not "
                                f"write {owners}. {fix}.")
    if cause == "database or disk is full":  # SQLite's SQLITE_FULL: "a directory this user can write" is no fix
        where, elsewhere = (("DATABASE_URL", "DATABASE_URL to a file") if settings.database_url else
                            ("SQLite under TIPSTREAM_DATA_DIR", "TIPSTREAM_DATA_DIR to a directory"))
        return StartupError(f"Cannot write the database {url} ({where}): its disk is full. Free space on it (`df` "
                            f"names the disk), or set {elsewhere} on another disk.")
    if settings.database_url and settings.database_url.startswith("sqlite"):
        fix = "Set DATABASE_URL to a file in a directory this user can write, or unset it for TIPSTREAM_DATA_DIR's."
        return StartupError(f"Cannot open the database {url} (DATABASE_URL): {cause}. {fix}")
    if settings.database_url:
        fix = _connection_fix(cause, make_url(settings.sqlalchemy_url).username or "<user>") or (
            "Check that the server runs and the database exists (e.g. `createdb`), or unset DATABASE_URL "
            "for SQLite under TIPSTREAM_DATA_DIR.")
        return StartupError(f"Cannot open the database {url} (DATABASE_URL): {cause}. {fix}")
    return StartupError(f"Cannot open the database {url} (SQLite under TIPSTREAM_DATA_DIR): {cause}. "
                        "Set TIPSTREAM_DATA_DIR to a directory this user can write, or DATABASE_URL to PostgreSQL.")


def _connection_fix(cause: str, user: str) -> str | None:
    """The fix for a connection PostgreSQL (or libpq) refused for a reason other than the server or the
    database being away, which is all the message used to say: 'check that the server runs and the
    database exists' after a wrong password or a connection limit sent the operator the wrong way.

    >>> print(_connection_fix('connection failed: connection to server at "db" (10.0.0.5), port 5432 failed: '
    ...                       'FATAL:  password authentication failed for user "tipstream"', "tipstream"))
    The server refused the password of tipstream (or has no such user, which it does not tell): write the right user and password in DATABASE_URL (`postgresql+psycopg://tipstream:<password>@host/database`, with @ : / % ? # in it written %40 %3A %2F %25 %3F %23), or in ~/.pgpass.
    >>> _connection_fix("connection failed: connection to server at ... failed: Connection refused", "t") is None
    True
    """
    from app.db import quoted

    if "password authentication failed" in cause:
        return (f"The server refused the password of {user} (or has no such user, which it does not tell): write "
                "the right user and password in DATABASE_URL "
                f"(`postgresql+psycopg://{user}:<password>@host/database`, with @ : / % ? # in it written %40 %3A %2F "
                "%25 %3F %23), or in ~/.pgpass.")
    if "no password supplied" in cause:
        return (f"The server asks for {user}'s password and DATABASE_URL gives none: add it "
                f"(`postgresql+psycopg://{user}:<password>@host/database`), or put it in ~/.pgpass.")
    if "server does not support SSL, but SSL was required" in cause:
        return ("DATABASE_URL asks for SSL (`sslmode=require`, `verify-ca` or `verify-full`) and the server offers "
                "none: turn on `ssl` in the server's postgresql.conf, or, on a network where the link needs no "
                "encryption, take sslmode out of DATABASE_URL.")
    if re.search(r'root certificate file ".*" does not exist', cause):
        return ("DATABASE_URL asks to check the server's certificate (`sslmode=verify-full` or `verify-ca`) against "
                "a CA file that is not there: name the CA that signed it (`sslrootcert=/path/to/ca.pem`), or "
                "`sslrootcert=system` for the system's CAs.")
    if "does not match host name" in cause:
        return ("The server's certificate names another host than DATABASE_URL's: write the host as the certificate "
                "names it, or use `sslmode=verify-ca`, which checks who signed the certificate but not the name.")
    if "certificate verify failed" in cause:
        return ("The server's certificate is not signed by the CA DATABASE_URL names (`sslrootcert`, else "
                "~/.postgresql/root.crt): name the CA that signed it.")
    if "no pg_hba.conf entry" in cause:
        return (f"The server's pg_hba.conf has no line that lets {user} in from this host to this database: add "
                "one (then `SELECT pg_reload_conf()`), or connect as a user it lets in.")
    if re.search(r'role ".*" does not exist', cause):
        return f"Create the user (`CREATE ROLE {user} LOGIN PASSWORD '...'`), or name one that exists in DATABASE_URL."
    limit = re.search(r"too many connections for (database|role) \"(.*)\"", cause)
    if limit or "too many clients already" in cause or "remaining connection slots are reserved" in cause:
        where = (f"`ALTER {limit.group(1).upper()} {quoted(limit.group(2))} CONNECTION LIMIT <n>`" if limit
                 else "the server's max_connections")
        return (f"The server is at its limit of connections ({where}): tipstream holds one for its lock and opens "
                "up to 15 more at a peak (its pool keeps 5). Raise the limit, or end the sessions that hold the "
                "connections (`SELECT * FROM pg_stat_activity`).")
    return None


@contextmanager
def _throwaway_engine(url: str) -> Iterator[Any]:
    """An engine for one question asked while the start fails, disposed of after it."""
    from app.db import make_engine

    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _owner_of(url: str, table: str) -> str | None:
    from sqlalchemy import text

    try:
        with _throwaway_engine(url) as engine, engine.connect() as conn:
            return conn.execute(text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(:t)"),
                                {"t": table}).scalar()
    except Exception:  # noqa: BLE001 - the message goes on without the name
        return None


def _read_only(url: str) -> str | None:
    from app.db import DatabaseReadOnlyError, refuse_read_only

    try:
        with _throwaway_engine(url) as engine:
            refuse_read_only(engine)
    except DatabaseReadOnlyError as read_only:
        return str(read_only)
    except Exception:  # noqa: BLE001 - the server's own words then
        return None
    return None


def _schema_to_grant(url: str, cause: str) -> tuple[str, bool]:
    """The schema tipstream's tables go in, which the GRANT must name, and whether it exists: the one
    the server refused, else the first of the user's search_path it may use (`options=-csearch_path=
    tipstream` in DATABASE_URL, or `ALTER ROLE ... SET search_path`), else the first it names. The
    message named `public` whatever the search_path, and the GRANT it gave changed nothing."""
    refused = re.fullmatch(r"permission denied for schema (.+)", cause)
    from sqlalchemy import text

    from app.db import quoted

    try:
        with _throwaway_engine(url) as engine, engine.connect() as conn:
            schema, path = conn.execute(text("SELECT current_schema(), current_setting('search_path')")).one()
            named = [name.strip().strip('"') for name in path.split(",")]
            schema = (refused.group(1) if refused else
                      schema or next((name for name in named if name and name != "$user"), "public"))
            exists = conn.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = :name"),
                                  {"name": schema}).scalar_one() > 0
    except Exception:  # noqa: BLE001 - the message goes on with what the server said, or PostgreSQL's default
        return (refused.group(1) if refused else "public"), True
    return quoted(schema), exists


def _cause(error: Any) -> str:
    """What failed, in one line: the server's own message when it answered (psycopg's text goes
    on with the statement's "LINE 2: ..." and a caret, or a DETAIL), else the driver's."""
    primary = getattr(getattr(error.orig, "diag", None), "message_primary", None)
    if primary:
        return primary.strip()
    return _last_failure(str(error.orig or error))


def _last_failure(text: str) -> str:
    r"""The failure in libpq's text: the last line that says what failed.

    It ends a refused connection with an indented hint ("Is the server running on that host...?"), and
    a missing root certificate with one that is not indented, which was taken for the failure: the file
    it names was left out.

    >>> _last_failure('connection failed: connection to server at "db", port 5432 failed: Connection refused\n'
    ...               '\tIs the server running on that host and accepting TCP/IP connections?')
    'connection failed: connection to server at "db", port 5432 failed: Connection refused'
    >>> _last_failure('connection failed: connection to server at "db", port 5432 failed: root certificate file '
    ...               '"/root/.postgresql/root.crt" does not exist\nEither provide the file, use the system\'s '
    ...               'trusted roots with sslrootcert=system, or change sslmode to disable server certificate '
    ...               'verification.')
    'connection failed: connection to server at "db", port 5432 failed: root certificate file "/root/.postgresql/root.crt" does not exist'
    """
    lines = [line for line in text.strip().splitlines() if not line[:1].isspace()] or text.strip().splitlines()
    return next((line for line in reversed(lines) if " failed: " in line), lines[-1]).strip()


def _storage_fix(settings: Settings) -> str:
    if settings.stream_max_bytes > 0:
        return (f"Each of tipstream's four streams reserves TIPSTREAM_STREAM_MAX_BYTES={settings.stream_max_bytes} "
                f"bytes ({4 * settings.stream_max_bytes:,} in all) of the account's JetStream file storage "
                "(`max_file` in the account's `jetstream {}` limits, or the server's `max_file_store`): lower "
                "TIPSTREAM_STREAM_MAX_BYTES to fit, or raise that limit.")
    return ("The account's or the server's JetStream file storage is full (`max_file` in the account's "
            "`jetstream {}` limits, the server's `max_file_store`, or the disk of its store_dir): free or raise it.")


# The account limits and cluster sizes (nats-server's JetStream error codes, the same from 2.9 to 2.15) a start
# can run into, and what the operator does about each; the server's own words say only what was hit.
_JETSTREAM_FIXES: dict[int | None, Callable[[Settings], str]] = {
    10039: lambda _: ("Enable JetStream for the account of NATS_URL's user (`jetstream: enabled`, or limits, in "
                      "the account's config), connect as a user of an account that has it, or unset NATS_URL to run "
                      "an embedded server."),
    10027: lambda _: ("tipstream needs four streams of its own (SIGNALS, FEEDBACK, DECISIONS, DLQ) beside the "
                      "account's others: raise `max_streams` in the account's `jetstream {}` limits, or give "
                      "tipstream an account of its own."),
    10026: lambda _: ("tipstream needs one consumer of its own on each of SIGNALS, FEEDBACK and DECISIONS: raise "
                      "`max_consumers` (nats-server counts it per stream) in the account's `jetstream {}` limits, or "
                      "remove the consumers nobody needs from those streams (`nats consumer ls`)."),
    10113: lambda _: ("This account requires every stream to have a byte limit (`max_bytes_required`): set "
                      "TIPSTREAM_STREAM_MAX_BYTES, in bytes per stream (the four streams reserve four times that of "
                      "the account's storage, and drop their oldest events at it)."),
    10047: _storage_fix,
    10074: lambda s: (f"TIPSTREAM_STREAM_REPLICAS={s.stream_replicas} asks for {s.stream_replicas} copies of each "
                      "stream, and NATS_URL names a single server (no cluster), which keeps one: set "
                      f"TIPSTREAM_STREAM_REPLICAS=1, or set NATS_URL to a NATS cluster of at least {s.stream_replicas} "
                      "nodes."),
    10005: lambda s: _replicas_fix(s, "has fewer nodes with JetStream up"),
    # streams.jetstream.NO_LEADER, written out: importing it here would load nats-py for every command.
    -1: lambda s: _replicas_fix(s, "could not elect a leader for it: fewer nodes are up, or they cannot "
                                   "reach each other"),
}


def _replicas_fix(settings: Settings, why: str) -> str:
    n = settings.stream_replicas
    return (f"TIPSTREAM_STREAM_REPLICAS={n} puts each stream's {n} copies on {n} nodes of the NATS cluster, which "
            f"{why}: start the missing nodes (`nats server list` names those up), or set TIPSTREAM_STREAM_REPLICAS "
            "to at most the number of nodes up.")


def _jetstream_error(error: Any, settings: Settings) -> StartupError:
    from nats.js.errors import ServiceUnavailableError

    from streams.jetstream import ALL_STREAMS

    where = f"{shown_url(settings.nats_url)} (NATS_URL)" if settings.nats_url else "the embedded nats-server"
    if isinstance(error, ServiceUnavailableError) and error.description is None:
        # nats-py's answer to "no responders": nothing serves the JetStream API (it read "None (error None)").
        return StartupError(f"NATS at {where} does not serve JetStream, which tipstream's streams need: start it "
                            "with JetStream (`nats-server -js`, or `jetstream {}` in its config) for this account, "
                            "or unset NATS_URL to run an embedded one.")
    code = f" (error {error.err_code})" if (error.err_code or 0) > 0 else ""  # -1: tipstream's own, no server's
    message = f"JetStream at {where} refused tipstream's start: {error.description}{code}."
    fix = _JETSTREAM_FIXES.get(error.err_code)
    if fix is not None:
        return StartupError(f"{message} {fix(settings)}")
    if error.err_code == 10065:  # subjects overlap with an existing stream
        streams = ", ".join(f"{spec.name} ({' '.join(spec.subjects)})" for spec in ALL_STREAMS)
        message += (f" tipstream's streams {streams} need those subjects to themselves: remove or change the "
                    "stream that takes them (`nats stream ls`), or point NATS_URL at another server "
                    "(unset: an embedded one).")
    return StartupError(message)


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
    return uvicorn.Config(app, log_level="warning", http=bounded_http_protocol(), ws="none", lifespan="on",
                          access_log=False, timeout_keep_alive=HTTP_KEEP_ALIVE_S)


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
