"""The `user_features` pass (`app.offline`), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app import db, migrate, offline
from app.db import make_engine
from app.offline import OfflineFeatureWriter
from streams.events import parse_event
from streams.store import OnlineStore

USERS = ("u-1", "u-2", "u-3")


def _store() -> OnlineStore:
    store = OnlineStore()
    for i, user in enumerate(USERS):
        event = {"id": f"e-{i}", "type": "app.opened", "user_id": user, "ts": "2026-11-26T09:00:00+01:00", "data": {}}
        store.apply(parse_event(orjson.dumps(event)))
    return store


async def test_a_user_whose_row_fails_stays_pending_and_the_others_are_written(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One user's features failing to evaluate (a `ts` in year 0 did) failed the whole pass, and every
    user of the pass lost their pending refresh: none was written then or later."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    evaluate = offline.evaluate

    def failing_for_u2(state: Any, now_ms: int) -> Any:
        if state is store.users["u-2"]:
            raise ValueError("year 0 is out of range")
        return evaluate(state, now_ms)

    monkeypatch.setattr(offline, "evaluate", failing_for_u2)
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(list(USERS))
    try:
        assert await writer.write_pass() == 2
        assert writer.pending == {"u-2"}, "kept for the next pass"
        with engine.connect() as conn:
            written = set(conn.execute(sa.select(db.user_features.c.user_id)).scalars())
        assert written == {"u-1", "u-3"}
    finally:
        engine.dispose()


async def test_a_service_that_gave_up_its_database_writes_no_row(database_url: str) -> None:
    """After losing its database lock to another service, whose state is fresher, this one's rows would
    overwrite that service's; its pending users are kept, unwritten, until it stops."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    writer = OfflineFeatureWriter(_store(), engine, every_s=60)
    writer.saved(list(USERS))
    writer.refused = "another service took the database lock"
    try:
        assert await writer.write_pass() == 0
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(db.user_features)).scalar() == 0
    finally:
        engine.dispose()
