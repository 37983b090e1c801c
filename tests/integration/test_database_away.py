"""The database goes away under a running service: checkpoints retry with backoff, nothing is dropped."""

from __future__ import annotations

import orjson
import pytest
import sqlalchemy as sa

from app.metrics import METRICS
from tests.conftest import POSTGRES_ADMIN_URL, eventually


def set_connections(database: str, allowed: bool) -> None:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"true" if allowed else "false"}'))
        if not allowed:
            conn.execute(sa.text("select pg_terminate_backend(pid) from pg_stat_activity where datname = :d"),
                         {"d": database})
    admin.dispose()


def checkpointed(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.text("select seq from stream_positions where stream = 'SIGNALS'")).first()
    engine.dispose()
    return row[0] if row else 0


def opened(i: int) -> bytes:
    return orjson.dumps({"id": f"o-{i}", "type": "app.opened", "user_id": f"u-{i % 7}",
                         "ts": "2026-11-26T08:00:00+01:00"})


@pytest.mark.postgres
async def test_checkpoints_wait_for_the_database_and_lose_nothing(start_service, nc, postgres_url) -> None:
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    running = await start_service(database_url=postgres_url, checkpoint_every_s=0.1)
    js = nc.jetstream()
    for i in range(100):
        await js.publish("signals.app.opened", opened(i))
    await eventually(lambda: checkpointed(postgres_url) == 100)

    failures_before = METRICS.checkpoint_failures._value.get()
    set_connections(database, False)
    try:
        for i in range(100, 200):
            await js.publish("signals.app.opened", opened(i))
        await eventually(lambda: running.service.store.positions["SIGNALS"] == 200)
        await eventually(lambda: METRICS.checkpoint_failures._value.get() > failures_before)
        assert running.service.checkpointer.uncheckpointed == 100
    finally:
        set_connections(database, True)
    await eventually(lambda: checkpointed(postgres_url) == 200, timeout=30)
    await eventually(lambda: running.service.checkpointer.uncheckpointed == 0)


async def test_tables_dropped_under_a_running_service_are_told_in_readyz_and_the_log(
        start_service, nc, caplog: pytest.LogCaptureFixture) -> None:
    """`tipstream migrate base` while the service ran: every checkpoint failed, and /readyz said
    nothing of it, nor the log what to do."""
    import httpx

    from app import migrate

    running = await start_service(checkpoint_every_s=0.1)
    url = running.service.settings.sqlalchemy_url
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        assert (await http.get("/readyz")).json()["checkpoint"]["ok"] is True
        migrate.downgrade(url)
        js = nc.jetstream()
        await js.publish("signals.app.opened", opened(1))

        async def told() -> dict | None:
            body = (await http.get("/readyz")).json()
            return body if not body["checkpoint"]["ok"] else None

        body = await eventually(told)
        assert "no such table" in body["checkpoint"]["last_error"] and body["ready"] is True
        assert any("run `tipstream migrate`" in r.getMessage() for r in caplog.records)
        migrate.upgrade(url)
        await eventually(lambda: running.service.checkpointer.last_error is None, timeout=30)
        assert (await http.get("/readyz")).json()["checkpoint"]["ok"] is True
