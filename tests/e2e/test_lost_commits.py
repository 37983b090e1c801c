"""The database loses checkpoints it had committed under a running service (a failover to a standby
that lacked the last commits, a backup restored under it): the service stops instead of checkpointing
over the hole, and its restart ends as one clean pass over every event, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app import db, migrate
from app.checkpoint_stores import SqlCheckpointStore
from app.db import make_engine
from streams.events import parse_event
from streams.fold import to_ms
from streams.jetstream import publish_events
from streams.simulator import Population
from streams.store import OnlineStore
from tests.conftest import eventually, reset_postgres
from tests.e2e.support import ServiceProcess, wait_until

pytestmark = pytest.mark.slow
START = to_ms(datetime(2026, 11, 1, tzinfo=UTC))
LOST = "The database holds older stream positions than this service committed"
KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def batch(tag: str, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """Events of users of their own (`tag`): users changed only in one checkpoint."""
    return [(subject, {**event, "id": f"{tag}-{event['id']}", "user_id": f"{tag}-{event['user_id']}"})
            for subject, event in Population(users=6, seed=seed).history(days=2, start_ms=START)]


def database(kind: str, request: pytest.FixtureRequest, data: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{data / 'tipstream.db'}"
    url = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


def positions(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {stream: seq for stream, seq in conn.execute(sa.text("select stream, seq from stream_positions"))}
    except sa.exc.DBAPIError:  # no table (yet, or after `tipstream migrate base`)
        return {}
    finally:
        engine.dispose()


async def last_seqs(js: Any) -> dict[str, int]:
    return {name: (await js.stream_info(name)).state.last_seq for name in ("SIGNALS", "FEEDBACK")}


def backup(url: str, where: Path) -> list[tuple[sa.Table, list[dict[str, Any]]]]:
    """The database as it is now, taken under the running service: SQLite's online backup (docs/operations.md,
    "Backups and restores"); PostgreSQL's tables read in one snapshot, as `pg_dump` does."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as live, sqlite3.connect(where) as copy:
            live.backup(copy)
        return []
    engine = sa.create_engine(url, isolation_level="REPEATABLE READ")
    with engine.connect() as conn:
        rows = [(table, [dict(row._mapping) for row in conn.execute(sa.select(table))])
                for table in db.metadata.sorted_tables]
    engine.dispose()
    return rows


def restore(url: str, where: Path, rows: list[tuple[sa.Table, list[dict[str, Any]]]]) -> None:
    """That backup restored under the running service, in one transaction."""
    if url.startswith("sqlite"):
        with sqlite3.connect(where) as copy, sqlite3.connect(url.removeprefix("sqlite:///")) as live:
            copy.backup(live)
        return
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table, _ in reversed(rows):
            conn.execute(table.delete())
        for table, kept in rows:
            if kept:
                conn.execute(table.insert(), kept)
    engine.dispose()


def clean_fold(events: list[tuple[str, dict[str, Any]]]) -> dict[str, bytes]:
    expected = OnlineStore()
    for _, event in events:
        expected.apply(parse_event(orjson.dumps(event)))
    return {user: state.to_bytes() for user, state in expected.users.items()}


def checkpointed_states(url: str) -> tuple[dict[str, int], dict[str, bytes]]:
    engine = make_engine(url)
    try:
        found, states = SqlCheckpointStore(engine).load()
        return found, dict(states)
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_database_that_lost_commits_stops_the_service_and_the_restart_loses_nothing(
        kind: str, request: pytest.FixtureRequest, nats_server, nc, start_service, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Before, the next checkpoint wrote the newest positions with only the users changed since the
    previous one: users changed only in the lost commits kept stale state for good."""
    data = tmp_path / "data"
    data.mkdir()
    url = database(kind, request, data)
    # Both paths of the checkpoint's transaction: a thread of the service, the writer process.
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.1",
           "TIPSTREAM_CHECKPOINT_WRITER": "thread" if kind == "sqlite" else "process"}
    js = nc.jetstream()
    first, lost, after = batch("a", 1), batch("b", 2), batch("c", 3)
    service = ServiceProcess(data, env).start()
    await publish_events(js, first)
    at_backup = await last_seqs(js)
    wait_until(lambda: positions(url) == at_backup, what="the first users checkpointed")
    saved = backup(url, tmp_path / "backup.db")

    await publish_events(js, lost)
    everything_but_after = await last_seqs(js)
    wait_until(lambda: positions(url) == everything_but_after, what="the users of the lost commits checkpointed")
    restore(url, tmp_path / "backup.db", saved)
    assert positions(url) == at_backup

    await publish_events(js, after)
    assert service.process is not None
    assert service.process.wait(20) == 1, service.log()
    told = service.log()
    assert told.count(LOST) == 1, told
    for stream in at_backup:
        assert f"{stream} {at_backup[stream]} (this service committed {everything_but_after[stream]})" in told, told
    assert "failover to a standby" in told and "backup restored" in told and "nothing counted twice" in told
    assert positions(url) == at_backup, "the checkpoint over the hole committed nothing"

    total = await last_seqs(js)
    restarted = await start_service(database_url=url, checkpoint_every_s=0.1)  # in this process: a quicker start
    await eventually(lambda: positions(url) == total, timeout=20)
    await restarted.stop()
    assert restarted.service.fatal is None and LOST not in caplog.text, "its checkpoints found what they committed"
    found, states = checkpointed_states(url)
    assert {stream: found[stream] for stream in total} == total
    expected = clean_fold(first + lost + after)
    assert states.keys() == expected.keys()
    assert [user for user in expected if states[user] != expected[user]] == [], "as one clean pass over every event"


@pytest.mark.parametrize("kind", KINDS)
async def test_restarts_and_a_rebuild_from_the_log_never_find_lost_commits(
        kind: str, request: pytest.FixtureRequest, start_service, nc, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each start checks its first checkpoint against the positions it restored (none, in a rebuild),
    each checkpoint against the one before: neither moves them back under the service. (A kill -9 and
    its restart: tests/e2e/test_crash_recovery.py, which such a stop would fail.)"""
    data = tmp_path / "data"
    data.mkdir()
    url = database(kind, request, data)
    settings = {"database_url": url, "checkpoint_every_s": 0.1,
                "checkpoint_writer": "process" if kind == "sqlite" else "thread"}
    js = nc.jetstream()
    events = [batch("a", 4), batch("b", 5)]
    for part in events:
        running = await start_service(**settings)
        await publish_events(js, part)
        total = await last_seqs(js)
        await eventually(lambda: positions(url) == total)  # noqa: B023 - awaited here
        await running.stop()  # its last checkpoint, then the next start checks against what it restored
    assert running.service.checkpointer.committed == total

    await asyncio.to_thread(migrate.downgrade, url, "base")  # docs/operations.md, "Rebuilding from the log"
    running = await start_service(**settings)
    await eventually(lambda: positions(url) == total, timeout=20)
    await running.stop()
    assert running.service.fatal is None and LOST not in caplog.text
    assert checkpointed_states(url)[1] == clean_fold([event for part in events for event in part])
