"""Ingest on a real nats-server: good events folded, bad ones dead-lettered with reasons, nothing stalls."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest

from app import version
from app.metrics import METRICS
from streams.dead_letters import DLQ_BATCH, DeadLettered, dlq_msg_id_prefix, last_dead_lettered
from streams.jetstream import (
    DLQ_KIND,
    DLQ_ORIGINAL_HEADER,
    DLQ_REASON,
    DLQ_SEQ,
    DLQ_STREAM,
    DLQ_SUBJECT,
    DLQ_TRUNCATED,
    FEEDBACK,
    SIGNALS,
    ensure_streams,
)
from tests.conftest import dead_lettered, eventually

TS = "2026-11-26T08:00:00+01:00"


def event(i: int, kind: str = "task.created", user: str = "u-1", **data: Any) -> dict[str, Any]:
    payload = {"task_id": f"t-{i}", **data} if kind.startswith("task.") else data
    return {"id": f"e-{i}", "type": kind, "user_id": user, "ts": TS, "v": 1, "data": payload}


OVERSIZED_SERIES = 'tipstream_dlq_total{reason="oversized",stream="SIGNALS"}'


async def dlq_messages(js: Any, expected: int) -> list[Any]:
    sub = await js.pull_subscribe("dlq.>", stream="DLQ")
    messages: list[Any] = []
    while len(messages) < expected:
        messages += await sub.fetch(expected - len(messages), timeout=5)
    return messages


async def test_bad_events_go_to_the_dlq_with_reasons_and_good_ones_around_them_apply(start_service, nc) -> None:
    running = await start_service(max_event_bytes=4096)
    js = nc.jetstream()
    bad = [
        ("signals.task.created", b'{"id": "broken", ', "invalid_json"),
        ("signals.task.exploded", orjson.dumps({**event(100), "type": "task.exploded"}), "unknown_type"),
        ("signals.task.created", orjson.dumps({k: v for k, v in event(101).items() if k != "user_id"}), "missing_field"),
        ("signals.task.created", orjson.dumps(event(102, priority="high")), "invalid_field"),
        ("signals.task.created", orjson.dumps(event(103, labels=["x" * 100] * 60)), "oversized"),
        ("signals.task.created", orjson.dumps(event(104)).replace(b"t-104", b"t-\xff\xfe"), "invalid_utf8"),
        ("signals.tip.reacted", orjson.dumps(event(105, "tip.reacted", tip_id="tip", reaction="liked")), "subject_mismatch"),
        ("signals.task.created", orjson.dumps({**event(106), "ts": "2099-01-01T00:00:00Z"}), "future_ts"),
    ]
    # The registry is this process's: another test's service in this worker (the ingest fuzz's) counted too.
    oversized_before = _series(generate_latest(METRICS.registry).decode(), OVERSIZED_SERIES)
    published = 0
    for i, (subject, body, _) in enumerate(bad):
        await js.publish("signals.task.created", orjson.dumps(event(i)), headers={"Nats-Msg-Id": f"e-{i}"})
        await js.publish(subject, body, headers={"Nats-Msg-Id": f"bad-{i}", "traceparent": f"00-{i:032x}-01"})
        published += 2
    await js.publish("signals.task.created", orjson.dumps(event(99)), headers={"Nats-Msg-Id": "e-99"})

    messages = await dlq_messages(js, len(bad))
    by_kind = {m.headers[DLQ_KIND]: m for m in messages}
    assert set(by_kind) == {kind for *_, kind in bad}
    for subject, body, kind in bad:
        message = by_kind[kind]
        assert message.subject == f"dlq.{subject}"
        assert message.headers[DLQ_SUBJECT] == subject
        assert message.data == body, "the DLQ keeps the original bytes"
        assert int(message.headers[DLQ_SEQ]) > 0 and message.headers[DLQ_REASON]
        # A body that names no event carries the headers it was published with, JetStream's among them renamed
        # (not acted on in the DLQ); the others name their event (fetching theirs halved the DLQ's pace).
        i = next(n for n, (*_, k) in enumerate(bad) if k == kind)
        carried = {k: v for k, v in message.headers.items() if k.startswith(DLQ_ORIGINAL_HEADER)}
        if kind in ("invalid_json", "invalid_utf8"):
            assert carried == {DLQ_ORIGINAL_HEADER + "Nats-Msg-Id": f"bad-{i}",
                               DLQ_ORIGINAL_HEADER + "traceparent": f"00-{i:032x}-01"}, message.headers
        else:
            assert carried == {} and orjson.loads(body)["id"], message.headers
    assert "priority" in by_kind["invalid_field"].headers[DLQ_REASON]
    assert "user_id" in by_kind["missing_field"].headers[DLQ_REASON]

    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == published + 1)
    async with running.http() as http:
        body = (await http.get("/users/u-1/features", params={"at": "2026-11-26T09:00:00+01:00"})).json()
        assert body["features"]["tasks_created_7d"]["value"] == len(bad) + 1
        metrics = (await http.get("/metrics")).text
    assert _series(metrics, OVERSIZED_SERIES) == oversized_before + 1
    # Every family docs/metrics.md lists is exposed, and (on Linux, as here) the process's own.
    assert "# TYPE process_resident_memory_bytes gauge" in metrics
    release = version.describe()
    assert (f'tipstream_build_info{{commit="{release.commit or ""}",schema="{release.schema}",version="{release.version}"}} 1.0'
            in metrics), "the release that runs, as `tipstream --version` names it"
    table = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \| (\w+) ", table, re.MULTILINE)
    assert len(documented) > 25
    for name, kind in documented:
        assert f"# TYPE {name} {kind}" in metrics, name


async def test_an_event_near_max_payload_goes_to_the_dlq_truncated_and_ingest_moves_on(start_service, nc) -> None:
    running = await start_service()
    js = nc.jetstream()
    # The body alone fits the server's max_payload; with the DLQ headers added it would not.
    padding = nc.max_payload - 100 - len(orjson.dumps(event(1, labels=[""])))
    big = orjson.dumps(event(1, labels=["x" * padding]))
    assert nc.max_payload - 200 < len(big) <= nc.max_payload
    await js.publish("signals.task.created", big)
    await js.publish("signals.task.created", orjson.dumps(event(2)))

    [message] = await dlq_messages(js, 1)
    assert message.headers[DLQ_KIND] == "oversized"
    assert message.headers[DLQ_TRUNCATED] == str(len(big))
    assert (message.headers[DLQ_STREAM], message.headers[DLQ_SEQ]) == ("SIGNALS", "1"), "where the whole event is"
    assert 0 < len(message.data) < len(big) and big.startswith(message.data)
    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == 2)
    assert store.users["u-1"].count("task.created") == 1


async def test_docs_operations_lists_every_header_a_dlq_copy_carries(start_service, nc) -> None:
    """docs/operations.md's DLQ section named neither the copy's own `Nats-Msg-Id` nor what it is for. Here a copy
    with the headers its body was published with, and one cut to fit: each header either carries is listed there."""
    running = await start_service()
    js = nc.jetstream()
    await js.publish("signals.task.created", b'{"id": ', headers={"Nats-Msg-Id": "bad-1", "traceparent": "00-ab-01"})
    await js.publish("signals.task.created", orjson.dumps(event(2, labels=["x" * (nc.max_payload - 200)])))
    copies = await dlq_messages(js, 2)
    await eventually(lambda: running.service.store.positions.get("SIGNALS") == 2)
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = text.split("## Invalid events: the DLQ\n", 1)[1].split("\n## ", 1)[0]
    names = {name for copy in copies for name in copy.headers}
    assert {DLQ_TRUNCATED, DLQ_ORIGINAL_HEADER + "traceparent", "Nats-Msg-Id"} <= names
    for name in names:
        listed = DLQ_ORIGINAL_HEADER + "<name>" if name.startswith(DLQ_ORIGINAL_HEADER) else name
        assert f"`{listed}`" in section, f"{name}, which a DLQ copy carries, is not listed in docs/operations.md"
    assert "`dlq:<stream>:<created>:<seq>`" in section
    prefix = dlq_msg_id_prefix("SIGNALS", (await js.stream_info("SIGNALS")).created)
    assert re.fullmatch(r"dlq:SIGNALS:\d+:", prefix)
    assert sorted(copy.headers["Nats-Msg-Id"] for copy in copies) == [f"{prefix}1", f"{prefix}2"]


async def test_a_deleted_dlq_is_created_again_and_the_stream_moves_on(start_service, nc) -> None:
    """The DLQ deleted while the service runs (an operator emptying it): the next bad event's copy had no
    stream to take it, and ingest retried that publish until a restart made the DLQ again, folding nothing
    of the stream meanwhile."""
    running = await start_service()
    js = nc.jetstream()
    await js.delete_stream("DLQ")
    await js.publish("signals.task.created", b'{"id": "broken", ')
    await js.publish("signals.task.created", orjson.dumps(event(1)))
    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == 2)
    assert store.users["u-1"].count("task.created") == 1
    [message] = await dlq_messages(js, 1)
    assert (message.headers[DLQ_KIND], message.headers[DLQ_SEQ]) == ("invalid_json", "1")
    assert message.data == b'{"id": "broken", '


async def _checkpoint_then_recreate_signals(start_service: Any, nc: Any) -> Any:
    """A service checkpoints SIGNALS at 5 and stops; then the stream is re-created (its NATS store
    lost), so its sequences start again, below the checkpoint's. JetStream, for the test to publish."""
    first = await start_service()
    js = nc.jetstream()
    for i in range(5):
        await js.publish("signals.task.created", orjson.dumps(event(i)))
    await eventually(lambda: first.service.store.positions.get("SIGNALS") == 5)
    await first.stop()
    await js.delete_stream("SIGNALS")
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    return js


async def test_a_checkpoint_past_the_end_of_a_recreated_stream_replays_it_and_says_so(
    start_service, nc, caplog
) -> None:
    js = await _checkpoint_then_recreate_signals(start_service, nc)
    for i in range(3):
        await js.publish("signals.task.created", orjson.dumps(event(100 + i, user="u-2")))
    with caplog.at_level(logging.INFO):
        second = await start_service()
        await eventually(lambda: "u-2" in second.service.store.users
                         and second.service.store.users["u-2"].count("task.created") == 3)
    [told] = [r.getMessage() for r in caplog.records if "not the one the checkpoint was taken from" in r.getMessage()]
    # Deleted and made again after the checkpoint: said so, and when, not guessed a store restored from an older copy.
    created = (await js.stream_info("SIGNALS")).created.isoformat(timespec="milliseconds")
    assert f"SIGNALS was made again at {created}, after the message read there was stored" in told, told
    assert "older copy" not in told, told
    # The line after the error said "consuming SIGNALS from sequence 6", the checkpoint's, not the replay's.
    consuming = [r.getMessage() for r in caplog.records if r.getMessage().startswith("consuming SIGNALS")]
    assert consuming == ["consuming SIGNALS from sequence 1"], consuming


async def test_a_recreated_stream_that_grew_past_the_checkpoint_before_the_start_is_replayed_whole(
    start_service, nc, caplog
) -> None:
    """Its NATS store lost (or restored from an older copy) while the service was stopped, and
    published to meanwhile past the checkpoint's position: the start resumed after that position,
    and the new stream's events up to it were never folded nor dead-lettered, with nothing logged."""
    js = await _checkpoint_then_recreate_signals(start_service, nc)
    # At once: told apart by when NATS stored the message at the position, not by the clock.
    await js.publish("signals.task.created", b"{not json")
    for i in range(7):
        await js.publish("signals.task.created", orjson.dumps(event(100 + i, user="u-2")))
    before = dead_lettered("SIGNALS")
    with caplog.at_level(logging.INFO):
        second = await start_service()
        store = second.service.store
        await eventually(lambda: second.service.ready and "u-2" in store.users)
    assert store.users["u-2"].count("task.created") == 7
    assert store.users["u-1"].count("task.created") == 5, "the old stream's events, from the checkpoint"
    assert dead_lettered("SIGNALS") == before + 1
    [told] = [r.getMessage() for r in caplog.records if "its message 5 is not the one read there" in r.getMessage()]
    created = (await js.stream_info("SIGNALS")).created.isoformat(timespec="milliseconds")
    assert f"SIGNALS was made again at {created}, after the message read there was stored" in told, told
    assert "was it deleted and created again" in told and "older copy" not in told, told
    await second.stop()

    # The position is the new stream's now: the next start resumes after it, and says nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        third = await start_service()
        await eventually(lambda: third.service.ready and "u-2" in third.service.store.users)
    assert third.service.store.users["u-2"].count("task.created") == 7
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert dead_lettered("SIGNALS") == before + 1


async def _restart_with_positions_written(start_service: Any, nc: Any, caplog: Any, change: str,
                                         before_start: Any = None) -> list[str]:
    """Checkpoint SIGNALS at 5, stop, `change` the stored positions (SQL), publish 2 events and
    start again (after `before_start()`): the log lines about consuming SIGNALS, and any error."""
    first = await start_service()
    js = nc.jetstream()
    for i in range(5):
        await js.publish("signals.task.created", orjson.dumps(event(i)))
    await eventually(lambda: first.service.store.positions.get("SIGNALS") == 5)
    engine = first.service.engine
    await first.stop()
    with engine.begin() as conn:
        assert conn.execute(sa.text("select stored_us from stream_positions where stream = 'SIGNALS'")).scalar()
        conn.execute(sa.text(change))
    for i in range(5, 7):
        await js.publish("signals.task.created", orjson.dumps(event(i)))
    if before_start is not None:
        before_start()
    with caplog.at_level(logging.INFO):
        second = await start_service()
        await eventually(lambda: second.service.store.positions.get("SIGNALS") == 7)
    assert second.service.store.users["u-1"].count("task.created") == 7
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR or r.getMessage().startswith("consuming SIGNALS")]


async def test_a_nats_clock_ahead_of_this_hosts_does_not_make_a_start_replay_the_stream(
    start_service, nc, caplog
) -> None:
    """The check for a re-created stream compared the message's stored time (the NATS server's
    clock) with the checkpoint's (this host's): a server a second ahead made every start replay
    every stream from its first message, and say the stream was another."""
    host_clock_years_behind = "update stream_positions set updated_at = '2000-01-01 00:00:00'"
    said = await _restart_with_positions_written(start_service, nc, caplog, host_clock_years_behind)
    assert said == ["consuming SIGNALS from sequence 6"]


async def test_a_nats_slow_to_answer_at_the_start_is_waited_for_not_told_by_the_clock(
    start_service, nc, caplog, monkeypatch
) -> None:
    """The start asked when the message was stored with the checkpoint's 1 s bound: a NATS server
    slower than that (busy recovering its streams after a restart) was told by the clocks instead,
    and one whose clock ran ahead of this host's had every stream replayed from its first message."""
    from nats.js import JetStreamContext

    get_msg = JetStreamContext.get_msg

    async def slow(self: Any, stream: str, *args: Any, **kwargs: Any) -> Any:
        # SIGNALS' answers (its checkpointed message's) take this long: a simulated slowness, not a wait for a
        # race. Not the DLQ's too, which each stream's ingest asks at its start: 4.5 s more, under no bound.
        if stream == "SIGNALS":
            await asyncio.sleep(1.5)
        return await get_msg(self, stream, *args, **kwargs)

    host_clock_years_behind = "update stream_positions set updated_at = '2000-01-01 00:00:00'"
    said = await _restart_with_positions_written(
        start_service, nc, caplog, host_clock_years_behind,
        before_start=lambda: monkeypatch.setattr(JetStreamContext, "get_msg", slow))
    assert said == ["consuming SIGNALS from sequence 6"]


async def test_a_checkpoint_without_the_stored_time_is_checked_by_the_clock_as_before(
    start_service, nc, caplog
) -> None:
    """An older release's checkpoint has no stored time: its checkpoint time is all there is."""
    said = await _restart_with_positions_written(
        start_service, nc, caplog,
        "update stream_positions set stored_us = null, updated_at = '2000-01-01 00:00:00'")
    assert "stored after that checkpoint was written" in said[0]
    assert said[1:] == ["consuming SIGNALS from sequence 1"]


async def test_a_second_service_on_the_same_nats_is_refused_and_the_first_reads_on(
    start_service, nats_server, nc, tmp_path
) -> None:
    """Two services (SQLite, each its own data directory) on one NATS server: the second re-created
    the first's durable consumers, and each folded part of every stream."""
    from app.bootstrap import Service
    from app.settings import Settings
    from app.start_errors import StartupError

    first = await start_service()
    await eventually(lambda: first.service.ready)
    second = Service(Settings(data_dir=tmp_path / "second", nats_url=nats_server.url))
    with pytest.raises(StartupError) as refused:
        await second.start()
    await second.stop()
    assert str(refused.value).startswith("Another tipstream service reads SIGNALS, FEEDBACK"), str(refused.value)
    assert "a pull request waits on its consumer tipstream-signals, or what it hands out moves on" in str(refused.value)
    js = nc.jetstream()
    for i in range(3):  # all of them, to the first: its consumers were left alone
        await js.publish("signals.task.created", orjson.dumps(event(i)))
    await eventually(lambda: first.service.store.positions.get("SIGNALS") == 3)
    assert first.service.store.users["u-1"].count("task.created") == 3
    await first.stop()
    third = await start_service(data_dir=tmp_path / "second")  # the first stopped: its requests went with it
    await eventually(lambda: third.service.ready)


async def test_a_second_service_refused_on_the_same_nats_leaves_the_first_s_streams_as_they_were(
    start_service, nats_server, nc, tmp_path
) -> None:
    """The second service set its own stream limits before it found the first reading: refused all the
    same, its TIPSTREAM_STREAM_MAX_BYTES made JetStream drop the first's oldest events."""
    from app.bootstrap import Service
    from app.settings import Settings
    from app.start_errors import StartupError

    first = await start_service()
    await eventually(lambda: first.service.ready)
    js = nc.jetstream()
    for i in range(20):
        await js.publish("signals.task.created", orjson.dumps(event(i)))
    await eventually(lambda: first.service.store.positions.get("SIGNALS") == 20)
    second = Service(Settings(data_dir=tmp_path / "second", nats_url=nats_server.url, stream_max_bytes=1_000_000,
                              stream_max_age_days=1, duplicate_window_s=1))
    with pytest.raises(StartupError, match="Another tipstream service reads"):
        await second.start()
    await second.stop()
    signals = await js.stream_info("SIGNALS")
    assert (signals.config.max_bytes, signals.config.max_age, signals.config.duplicate_window) == (-1, 90 * 86400, 120)
    assert (signals.state.first_seq, signals.state.messages) == (1, 20)


async def test_a_pull_request_left_by_a_service_gone_does_not_refuse_the_restart(start_service, nc, tmp_path) -> None:
    """The last request of a service gone this instant, or whose host was lost with its connection
    (the server keeps it until it expires), is no running service's: the restart was refused."""
    first = await start_service()
    await eventually(lambda: first.service.ready)
    await first.stop()
    left = nc.new_inbox()
    await nc.subscribe(left)  # never asked again, as from a service no longer there
    await nc.publish("$JS.API.CONSUMER.MSG.NEXT.SIGNALS.tipstream-signals",
                     orjson.dumps({"batch": 10, "expires": int(1e9)}), reply=left)
    await nc.flush()
    js = nc.jetstream()

    async def waiting() -> bool:  # the server registers a pull request apart from the API's answers
        return (await js.consumer_info("SIGNALS", "tipstream-signals")).num_waiting >= 1

    await eventually(waiting, timeout=5)
    again = await start_service()
    await eventually(lambda: again.service.ready)
    await js.publish("signals.task.created", orjson.dumps(event(0)))
    await eventually(lambda: again.service.store.positions.get("SIGNALS") == 1)


async def test_a_service_catching_up_a_backlog_is_seen_reading_though_no_request_of_its_waits(
        start_service, nc) -> None:
    """A service catching up has each request answered as soon as made, so none waits: the check saw no
    reader, and a second service started on the streams of the first."""
    from streams.jetstream import read_by_another

    first = await start_service()
    await eventually(lambda: first.service.ready)
    await first.stop()  # its consumer stays, read from here by `catch_up` as the service would
    js = nc.jetstream()
    for i in range(1000):
        await js.publish("signals.task.created", orjson.dumps(event(i)))
    stop = asyncio.Event()

    async def catch_up() -> int:
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox)
        read = 0
        while not stop.is_set():
            # no_wait: answered at once, one message a time, so no request of the reader's is left waiting
            await nc.publish("$JS.API.CONSUMER.MSG.NEXT.SIGNALS.tipstream-signals",
                             orjson.dumps({"batch": 1, "no_wait": True}), reply=inbox)
            msg = await answers.next_msg(timeout=5)
            if not msg.reply:  # 404: nothing left
                break
            await nc.publish(msg.reply, b"+ACK")
            read += 1
            await asyncio.sleep(0.005)  # the fold of what it read
        return read

    reader = asyncio.create_task(catch_up())
    try:
        assert await read_by_another(js, ["SIGNALS", "FEEDBACK"]) == ["SIGNALS"]
    finally:
        stop.set()
        read = await reader
    assert 0 < read < 1000, "the backlog lasted the whole check"
    assert await read_by_another(js, ["SIGNALS"]) == [], "no one reads it now"


# A start with no checkpoint on a stream whose first messages are gone: aged out, erased or purged, the
# stream cannot tell which, nor them from sequences a write that failed used up.
KEPT_FROM = ("stream SIGNALS keeps sequences {} on; those before are gone (past its retention, erased with a user "
             "forgotten, or purged), or were never stored (a write to an empty stream that nats-server failed, its disk "
             "full, is given a sequence)")


async def test_events_past_retention_are_warned_of_only_when_a_checkpoint_wanted_them(nc, caplog) -> None:
    from streams.jetstream import reset_durable

    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    for i in range(5):
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
    await js.purge_stream("SIGNALS", seq=4)  # as retention does: 1..3 are gone
    with caplog.at_level(logging.INFO, logger="tipstream.jetstream"):
        assert await reset_durable(js, "SIGNALS", "test-rebuild", 1, max_ack_pending=10) == (2, 4)
        rebuild = [(r.levelname, r.getMessage()) for r in caplog.records]
        caplog.clear()
        await reset_durable(js, "SIGNALS", "test-behind", 2, max_ack_pending=10)
        behind = [(r.levelname, r.getMessage()) for r in caplog.records]
    # No checkpoint (a rebuild): nothing was missed, so no warning.
    assert rebuild == [("INFO", KEPT_FROM.format(4))]
    warned = ("stream SIGNALS starts at 4 but the checkpoint wants 2: events 2..3 expired by retention. Raise "
              "TIPSTREAM_STREAM_MAX_AGE_DAYS to keep more.")
    assert behind == [("WARNING", warned)]


async def test_a_rebuild_after_a_user_s_first_messages_were_erased_does_not_blame_retention(nc, caplog) -> None:
    """docs/operations.md forgets a user, then rebuilds: the stream's first messages, theirs, were erased
    minutes before, and the start said they were past the stream's retention."""
    from streams.jetstream import reset_durable

    js = nc.jetstream()
    await ensure_streams(js, max_age_days=90, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    for i in range(3):
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
    await nc.request("$JS.API.STREAM.MSG.DELETE.SIGNALS", b'{"seq": 1}', timeout=5)  # as streams/scrub.py erases
    with caplog.at_level(logging.INFO, logger="tipstream.jetstream"):
        assert await reset_durable(js, "SIGNALS", "test-rebuild", 1, max_ack_pending=10) == (2, 2)
    told = [r.getMessage() for r in caplog.records]
    assert told == [KEPT_FROM.format(2)]


async def test_a_stream_whose_first_write_failed_on_a_full_disk_is_told_as_never_stored_not_as_lost(
        full_disk_nats_server, tmp_path: Path, caplog) -> None:
    """nats-server with its store's disk full gives the write it fails a sequence and stores nothing: SIGNALS,
    empty then, started at 2 once the server had room and was restarted, and a rebuild said of sequence 1 'those
    before are gone (past its retention, or erased with a user forgotten)', as if an event had been lost, where the
    event not acknowledged had been published again. The server's own log says it failed a write to SIGNALS."""
    from app.embedded_nats import EmbeddedNats
    from streams.jetstream import reset_durable

    server = full_disk_nats_server
    client = await nats.connect(server.url)
    js = client.jetstream(timeout=1)
    await ensure_streams(js, max_age_days=90, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    server.fill()
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish("signals.app.opened", orjson.dumps(event(0, "app.opened")))
    await client.close()
    server.free()
    server.stop()
    server.start()
    client = await nats.connect(server.url)
    try:
        js = client.jetstream(timeout=5)
        assert (await js.publish("signals.app.opened", orjson.dumps(event(0, "app.opened")))).seq == 2
        # Read as the embedded server's log is: this one's, where it wrote it.
        embedded = EmbeddedNats(server.store)
        (server.store / "nats-server.log").symlink_to(server.store / "server.log")
        assert embedded.store_failed("FEEDBACK") is None
        assert embedded.store_failed("SIGNALS") == "the embedded nats-server's log says it failed to store a message of SIGNALS"
        with caplog.at_level(logging.INFO, logger="tipstream.jetstream"):
            assert await reset_durable(js, "SIGNALS", "test-rebuild", 1, max_ack_pending=10,
                                       store_failed=embedded.store_failed) == (1, 2)
    finally:
        await client.close()
    told = [r.getMessage() for r in caplog.records]
    never_stored = ("stream SIGNALS keeps sequences 2 on; those before were most likely never stored: nats-server "
                    "gives a write to an empty stream that fails (its store's disk full) a sequence and stores "
                    "nothing, and the embedded "
                    "nats-server's log says it failed to store a message of SIGNALS; the event not acknowledged is "
                    "published again. Else they are gone (past its retention, erased with a user forgotten, or "
                    "purged)")
    assert told == [never_stored], told


async def test_a_recreated_stream_s_bad_event_reaches_the_dlq_within_the_duplicate_window(start_service, nc) -> None:
    """A DLQ copy's `Nats-Msg-Id` named the stream and sequence only: the first bad event of a stream re-created
    within JetStream's duplicate window had its predecessor's id, and the DLQ dropped it as a duplicate
    (counted, logged, and nowhere to be found)."""
    first = await start_service()
    js = nc.jetstream()
    await js.publish("signals.task.created", b"{old stream")
    await eventually(lambda: first.service.store.positions.get("SIGNALS") == 1)
    await first.stop()
    await js.delete_stream("SIGNALS")
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    await js.publish("signals.task.created", b"{new stream")
    second = await start_service()
    await eventually(lambda: second.service.store.positions.get("SIGNALS") == 1 and second.service.ready)
    copies = await dlq_messages(js, 2)
    assert sorted(copy.data for copy in copies) == [b"{new stream", b"{old stream"]
    assert {copy.headers[DLQ_SEQ] for copy in copies} == {"1"}
    await second.stop()


async def test_a_bad_event_of_a_recreated_stream_goes_to_the_dlq_though_the_checkpoint_is_past_it(
    start_service, nc, caplog
) -> None:
    """The checkpointed position tells what was dead-lettered before this start only on the stream
    it was taken from. Past the end of a re-created stream, it skipped the new stream's bad events
    below it: neither folded nor in the DLQ."""
    js = await _checkpoint_then_recreate_signals(start_service, nc)
    await js.publish("signals.task.created", orjson.dumps(event(100, user="u-2")))
    await js.publish("signals.task.created", b"{not json")
    await js.publish("signals.task.created", orjson.dumps(event(101, user="u-2")))
    before = dead_lettered("SIGNALS")
    second = await start_service()
    store = second.service.store
    await eventually(lambda: second.service.ready and "u-2" in store.users)  # every message read
    assert store.users["u-2"].count("task.created") == 2
    assert dead_lettered("SIGNALS") == before + 1
    [copy] = await dlq_messages(js, 1)
    assert copy.headers[DLQ_STREAM] == "SIGNALS" and copy.headers[DLQ_SEQ] == "2"
    await second.stop()

    # The position is the new stream's since the second start: the next resumes after it, says
    # nothing, and dead-letters nothing again. It stayed past the stream's end, and every start
    # replayed the whole stream and logged the error again until the stream passed it.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        third = await start_service()
        await eventually(lambda: third.service.ready and "u-2" in third.service.store.users)
    assert dead_lettered("SIGNALS") == before + 1
    assert third.service.store.users["u-2"].count("task.created") == 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    consuming = [r.getMessage() for r in caplog.records if r.getMessage().startswith("consuming SIGNALS")]
    assert consuming == ["consuming SIGNALS from sequence 4"], consuming


async def test_redelivered_and_republished_events_count_once(start_service, nc, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tipstream"):
        running = await start_service(duplicate_window_s=1)
    # Shorter than the publisher's sends again (decision_publisher.RESENT_WITHIN_S): the start says so, once.
    short = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TIPSTREAM_DUPLICATE_WINDOW_S=1 ")]
    assert len(short) == 1 and "stored twice in DECISIONS" in short[0], short
    js = nc.jetstream()
    first = event(1, "task.completed")
    await js.publish("signals.task.completed", orjson.dumps(first), headers={"Nats-Msg-Id": "e-1"})
    # Same id without the header: JetStream stores it again; the fold must still count it once.
    await js.publish("signals.task.completed", orjson.dumps(first))
    await js.publish("signals.task.completed", orjson.dumps(event(2, "task.completed")))
    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == 3)
    assert store.users["u-1"].count("task.completed") == 2
    assert store.ignored >= 1


async def test_readyz_turns_ready_once_caught_up(start_service, nc) -> None:
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    for i in range(500):
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
    running = await start_service()
    async with running.http() as http:

        async def ready() -> Any:
            response = await http.get("/readyz")
            return response if response.status_code == 200 else None

        body = (await eventually(ready)).json()
        assert body["streams"]["SIGNALS"] == {"caught_up": True, "lag": 0, "replaying": None}
        assert running.service.store.positions["SIGNALS"] == 500
        assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_a_long_catch_up_tells_its_progress_in_the_log(start_service, nc, monkeypatch, caplog) -> None:
    from app import catch_up

    monkeypatch.setattr(catch_up, "REPORT_EVERY_S", 0.0)  # a line for every chunk read
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    total = 3_000
    for i in range(total):
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
    caplog.set_level(logging.INFO, logger="tipstream.ingest")
    running = await start_service()
    await eventually(lambda: running.service.ingests[0].caught_up)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIGNALS: ")]
    steps = [re.fullmatch(r"SIGNALS: catching up, ([\d,]+) events read, ([\d,]+) to go \([\d,]+ events/s, about "
                          r"[\d,]+ s left\)", line) for line in lines[:-1]]
    assert steps and all(steps), lines
    read = [int(step.group(1).replace(",", "")) for step in steps]
    assert read == sorted(read) and all(int(s.group(2).replace(",", "")) == total - n for s, n in zip(steps, read))
    assert re.fullmatch(r"SIGNALS: caught up, 3,000 events read in [\d.]+ s \([\d,]+ events/s\)", lines[-1]), lines


async def test_the_catch_up_counts_the_events_read_not_the_sequences_aged_out(start_service, nc, caplog) -> None:
    # A stream past its retention starts after sequence 1, where a rebuild's consumer starts:
    # the sequences before its first message were told as read (3,000 read of 1,000 kept).
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    for i in range(3_000):
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
    await js.purge_stream("SIGNALS", seq=2_001)  # as retention would: the oldest 2,000 are gone
    caplog.set_level(logging.INFO, logger="tipstream.ingest")
    running = await start_service()
    await eventually(lambda: running.service.ingests[0].caught_up)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SIGNALS: caught up")]
    assert len(lines) == 1 and re.fullmatch(r"SIGNALS: caught up, 1,000 events read in [\d.]+ s \([\d,]+ events/s\)",
                                            lines[0]), lines


def _series(metrics_text: str, name: str) -> float:
    """One series' value from /metrics (0 when it has none yet)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_metrics_time_what_is_folded_live_and_when_a_checkpoint_last_succeeded(start_service, nc) -> None:
    """An operator alerts on seconds, not on messages: how long a live event took to reach the
    user's state (the backlog read at a start is left out), and how old the last checkpoint is."""
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    for i in range(300):
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
    count, total = (f'tipstream_fold_delay_seconds_{kind}{{stream="SIGNALS"}}' for kind in ("count", "sum"))
    before = generate_latest(METRICS.registry).decode()  # the process's: earlier tests' too
    running = await start_service(checkpoint_every_s=0.2)
    async with running.http() as http:
        await eventually(lambda: running.service.ready)
        backlog = _series((await http.get("/metrics")).text, count) - _series(before, count)
        for i in range(300, 310):
            await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
        await eventually(lambda: running.service.store.positions.get("SIGNALS") == 310)
        started = time.time()
        text = await eventually(lambda: _metrics_with_checkpoint_after(http, started))
    live = _series(text, count) - _series(before, count) - backlog
    seconds = _series(text, total) - _series(before, total)
    assert backlog == 0 and 1 <= live <= 10 and 0 <= seconds < 5 * live, (backlog, live, seconds)


async def test_the_event_loop_lag_shows_a_step_that_holds_the_loop(start_service, monkeypatch) -> None:
    from app import loop_lag

    monkeypatch.setattr(loop_lag, "INTERVAL_S", 0.01)
    running = await start_service()
    async with running.http() as http:
        before = (await http.get("/metrics")).text  # one scrape: samples come every 10 ms
        held_before = _series(before, "tipstream_event_loop_lag_seconds_count") - _series(
            before, 'tipstream_event_loop_lag_seconds_bucket{le="0.1"}')
        total_before = _series(before, "tipstream_event_loop_lag_seconds_count")
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: a step that holds the loop (a read on it, a large copy)
        text = await eventually(lambda: _lag_sampled_after(http, total_before + 2))
    held = _series(text, "tipstream_event_loop_lag_seconds_count") - _series(
        text, 'tipstream_event_loop_lag_seconds_bucket{le="0.1"}')
    assert held - held_before >= 1, "the 0.3 s hold was sampled as over 0.1 s late"


async def _lag_sampled_after(http: httpx.AsyncClient, count: float) -> str | None:
    text = (await http.get("/metrics")).text
    return text if _series(text, "tipstream_event_loop_lag_seconds_count") >= count else None


async def _metrics_with_checkpoint_after(http: httpx.AsyncClient, started: float) -> str | None:
    text = (await http.get("/metrics")).text
    return text if _series(text, "tipstream_checkpoint_ok_timestamp_seconds") >= started else None


def feedback(i: int, reaction: str = "liked", **data: Any) -> dict[str, Any]:
    return {"id": f"f-{i}", "type": "tip.reacted", "user_id": "u-1", "ts": TS, "v": 1,
            "data": {"tip_id": "tip-1", "reaction": reaction, **data}}


def learner_positions(engine: Any) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(sa.text("select state from learner_state where name = 'learner'")).first()
    return orjson.loads(bytes(row[0]))["positions"] if row else {}


async def test_a_restart_does_not_dead_letter_a_bad_feedback_again(start_service, nc) -> None:
    """FEEDBACK is re-read from the learner's last snapshot. That moved only when the learner
    learned something, and feedback without a decision teaches it nothing: a bad message after it
    was dead-lettered again at every start (counted and published again each time, a second DLQ
    copy once JetStream's duplicate window had passed). The snapshot now follows FEEDBACK (a clean
    stop: the next start re-reads nothing), and a re-read skips what was dead-lettered (a crash)."""
    js = nc.jetstream()
    first = await start_service(checkpoint_every_s=0.1)
    await js.publish("feedback.tip.reacted", orjson.dumps(feedback(1, decision_id="d-unknown")))
    await eventually(lambda: learner_positions(first.service.engine).get("FEEDBACK") == 1)  # it waits: a change
    before = dead_lettered("FEEDBACK")
    for i in range(2, 10):
        await js.publish("feedback.tip.reacted", orjson.dumps(feedback(i)))
    bad = await js.publish("feedback.tip.reacted", orjson.dumps(feedback(10, reaction="meh")))
    await eventually(lambda: dead_lettered("FEEDBACK") == before + 1)
    await first.stop()
    assert learner_positions(first.service.engine)["FEEDBACK"] == bad.seq, "feedback that taught nothing counts"

    again = await start_service()
    await eventually(lambda: again.service.ready)
    assert again.service.store.positions["FEEDBACK"] == bad.seq
    assert dead_lettered("FEEDBACK") == before + 1
    assert (await js.stream_info("DLQ")).state.messages == 1


async def test_a_dlq_message_forged_by_a_publisher_neither_stops_the_dlq_nor_the_start(start_service, nc) -> None:
    """A start reads how far dead-lettering had got from the newest DLQ message of each stream's subjects,
    which anyone who may publish on `dlq.>` can write. A sequence past the stream's end turned the DLQ off
    for that stream (its bad events dropped uncounted, unlogged, and no newer DLQ message ever replaced the
    forged one), and one of 5,000 digits ended every start (int() refuses it) for the DLQ's retention."""
    js = nc.jetstream()
    first = await start_service()
    good = await js.publish("signals.task.created", orjson.dumps(event(1)))
    await eventually(lambda: first.service.store.positions.get("SIGNALS") == good.seq)
    await first.stop()
    await js.publish("dlq.signals.app.opened", b"{}", headers={DLQ_STREAM: "SIGNALS", DLQ_SEQ: "99999999"})
    await js.publish("dlq.feedback.tip.reacted", b"{}", headers={DLQ_STREAM: "FEEDBACK", DLQ_SEQ: "9" * 5000})
    assert await last_dead_lettered(js, SIGNALS) == DeadLettered() == await last_dead_lettered(js, FEEDBACK)

    again = await start_service()
    await eventually(lambda: again.service.ready)
    before = dead_lettered("SIGNALS")
    await js.publish("signals.task.created", orjson.dumps({**event(2), "data": {}}))
    await eventually(lambda: dead_lettered("SIGNALS") == before + 1)
    assert (await js.stream_info("DLQ")).state.messages == 3


async def test_a_start_after_a_crash_mid_batch_dead_letters_what_the_dlq_missed_and_nothing_twice(
        start_service, nc) -> None:
    """Dead letters are published a batch at once, and a crash (a reconnect between two of them) can leave
    the DLQ with a later one of the batch and not an earlier. Taken as the newest copy's sequence, what was
    dead-lettered skipped the earlier ones for good; the batch named in each copy says where to look."""
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    bad = {3, 5, 6, 7, 8}
    for seq in range(1, 11):
        body = b"{not json" if seq in bad else orjson.dumps(event(seq, "app.opened"))
        assert (await js.publish("signals.app.opened", body)).seq == seq
    # As the crash left them: the batch before whole, and of the last (5 to 8) only 5 and 8, read back past
    # a copy of another stream's.
    for seq, batch in ((3, "3/1"), (5, "5/4"), (8, "5/4")):
        await js.publish("dlq.signals.app.opened", b"{not json",
                         headers={DLQ_STREAM: "SIGNALS", DLQ_SEQ: str(seq), DLQ_BATCH: batch})
        if seq == 5:
            await js.publish("dlq.feedback.tip.reacted", b"{", headers={DLQ_STREAM: "FEEDBACK", DLQ_SEQ: "1"})
    assert await last_dead_lettered(js, SIGNALS) == DeadLettered(upto=4, above=frozenset({5, 8}), first=5, count=4)

    running = await start_service()
    await eventually(lambda: running.service.store.positions.get("SIGNALS") == 10)
    copies = [copy for copy in await dlq_messages(js, 6) if copy.headers[DLQ_STREAM] == "SIGNALS"]
    assert sorted(int(copy.headers[DLQ_SEQ]) for copy in copies) == [3, 5, 6, 7, 8]
    assert {copy.headers[DLQ_BATCH] for copy in copies[-2:]} == {"5/4"}, "those missing, carrying the batch on"
    # Published as a batch of their own (6/2), the next start took what was stored up to 7 and nothing after:
    # 8, stored before the crash, went to the DLQ again.
    assert await last_dead_lettered(js, SIGNALS) == DeadLettered(upto=8)
    assert (await js.stream_info("DLQ")).state.messages == 6
    await running.stop()


async def test_what_was_dead_lettered_is_read_from_the_dlq_but_not_from_a_stream_of_the_same_name_before(nc) -> None:
    js = nc.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    assert await last_dead_lettered(js, SIGNALS) == DeadLettered()
    for i in range(7):  # a DLQ message is taken only for a sequence its stream has reached
        await js.publish("signals.app.opened", orjson.dumps(event(i, "app.opened")))
        if i < 5:
            await js.publish("feedback.tip.reacted", orjson.dumps(feedback(i)))
    for seq in (3, 7):
        await js.publish("dlq.signals.app.opened", b"{", headers={DLQ_STREAM: "SIGNALS", DLQ_SEQ: str(seq)})
    await js.publish("dlq.feedback.tip.reacted", b"{", headers={DLQ_STREAM: "FEEDBACK", DLQ_SEQ: "5"})
    assert (await last_dead_lettered(js, SIGNALS), await last_dead_lettered(js, FEEDBACK)) == (
        DeadLettered(upto=7), DeadLettered(upto=5))

    await js.delete_stream("SIGNALS")  # re-created: its sequences start again
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    assert await last_dead_lettered(js, SIGNALS) == DeadLettered()


async def test_an_event_that_fails_in_processing_goes_to_the_dlq_and_the_stream_moves_on(
        start_service, nc, monkeypatch, caplog) -> None:
    """An exception from folding one event (a bug: a `ts` in year 0 was one), or from decoding it (one
    refused for a `v` of [2**64], whose reason orjson could not write), retried its chunk for ever,
    every later event of the stream held behind it, for every user."""
    import streams.store
    import streams.wire

    fold, parse = streams.store.apply, streams.wire.parse_event

    def fails_on_boom(state: Any, event: Any, max_ts_ms: Any) -> bool:
        if event.id == "boom":
            raise ValueError("a bug in the fold")
        return fold(state, event, max_ts_ms)

    def fails_on_crash(raw: bytes) -> Any:
        if b'"crash"' in raw:  # words no header can carry as they are
            raise ValueError("a bug in the decoder\r\nsaid on two lines, with half an emoji: \ud83d")
        return parse(raw)

    monkeypatch.setattr(streams.store, "apply", fails_on_boom)
    monkeypatch.setattr(streams.wire, "parse_event", fails_on_crash)
    running = await start_service()
    js = nc.jetstream()
    bodies = [orjson.dumps(body) for body in (event(1), {**event(2), "id": "boom"}, {**event(4), "id": "crash", "v": "1"},
                                               {**event(5), "v": ["2**64"]}, event(3))]
    bodies[3] = bodies[3].replace(b'"2**64"', str(2**64).encode())  # orjson writes no integer past 64 bits
    bodies.insert(4, orjson.dumps({**event(6), "v": ["half"]}).replace(b'"half"', b'"\\ud83d"'))
    for body in bodies:
        await js.publish("signals.task.created", body)
    messages = await dlq_messages(js, 4)
    reasons = {m.headers[DLQ_SEQ]: (m.headers[DLQ_KIND], m.headers[DLQ_REASON]) for m in messages}
    assert reasons["2"][0] == "processing_failed" and "ValueError: a bug in the fold" in reasons["2"][1]
    assert reasons["3"][0] == "processing_failed"
    assert "ValueError: a bug in the decoder said on two lines, with half an emoji: \\ud83d (a bug" in reasons["3"][1]
    assert reasons["4"][0] == "invalid_field" and reasons["4"][1].endswith("not [18446744073709551616]")
    assert reasons["5"][0] == "invalid_field" and reasons["5"][1].endswith('not ["\\ud83d"]')
    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == len(bodies))
    assert store.users["u-1"].count("task.created") == 2
    assert "Traceback" in caplog.text, "a bug is logged with its traceback"


async def test_an_event_on_a_subject_near_the_control_line_limit_goes_to_the_dlq_and_ingest_moves_on(
        start_service, nc) -> None:
    """Published on a subject of ~4 KiB (fine for its own publish), a bad event's DLQ copy on
    `dlq.<subject>`, with its reply inbox, passed the server's control line limit: the server
    closed tipstream's connection, for good, and did so again at every start."""
    running = await start_service()
    js = nc.jetstream()
    subject = "signals." + "a" * 4075
    await nc.publish(subject, b"not json")  # a core publish: no reply inbox, so it fits
    await js.publish("signals.task.created", orjson.dumps(event(2)))
    [message] = await dlq_messages(js, 1)
    assert message.subject == "dlq.signals.subject_too_long" and message.headers[DLQ_SUBJECT] == subject
    assert message.headers[DLQ_KIND] == "invalid_json"
    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == 2)
    assert store.users["u-1"].count("task.created") == 1 and running.service.ready


async def test_an_event_on_a_subject_that_is_not_utf8_goes_to_the_dlq_and_ingest_moves_on(
        start_service, nats_server, nc) -> None:
    """NATS subjects are bytes, and a Go or C publisher may send any: nats-py cannot send one, so it
    goes over the wire protocol itself. Its decoding raised in the pull handler, the message was never
    handed on, and SIGNALS was read again from it in a loop, held there for good with /readyz still 200."""
    running = await start_service()
    js = nc.jetstream()
    with socket.create_connection(("127.0.0.1", nats_server.port)) as raw:
        raw.sendall(b'CONNECT {"verbose": false}\r\nPUB signals.task.\xff\xfe 8\r\nnot json\r\nPING\r\n')
        answer = b""
        while b"PONG" not in answer:
            answer += raw.recv(4096)
    await js.publish("signals.task.created", orjson.dumps(event(2)))
    [message] = await dlq_messages(js, 1)
    assert message.subject == "dlq.signals.task.\\xff\\xfe", "escaped: a subject nats-py reads back"
    assert message.headers[DLQ_SUBJECT] == "signals.task.\\xff\\xfe" and message.headers[DLQ_SEQ] == "1"
    assert message.headers[DLQ_KIND] == "invalid_json" and message.data == b"not json"
    store = running.service.store
    await eventually(lambda: store.positions.get("SIGNALS") == 2)
    assert store.users["u-1"].count("task.created") == 1


async def test_dead_letters_are_logged_one_by_one_up_to_a_bound_a_minute_then_counted(start_service, nc, caplog) -> None:
    """A publisher sending bad events wrote a log line apiece: a flood of them, a flood of lines."""
    from app import dead_lettering

    running = await start_service()
    signals = next(i for i in running.service.ingests if i.spec.name == "SIGNALS")
    js = nc.jetstream()
    before = dead_lettered("SIGNALS")  # the registry is the process's: earlier tests' count too

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("DLQ SIGNALS")]

    with caplog.at_level(logging.INFO, logger="tipstream.ingest"):
        for i in range(dead_lettering.DLQ_LOG_PER_MINUTE + 1):  # one left out: counted in the singular
            await js.publish("signals.task.created", b'{"id": "broken-%d", ' % i)
        await eventually(lambda: dead_lettered("SIGNALS") - before == dead_lettering.DLQ_LOG_PER_MINUTE + 1)
        assert len(lines()) == dead_lettering.DLQ_LOG_PER_MINUTE
        signals.dlq.lines.clock = lambda: time.monotonic() + 61  # as a minute later
        await js.publish("signals.task.created", b'{"id": "broken-last", ')
        await eventually(lambda: len(lines()) == dead_lettering.DLQ_LOG_PER_MINUTE + 2)
    told = lines()[-2:]
    assert told[0].startswith(f"DLQ SIGNALS: 1 more event dead-lettered after the last {dead_lettering.DLQ_LOG_PER_MINUTE}")
    assert told[1].startswith(f"DLQ SIGNALS #{dead_lettering.DLQ_LOG_PER_MINUTE + 2}: body is not valid JSON")


async def test_a_dead_letter_stored_whose_acknowledgement_was_lost_is_not_stored_again(
        start_service, nc, monkeypatch) -> None:
    """NATS stopped after storing a copy and before acknowledging it: the batch is published again once it
    is back, past JetStream's duplicate window after an outage longer than it (here the copy was stored
    under another id, as if that long ago), and the copy was stored twice. What of its batch the DLQ holds
    is now read back before it is published again."""
    js = nc.jetstream()
    running = await start_service(duplicate_window_s=1)
    signals = next(ingest for ingest in running.service.ingests if ingest.spec.name == "SIGNALS")
    publish, lost = signals.js.publish, []

    async def ack_lost_once(subject: str, payload: bytes = b"", **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", None) or {}
        if subject.startswith("dlq.") and headers.get(DLQ_SEQ) == "2" and not lost:
            lost.append(await publish(subject, payload, headers={**headers, "Nats-Msg-Id": "stored-long-ago"}, **kwargs))
            raise nats.errors.TimeoutError
        return await publish(subject, payload, headers=headers, **kwargs)

    monkeypatch.setattr(signals.js, "publish", ack_lost_once)
    before = dead_lettered("SIGNALS")
    for seq in range(1, 5):
        body = b"{not json" if seq in (2, 3) else orjson.dumps(event(seq, "app.opened"))
        assert (await js.publish("signals.app.opened", body)).seq == seq
    await eventually(lambda: running.service.store.positions.get("SIGNALS") == 4)
    assert lost, "the copy stored, its acknowledgement lost"
    assert sorted(int(copy.headers[DLQ_SEQ]) for copy in await dlq_messages(js, 2)) == [2, 3]
    assert (await js.stream_info("DLQ")).state.messages == 2
    assert dead_lettered("SIGNALS") == before + 2, "the copy found stored is counted, once"


async def test_a_dlq_copy_left_unanswered_by_a_full_disk_names_it_and_is_stored_once_the_server_has_room(
        start_service, full_disk_nats_server, caplog) -> None:
    """A bad event read while NATS_URL's store's disk was full: its DLQ copy went unanswered, and the warning every
    10 s named a NATS cluster's election or a server that hangs, not the full disk (nats-server's log said 'no
    space left on device' for DLQ), nor what to do."""
    server = full_disk_nats_server
    first = await start_service(nats_url=server.url)  # the streams, made
    await first.stop()
    client = await nats.connect(server.url)
    try:
        await client.jetstream().publish("signals.task.created", b"{not json")
        # DLQ's store fails a write, and stores nothing more until nats-server restarts. The disk is freed before
        # the start: a start re-creates its consumers, and on a disk still full that write could fail too.
        server.fill()
        with pytest.raises(nats.errors.TimeoutError):
            await client.jetstream(timeout=1).publish("dlq.test", b"a write the full disk fails")
        server.free()
    finally:
        await client.close()
    caplog.set_level(logging.INFO, logger="tipstream.ingest")
    before = dead_lettered("SIGNALS")
    await start_service(nats_url=server.url)

    def told(start: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]

    await eventually(lambda: told("could not publish to the DLQ for SIGNALS"), timeout=30)
    warned = told("could not publish to the DLQ for SIGNALS")[0]
    assert "nats: timeout" in warned and "is its store's disk full?" in warned, warned
    assert "free space on it and restart nats-server" in warned, warned
    server.stop()
    server.start()
    await eventually(lambda: dead_lettered("SIGNALS") == before + 1, timeout=60)
    assert told("publish to the DLQ for SIGNALS: done, ")
