"""The ingest loop against a real nats-server when things go wrong: a consumer re-created
with deliveries in flight, a user's state that cannot be loaded yet, a hold that outlives its
puller (app/ingest.py, streams/jetstream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from app.checkpoint_stores import MemoryCheckpointStore
from app.checkpoints import Checkpointer
from app.decisions import decode_decision
from app.ingest import StreamIngest
from app.metrics import METRICS
from streams import ack_subject, dead_letters, pull
from streams import jetstream as jsx
from streams.events import parse_event
from streams.fold import UserState
from streams.store import OnlineStore, StateUnavailable
from tests.conftest import dead_lettered, eventually, wait_stopped
from tests.integration.ingest_support import cancelled, stop_reading

EVENTS = 3000


class Checkpoints:
    """What ingest reads of the checkpointer: how far behind it is."""

    uncheckpointed = 0

    def nudge(self) -> None:
        pass

    def wanted(self) -> None:
        pass

    def forget_stored(self, stream: str) -> None:
        pass

    async def wait_to_retry(self, seconds: float, pause: Callable[[float], Awaitable[None]]) -> None:
        await pause(seconds)  # as a database that answers: the whole wait

    def behind_because(self) -> str:
        return "checkpoints fail"


def refusal_waits(lines: list[str]) -> list[str]:
    """The wait each refusal's line names ("retrying in 0.1s"), before what it says to do."""
    return [re.search(r"retrying in ([0-9.]+s)", line).group(1) for line in lines]


async def seeded(nats_server: Any, users: int = 50) -> tuple[Any, Any]:
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    pad = "x" * 3000  # large messages: a pull's batch is still arriving when the consumer is reset
    await jsx.publish_events(js, [("signals.app.opened", {
        "id": f"e{i}", "type": "app.opened", "user_id": f"u{i % users}", "ts": "2026-11-26T08:00:00Z", "pad": pad})
        for i in range(1, EVENTS + 1)])
    return nc, js


async def fold_all(ingest: StreamIngest, store: OnlineStore) -> list[int]:
    """Process what arrives until the stream is folded; the first sequence of each chunk."""
    firsts = []
    while store.positions.get("SIGNALS", 0) < EVENTS:
        await eventually(lambda: ingest.buffer)  # the deliveries
        chunk, ingest.buffer = ingest.buffer[:256], ingest.buffer[256:]
        firsts.append(ack_subject.stream_sequence(chunk[0][1])[0])
        assert firsts[-1] == store.positions.get("SIGNALS", 0) + 1, "a chunk skips ahead of the position"
        await ingest.process(chunk)
    return firsts


async def test_a_consumer_reset_with_deliveries_in_flight_folds_each_event_once_and_in_order(nats_server) -> None:
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=1024, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    await ingest.start()
    # Part of the first pull's batch is in; the rest is on its way (looked at every turn, to be in time).
    await eventually(lambda: len(ingest.buffer) >= 300, interval=0)
    first, ingest.buffer = ingest.buffer[:100], ingest.buffer[100:]
    await ingest.process(first)
    await ingest._restart_consumer()  # what a reconnect does: replay from position + 1
    await fold_all(ingest, store)
    # Before, the old pull's late deliveries (from ~347 on) were folded first: the position
    # jumped past 101..346, and their replay was then ignored as already seen.
    assert (store.applied, store.ignored) == (EVENTS, 0)
    await ingest.stop()
    await nc.close()


def with_u3_cold(store: OnlineStore, away: Callable[[list[list[str]]], bool]) -> list[list[str]]:
    """u3 is checkpointed and not loaded yet; loading it fails while `away(failures so far)`. The failures."""
    store.cold = {"u3"}
    failures: list[list[str]] = []

    def fetch_cold(users: list[str]) -> dict[str, bytes]:
        if away(failures):
            failures.append(users)
            raise ConnectionError("the database is away")
        return {"u3": UserState().to_bytes()}

    store.fetch_cold = fetch_cold
    return failures


def _counts() -> tuple[float, float]:
    """SIGNALS' applied and ignored counters (tipstream_events_*_total)."""
    return METRICS.ingested.labels("SIGNALS")._value.get(), METRICS.ignored.labels("SIGNALS")._value.get()


async def test_a_user_state_that_cannot_be_loaded_yet_holds_the_stream_until_it_can(nats_server) -> None:
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    failures = with_u3_cold(store, lambda failures: len(failures) < 2)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=512, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    counted = _counts()
    await ingest.start()
    running = asyncio.create_task(ingest.run())

    def folded() -> bool:
        assert not running.done(), running  # before, the loop ended on the first failure, for good
        return store.positions.get("SIGNALS", 0) >= EVENTS

    await eventually(folded, timeout=30)
    assert (len(failures), store.applied, "u3" in store.cold) == (2, EVENTS, False)
    # The chunk is folded again after each failure: its events before u3's first (at most e1 and
    # e2, by where the chunk starts) are seen again, and only those.
    assert store.ignored <= 2 * 2
    # Each event is counted once, as applied: those seen again are not duplicates of the stream's.
    # Before, the metric counted e1 and e2 as ignored after each failure.
    assert [now - before for now, before in zip(_counts(), counted, strict=True)] == [EVENTS, 0]
    await stop_reading(ingest, nc, running)


async def test_a_hold_ends_quietly_when_the_puller_went_away_meanwhile(nats_server) -> None:
    nc, js = await seeded(nats_server)
    checkpoints = Checkpoints()
    checkpoints.uncheckpointed = 10
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), checkpoints, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10)
    await ingest.start()
    hold = asyncio.create_task(ingest._hold_if_checkpoints_lag())  # the database is away: ingest holds
    await asyncio.sleep(0)
    await ingest.pause_reading()  # the DECISIONS tail stops reading: no puller any more
    checkpoints.uncheckpointed = 0  # a checkpoint succeeds
    await hold  # before: AttributeError, 'NoneType' object has no attribute 'resume'
    assert ingest.puller is None
    await ingest.stop()
    await nc.close()


@pytest.mark.parametrize("bound", [1, 20])
async def test_a_hold_asks_for_the_checkpoint_it_waits_for(nats_server, bound: int, caplog, monkeypatch) -> None:
    """TIPSTREAM_MAX_UNCHECKPOINTED_EVENTS under TIPSTREAM_CHECKPOINT_EVERY_EVENTS: each hold waited for the next
    timed checkpoint (every 5 s by default, here never), one batch a stream between two, and a start's read-back
    of DECISIONS never caught up with its publishers. And a bound of 1, halved to 0, held for good. Holds are
    brief now, and many: a few lines a minute tell them. Each looks again every 20 ms here, not 200: the 47
    holds took 10 s."""
    from app import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "HOLD_RECHECK_S", 0.02)
    caplog.set_level(logging.WARNING, logger="tipstream.ingest")
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    checkpointer = Checkpointer(store, MemoryCheckpointStore(), every_events=10**9, every_s=3600)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, checkpointer, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=bound)
    await ingest.start()
    tasks = [asyncio.create_task(checkpointer.run()), asyncio.create_task(ingest.run())]
    await eventually(lambda: store.positions.get("SIGNALS") == EVENTS, timeout=30)
    assert store.applied == EVENTS and checkpointer.failures == 0
    assert 1 <= caplog.text.count("pausing SIGNALS") <= 6, caplog.text
    await stop_reading(ingest, nc, *tasks)


async def test_ingest_holds_while_its_own_backlog_waits_for_a_checkpoint(nats_server, caplog) -> None:
    """The DECISIONS ingest adds a tip_scores row per decision read back and folds no event, so the
    bound on events not checkpointed never held it: with the database away, another publisher's
    decisions (or a rebuild's read-back) piled up rows in memory without end."""
    nc, js = await seeded(nats_server)
    rows = [0]
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10**6, backlog=lambda: rows[0], max_backlog=10)
    await ingest.start()
    await ingest._hold_if_checkpoints_lag()  # under the bound: no hold
    assert not ingest.puller.paused
    rows[0] = 10  # the database is away: rows wait
    hold = asyncio.create_task(ingest._hold_if_checkpoints_lag())
    for _ in range(5):
        await asyncio.sleep(0)
    assert ingest.puller.paused and not hold.done()
    rows[0] = 5  # half the bound: still held
    for _ in range(5):
        await asyncio.sleep(0)
    assert not hold.done()
    rows[0] = 4  # a checkpoint wrote most of them
    await asyncio.wait_for(hold, 5)
    assert not ingest.puller.paused
    ingest.max_backlog, rows[0] = 1, 1  # one row, counted in the singular: it read '1 rows waiting'
    with caplog.at_level(logging.WARNING, logger="tipstream.ingest"):
        hold = asyncio.create_task(ingest._hold_if_checkpoints_lag())
        await eventually(lambda: "0 events not checkpointed yet, 1 row waiting (at most 1): " in caplog.text)
        rows[0] = 0
        await asyncio.wait_for(hold, 5)
    assert "0 events not checkpointed yet, 10 rows waiting (at most 10): " in caplog.text, caplog.text
    await ingest.stop()
    await nc.close()


async def test_what_ingest_holds_unfolded_is_bounded_in_bytes_and_it_reads_on_once_folded(nats_server) -> None:
    """Bounded by count only (max_ack_pending: 32 pull requests), a stream of events near NATS's 1 MB
    max_payload, each refused as oversized, was held 32,768 at a time: 32 GB in memory. Here: 3,000
    events of 3 kB arriving while none is folded, against a bound of 64 kB."""
    nc, js = await seeded(nats_server)
    store, bound, batch = OnlineStore(), 64_000, 64
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=batch, max_event_bytes=16384,
                          max_uncheckpointed=10**6, max_buffer_bytes=bound)
    await ingest.start()
    await eventually(lambda: ingest.puller.paused)
    await eventually(lambda: ingest.puller.requested == 0)  # what its requests still brought has come
    largest = max(len(data) for _, _, data in ingest.buffer)
    # Past the bound by what the requests out when it was reached brought, at most a batch.
    assert bound <= ingest.buffered_bytes <= bound + batch * largest, ingest.buffered_bytes
    assert ingest.buffered_bytes == sum(len(data) for _, _, data in ingest.buffer)
    held = len(ingest.buffer)
    assert held < EVENTS // 10, held
    # Folded, the rest is asked for, and every event is folded once.
    reading = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS") == EVENTS, timeout=30)
        assert store.applied == EVENTS and store.ignored == 0
    finally:
        await stop_reading(ingest, nc, reading)


async def test_events_near_the_largest_a_server_takes_each_come_though_a_request_holds_few(nats_server) -> None:
    """A pull request brings at most `pull.PULL_MAX_BYTES` (two of the server's largest messages at least):
    the server ends one whose next message does not fit (409), and that message comes in the next."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    large, count = nc.max_payload - 4096, 9
    await jsx.publish_events(js, [("signals.app.opened", {
        "id": f"e{i}", "type": "app.opened", "user_id": "u", "ts": "2026-11-26T08:00:00Z", "pad": "x" * large})
        for i in range(1, count + 1)])
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=64, max_event_bytes=nc.max_payload,
                          max_uncheckpointed=10**6, pull_max_bytes=0)
    await ingest.start()
    assert ingest.puller.max_bytes == 2 * nc.max_payload  # the least: two of them, and no more
    reading = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS") == count)
        assert store.applied == count
    finally:
        await stop_reading(ingest, nc, reading)


async def test_a_backlog_bound_of_one_row_ends_its_hold_once_the_row_is_written(nats_server) -> None:
    """TIPSTREAM_MAX_UNWRITTEN_DECISIONS=1: halved, the bound to read on under was 0, and DECISIONS held for good."""
    nc, js = await seeded(nats_server)
    rows = [1]
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10**6, backlog=lambda: rows[0], max_backlog=1)
    await ingest.start()
    hold = asyncio.create_task(ingest._hold_if_checkpoints_lag())
    await eventually(lambda: ingest.puller.paused)
    rows[0] = 0  # a checkpoint wrote it
    await asyncio.wait_for(hold, 5)
    assert not ingest.puller.paused
    await ingest.stop()
    await nc.close()


async def test_a_hold_behind_a_long_checkpoint_says_so_rather_than_blaming_the_database(nats_server, caplog) -> None:
    """A catch-up changes many users at once, and its checkpoints are long: ingest reached the bound and held
    with '(is the database away?)' while the database answered. The line now tells which of the two it is."""
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    in_write, release = threading.Event(), threading.Event()

    class SlowThenAway(MemoryCheckpointStore):
        away = False

        def save(self, *args: Any, **kwargs: Any) -> None:
            if self.away:
                raise ConnectionError("connection refused")
            in_write.set()
            release.wait(10)
            super().save(*args, **kwargs)

    target = SlowThenAway()
    checkpointer = Checkpointer(store, target, every_events=10**9, every_s=3600)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, checkpointer, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=3)
    await ingest.start()
    for i in range(3):  # one user's: counted in the singular, where the line read 'of 1 users'
        store.apply(parse_event(orjson.dumps({"id": f"h{i}", "type": "app.opened", "user_id": "u0",
                                              "ts": "2026-11-26T08:00:00Z"})))
    saving = asyncio.create_task(checkpointer.checkpoint())
    await asyncio.to_thread(in_write.wait, 10)
    with caplog.at_level(logging.WARNING, logger="tipstream.ingest"):
        hold = asyncio.create_task(ingest._hold_if_checkpoints_lag())
        await eventually(lambda: "3 events not checkpointed yet" in caplog.text)
        assert "the checkpoint in progress, of 1 user, has not committed yet" in caplog.text, caplog.text
        assert "database away" not in caplog.text
        release.set()
        assert await saving
        await asyncio.wait_for(hold, 5)

        caplog.clear()
        target.away = True
        store.apply(parse_event(orjson.dumps({"id": "h9", "type": "app.opened", "user_id": "u9",
                                              "ts": "2026-11-26T08:00:00Z"})))
        ingest.max_uncheckpointed = 1
        with pytest.raises(ConnectionError):
            await checkpointer.checkpoint()
        hold = asyncio.create_task(ingest._hold_if_checkpoints_lag())
        await eventually(lambda: "1 event not checkpointed yet: " in caplog.text)
        assert "checkpoints fail (ConnectionError: connection refused): is the database away?" in caplog.text
        hold.cancel()
    await ingest.stop()
    await nc.close()


async def test_a_replay_refuses_the_future_events_the_first_pass_refused(nats_server) -> None:
    """`future_ts` is judged against when JetStream stored the event, not against this server's
    clock: replayed a year later, an event stamped two days after it was stored is still refused
    (before, it was applied then, and a rebuild from the log differed from what was built live)."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=16, max_event_bytes=16384,
                          max_uncheckpointed=10**6, max_future_s=86_400)
    stored_ns = 1_764_140_400_000_000_000  # 2025-11-26T07:00:00Z

    def replayed(seq: int, ts: str) -> pull.RawMsg:
        body = orjson.dumps({"id": f"f{seq}", "type": "app.opened", "user_id": "u", "ts": ts})
        return "signals.app.opened", f"$JS.ACK.SIGNALS.ingest.1.{seq}.{seq}.{stored_ns + seq}.0".encode(), body

    await ingest.process([replayed(1, "2025-11-26T09:00:00Z"), replayed(2, "2025-11-28T09:00:00Z"),
                          replayed(3, "2025-11-27T06:59:00Z")])
    assert store.applied == 2 and store.users["u"].count("app.opened") == 2
    dlq = await js.pull_subscribe("dlq.>", stream="DLQ")
    [message] = await dlq.fetch(1, timeout=5)
    assert message.headers["Tipstream-Dlq-Kind"] == "future_ts" and b'"f2"' in message.data
    await nc.close()


async def test_a_refusal_that_lasts_is_retried_after_a_wait_that_doubles(nats_server, caplog) -> None:
    """With no stream for decisions.> (deleted, or a NATS that lost its store) every publish is
    refused (503 no responders). Before, each refusal was retried at once: ~7,000 times a second."""
    from app.decision_publisher import DecisionPublisher

    nc = await pull.connect(nats_server.url)
    publisher = DecisionPublisher(lambda: nc, queue_max=100, batch=4, window=10, ack_timeout_s=5)
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    publisher.offer("decisions.score", "d-1", b"{}")
    with caplog.at_level("WARNING", logger="tipstream.decisions"):
        assert not await publisher.flush(0.8)
        refusals = [r.getMessage() for r in caplog.records if "refused decision d-1" in r.getMessage()]
        assert refusal_waits(refusals[:3]) == ["0.1s", "0.2s", "0.4s"] and len(refusals) <= 4
        await jsx.ensure_streams(nc.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=120,
                                 dlq_max_age_days=1)  # the stream is back
        assert await publisher.flush(10) and publisher.published == 1
    assert publisher._refusal_wait == 0.0, "an acknowledgement ends the waiting"
    task.cancel()
    await nc.close()



async def test_one_refused_batch_waits_once_and_goes_back_in_order(nats_server, caplog) -> None:
    """The wait doubles from one round of sends to the next, not per decision refused: one refused
    batch of 8 took it to the ceiling at once, with a warning each; and the refused went back
    one at a time at the front, reversed."""
    from app.decision_publisher import DecisionPublisher

    nc = await pull.connect(nats_server.url)
    # No connection from the batch's refusal until the stream is made: the batch goes again 0.1 s after its refusal,
    # and made slower than that (a loaded machine), it was refused again, a second round waiting 0.2 s.
    made: list[bool] = []
    publisher = DecisionPublisher(lambda: nc if made or publisher.retried < 8 else None, queue_max=100, batch=8,
                                  window=8, ack_timeout_s=5)
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    with caplog.at_level("WARNING", logger="tipstream.decisions"):
        for i in range(8):
            publisher.offer("decisions.score", f"d-{i}", b"{}")
        await eventually(lambda: publisher.retried >= 8)  # no stream for decisions.>: the whole batch is refused
        js = nc.jetstream()
        await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
        made.append(True)
        assert await publisher.flush(2), "sent again after the first wait (0.1 s), not after 5 s"
    refusals = [r.getMessage() for r in caplog.records if "JetStream refused" in r.getMessage()]
    assert refusal_waits(refusals) == ["0.1s"], refusals
    stored = [(await js.get_msg("DECISIONS", seq)).headers["Nats-Msg-Id"] for seq in range(1, 9)]
    assert stored == [f"d-{i}" for i in range(8)]
    task.cancel()
    await nc.close()


async def publishing_to_small_messages(nats_server: Any,
                                       **options: Any) -> tuple[Any, Any, Any, Any, asyncio.Task[None]]:
    """A decision publisher running (`options`: its own) with DECISIONS' max_msg_size at 1 KB, as an operator's `nats
    stream edit` sets it; the connection, its JetStream context, DECISIONS' config before the edit, the publisher and
    its task."""
    import dataclasses

    from app.decision_publisher import DecisionPublisher

    nc = await pull.connect(nats_server.url)
    js = nc.jetstream()
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    config = (await js.stream_info("DECISIONS")).config
    await js.update_stream(dataclasses.replace(config, max_msg_size=1_024))
    publisher = DecisionPublisher(lambda: nc, **{"batch": 4, "window": 10, "ack_timeout_s": 5, **options})
    await publisher.start()
    return nc, js, config, publisher, asyncio.create_task(publisher.run())


async def test_decisions_held_for_a_refusal_no_wait_mends_count_against_the_queue_bound(nats_server) -> None:
    """Held aside (DECISIONS' max_msg_size below them: err_code 10054), decisions left the queue's count, and
    `offer` took new ones past TIPSTREAM_DECISION_QUEUE_MAX for as long as the bytes' bound allowed (256 MB): /score
    answered 200 while they piled up in memory, and a stop spooled many more than the bound says wait."""
    nc, _, _, publisher, task = await publishing_to_small_messages(nats_server, queue_max=3)
    large = b'{"pad": "' + b"x" * 2_000 + b'"}'
    for i in range(3):
        assert publisher.offer("decisions.score", f"d-{i}", large)
    await eventually(lambda: len(publisher.held) == 3)
    assert publisher.waiting == 3
    assert not publisher.offer("decisions.score", "d-3", b"{}"), "the bound counts those held"
    task.cancel()
    await nc.close()


async def test_a_queue_full_of_decisions_held_aside_answers_with_the_setting_to_fix_not_an_outage(nats_server) -> None:
    """Held aside (DECISIONS' max_msg_size below them), decisions filled the queue, and the 503 of every /score after
    said "is NATS reachable?", NATS being there: the operator looked for an outage while the fix was the setting
    their error line names. The 503 says how many are held, for which setting, and how to fix it; those waiting for
    NATS are told apart."""
    from app.decision_publisher import DecisionLogFull

    nc, _, _, publisher, task = await publishing_to_small_messages(nats_server, queue_max=3)
    for i in range(3):
        assert publisher.offer("decisions.score", f"d-{i}", b'{"pad": "' + b"x" * 2_000 + b'"}')
    await eventually(lambda: len(publisher.held) == 3)
    with pytest.raises(DecisionLogFull) as full:
        await publisher.put("decisions.score", "d-3", b"{}", timeout_s=0.1)
    told = str(full.value)
    assert "held aside until a limit is raised: 3 larger than DECISIONS takes" in told and "max_msg_size" in told, told
    assert "nats stream edit DECISIONS --max-msg-size=-1" in told and "NATS reachable" not in told, told
    task.cancel()
    await nc.close()


async def test_a_decision_held_for_max_msg_size_is_published_once_the_limit_is_raised_without_a_reconnect(
        nats_server, caplog) -> None:
    """Held aside for DECISIONS' max_msg_size (err_code 10054), a decision was sent again only at a reconnect or the
    next start: after `nats stream edit DECISIONS --max-msg-size=-1`, as its error line says, it stayed held (counted
    against TIPSTREAM_DECISION_QUEUE_MAX, a forget of its user waiting for it). Tried again every `held_retry_s`
    (30 s in the service): held again while refused, with one error line, then published once the limit is raised."""
    import dataclasses

    nc, js, config, publisher, task = await publishing_to_small_messages(nats_server, queue_max=10, held_retry_s=0.1)
    caplog.set_level(logging.ERROR, logger="tipstream.decisions")
    assert publisher.offer("decisions.score", "d-large", b'{"pad": "' + b"x" * 2_000 + b'"}')
    await eventually(lambda: publisher.retried >= 2 and [d for _, d, _ in publisher.held] == ["d-large"])
    told = [r.getMessage() for r in caplog.records if "d-large" in r.getMessage()]
    assert len(told) == 1 and "sent again every 0.1s" in told[0], told  # one line a minute, not one a try
    assert publisher.published == 0
    await js.update_stream(dataclasses.replace(config, max_msg_size=-1))
    await eventually(lambda: publisher.published == 1)
    assert publisher.held == [] and publisher.waiting == 0
    task.cancel()
    await nc.close()


@pytest.mark.parametrize("waiting", ["held", "refused"])
async def test_a_max_payload_raised_by_a_reload_of_the_server_is_taken_without_a_reconnect(
        tmp_path, caplog, waiting: str) -> None:
    """nats-server tells a connection its max_payload in its greeting only: raised by a configuration reload
    (`nats-server --signal reload`, which the hold's error line and the 413 ask for), it takes larger messages on
    the connections it has and tells them nothing. A decision held for the old limit (`held`: a start's spool) was
    sent again only at a reconnect, maybe never; /score refused a decision as large with a 413 (`refused`) until
    then. The server's greeting is read again every `held_retry_s` while one is held for it, or after a 413."""
    import signal

    from app.decision_publisher import DecisionLogFull, DecisionPublisher, DecisionTooLarge
    from tests.conftest import NatsServer

    config = tmp_path / "nats" / "limits.conf"
    config.parent.mkdir()
    jetstream = f'jetstream {{ store_dir: "{tmp_path / "nats"}" }}\n'  # in the file, as a reload reads it
    config.write_text("max_payload: 16KB\n" + jetstream)
    server = NatsServer(tmp_path / "nats", args=("-c", str(config)), jetstream_flags=False)
    server.start()
    nc = await pull.connect(server.url)
    try:
        await jsx.ensure_streams(nc.jetstream(), max_age_days=1, max_bytes=-1, duplicate_window_s=120,
                                 dlq_max_age_days=1)
        publisher = DecisionPublisher(lambda: nc, queue_max=1, batch=4, window=10, ack_timeout_s=5,
                                      held_retry_s=0.1)
        await publisher.start()
        task = asyncio.create_task(publisher.run())
        large = b'{"pad": "' + b"x" * 30_000 + b'"}'
        if waiting == "held":
            caplog.set_level(logging.ERROR, logger="tipstream.decisions")
            publisher.put_back([("decisions.score", "d-spooled", large)])
            await eventually(lambda: [d for _, d, _ in publisher.held] == ["d-spooled"])
            with pytest.raises(DecisionLogFull) as full:  # the queue's one place is the held one's
                await publisher.put("decisions.score", "d-small", b"{}", timeout_s=0.1)
            assert "1 larger than the NATS server takes in a message (its max_payload, 16,384 bytes: raise it in " \
                   "the server's configuration, a reload is taken within 0.1s)" in str(full.value), str(full.value)
        config.write_text("max_payload: 64KB\n" + jetstream)
        caplog.set_level(logging.INFO, logger="tipstream.decisions")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        if waiting == "refused":

            async def taken() -> bool:  # a client asking again after each 413
                try:
                    await publisher.put("decisions.score", "d-large", large, timeout_s=1)
                except DecisionTooLarge:
                    return False
                return True

            assert not await taken(), "the old limit until the server's greeting is read again"
            await eventually(taken)
        await eventually(lambda: publisher.published == 1, timeout=5)
        assert publisher.held == [] and publisher.waiting == 0 and publisher.max_payload == 65_536
        assert nc.stats["reconnects"] == 0 and nc.max_payload == 65_536, "taken on the same connection"
        told = [r.getMessage() for r in caplog.records if "d-spooled" in r.getMessage()]
        assert waiting == "refused" or "a reload does" in told[0], told
        taken_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the NATS server takes")]
        # One held, said in the singular (it read 'the 1 decisions held for it are sent').
        assert waiting == "refused" or taken_lines == [
            ("the NATS server takes messages of up to 65,536 bytes now (its max_payload, 16,384 before; a "
             "configuration reload): 1 decision held for it is sent")], taken_lines
        task.cancel()
    finally:
        await nc.close()
        server.stop()


async def test_a_look_at_the_max_payload_failing_while_a_decision_waits_for_it_is_told_once_a_minute(caplog) -> None:
    """The server's greeting not read again (new connections refused, say: its max_connections reached) said so every
    `held_retry_s` (30 s in the service) for as long as a decision waited for it, and nothing once read. Looks 30 s
    apart on the publisher's clock: told at once, then once a minute with the looks left out, another kind at once."""
    from app.decision_publisher import DecisionPublisher

    class Connection:  # the publisher's, connected; a new one to read the greeting from is refused
        is_connected = True
        refusal: Exception | None = ConnectionRefusedError("maximum connections exceeded")

        async def max_payload_now(self) -> int:
            if self.refusal is not None:
                raise self.refusal
            return 1_048_576

    nc, now = Connection(), [0.0]
    publisher = DecisionPublisher(lambda: nc, queue_max=10, batch=4, window=10, held_retry_s=30)
    publisher._set_max_payload(1_048_576)
    publisher.clock = lambda: now[0]
    caplog.set_level(logging.INFO, logger="tipstream.decisions")
    for at in range(0, 150, 30):  # 0 s told, 30 left out, 60 told, 90 left out, 120 told
        now[0] = at
        await publisher._look_at_max_payload()
    nc.refusal = TimeoutError("no greeting")
    await publisher._look_at_max_payload()
    nc.refusal = None
    await publisher._look_at_max_payload()
    told = [r.getMessage() for r in caplog.records if "max_payload" in r.getMessage()]
    assert [line.split(" (")[0] for line in told] == ["could not read the NATS server's max_payload again"] * 4 + [
        "the NATS server's max_payload is read again, after 6 looks that failed"], told
    assert told[0].endswith("looking again in 30s while a decision waits for it"), told
    assert told[1].endswith("(1 more failed look since the last line)") and told[2] == told[1], told
    assert "no greeting" in told[3] and "since the last line" not in told[3], told  # another kind: at once


async def test_a_refusal_that_lasts_is_sent_again_within_the_ceiling_and_logged_a_few_times_a_minute(
        nats_server, caplog, monkeypatch) -> None:
    """A NATS cluster refuses DECISIONS while it elects the stream's leader (4-9 s after a node is lost):
    with the wait doubling to 5 s, decisions reached the log up to 5 s after it could take them. Ceiling
    and lines a minute scaled down here (1 s and 10 in the service)."""
    from app import decision_publisher

    monkeypatch.setattr(decision_publisher, "REFUSAL_WAIT_MAX_S", 0.2)
    monkeypatch.setattr(decision_publisher, "REFUSAL_LINES_PER_MINUTE", 3)
    nc = await pull.connect(nats_server.url)
    publisher = decision_publisher.DecisionPublisher(lambda: nc, queue_max=100, batch=4, window=10, ack_timeout_s=5)
    await publisher.start()
    task = asyncio.create_task(publisher.run())
    publisher.offer("decisions.score", "d-1", b"{}")
    with caplog.at_level("WARNING", logger="tipstream.decisions"):
        await eventually(lambda: publisher.retried >= 5, timeout=5)  # no stream: each send refused
        assert publisher._refusal_wait == 0.2
        refusals = [r.getMessage() for r in caplog.records if "refused decision d-1" in r.getMessage()]
        assert refusal_waits(refusals) == ["0.1s", "0.2s", "0.2s"]
    task.cancel()
    await nc.close()


async def test_a_consumer_re_creation_nobody_answers_is_asked_again_at_once(nats_server, caplog, monkeypatch) -> None:
    """A NATS cluster electing a stream's (then the new consumer's) leader drops calls unanswered. Each try
    of the re-creation after a reconnect waits out its bound (2 s; a quarter second here), then asks again at
    once: with a backoff doubling after each try on top (6.4 s by the sixth), a consumer that could be made
    11 s after the loss was asked for at 16 s. A nats-server stopped (SIGSTOP) answers nothing here. Each line says
    why it may be so and what to look at if it goes on: it said neither."""
    import os
    import signal

    from app import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "RESET_CALL_TIMEOUT_S", 0.25)
    caplog.set_level("INFO", logger="tipstream.ingest")
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=16, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    await ingest.start()
    paused: list[float] = []
    monkeypatch.setattr(ingest, "_pause", lambda seconds: paused.append(seconds) or asyncio.sleep(seconds))
    caplog.clear()
    runner = asyncio.create_task(ingest.run())
    os.kill(nats_server.process.pid, signal.SIGSTOP)
    try:
        wait_stopped(nats_server.process.pid)  # every thread: it may answer until then
        ingest.request_reset()
        await eventually(lambda: caplog.text.count("(nats: timeout: no answer); asking again") >= 4, timeout=10)
    finally:
        os.kill(nats_server.process.pid, signal.SIGCONT)
    await eventually(lambda: "consuming SIGNALS from sequence 1" in caplog.text, timeout=10)
    told = [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]
    # Why, and what to look at if it goes on: the line alone told neither.
    assert all("none leads it yet" in line and "nats server report jetstream" in line for line in told), told
    assert not paused, "no wait on top of the call's own"
    await stop_reading(ingest, nc, runner)


async def test_feedback_held_back_for_decisions_longer_than_ack_wait_is_not_redelivered(nats_server,
                                                                                     monkeypatch) -> None:
    """A rebuild from the log holds each FEEDBACK chunk until DECISIONS has been read past it
    (`ReadUpTo`): minutes in all, for what the consumer delivered ahead. Before, those messages
    were redelivered after every ack_wait: folded again (counted `ignored`), each a `duplicate`
    to the learner, the bad ones dead-lettered again, and held in memory once more each time.
    Held messages are now said to be in progress (`+WPI`), however the wait is split in chunks."""
    from streams.read_up_to import ReadUpTo
    from tests.conftest import eventually

    real = jsx.ConsumerConfig
    monkeypatch.setattr(jsx, "ConsumerConfig", lambda **kw: real(**{**kw, "ack_wait": 1}))  # 60 s, scaled down
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    groups, per_group, gap_s = 10, 256, 0.15  # a chunk each, stored a gap apart
    first_ms = int(time.time() * 1000)
    for group in range(groups):
        await jsx.publish_events(js, [("feedback.tip.reacted", {
            "id": f"f{group}-{i}", "type": "tip.reacted", "user_id": f"u{i % 7}", "ts": "2026-11-26T08:00:00Z",
            "v": 1, "data": {"tip_id": "t", "decision_id": f"d{i}", "reaction": "liked"}}) for i in range(per_group)])
        await asyncio.sleep(gap_s)
    store, decisions = OnlineStore(), ReadUpTo()
    ingest = StreamIngest(nc, js, jsx.FEEDBACK, store, Checkpoints(), batch=128, max_event_bytes=16384,
                          max_uncheckpointed=10**6, after=decisions)
    ingest.progress_every_s = 0.3  # a third of the (scaled) ack_wait, as with the real one
    await ingest.start()
    running = asyncio.create_task(ingest.run())
    await asyncio.sleep(1.5)  # DECISIONS is read up to the first feedback: FEEDBACK waits past ack_wait
    assert store.applied == 0
    started = time.monotonic()
    while store.positions.get("FEEDBACK", 0) < groups * per_group:
        # DECISIONS is read at the pace the feedback was stored: each chunk waits less than
        # `progress_every_s`, the whole more than ack_wait.
        decisions.advance(first_ms + int((time.monotonic() - started) * 1000), False)
        await asyncio.sleep(0.02)
    await eventually(lambda: _all_acked(js, ingest.durable, "FEEDBACK"))  # a redelivery would be pending
    assert (store.applied, store.ignored) == (groups * per_group, 0)
    await stop_reading(ingest, nc, running)


async def test_messages_held_while_checkpoints_lag_past_ack_wait_are_not_redelivered(nats_server, monkeypatch) -> None:
    """Ingest holds while too many events wait for a checkpoint (the database away), for as long as
    that lasts. Before, the messages delivered and not folded yet were redelivered once the hold
    passed ack_wait: folded again (counted ignored), the bad ones dead-lettered again (past
    JetStream's duplicate window, a second DLQ copy). They are now said to be in progress, as those
    held for DECISIONS are."""
    from tests.conftest import dead_lettered, eventually

    real = jsx.ConsumerConfig
    monkeypatch.setattr(jsx, "ConsumerConfig", lambda **kw: real(**{**kw, "ack_wait": 1}))  # 60 s, scaled down
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await jsx.publish_events(js, [("signals.app.opened", {
        "id": f"e{i}", "type": "app.opened", "user_id": f"u{i % 7}", "ts": "bad" if i % 100 == 0 else "2026-11-26T08:00:00Z"})
        for i in range(1, 401)])
    checkpoints, store = Checkpoints(), OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, checkpoints, batch=256, max_event_bytes=16384,
                          max_uncheckpointed=100)
    ingest.progress_every_s = 0.3  # a third of the (scaled) ack_wait, as with the real one
    before = dead_lettered("SIGNALS")
    await ingest.start()
    checkpoints.uncheckpointed = 100  # the database is away: ingest holds after its first chunk
    running = asyncio.create_task(ingest.run())
    await eventually(lambda: ingest.puller and ingest.puller.paused and ingest.buffer)
    await asyncio.sleep(1.5)  # the database stays away past ack_wait
    checkpoints.uncheckpointed = 0  # a checkpoint succeeds
    await eventually(lambda: store.positions.get("SIGNALS") == 400)
    await eventually(lambda: _all_acked(js, ingest.durable))  # nothing left to redeliver
    assert (store.applied, store.ignored, dead_lettered("SIGNALS") - before) == (396, 0, 4)
    await stop_reading(ingest, nc, running)


async def _all_acked(js: Any, durable: str, stream: str = "SIGNALS") -> bool:
    return (await js.consumer_info(stream, durable)).num_ack_pending == 0


async def test_a_user_state_that_cannot_be_loaded_for_longer_than_ack_wait_gets_nothing_redelivered(
    nats_server, monkeypatch
) -> None:
    """The chunk with the user waits, with what was delivered behind it, for as long as the database
    is away. Before, all of that was redelivered after ack_wait, and again after each ack_wait
    (each time up to max_ack_pending more copies held in memory): folded again, counted ignored."""
    from tests.conftest import eventually

    real = jsx.ConsumerConfig
    monkeypatch.setattr(jsx, "ConsumerConfig", lambda **kw: real(**{**kw, "ack_wait": 1}))  # 60 s, scaled down
    nc, js = await seeded(nats_server)
    store, away = OnlineStore(), asyncio.Event()
    away.set()
    failures = with_u3_cold(store, lambda _: away.is_set())
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=512, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    ingest.progress_every_s = 0.3  # a third of the (scaled) ack_wait, as with the real one
    counted = _counts()
    await ingest.start()
    running = asyncio.create_task(ingest.run())
    await eventually(lambda: failures)
    await asyncio.sleep(2.0)  # the database stays away past ack_wait
    away.clear()
    await eventually(lambda: store.positions.get("SIGNALS", 0) == EVENTS)
    await eventually(lambda: _all_acked(js, ingest.durable))  # nothing left to redeliver
    # Each failed try folds the chunk's events before u3's first again (at most e1 and e2): only those.
    assert store.applied == EVENTS and store.ignored <= 2 * len(failures), (store.ignored, len(failures))
    assert [now - before for now, before in zip(_counts(), counted, strict=True)] == [EVENTS, 0]
    await stop_reading(ingest, nc, running)


async def test_the_lag_metric_counts_what_a_start_has_to_read_while_feedback_waits_for_decisions(nats_server) -> None:
    """At a start FEEDBACK waits for DECISIONS to be read back (`ReadUpTo`): seconds for the join
    window, longer with a larger one. `tipstream_stream_lag` said 0 for FEEDBACK all that while, though
    /readyz counted the backlog after an outage: it was set only once a chunk had been folded."""
    from app.metrics import METRICS
    from streams.read_up_to import ReadUpTo
    from tests.conftest import eventually

    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await jsx.publish_events(js, [("feedback.tip.reacted", {
        "id": f"f-{i}", "type": "tip.reacted", "user_id": "u-1", "ts": "2026-11-26T08:00:00Z", "v": 1,
        "data": {"tip_id": "t", "decision_id": f"d-{i}", "reaction": "liked"}}) for i in range(300)])
    gauge = METRICS.lag.labels("FEEDBACK")
    gauge.set(0)
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.FEEDBACK, store, Checkpoints(), batch=128, max_event_bytes=16384,
                          max_uncheckpointed=10**6, after=ReadUpTo())  # DECISIONS not read back yet
    await ingest.start()
    running = asyncio.create_task(ingest.run())
    await eventually(lambda: ingest.buffer or ingest._held, timeout=5)  # delivered, and held
    assert store.applied == 0 and ingest.lag == 300
    assert gauge._value.get() == 300
    await stop_reading(ingest, nc, running)


async def test_a_chunk_waiting_on_a_users_read_keeps_its_own_future_bound(nats_server) -> None:
    """A user in the checkpoint only is read in a worker thread (app/thaw.py), and other streams'
    chunks run meanwhile, each setting the store's bound on event times (`max_ts_ms`) from when
    JetStream stored its own first message. The waiting chunk goes on with its own bound: with
    another's, an event a day and more ahead of when it was stored was folded, where a replay
    refuses it."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    await jsx.publish_events(js, [
        ("signals.app.opened", {"id": "e1", "type": "app.opened", "user_id": "back", "ts": now}),
        ("signals.app.opened", {"id": "e2", "type": "app.opened", "user_id": "other", "ts": "2099-01-01T00:00:00Z"}),
    ])
    reading, release = threading.Event(), threading.Event()

    def fetch(user_ids: list[str]) -> dict[str, bytes]:  # the checkpoint, slow to answer
        reading.set()
        release.wait(10)
        return {"back": UserState().to_bytes()}

    store = OnlineStore()
    store.dormant.add("back")
    store.fetch_cold = fetch
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=16, max_event_bytes=16384,
                          max_uncheckpointed=10**6, max_future_s=86_400)
    await ingest.start()
    await eventually(lambda: len(ingest.buffer) >= 2)  # the deliveries
    chunk, ingest.buffer = ingest.buffer[:2], ingest.buffer[2:]
    dead_before = dead_lettered("SIGNALS")
    folding = asyncio.create_task(ingest.process(chunk))
    await eventually(reading.is_set)
    store.max_ts_ms = 2**62  # what a chunk of a stream stored far later would set
    release.set()
    await folding

    assert "back" in store.users and "other" not in store.users
    assert dead_lettered("SIGNALS") - dead_before == 1, "the event from 2099 is refused as future_ts"
    await ingest.stop()
    await nc.close()


async def test_a_chunk_waiting_on_users_reads_keeps_its_messages_in_progress(nats_server, monkeypatch) -> None:
    """Each user in the checkpoint only is read in a worker thread (app/thaw.py) while the chunk
    waits, with its messages delivered and not acknowledged. Reads that together outlast ack_wait
    (after a start every user is cold, and a chunk holds up to 256 of them) had JetStream deliver
    the chunk's messages again, to be folded again and held twice: the waits for `after`, for a
    retry and for checkpoints say they are in progress, this one did not."""
    monkeypatch.setattr(jsx, "ACK_WAIT_S", 1)
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    users = [f"back-{i}" for i in range(6)]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    await jsx.publish_events(js, [("signals.app.opened", {"id": f"e{i}", "type": "app.opened", "user_id": user,
                                                          "ts": now}) for i, user in enumerate(users)])

    def fetch(user_ids: list[str]) -> dict[str, bytes]:  # the checkpoint, slowish to answer
        time.sleep(0.4)
        return {user_ids[0]: UserState().to_bytes()}

    store = OnlineStore()
    store.dormant.update(users)
    store.fetch_cold = fetch
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=16, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    await ingest.start()
    await eventually(lambda: len(ingest.buffer) >= len(users))  # the deliveries
    chunk, ingest.buffer = ingest.buffer, []
    ingest._held = chunk  # as `run` does
    await ingest.process(chunk)

    assert set(users) <= set(store.users)
    assert (await js.consumer_info("SIGNALS", ingest.durable)).num_redelivered == 0
    assert not ingest.buffer, "delivered again"
    await ingest.stop()
    await nc.close()


def drop_once(ingest: StreamIngest, seq: int) -> list[pull.RawMsg]:
    """Have message `seq` lost on its way, once: never handed to `ingest`. What was dropped."""
    deliver, dropped = ingest._on_message, []

    def on_message(msg: pull.RawMsg) -> None:
        if ack_subject.stream_sequence(msg[1])[0] == seq and not dropped:
            dropped.append(msg)
            return
        deliver(msg)

    ingest._on_message = on_message  # type: ignore[method-assign]
    return dropped


async def run_until(ingest: StreamIngest, position: int) -> None:
    await ingest.start()
    task = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: ingest.store.positions.get(ingest.spec.name) == position, timeout=20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ingest.stop()


async def test_a_message_lost_on_its_way_is_read_again_not_acknowledged_past(nats_server) -> None:
    """A consumer whose leader (a NATS cluster's node) was lost with messages on their way goes on after them
    on its new leader: folded on, the chunk's acknowledgement (ack-all) took them as read, and they were lost
    to the fold for good. Ingest sees the hole, and reads again from its position."""
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=256, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    dropped = drop_once(ingest, 500)
    try:
        await run_until(ingest, EVENTS)
    finally:
        await nc.close()
    assert dropped and (store.applied, store.ignored) == (EVENTS, 0)


def decision(i: int, pad: int = 0) -> dict[str, Any]:
    """Another publisher's decision (no time in its id), as DECISIONS holds it."""
    return {"id": f"other-{i}", "type": "decision.scored", "v": 1, "ts": "2026-11-26T08:00:00+00:00",
            "user_id": f"u-{i % 50}", "model_version": "v1", "features": {"pad": "x" * pad},
            "ranked": [{"tip_id": "tip-0", "score": 0.5, "propensity": 1.0}]}


def reading_decisions(nc: Any, js: Any, read: set[str], batch: int = 256) -> StreamIngest:
    """The DECISIONS ingest as the service runs it, its sink (the learner's join cache) noting each id read."""
    return StreamIngest(nc, js, jsx.DECISIONS, OnlineStore(), Checkpoints(), batch=batch, max_event_bytes=1 << 20,
                        max_uncheckpointed=10**9, decode=decode_decision,
                        sink=lambda logged, reply: read.add(logged.id) or True, sink_reply=True, folds=False)


async def test_a_decision_lost_on_its_way_is_read_again_not_acknowledged_past(nats_server) -> None:
    """As for SIGNALS, on DECISIONS: read back at a start (the learner's join cache) or from another publisher,
    a decision passed over never reached the learner, and a reaction to it waited, then gave up
    (`unknown_decision`); the checkpoint's position past it, a restart did not write its tip_scores row."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await jsx.publish_events(js, [("decisions.scored", decision(i)) for i in range(EVENTS)])
    read: set[str] = set()
    ingest = reading_decisions(nc, js, read)
    dropped = drop_once(ingest, 500)
    try:
        await run_until(ingest, EVENTS)
    finally:
        await nc.close()
    assert dropped and len(read) == EVENTS


def delivered(seq: int, consumer_seq: int, times: int = 1) -> pull.RawMsg:
    """A SIGNALS message as a consumer delivers it: its ack subject holds its sequences."""
    reply = f"$JS.ACK.SIGNALS.{jsx.durable_of('SIGNALS')}.{times}.{seq}.{consumer_seq}.1764140400123456789.0"
    return "signals.app.opened", reply.encode(), b"{}"


async def test_a_message_delivered_again_does_not_hide_one_passed_over(nats_server) -> None:
    """101, 102, 102 delivered again, 104: as many messages as 101..104, so counted by the stream's sequences
    the chunk looked whole, and its acknowledgement took 103 (stored) as read. The consumer's sequence has a
    gap where 103's delivery was lost."""
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    store.positions["SIGNALS"] = 100
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=256, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    try:
        assert await ingest._skips_stored([delivered(101, 1), delivered(102, 2), delivered(102, 3, 2),
                                           delivered(104, 5)])
        assert not await ingest._skips_stored([delivered(101, 1), delivered(102, 2), delivered(102, 3, 2),
                                               delivered(103, 4)])
    finally:
        await nc.close()


async def test_the_lag_metric_grows_with_the_stream_while_ingest_holds(nats_server) -> None:
    """docs/operations.md alerts on `tipstream_stream_lag > 10000` for ingest held. The lag was set only as a chunk
    was folded, so a hold (checkpoints failing: a SQLite file locked for 80 s under `--demo 100`) kept the
    last value, 0, in /metrics and /readyz alike, while ~8,000 events were stored behind it."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)

    def events(first: int, count: int) -> list[tuple[str, dict[str, Any]]]:
        return [("signals.app.opened", {"id": f"e{i}", "type": "app.opened", "user_id": f"u{i % 7}",
                                        "ts": "2026-11-26T08:00:00Z"}) for i in range(first, first + count)]

    gauge = METRICS.lag.labels("SIGNALS")
    checkpoints, store = Checkpoints(), OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, checkpoints, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10)
    ingest.lag_watch.held_every_s = 0.1
    await jsx.publish_events(js, events(0, 5))
    await ingest.start()
    running = asyncio.create_task(ingest.run())
    await eventually(lambda: store.positions.get("SIGNALS") == 5 and gauge._value.get() == 0)
    # The database is away: ingest holds after the next chunk, or after the one it folds as this is set (the hold is
    # looked at after a chunk's fold, which the wait above can see first): e5 folded or left unread.
    checkpoints.uncheckpointed = 10
    await jsx.publish_events(js, events(5, 1))
    await eventually(lambda: ingest.puller.paused)
    unread = 6 - store.positions["SIGNALS"]
    await jsx.publish_events(js, events(6, 300))  # stored while ingest holds
    await eventually(lambda: gauge._value.get() == unread + 300 and ingest.lag == unread + 300, timeout=5)
    checkpoints.uncheckpointed = 0  # a checkpoint succeeds: ingest reads on, and the lag goes back to 0
    await eventually(lambda: store.positions.get("SIGNALS") == 306 and gauge._value.get() == 0)
    await stop_reading(ingest, nc, running)


async def test_a_stream_held_at_a_users_read_logs_why_and_not_who(nats_server, caplog) -> None:
    """The warning of a chunk held at a user's read said the user's id where the cause goes ("... for SIGNALS
    (u3); retrying"): docs/operations.md says the log names a user only in a request to forget them and in warnings
    about their reactions, and the id said nothing of why."""
    nc, js = await seeded(nats_server)
    store = OnlineStore()
    with_u3_cold(store, lambda failures: len(failures) < 1)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=512, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    await ingest.start()
    with caplog.at_level(logging.INFO, logger="tipstream.ingest"):
        running = asyncio.create_task(ingest.run())
        await eventually(lambda: store.positions.get("SIGNALS", 0) == EVENTS, timeout=20)
    lines = [r.getMessage() for r in caplog.records if "could not fold events" in r.getMessage()]
    assert lines and all("ConnectionError: the database is away" in line for line in lines), lines
    assert not any(re.search(r"\bu3\b", line) for line in lines), lines
    # And once the chunk is folded, said: the warnings were the last word.
    assert any(r.getMessage().startswith("fold events (a user's state could not be loaded from the checkpoint) for "
                                         "SIGNALS: done, ") for r in caplog.records)
    await stop_reading(ingest, nc, running)


async def told_publishing_after(ingest: StreamIngest, failures: list[Exception], caplog: Any) -> list[str]:
    """A DLQ copy retried by `ingest` (`_retry`) through `failures`, the last first: what the log told of it."""

    async def publish() -> str:
        if failures:
            raise failures.pop()
        return "published"

    with caplog.at_level(logging.INFO, logger="tipstream.ingest"):
        assert await ingest._retry(publish, "publish to the DLQ") == "published"
    return [r.getMessage() for r in caplog.records]


async def test_a_nats_call_of_ingest_that_times_out_says_why_and_what_to_look_at(nats_server, caplog) -> None:
    """Its DLQ copy unanswered (a cluster electing the DLQ's leader after a node was killed, in a soak), ingest
    warned "could not publish to the DLQ for SIGNALS (nats: timeout); retrying", with neither a cause nor a fix, and
    nothing said when the copy went through."""
    import nats.errors

    nc, js = await seeded(nats_server)
    ingest = StreamIngest(nc, js, jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=512, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    told = await told_publishing_after(ingest, [nats.errors.TimeoutError()], caplog)
    assert len(told) == 2, told
    assert "nats: timeout" in told[0] and "no leader" in told[0] and "nats server report jetstream" in told[0], told
    assert told[1].startswith("publish to the DLQ for SIGNALS: done, "), told
    assert told[1].endswith("(tried again 1 time)"), told  # not '1 times'
    await nc.close()


async def test_a_failure_that_lasts_is_told_at_once_then_once_a_minute_with_the_retries_left_out(nats_server,
                                                                                               caplog) -> None:
    """A DLQ copy that a NATS server whose disk is full left unanswered was warned of on every retry: a line per 15 s
    (the publish's 5 s timeout, then the 10 s backoff) for as long as the disk was full, for each stream. Driven on
    the ingest's clock, not slept: 16 timeouts over 113 s, then the server's refusal for a full store, then done."""
    import nats.errors
    from nats.js.errors import APIError

    nc = await pull.connect(nats_server.url)
    ingest = StreamIngest(nc, nc.jetstream(), jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=512,
                          max_event_bytes=16384, max_uncheckpointed=10**6)
    now = [1000.0]
    ingest.clock = lambda: now[0]

    async def pause(seconds: float) -> None:
        now[0] += seconds  # the backoff (0.2 s doubling to 10 s), on the ingest's clock

    ingest._pause = pause
    refused = APIError(code=503, description="insufficient resources", err_code=10023)
    told = await told_publishing_after(ingest, [refused] + [nats.errors.TimeoutError() for _ in range(16)], caplog)
    assert len(told) == 4, told
    # The first at once; the 12th, 62.6 s on, with the 10 between; the rest of the first minute left out.
    assert "nats: timeout" in told[0] and "more retries" not in told[0], told
    assert "nats: timeout" in told[1] and "(10 more retries since the last line)" in told[1], told
    # Another kind of failure, at once (the disk's fix is in its line).
    assert "insufficient resources" in told[2] and "file storage is full" in told[2], told
    assert "more retries" not in told[2], told
    assert told[3] == ("publish to the DLQ for SIGNALS: done, 123 s after the first try that failed "
                       "(tried again 17 times)"), told
    await nc.close()


async def making_streams_again(nats_server: Any, first: Callable[[Any], Awaitable[Any]],
                               ) -> tuple[Any, Any, OnlineStore, StreamIngest]:
    """A SIGNALS ingest that makes the streams again when they are gone, as the service's, started once `first(js)`
    has published to them: (nc, js, store, ingest)."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)

    async def ensure_streams() -> None:
        await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)

    await ensure_streams()
    await first(js)
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10**6, ensure_streams=ensure_streams)
    await ingest.start()
    return nc, js, store, ingest


@pytest.mark.parametrize("deleted", ["consumer", "stream"])
async def test_a_consumer_deleted_under_a_running_ingest_is_made_again_and_read_on(nats_server, deleted: str,
                                                                                   caplog) -> None:
    """Its consumer deleted while ingest reads (`nats consumer rm`, or its stream deleted with it): each pull
    request was answered at once (409 Consumer Deleted, then 503 no responders) and asked again at once,
    ~15,000 a second for good, and nothing more was read until a restart. It is made again from the position
    (its stream too, if it went), and every event is folded once."""
    def opened(i: int) -> tuple[str, dict[str, Any]]:
        return "signals.app.opened", {"id": f"e{i}", "type": "app.opened", "user_id": f"u{i % 3}",
                                      "ts": "2026-11-26T08:00:00Z"}

    nc, js, store, ingest = await making_streams_again(
        nats_server, lambda js: jsx.publish_events(js, [opened(i) for i in range(1, 11)]))
    running = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 10)
        if deleted == "consumer":
            await js.delete_consumer("SIGNALS", ingest.durable)
        else:
            await js.delete_stream("SIGNALS")
            await eventually(lambda: ingest.reset_needed or store.positions.get("SIGNALS") == 0)
            await eventually(ingest.drained)  # the stream made again, before the publisher sends to it
        await jsx.publish_events(js, [opened(i) for i in range(11, 21)])
        # The new stream numbers its messages from 1.
        await eventually(lambda: store.positions.get("SIGNALS", 0) == (20 if deleted == "consumer" else 10))
        assert (store.applied, store.ignored) == (20, 0)
        assert "is gone from NATS" in caplog.text
    finally:
        await stop_reading(ingest, nc, running)


async def test_a_call_asked_again_unanswered_says_how_many_asks_it_left_out_in_english(nats_server, caplog) -> None:
    """A call asked again at once after each unanswered one (a consumer's re-creation, a cluster electing) is told
    six times a minute; the next said '(6 more unanswered since the last line)', an adjective for a noun. Asked every
    5 s on the throttle's clock, not slept: 13 asks over 60 s, then one answered."""
    import nats.errors

    from streams.log_throttle import LogThrottle

    nc = await pull.connect(nats_server.url)
    ingest = StreamIngest(nc, nc.jetstream(), jsx.SIGNALS, OnlineStore(), Checkpoints(), batch=512,
                          max_event_bytes=16384, max_uncheckpointed=10**6)
    now, asks = [1000.0], []
    ingest._unanswered_lines = LogThrottle(per_window=6, clock=lambda: now[0])

    async def reset() -> str:
        asks.append(now[0])
        if len(asks) <= 13:
            now[0] += 5.0  # the call's bound, waited out
            raise nats.errors.TimeoutError
        return "reset"

    with caplog.at_level(logging.INFO, logger="tipstream.ingest"):
        assert await ingest._retry(reset, "reset the consumer", asking_again=True) == "reset"
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 7, told  # 6 in the first minute, then the 13th, 60 s on
    assert "more unanswered" not in " ".join(told[:6]), told
    assert "asking again (6 more unanswered asks since the last line)" in told[6], told
    await nc.close()


async def test_a_pull_request_nothing_takes_tells_a_consumer_without_a_leader_or_deleted(nats_server, caplog) -> None:
    """A pull request nothing takes (503 no responders) comes from a consumer no node leads (a NATS cluster electing
    one after a node was lost, or without a quorum) as from one deleted: the status cannot tell which. The log said
    "is gone from NATS (deleted?)", and sent the operator after a deletion while a cluster had lost nodes. Here the
    consumer is deleted while no request waits, so the next one meets no responders alone (no 409 first)."""
    def opened(i: int) -> tuple[str, dict[str, Any]]:
        return "signals.app.opened", {"id": f"e{i}", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z"}

    nc, js, store, ingest = await making_streams_again(
        nats_server, lambda js: jsx.publish_events(js, [opened(i) for i in range(1, 6)]))
    running = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 5)
        assert ingest.puller is not None
        ingest.puller.paused = True  # its request outstanding expires (PULL_EXPIRES_S) and none follows
        await eventually(lambda: _no_request_waits(js, ingest.durable), timeout=10)
        await js.delete_consumer("SIGNALS", ingest.durable)
        caplog.clear()
        ingest.puller.resume()
        await jsx.publish_events(js, [opened(i) for i in range(6, 9)])
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 8)
        told = [r.getMessage() for r in caplog.records if r.name == "tipstream.ingest" and r.levelname == "WARNING"]
        assert told == [(
            f"the consumer {ingest.durable} of stream SIGNALS takes no pull request (503 no responders): no NATS node "
            "leads it now (a cluster electing new leaders after a node was lost, or without a quorum: most of its "
            "nodes down), or it was deleted; making it again and reading SIGNALS from 6 once NATS answers. If this "
            "goes on, start the cluster's missing nodes (`nats server report jetstream` shows them and which streams "
            "have no leader)")], told
        assert (store.applied, store.ignored) == (8, 0)
    finally:
        await stop_reading(ingest, nc, running)


async def test_events_stored_while_the_consumer_is_made_again_count_in_the_lag(nats_server, monkeypatch) -> None:
    """On a NATS cluster that lost a node, a stream gets a leader, and stores events, seconds before its consumer
    does (1-2 s on a 3-node cluster here, the consumer re-created after its pull requests met no responders). The
    lag was set only by a chunk folded or a consumer made, so /readyz and tipstream_stream_lag said 0 while those
    events waited unread. Here the re-creation is held (its consumer not made until released) as a consumer's
    election holds it, and the lag follows the stream meanwhile."""
    def opened(i: int) -> tuple[str, dict[str, Any]]:
        return "signals.app.opened", {"id": f"e{i}", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z"}

    nc, js, store, ingest = await making_streams_again(
        nats_server, lambda js: jsx.publish_events(js, [opened(i) for i in range(1, 6)]))
    elected, asked = asyncio.Event(), asyncio.Event()
    reset_durable = jsx.reset_durable

    async def once_elected(*args: Any, **kwargs: Any) -> tuple[int, int]:
        asked.set()
        await elected.wait()
        return await reset_durable(*args, **kwargs)

    monkeypatch.setattr(jsx, "reset_durable", once_elected)
    gauge = METRICS.lag.labels("SIGNALS")
    running = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 5 and ingest.lag == 0)
        ingest.request_reset()  # as a pull request that met no responders does (`_consumer_gone`), or a reconnect
        await eventually(asked.is_set)
        await jsx.publish_events(js, [opened(i) for i in range(6, 13)])
        await eventually(lambda: ingest.lag == 7, timeout=10)
        assert gauge._value.get() == 7 and store.positions["SIGNALS"] == 5
        elected.set()
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 12 and ingest.lag == 0)
        assert gauge._value.get() == 0 and (store.applied, store.ignored) == (12, 0)
    finally:
        await stop_reading(ingest, nc, running)


async def _no_request_waits(js: Any, durable: str) -> bool:
    return (await js.consumer_info("SIGNALS", durable)).num_waiting == 0


async def test_a_bad_event_delivered_again_after_its_chunk_is_not_dead_lettered_again(nats_server, caplog) -> None:
    """JetStream delivers a message again once its acknowledgement is lost (a cluster's consumer leader lost) or
    ack_wait passes unacknowledged: folded again, it is recognised, but a bad one was published to the DLQ again
    and counted and logged again, and stored twice past the duplicate window (TIPSTREAM_DUPLICATE_WINDOW_S as low
    as 0.1 s). Everything at or below the position is in the DLQ already, as at a start."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await js.publish("signals.app.opened", b"{not json")
    await jsx.publish_events(js, [("signals.app.opened", {"id": "e2", "type": "app.opened", "user_id": "u",
                                                          "ts": "2026-11-26T08:00:00Z"})])
    store = OnlineStore()
    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10**6)
    before = dead_lettered("SIGNALS")
    try:
        await ingest.start()
        await eventually(lambda: len(ingest.buffer) == 2)
        bad, good = ingest.buffer
        ingest.buffer.clear()
        with caplog.at_level(logging.INFO, logger="tipstream.ingest"):
            await ingest.process([bad, good])
            assert store.positions["SIGNALS"] == 2 and dead_lettered("SIGNALS") == before + 1
            subject, reply, data = bad
            again = reply.replace(b".1.1.1.", b".2.1.3.")  # delivered a second time, the consumer's third delivery
            assert again != reply
            await ingest.process([(subject, again, data)])
        assert dead_lettered("SIGNALS") == before + 1
        assert len([r for r in caplog.records if r.getMessage().startswith("DLQ SIGNALS #1:")]) == 1
        assert (store.applied, store.positions["SIGNALS"]) == (1, 2)
    finally:
        await ingest.stop()
        await nc.close()


async def test_a_stream_made_again_keeps_its_own_dlq_ids_when_asking_fails_midway(nats_server, monkeypatch) -> None:
    """Taking a stream created again as the one read asks NATS a few things; one failing (NATS away again), the
    retry found no stream created again (the position already the new one's) and kept the old stream's DLQ ids.
    The new stream numbers its messages from 1 again, so its first bad events had the ids of the old one's, and
    the DLQ dropped them as duplicates within its duplicate window: counted, logged, and in the DLQ nowhere."""
    nc, js, store, ingest = await making_streams_again(nats_server,
                                                       lambda js: js.publish("signals.app.opened", b"{old stream"))
    running = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 1)
        assert (await js.stream_info("DLQ")).state.messages == 1
        asked = dead_letters.last_dead_lettered
        failed: list[bool] = []

        async def away_once(*args: Any) -> Any:
            if not failed:
                failed.append(True)
                raise ConnectionError("NATS is away again")
            return await asked(*args)

        monkeypatch.setattr(dead_letters, "last_dead_lettered", away_once)
        await js.delete_stream("SIGNALS")  # made again by ingest, its sequences from 1
        await eventually(lambda: failed and not ingest.reset_needed and ingest.drained())
        await js.publish("signals.app.opened", b"{new stream")
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 1 and ingest.drained())
        copies = (await js.stream_info("DLQ")).state.messages
        assert copies == 2, "the new stream's bad event is not in the DLQ"
    finally:
        await stop_reading(ingest, nc, running)


def _opened(i: int, user: str) -> tuple[str, dict[str, Any]]:
    return "signals.app.opened", {"id": f"{user}-{i}", "type": "app.opened", "user_id": user,
                                  "ts": "2026-11-26T08:00:00Z"}


async def read_then_made_again(nats_server: Any) -> tuple[Any, Any, OnlineStore, StreamIngest, datetime]:
    """A SIGNALS ingest that read the stream's 5 messages and stopped (away from NATS meanwhile); then the stream
    deleted, made again and published 7 messages past the position: (nc, js, store, ingest, when it was made again),
    the ingest to be read on as after a reconnect (`request_reset`)."""
    nc, js, store, ingest = await making_streams_again(
        nats_server, lambda js: jsx.publish_events(js, [_opened(i, "old") for i in range(5)]))
    running = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: store.positions.get("SIGNALS", 0) == 5)
    finally:
        await cancelled(running)
        await ingest.stop()
    await js.delete_stream("SIGNALS")
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    created = (await js.stream_info("SIGNALS")).created
    await jsx.publish_events(js, [_opened(i, "new") for i in range(7)])
    return nc, js, store, ingest, created


async def test_a_stream_replaced_under_us_is_told_though_the_first_look_goes_unanswered(nats_server,
                                                                                       monkeypatch) -> None:
    """After a reconnect, the message at the last one read is asked for to tell whether the stream is still the
    one read (`_replaced_under_us`). Unanswered within its second (a server busy coming back, a cluster electing
    a leader), it was taken as the same stream: ingest resumed after the position, and the new stream's messages
    up to it were skipped without a word. It is asked again, as the re-creation's other calls are."""
    nc, _, store, ingest, _ = await read_then_made_again(nats_server)
    running = None
    try:
        unanswered: list[int] = []
        get_msg = JetStreamContext.get_msg

        async def slow_once(self: Any, stream_name: str, seq: int | None = None, **kwargs: Any) -> Any:
            if stream_name == "SIGNALS" and seq == 5 and not kwargs and not unanswered:
                unanswered.append(seq)
                raise TimeoutError
            return await get_msg(self, stream_name, seq, **kwargs)

        monkeypatch.setattr(JetStreamContext, "get_msg", slow_once)
        ingest.request_reset()  # the reconnect
        running = asyncio.create_task(ingest.run())
        await eventually(lambda: unanswered and ingest.drained())
        assert store.users["new"].count("app.opened") == 7, "the new stream's messages up to the position were skipped"
        assert store.users["old"].count("app.opened") == 5
    finally:
        await stop_reading(ingest, nc, running)


async def test_a_stream_deleted_and_made_again_under_a_running_ingest_is_told_as_such(nats_server, caplog) -> None:
    """SIGNALS deleted and made again while ingest was away from NATS, and published to past the position: the line
    guessed only "its store replaced by an older copy", and the operator looked for a restored backup. The stream's
    creation time, later than when the last message read was stored, says it was made again, and when."""
    nc, _, store, ingest, created = await read_then_made_again(nats_server)
    running = None
    try:
        with caplog.at_level(logging.ERROR, logger="tipstream.ingest"):
            ingest.request_reset()  # the reconnect
            running = asyncio.create_task(ingest.run())
            await eventually(lambda: store.users.get("new") and store.users["new"].count("app.opened") == 7)
        [told] = [r.getMessage() for r in caplog.records if "came back with another message at 5" in r.getMessage()]
        made_again = f"SIGNALS was made again at {created.isoformat(timespec='milliseconds')}, after the last message"
        assert f"{made_again} read was stored" in told, told
        assert "older copy" not in told, told
    finally:
        await stop_reading(ingest, nc, running)


async def unanswered_puller(url: str, on_message: Callable[[pull.RawMsg], None], batch: int = 2,
                            **options: Any) -> tuple[Any, Any, list]:
    """A puller of `batch` of SIGNALS' durable consumer on a real server, idle (the server said it has nothing), and
    the list its `on_unanswered` calls fill."""
    nc = await pull.connect(url, **options)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await jsx.reset_durable(js, "SIGNALS", jsx.durable_of("SIGNALS"), 1, max_ack_pending=64)
    told: list[float] = []
    puller = pull.BatchPuller(nc, "SIGNALS", jsx.durable_of("SIGNALS"), batch, on_message,
                              on_unanswered=lambda: told.append(time.monotonic()))
    await puller.start()
    await eventually(lambda: puller.idle, timeout=5)
    return nc, puller, told


async def test_a_puller_back_from_a_nats_restart_is_not_told_its_requests_go_unanswered(tmp_path) -> None:
    """NATS away longer than a request's expiry and the second `unanswered` waits past it: back, the old requests
    were lost with the connection (the watchdog asks again), and the server answers. The silence was counted from
    the last answer before the outage, and the first watch after the reconnect told the owner that the server
    leading the consumer hangs: ingest logged so (`LagWatch._while_unanswered`) after every NATS restart it outlived."""
    from tests.conftest import NatsServer

    server = NatsServer(tmp_path / "nats")
    server.start()
    got: list[pull.RawMsg] = []
    nc, puller, told = await unanswered_puller(server.url, got.append, max_reconnect_attempts=-1,
                                               reconnect_time_wait=0.1)
    try:
        server.stop()
        await eventually(lambda: not nc.is_connected, timeout=5)
        away = time.monotonic()
        await eventually(lambda: time.monotonic() - away > 2.5, timeout=5)  # the outage, past expiry + 1 s
        server.start()
        await eventually(lambda: nc.is_connected, timeout=10)
        await jsx.publish_events(nc.jetstream(timeout=5), [("signals.app.opened", {
            "id": "e1", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z"})])
        await eventually(lambda: got, timeout=10)  # asked again by the watchdog, and answered
        await eventually(lambda: puller.idle, timeout=5)
        assert told == [], "told unanswered after a reconnect, by a server that answers"
    finally:
        await puller.stop()
        await nc.close()
        server.kill()


async def test_a_stall_of_the_loop_before_the_next_request_is_not_requests_unanswered(nats_server) -> None:
    """A request's last message wakes ingest's fold, which runs before the puller's next request is sent: a fold (or a
    collection, or anything on the loop) holding it 2.5 s left the request unsent that long, and the watch that came
    first after the stall counted the silence from the answer before it. It told the owner the server hangs before
    the request had even reached it. (A batch of 1: the request ends with its message, as under a backlog, where
    every request's batch is delivered whole; one left open would end with a status read before the watch.)"""
    stalled: list[float] = []

    def on_message(msg: pull.RawMsg) -> None:
        got.append(msg)
        if not stalled:  # as ingest's wake: the fold's turn comes before the request's send
            stalled.append(time.monotonic())
            asyncio.get_running_loop().call_soon(time.sleep, 2.5)

    got: list[pull.RawMsg] = []
    nc, puller, told = await unanswered_puller(nats_server.url, on_message, batch=1)
    try:
        await jsx.publish_events(nc.jetstream(timeout=5), [("signals.app.opened", {
            "id": "e1", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z"})])
        await eventually(lambda: stalled and time.monotonic() - stalled[0] > 2.5, timeout=10)
        puller.idle = False
        await eventually(lambda: puller.idle, timeout=5)  # the request sent after the stall, answered
        assert told == [], "told unanswered for a request not sent yet"
    finally:
        await puller.stop()
        await nc.close()


async def throttled(port: int, bytes_per_s: float) -> asyncio.AbstractServer:
    """A TCP forwarder to 127.0.0.1:`port` on a port of its own, passing what the server sends at `bytes_per_s`: a
    slow link."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(16384):
                writer.write(data)
                await writer.drain()
                if rate is not None:
                    await asyncio.sleep(len(data) / rate)  # the link's pace, not a wait for an outcome
        writer.close()

    async def forward(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(client_reader, server_writer, None), pipe(server_reader, client_writer, bytes_per_s))

    return await asyncio.start_server(forward, "127.0.0.1", 0)


async def test_a_batch_still_arriving_over_a_slow_link_is_not_requests_unanswered(nats_server) -> None:
    """A catch-up's batch of large events over a slow link takes seconds to arrive, each message an answer of the
    server's: counted only at half a request's batch, the silence reached expiry + 1 s mid-batch, and the owner was
    told the server leading the consumer hangs."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    pad = "x" * 40_000
    await jsx.publish_events(js, [("signals.app.opened", {
        "id": f"e{i}", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z", "pad": pad})
        for i in range(20)])
    await nc.close()
    link = await throttled(nats_server.port, 256_000)  # 20 x 40 KB: 3 s
    got: list[pull.RawMsg] = []
    nc, puller, told = None, None, []
    try:
        nc = await pull.connect(f"nats://127.0.0.1:{link.sockets[0].getsockname()[1]}")
        await jsx.reset_durable(nc.jetstream(timeout=5), "SIGNALS", jsx.durable_of("SIGNALS"), 1, max_ack_pending=64)
        puller = pull.BatchPuller(nc, "SIGNALS", jsx.durable_of("SIGNALS"), 48, got.append,  # 20 < half of 48
                                  on_unanswered=lambda: told.append(time.monotonic()))
        started = time.monotonic()
        await puller.start()
        await eventually(lambda: len(got) == 20, timeout=20)
        assert time.monotonic() - started > 2.5, "the link was not slow enough to test this"
        await eventually(lambda: puller.idle, timeout=5)
        assert told == [], "told unanswered while its messages arrived"
    finally:
        if puller is not None:
            await puller.stop()
        if nc is not None:
            await nc.close()
        link.close()


async def test_a_consumer_made_again_has_its_own_first_consumer_info_unanswered_told(nats_server, caplog) -> None:
    """A held ingest tells once that its consumer answers no consumer_info (`LagWatch.ask`), then none until it answers.
    Made again meanwhile, the new consumer's first failure was left untold: the old one's silence still counted."""
    caplog.set_level(logging.WARNING, logger="tipstream.ingest")
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    checkpoints, store = Checkpoints(), OnlineStore()

    async def delete_consumer() -> None:  # as the chunk is folded: the hold after it meets no consumer at once
        await js.delete_consumer("SIGNALS", jsx.durable_of("SIGNALS"))

    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, checkpoints, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=10, before=lambda reply: delete_consumer())
    ingest.lag_watch.held_every_s = 0.1

    def told() -> list[str]:
        return [r.getMessage() for r in caplog.records if "answers no consumer_info" in r.getMessage()]

    async def held_without_consumer(event: int) -> None:
        checkpoints.uncheckpointed = 10  # checkpoints fail: ingest holds after the chunk
        await jsx.publish_events(js, [("signals.app.opened", {
            "id": f"e{event}", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z"})])
        await eventually(lambda: len(told()) == event, timeout=5)

    await ingest.start()
    running = asyncio.create_task(ingest.run())
    try:
        await held_without_consumer(1)
        first = ingest.puller
        checkpoints.uncheckpointed = 0  # the hold ends, and the consumer is made again
        await eventually(lambda: ingest.puller is not first and not ingest.puller.stopped, timeout=10)
        await held_without_consumer(2)
        assert told()[1].startswith("the consumer tipstream-signals of stream SIGNALS answers no consumer_info (")
    finally:
        await stop_reading(ingest, nc, running)


async def test_the_lag_read_from_the_stream_leaves_out_what_it_no_longer_stores(nats_server) -> None:
    """The lag told from the stream while the consumer does not answer (`LagWatch._from_stream`) was its last sequence less
    the position: messages deleted past the position (a user forgotten, `streams.scrub`) counted as waiting. Once
    what was read is gone too (aged out, purged), what the stream stores is all past the position: that count."""
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    checkpoints, store = Checkpoints(), OnlineStore()

    async def delete_consumer() -> None:  # as the chunk is folded: the held ingest's lag is read from the stream
        with contextlib.suppress(NotFoundError):  # the chunk's first message deleted it
            await js.delete_consumer("SIGNALS", jsx.durable_of("SIGNALS"))

    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, checkpoints, batch=64, max_event_bytes=16384,
                          max_uncheckpointed=5, before=lambda reply: delete_consumer())
    ingest.lag_watch.held_every_s = 0.1

    def events(first: int, count: int) -> list[tuple[str, dict[str, Any]]]:
        return [("signals.app.opened", {"id": f"e{i}", "type": "app.opened", "user_id": f"u{i % 7}",
                                        "ts": "2026-11-26T08:00:00Z"}) for i in range(first, first + count)]

    checkpoints.uncheckpointed = 5  # checkpoints fail: ingest holds after the first chunk
    await jsx.publish_events(js, events(1, 5))
    await ingest.start()
    running = asyncio.create_task(ingest.run())
    try:
        await eventually(lambda: ingest.puller.paused and store.positions.get("SIGNALS") == 5)
        await jsx.publish_events(js, events(6, 10))  # 6-15, stored while ingest holds
        for seq in (7, 8, 9):  # erased before they were read
            await js.delete_msg("SIGNALS", seq)
        await js.purge_stream("SIGNALS", seq=6)  # 1-5, read, gone
        await eventually(lambda: ingest.lag == 7, timeout=5)  # 6 and 10-15
    finally:
        await stop_reading(ingest, nc, running)


@pytest.mark.parametrize("seen_first", ["consumer_info", "pull requests"])
async def test_a_fold_retried_while_the_consumer_is_silent_tells_the_silence_once(nats_server, caplog,
                                                                                  seen_first: str) -> None:
    """A fold retried (a user's state that cannot be loaded) asks for the lag (`LagWatch.ask`) while the puller asks on
    for messages. The server leading the consumer hangs: both its consumer_info and its pull requests go unanswered,
    and each told it (`LagWatch._tell_info_unanswered`, `._while_unanswered`), two warnings for one cause, whichever was
    seen first."""
    import os
    import signal

    caplog.set_level(logging.WARNING, logger="tipstream.ingest")
    nc = await pull.connect(nats_server.url)
    js = nc.jetstream(timeout=5)
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    store = OnlineStore()
    failing = [True]

    def sink(event: Any) -> bool:
        if failing[0]:
            raise StateUnavailable("the database is away")
        return store.apply(event)

    ingest = StreamIngest(nc, js, jsx.SIGNALS, store, Checkpoints(), batch=64, max_event_bytes=16384,
                          max_uncheckpointed=1000, sink=sink)
    ingest.lag_watch.held_every_s = 0.1 if seen_first == "consumer_info" else 3600.0  # asked once, at the first pause
    await ingest.start()
    running = asyncio.create_task(ingest.run())
    try:
        await jsx.publish_events(js, [("signals.app.opened", {
            "id": "e1", "type": "app.opened", "user_id": "u1", "ts": "2026-11-26T08:00:00Z"})])
        await eventually(lambda: "could not fold events" in caplog.text)  # retrying, the puller asking on
        if seen_first == "pull requests":  # the one ask answered before the server hangs: held 1, its lag
            await eventually(lambda: ingest.lag == 1, timeout=10)
        os.kill(nats_server.process.pid, signal.SIGSTOP)
        try:  # both ways have seen the silence
            wait_stopped(nats_server.process.pid)  # every thread: it may answer until then
            if seen_first == "pull requests":
                await eventually(lambda: ingest.lag_watch.unanswered_task is not None, timeout=10)
                assert not ingest.lag_watch.info_unanswered
                ingest.lag_watch.held_every_s = 0.1  # asked at the retry's next pause
            await eventually(lambda: ingest.lag_watch.info_unanswered and ingest.lag_watch.unanswered_task is not None, timeout=10)
        finally:
            os.kill(nats_server.process.pid, signal.SIGCONT)
        failing[0] = False
        await eventually(lambda: store.positions.get("SIGNALS") == 1, timeout=10)
    finally:
        await stop_reading(ingest, nc, running)
    told = [r.getMessage() for r in caplog.records
            if "answers no consumer_info" in r.getMessage() or "answers no pull request" in r.getMessage()]
    assert len(told) == 1, told
