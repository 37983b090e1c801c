"""One service per PostgreSQL database: a session advisory lock, held as long as the service runs.

Two services on one database (two replicas, or a new one started before the old one stopped)
each re-created the other's durable consumers in NATS, so each folded some of every stream's
events, and both wrote user states, positions and models over each other's: features and models
went wrong with nothing said. A SQLite file, which services with data directories of their own
could share (`DATABASE_URL`; `app.startup.hold_data_dir` holds one directory only, also when the
file is in it), is held by the kernel's lock (flock) on a file beside it.

The lock lives with its connection, so a crash lets go of it at once; PostgreSQL restarted lets go
of it too, and `keep` takes it again, or tells the service to stop if another took it meanwhile.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import Connection, Engine, make_url, text

from app.db import make_engine

log = logging.getLogger("tipstream.service_lock")

SERVICE_LOCK = 0x7469707365727663  # "tipservc"; the migrations' lock is another key (migrations/env.py)
SESSION_SETTINGS = {
    # A dead client's session ends within ~30 s.
    "tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3", "tcp_user_timeout": "30000",
    # The session is idle between two checks (10 s) by design. An operator's idle_session_timeout (PostgreSQL 14
    # on) ended it at every one shorter: a warning every 10 s, and the lock not held most of the time, so a second
    # service could start in a gap, and the first then stopped finding it taken.
    "idle_session_timeout": "0",
}
# pg_locks shows a bigint key as two 32-bit halves.


def lock_key(schema: str | None) -> int:
    """The service lock's key for tipstream's tables in `schema` (the first of its user's search_path):
    services on two schemas of one database (`options=-csearch_path=...`) share no table, and the one
    key for the whole database refused the second as if they did. `public`'s is the key releases took
    before, so that such a service still finds one of them running on the database.

    >>> lock_key("public") == lock_key(None) == SERVICE_LOCK
    True
    >>> len({lock_key("public"), lock_key("staging"), lock_key("tipstream")})
    3
    """
    if schema in (None, "public"):
        return SERVICE_LOCK
    return SERVICE_LOCK ^ zlib.crc32(schema.encode())  # its upper half unchanged: a positive bigint still


def _halves(key: int) -> dict[str, int]:
    return {"high": key >> 32, "low": key & 0xFFFFFFFF}


def session_name(host: str, pid: int) -> str:
    """The lock's session's application_name (63 bytes at most): a long host name is cut from its
    front, as a Kubernetes pod's name ends with what tells it from its siblings, and the pid stays.

    >>> session_name("web-1", 42)
    'tipstream web-1 pid 42'
    >>> name = session_name("tipstream-production-eu-west-1-feature-store-7d9f8b6c5d-x2k4q", 1234567)
    >>> name, len(name)
    ('tipstream ...-west-1-feature-store-7d9f8b6c5d-x2k4q pid 1234567', 63)
    """
    host = host.encode("ascii", "replace").decode()  # PostgreSQL shows anything else as '?'
    room = 63 - len(f"tipstream  pid {pid}")
    return f"tipstream {host if len(host) <= room else '...' + host[len(host) - room + 3:]} pid {pid}"


class ServiceLockTaken(RuntimeError):
    """Another tipstream service holds the database: `holder` says which."""

    def __init__(self, holder: str, *, file: bool = False) -> None:
        self.holder = holder
        # A file's lock goes with its process, which is on this host: no replicas, no dead host to wait for.
        how = "" if file else (" (in Kubernetes: one replica, with the Recreate strategy; a host that died lets "
                               "go within ~30 s)")
        schema = "" if file else (", or a schema of its own in this one (`?options=-csearch_path%3D<schema>` in "
                                  "DATABASE_URL)")
        super().__init__(
            f"Another tipstream service runs against this database ({holder}). One service per database: "
            f"two would each read part of every stream and write over each other's state. Stop the other "
            f"first{how}, or give this one a database of its own (DATABASE_URL){schema}.")


def sqlite_lock_path(url: str) -> Path | None:
    """The file whose flock holds a SQLite database; None for one in memory, or on another server.

    Also one in the service's data directory, which that directory's lock does not hold from a
    service with a directory of its own given the file (`DATABASE_URL`): it took the lock beside
    the file, which no one held, and both services wrote the one database.

    >>> str(sqlite_lock_path("sqlite:////srv/shared/tips.db"))
    '/srv/shared/tips.db-tipstream.lock'
    >>> str(sqlite_lock_path("sqlite:////srv/a/tipstream.db"))
    '/srv/a/tipstream.db-tipstream.lock'
    >>> sqlite_lock_path("sqlite://"), sqlite_lock_path("postgresql://db/tips")
    (None, None)
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = Path(parsed.database).resolve()
    return database.with_name(database.name + "-tipstream.lock")


class ServiceLock:
    def __init__(self, url: str) -> None:
        self.url = url
        self.name = session_name(socket.gethostname(), os.getpid())
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._key = SERVICE_LOCK  # the schema's (`lock_key`), once taken
        self._file_path = sqlite_lock_path(url)
        self._file: int | None = None
        # `keep` runs in a worker thread that a stop's cancel does not end: one still taking the lock
        # again when `release` ran took it after, and held it for the rest of the process.
        self._mutex = threading.Lock()
        self._released = False
        # Its session is one connection, and its checks wait on each other (`_mutex`): they run on a thread of their
        # own, one at a time (`akeep`), not on asyncio's default executor, which they filled while the database hung.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tipstream-lock")
        self._check: asyncio.Future[None] | None = None

    @property
    def needed(self) -> bool:
        return self.url.startswith("postgresql")

    def acquire(self) -> None:
        """Take the lock, or raise ServiceLockTaken naming who holds it."""
        if self._file_path is not None:
            self._take_file(self._file_path)
        if not self.needed:
            return
        with self._mutex:
            self._released = False
            self._take()

    def _take(self) -> None:
        self._engine = make_engine(self.url)
        try:
            conn = self._engine.connect()
        except BaseException:
            self._drop()
            raise
        try:
            conn.execute(text("SELECT set_config('application_name', :name, false)"), {"name": self.name})
            # The server's own keepalives on this session: a host that died (power, network) kept its lock
            # until PostgreSQL's default probes, ~2 hours, and its replacement could not start until then.
            # And no idle_session_timeout of the operator's (SESSION_SETTINGS says why).
            known = conn.execute(text("SELECT name FROM pg_settings WHERE name = ANY(:names)"),
                                 {"names": list(SESSION_SETTINGS)}).scalars()  # PostgreSQL 12 and 14 added some
            for name in known:
                conn.execute(text("SELECT set_config(:name, :value, false)"),
                             {"name": name, "value": SESSION_SETTINGS[name]})
            key = lock_key(conn.execute(text("SELECT current_schema()")).scalar())
            taken = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one()
            conn.commit()
            holder = None if taken else self._holder(conn, key)
        except BaseException:  # the session may hold the lock: it must not outlive this failure
            conn.close()
            self._drop()
            raise
        if holder is not None:
            conn.close()
            self._drop()
            raise ServiceLockTaken(holder)
        self._conn, self._key = conn, key

    def _take_file(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # its directory missing or not writable: SQLite's own error says so, at the migration
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise ServiceLockTaken(f"{holder or 'a tipstream'}, as {path} says", file=True) from None
        except OSError:  # a file system without locks (NFS without its lock daemon): as SQLite's own locks
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.name}\n".encode())
        self._file = fd

    def keep(self) -> None:
        """Still held? After PostgreSQL restarted, the lock went with the connection: take it again.
        Raises ServiceLockTaken if another service took it meanwhile; other errors: the database is
        away, and the next call tries again."""
        if not self.needed:
            return
        with self._mutex:
            if not self._released:
                self._keep()

    async def akeep(self) -> None:
        """`keep`, on the lock's own thread, one check at a time: an asker while one is under way waits for that one
        and shares its outcome (ServiceLockTaken, the database's error), answered after it asked as its own would have
        been. Each asker's own check took a thread of asyncio's default executor, stuck on `_mutex` behind the one in
        its SELECT 1 while the database hung (its host still acknowledging): the check every 10 s and each loop's
        before it writes held 4 of the 6 threads (2 cores) after a minute, and what needed one waited. Cancelled, an
        asker stops waiting; the check goes on for the others."""
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().run_in_executor(self._thread, self.keep)
        await asyncio.shield(self._check)

    def _keep(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1")).scalar_one()
                self._conn.commit()
                return
            except Exception:  # noqa: BLE001 - the connection is gone: so is the lock
                self._conn.invalidate()
                self._conn.close()
                self._conn = None
                log.warning("the database connection holding this service's lock was lost; taking the lock again")
        self._drop()
        self._take()
        log.info("this service's database lock is held again")

    def release(self) -> None:
        """Let go of the lock, for good: a `keep` after this takes nothing."""
        with self._mutex:
            self._released = True
            self._unlock()
            self._drop()
            if self._file is not None:
                os.close(self._file)  # the file stays: removing it would let a third start lock a new one
                self._file = None

    async def arelease(self) -> None:
        """`release`, on the lock's own thread: after the check under way, as `_mutex` would have it."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self.release)

    def _unlock(self) -> None:
        """Let go of the lock on its session, before closing it: the close alone lets go only once the session's
        backend has ended, after the close returned (pg_locks still listed the lock 5 times in 200 right after
        one), and a take right after the release (a restart in-process, `tipstream migrate` after a stop) was
        refused. Bounded as `keep`'s check is (libpq's tcp_user_timeout and keepalives, `db.NETWORK_BOUNDS`); the
        database away, the close that follows lets go of the lock with the session, as it did before."""
        if self._conn is None:
            return
        try:
            held = self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key}).scalar_one()
            self._conn.commit()
        except Exception as error:  # noqa: BLE001 - the session ends with the close, and the lock with it
            log.info("could not let go of this service's database lock before closing its session (%s); the "
                     "session's end lets go of it", type(error).__name__)
            return
        if not held:  # only a hand's pg_advisory_unlock on this session does that: whatever it let in, wrote meanwhile
            log.warning("this service's database lock was not held by its session when let go of (someone ran "
                        "pg_advisory_unlock on it?): another service may have run on the database meanwhile")

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()  # the session's end lets go of the lock
            except Exception:  # noqa: BLE001, S110 - closed with the engine below either way
                pass
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @staticmethod
    def _holder(conn: Connection, key: int = SERVICE_LOCK) -> str:
        return _holder_of(conn, key) or "it let go just now: start again"


def holder(url: str) -> str | None:
    """Who holds the PostgreSQL database's lock (a service running on it, from any host), without
    taking it; None: no one, or not PostgreSQL. Taking it to see, `tipstream migrate` beside another
    one, or beside a start, would have refused that one."""
    if not url.startswith("postgresql"):
        return None
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return _holder_of(conn, lock_key(conn.execute(text("SELECT current_schema()")).scalar()))
    finally:
        engine.dispose()


def _holder_of(conn: Connection, key: int) -> str | None:
    row = conn.execute(text(
        "SELECT a.application_name, a.client_addr, a.pid, a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        # Advisory locks are per database: a service on another database of the server is not the holder.
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid = :high AND l.objid = :low AND l.objsubid = 1"), _halves(key)).first()
    if row is None:
        return None
    where = f" from {row.client_addr}" if row.client_addr is not None else ""
    # Another role's session shows no address nor start time without pg_read_all_stats.
    since = f", connected since {row.backend_start:%Y-%m-%d %H:%M:%S %Z}" if row.backend_start is not None else ""
    return f"{row.application_name or 'unnamed'}{where}, server pid {row.pid}{since}"
