"""What the start checks of the NATS server in NATS_URL (docs/operations.md, "Which NATS servers"): its release,
and its account's JetStream limits the service can live with: it starts, says what they cost, and
runs. (Limits it cannot live with end the start with the fix: tests/e2e/test_run_startup.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest

from app.bootstrap import Service
from app.nats_connection import NatsConnection
from app.settings import Settings
from app.start_errors import StartupError
from streams import jetstream as jsx
from streams.fold import to_ms
from streams.jetstream import durable_of, publish_events
from streams.simulator import Population
from tests.conftest import NatsServer, account_url, eventually, limited_account_server


@pytest.fixture
def capped_server(tmp_path: Path) -> Iterator[NatsServer]:
    """Storage capped, and at most 100 unacknowledged messages a consumer."""
    server = limited_account_server(tmp_path / "capped", "max_file: 1G, max_ack_pending: 100")
    server.start()
    yield server
    server.stop()


async def test_an_account_capping_unacknowledged_messages_slows_ingest_and_stops_nothing(
        start_service, capped_server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    """The consumers asked for TIPSTREAM_INGEST_BATCH x 32 and the server refused them (10121):
    the start ended. Ingest acknowledges a chunk at a time, so the account's cap is enough."""
    caplog.set_level(logging.WARNING, logger="tipstream")
    running = await start_service(nats_url=account_url(capped_server))
    events = list(Population(users=50, seed=3).history(days=1, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    assert len(events) > 500
    nc = await nats.connect(account_url(capped_server))
    try:
        await publish_events(nc.jetstream(), events)
        await eventually(lambda: running.service.store.applied == len(events), timeout=30)
        info = await nc.jetstream().consumer_info("SIGNALS", durable_of("SIGNALS"))
        assert info.config.max_ack_pending == 100
    finally:
        await nc.close()
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "lets a consumer hold 100 unacknowledged messages (max_ack_pending)" in warnings
    assert "Raise the account's max_ack_pending to 32768" in warnings
    # Unbounded streams in an account with a storage limit: once full, every event would be refused.
    assert "limited to 1,000,000,000 bytes (max_file)" in warnings
    assert "Set TIPSTREAM_STREAM_MAX_BYTES to at most 250,000,000" in warnings


def as_release(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """Every connection of the service reports `version` as its server's (no such old binary here)."""
    connect = NatsConnection.connect

    async def connected(self: NatsConnection, url: str, embedded: Any) -> Any:
        nc = await connect(self, url, embedded)
        nc._server_info["version"] = version
        return nc

    monkeypatch.setattr(NatsConnection, "connect", connected)


async def test_a_server_older_than_any_run_against_is_named_and_one_without_jetstream_stops_the_start(
        start_service, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tipstream")
    as_release(monkeypatch, "2.8.4")
    running = await start_service()
    await eventually(lambda: running.service.ready)
    [warning] = [r.getMessage() for r in caplog.records if "2.8.4" in r.getMessage()]
    assert warning.startswith(f"nats-server 2.8.4 at {nats_server.url} (NATS_URL) is older than any tipstream was "
                              "run against (2.9.10, 2.10.25, 2.15.1)"), warning
    assert "upgrade the server to 2.9 or newer" in warning
    await running.stop()

    as_release(monkeypatch, "2.1.9")
    service = Service(Settings(data_dir=tmp_path / "data", nats_url=nats_server.url))
    with pytest.raises(StartupError) as refused:
        await service.start()
    await service.stop()
    assert str(refused.value).startswith(f"nats-server 2.1.9 at {nats_server.url} (NATS_URL) has no JetStream"), \
        str(refused.value)


async def test_the_longest_retention_the_settings_take_is_one_jetstream_takes(nc: Any) -> None:
    """TIPSTREAM_STREAM_MAX_AGE_DAYS and TIPSTREAM_DLQ_MAX_AGE_DAYS stop where a Go duration does: a day
    more and the server refuses the streams' config ("invalid JSON"), which named no setting."""
    from app.settings import MAX_STREAM_AGE_DAYS
    from streams import jetstream as jsx

    js = nc.jetstream()
    await jsx.ensure_streams(js, max_age_days=MAX_STREAM_AGE_DAYS, max_bytes=-1, duplicate_window_s=120,
                             dlq_max_age_days=MAX_STREAM_AGE_DAYS)
    assert (await js.stream_info("DLQ")).config.max_age == MAX_STREAM_AGE_DAYS * 86_400
    with pytest.raises(nats.js.errors.BadRequestError, match="max_age|invalid JSON"):  # 2.9 names no field
        await jsx.ensure_streams(js, max_age_days=MAX_STREAM_AGE_DAYS + 1, max_bytes=-1, duplicate_window_s=120,
                                 dlq_max_age_days=MAX_STREAM_AGE_DAYS + 1)


async def test_a_changed_setting_keeps_what_an_operator_set_on_a_stream(nc: Any) -> None:
    """A start whose settings change a stream's limits updated it with a config made from scratch, so
    what an operator had set with `nats stream edit` (S2 compression, a description, a message size
    bound) was silently set back to the defaults."""
    from dataclasses import replace

    from nats.js.api import StoreCompression

    from streams import jetstream as jsx

    js = nc.jetstream()
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    operators = {"description": "events of the growth team's apps", "max_msg_size": 1 << 20}
    if (jsx.release(str(nc.connected_server_version)) or (0, 0)) >= (2, 10):  # compression came with 2.10
        operators["compression"] = StoreCompression.S2
    await js.update_stream(replace((await js.stream_info("SIGNALS")).config, **operators))

    await jsx.ensure_streams(js, max_age_days=2, max_bytes=50_000_000, duplicate_window_s=60, dlq_max_age_days=1)
    config = (await js.stream_info("SIGNALS")).config
    assert (config.max_age, config.max_bytes, config.duplicate_window) == (2 * 86_400, 50_000_000, 60)
    assert {name: getattr(config, name) for name in operators} == operators


async def test_a_smaller_stream_limit_at_a_start_drops_no_event_not_read_yet(start_service, nats_server) -> None:
    """A start with a smaller TIPSTREAM_STREAM_MAX_BYTES set it on the streams before ingest read them, and
    JetStream dropped their oldest messages at once: events published while the service was stopped, never
    read, were lost to the fold without a word (and then blamed on TIPSTREAM_STREAM_MAX_AGE_DAYS). The smaller
    limit is set once every stream has been read to its end: what it drops was read."""
    import orjson

    from streams.events import parse_event
    from streams.store import OnlineStore

    events = list(Population(users=20, seed=4).history(days=5, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    first = len(events) // 4
    running = await start_service()
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    try:
        await publish_events(js, events[:first])
        await eventually(lambda: running.service.store.applied >= first)
        await running.stop()
        await publish_events(js, events[first:])  # while the service is stopped: not read yet
        limit = (await js.stream_info("SIGNALS")).state.bytes // 2

        running = await start_service(stream_max_bytes=limit, score_max_body_bytes=1024)
        await eventually(lambda: running.service.ready, timeout=30)
        expected = OnlineStore()
        for _, event in events:
            expected.apply(parse_event(orjson.dumps(event)))
        assert running.service.store.users == expected.users

        async def limited() -> bool:
            info = await js.stream_info("SIGNALS")
            return info.config.max_bytes == limit and info.state.bytes <= limit

        await eventually(limited)
    finally:
        await client.close()


async def test_a_stream_made_otherwise_than_tipstream_makes_it_is_a_warning_naming_what_it_loses(
        nc: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An existing SIGNALS made by hand with interest retention in memory was used as it was, without a word:
    JetStream deleted each event once read, so a rebuild found none, and a restart of nats-server lost them all."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    from streams import jetstream as jsx

    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="SIGNALS", subjects=["signals.>"], retention=RetentionPolicy.INTEREST,
                                     storage=StorageType.MEMORY))
    with caplog.at_level(logging.WARNING, logger="tipstream.jetstream"):
        await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    [told] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert told.startswith("stream SIGNALS has interest retention") and "memory storage" in told, told
    assert "nats stream rm SIGNALS" in told
    assert (await js.stream_info("SIGNALS")).config.retention == RetentionPolicy.INTEREST  # kept, not changed


async def _started_with_limits_held(start_service, nats_server, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, int, list]:
    """A service started with a smaller TIPSTREAM_STREAM_MAX_BYTES than SIGNALS holds, every stream read, its own
    wait to set the limit put off (the tests run it themselves); the NATS client, the running service, the limit and
    the events published."""
    from app import bootstrap

    events = list(Population(users=20, seed=5).history(days=3, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await publish_events(js, events)
    limit = (await js.stream_info("SIGNALS")).state.bytes // 2
    monkeypatch.setattr(bootstrap, "STREAM_LIMITS_CHECK_S", 3600.0)
    running = await start_service(stream_max_bytes=limit, score_max_body_bytes=1024)
    await eventually(lambda: running.service.store.applied >= len(events), timeout=30)
    await eventually(lambda: all(running.service._read_to_end_now(ingest) for ingest in running.service.ingests))
    monkeypatch.setattr(bootstrap, "STREAM_LIMITS_CHECK_S", 0.01)
    return client, running, limit, events


async def test_a_smaller_stream_limit_waits_for_a_stream_read_again_though_caught_up_before(
        start_service, nats_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ingest `caught_up` (set once, for good) was taken for every stream read to its end: one read again
    from its first message (made again, or a reconnect to an older store) had its re-read cut by the smaller
    limit, the events it had not read yet dropped. Here SIGNALS' ingest stops reading, events are published
    meanwhile, and the limit waits until they are read."""
    import orjson

    from streams.events import parse_event
    from streams.store import OnlineStore

    client, running, limit, events = await _started_with_limits_held(start_service, nats_server, monkeypatch)
    service = running.service
    js = client.jetstream()
    try:
        [signals] = [ingest for ingest in service.ingests if ingest.spec.name == "SIGNALS"]
        await signals.pause_reading()
        assert signals.caught_up
        more = list(Population(users=20, seed=6).history(days=3, start_ms=to_ms(datetime(2026, 11, 5, tzinfo=UTC))))
        await publish_events(js, more)
        checks = 0
        drained = signals.drained

        def counted() -> bool:
            nonlocal checks
            checks += 1
            return drained()

        signals.drained = counted
        task = asyncio.create_task(service._lower_stream_limits_once_read(service._read_to_end))
        await eventually(lambda: task.done() or checks >= 3)
        assert (await js.stream_info("SIGNALS")).config.max_bytes != limit
        assert not task.done()

        signals.request_reset()  # reads on from its position
        await asyncio.wait_for(task, 30)
        expected = OnlineStore()
        for _, event in [*events, *more]:
            expected.apply(parse_event(orjson.dumps(event)))
        assert service.store.users == expected.users  # none dropped by the limit before it was read
        info = await js.stream_info("SIGNALS")
        assert info.config.max_bytes == limit
    finally:
        await client.close()


async def test_a_smaller_stream_limit_waits_for_a_stream_made_anew_past_the_old_one_s_last_message(
        start_service, nats_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit waits for each stream to be read past its last message when first asked: SIGNALS made anew
    meanwhile, longer, and read again from its first message, is waited for up to its own last message, not to the
    old one's (which its replay passes long before it is read)."""
    from streams import ack_subject

    client, running, _, _ = await _started_with_limits_held(start_service, nats_server, monkeypatch)
    service = running.service
    js = client.jetstream()
    try:
        needed: dict[str, tuple[int, int]] = {}
        assert await service._read_past(needed)
        old_last = needed["SIGNALS"][1]
        [signals] = [ingest for ingest in service.ingests if ingest.spec.name == "SIGNALS"]
        await signals.pause_reading()
        await js.delete_stream("SIGNALS")
        await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
        start_ms = to_ms(datetime(2026, 11, 5, tzinfo=UTC))
        anew = [item for item in Population(users=20, seed=6).history(days=6, start_ms=start_ms)
                if item[0].startswith("signals.")]
        assert len(anew) > old_last + 1
        await publish_events(js, anew)
        entered, release = asyncio.Event(), asyncio.Event()
        process = signals.process

        async def held(chunk: list) -> None:  # the replay reads past the old stream's last message, and waits
            head = [msg for msg in chunk if ack_subject.sequences(msg[1])[0] <= old_last + 1]
            if head:
                await process(head)
            if len(head) < len(chunk):
                entered.set()
                await release.wait()
                await process(chunk[len(head):])

        signals.process = held
        signals.request_reset()  # the reconnect, which finds another message at the last one read
        await asyncio.wait_for(entered.wait(), 20)
        assert service.store.positions["SIGNALS"] == old_last + 1
        assert not await service._read_past(needed)
        assert needed["SIGNALS"][1] == len(anew)
        release.set()
        await eventually(lambda: service._read_past(needed), timeout=20)
    finally:
        await client.close()


async def test_a_smaller_stream_limit_waiting_on_a_database_away_is_told_once_a_minute(
        start_service, nats_server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Its checkpoint failing for as long as the database was away, the wait to set the limits warned at every try,
    30 s apart at the backoff's most. Six tries that fail 25 s apart on its clock (not slept), then one that sets
    them: told at once, 75 s on with the two left out, and once they are set."""
    from app import bootstrap

    client, running, limit, _ = await _started_with_limits_held(start_service, nats_server, monkeypatch)
    monkeypatch.setattr(bootstrap, "STREAM_LIMITS_RETRY_MAX_S", 0.02)  # the backoff is not what is tested
    service = running.service
    now, checkpoint = [0.0], service.checkpointer.checkpoint
    failures, waiting = 6, None

    async def away() -> bool:
        nonlocal failures
        # The wait's tries only: the checkpointer's own, every 5 s in a task of its own, took one of the failures when
        # it came while the wait tried (every time with the wait's tries 1 s slower: 'after 5 tries that failed').
        if failures and asyncio.current_task() is waiting:
            failures, now[0] = failures - 1, now[0] + 25.0
            raise ConnectionError("the database is away")
        return await checkpoint()

    service.checkpointer.checkpoint = away
    caplog.set_level(logging.INFO, logger="tipstream")
    try:
        waiting = asyncio.create_task(service._lower_stream_limits_once_read(service._read_to_end,
                                                                             clock=lambda: now[0]))
        await asyncio.wait_for(waiting, 30)
        assert (await client.jetstream().stream_info("SIGNALS")).config.max_bytes == limit
    finally:
        await client.close()
    told = [r.getMessage() for r in caplog.records if "smaller limits" in r.getMessage()]
    assert len(told) == 3, told
    assert told[0].startswith("cannot set the streams' smaller limits yet (the database is away)"), told
    assert "more failed" not in told[0] and told[1].endswith("(2 more failed tries since the last line)"), told
    assert told[2] == "the streams' smaller limits are set, after 6 tries that failed", told


async def test_a_smaller_stream_limit_is_not_set_without_a_checkpoint_holding_what_was_read(
        start_service, nats_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpointer refused (the database lost commits this service had made: no checkpoint from then on),
    its `checkpoint()` returned False, and the smaller limit was set all the same: JetStream dropped events no
    checkpoint held, which the start after it had to read again."""
    client, running, limit, _ = await _started_with_limits_held(start_service, nats_server, monkeypatch)
    service = running.service
    try:
        service.checkpointer.refused = "the database lost checkpoints this service had committed (a test)"
        await asyncio.wait_for(service._lower_stream_limits_once_read(service._read_to_end), 30)
        assert (await client.jetstream().stream_info("SIGNALS")).config.max_bytes != limit
        assert not service._read_to_end.is_set()
    finally:
        await client.close()


async def test_a_smaller_stream_limit_is_set_while_events_keep_coming(start_service, nats_server) -> None:
    """Held until every stream was read to its very end at one look (each ingest idle: the server saying it has
    nothing more for a pull request): a stream whose events fill each pull request before it expires (here a batch of
    8 at 100 events a second; at the default TIPSTREAM_INGEST_BATCH, from about 1,000 a second) never looked so,
    and the smaller limit was never set (slower ones seldom did together: set late). It is set once what the streams held when it was found (what was published while
    the service was stopped, here) is read and checkpointed; none of that is dropped by it."""
    import orjson

    from streams.events import parse_event
    from streams.store import OnlineStore

    events = list(Population(users=20, seed=5).history(days=3, start_ms=to_ms(datetime(2026, 11, 1, tzinfo=UTC))))
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    await jsx.ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=120, dlq_max_age_days=1)
    await publish_events(js, events)  # while the service is stopped
    limit = (await js.stream_info("SIGNALS")).state.bytes // 2
    running = await start_service(stream_max_bytes=limit, score_max_body_bytes=1024, ingest_batch=8)
    later = list(Population(users=20, seed=6).history(days=60, start_ms=to_ms(datetime(2026, 11, 5, tzinfo=UTC))))
    feedback = [item for item in later if item[0].startswith("feedback.")]
    signals = [item for item in later if not item[0].startswith("feedback.")]
    more = [item for pair in zip(signals, feedback, strict=False) for item in pair]  # both streams busy
    published: list[tuple[str, dict[str, Any]]] = []
    stop = asyncio.Event()

    async def steadily() -> None:  # one event to SIGNALS and one to FEEDBACK every 10 ms, as a busy app's
        for item in more:
            if stop.is_set():
                return
            await publish_events(js, [item])
            published.append(item)
            if item[0].startswith("feedback."):
                await asyncio.sleep(0.01)

    publisher = asyncio.create_task(steadily())
    try:
        await eventually(lambda: len(published) >= 2, timeout=10)

        async def limited() -> bool:
            return (await js.stream_info("SIGNALS")).config.max_bytes == limit

        await eventually(limited, timeout=20, interval=0.2)
        assert not publisher.done(), "events kept coming until the limit was set"
        assert {item[0].split(".")[0] for item in published} == {"signals", "feedback"}
        stop.set()
        await publisher
        service = running.service
        last = {name: (await js.stream_info(name)).state.last_seq for name in ("SIGNALS", "FEEDBACK")}
        await eventually(lambda: all(service.store.positions.get(name) == seq for name, seq in last.items()), timeout=20)
        expected = OnlineStore()
        for _, event in [*events, *published]:
            expected.apply(parse_event(orjson.dumps(event)))
        assert service.store.users == expected.users  # none dropped by the limit before it was read
    finally:
        stop.set()
        await publisher
        await client.close()
