"""One contract for every checkpoint store (memory, SQLite, PostgreSQL), and the migrations."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex

from app import checkpoints, migrate
from app.checkpoint_rows import PositionsBehind
from app.checkpoint_stores import MemoryCheckpointStore, SqlCheckpointStore
from app.checkpoint_writer import CheckpointWriter
from app.checkpoints import Checkpointer
from app.db import make_engine
from streams.events import parse_event
from streams.store import OnlineStore
from tests.conftest import eventually, reset_postgres


def _store(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    if kind == "memory":
        yield MemoryCheckpointStore()
        return
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
    else:
        url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield SqlCheckpointStore(engine)
    engine.dispose()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def checkpoint_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    yield from _store(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def sql_checkpoint_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """The stores with transactions."""
    yield from _store(request.param, request, tmp_path)


def test_a_new_store_is_empty(checkpoint_store: Any) -> None:
    positions, states = checkpoint_store.load()
    assert positions == {} and list(states) == []


def test_saved_state_and_positions_load_back(checkpoint_store: Any) -> None:
    checkpoint_store.save({"SIGNALS": 10, "FEEDBACK": 2}, [("u-1", b"\x00\x01state"), ("u-2", b"")])
    checkpoint_store.save({"SIGNALS": 15}, [("u-1", b"newer")])
    positions, states = checkpoint_store.load()
    assert positions == {"SIGNALS": 15, "FEEDBACK": 2}
    assert dict(states) == {"u-1": b"newer", "u-2": b""}


def test_a_failed_save_changes_nothing(sql_checkpoint_store: Any) -> None:
    checkpoint_store = sql_checkpoint_store
    checkpoint_store.save({"SIGNALS": 10}, [("u-1", b"v1")])

    class Boom:
        name = "boom"

        def snapshot(self) -> Any:
            return 1

        def write(self, conn: Any, snapshot: Any) -> None:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint_store.save({"SIGNALS": 20}, [("u-1", b"v2")], [(Boom(), 1)])
    positions, states = checkpoint_store.load()
    assert positions == {"SIGNALS": 10} and dict(states) == {"u-1": b"v1"}


def test_many_users_round_trip(checkpoint_store: Any) -> None:
    rows = [(f"user-{i}", i.to_bytes(4, "little") * 10) for i in range(5_000)]
    checkpoint_store.save({"SIGNALS": 5_000}, rows)
    _, states = checkpoint_store.load()
    assert dict(states) == dict(rows)


def test_migrations_go_up_and_down(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = sa.create_engine(database_url)
    assert {"stream_positions", "user_state", "user_features"} <= set(sa.inspect(engine).get_table_names())
    migrate.downgrade(database_url)
    names = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    assert names == set()
    migrate.upgrade(database_url)  # and up again: nothing left behind to trip over
    engine.dispose()


def test_an_upgrade_cut_short_leaves_the_database_at_its_revision(database_url: str) -> None:
    """A revision fails whole or not at all, so the next upgrade can run. SQLite's driver runs DDL
    outside any transaction: 0002 failing at its last table (here one in the way; a kill mid-way
    alike) left its first ones behind at revision 0001, and every later upgrade, every start,
    failed on "table tip_scores already exists"."""
    migrate.upgrade(database_url, "0001")
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE learner_state (other INTEGER)"))
        with pytest.raises(sa.exc.DatabaseError):
            migrate.upgrade(database_url)
        assert migrate.current(database_url) == "0001"
        assert "tip_scores" not in sa.inspect(engine).get_table_names()
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE learner_state"))
        migrate.upgrade(database_url)
        assert migrate.current(database_url) == migrate.revisions()[-1]
    finally:
        engine.dispose()


@pytest.mark.filterwarnings("ignore:.*expression-based index:UserWarning", "ignore:.*expression-based index")
def test_the_tables_in_app_db_are_what_the_migrations_create(database_url: str) -> None:
    """Autogenerate's comparison, types and server defaults included, finds nothing to change:
    code that builds the schema from `app.db` gets the database the migrations make."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from app import db

    def include(_: object, name: str | None, kind: str, *__: object) -> bool:
        # An index on an expression: SQLite's is not read back, PostgreSQL's comes back in its own spelling.
        # That the migration's is the one the retention's query uses: test_retention.py, a pass reads through it.
        return not (kind == "index" and name == "ix_tip_scores_goes_at")

    migrate.upgrade(database_url)
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True,
                                                         "include_object": include})
        assert compare_metadata(context, db.metadata) == []
    engine.dispose()


@pytest.mark.filterwarnings("ignore:.*expression-based index:UserWarning", "ignore:.*expression-based index")
def test_the_partial_indexes_in_app_db_hold_the_rows_the_migrations_index(database_url: str) -> None:
    """Autogenerate's comparison (above) compares an index's columns, not its WHERE: 0010's index of the rewarded
    rows made without its condition, over every row, passed it."""
    from app import db

    def spelled(where: object) -> str:
        return " ".join(str(where).lower().replace("(", " ").replace(")", " ").split())

    migrate.upgrade(database_url)
    engine = sa.create_engine(database_url)
    dialect = engine.dialect.name
    # The condition as this dialect's DDL spells it: without the table's name, as the database reads it back.
    wanted = {index.name: spelled(str(CreateIndex(index).compile(dialect=engine.dialect)).partition(" WHERE ")[2])
              for table in db.metadata.tables.values() for index in table.indexes}
    inspector = sa.inspect(engine)
    made = {index["name"]: spelled(index.get("dialect_options", {}).get(f"{dialect}_where", ""))
            for table in db.metadata.tables for index in inspector.get_indexes(table)}
    engine.dispose()
    assert wanted["ix_tip_scores_rewarded"] == "rewarded_at is not null"
    assert {name: wanted[name] for name in made} == made


async def test_two_upgrades_of_one_postgresql_database_at_once_both_succeed(postgres_url: str, tmp_path: Path) -> None:
    """Two services starting on a new release (or `tipstream migrate` beside a start) both read the
    old revision and both ran the next one: the second's CREATE TABLE failed on the first's
    ("duplicate key value violates unique constraint"), and its start with it. The lock held here lets
    both read the revision (and `tipstream migrate`'s own read of it first) but holds the first to write
    it, so that both are under way at once, without timing: one then waits for the other's migration
    (or, without the migration's lock, fails on its tables)."""
    reset_postgres(postgres_url)
    migrate.upgrade(postgres_url, "0001")
    env = {**os.environ, "DATABASE_URL": postgres_url, "TIPSTREAM_DATA_DIR": str(tmp_path)}
    tipstream = str(Path(sys.executable).parent / "tipstream")
    engine = sa.create_engine(postgres_url)
    waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")

    def both_wait() -> bool:
        with engine.connect() as conn:
            return conn.execute(waiting).scalar_one() == 2

    runs: list[subprocess.Popen[str]] = []
    try:
        with engine.connect() as holder:
            # Not ACCESS EXCLUSIVE: the CLI's read of the revision before the migration would line both up
            # there, and whichever went first could finish before the other asked for the migration's lock.
            holder.execute(sa.text("LOCK TABLE alembic_version IN EXCLUSIVE MODE"))
            runs = [subprocess.Popen([tipstream, "migrate"], env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE) for _ in range(2)]
            await eventually(both_wait, timeout=60)
            holder.rollback()
        done = [run.communicate(timeout=60) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], [err for _, err in done]
        told = [err for _, err in done if "Another tipstream is migrating this database; waiting" in err]
        assert len(told) == 1  # the one that waited said why
        assert migrate.current(postgres_url) == migrate.revisions()[-1]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
        engine.dispose()
        reset_postgres(postgres_url)



def _hold_tip_scores(postgres_url: str) -> tuple[sa.Engine, sa.Connection, int]:
    """A session left in a transaction that read `tip_scores`, as a psql left in BEGIN or a backup."""
    engine = sa.create_engine(postgres_url, connect_args={"application_name": "left-in-begin"})
    holder = engine.connect()
    pid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    holder.execute(sa.text("SELECT count(*) FROM tip_scores"))
    return engine, holder, pid


def test_a_migration_behind_a_held_table_gives_up_and_names_the_holder(postgres_url: str) -> None:
    """Before, 0003's ALTER TABLE waited for as long as the holder lasted, and every query of the
    running service on `tip_scores` queued behind it."""
    reset_postgres(postgres_url)
    migrate.upgrade(postgres_url, "0002")
    engine, holder, pid = _hold_tip_scores(postgres_url)
    try:
        with pytest.raises(migrate.MigrationBlocked) as blocked:
            migrate.upgrade(postgres_url, lock_timeout_s=0.2, attempts=2, pause_s=0.05)
        told = str(blocked.value)
        assert f"pid {pid} (left-in-begin, idle in transaction" in told
        assert "SELECT count(*) FROM tip_scores" in told and f"pg_terminate_backend({pid})" in told
        assert migrate.current(postgres_url) == "0002"  # rolled back whole
    finally:
        holder.close()
        engine.dispose()
    migrate.upgrade(postgres_url)
    assert migrate.current(postgres_url) == migrate.revisions()[-1]


async def test_a_migration_behind_a_held_table_goes_on_once_it_is_let_go(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    reset_postgres(postgres_url)
    migrate.upgrade(postgres_url, "0002")
    engine, holder, pid = _hold_tip_scores(postgres_url)
    try:
        with caplog.at_level(logging.WARNING, logger="tipstream.migrate"):
            upgrading = asyncio.create_task(asyncio.to_thread(
                migrate.upgrade, postgres_url, lock_timeout_s=0.2, attempts=5, pause_s=0.3))
            warned = await eventually(lambda: [r.getMessage() for r in caplog.records if "table lock" in r.getMessage()])
            holder.rollback()
            await upgrading
        assert f"held by pid {pid} (left-in-begin" in warned[0] and "attempt 2 of 5" in warned[0]
        assert migrate.current(postgres_url) == migrate.revisions()[-1]
    finally:
        holder.close()
        engine.dispose()


def _disk_full(conn: Any, snapshot: Any) -> None:
    raise RuntimeError("disk full")


@pytest.fixture
def store_and_writer(sql_checkpoint_store: Any) -> Iterator[tuple[Any, CheckpointWriter]]:
    """A store with transactions, and a checkpoint writer process on its database."""
    writer = CheckpointWriter(sql_checkpoint_store.engine.url.render_as_string(hide_password=False))
    yield sql_checkpoint_store, writer
    writer.close()


async def test_the_writer_process_commits_all_or_nothing_and_outlives_a_dead_worker(
        store_and_writer: tuple[Any, CheckpointWriter]) -> None:
    store, writer = store_and_writer
    await writer.save({"SIGNALS": 10}, [("u-1", b"v1")], [])
    with pytest.raises(RuntimeError, match="disk full"):
        await writer.save({"SIGNALS": 20}, [("u-1", b"v2")], [(_disk_full, None)])
    positions, states = store.load()
    assert positions == {"SIGNALS": 10} and dict(states) == {"u-1": b"v1"}

    for process in list(writer._pool._processes.values()):  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        await writer.save({"SIGNALS": 30}, [("u-1", b"v3")], [])
    await writer.save({"SIGNALS": 30}, [("u-1", b"v3")], [])  # a new worker: the checkpointer's retry
    positions, states = store.load()
    assert positions == {"SIGNALS": 30} and dict(states) == {"u-1": b"v3"}


def _move_back(store: Any, positions: dict[str, int]) -> None:
    """The database back in time under the service (a failover, a restore): these positions, or none."""
    if isinstance(store, MemoryCheckpointStore):
        store.positions = dict(positions)
        return
    with store.engine.begin() as conn:
        conn.execute(sa.text("delete from stream_positions"))
        for stream, seq in positions.items():
            conn.execute(sa.text("insert into stream_positions (stream, seq, updated_at) values (:s, :q, :t)"),
                         {"s": stream, "q": seq, "t": "2026-12-05 00:00:00+00:00"})


def test_a_save_that_finds_older_positions_than_committed_commits_nothing(checkpoint_store: Any) -> None:
    """Before, the save recorded newer positions over a database that had lost commits, and the users
    changed only in those stayed stale for good."""
    checkpoint_store.save({"SIGNALS": 10, "FEEDBACK": 4}, [("u-1", b"v1")])
    checkpoint_store.save({"SIGNALS": 20, "FEEDBACK": 4}, [("u-2", b"v2")], committed={"SIGNALS": 10, "FEEDBACK": 4})
    _move_back(checkpoint_store, {"SIGNALS": 10})  # lost: the second save; FEEDBACK's row too
    with pytest.raises(PositionsBehind) as raised:
        checkpoint_store.save({"SIGNALS": 30, "FEEDBACK": 5}, [("u-1", b"v3")],
                              committed={"SIGNALS": 20, "FEEDBACK": 4})
    assert raised.value.behind == {"SIGNALS": (20, 10), "FEEDBACK": (4, None)}
    message = str(raised.value)
    assert "SIGNALS 10 (this service committed 20), FEEDBACK none (this service committed 4)" in message
    assert "failover to a standby" in message and "backup restored" in message and "exit code 1" in message
    positions, states = checkpoint_store.load()
    assert positions == {"SIGNALS": 10} and dict(states)["u-1"] == b"v1", "nothing of the refused save"
    # Equal or newer positions (a commit whose answer was lost, then retried) are no loss.
    checkpoint_store.save({"SIGNALS": 30}, [("u-1", b"v4")], committed={"SIGNALS": 10})
    checkpoint_store.save({"SIGNALS": 31}, [("u-1", b"v5")], committed={"SIGNALS": 25})
    assert checkpoint_store.load()[0] == {"SIGNALS": 31}


async def test_the_writer_process_refuses_a_save_over_lost_commits_too(
        store_and_writer: tuple[Any, CheckpointWriter]) -> None:
    store, writer = store_and_writer
    await writer.save({"SIGNALS": 10}, [("u-1", b"v1")], [])
    _move_back(store, {"SIGNALS": 7})
    with pytest.raises(PositionsBehind) as raised:  # pickled back from the worker
        await writer.save({"SIGNALS": 12}, [("u-1", b"v2")], [], None, {"SIGNALS": 10})
    assert raised.value.behind == {"SIGNALS": (10, 7)}
    positions, states = store.load()
    assert positions == {"SIGNALS": 7} and dict(states) == {"u-1": b"v1"}


async def test_the_writer_process_brings_back_the_database_s_own_error(
        store_and_writer: tuple[Any, CheckpointWriter]) -> None:
    """A statement's error was pickled with its parameters, SQLite's states among them as memoryviews, which
    pickle refuses: the service got 'TypeError: cannot pickle memoryview objects', told as an outage with no fix,
    for missing tables here, and as well for a full disk, a trigger's refusal or a locked database."""
    from app import db

    store, writer = store_and_writer
    with store.engine.begin() as conn:
        conn.execute(sa.text("drop table user_state"))
    with pytest.raises(sa.exc.DBAPIError) as raised:
        await writer.save({"SIGNALS": 10}, [("u-1", b"v1")], [])
    assert db.tables_not_this_releases(raised.value), repr(raised.value)
    assert raised.value.params is None  # nor the users' ids and states sent across for it


@pytest.mark.parametrize("stream, back_to", [("DECISIONS", 400), ("SIGNALS", 0)],
                         ids=["learner-resumes-behind", "stream-created-again"])
async def test_a_retry_after_a_commit_that_landed_unanswered_at_a_lower_position_is_no_lost_commit(
        checkpoint_store: Any, monkeypatch: pytest.MonkeyPatch, stream: str, back_to: int) -> None:
    """A stream's position goes back: at every start, FEEDBACK and DECISIONS to where the learner resumes (its
    snapshots are spaced, so often behind the checkpoint's); a stream read again from its start (created again,
    an older copy of its store). A checkpoint that then committed, its answer lost (the connection broke during
    COMMIT), left the database below the positions committed before, and the retry took that for commits lost
    under the service: it stopped itself, exit code 1, though nothing was lost."""
    checkpoint_store.save({stream: 1000}, [("u-0", b"v0")])
    store = _users_opened(1)
    store.positions = {stream: back_to}
    store.advance(stream, back_to + 1)
    checkpointer = Checkpointer(store, checkpoint_store, every_events=1, every_s=60, committed={stream: 1000})
    told: list[str] = []
    checkpointer.on_lost = told.append
    save = checkpoint_store.save

    def landed_unanswered(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(checkpoint_store, "save", save)
        save(*args, **kwargs)
        raise ConnectionError("server closed the connection unexpectedly")

    monkeypatch.setattr(checkpoint_store, "save", landed_unanswered)
    with pytest.raises(ConnectionError):
        await checkpointer.checkpoint()
    assert checkpoint_store.load()[0] == {stream: back_to + 1}, "it landed"
    store.apply(parse_event(orjson.dumps({"id": "o-x", "type": "app.opened", "user_id": "u-0001",
                                          "ts": "2026-11-26T09:00:00+01:00"})))
    store.advance(stream, back_to + 2)
    assert await checkpointer.checkpoint()
    assert not told and checkpointer.refused is None
    assert checkpoint_store.load()[0] == {stream: back_to + 2} and checkpointer.committed == {stream: back_to + 2}
    # Commits lost under it from here are still told: what a failed checkpoint sent is forgotten once one commits.
    _move_back(checkpoint_store, {stream: back_to + 1})
    store.apply(parse_event(orjson.dumps({"id": "o-y", "type": "app.opened", "user_id": "u-0002",
                                          "ts": "2026-11-26T09:00:00+01:00"})))
    store.advance(stream, back_to + 3)
    with pytest.raises(PositionsBehind):
        await checkpointer.checkpoint()
    assert len(told) == 1 and f"{stream} {back_to + 1} (this service committed {back_to + 2})" in told[0]


def _users_opened(count: int) -> OnlineStore:
    store = OnlineStore()
    for i in range(count):
        store.apply(parse_event(orjson.dumps({"id": f"o-{i}", "type": "app.opened", "user_id": f"u-{i:04d}",
                                              "ts": "2026-11-26T08:00:00+01:00"})))
    store.advance("SIGNALS", count)
    return store


async def test_a_checkpoint_of_many_users_is_sent_in_batches_and_commits_all_or_nothing(
        checkpoint_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sent whole, a catch-up's million states were held to the commit (and pickled again for the writer
    process): resident memory doubled. A failure between batches must still leave the database as it was."""
    await _batches_commit_all_or_nothing(checkpoint_store, "thread", monkeypatch)


async def test_the_writer_process_takes_a_checkpoint_in_batches_all_or_nothing(
        sql_checkpoint_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, the batches pickled to the writer process, which is killed at the third."""
    await _batches_commit_all_or_nothing(sql_checkpoint_store, "process", monkeypatch)


async def _batches_commit_all_or_nothing(checkpoint_store: Any, writer_kind: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "SAVE_BATCH_BYTES", 2_000)  # a batch a chunk of 50 users' states
    checkpoint_store.save({"SIGNALS": 5}, [("u-0000", b"before")])
    store = _users_opened(300)
    writer = (CheckpointWriter(checkpoint_store.engine.url.render_as_string(hide_password=False))
              if writer_kind == "process" else None)
    checkpointer = Checkpointer(store, checkpoint_store, every_events=1, every_s=60, writer=writer,
                                committed={"SIGNALS": 5})
    sent: list[list[str]] = []
    fail_at = [3]  # the third batch; then none

    def sending(name: str) -> None:
        calls = writer if writer is not None else checkpoint_store
        call = getattr(calls, name)

        def spy(*args: Any) -> Any:
            sent.append([user_id for user_id, _ in args[-1]])
            if len(sent) == fail_at[0]:
                if writer is None:
                    raise ConnectionError("the database went away")
                for process in list(writer._pool._processes.values()):  # type: ignore[union-attr]
                    os.kill(process.pid, signal.SIGKILL)
            return call(*args)

        setattr(calls, name, spy)

    for name in ("begin", "add", "commit"):
        sending(name)
    try:
        with pytest.raises(ConnectionError if writer is None else BrokenProcessPool):
            await checkpointer.checkpoint()
        assert [len(batch) for batch in sent] == [50, 50, 50]
        positions, states = checkpoint_store.load()
        assert positions == {"SIGNALS": 5} and dict(states) == {"u-0000": b"before"}, "no batch of the failed one"

        sent.clear()
        fail_at[0] = 0
        assert await checkpointer.checkpoint()  # the users handed back: every one, in key order
        assert [len(batch) for batch in sent] == [50] * 6
        assert [user_id for batch in sent for user_id in batch] == sorted(store.users)
        positions, states = checkpoint_store.load()
        assert positions == {"SIGNALS": 300}
        assert dict(states) == {user_id: state.to_bytes() for user_id, state in store.users.items()}
    finally:
        if writer is not None:
            writer.close()


async def test_a_checkpoint_in_batches_cancelled_midway_rolls_back_and_lets_go_of_its_connection(
        sql_checkpoint_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As at a stop: its transaction open across calls must not stay open, holding the database's locks
    (SQLite's write lock, the positions' rows on PostgreSQL), until the next checkpoint's begin."""
    monkeypatch.setattr(checkpoints, "SAVE_BATCH_BYTES", 2_000)
    target = sql_checkpoint_store
    target.save({"SIGNALS": 5}, [("u-0000", b"before")])
    store = _users_opened(300)
    checkpointer = Checkpointer(store, target, every_events=1, every_s=60, committed={"SIGNALS": 5})
    entered, release = threading.Event(), threading.Event()
    add = target.add

    def held_add(states: list[tuple[str, bytes]]) -> None:
        entered.set()
        release.wait(10)
        add(states)

    target.add = held_add
    saving = asyncio.ensure_future(checkpointer.checkpoint())
    await eventually(entered.is_set)
    saving.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await saving
    await eventually(lambda: target._open._conn is None)  # rolled back, its connection back in the pool
    positions, states = target.load()
    assert positions == {"SIGNALS": 5} and dict(states) == {"u-0000": b"before"}

    target.add = add
    assert await checkpointer.checkpoint()
    assert target.load()[0] == {"SIGNALS": 300}
