"""The `user_features` pass (`app.offline`), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app import db, migrate, offline
from app.checkpoint_stores import SqlCheckpointStore
from app.db import make_engine
from app.offline import OfflineFeatureWriter
from streams.events import parse_event
from streams.store import OnlineStore, UnreadableState
from tests.conftest import IN_PROCESS_START_S, eventually

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


async def test_users_held_in_the_checkpoint_only_get_their_rows_from_it(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a kill -9, `users_behind` hands the first pass the users saved after their row was
    written; one let go of while idle (dormant) or not loaded back yet (cold) is not in memory, and
    the pass skipped them and forgot them: their rows stayed older than their state for good, unlike
    a rebuild's (a drill: 12 idle users' rows a day of events behind). Now it reads the state the
    checkpoint holds, which is theirs."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    now = datetime.now(UTC)
    with engine.begin() as conn:
        db.upsert(conn, db.user_state, [{"user_id": u, "state": store.users[u].to_bytes(), "updated_at": now}
                                        for u in USERS], ["user_id"])
    expected = {u: offline.feature_row(u, store, now) for u in USERS}
    fetch, asked = SqlCheckpointStore(engine).fetch, []
    store.fetch_cold = lambda user_ids: asked.append(list(user_ids)) or fetch(user_ids)
    monkeypatch.setattr(offline, "WRITE_BATCH", 1)  # a pass holds a batch's states at once, not all of them
    del store.users["u-2"]
    store.dormant.add("u-2")  # let go of while idle
    del store.users["u-3"]
    store.cold.add("u-3")  # not loaded back yet after a start
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(list(USERS))
    try:
        assert await writer.write_pass() == 3
        assert writer.pending == set()
        with engine.connect() as conn:
            written = {r.user_id: r for r in conn.execute(sa.select(db.user_features))}
        assert set(written) == set(USERS)
        for user in USERS:
            assert written[user].features == expected[user]["features"], user
            # Only app.opened: every task and tip feature is the registry's fallback, and says so.
            assert written[user].fallbacks == expected[user]["fallbacks"], user
            assert {"preferred_hour", "tasks_created_7d", "tip_positive_rate_30d"} <= set(written[user].fallbacks)
            assert not {"seconds_since_active", "app_opens_7d"} & set(written[user].fallbacks)
        assert store.in_checkpoint_only("u-2") and store.in_checkpoint_only("u-3"), "left where they were"
        assert sorted(asked) == [["u-2"], ["u-3"]]
    finally:
        engine.dispose()


def _writer_with_u2_in_the_checkpoint_only(store: OnlineStore, engine: Any) -> OfflineFeatureWriter:
    """A writer owing every user a row, u-2 let go of while idle (held in the checkpoint only)."""
    del store.users["u-2"]
    store.dormant.add("u-2")
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(list(USERS))
    return writer


async def test_a_damaged_row_read_by_a_pass_stops_the_service_naming_the_user(database_url: str) -> None:
    """A dormant user's `user_state` row that cannot be decoded: read by an event, a request or the warm-up, it
    stops the service with a message naming the user and the fixes (`UnreadableState`). Read by a pass, it was a
    ValueError, logged as a row that "could not be computed" and tried again next pass, every pass, for good."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    damaged = store.users["u-2"].to_bytes()[:-3]
    with engine.begin() as conn:
        db.upsert(conn, db.user_state, [{"user_id": "u-2", "state": damaged, "updated_at": datetime.now(UTC)}],
                  ["user_id"])
    store.fetch_cold = SqlCheckpointStore(engine).fetch
    told: list[UnreadableState] = []
    store.on_unreadable = told.append  # the service's stop (`Service._fail`)
    writer = _writer_with_u2_in_the_checkpoint_only(store, engine)
    try:
        assert await writer.write_pass() == 2
        assert [error.user_id for error in told] == ["u-2"]
        assert "DELETE FROM user_state WHERE user_id = 'u-2'" in str(told[0])
        assert writer.pending == {"u-2"} and store.in_checkpoint_only("u-2"), "its row left as it is"
    finally:
        engine.dispose()


async def test_users_held_in_the_checkpoint_only_stay_pending_when_it_cannot_be_read(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()

    def away(user_ids: list[str]) -> dict[str, bytes]:
        raise sa.exc.OperationalError("select", {}, Exception("the database is away"))

    store.fetch_cold = away
    writer = _writer_with_u2_in_the_checkpoint_only(store, engine)
    try:
        assert await writer.write_pass() == 2
        assert writer.pending == {"u-2"}, "kept for the next pass"
    finally:
        engine.dispose()


async def test_a_row_computed_before_its_user_is_forgotten_is_not_written(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass evaluates, then writes in a worker thread: a user forgotten in between (their row deleted
    by the checkpoint) got it back from the pass. One of theirs forgotten and come back is written, and
    the writer holds no note of who was forgotten past the pass under way (it held every one for good)."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(list(USERS))
    write = writer._write

    def forgotten_meanwhile(rows: list[dict[str, Any]]) -> None:
        assert {row["user_id"] for row in rows} == {"u-1", "u-3"}
        write(rows)

    evaluate = offline.evaluate
    forgets: list[str] = []

    def forget_u2_once_evaluated(state: Any, now_ms: int) -> Any:
        values = evaluate(state, now_ms)
        if state is store.users.get("u-2") and not forgets:
            forgets.append("u-2")
            writer.forget("u-2")  # as the eraser does, on the loop, between the evaluation and the write
        return values

    monkeypatch.setattr(offline, "evaluate", forget_u2_once_evaluated)
    monkeypatch.setattr(writer, "_write", forgotten_meanwhile)
    try:
        assert await writer.write_pass(pause=False) == 2
        monkeypatch.setattr(writer, "_write", write)
        writer.saved(["u-2"])  # their next event, saved by a checkpoint
        assert await writer.write_pass(pause=False) == 1
        with engine.connect() as conn:
            written = set(conn.execute(sa.select(db.user_features.c.user_id)).scalars())
        assert written == set(USERS)
        assert writer.forgotten == set(), "no pass under way computed a row of theirs"
    finally:
        engine.dispose()


async def test_a_pass_writes_each_batch_before_computing_the_next(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass held every row it computed until its end: after a restart that found 979,000 users behind, a
    million rows in memory for the ~40 minutes of the pass (a tenth of the loop), none written before."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    writer = OfflineFeatureWriter(_store(), engine, every_s=60)
    writer.saved(list(USERS))
    write, calls = writer._write, []

    def counted(rows: list[dict[str, Any]]) -> None:
        calls.append(len(rows))
        write(rows)

    monkeypatch.setattr(offline, "WRITE_BATCH", 1)
    monkeypatch.setattr(writer, "_write", counted)
    try:
        assert await writer.write_pass(pause=False) == 3
        assert calls == [1, 1, 1]
        assert writer.pending == set() and not writer.holds("u-1")
    finally:
        engine.dispose()


async def test_the_start_does_not_wait_for_the_users_behind(start_service, monkeypatch: pytest.MonkeyPatch) -> None:
    """`users_behind` scans every `user_state` row: with 1M users on SQLite the start waited 12.7 s for it
    before the HTTP port opened. It now runs beside the service, and its users reach the next pass."""
    import threading

    release = threading.Event()

    def slow_behind(engine: Any) -> list[str]:
        # Longer than the start is given: a start that waited for it fails there. A bound of its own (5 s, against
        # a 10 s scan) failed starts still migrating after 5 s on a machine the suite and more shared.
        release.wait(3 * IN_PROCESS_START_S)
        return ["u-behind"]

    monkeypatch.setattr(offline, "users_behind", slow_behind)
    try:
        running = await start_service(offline_features_every_s=60)
        writer = running.service.offline
        assert writer is not None and "u-behind" not in writer.pending
    finally:
        release.set()
    await eventually(lambda: "u-behind" in writer.pending)


async def test_a_user_forgotten_while_the_users_behind_are_read_is_not_handed_to_a_pass(database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    writer = OfflineFeatureWriter(_store(), engine, every_s=60)

    def behind_then_forgotten(engine: Any) -> list[str]:
        writer.forget("u-2")  # as the eraser would, from the event loop, while the scan runs
        return list(USERS)

    monkeypatch.setattr(offline, "users_behind", behind_then_forgotten)
    try:
        await writer.find_behind()
        assert writer.pending == {"u-1", "u-3"}
    finally:
        engine.dispose()


async def test_a_last_pass_the_database_refuses_logs_its_first_line_not_the_rows(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The stop's last pass logged the database's error whole, four lines: SQLAlchemy's text goes on with the
    statement (its parameters hidden by the engine, `hide_parameters`). One line, as the other user_features
    lines and docs/architecture.md say (`db.briefly`)."""
    url = f"sqlite:///{tmp_path / 'features.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON user_features BEGIN "
                             "SELECT RAISE(ABORT, 'no rows today'); END")
    writer = OfflineFeatureWriter(_store(), engine, every_s=60)
    writer.saved(list(USERS))
    caplog.set_level("WARNING", logger="tipstream")
    try:
        await writer.last_pass()
    finally:
        engine.dispose()
    [said] = [r.getMessage() for r in caplog.records if "last pass did not finish" in r.getMessage()]
    assert said == "user_features: the last pass did not finish (IntegrityError: no rows today)", said


async def test_a_state_saved_in_a_later_batch_than_a_row_computed_before_it_is_found_behind(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint in batches serialises its later batches after its transaction began. Their states were stamped
    with the begin's time: a pass begun after it, which computed a user's row before that user's state was
    serialised with a later event, wrote a row stamped newer than the state. Killed before the next pass, the
    start's `users_behind` passed the user over, and the replay, whose events the saved state already held, changed
    no user: the row stayed a state behind until their next event."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    checkpoint = SqlCheckpointStore(engine)
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(["u-2"])  # saved by the checkpoint before
    computed = asyncio.Event()
    loop, write = asyncio.get_running_loop(), writer._write

    def written_once_told(rows: list[dict[str, Any]]) -> None:
        loop.call_soon_threadsafe(computed.set)
        write(rows)  # on SQLite, waits for the checkpoint's commit: its write lock

    monkeypatch.setattr(writer, "_write", written_once_told)
    try:
        checkpoint.begin([], None, [("u-1", store.users["u-1"].to_bytes())])  # its first batch
        passing = asyncio.ensure_future(writer.write_pass(pause=False))
        await computed.wait()  # u-2's row computed from its state then
        later = {"id": "e-9", "type": "app.opened", "user_id": "u-2", "ts": "2026-11-26T11:00:00+01:00", "data": {}}
        assert store.apply(parse_event(orjson.dumps(later)))
        checkpoint.add([("u-2", store.users["u-2"].to_bytes())])  # a later batch, serialised since
        checkpoint.commit({"SIGNALS": 4}, None, [])
        assert await passing == 1

        # Killed here, before the next pass: a start reads the checkpoint and looks for the rows behind.
        restarted = OnlineStore()
        restarted.cold = set(checkpoint.user_ids())
        restarted.fetch_cold = checkpoint.fetch
        again = OfflineFeatureWriter(restarted, engine, every_s=60)
        await again.find_behind()
        assert "u-2" in again.pending
        await again.write_pass(pause=False)
        with engine.connect() as conn:
            as_of = conn.execute(sa.select(db.user_features.c.as_of).where(db.user_features.c.user_id == "u-2")).scalar()
        assert as_of.replace(tzinfo=as_of.tzinfo or UTC) == datetime(2026, 11, 26, 10, tzinfo=UTC)
    finally:
        checkpoint.rollback()
        engine.dispose()


async def test_a_state_saved_within_a_millisecond_after_a_pass_began_is_found_behind(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite kept a row's `updated_at` to the millisecond, rounded (`db.upsert`), and a state's to the microsecond:
    a pass begun at .1236 wrote .124, so a state a checkpoint stamped at .1237, holding an event folded after the
    row was computed, read as older than the row, and after a kill -9 `users_behind` passed the user over."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    began = datetime(2026, 12, 7, 12, 0, 0, 123_600, UTC)

    monkeypatch.setattr(offline, "datetime", SimpleNamespace(now=lambda tz: began))
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(["u-1"])
    try:
        assert await writer.write_pass(pause=False) == 1
        saved = began + timedelta(microseconds=100)  # the next checkpoint's stamp, a state folded since
        with engine.begin() as conn:
            db.upsert(conn, db.user_state, [{"user_id": "u-1", "state": store.users["u-1"].to_bytes(),
                                              "updated_at": saved}], ["user_id"])
        assert offline.users_behind(engine) == ["u-1"]
    finally:
        engine.dispose()


async def test_a_row_written_before_fallbacks_were_kept_is_found_behind(database_url: str) -> None:
    """Rows written before schema 0006 have no `fallbacks` (null), "until the user's next pass": an idle user's
    never came, as their state was saved before their row, and the table went on without saying which of their
    values were the registry's fallbacks. The start hands them to the first pass."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = _store()
    saved = datetime(2026, 11, 26, 9, tzinfo=UTC)
    with engine.begin() as conn:
        db.upsert(conn, db.user_state, [{"user_id": u, "state": store.users[u].to_bytes(), "updated_at": saved}
                                        for u in USERS], ["user_id"])
        db.upsert(conn, db.user_features, [offline.feature_row(u, store, saved + timedelta(hours=1)) for u in USERS],
                  ["user_id"])
        conn.execute(sa.update(db.user_features).where(db.user_features.c.user_id != "u-2")
                     .values(fallbacks=sa.null()))  # as 0006 added the column
    try:
        assert sorted(offline.users_behind(engine)) == ["u-1", "u-3"]
    finally:
        engine.dispose()


async def test_the_users_behind_are_handed_over_a_chunk_at_a_time(database_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash that followed a rebuild, `users_behind` names nearly every user: handed to the passes at once,
    979,000 of them held the event loop ~0.14 s (the filter and the set's update), as the checkpointer's `saved`
    calls did before it told them in chunks. A user forgotten between two chunks is still left out."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    writer = OfflineFeatureWriter(_store(), engine, every_s=60)
    behind = [f"u-{i}" for i in range(6)]
    monkeypatch.setattr(offline, "users_behind", lambda engine: list(behind))
    monkeypatch.setattr(offline, "SAVED_CHUNK", 2)
    seen: list[int] = []

    async def watch() -> None:  # runs at each turn of the loop that the hand-over leaves it
        while len(writer.pending) < 4:
            seen.append(len(writer.pending))
            if writer.pending:
                writer.forget("u-5")  # as the eraser would, between two chunks
            await asyncio.sleep(0)

    watching = asyncio.ensure_future(watch())
    try:
        await writer.find_behind()
        await asyncio.wait_for(watching, 5)
        assert 2 in seen, seen
        assert writer.pending == {"u-0", "u-1", "u-2", "u-3", "u-4"}
    finally:
        watching.cancel()
        engine.dispose()


async def test_a_row_is_as_of_its_users_newest_event_to_the_millisecond_in_any_year(database_url: str) -> None:
    """`as_of` went through float seconds: far from 1970 (an event in 1500) a float holds no microseconds, and the
    row read 05:34:25.518999 for an event at .519, which PostgreSQL kept (SQLite rounds to the millisecond):
    `?at=` that `as_of` left the newest event out, and answered other values than the row's."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = OnlineStore()
    store.apply(parse_event(orjson.dumps({"id": "old", "type": "app.opened", "user_id": "u-1",
                                          "ts": "1500-02-24T05:34:25.519Z", "data": {}})))
    writer = OfflineFeatureWriter(store, engine, every_s=60)
    writer.saved(["u-1"])
    try:
        assert await writer.write_pass(pause=False) == 1
        with engine.connect() as conn:
            as_of = conn.execute(sa.select(db.user_features.c.as_of)).scalar()
        assert as_of.replace(tzinfo=UTC) == datetime(1500, 2, 24, 5, 34, 25, 519_000, UTC)
    finally:
        engine.dispose()
