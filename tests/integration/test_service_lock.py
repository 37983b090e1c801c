"""One service per PostgreSQL database: a second is refused, naming the first; a lock lost with its
connection (PostgreSQL restarted) is taken again, or the service stops if another took it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
import sqlalchemy as sa

from app import db
from app import erasure as erasure_module
from app.bootstrap import Service
from app.lineup import DatabaseNotOurs
from app.service_lock import SERVICE_LOCK, ServiceLock, ServiceLockTaken, lock_key
from app.settings import Settings
from app.start_errors import StartupError
from tests.conftest import POSTGRES_ADMIN_URL, NatsServer, eventually, reset_postgres
from tests.integration.served import until


@contextlib.contextmanager
def server_object(create: str, drop: str) -> Iterator[None]:
    """A database or role made on the PostgreSQL server for one test, and dropped after it."""
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(create))
        yield
        with admin.connect() as conn:
            conn.execute(sa.text(drop))
    finally:
        admin.dispose()


@pytest.fixture
def other_database(postgres_url: str) -> Iterator[str]:
    """Another database of the same PostgreSQL server (another deployment's)."""
    name = f"tipstream_other_{uuid.uuid4().hex[:10]}"
    with server_object(f'CREATE DATABASE "{name}"', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'):
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def plain_role(postgres_url: str) -> Iterator[str]:
    """`postgres_url` as a role that is neither superuser nor pg_read_all_stats (a managed database's)."""
    name = f"tipstream_plain_{uuid.uuid4().hex[:10]}"
    with server_object(f'CREATE ROLE "{name}" LOGIN', f'DROP ROLE IF EXISTS "{name}"'):
        yield sa.make_url(postgres_url).set(username=name).render_as_string(hide_password=False)


def lock_holders(url: str) -> list[int]:
    """Server pids of the sessions holding the service lock on this database (not another of the
    server's: a service running on it is no holder here)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = :high "
                "AND objid = :low AND objsubid = 1 "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
                {"high": SERVICE_LOCK >> 32, "low": SERVICE_LOCK & 0xFFFFFFFF},
            ).scalars())
    finally:
        engine.dispose()


def end_sessions(url: str, pids: list[int]) -> None:
    """As a PostgreSQL restart does to every session; returns once they have ended (pg_terminate_backend only
    signals: right after it, pg_locks still listed the lock 17 times in 100)."""
    engine = sa.create_engine(url)

    def ended() -> bool:
        with engine.connect() as conn:  # a transaction of its own: pg_stat_activity is read once in one
            return not conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                                    {"pids": pids}).scalar()

    try:
        with engine.connect() as conn:
            for pid in pids:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        assert until(ended, 10), f"sessions {pids} did not end"
    finally:
        engine.dispose()


def let_go(url: str) -> bool:
    """Whether the lock left pg_locks within 10 s: it goes with its session, whose backend ends after the client's
    close returns (until then pg_locks still listed it, 5 times in 200 right after a close)."""
    return until(lambda: lock_holders(url) == [], 10)


async def test_a_second_service_on_the_database_is_refused_naming_the_first(
        start_service, nats_server, postgres_url: str, tmp_path) -> None:
    reset_postgres(postgres_url)
    first = await start_service(database_url=postgres_url)
    assert len(lock_holders(postgres_url)) == 1
    second = Service(Settings(database_url=postgres_url, data_dir=tmp_path / "second", nats_url=nats_server.url))
    with pytest.raises(StartupError) as refused:
        await second.start()
    said = str(refused.value)
    assert said.startswith("Another tipstream service runs against this database (tipstream "
                           f"{socket.gethostname()} pid {os.getpid()}"), said
    assert "Recreate strategy" in said and "DATABASE_URL" in said
    await first.stop()
    assert let_go(postgres_url), "a stop lets go of it"
    await start_service(database_url=postgres_url, data_dir=tmp_path / "second")
    assert len(lock_holders(postgres_url)) == 1


def test_services_on_two_schemas_of_one_database_each_hold_their_own_lock(postgres_url: str) -> None:
    """`options=-csearch_path=<schema>` in DATABASE_URL puts a service's tables in a schema of its own: a
    second service on another schema of the database shares no table with the first, and was refused
    as if it did (one lock for the whole database). Two on one schema still are."""
    from app.service_lock import holder

    def in_schema(name: str) -> str:
        return sa.make_url(postgres_url).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
            hide_password=False)

    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS staging"))
    public, staging = ServiceLock(postgres_url), ServiceLock(in_schema("staging"))
    public.acquire()
    try:
        assert holder(in_schema("staging")) is None and holder(postgres_url) is not None
        staging.acquire()
        assert holder(in_schema("staging")) is not None
        with pytest.raises(ServiceLockTaken):
            ServiceLock(in_schema("staging")).acquire()
        with pytest.raises(ServiceLockTaken):
            ServiceLock(in_schema("public")).acquire()  # the schema, however DATABASE_URL names it
    finally:
        staging.release()
        public.release()
        with admin.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA staging"))
        admin.dispose()


async def test_an_idle_session_timeout_of_the_operators_does_not_end_the_lock_s_session(postgres_url: str) -> None:
    """The lock's session is idle between two checks (10 s). An idle_session_timeout set on the database or
    the user (PostgreSQL 14 on) ended it at every one: a warning each time, and the lock not held most of
    the time, so a second service could start in a gap."""
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    database = sa.make_url(postgres_url).database
    with admin.connect() as conn:
        if conn.execute(sa.text("SELECT count(*) FROM pg_settings WHERE name = 'idle_session_timeout'")).scalar() == 0:
            pytest.skip("PostgreSQL before 14 has no idle_session_timeout")
        conn.execute(sa.text(f'ALTER DATABASE "{database}" SET idle_session_timeout = \'100ms\''))
    lock = ServiceLock(postgres_url)
    try:
        lock.acquire()
        [held_by] = lock_holders(postgres_url)
        idle_until = time.monotonic() + 0.5  # five times the timeout: the test is that nothing happens meanwhile
        await eventually(lambda: time.monotonic() > idle_until or lock_holders(postgres_url) != [held_by])
        assert lock_holders(postgres_url) == [held_by]
    finally:
        lock.release()
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" RESET idle_session_timeout'))
        admin.dispose()


def test_a_lock_lost_with_its_connection_is_taken_again(postgres_url: str) -> None:
    lock = ServiceLock(postgres_url)
    lock.acquire()
    try:
        [held_by] = lock_holders(postgres_url)
        # A host that dies lets go within ~30 s, not after PostgreSQL's default keepalive (2 hours).
        assert lock._conn.execute(sa.text("SHOW tcp_keepalives_idle")).scalar() == "10"
        assert lock._conn.execute(sa.text("SHOW tcp_user_timeout")).scalar() == "30000"
        lock.keep()  # held: nothing to do
        assert lock_holders(postgres_url) == [held_by]
        end_sessions(postgres_url, [held_by])
        assert lock_holders(postgres_url) == []
        lock.keep()
        [again] = lock_holders(postgres_url)
        assert again != held_by
    finally:
        lock.release()
    assert let_go(postgres_url)


async def test_a_service_whose_lock_another_took_meanwhile_stops(start_service, postgres_url: str) -> None:
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url)
    service = running.service
    told: list[str] = []
    service.on_fatal = told.append
    end_sessions(postgres_url, lock_holders(postgres_url))
    other = ServiceLock(postgres_url)
    other.acquire()  # another service, started while this one's lock was gone
    try:
        with pytest.raises(ServiceLockTaken):
            ServiceLock(postgres_url).acquire()
        await service._keep_service_lock()
        assert told == [service.fatal]
        assert "lost its database lock, and another service took it: Another tipstream service" in told[0]
    finally:
        other.release()


async def test_a_service_whose_lock_another_took_writes_no_more_checkpoints(
        start_service, nc, postgres_url: str, caplog) -> None:
    """Told to stop, it wrote a last checkpoint on the way out: its states and positions over those
    of the service that now holds the database, what the lock is there to prevent."""
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url, checkpoint_every_s=3600,
                                  checkpoint_every_events=1_000_000)
    service = running.service
    service.on_fatal = lambda _: None
    end_sessions(postgres_url, lock_holders(postgres_url))
    other = ServiceLock(postgres_url)
    other.acquire()
    try:
        await service._keep_service_lock()
        assert service.fatal is not None
        event = {"id": "e-1", "type": "app.opened", "user_id": "u-1", "ts": "2026-11-26T08:00:00+01:00", "v": 1,
                 "data": {}}
        await nc.jetstream().publish("signals.app.opened", orjson.dumps(event))
        await eventually(lambda: service.store.positions.get("SIGNALS") == 1)
        assert await service.checkpointer.checkpoint() is False
        await running.stop()
    finally:
        other.release()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select count(*) from user_state")).scalar() == 0
            assert conn.execute(sa.text("select seq from stream_positions where stream = 'SIGNALS'")).scalar() in (None, 0)
    finally:
        engine.dispose()
    assert any(r.getMessage().startswith("no last checkpoint: another service took the database lock")
               for r in caplog.records)


async def opened(js, service: Service, i: int) -> None:
    """User u-<i>'s event, folded."""
    event = {"id": f"e-{i}", "type": "app.opened", "user_id": f"u-{i}", "ts": "2026-11-26T08:00:00+01:00",
             "v": 1, "data": {}}
    await js.publish("signals.app.opened", orjson.dumps(event))
    await eventually(lambda: service.store.positions.get("SIGNALS") == i)


def rows(url: str, table: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"select count(*) from {table}")).scalar_one()
    finally:
        engine.dispose()


async def another_takes_the_lock(url: str) -> ServiceLock:
    """The lock's session ended, and another service took the lock before the next check (every 10 s)."""
    end_sessions(url, lock_holders(url))
    other = ServiceLock(url)

    def taken() -> bool:  # the ended session lets go of it a moment later
        try:
            other.acquire()
        except ServiceLockTaken:
            return False
        return True

    await eventually(taken)
    return other


async def test_a_checkpoint_after_the_lock_s_session_ended_takes_the_lock_again_first_or_writes_nothing(
        start_service, nc, postgres_url: str) -> None:
    """The lock's session ended (terminated, PostgreSQL restarted) is found by a check every 10 s. Until then the
    checkpoints went on without the lock: a second service could take it meanwhile, and this one wrote its states
    and positions over that one's until its next check. A checkpoint now makes sure of the lock first."""
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url, checkpoint_every_s=3600,
                                  checkpoint_every_events=1_000_000)
    service = running.service
    service.on_fatal = lambda _: None
    js = nc.jetstream()
    # Ended with no other service about: the checkpoint takes the lock again, and commits.
    end_sessions(postgres_url, lock_holders(postgres_url))
    await eventually(lambda: lock_holders(postgres_url) == [])
    await opened(js, service, 1)
    assert await service.checkpointer.checkpoint() is True
    assert rows(postgres_url, "user_state") == 1 and len(lock_holders(postgres_url)) == 1 and service.fatal is None
    # Ended, and another service took it before this one's next check: the checkpoint writes nothing.
    other = await another_takes_the_lock(postgres_url)
    try:
        await opened(js, service, 2)
        assert await service.checkpointer.checkpoint() is False
        assert service.fatal is not None and "another service took it" in service.fatal, service.fatal
        assert rows(postgres_url, "user_state") == 1
    finally:
        other.release()


async def test_a_user_features_pass_after_the_lock_s_session_ended_takes_the_lock_again_first_or_writes_nothing(
        start_service, nc, postgres_url: str) -> None:
    """As the checkpoints (above): a pass wrote its rows without the lock until the next check, over those of a
    second service that took it meanwhile, from that one's fresher states."""
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url, checkpoint_every_s=3600,
                                  checkpoint_every_events=1_000_000, offline_features_every_s=3600)
    service = running.service
    service.on_fatal = lambda _: None
    offline = service.offline
    assert offline is not None
    js = nc.jetstream()
    await opened(js, service, 1)
    assert await service.checkpointer.checkpoint() is True
    # Ended with no other service about: the pass takes the lock again, and writes.
    end_sessions(postgres_url, lock_holders(postgres_url))
    await eventually(lambda: lock_holders(postgres_url) == [])
    assert await offline.write_pass(pause=False) == 1
    assert rows(postgres_url, "user_features") == 1 and len(lock_holders(postgres_url)) == 1 and service.fatal is None
    await opened(js, service, 2)
    assert await service.checkpointer.checkpoint() is True
    # Ended, and another service took it before this one's next check: the pass writes nothing.
    other = await another_takes_the_lock(postgres_url)
    try:
        assert await offline.write_pass(pause=False) == 0
        assert service.fatal is not None and "another service took it" in service.fatal, service.fatal
        assert rows(postgres_url, "user_features") == 1
    finally:
        other.release()


async def test_a_retention_pass_after_the_lock_s_session_ended_takes_the_lock_again_first_or_deletes_nothing(
        start_service, postgres_url: str) -> None:
    """Its deletes went on without the lock too, under another service's bound (TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS),
    which may keep the rows this one's deletes."""
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url)  # tip_scores kept 90 days by default
    service = running.service
    service.on_fatal = lambda _: None
    retention = service.retention
    assert retention is not None
    deletes: list[int] = []
    delete_batch = retention._delete_batch
    retention._delete_batch = lambda cut: deletes.append(1) or delete_batch(cut)
    end_sessions(postgres_url, lock_holders(postgres_url))
    await eventually(lambda: lock_holders(postgres_url) == [])
    await retention.prune()
    assert deletes == [1] and len(lock_holders(postgres_url)) == 1 and service.fatal is None
    other = await another_takes_the_lock(postgres_url)
    try:
        assert await retention.prune() == 0
        assert deletes == [1]
        assert service.fatal is not None and "another service took it" in service.fatal, service.fatal
    finally:
        other.release()


@pytest.mark.parametrize(("paths", "made_status", "table", "nothing"), [
    (("/admin/models/v1/evaluate",) * 2, 200, "model_rollouts", "nothing changed"),
    (("/admin/users/u-1/forget", "/admin/users/u-2/forget"), 202, "erasures", "nothing saved"),
], ids=["registry", "forget"])
async def test_an_admin_change_after_the_lock_s_session_ended_takes_the_lock_again_first_or_is_refused(
        start_service, postgres_url: str, paths: tuple[str, str], made_status: int, table: str, nothing: str) -> None:
    """A registry change saves the roles whole (and the learner's state with a new version), a request to forget its
    row in `erasures` (a request done replaced by one to do again): made in the 10 s before the check, each wrote over
    those of a second service that took the lock meanwhile, and was answered as done by one that stops."""
    reset_postgres(postgres_url)
    token = "s3cret-token-for-tests"
    running = await start_service(database_url=postgres_url, admin_token=token)
    service = running.service
    service.on_fatal = lambda _: None
    auth = {"Authorization": f"Bearer {token}"}
    async with running.http() as http:
        end_sessions(postgres_url, lock_holders(postgres_url))
        await eventually(lambda: lock_holders(postgres_url) == [])
        made = await http.post(paths[0], headers=auth, json={"actor": "bob"})
        assert made.status_code == made_status, made.text
        assert len(lock_holders(postgres_url)) == 1 and service.fatal is None
        history = rows(postgres_url, table)
        other = await another_takes_the_lock(postgres_url)
        try:
            refused = await http.post(paths[1], headers=auth, json={"actor": "bob"})
            assert refused.status_code == 503, refused.text
            assert "another service took the database lock" in refused.json()["error"], refused.text
            assert nothing in refused.json()["error"] and "Retry-After" not in refused.headers
            assert rows(postgres_url, table) == history
        finally:
            other.release()


def dropped(url: str, user_id: str, bounds: dict) -> None:
    """A request to forget `user_id` at step 3 (its state dropped, its bounds saved): steps 4 and 5 are next."""
    now = datetime.now(UTC).replace(microsecond=0)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(db.erasures).values(user_id=user_id, status="dropped", requested_at=now,
                                                       requested_by="bob", dropped_at=now, bounds=bounds, report={}))
    finally:
        engine.dispose()


def erasure(url: str, user_id: str) -> tuple[str, dict]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return tuple(conn.execute(sa.select(db.erasures.c.status, db.erasures.c.bounds)
                                      .where(db.erasures.c.user_id == user_id)).one())
    finally:
        engine.dispose()


@pytest.mark.parametrize("on_the_way", [False, True], ids=["done", "bounds"])
async def test_an_erasure_s_writes_after_the_lock_s_session_ended_take_the_lock_again_first_or_write_nothing(
        start_service, postgres_url: str, monkeypatch, on_the_way: bool) -> None:
    """Its last transaction (the request marked done, `tip_scores` rows, retired models) and the bounds it saves
    before the scan (`on_the_way`: decisions stored past DECISIONS' bound) went on without the lock until the next
    check: a request marked done over a second service's database, its messages not all deleted for that one."""
    monkeypatch.setattr(erasure_module, "POLL_S", 3600.0)  # the requests below are looked for by this test alone
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url)
    service = running.service
    service.on_fatal = lambda _: None
    eraser = service.eraser
    assert eraser is not None
    await eventually(lambda: eraser._waiting is not None)  # its first look at the start is over
    bounds = {"SIGNALS": 0, "FEEDBACK": 0, "DECISIONS": 0, "DLQ": 0}
    if on_the_way:
        bounds[erasure_module.ON_THE_WAY] = {"ids": ["d-gone"]}  # not in the publisher's queue: stored, or lost
    # Ended with no other service about: the erasure takes the lock again, and finishes.
    dropped(postgres_url, "u-1", bounds)
    end_sessions(postgres_url, lock_holders(postgres_url))
    await eventually(lambda: lock_holders(postgres_url) == [])
    assert await eraser.work() == 1
    assert erasure(postgres_url, "u-1")[0] == "done"
    assert len(lock_holders(postgres_url)) == 1 and service.fatal is None
    # Ended, and another service took it before this one's next check: the erasure writes nothing.
    dropped(postgres_url, "u-2", bounds)
    other = await another_takes_the_lock(postgres_url)
    try:
        with pytest.raises(DatabaseNotOurs, match="another service took the database lock"):
            await eraser.work()
        assert erasure(postgres_url, "u-2") == ("dropped", bounds)
        assert service.fatal is not None and "another service took it" in service.fatal, service.fatal
    finally:
        other.release()


async def test_a_lock_that_cannot_be_taken_again_yet_is_said_once_not_every_check(
        start_service, postgres_url: str, caplog) -> None:
    """PostgreSQL away: each check (every 10 s) logged the driver's multi-line error, for as long as it lasted."""
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url)
    lock = running.service.service_lock
    lock.url = "postgresql+psycopg://postgres@127.0.0.1:1/away"  # as the server does while it is down
    end_sessions(postgres_url, lock_holders(postgres_url))
    with caplog.at_level(logging.INFO, logger="tipstream"):
        caplog.clear()  # what the checks say, not the start (a server with autovacuum off is warned of)
        for _ in range(3):
            await running.service._keep_service_lock()
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(said) == 2, said
        assert said[0].startswith("the database connection holding this service's lock was lost")
        # The driver's line, as the other retries tell theirs: not SQLAlchemy's "(psycopg.OperationalError) ...".
        assert said[1].startswith("cannot take this service's database lock again yet (OperationalError: connection "
                                  "failed: "), said[1]
        assert "\n" not in said[1] and "(psycopg." not in said[1], said[1]
        lock.url = postgres_url  # back
        await running.service._keep_service_lock()
        assert len(lock_holders(postgres_url)) == 1
        assert "this service's database lock is held again" in caplog.messages


async def test_a_lock_another_took_during_the_start_leaves_the_checkpoints_off_too(
        nats_server, postgres_url: str, tmp_path, monkeypatch) -> None:
    """Lost while the start was under way (before the checkpointer existed), the loss stopped nothing
    from writing: the stop that followed wrote its last checkpoint over the other service's."""
    import streams.jetstream as jsx

    reset_postgres(postgres_url)
    service = Service(Settings(database_url=postgres_url, data_dir=tmp_path / "data", nats_url=nats_server.url))
    other = ServiceLock(postgres_url)
    ensure_streams = jsx.ensure_streams

    async def lost_meanwhile(*args, **kwargs) -> None:
        await ensure_streams(*args, **kwargs)
        if service.fatal is None:
            end_sessions(postgres_url, lock_holders(postgres_url))
            other.acquire()
            await service._keep_service_lock()

    monkeypatch.setattr(jsx, "ensure_streams", lost_meanwhile)
    try:
        await service.start()
        assert service.fatal is not None and service.checkpointer.refused is not None
        assert await service.checkpointer.checkpoint() is False
        await service.stop()
    finally:
        other.release()


async def test_a_failed_start_writes_no_checkpoint_after_letting_go_of_the_lock(
        nats_server, nc, postgres_url: str, tmp_path, monkeypatch) -> None:
    """A start that fails lets go of the database lock at once; the stop that follows it (as
    `tipstream run` does) then wrote a last checkpoint, with another service free to hold the database."""
    reset_postgres(postgres_url)
    service = Service(Settings(database_url=postgres_url, data_dir=tmp_path / "data", nats_url=nats_server.url))
    event = {"id": "e-1", "type": "app.opened", "user_id": "u-1", "ts": "2026-11-26T08:00:00+01:00", "v": 1, "data": {}}
    js = nc.jetstream()
    await js.add_stream(name="SIGNALS", subjects=["signals.>"])
    await js.publish("signals.app.opened", orjson.dumps(event))

    async def fails() -> None:  # once the start has folded something a last checkpoint would write
        await eventually(lambda: service.store.positions.get("SIGNALS") == 1)
        raise RuntimeError("the decision publisher could not start")

    monkeypatch.setattr(service.publisher, "start", fails)
    with pytest.raises(RuntimeError):
        await service.start()
    assert service.checkpointer is not None and let_go(postgres_url)  # one not let go stays until the stop
    await service.stop()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select count(*) from learner_state")).scalar() == 0
            assert conn.execute(sa.text("select count(*) from stream_positions")).scalar() == 0
    finally:
        engine.dispose()


def test_a_long_host_name_keeps_what_tells_the_holder_apart(postgres_url: str, monkeypatch) -> None:
    """application_name holds 63 bytes: a pod's long name, cut at the end, lost its own suffix and the pid."""
    pod = "tipstream-production-eu-west-1-feature-store-7d9f8b6c5d-x2k4q"
    monkeypatch.setattr(socket, "gethostname", lambda: pod)
    first = ServiceLock(postgres_url)
    first.acquire()
    try:
        with pytest.raises(ServiceLockTaken) as refused:
            ServiceLock(postgres_url).acquire()
    finally:
        first.release()
    assert refused.value.holder.startswith("tipstream ...")
    assert f"-7d9f8b6c5d-x2k4q pid {os.getpid()}" in refused.value.holder


def test_a_lock_let_go_of_is_not_taken_again_by_a_check_that_comes_after(postgres_url: str) -> None:
    """A stop cancels the checks' task, but not a check already in its worker thread: one still
    taking the lock again (PostgreSQL back after an outage) took it after the stop let go of it."""
    lock = ServiceLock(postgres_url)
    lock.acquire()
    end_sessions(postgres_url, lock_holders(postgres_url))  # lost: the next check takes it again
    lock.release()
    lock.keep()
    assert let_go(postgres_url) and lock._conn is None


def test_a_lock_let_go_of_is_free_for_a_take_right_after(postgres_url: str) -> None:
    """A release lets go before it returns: the close alone let go only once the session's backend ended, after
    the close returned, and a take right after (a restart in-process, `tipstream migrate` after a stop) was
    refused now and then (2 in 500 here). A temporary table for the backend to drop at its end widens that
    window, as a loaded server does: then every take was refused."""
    lock = ServiceLock(postgres_url)
    other = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    refused = 0
    try:
        with other.connect() as conn:
            key = lock_key(conn.execute(sa.text("SELECT current_schema()")).scalar())
            for _ in range(50):
                lock.acquire()
                assert lock._conn is not None
                lock._conn.execute(sa.text("CREATE TEMPORARY TABLE ended_with_the_session (x int)"))
                lock._conn.commit()
                lock.release()
                if conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one():
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                else:
                    refused += 1
    finally:
        other.dispose()
    assert refused == 0, f"refused {refused} times in 50 right after a release"


def test_sqlite_takes_no_database_lock_but_the_file_s(tmp_path) -> None:
    lock = ServiceLock(f"sqlite:///{tmp_path / 'tipstream.db'}")
    lock.acquire()
    lock.keep()
    lock.release()
    assert not lock.needed and lock._conn is None
    assert os.listdir(tmp_path) == ["tipstream.db-tipstream.lock"]


def test_sqlite_outside_the_data_directory_is_held_by_one_service(tmp_path) -> None:
    """Services with data directories of their own, given one SQLite file (DATABASE_URL): a second
    is refused, naming the first, until the first lets go."""
    url = f"sqlite:///{tmp_path / 'shared' / 'tips.db'}"
    (tmp_path / "shared").mkdir()
    first = ServiceLock(url)
    first.acquire()
    with pytest.raises(ServiceLockTaken) as refused:
        ServiceLock(url).acquire()
    assert refused.value.holder == (f"tipstream {socket.gethostname()} pid {os.getpid()}, "
                                    f"as {tmp_path / 'shared' / 'tips.db-tipstream.lock'} says")
    first.release()
    second = ServiceLock(url)
    second.acquire()
    second.release()


async def test_a_second_service_on_a_sqlite_file_outside_its_data_directory_is_refused(
        start_service, nats_server, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'tips.db'}"
    await start_service(database_url=url, data_dir=tmp_path / "first")
    second = Service(Settings(database_url=url, data_dir=tmp_path / "second", nats_url=nats_server.url))
    with pytest.raises(StartupError, match=r"Another tipstream service runs against this database \(tipstream .*"
                       r"tips\.db-tipstream\.lock says\)") as refused:
        await second.start()
    assert "Stop the other first, or give this one a database of its own" in str(refused.value)  # no replicas here


async def test_a_service_given_another_s_sqlite_file_in_that_one_s_data_directory_is_refused(
        start_service, nats_server, tmp_path) -> None:
    """The first service's file is in its data directory (the default), whose lock holds that
    directory only: the second, from a directory of its own (DATABASE_URL), took the lock beside the
    file, which the first had not taken, and both wrote the one database."""
    url = f"sqlite:///{tmp_path / 'first' / 'tipstream.db'}"
    await start_service(database_url=url, data_dir=tmp_path / "first")
    its_own = NatsServer(tmp_path / "its-own-nats")  # as each one's embedded server: no consumer shared to tell it
    its_own.start()
    second = Service(Settings(database_url=url, data_dir=tmp_path / "second", nats_url=its_own.url))
    try:
        with pytest.raises(StartupError, match=r"Another tipstream service runs against this database \(tipstream "
                           r".*tipstream\.db-tipstream\.lock says\)"):
            await second.start()
    finally:
        if second.nc is not None:  # it started all the same
            await second.stop()
        its_own.stop()


def test_the_holder_named_is_one_on_this_database_not_another_of_the_server(postgres_url: str, other_database: str) -> None:
    """Advisory locks are per database: a service of another deployment, on another database of the
    same server, holds a lock of the same key. It was named as this database's holder."""
    elsewhere = ServiceLock(other_database)
    elsewhere.acquire()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert ServiceLock._holder(conn) == "it let go just now: start again"
        here = ServiceLock(postgres_url)
        here.acquire()  # not refused: that lock is another database's
        here.release()
    finally:
        engine.dispose()
        elsewhere.release()


def test_a_holder_of_another_role_is_named_without_what_that_role_cannot_see(postgres_url: str, plain_role: str) -> None:
    """pg_stat_activity hides another role's address and start time from a plain role: the refusal
    failed with a TypeError formatting the missing time, where it should name the holder."""
    first = ServiceLock(postgres_url)
    first.acquire()
    try:
        second = ServiceLock(plain_role)
        with pytest.raises(ServiceLockTaken) as refused:
            second.acquire()
        assert refused.value.holder.startswith(f"tipstream {socket.gethostname()} pid {os.getpid()}, server pid ")
        assert second._conn is None and second._engine is None
    finally:
        first.release()
