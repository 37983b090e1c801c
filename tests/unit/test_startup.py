"""`app.startup.start` and its signals, in-process with stand-ins: a real SIGTERM to this process."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app import start_errors, startup
from app.start_errors import StartupError
from app.startup import Stopper, hold_data_dir, start
from tests.conftest import eventually, pre_lock_release_server, run_bound_by_file_permissions


class EndsWithASignal:
    """A start that is sent SIGTERM as it ends."""

    settings: Any = None

    def __init__(self) -> None:
        self.stopped = False

    async def start(self) -> None:
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self.stopped = True


async def test_a_signal_that_comes_as_the_start_ends_stops_the_server() -> None:
    """Its handler ran after the start's had gone: the signal was lost and the service served on."""
    loop = asyncio.get_running_loop()
    service, stopper = EndsWithASignal(), Stopper()
    try:
        if await start(service, stopper) is None:  # the start won: the server is next
            stopper.server = SimpleNamespace(should_exit=False)
            for _ in range(100):  # the loop reads the signal within a few of its turns
                if stopper.received:
                    break
                await asyncio.sleep(0.01)
            assert stopper.server.should_exit, "uvicorn serves until should_exit"
        else:
            assert service.stopped
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert stopper.received[:1] == [signal.SIGTERM] and stopper.exit_code == 128 + signal.SIGTERM



def test_a_service_that_stops_itself_stops_the_server_with_exit_code_1() -> None:
    """`Service.on_fatal` (the NATS connection closed for good): before, the process served on."""
    stopper = Stopper()
    stopper.server = SimpleNamespace(should_exit=False)
    assert stopper.exit_code == 0
    stopper.fail("NATS closed tipstream's connection for good")
    assert stopper.server.should_exit and stopper.exit_code == 1
    stopper(signal.SIGTERM)  # a signal as well: the shell's code for it, as before
    assert stopper.exit_code == 128 + signal.SIGTERM

def test_an_embedded_nats_server_that_cannot_start_is_a_message_with_the_way_out() -> None:
    from app.embedded_nats import EmbeddedNatsError
    from app.start_errors import explain

    told = explain(EmbeddedNatsError("the embedded nats-server exited with code 1; see data/nats/nats-server.log"),
                   SimpleNamespace())
    assert told is not None and str(told).startswith("The embedded nats-server exited with code 1; see data/nats")
    assert "set NATS_URL" in str(told)



def test_a_nats_store_on_a_full_disk_is_a_message_saying_to_free_space(tmp_path: Path) -> None:
    """The chown told for a store another user made is no fix for a full disk."""
    from app.embedded_nats import EmbeddedNats, EmbeddedNatsError

    if not os.access("/dev/full", os.W_OK):
        pytest.skip("/dev/full is not this user's to write here")
    store_dir = tmp_path / "nats"
    store_dir.mkdir()
    (store_dir / "nats-server.conf").symlink_to("/dev/full")  # written first: the kernel's ENOSPC
    with pytest.raises(EmbeddedNatsError) as raised:
        EmbeddedNats(store_dir).start(timeout_s=5)
    assert "No space left on device; free space on its disk, or set TIPSTREAM_DATA_DIR" in str(raised.value)
    assert "chown" not in str(raised.value)


@pytest.mark.parametrize("database_url", [None, "sqlite:///{}/elsewhere.db"])
def test_a_sqlite_database_on_a_full_disk_is_a_message_saying_to_free_space(
        tmp_path: Path, database_url: str | None) -> None:
    """It said to set TIPSTREAM_DATA_DIR to a directory this user can write, which the full one was."""
    import sqlalchemy as sa

    from app.start_errors import explain

    url = f"sqlite:///{tmp_path}/tipstream.db" if database_url is None else database_url.format(tmp_path)
    settings = SimpleNamespace(database_url=database_url and url, sqlalchemy_url=url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("create table t (x blob)")
    with pytest.raises(sa.exc.OperationalError) as raised, engine.begin() as conn:
        conn.exec_driver_sql("pragma max_page_count = 2")  # SQLite's own SQLITE_FULL, as a full disk gives
        conn.exec_driver_sql("insert into t values (zeroblob(100000))")
    engine.dispose()
    told = str(explain(raised.value, settings))
    assert told.startswith(f"Cannot write the database {url} (")
    assert "its disk is full. Free space on it (`df` names the disk), or set " in told
    assert ("DATABASE_URL to a file" if database_url else "TIPSTREAM_DATA_DIR to a directory") in told


@pytest.mark.parametrize("free", [0, 1 << 30])
def test_a_sqlite_disk_io_error_on_a_full_disk_is_told_as_the_full_disk(
        free: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart with DATABASE_URL on a full tmpfs: SQLite could not make the -wal and -shm files a clean stop
    had removed, said 'disk I/O error', and the start said to set DATABASE_URL to a directory this user can
    write, which it was."""
    import shutil
    import sqlite3

    import sqlalchemy as sa

    from app.start_errors import explain

    url = f"sqlite:///{tmp_path}/elsewhere.db"
    settings = SimpleNamespace(database_url=url, sqlalchemy_url=url)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=free))
    error = sa.exc.OperationalError("PRAGMA journal_mode=WAL", {}, sqlite3.OperationalError("disk I/O error"))
    told = str(explain(error, settings))
    assert ("its disk is full. Free space on it" in told) == (free == 0), told
    assert ("a directory this user can write" in told) == (free > 0), told


START_ON_THE_STORE = """
import sys
from pathlib import Path
from types import SimpleNamespace

from app.embedded_nats import EmbeddedNats, EmbeddedNatsError
from app.start_errors import explain

embedded = EmbeddedNats(Path(sys.argv[1]))
try:
    embedded.start(timeout_s=5)
except EmbeddedNatsError as error:
    assert embedded.process is None, "a server started on it"
    print(explain(error, SimpleNamespace()))
else:
    embedded.stop()
    sys.exit("it started")
"""


@pytest.mark.parametrize("store", ["read-only", "its ports directory a file"])
def test_a_nats_store_the_service_cannot_write_is_a_message_with_the_way_out(
        store: str, tmp_path: Path) -> None:
    """A store another user made (root, a container's) was a PermissionError traceback at start."""
    store_dir = tmp_path / "nats"
    store_dir.mkdir()
    if store == "read-only":
        store_dir.chmod(0o500)
    else:
        (store_dir / "ports").write_text("")
    done = run_bound_by_file_permissions([sys.executable, "-c", START_ON_THE_STORE, str(store_dir)], tmp_path)
    store_dir.chmod(0o700)
    assert done.returncode == 0, done.stderr
    told = done.stdout.rstrip("\n")
    assert told.startswith(f"The embedded nats-server cannot use its store {store_dir} (in TIPSTREAM_DATA_DIR): ")
    assert "set TIPSTREAM_DATA_DIR to a directory this user can write" in told and "set NATS_URL" in told
    if store == "read-only":
        assert f"`chown -R {os.getuid()} {store_dir}`" in told, told
    else:
        assert "chown" not in told, told


def test_a_migration_blocked_by_another_session_is_a_message_naming_the_database(tmp_path: Path) -> None:
    from app.migrate import MigrationBlocked
    from app.settings import Settings
    from app.start_errors import explain

    told = explain(MigrationBlocked("The migration to head waited for a table lock 5 times"), Settings(data_dir=tmp_path))
    assert told is not None and str(told).startswith(f"Cannot migrate the database sqlite:///{tmp_path}")
    assert str(told).endswith("waited for a table lock 5 times")

def test_a_data_directory_whose_file_system_takes_no_locks_is_a_message_with_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    opened_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(StartupError) as refused:
        hold_data_dir(tmp_path)
    assert "Cannot lock the data directory" in str(refused.value)
    assert "No locks available" in str(refused.value) and "TIPSTREAM_DATA_DIR" in str(refused.value)
    assert len(os.listdir("/proc/self/fd")) == opened_before  # the lock file is not left open


@pytest.mark.parametrize("under", ["", "data"])
def test_a_data_directory_that_is_a_file_says_so(tmp_path: Path, under: str) -> None:
    """TIPSTREAM_DATA_DIR naming a file (or a path under one) was told as the OS's "File exists" (or "Not
    a directory") and "a directory this user can write", which it may well be."""
    afile = tmp_path / "tipstream.db"
    afile.write_bytes(b"")
    with pytest.raises(StartupError) as refused:
        hold_data_dir(afile / under)
    assert f"{afile} is a file, not a directory" in str(refused.value), refused.value
    assert "File exists" not in str(refused.value) and "Not a directory" not in str(refused.value)


def test_a_sqlite_database_another_process_keeps_locked_is_told_as_such(tmp_path: Path) -> None:
    """The busy timeout ran out: the message said to set TIPSTREAM_DATA_DIR to a directory this
    user can write, which was not the problem."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from app.settings import Settings
    from app.start_errors import explain

    path = tmp_path / "tipstream.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            sqlite3.connect(path, timeout=0.05).execute("CREATE TABLE t (x)")
    finally:
        holder.close()
    error = OperationalError("CREATE TABLE t (x)", None, locked.value)
    message = str(explain(error, Settings(data_dir=tmp_path)))
    assert "stayed locked by another process" in message and "TIPSTREAM_DATA_DIR to a" not in message, message


async def test_the_same_nats_error_again_within_a_minute_is_counted_not_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server that refuses the credentials once it is back answers every reconnect (twice a
    second) with the same error: each was a warning line."""
    from app.nats_connection import NatsConnection
    from app.settings import Settings
    from streams.log_throttle import WINDOW_S

    connection = NatsConnection(Settings(data_dir=tmp_path), on_reconnected=lambda: None, stopping=lambda: False,
                                fail=lambda _why: None)
    connection.client = SimpleNamespace()  # connected once: errors are the live connection's
    now = [1000.0]
    connection._errors.clock = lambda: now[0]
    refused = Exception("nats: 'Authorization Violation'")
    with caplog.at_level(logging.WARNING, logger="tipstream"):
        for _ in range(5):
            await connection._on_error(refused)
            now[0] += 0.5
        now[0] += WINDOW_S
        await connection._on_error(refused)
        await connection._on_error(Exception("nats: another"))
    fix = (": the server no longer takes NATS_URL's user and password or token (changed by a reload). Give the server "
           "back the old ones, or restart tipstream with NATS_URL's new ones; /readyz is 503 until then")
    assert [r.getMessage() for r in caplog.records] == [
        f"NATS: nats: 'Authorization Violation'{fix}",
        f"NATS: nats: 'Authorization Violation'{fix} (4 more times since the last line)",
        "NATS: nats: another"]


async def test_a_new_nats_outage_s_first_line_counts_only_its_own_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The throttle's counts outlived the reconnect: the next outage's first line carried '(N more times
    since)', the previous outage's refused reconnects, and an outage within the minute had no line at all."""
    from app.nats_connection import NatsConnection
    from app.settings import Settings
    from streams.log_throttle import WINDOW_S

    connection = NatsConnection(Settings(data_dir=tmp_path), on_reconnected=lambda: None, stopping=lambda: False,
                                fail=lambda _why: None)
    connection.client = SimpleNamespace()  # connected once: errors are the live connection's
    now = [1000.0]
    connection._errors.clock = lambda: now[0]
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4222)")

    async def outage(errors: int) -> None:
        for _ in range(errors):
            await connection._on_error(refused)
            now[0] += 0.5
        await connection._on_reconnected()

    with caplog.at_level(logging.INFO, logger="tipstream"):
        await outage(5)
        now[0] += WINDOW_S  # the next outage past the minute
        await outage(1)
        now[0] += 5  # and another soon after
        await outage(2)
    line = f"NATS: {refused}"
    resumed = "; resuming each stream from its own position"
    assert [r.getMessage() for r in caplog.records] == [
        line, f"reconnected to NATS (the errors above came 4 more times since their last line){resumed}",
        line, f"reconnected to NATS{resumed}",
        line, f"reconnected to NATS (the errors above came 1 more time since their last line){resumed}"]


async def test_a_reconnect_no_server_greets_is_a_warning_saying_so(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """nats-py's TimeoutError, a reconnect to a server that hangs (SIGSTOP), has no text: the warning read "NATS: "."""
    from app.nats_connection import NatsConnection
    from app.settings import Settings

    connection = NatsConnection(Settings(data_dir=tmp_path), on_reconnected=lambda: None, stopping=lambda: False,
                                fail=lambda _why: None)
    connection.client = SimpleNamespace()  # connected once: errors are the live connection's
    with caplog.at_level(logging.WARNING, logger="tipstream"):
        await connection._on_error(TimeoutError())
    assert [r.getMessage() for r in caplog.records] == [(
        "NATS: no NATS greeting within 2 s of reconnecting (a server that hangs, or a network dropping packets); "
        "trying again")]


def test_a_data_directory_it_creates_is_its_owner_s_only_and_one_that_exists_keeps_its_mode(tmp_path: Path) -> None:
    os.close(hold_data_dir(tmp_path / "new" / "data"))
    assert (tmp_path / "new" / "data").stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o750)
    os.close(hold_data_dir(shared))
    assert shared.stat().st_mode & 0o777 == 0o750


def test_a_directory_made_for_a_sqlite_file_is_its_owner_s_only(tmp_path: Path) -> None:
    """`tipstream migrate` (or `models`) run before the first start made the data directory with the
    umask's mode, which the service then kept: the users' events and features readable by all."""
    from app.db import make_engine

    make_engine(f"sqlite:///{tmp_path / 'data' / 'tipstream.db'}").dispose()
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700


def test_a_service_of_a_release_without_the_lock_on_the_directory_is_told_by_its_nats_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Upgrading, the new release started before the old one was stopped: it took the lock the old one
    # does not take, started a second nats-server on the same JetStream store, and both wrote the database.
    monkeypatch.setattr(startup, "STORE_SERVER_WAIT_S", 0.3)
    data = tmp_path / "data"
    server = pre_lock_release_server(tmp_path, "data/nats")
    try:
        with pytest.raises(StartupError) as refused:
            hold_data_dir(data)
        assert str(refused.value) == (
            f"The data directory {data.resolve()} is in use by another tipstream: a nats-server (pid {server.pid}, "
            f"started by pid {os.getpid()}) runs on its NATS store {(data / 'nats').resolve()}, as a service of a "
            "release from before 2026-12-04 (which takes no lock on the directory) runs it: two would share its NATS "
            f"store and database. Stop that service (pid {os.getpid()}), or set TIPSTREAM_DATA_DIR to another "
            "directory.")  # the service to stop, this test here: its server stopped alone left it without NATS
        with open(data / startup.LOCK_FILE) as file:  # let go of
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        server.terminate()
        server.wait(10)
    # Files that name no server on this store: one whose server was killed, another process's pid.
    for pid in (server.pid, os.getppid()):
        (data / "nats" / "ports" / f"nats-server_{pid}.ports").write_text("{}")
    os.close(hold_data_dir(data))


def test_a_nats_server_that_ends_while_the_start_waits_is_no_other_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The embedded server of a service killed this instant ends on its own (the kernel's SIGTERM).
    monkeypatch.setattr(startup, "STORE_SERVER_WAIT_S", 10.0)
    caplog.set_level(logging.INFO, logger="tipstream")
    server = pre_lock_release_server(tmp_path, "nats")
    ending = threading.Timer(0.3, server.terminate)
    ending.start()
    try:
        began = time.monotonic()
        os.close(hold_data_dir(tmp_path))
        assert time.monotonic() - began < 5, "waited for the server to end, not the whole wait"
        [said] = [r.getMessage() for r in caplog.records if r.name == "tipstream"]  # not silent for up to 10 s
        assert said.startswith(f"a nats-server (pid {server.pid}) runs on ") and "waiting up to 10 s" in said
        # It had exited as far as /proc tells (no command line); the kernel may not have reaped it yet.
        assert server.wait(2) is not None
    finally:
        ending.cancel()
        server.terminate()
        server.wait(10)


def test_while_the_start_waits_for_a_nats_server_on_the_store_the_lock_file_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the wait, a second start or `migrate base` named the pid the file still held, of a
    service that had stopped long before."""
    (tmp_path / startup.LOCK_FILE).write_text("999999\n")  # left by the last service, gone
    named = []
    monkeypatch.setattr(startup, "_no_server_on_the_store", lambda data_dir: named.append(
        startup.data_dir_holder(data_dir)))
    os.close(hold_data_dir(tmp_path))
    assert named == [f"pid {os.getpid()}"]


def test_a_stream_left_without_a_leader_after_its_copies_changed_is_a_message_naming_the_setting(
        tmp_path: Path) -> None:
    from nats.js.errors import APIError

    from app.settings import Settings
    from app.start_errors import explain
    from streams import jetstream as jsx

    settings = Settings(data_dir=tmp_path, nats_url="nats://n1:4222,nats://n2:4222", stream_replicas=3)
    error = APIError(code=503, err_code=jsx.NO_LEADER, stream="SIGNALS",
                     description="stream SIGNALS has no leader 30 s after its copies went from 1 to 3")
    message = str(explain(error, settings))
    assert message.startswith("JetStream at nats://n1:4222,nats://n2:4222 (NATS_URL) refused tipstream's start: "
                              "stream SIGNALS has no leader 30 s after its copies went from 1 to 3. "), message
    assert "TIPSTREAM_STREAM_REPLICAS=3 puts each stream's 3 copies on 3 nodes" in message
    assert "could not elect a leader for it" in message and "(error" not in message


def test_a_stream_change_refused_for_a_full_disk_is_a_message_saying_to_free_it_and_restart(tmp_path: Path) -> None:
    """A start that changed a stream's limits on a NATS_URL server whose store's disk was full (seen in this
    session) ended with the server's words alone: nothing on what to do."""
    from nats.js.errors import APIError

    from app.settings import Settings
    from app.start_errors import explain

    settings = Settings(data_dir=tmp_path, nats_url="nats://n1:4222")
    error = APIError(code=500, err_code=10069, description="write /srv/nats/jetstream/$G/streams/DLQ/meta.inf.tmp: no "
                                                           "space left on device")
    message = str(explain(error, settings))
    assert message == ("JetStream at nats://n1:4222 (NATS_URL) refused tipstream's start: write /srv/nats/jetstream/"
                       "$G/streams/DLQ/meta.inf.tmp: no space left on device (error 10069). The disk of that "
                       "nats-server's store is full: free space on it (an embedded one's store is "
                       "TIPSTREAM_DATA_DIR/nats), then restart nats-server, which stores nothing more after a failed "
                       "write until it is restarted, and start tipstream again."), message


def test_a_consumer_re_creation_refused_for_a_full_disk_is_a_message_saying_to_free_it_and_restart(
        tmp_path: Path) -> None:
    """Every start re-creates its consumers: on a NATS_URL server whose store's disk was full (the suite's full-disk
    server, in a test that raced it), the start ended with the server's words and a code that says nothing of it."""
    from nats.js.errors import ServerError

    from app.settings import Settings
    from app.start_errors import explain

    settings = Settings(data_dir=tmp_path, nats_url="nats://n1:4222")
    error = ServerError(code=500, err_code=10012, description="write /srv/nats/jetstream/$G/streams/FEEDBACK/obs/"
                                                              "tipstream-feedback/o.dat.tmp: no space left on device")
    message = str(explain(error, settings))
    assert message.endswith("o.dat.tmp: no space left on device (error 10012). The disk of that nats-server's store "
                            "is full: free space on it (an embedded one's store is TIPSTREAM_DATA_DIR/nats), then "
                            "restart nats-server, which stores nothing more after a failed write until it is "
                            "restarted, and start tipstream again."), message
    other = ServerError(code=500, err_code=10012, description="start sequence can not be updated")
    assert str(explain(other, settings)).endswith("start sequence can not be updated (error 10012)."), "no fix guessed"


async def test_a_warm_up_cut_short_by_a_failed_start_leaves_no_traceback_behind() -> None:
    """The warm-up's read of the users' states runs in a thread. A start that failed meanwhile (its one
    line said why: a statement_timeout, the database away) cancelled the warm-up, and what the read
    raised after was never retrieved: asyncio printed it as a traceback below that line."""
    import gc

    from app.warm_up import _warm_once

    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
    began, let_go = threading.Event(), threading.Event()

    class FailingRead:
        def states(self) -> Any:
            began.set()
            let_go.wait(5)
            raise OSError("canceling statement due to statement timeout")
            yield  # a generator, as SqlCheckpointStore.states

    store, freezer = SimpleNamespace(warm=lambda _chunk: 0, taken_in=0), SimpleNamespace(check=lambda _users: False)
    before = asyncio.all_tasks()
    warm_up = asyncio.create_task(_warm_once(store, freezer, FailingRead()))  # type: ignore[arg-type]
    await eventually(began.is_set)
    (reader,) = asyncio.all_tasks() - before - {warm_up}  # the read's, in its thread
    warm_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await warm_up
    let_go.set()
    await eventually(reader.done)  # it failed, and nobody waits for it any more
    del warm_up, reader
    gc.collect()
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported


@pytest.mark.parametrize(("libpq", "told"), [
    (('connection failed: connection to server at "127.0.0.1", port 5597 failed: root certificate file '
      '"/root/.postgresql/root.crt" does not exist\nEither provide the file, use the system\'s trusted roots with '
      'sslrootcert=system, or change sslmode to disable server certificate verification.'),
     ['root certificate file "/root/.postgresql/root.crt" does not exist', "`sslrootcert=/path/to/ca.pem`"]),
    (('connection failed: connection to server at "127.0.0.1", port 5597 failed: server certificate for '
      '"h97-test-server" does not match host name "127.0.0.1"'), ["names another host", "`sslmode=verify-ca`"]),
    (('connection failed: connection to server at "127.0.0.1", port 5597 failed: SSL error: certificate verify '
      'failed'), ["not signed by the CA DATABASE_URL names"]),
])
def test_a_server_certificate_postgresql_s_client_refuses_is_told_with_the_fix(libpq: str, told: list[str]) -> None:
    """libpq's words against a server with a self-signed certificate (PostgreSQL 15, ssl = on), for each
    sslmode that checks it. Each said to check that the server runs and the database exists; a missing
    root certificate's was cut to its hint, the file it names left out."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from app.settings import Settings

    url = "postgresql+psycopg://tipstream:hunter2@127.0.0.1:5597/tipstream?sslmode=verify-full"
    message = str(start_errors.explain(OperationalError(None, None, psycopg.OperationalError(libpq)),
                                  Settings(database_url=url)))
    assert all(part in message for part in told) and "createdb" not in message, message
    assert "Either provide" not in message and "hunter2" not in message, message


def test_a_postgresql_disk_full_is_told_as_one_line_by_steps_that_retry(caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL's disk_full (SQLSTATE 53100) as psycopg and SQLAlchemy raise it is a full disk; a background
    step that failed on it logged SQLAlchemy's whole text, its statement and the users' rows it held, and no
    word of the disk."""
    import psycopg.errors
    import sqlalchemy.exc

    from app import db
    from app.periodic import every

    full = sqlalchemy.exc.OperationalError(
        "INSERT INTO user_features ...", {"user_id": "ana"},
        psycopg.errors.DiskFull("could not extend file \"base/16384/2619\": No space left on device"))
    locked = sqlalchemy.exc.OperationalError("UPDATE ...", {}, psycopg.errors.LockNotAvailable("lock timeout"))
    assert db.disk_full(full) and not db.disk_full(locked)

    async def fails() -> None:
        raise full

    async def one_round() -> None:
        task = asyncio.create_task(every(0.001, fails, "a user_features pass"))
        await eventually(lambda: caplog.records)
        task.cancel()

    caplog.set_level(logging.WARNING, logger="tipstream")
    asyncio.run(one_round())
    told = caplog.records[0].getMessage()
    assert told.startswith("a user_features pass failed (the database's disk is full (could not extend file"), told
    assert "free space on the database's disk" in told and "\n" not in told and "ana" not in told, told


def test_a_step_that_fails_for_as_long_as_a_fault_lasts_is_told_once_a_minute_and_when_it_goes_through(
        caplog: pytest.LogCaptureFixture) -> None:
    """A background step failing round after round (the user_features pass, every 30 s, while the database was
    away) wrote a line each round for as long as it lasted, and none once a round went through again. Rounds 10 s
    apart on the step's clock, not slept: 12 failures over 110 s, then one that goes through."""
    from app.periodic import every

    now, rounds = [0.0], []

    async def step() -> None:
        rounds.append(now[0])
        now[0] += 10.0
        if len(rounds) <= 12:
            raise ConnectionError("the database is away")

    async def until_through() -> None:
        task = asyncio.create_task(every(0, step, "a user_features pass", clock=lambda: now[0]))
        await eventually(lambda: len(rounds) > 12)
        task.cancel()

    caplog.set_level(logging.INFO, logger="tipstream")
    asyncio.run(until_through())
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 3, told
    assert told[0] == "a user_features pass failed (the database is away); trying again in 0s", told
    assert told[1].endswith("(5 more failed rounds since the last line)"), told  # the 7th, 60 s on
    assert told[2] == ("a user_features pass goes through again, 120 s after the first round that failed "
                       "(12 rounds failed)"), told


def test_a_step_told_failing_again_in_another_way_is_told_when_it_goes_through_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """The line that a step goes through again was throttled as one kind of line, a minute apart: a step that failed,
    went through (told), failed another way (told at once) and went through 10 s later left that last failure as the
    log's last word. Rounds 10 s apart on the step's clock: the database away, back, its disk full, back."""
    from app.periodic import every

    now, rounds = [0.0], []
    faults: list[Exception | None] = [ConnectionError("the database is away"), None, OSError("disk full"), None]

    async def step() -> None:
        rounds.append(now[0])
        now[0] += 10.0
        if len(rounds) <= len(faults) and (fault := faults[len(rounds) - 1]) is not None:
            raise fault

    async def through_twice() -> None:
        task = asyncio.create_task(every(0, step, "a user_features pass", clock=lambda: now[0]))
        await eventually(lambda: len(rounds) > len(faults))
        task.cancel()

    caplog.set_level(logging.INFO, logger="tipstream")
    asyncio.run(through_twice())
    told = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0].split(";")[0] for line in told] == [
        "a user_features pass failed", "a user_features pass goes through again, 10 s after the first round that failed",
        "a user_features pass failed", "a user_features pass goes through again, 10 s after the first round that failed",
    ], told
    assert told[3].endswith("(1 round failed)"), told


@pytest.mark.parametrize(("database_url", "where"), [
    (None, "(data in data)"), ("", "(data in data)"),
    ("postgresql+psycopg://app:hunter2@db/tips", "(database postgresql+psycopg://app:***@db/tips; data directory data)"),
])
def test_the_line_a_started_service_prints_says_where_its_data_is(database_url: str | None, where: str) -> None:
    """With DATABASE_URL set, it read "data in <TIPSTREAM_DATA_DIR>", where the users' state and the model registry
    are in that database and the directory holds a lock and a spool: a backup of it would keep neither."""
    line = startup.started_line("http://127.0.0.1:8000", Path("data"), database_url)
    assert line == f"tipstream on http://127.0.0.1:8000 {where}"
