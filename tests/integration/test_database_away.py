"""The database goes away under a running service: checkpoints retry with backoff, nothing is dropped."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

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


def away_for(target: Any, checkpoints: int, each: Callable[[], None] = lambda: None) -> None:
    """The database away for the next `checkpoints` checkpoints' saves of `target` (`each` called as each fails),
    then back."""
    from sqlalchemy.exc import OperationalError

    saved, failures = target.save, checkpoints

    def save(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            each()
            raise OperationalError("INSERT INTO user_state", None, Exception("connection refused"))
        return saved(*args, **kwargs)

    target.save = save


@pytest.mark.postgres
async def test_checkpoints_wait_for_the_database_and_lose_nothing(start_service, nc, postgres_url, caplog) -> None:
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    running = await start_service(database_url=postgres_url, checkpoint_every_s=0.1)
    with running.service.engine.connect() as conn:
        autovacuum = conn.execute(sa.text("SHOW autovacuum")).scalar()
    # Off, every checkpoint's rewritten user states pile up as dead rows: the operator is told at the start.
    assert ("PostgreSQL's autovacuum is off" in caplog.text) == (autovacuum == "off"), autovacuum
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
        failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint failed")]
        assert failed and not [line for line in failed if "[SQL:" in line or "\n" in line], failed
    finally:
        set_connections(database, True)
    await eventually(lambda: checkpointed(postgres_url) == 200, timeout=30)
    await eventually(lambda: running.service.checkpointer.uncheckpointed == 0)


def reads_waiting_on_user_state(url: str) -> int:
    """The service's reads of `user_state` that wait for a lock (pg_locks, not granted)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        waiting = conn.execute(sa.text(
            "select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid "
            "where not l.granted and a.query ilike 'select user_state.user_id%'")).scalar_one()
    engine.dispose()
    return waiting


@pytest.mark.postgres
async def test_a_locked_user_state_table_holds_up_only_what_needs_a_user_read_from_it(
        start_service, nc, postgres_url) -> None:
    """An operator's VACUUM FULL or ALTER TABLE locks `user_state`. Reading back a user let go of
    while idle waits for the lock in a worker thread (app/thaw.py): the service goes on answering
    everything else, and answers that user from their state once the lock goes. Read on the event
    loop, the whole service stopped until then."""
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    # The offline writer keeps a user in memory until its pass has read them.
    running = await start_service(database_url=postgres_url, checkpoint_every_s=0.1, offline_features_every_s=0.2)
    js = nc.jetstream()
    for i, (user, day) in enumerate([("idle", "2026-09-01"), ("idle", "2026-09-02"), ("active", "2026-11-26")]):
        await js.publish("signals.app.opened", orjson.dumps(
            {"id": f"e-{i}", "type": "app.opened", "user_id": user, "ts": f"{day}T08:00:00+01:00"}))
    store = running.service.store
    await eventually(lambda: store.dormant == {"idle"}, timeout=30)

    def reads_over(seconds: str) -> float:  # the histogram's count less its bucket up to `seconds`
        samples = {(s.name, s.labels.get("le")): s.value for s in METRICS.user_reads.collect()[0].samples}
        return samples[("tipstream_user_read_seconds_count", None)] - samples[
            ("tipstream_user_read_seconds_bucket", seconds)]

    slow_before = reads_over("0.1")
    locker = sa.create_engine(postgres_url)
    with locker.connect() as conn:
        conn.execute(sa.text("LOCK TABLE user_state IN ACCESS EXCLUSIVE MODE"))
        async with running.http() as http:
            at = {"at": "2026-09-02T09:00:00+01:00"}
            features = asyncio.create_task(http.get("/users/idle/features", params=at))
            score = asyncio.create_task(http.post("/score", json={"user_id": "idle", "candidates": [{"tip_id": "a"}]}))
            await eventually(lambda: reads_waiting_on_user_state(postgres_url) >= 1)

            assert (await http.get("/healthz", timeout=2)).status_code == 200
            other = await http.post("/score", json={"user_id": "active", "candidates": [{"tip_id": "a"}]}, timeout=2)
            assert other.status_code == 200, other.text
            assert not features.done() and not score.done() and store.in_checkpoint_only("idle")
            await asyncio.sleep(0.2)  # the operator's command runs a while (the outage simulated)
            conn.rollback()  # and its lock goes

            body = (await features).json()
            assert body["known"] and body["features"]["app_opens_7d"]["value"] == 2
            assert (await score).status_code == 200
    locker.dispose()
    assert "idle" in store.users
    assert reads_over("0.1") - slow_before >= 1, "tipstream_user_read_seconds shows the read that waited on the lock"


async def test_tables_dropped_under_a_running_service_are_told_in_readyz_and_the_log(
        start_service, nc, caplog: pytest.LogCaptureFixture) -> None:
    """`tipstream migrate base` while the service ran: every checkpoint failed, and /readyz said
    nothing of it, nor the log what to do."""

    from app import migrate

    running = await start_service(checkpoint_every_s=0.1)
    url = running.service.settings.sqlalchemy_url
    async with running.http() as http:
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
        # The failed statement's parameters are the users' ids and states: kept out of the log, where a
        # forgotten user's id would outlive the erasure.
        assert "'u-1'" not in caplog.text and "checkpoint failed" in caplog.text
        migrate.upgrade(url)
        await eventually(lambda: running.service.checkpointer.last_error is None, timeout=30)
        assert (await http.get("/readyz")).json()["checkpoint"]["ok"] is True


@pytest.mark.postgres
async def test_reads_stuck_on_a_locked_user_state_leave_the_services_worker_threads_free(
        postgres_url, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of a user waiting for a lock on `user_state` gives up waiting after LOAD_TIMEOUT_S,
    but its thread stays blocked until the lock goes. In the loop's default executor, a few dozen
    such reads (a /score for each of as many idle users) took every worker thread: everything else
    the service runs in a thread (the offline writer, tip_scores retention, model saves, the
    checkpointer's probes, the embedded NATS server's restart) waited for the lock too."""
    from app import migrate, thaw
    from app.checkpoint_stores import SqlCheckpointStore
    from app.db import make_engine
    from streams.store import OnlineStore, StateUnavailable
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    store = OnlineStore()
    store.fetch_cold = SqlCheckpointStore(engine).fetch
    users = [f"idle-{i}" for i in range(40)]
    store.dormant.update(users)
    monkeypatch.setattr(thaw, "LOAD_TIMEOUT_S", 0.5)

    locker = sa.create_engine(postgres_url)
    with locker.connect() as conn:
        conn.execute(sa.text("LOCK TABLE user_state IN ACCESS EXCLUSIVE MODE"))
        answers = await asyncio.gather(*(thaw.load_state(store, u) for u in users), return_exceptions=True)
        assert all(isinstance(a, StateUnavailable) for a in answers)
        # Another table, from another thread, while the lock lasts.
        with_other = asyncio.to_thread(lambda: engine.connect().close() or "free")
        assert await asyncio.wait_for(with_other, 5) == "free"
        conn.rollback()
    locker.dispose()
    await eventually(lambda: reads_waiting_on_user_state(postgres_url) == 0)
    engine.dispose()


async def test_a_stream_held_at_a_user_read_goes_on_once_the_database_answers(
        start_service, nc, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event for a user let go of while idle holds its stream while the database is away, retried
    with a backoff that doubles to 10 s. The wait was not cut short when the database came back, as the
    checkpointer's is: the stream, every user's events in it, stayed held up to 10 s after (5.4 s in
    a drill). Now it asks every PROBE_EVERY_S, as the checkpointer does. Told by the waits the stream
    takes once the database is back, not by a stopwatch a loaded machine stretches."""
    from app.checkpoints import PROBE_EVERY_S

    running = await start_service(checkpoint_every_s=0.1, offline_features_every_s=0.2)
    js = nc.jetstream()
    for i, (user, day) in enumerate([("idle", "2026-09-01"), ("active", "2026-11-26")]):
        await js.publish("signals.app.opened", orjson.dumps(
            {"id": f"e-{i}", "type": "app.opened", "user_id": user, "ts": f"{day}T08:00:00+01:00"}))
    service = running.service
    store = service.store
    await eventually(lambda: store.dormant == {"idle"}, timeout=30)

    away, failed = True, 0
    read = store.fetch_cold

    def fetch(user_ids: list[str]) -> dict[str, bytes]:
        nonlocal failed
        if away:
            failed += 1
            raise sa.exc.OperationalError("select", {}, Exception("the database is away"))
        return read(user_ids)

    def reachable() -> bool:
        nonlocal away
        if away and failed >= 5:  # the retry now waits 3.2 s: the database comes back as it starts
            away = False
            return False
        return not away

    ingest = next(i for i in service.ingests if i.spec.name == "SIGNALS")
    pause, paused_since_back = ingest._pause, []

    def noted_pause(seconds: float) -> Any:
        if not away and "idle" not in store.users:
            paused_since_back.append(seconds)
        return pause(seconds)

    monkeypatch.setattr(store, "fetch_cold", fetch)
    monkeypatch.setattr(service.checkpointer.target, "reachable", reachable)
    monkeypatch.setattr(ingest, "_pause", noted_pause)
    await js.publish("signals.app.opened", orjson.dumps(
        {"id": "e-2", "type": "app.opened", "user_id": "idle", "ts": "2026-11-26T09:00:00+01:00"}))
    # Back once the stream, after its fifth failure, asks whether it is: never, were it not asking.
    await eventually(lambda: not away, timeout=20)
    await eventually(lambda: "idle" in store.users, timeout=20)
    assert failed == 5
    assert paused_since_back == [PROBE_EVERY_S], "folded a probe after the database's return, not its 3.2 s wait"


def alter_database(database: str, clause: str) -> None:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{database}" {clause}'))
    admin.dispose()


def reconnect_pool(database: str, but: int) -> None:
    """End the service's pooled sessions (not its lock's, nor pid `but`), as a failover does: they open
    again under the database's settings as they are now."""
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("select pg_terminate_backend(pid) from pg_stat_activity where datname = :d "
                             "and application_name not like 'tipstream %' and pid <> :but"), {"d": database, "but": but})
    admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize(("setting", "value"), [("default_transaction_read_only", "on"),
                                                ("statement_timeout", "'100ms'")])
async def test_a_session_setting_refusing_checkpoints_is_named_and_once_mended_needs_no_restart(
        setting: str, value: str, start_service, nc, postgres_url, caplog) -> None:
    """An operator's `ALTER ROLE/DATABASE ... SET` (read-only after a failover to a standby, a statement
    timeout shorter than a checkpoint's statements) failed every checkpoint with SQLAlchemy's statement
    and rows in the log, not the setting; and mended, it still failed them until a restart, since the
    pool kept the connections that had read the old setting."""
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    running = await start_service(database_url=postgres_url, checkpoint_every_s=0.1)
    running.service.checkpointer.retry_first_s = 0.1  # the retries' backoff is not what is tested
    js = nc.jetstream()
    for i in range(10):
        await js.publish("signals.app.opened", opened(i))
    await eventually(lambda: checkpointed(postgres_url) == 10)

    locker = sa.create_engine(postgres_url)  # a statement waiting for a lock meets the timeout, every time
    failures_before = METRICS.checkpoint_failures._value.get()
    with locker.connect() as held:
        if setting == "statement_timeout":
            held.execute(sa.text("LOCK TABLE stream_positions IN ACCESS EXCLUSIVE MODE"))
        alter_database(database, f"SET {setting} = {value}")
        try:
            reconnect_pool(database, but=held.execute(sa.text("select pg_backend_pid()")).scalar_one())
            for i in range(10, 20):
                await js.publish("signals.app.opened", opened(i))
            await eventually(lambda: METRICS.checkpoint_failures._value.get() > failures_before)
        finally:
            alter_database(database, f"RESET {setting}")
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint failed")]
    assert failed and setting in failed[-1] and "needs no restart" in failed[-1], failed
    assert "[SQL:" not in failed[-1] and "[parameters:" not in failed[-1], failed[-1]
    await eventually(lambda: checkpointed(postgres_url) == 20, timeout=15)
    locker.dispose()


@pytest.mark.postgres
async def test_an_admin_change_refused_by_a_statement_timeout_names_it_not_an_outage(
        start_service, postgres_url) -> None:
    """A promotion (a registration, ...) cut short by the operator's statement_timeout answered 'the
    database is away; try again once it is back': waiting changed nothing."""
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    database = postgres_url.rsplit("/", 1)[1]
    token = "s3cret-token-for-tests"
    running = await start_service(database_url=postgres_url, admin_token=token, bootstrap_shadow_kind="logreg")
    locker = sa.create_engine(postgres_url)
    with locker.connect() as held:
        held.execute(sa.text("LOCK TABLE model_rollouts IN ACCESS EXCLUSIVE MODE"))
        alter_database(database, "SET statement_timeout = '100ms'")
        try:
            reconnect_pool(database, but=held.execute(sa.text("select pg_backend_pid()")).scalar_one())
            async with running.http() as http:
                refused = await http.post("/admin/models/v2/promote", timeout=10,
                                          headers={"Authorization": f"Bearer {token}"})
        finally:
            alter_database(database, "RESET statement_timeout")
    locker.dispose()
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert "statement_timeout" in error and "ALTER ROLE postgres SET statement_timeout" in error, error
    assert "nothing changed" in error and "once it is back" not in error, error


async def test_a_full_disk_under_sqlite_is_told_with_where_to_free_space_and_loses_nothing(
        start_service, nc, caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's 'database or disk is full' (a data directory on a full tmpfs) was told as an outage: 'retrying
    ... once the database answers again', and a registry change 'the database is away ... try again once it is
    back', where the database answered and waiting mended nothing. SQLite's own SQLITE_FULL comes here from
    max_page_count, which holds the file at the pages it has."""
    import logging

    caplog.set_level(logging.INFO, logger="tipstream.checkpoints")
    token = "s3cret-token-for-tests"
    running = await start_service(checkpoint_every_s=0.1, admin_token=token)
    running.service.checkpointer.retry_first_s = running.service.checkpointer.retry_max_s = 0.1  # not tested here
    engine, url = running.service.engine, running.service.settings.sqlalchemy_url

    def no_more_pages(dbapi_connection, _record) -> None:
        dbapi_connection.execute("PRAGMA max_page_count = 1")  # raised to the pages the file has: no new one

    sa.event.listen(engine, "connect", no_more_pages)
    engine.dispose()  # the pooled connections do not have it
    js = nc.jetstream()
    try:
        for i in range(500):
            await js.publish("signals.app.opened", orjson.dumps(
                {"id": f"full-{i}", "type": "app.opened", "user_id": f"full-{i}", "ts": "2026-11-26T08:00:00+01:00"}))
        async with running.http() as http:
            async def told() -> dict | None:
                body = (await http.get("/readyz")).json()
                return body if not body["checkpoint"]["ok"] else None

            body = await eventually(told)
            error = body["checkpoint"]["last_error"]
            assert error.startswith("the database's disk is full") and "free space on the disk of" in error, error
            # The client's own timeout (HTTP_TIMEOUT_S): a registration evaluates in a process it spawns (2.5-3.5 s
            # of imports, twice that on a loaded machine), and beside three xdist workers it took over the 10 s
            # this request was given.
            refused = await http.post("/admin/models", json={"version": "v9"},
                                      headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 503, refused.text
            assert "disk is full" in refused.json()["error"] and "once it is back" not in refused.json()["error"]
        failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint failed")]
        assert failed and "disk is full" in failed[-1] and "free space on the disk of" in failed[-1], failed
        assert "answers again" not in failed[-1] and "[SQL:" not in failed[-1], failed[-1]
    finally:
        sa.event.remove(engine, "connect", no_more_pages)
        engine.dispose()
    # Both in one wait: once, in a run of two workers, the rows were in while the last attempt had failed.
    await eventually(lambda: checkpointed(url) == 500 and running.service.checkpointer.last_error is None, timeout=15)


async def promotion_refused(running, token: str) -> str:
    """The error of a 503 to promoting v2 (the bootstrap's shadow), the service stopped after."""
    try:
        async with running.http() as http:
            refused = await http.post("/admin/models/v2/promote", timeout=10,
                                      headers={"Authorization": f"Bearer {token}"})
    finally:
        await running.stop()
    assert refused.status_code == 503, refused.text
    return refused.json()["error"]


@pytest.mark.postgres
async def test_an_admin_change_its_user_may_not_write_is_told_the_grant_not_an_outage(
        start_service, postgres_url) -> None:
    """A least-privilege user (docs/operations.md, "On PostgreSQL") without a right on a table, as on one a new
    release's migration made after the grants: a promotion answered 'the database is away (ProgrammingError); try again
    once it is back', which no wait mends."""
    from sqlalchemy.engine import make_url

    from tests.conftest import reset_postgres
    from tests.integration.test_cli import another_postgres_user

    reset_postgres(postgres_url)
    token = "s3cret-token-for-tests"
    first = await start_service(database_url=postgres_url, admin_token=token, bootstrap_shadow_kind="logreg")
    await first.stop()  # the owner's start: the tables, v1 and its shadow v2
    with another_postgres_user(postgres_url) as (role, owner):
        with owner.begin() as conn:
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {role}"))
            conn.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"))
            conn.execute(sa.text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"))
            conn.execute(sa.text(f"REVOKE INSERT ON model_rollouts FROM {role}"))
        url = make_url(postgres_url).set(username=role).render_as_string(False)
        error = await promotion_refused(await start_service(
            database_url=url, admin_token=token, bootstrap_shadow_kind="logreg"), token)
    assert "permission denied for table model_rollouts" in error, error
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}" in error, error
    assert "nothing changed" in error and "once it is back" not in error, error


async def test_an_admin_change_on_tables_not_this_release_s_is_told_to_migrate_not_an_outage(
        start_service, database_url) -> None:
    """A table missing under a running service (an older backup restored, a downgrade, one dropped by hand):
    a promotion answered 'the database is away (OperationalError); try again once it is back' on SQLite, and
    (ProgrammingError) on PostgreSQL, which no wait mends."""
    token = "s3cret-token-for-tests"
    running = await start_service(database_url=database_url, admin_token=token, bootstrap_shadow_kind="logreg")
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE model_rollouts"))
    engine.dispose()
    error = await promotion_refused(running, token)
    assert "model_rollouts" in error and "run `tipstream migrate`" in error, error
    assert "nothing changed" in error and "once it is back" not in error, error


def refusing_trigger(url: str, table: str, words: str, drop: bool = False) -> None:
    """A trigger of the operator's refusing every row written to `table` (`drop`: taken away again), as an
    IntegrityError from a database that answers: SQLite's RAISE(ABORT), PostgreSQL's check_violation."""
    engine = sa.create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        if drop:
            conn.execute(sa.text(f"DROP TRIGGER refuse_{table}" + ("" if sqlite else f" ON {table}")))
        elif sqlite:
            conn.execute(sa.text(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} "
                                 f"BEGIN SELECT RAISE(ABORT, '{words}'); END"))
        else:
            conn.execute(sa.text(f"CREATE OR REPLACE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS "
                                 f"$$BEGIN RAISE EXCEPTION '{words}' USING ERRCODE = 'check_violation'; END$$"))
            conn.execute(sa.text(f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} FOR EACH ROW "
                                 f"EXECUTE FUNCTION refuse_{table}()"))
    engine.dispose()


async def test_an_admin_change_a_trigger_refuses_is_told_refused_not_an_outage(
        start_service, database_url, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An IntegrityError (a trigger or constraint the operator added, or a bug) answered a promotion with 503
    'the database is away (IntegrityError); nothing changed: try again once it is back' and Retry-After: the
    database answered, and every retry met the same refusal. The CLI printed the same."""
    from app.cli import main

    token = "s3cret-token-for-tests"
    running = await start_service(database_url=database_url, admin_token=token, bootstrap_shadow_kind="logreg")
    refusing_trigger(database_url, "model_rollouts", "no rollouts during the freeze")
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", token)
    try:
        async with running.http() as http:
            refused = await http.post("/admin/models/v2/promote", timeout=10,
                                      headers={"Authorization": f"Bearer {token}"})
            roles = (await http.get("/models")).json()
        code = await asyncio.to_thread(main, ["models", "promote", "v2", "--url", running.base_url])
    finally:
        await running.stop()
    assert refused.status_code == 500 and "retry-after" not in refused.headers, (refused.status_code, refused.text)
    error = refused.json()["error"]
    assert error.startswith("the database refused it (IntegrityError: no rollouts during the freeze); nothing "
                            "changed. Not an outage"), error
    assert "away" not in error and "once it is back" not in error, error
    assert (roles["champion"], roles["shadow"]) == ("v1", "v2")
    told = capsys.readouterr().err
    assert code == 1 and "refused (500): the database refused it (IntegrityError: no rollouts" in told, told


async def test_checkpoints_a_trigger_refuses_are_told_refused_not_an_outage_and_go_on_once_it_goes(
        start_service, nc, database_url, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint an IntegrityError refused was logged 'retrying ..., or once the database answers again',
    and ingest's hold asked 'is the database away?': it answered, and refused each retry the same."""
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1)
    checkpointer = running.service.checkpointer
    checkpointer.retry_first_s = checkpointer.retry_max_s = 0.1  # the backoff is not what is tested
    refusing_trigger(database_url, "user_state", "no new users today")
    js = nc.jetstream()
    for i in range(5):
        await js.publish("signals.app.opened", opened(i))
    await eventually(lambda: checkpointer.last_error is not None, timeout=20)
    assert checkpointer.last_error.startswith("the database refused it (IntegrityError: no new users today"), \
        checkpointer.last_error
    assert "is the database away" not in checkpointer.behind_because()
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint failed")]
    assert failed and "the database refused it (IntegrityError: no new users today)" in failed[-1], failed
    assert "Not an outage" in failed[-1] and "answers again" not in failed[-1] and "[SQL:" not in failed[-1], failed
    refusing_trigger(database_url, "user_state", "", drop=True)
    await eventually(lambda: checkpointed(database_url) == 5 and checkpointer.last_error is None, timeout=15)


async def test_a_last_checkpoint_refused_at_the_stop_logs_the_database_s_first_line_not_the_rows(
        start_service, nc, database_url, caplog: pytest.LogCaptureFixture) -> None:
    """The stop's last checkpoint logged a refusal whole: SQLAlchemy's text goes on with the statement, over
    lines of its own."""
    caplog.set_level(logging.WARNING, logger="tipstream")
    running = await start_service(database_url=database_url, checkpoint_every_s=3600)
    refusing_trigger(database_url, "user_state", "no new users today")
    js = nc.jetstream()
    for i in range(3):
        await js.publish("signals.app.opened", opened(i))
    await eventually(lambda: {"u-0", "u-1", "u-2"} <= set(running.service.store.users), timeout=15)
    await running.stop()
    refusing_trigger(database_url, "user_state", "", drop=True)
    [said] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("last checkpoint failed")]
    assert "IntegrityError: no new users today" in said and "INSERT" not in said and "\n" not in said, said


async def test_an_outage_with_no_request_to_forget_is_not_told_as_a_forget_that_did_not_go_through(
        start_service, database_url, tmp_path, caplog) -> None:
    """The erasures' loop looks for requests every 30 s: with the database away, that look fails. With none
    waiting, its warning said "forgetting a user did not go through ... The request is saved", at every
    outage, of a request nobody made."""
    from tests.conftest import free_port

    caplog.set_level(logging.WARNING, logger="tipstream.erasure")
    running = await start_service(database_url=database_url)
    eraser = running.service.eraser
    await eraser.work()  # a look that finds no request
    (tmp_path / "a-file").write_text("")  # no directory: SQLite cannot open a database under it
    away = (f"sqlite:///{tmp_path}/a-file/tipstream.db" if database_url.startswith("sqlite")
            else f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")  # nothing listens there
    kept, eraser.engine = eraser.engine, sa.create_engine(away)
    try:
        eraser.wake()

        def told() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "tipstream.erasure"]

        await eventually(told)
    finally:
        eraser.engine.dispose()
        eraser.engine = kept
    said = told()[0]
    assert said.startswith("cannot look for requests to forget a user (OperationalError: "), said
    assert "none was waiting at the last look" in said and "did not go through" not in said, said


async def test_checkpoints_that_commit_again_after_failing_say_so(start_service, nc, database_url, caplog) -> None:
    """A failed checkpoint warned at each retry, every 30 s for as long as the database was away; the first that
    commits after them said nothing, so a log read after an outage could not tell whether checkpoints had come back,
    nor when. Six failures 25 s apart on the warnings' clock (not slept): told at once, then 75 s on with the two
    left out."""
    from streams.log_throttle import LogThrottle

    caplog.set_level(logging.INFO, logger="tipstream.checkpoints")
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1, checkpoint_writer="thread")
    checkpointer = running.service.checkpointer
    checkpointer.retry_first_s = checkpointer.retry_max_s = 0.05  # the backoff is not what is tested
    now = [0.0]
    checkpointer._failure_lines = LogThrottle(clock=lambda: now[0])

    def later() -> None:
        now[0] += 25.0

    away_for(checkpointer.target, 6, each=later)
    js = nc.jetstream()
    for i in range(10):
        await js.publish("signals.app.opened", opened(i))
    await eventually(lambda: checkpointed(database_url) == 10, timeout=30)

    def said(start: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]

    failed = said("checkpoint failed")
    assert len(failed) == 2 and "more failed" not in failed[0], failed
    assert failed[1].endswith("(2 more failed checkpoints since the last line)"), failed
    # Committed in its thread before the checkpoint's coroutine goes on to say so.
    [back] = await eventually(lambda: said("checkpoints commit again"))
    assert "the first of the 6 that failed" in back and "users changed meanwhile are saved" in back, back


async def test_a_checkpoint_that_waits_on_a_database_that_does_not_answer_is_told(
        start_service, nc, database_url, caplog, monkeypatch) -> None:
    """A server or link that hangs (the kernel still acknowledging) is no error for libpq: the checkpoint waits,
    and a hang of minutes went by with no line in the log and /readyz's `checkpoint.ok` true (then, once told in
    the log, still true: only `since_last_ok_s` grew)."""
    import threading

    from app import checkpoints

    monkeypatch.setattr(checkpoints, "SLOW_CHECKPOINT_S", 0.3)
    caplog.set_level(logging.INFO, logger="tipstream.checkpoints")
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1, checkpoint_writer="thread")
    target = running.service.checkpointer.target
    saved, answers = target.save, threading.Event()

    def save(*args: Any, **kwargs: Any) -> Any:  # the database hangs until `answers` is set
        answers.wait(30)
        return saved(*args, **kwargs)

    target.save = save
    try:
        await nc.jetstream().publish("signals.app.opened", opened(0))

        def said(start: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]

        [hung] = await eventually(lambda: said("a checkpoint has not committed after 0 s"))
        assert "(saving 1 user)" in hung and "the database does not answer" in hung, hung
        assert checkpointed(database_url) == 0
        async with running.http() as http:
            # As for a database away: not ok, and why; the service stays ready, serving from memory.
            readyz = await http.get("/readyz")
            checkpoint = readyz.json()["checkpoint"]
            assert readyz.status_code == 200 and readyz.json()["ready"] is True, readyz.json()
            assert checkpoint["ok"] is False, checkpoint
            hang = (r"a checkpoint has not committed after \d+ s \(saving 1 user\): the database does not answer, "
                    r"unless it saves very many users")
            assert re.fullmatch(hang, checkpoint["last_error"]), checkpoint
        # Ingest's line when it holds for checkpoints said the database answered.
        assert re.fullmatch(hang, running.service.checkpointer.behind_because())
    finally:
        answers.set()
    await eventually(lambda: checkpointed(database_url) == 1)
    await eventually(lambda: said("the checkpoint that had not committed after 0 s committed"))
    async with running.http() as http:
        assert (await http.get("/readyz")).json()["checkpoint"] | {"since_last_ok_s": 0} == {
            "ok": True, "last_error": None, "since_last_ok_s": 0}


async def test_a_failed_checkpoint_is_retried_after_the_backoff_it_names(start_service, nc, database_url, caplog) -> None:
    """"retrying in 0.5s": the retry came after the backoff and then a further TIPSTREAM_CHECKPOINT_EVERY_S (5 s by
    default), so after an outage the first commit, and the end of /score's 503s for unwritten decisions, trailed
    the database's return by up to that much more than said."""
    running = await start_service(database_url=database_url, checkpoint_every_s=3600, checkpoint_writer="thread")
    checkpointer = running.service.checkpointer
    away_for(checkpointer.target, 1)
    await nc.jetstream().publish("signals.app.opened", opened(0))
    await eventually(lambda: running.service.store.positions.get("SIGNALS") == 1)
    checkpointer.wanted()  # the one checkpoint asked for: it fails, and its retry is the only one within the hour
    await eventually(lambda: checkpointer.failures == 1)
    assert "retrying in 0.5s" in next(r.getMessage() for r in caplog.records if "checkpoint failed" in r.getMessage())
    await eventually(lambda: checkpointed(database_url) == 1, timeout=20)
