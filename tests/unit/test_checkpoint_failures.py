"""How failed checkpoints are told (app/checkpoint_failures.py), through the Checkpointer's throttle of the lines."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

import orjson
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from app.checkpoint_stores import MemoryCheckpointStore
from app.checkpoints import Checkpointer
from streams.events import parse_event
from streams.log_throttle import LogThrottle
from streams.store import OnlineStore
from tests.conftest import eventually


class ReadOnly(Exception):
    sqlstate = "25006"  # PostgreSQL's read_only_sql_transaction, as psycopg's error carries it


async def test_a_failure_of_another_kind_during_an_outage_is_told_at_once(caplog: pytest.LogCaptureFixture) -> None:
    """An outage's lines are throttled to one a minute, by kind: a refusal, a full disk or a setting's refusal
    met meanwhile is a new fault with its own fix, told at once, not folded into the outage's next line a minute
    on. No time passes on the lines' clock here: each line after the first is there because its kind differs."""
    away = OperationalError("INSERT INTO user_state", None, Exception("connection refused"))
    failures: list[Exception] = [
        away, away,
        IntegrityError("INSERT INTO user_state", None, sqlite3.IntegrityError("no new users today")),
        OperationalError("INSERT INTO user_state", None, sqlite3.OperationalError("database or disk is full")),
        OperationalError("INSERT INTO user_state", None, ReadOnly("cannot execute INSERT in a read-only transaction")),
        away,  # the outage's kind again, within its minute: left out
    ]
    store = OnlineStore()
    store.apply(parse_event(orjson.dumps({"id": "o-1", "type": "app.opened", "user_id": "u-1",
                                          "ts": "2026-11-26T08:00:00+01:00"})))
    store.advance("SIGNALS", 1)
    target = MemoryCheckpointStore()
    saved = target.save

    def save(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop(0)
        saved(*args, **kwargs)

    target.save = save  # type: ignore[method-assign]
    checkpointer = Checkpointer(store, target, every_events=1, every_s=0.01)
    checkpointer.retry_first_s = checkpointer.retry_max_s = 0.01  # the backoff is not what is tested
    checkpointer._failure_lines = LogThrottle(clock=lambda: 0.0)
    caplog.set_level(logging.WARNING, logger="tipstream.checkpoints")
    running = asyncio.create_task(checkpointer.run())
    try:
        await eventually(lambda: target.positions == {"SIGNALS": 1})
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint failed")]
    assert checkpointer.failures == 6 and len(told) == 4, told
    assert told[0].startswith("checkpoint failed (OperationalError: connection refused)"), told
    assert "the database refused it (IntegrityError: no new users today)" in told[1], told
    assert told[2].startswith("checkpoint failed: the database's disk is full"), told
    assert "takes no writes from tipstream's user" in told[3], told
