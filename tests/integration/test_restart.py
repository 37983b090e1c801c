"""A restart restores lazily: it serves every checkpointed user at once and loads the rest behind."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from streams.fold import to_ms
from streams.jetstream import publish_events, stored_us
from streams.simulator import Population
from tests.conftest import eventually


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_restart_serves_checkpointed_users_before_they_are_loaded(
        start_service, nc, writer: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    events = list(Population(users=300, seed=2).history(days=2, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    first = await start_service(checkpoint_writer=writer)
    await publish_events(nc.jetstream(), events)
    await eventually(lambda: first.service.store.applied == len(events), timeout=30)
    before = {user: state.to_bytes() for user, state in first.service.store.users.items()}
    await first.stop()
    with first.service.engine.connect() as conn:  # what tells the stream apart at the start, by either writer
        mark = conn.execute(sa.text("select stored_us from stream_positions where stream = 'SIGNALS'")).scalar()
    assert mark is not None and mark == await stored_us(nc.jetstream(), "SIGNALS", first.service.store.positions["SIGNALS"])

    caplog.set_level(logging.INFO, logger="tipstream")
    # Its progress told as it goes, here at every read of 100 users: nothing was said between the start's line and
    # the last (31-58 s with a million users).
    monkeypatch.setattr("app.warm_up.READ_CHUNK", 100)
    monkeypatch.setattr("app.warm_up.REPORT_EVERY_S", 0.0)
    from app.bootstrap import Service

    load_learning = Service._load_learning

    async def after_the_warm_up(self: Service) -> None:  # as when loading the models took longer (River's import)
        await eventually(lambda: not self.store.cold, timeout=30)
        await load_learning(self)

    monkeypatch.setattr(Service, "_load_learning", after_the_warm_up)
    second = await start_service()
    store = second.service.store
    assert f"checkpoint restored: {len(before)} users (loading in the background)" in caplog.text
    assert store.positions == first.service.store.positions
    async with second.http() as http:
        body = (await http.get("/users/u-299/features")).json()
    assert body["known"] is True
    await eventually(lambda: second.service.warm, timeout=30)
    assert {user: state.to_bytes() for user, state in store.users.items()} == before
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading the checkpointed users: ")]
    assert [line.split(" loaded (")[0] for line in told] == [
        f"loading the checkpointed users: {loaded} of 300" for loaded in (100, 200)], told
    assert told[0].endswith(" s left)") and " users/s, about " in told[0]
    assert store.applied == 0, "nothing re-applied: the checkpoint covered every event"


def tracked_ids() -> set[int]:
    """Objects a full collection visits (the frozen generation excluded)."""
    return {id(obj) for obj in gc.get_objects()}


async def test_user_states_are_frozen_out_of_full_collections_as_the_store_grows(start_service, nc,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    events = list(Population(users=300, seed=4).history(days=1, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    try:
        # Folded from the streams: frozen after the checkpoint that saved them.
        first = await start_service(gc_freeze_every_users=300, checkpoint_every_s=0.1)
        await publish_events(nc.jetstream(), events)
        store = first.service.store
        await eventually(lambda: store.applied == len(events) and first.service.freezer.users_at_freeze == 300,
                         timeout=30)
        visited = tracked_ids()
        assert not any(id(state) in visited or id(state.logs) in visited for state in store.users.values())
        await first.stop()

        # Loaded from a checkpoint: frozen as the warm-up loads them, after what the start made.
        caplog.set_level(logging.INFO, logger="tipstream.collector")
        second = await start_service(gc_freeze_every_users=300)
        assert "start: long-lived objects frozen" in caplog.text
        await eventually(lambda: second.service.warm, timeout=30)
        assert second.service.freezer.users_at_freeze == 300
        visited = tracked_ids()
        assert not any(id(state) in visited for state in second.service.store.users.values())
    finally:
        gc.unfreeze()  # the rest of this test process collects as usual


def opened(i: int, user: str, ts: str) -> tuple[str, dict[str, Any]]:
    return "signals.app.opened", {"id": f"{user}-{i}", "type": "app.opened", "user_id": user, "ts": ts, "v": 1}


async def test_an_idle_user_leaves_memory_and_comes_back_from_the_database(start_service, nc) -> None:
    """No event for 32 days of the log's time: after a checkpoint the user is in the database
    only, answers as before, and a restart does not load them back into memory."""
    idle = [opened(i, "idle", f"2026-09-0{i + 1}T08:00:00+01:00") for i in range(3)]
    active = [opened(i, "active", "2026-11-26T08:00:00+01:00") for i in range(2)]
    first = await start_service(checkpoint_every_s=0.1, offline_features_every_s=0.2)
    await publish_events(nc.jetstream(), idle + active)
    store = first.service.store
    await eventually(lambda: store.dormant == {"idle"}, timeout=30)
    assert list(store.users) == ["active"]
    # Not before the offline writer's pass had read it: its user_features row was written.
    with first.service.engine.connect() as conn:
        assert "idle" in conn.execute(sa.text("select user_id from user_features")).scalars().all()
    async with first.http() as http:
        assert "tipstream_users_dormant 1.0" in (await http.get("/metrics")).text
        at = {"at": "2026-09-03T09:00:00+01:00"}  # within the idle user's history: three opens in 7 days
        body = (await http.get("/users/idle/features", params=at)).json()
    assert body["known"] and body["features"]["app_opens_7d"]["value"] == 3
    await first.stop()

    second = await start_service(checkpoint_every_s=0.1)
    store = second.service.store
    await eventually(lambda: not store.cold and store.dormant == {"idle"}, timeout=30)
    async with second.http() as http:
        again = (await http.get("/users/idle/features", params=at)).json()
    assert again == body
    await second.stop()


async def test_a_stop_during_the_warm_up_ends_its_reader_thread(start_service, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up's reader thread waited for room in its queue of chunks for ever once the warm-up was
    cancelled: after a SIGTERM in the first seconds of a restart with 6,000 users or more (the queue holds 4
    chunks of 1,000), the process, whose end waits for its worker threads, never exited."""
    import threading

    from app.checkpoint_stores import SqlCheckpointStore
    from streams.events import parse_event
    from streams.store import OnlineStore

    first = await start_service()
    await first.stop()
    folded = OnlineStore()
    for i in range(6_000):
        folded.apply(parse_event(orjson.dumps({"id": f"w{i}", "type": "app.opened", "user_id": f"u{i}",
                                                "ts": "2026-11-26T08:00:00Z"})))
    with first.service.engine.begin() as conn:
        conn.execute(sa.text("insert into user_state (user_id, state, updated_at) values (:u, :s, :t)"),
                     [{"u": u, "s": state.to_bytes(), "t": datetime.now(UTC)} for u, state in folded.users.items()])

    ended = threading.Event()
    states = SqlCheckpointStore.states

    def read_states(self: SqlCheckpointStore) -> Any:
        try:
            yield from states(self)
        finally:
            ended.set()

    warm = OnlineStore.warm
    cancelled: list[int] = []

    def cancelled_at_first_chunk(self: OnlineStore, rows: Any) -> int:
        if not cancelled:  # where a stop's cancellation finds the warm-up, at its next turn of the loop
            cancelled.append(1)
            raise asyncio.CancelledError
        return warm(self, rows)

    monkeypatch.setattr(SqlCheckpointStore, "states", read_states)
    monkeypatch.setattr(OnlineStore, "warm", cancelled_at_first_chunk)
    second = await start_service()
    await eventually(lambda: cancelled)
    await second.stop()
    try:
        assert await asyncio.to_thread(ended.wait, 5), "the warm-up's reader thread still waits"
    finally:
        while not ended.is_set():  # without the fix: let it go, else the end of the test's loop waits for it
            for task in asyncio.all_tasks():
                coro = task.get_coro()
                if getattr(coro, "__qualname__", "") == "Queue.put":
                    queue = coro.cr_frame.f_locals["self"]
                    while not queue.empty():
                        queue.get_nowait()
            await asyncio.sleep(0.01)


async def test_a_small_bound_on_events_not_checkpointed_holds_no_stream_after_a_restart(start_service, nc) -> None:
    """TIPSTREAM_MAX_UNCHECKPOINTED_EVENTS=200 on a demo: after a restart DECISIONS stayed paused in its read-back,
    FEEDBACK behind it, and /readyz answered 503. Each hold waited for the next timed checkpoint (every 5 s by
    default; here, never): one batch a stream between two, slower than the decisions coming in. A hold now asks
    for its checkpoint, and the streams are read to their ends whatever the timer."""
    js = nc.jetstream()
    settings = {"max_uncheckpointed_events": 20, "checkpoint_every_s": 3600, "ingest_batch": 16}
    body = {"user_id": "u-1", "explore": False, "context": {"now": "2026-11-26T09:00:00+01:00"},
            "candidates": [{"tip_id": "tip-focus-1", "category": "focus"}, {"tip_id": "tip-breaks-1", "category": "breaks"}]}
    events = list(Population(users=10, seed=6).history(days=2, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))

    async def served(running: Any, count: int) -> None:
        async with running.http() as http:
            for _ in range(count):
                decision = (await http.post("/score", json=body)).json()
                await js.publish("feedback.tip.reacted", orjson.dumps({
                    "id": f"r-{decision['decision_id']}", "type": "tip.reacted", "user_id": "u-1",
                    "ts": "2026-11-26T09:00:00+01:00", "v": 1,
                    "data": {"tip_id": decision["ranked"][0]["tip_id"], "reaction": "acted",
                             "decision_id": decision["decision_id"]}}))

    async def read_to_the_end(running: Any) -> bool:
        ends = {name: (await js.stream_info(name)).state.last_seq for name in ("SIGNALS", "FEEDBACK", "DECISIONS")}
        return running.service.ready and {name: running.service.store.positions.get(name) for name in ends} == ends

    first = await start_service(**{**settings, "checkpoint_every_s": 0.2})  # the live case: test_ingest_recovery.py
    await publish_events(js, events[: len(events) // 2])
    await served(first, 40)
    await eventually(lambda: read_to_the_end(first), timeout=60, interval=0.1)
    await first.stop()

    await publish_events(js, events[len(events) // 2 :])  # while it is down: a backlog to read at the start
    second = await start_service(**settings)
    await served(second, 40)
    await eventually(lambda: read_to_the_end(second), timeout=60, interval=0.1)
    async with second.http() as http:
        assert (await http.get("/readyz")).status_code == 200
    await second.stop()


@pytest.mark.parametrize("dropped", [False, True], ids=["alone", "a-task-dropping-the-stop-s-cancellation"])
async def test_a_stop_that_saves_many_users_says_so_before_its_last_checkpoint(
        start_service, nc, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, dropped: bool) -> None:
    """After a catch-up, which changes every user, the stop's last checkpoint saves them all: a minute or two for a
    million users, and the log said nothing until it had ended. The stop has lines of its own before, by chance: a
    task whose NATS answer comes with the stop's cancellation goes on (Python 3.11's `wait_for`, in nats-py's
    requests: the DECISIONS tail's, before it waited through `answers.answered`), and the stop says so after
    STOP_CANCEL_AGAIN_S. The test took the first line beginning "stopping: " for the checkpoint's, and failed when
    one came, under load. `dropped`: a task that drops the stop's cancellation, every time."""
    events = list(Population(users=300, seed=4).history(days=1, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    monkeypatch.setattr("app.bootstrap.STOP_CHECKPOINT_TOLD_USERS", 300)
    running = await start_service(checkpoint_every_s=3600, checkpoint_every_events=10**9)
    await publish_events(nc.jetstream(), events)
    await eventually(lambda: running.service.store.applied == len(events), timeout=30)
    if dropped:
        async def deaf_once() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass  # dropped, as Python 3.11's wait_for drops one that comes with the answer (gh-86296)
            await asyncio.Event().wait()

        running.service.background.start(deaf_once(), name="a loop dropping its cancellation")
    assert running.service.store.dirty_count == 300, "no checkpoint yet: the stop's saves every user"
    caplog.set_level(logging.INFO, logger="tipstream")
    await running.stop()
    stopping = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping: ")]
    told = [line for line in stopping
            if line.startswith(("stopping: writing a last checkpoint", "stopping: last checkpoint written in "))]
    assert told[0] == ("stopping: writing a last checkpoint of the 300 users changed since the previous one (a "
                       "catch-up changes them all: a million take a minute or two)"), stopping
    assert len(told) == 2 and told[1].startswith("stopping: last checkpoint written in "), stopping
    if dropped:
        assert "stopping: a loop dropping its cancellation went on after being cancelled; cancelling again" in stopping, \
            stopping


async def checkpointed_with_a_damaged_row(start_service, nc, database_url: str) -> bytes:
    """Two users checkpointed, then the row of `u-bad` cut short (as a disk fault or a hand's UPDATE leaves it);
    its bytes as damaged."""
    first = await start_service(database_url=database_url)
    await publish_events(nc.jetstream(), [opened(i, user, "2026-11-26T08:00:00+01:00")
                                          for user in ("u-bad", "u-good") for i in range(3)])
    await eventually(lambda: first.service.store.applied == 6, timeout=30)
    await first.stop()
    damaged = first.service.store.users["u-bad"].to_bytes()[:-5]
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("update user_state set state = :state where user_id = 'u-bad'"), {"state": damaged})
    finally:
        engine.dispose()
    return damaged


def row_of(database_url: str, user_id: str) -> bytes:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return bytes(conn.execute(sa.text("select state from user_state where user_id = :u"), {"u": user_id})
                         .scalar_one())
    finally:
        engine.dispose()


def told_the_fix(fatal: str | None) -> bool:
    return (fatal is not None and fatal.startswith("The user_state row of user 'u-bad' cannot be read (not a user "
                                                   "state: ") and "DELETE FROM user_state WHERE user_id = 'u-bad'" in fatal
            and "'Rebuilding from the log'" in fatal)


async def test_a_damaged_user_state_row_stops_the_warm_up_naming_the_user_and_the_fix(
        start_service, nc, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The warm-up read a row it could not decode as the database away: it tried again every 30 s for good,
    logging 'could not load the checkpointed users (error: unpack requires ...)', and /readyz stayed 503. A row
    cut short in a log's last records was not even noticed: the user was served a wrong state. The service stops
    with one line naming the user and what to do, and leaves the row as it is."""
    damaged = await checkpointed_with_a_damaged_row(start_service, nc, database_url)
    caplog.set_level(logging.WARNING, logger="tipstream")
    second = await start_service(database_url=database_url)
    service = second.service
    await eventually(lambda: service.fatal is not None, timeout=20)
    assert told_the_fix(service.fatal), service.fatal
    warm_up = next(task for task in service.background.tasks if task.get_name() == "warm-up")
    await eventually(warm_up.done, timeout=5)
    assert warm_up.exception() is None, "ended as told, not as a bug"
    assert "could not load the checkpointed users" not in caplog.text
    assert "u-bad" in service.store.cold or "u-bad" in service.store.dormant
    await second.stop()
    assert row_of(database_url, "u-bad") == damaged, "the stop saved nothing over it"


async def test_a_damaged_user_state_row_read_for_a_request_answers_503_and_stops_the_service(
        start_service, nc, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read on demand (before the warm-up, or an idle user), the undecodable row raised out of the read: a 500 for
    the user's features."""
    import app.bootstrap

    await checkpointed_with_a_damaged_row(start_service, nc, database_url)

    async def not_yet(*_: Any) -> None:  # the user is still cold when asked for
        await asyncio.Event().wait()

    monkeypatch.setattr(app.bootstrap, "warm_up", not_yet)
    second = await start_service(database_url=database_url)
    service = second.service
    async with second.http() as http:
        assert (await http.get("/users/u-good/features")).status_code == 200
        answer = await http.get("/users/u-bad/features")
    assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
    assert told_the_fix(service.fatal), service.fatal
    assert service.store.in_checkpoint_only("u-bad")
    await second.stop()


async def test_a_damaged_user_state_row_read_for_an_event_keeps_the_event_and_stops_the_service(
        start_service, nc, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event of the user read their row, which raised out of the fold: the event went to the DLQ as a bug's,
    lost from their state, and so did each of theirs after."""
    import app.bootstrap

    await checkpointed_with_a_damaged_row(start_service, nc, database_url)

    async def not_yet(*_: Any) -> None:  # the user is still cold when their event comes
        await asyncio.Event().wait()

    monkeypatch.setattr(app.bootstrap, "warm_up", not_yet)
    second = await start_service(database_url=database_url)
    service = second.service
    await publish_events(nc.jetstream(), [opened(3, "u-bad", "2026-11-27T08:00:00+01:00")])
    await eventually(lambda: service.fatal is not None, timeout=20)
    assert told_the_fix(service.fatal), service.fatal
    assert (await nc.jetstream().stream_info("DLQ")).state.messages == 0
    assert service.store.positions["SIGNALS"] == 6 and service.store.in_checkpoint_only("u-bad")
    await second.stop()
