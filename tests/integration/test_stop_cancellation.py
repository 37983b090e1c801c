"""The stop cancels the service's loops, and each ends: a loop that swallowed the cancellation kept
running, and the stop, which waits for them all, never ended (nor the process, whatever signal came next)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from app import migrate
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoints import Checkpointer
from app.db import make_engine
from app.decision_publisher import DecisionPublisher
from app.erasure import Eraser
from app.ingest import StreamIngest
from app.service_lock import holder
from streams import jetstream as jsx
from streams import pull
from streams.events import parse_event
from streams.jetstream import publish_events
from streams.scrub import scrub
from streams.store import OnlineStore
from tests.conftest import eventually, reset_postgres, wait_stopped
from tests.integration.ingest_support import cancelled, stop_reading
from tests.integration.test_ingest_recovery import Checkpoints
from tests.integration.test_nats_server_checks import _started_with_limits_held

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


async def _cancelled_as_it_wakes(task: asyncio.Task[None]) -> bool:
    """Cancel `task` one turn of the loop after what it waits for has come: the event's waiter has ended,
    and `task` is not running yet (Python 3.11's `asyncio.wait_for` returned the result then, and dropped
    the cancellation). Whether it ended, cancelled, within 2 s."""
    await asyncio.sleep(0)
    return await _ends_cancelled(task)


async def _ends_cancelled(task: asyncio.Task[None]) -> bool:
    """Cancel `task`; whether it ended, cancelled, within 2 s."""
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    if not task.done():
        task.cancel()  # not ours to leave running
        await asyncio.wait({task}, timeout=2)
        return False
    return task.cancelled()


async def test_the_checkpointer_cancelled_as_it_is_woken_ends(tmp_path: Path) -> None:
    """At a stop, ingest's last chunk wakes the checkpointer (`nudge`) as the stop cancels it: it went on
    to a checkpoint of its own, then waited for the next, for ever."""
    url = f"sqlite:///{tmp_path / 'tipstream.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    store = OnlineStore()
    checkpointer = Checkpointer(store, SqlCheckpointStore(engine), every_events=1, every_s=60)
    running = asyncio.create_task(checkpointer.run())
    await asyncio.sleep(0)  # waiting to be woken
    store.apply(parse_event(orjson.dumps({"id": "e-1", "type": "app.opened", "user_id": "u-1",
                                          "ts": NOW.isoformat(), "v": 1, "data": {}})))
    checkpointer.nudge()
    try:
        assert await _cancelled_as_it_wakes(running)
    finally:
        engine.dispose()


async def test_the_checkpointer_cancelled_while_it_asks_a_database_that_hangs_ends_and_leaves_the_stop_no_wait(
        ) -> None:
    """Waiting to retry during an outage, the checkpointer asks in a thread whether the database is back (`reachable`).
    A database that accepts and never answers holds that thread up to libpq's connect_timeout (10 s): the stop's
    cancel must not wait for it, nor the stop's wait for thread work (`ThreadWork.ended`), as it must for a write.
    The probe writes nothing that could land after the stop lets go of the database."""
    import threading

    from sqlalchemy.exc import OperationalError

    from app.checkpoint_stores import MemoryCheckpointStore

    store = OnlineStore()
    store.apply(parse_event(orjson.dumps({"id": "e-1", "type": "app.opened", "user_id": "u-1",
                                          "ts": NOW.isoformat(), "v": 1, "data": {}})))
    target, probing, answers = MemoryCheckpointStore(), threading.Event(), threading.Event()

    def save(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("INSERT INTO user_state", None, Exception("connection refused"))

    def reachable() -> bool:  # the database hangs until `answers` is set
        probing.set()
        return answers.wait(30)

    target.save, target.reachable = save, reachable  # type: ignore[method-assign]
    checkpointer = Checkpointer(store, target, every_events=1, every_s=0.01)
    running = asyncio.create_task(checkpointer.run())
    try:
        await eventually(probing.is_set)
        assert await _ends_cancelled(running)
        assert await checkpointer.threads.ended(0.1) == []
    finally:
        answers.set()


async def test_the_decision_publisher_cancelled_as_a_decision_comes_ends() -> None:
    """The stop cancels the publisher after its flush: a decision served meanwhile wakes it."""
    publisher = DecisionPublisher(lambda: None, queue_max=10, batch=10, window=10)
    running = asyncio.create_task(publisher.run())
    await asyncio.sleep(0)
    assert publisher.offer("decisions.score", "d-1", b"{}")
    assert await _cancelled_as_it_wakes(running)


def _waits_in(task: asyncio.Task[Any], name: str) -> bool:
    """Whether `task` waits in a coroutine function called `name`, at any depth."""
    coro: Any = task.get_coro()
    while hasattr(coro, "cr_code"):
        if coro.cr_code.co_name == name:
            return True
        coro = coro.cr_await
    return False


async def test_the_decision_publisher_cancelled_as_it_writes_to_a_server_that_reads_nothing_ends(nats_server) -> None:
    """The publisher hands its decisions to nats-py, whose flush, with more than its `pending_size` (2 MB) not written
    yet, waits for its writer, which waits for the server to read, and swallows a cancellation there (`except
    CancelledError: pass`), every one, not in a race: with a server that reads nothing (stalled, or a hung node), the
    stop's cancellation was lost, the publisher went on for good, and the stop, which waits for it before anything
    else, waited for ever. Here the server is stopped (SIGSTOP) and sent decisions until the publisher waits so, and
    cancelled."""
    nc = await pull.connect(nats_server.url)
    publisher = DecisionPublisher(lambda: nc, queue_max=1000, batch=16, window=1000)
    await publisher.start()
    nats_server.process.send_signal(signal.SIGSTOP)
    task: asyncio.Task[None] | None = None
    try:
        wait_stopped(nats_server.process.pid)
        for n in range(200):  # 40 MB: past what the sockets hold, and nats-py's 2 MB on top
            assert publisher.offer("decisions.score", f"d-{n}", b"x" * 200_000)
        task = asyncio.create_task(publisher.run())
        socket = nc._transport._io_writer.transport  # bytes left in it: the server's socket takes no more
        await eventually(lambda: _waits_in(task, "_flush_pending") and socket.get_write_buffer_size(), timeout=10)
        assert await _ends_cancelled(task), "the publisher went on after its cancellation"
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
        await cancelled(task)
        await nc.close()


@pytest.mark.parametrize(("loop", "name"), [(Checkpointer, "checkpointer"), (DecisionPublisher, "decision publisher")])
async def test_the_stop_ends_though_a_loop_goes_on_after_its_cancellation(start_service, monkeypatch, caplog, loop,
                                                                          name) -> None:
    """A cancellation can still be dropped where the service does not wait itself: nats-py waits for
    JetStream's answers with 3.11's `asyncio.wait_for`, and its flush swallows one. Here a loop drops one, as a loop
    asking JetStream then did. The stop waited for it for ever; it now cancels it again. The decision publisher, which
    the stop cancels first, on its own, was waited for for ever still."""
    dropped: list[str] = []
    run = loop.run

    async def deaf_once(self: Any) -> None:
        try:
            await run(self)
        except asyncio.CancelledError:
            dropped.append(name)
            await run(self)

    monkeypatch.setattr(loop, "run", deaf_once)
    running = await start_service()
    stopping = asyncio.ensure_future(running.stop())
    await asyncio.wait({stopping}, timeout=15)
    if not stopping.done():  # not ours to leave running: the test fails below
        next(t for t in running.service.background.tasks if t.get_name() == name).cancel()
        await stopping
        raise AssertionError("the stop waited for a task that went on after its cancellation")
    assert dropped == [name]
    assert f"stopping: {name} went on after being cancelled; cancelling again" in caplog.text


def _user_features_writes_waiting(url: str) -> int:
    """Statements on user_features waiting for a lock, in the database at `url`."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' "
                "and query ilike '%user_features%'")).scalar_one()
    finally:
        engine.dispose()


def _has_row(url: str, user_id: str) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("select count(*) from user_features where user_id = :u"),
                                {"u": user_id}).scalar_one() == 1
    finally:
        engine.dispose()


async def test_the_stop_waits_for_a_user_features_write_under_way_before_letting_go_of_the_database(
        start_service, nc, postgres_url, caplog) -> None:
    """The stop cancels the offline writer's pass; its write goes on in a worker thread. Held up (here by a
    lock on the table; in life, the database slow), it committed after the stop had let go of the database
    lock, over the rows of whichever service took the database next."""
    caplog.set_level(logging.INFO, logger="tipstream")
    reset_postgres(postgres_url)
    running = await start_service(database_url=postgres_url, checkpoint_every_s=0.2, offline_features_every_s=0.2)
    js = nc.jetstream()

    def opened(event_id: str) -> tuple[str, dict[str, object]]:
        return "signals.app.opened", {"id": event_id, "type": "app.opened", "user_id": "u-1", "ts": NOW.isoformat(),
                                      "data": {}}

    await publish_events(js, [opened("e-1")])
    await eventually(lambda: _has_row(postgres_url, "u-1"), timeout=15)
    locker = sa.create_engine(postgres_url)
    conn = locker.connect()
    try:
        conn.execute(sa.text("lock table user_features in exclusive mode"))  # reads go on, writes wait
        await publish_events(js, [opened("e-2")])
        await eventually(lambda: _user_features_writes_waiting(postgres_url), timeout=15)
        stopping = asyncio.ensure_future(running.stop())
        await eventually(lambda: "a user_features write in worker threads" in caplog.text or stopping.done(),
                         timeout=20)
        assert not stopping.done(), "the stop ended, its write still to commit"
        assert holder(postgres_url) is not None, "the database lock let go of before the write ended"
    finally:
        conn.rollback()
        conn.close()
        locker.dispose()
    await asyncio.wait_for(stopping, 30)
    # The lock goes with its session, whose backend ends after the client's close returns.
    await eventually(lambda: holder(postgres_url) is None)
    assert not _user_features_writes_waiting(postgres_url)


async def _cancelled_as_the_answer_comes(server: Any, nc: Any, task: asyncio.Task[Any],
                                        asking: Callable[[], Awaitable[set[str]]], what: str) -> None:
    """Stop `server` (SIGSTOP) and have `task` ask it (`asking`: the tokens of nats-py's requests waiting before
    `task`'s); cancel `task` as the answer to its request comes, once the server goes on (SIGCONT); it (`what`) has
    ended, cancelled, within 3 s."""
    server.process.send_signal(signal.SIGSTOP)
    try:
        wait_stopped(server.process.pid)  # every thread: it may answer until then
        waiting_before = await asking()

        def awaited_answer() -> asyncio.Future[Any] | None:  # nats-py waits on it (its wait_for's callback is on it)
            return next((future for token, future in nc._resp_map.items()
                         if token not in waiting_before and future._callbacks), None)

        answer = await eventually(awaited_answer, timeout=5)
        answer.add_done_callback(lambda _: task.cancel())
    finally:
        server.process.send_signal(signal.SIGCONT)
    await asyncio.wait({task}, timeout=3)
    assert task.done(), f"{what} went on after its cancellation"
    assert task.cancelled()


def _let_go_once_stopped(server: Any, nc: Any, go: asyncio.Event) -> Callable[[], Awaitable[set[str]]]:
    """`_cancelled_as_the_answer_comes`'s `asking` for a task held at `go` as it is about to ask: let go once `server`
    is stopped."""

    async def asking() -> set[str]:
        wait_stopped(server.process.pid)  # not yielding: the task asks once the server is stopped
        go.set()
        return set(nc._resp_map)

    return asking


async def test_the_decisions_tail_cancelled_as_its_stream_s_answer_comes_ends(start_service, nats_server) -> None:
    """The DECISIONS tail asks the stream for its last sequence every tick, through nats-py, whose requests wait with
    Python 3.11's `wait_for`: a cancellation that comes with the answer was dropped, the tail went on, and the stop
    waited `background.STOP_CANCEL_AGAIN_S` to cancel it again. Here the server is stopped (SIGSTOP) with the tail's
    request on its way, and the tail is cancelled as the answer comes, once the server goes on."""
    running = await start_service()
    service = running.service
    tail = service.decision_tail
    assert tail is not None
    await eventually(lambda: tail.following, timeout=30)
    task = next(t for t in service.background.tasks if t.get_name() == "decisions tail")
    nc, last_seq = service.nc, tail.stream_last_seq
    waiting_before: set[str] = set()
    asked = asyncio.Event()

    async def asking() -> int:
        waiting_before.update(nc._resp_map)
        asked.set()
        return await last_seq()

    async def tail_asking() -> set[str]:
        tail.stream_last_seq = asking
        await eventually(asked.is_set, timeout=5)
        return waiting_before

    await _cancelled_as_the_answer_comes(nats_server, nc, task, tail_asking, "the tail")


async def test_a_held_ingest_cancelled_as_the_consumer_s_answer_comes_ends(nats_server) -> None:
    """Ingest held (checkpoints behind) asks the consumer for the lag every `LagWatch.held_every_s`, through
    nats-py, whose requests wait with Python 3.11's `wait_for`: a cancellation that came with the answer was dropped,
    and the hold went on (the stop waited `background.STOP_CANCEL_AGAIN_S` to cancel it again). Here the server is
    stopped (SIGSTOP) with the ask on its way, and ingest is cancelled as the answer comes, once the server goes on."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    checkpoints = Checkpoints()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), checkpoints, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=1)
    ingest.lag_watch.held_every_s = 0.1
    await ingest.start()
    task = asyncio.create_task(ingest.run())
    try:
        checkpoints.uncheckpointed = 1  # the database is away: ingest holds after the next chunk
        await publish_events(js, [("signals.app.opened", {"id": "e-1", "type": "app.opened", "user_id": "u-1",
                                                          "ts": "2026-11-26T08:00:00Z", "v": 1, "data": {}})])
        await eventually(lambda: ingest.puller is not None and ingest.puller.paused, timeout=10)
        async def held_asking() -> set[str]:  # the hold asks every 0.1 s: a new request soon
            return set(nc._resp_map)

        await _cancelled_as_the_answer_comes(nats_server, nc, task, held_asking, "the hold")
    finally:
        await stop_reading(ingest, nc, task)


async def test_ingest_cancelled_as_the_stream_s_answer_on_a_hole_comes_ends(nats_server) -> None:
    """A chunk that passes over a sequence has ingest ask the stream whether it holds a message there
    (`_skips_stored`, `jsx.next_stored`), through nats-py, whose requests wait with Python 3.11's `wait_for`: a
    cancellation that came with the answer was dropped, and ingest went on (the stop waited
    `background.STOP_CANCEL_AGAIN_S` to cancel it again). Here the stream's message 2 is deleted, ingest is handed 1
    and 3 before it runs, the server is stopped (SIGSTOP) with its ask on its way, and ingest is cancelled as the
    answer comes, once the server goes on."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await publish_events(js, [("signals.app.opened", {"id": f"e-{n}", "type": "app.opened", "user_id": "u-1",
                                                      "ts": "2026-11-26T08:00:00Z", "v": 1, "data": {}})
                              for n in (1, 2, 3)])
    await js.delete_msg(jsx.SIGNALS.name, 2)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=1000)
    await ingest.start()
    task: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: len(ingest.buffer) == 2, timeout=10)
        task = asyncio.create_task(ingest.run())  # runs once the server is stopped, and asks it of the hole

        async def asking() -> set[str]:
            wait_stopped(nats_server.process.pid)  # not yielding: asked of a server still going, it was answered
            return set(nc._resp_map)

        await _cancelled_as_the_answer_comes(nats_server, nc, task, asking, "ingest")
    finally:
        await stop_reading(ingest, nc, task)


async def test_ingest_cancelled_as_the_answer_on_a_deleted_dlq_comes_ends(nats_server) -> None:
    """A dead letter no stream takes (the DLQ deleted) has ingest make the streams again (`ensure_streams`), asking
    the server through nats-py, whose requests wait with Python 3.11's `wait_for`: a cancellation that came with an
    answer was dropped, and ingest went on (the stop waited `background.STOP_CANCEL_AGAIN_S` to cancel it again).
    Here ingest is held as it is about to make them, the server is stopped (SIGSTOP), ingest let go, and cancelled as
    the answer to its first ask comes, once the server goes on."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    limits: dict[str, Any] = {"max_age_days": 1, "max_bytes": -1, "duplicate_window_s": 120, "dlq_max_age_days": 1}
    await jsx.ensure_streams(js, **limits)
    await js.delete_stream(jsx.DLQ.name)
    await js.publish("signals.app.opened", b'{"id": "broken", ')
    reached, go = asyncio.Event(), asyncio.Event()

    async def ensure_streams() -> None:
        reached.set()
        await go.wait()
        await jsx.ensure_streams(js, **limits)

    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=1000, ensure_streams=ensure_streams)
    await ingest.start()
    task = asyncio.create_task(ingest.run())
    try:
        await eventually(reached.is_set, timeout=10)
        await _cancelled_as_the_answer_comes(nats_server, nc, task, _let_go_once_stopped(nats_server, nc, go), "ingest")
    finally:
        await stop_reading(ingest, nc, task)


@pytest.mark.parametrize(("work", "call"), [("scrub", "stream_info"), ("scrub", "add_consumer"),
                                            ("scrub", "delete_consumer"), ("scrub", "get_msg"), ("bounds", "stream_info")])
async def test_the_erasures_cancelled_as_an_answer_comes_end(nats_server, monkeypatch, work, call) -> None:
    """The erasures' task reads the streams' last sequences, its bounds (`Eraser._ends`), and scrubs the streams
    (`streams.scrub`): it asks for a stream's bounds (`stream_info`), makes a consumer to read it (`add_consumer`) and
    removes it after (`delete_consumer`), and reads the original of a DLQ copy cut before its user's id (`get_msg`),
    through nats-py, whose requests wait with Python 3.11's `wait_for`: a cancellation that came with the answer was
    dropped, and the task went on (the stop waited `background.STOP_CANCEL_AGAIN_S` to cancel it again). Here it is
    held as it is about to ask (`call`), the server is stopped (SIGSTOP), the task let go, and cancelled as the answer
    comes, once the server goes on."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    body = orjson.dumps({"id": "e-1", "type": "app.opened", "ts": "2026-11-26T08:00:00Z", "v": 1, "data": {},
                         "user_id": "u-1"})
    seq = (await js.publish("signals.app.opened", body)).seq
    await js.publish("dlq.signals.app.opened", body[: body.index(b'"user_id"')], headers={
        jsx.DLQ_REASON: "test", jsx.DLQ_TRUNCATED: str(len(body)), jsx.DLQ_STREAM: jsx.SIGNALS.name,
        jsx.DLQ_SEQ: str(seq)})
    asked = getattr(js, call)
    reached, go = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await go.wait()
        return await asked(*args, **kwargs)

    monkeypatch.setattr(js, call, held)
    if work == "scrub":
        task = asyncio.create_task(scrub(js, jsx.DLQ.name, frozenset({"u-1"}), 10**9))
    else:  # only its NATS is used
        eraser = Eraser(None, OnlineStore(), None, checkpoint=None, lock=asyncio.Lock(), js=js)
        task = asyncio.create_task(eraser._ends())
    try:
        await eventually(reached.is_set, timeout=10)
        await _cancelled_as_the_answer_comes(nats_server, nc, task, _let_go_once_stopped(nats_server, nc, go),
                                             f"the erasures' {work} ({call})")
    finally:
        await cancelled(task)
        await nc.close()


@pytest.mark.parametrize("step", ["_read_past", "_ensure_streams"])
async def test_the_stream_limits_task_cancelled_as_an_answer_comes_ends(start_service, nats_server, monkeypatch,
                                                                         step) -> None:
    """A start that held smaller stream limits runs a task that sets them once every stream is read: it asks each
    stream for its last sequence (`_read_past`), then sets the limits (`_ensure_streams`), through nats-py, whose
    requests wait with Python 3.11's `wait_for`: a cancellation that came with the answer was dropped, and the task
    went on (the stop waited `background.STOP_CANCEL_AGAIN_S` to cancel it again). Here the task is held as it is
    about to ask (`step`), the server is stopped (SIGSTOP), the task let go, and cancelled as the answer comes, once
    the server goes on. The service's other loops ask the server too: the requests waiting as it asks are left out."""
    client, running, _, _ = await _started_with_limits_held(start_service, nats_server, monkeypatch)
    service = running.service
    nc, asks = service.nc, getattr(service, step)
    reached, go, asked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    waiting_before: set[str] = set()

    async def held(*args: Any) -> Any:
        reached.set()
        await go.wait()
        waiting_before.update(nc._resp_map)  # its request is made in this turn of the loop, none other's before it
        asked.set()
        return await asks(*args)

    monkeypatch.setattr(service, step, held)
    task = asyncio.create_task(service._lower_stream_limits_once_read(service._read_to_end))
    try:
        await eventually(reached.is_set, timeout=10)

        async def asking() -> set[str]:
            await _let_go_once_stopped(nats_server, nc, go)()
            await eventually(asked.is_set, timeout=5)
            return waiting_before

        await _cancelled_as_the_answer_comes(nats_server, nc, task, asking, f"the stream limits' task ({step})")
    finally:
        await cancelled(task)
        await client.close()
