"""Scrubbing users from the streams on a real nats-server: exactly their messages up to the bound go."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from streams import scrub as scrub_module
from streams.jetstream import DLQ_REASON, DLQ_TRUNCATED, durable_of, ensure_streams, reset_durable
from streams.pull import connect
from streams.scrub import ScrubError, delete_all, scrub
from tests.conftest import NatsServer, account_url, limited_account_server, wait_stopped

TS = "2026-11-26T08:00:00+01:00"
ODD = 'zoë "q" \\ ✓\n'  # an id that needs escapes, and non-ASCII
FORGET = frozenset({"u-1", ODD})


def event(i: int, user: str, **data: Any) -> dict[str, Any]:
    return {"id": f"e-{i}", "type": "task.created", "user_id": user, "ts": TS, "v": 1, "data": {"task_id": f"t-{i}", **data}}


def signals() -> list[tuple[bytes, str | None]]:
    """(body, its owner when it is one of FORGET's) in publishing order, so sequence = index + 1."""
    bodies: list[tuple[bytes, str | None]] = []
    for i in range(40):
        user = ("u-1", "u-10", ODD, "x-u-1", "u-2")[i % 5]
        bodies.append((orjson.dumps(event(i, user)), user if user in FORGET else None))
    bodies += [
        (orjson.dumps(event(100, "u-10", labels=["u-1", '"u-1"'])), None),  # names u-1, belongs to u-10
        (json.dumps(event(101, ODD)).encode(), ODD),  # spelt \u00eb, \u2713 (json.dumps's ensure_ascii)
        (orjson.dumps(event(102, "u-1")).replace(b'"user_id":"u-1"', b'"user\\u005fid":"u\\u002d1"'), "u-1"),
        (orjson.dumps(event(103, "u-1")).replace(b'"user_id":"u-1"', b'"user_id" : "u-2", "user_id":"u-1"'), "u-1"),
    ]
    return bodies


def dead_letters() -> list[tuple[bytes, str | None]]:
    head = orjson.dumps(event(200, "u-1"))
    return [
        (b'{"id": "broken", "user_id": "u-1", ', "u-1"),  # invalid JSON
        (orjson.dumps(event(201, "u-1")).replace(b"t-201", b"t-\xff\xfe"), "u-1"),  # invalid UTF-8
        (b'{"id": "broken", "user_id": "u-10", ', None),
        (b'{"id": "cut", "user_id": "u-1', None),  # cut in its id: u-1 or u-10 or u-123, not to be guessed
        (head[: head.index(b'"ts"')], "u-1"),  # cut after its id
        (orjson.dumps({**event(202, "u-1"), "type": "task.exploded"}), "u-1"),  # valid JSON, rejected for content
        (b"\x00\x01 not json at all", None),
    ]


def decisions() -> list[tuple[bytes, str | None]]:
    def decision(i: int, user: str) -> bytes:
        return orjson.dumps({"id": f"d-{i}", "type": "decision.scored", "ts": TS, "user_id": user, "model_version": "v1",
                             "features": {"user_id": user, "hour_of_day": 8}, "candidates": []})
    return [(decision(i, ("u-1", "u-10", ODD)[i % 3]), ("u-1", None, ODD)[i % 3]) for i in range(12)]


STREAMS = {"SIGNALS": ("signals.task.created", signals), "DLQ": ("dlq.signals.task.created", dead_letters),
           "DECISIONS": ("decisions.score", decisions)}


@pytest.fixture(params=["ingest_client", "nats_py_client"])
async def js(request: pytest.FixtureRequest, nats_server: NatsServer) -> AsyncIterator[Any]:
    """Both readers: tipstream's client (raw inbox handlers) and plain nats-py (Msg objects)."""
    client = await (connect(nats_server.url) if request.param == "ingest_client" else nats.connect(nats_server.url))
    context = client.jetstream()
    await ensure_streams(context, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    yield context
    await client.close()


async def publish(js: Any, stream: str) -> list[tuple[bytes, str | None]]:
    subject, bodies = STREAMS[stream]
    published = bodies()
    for body, _ in published:
        headers = {DLQ_REASON: "test", DLQ_TRUNCATED: "9999"} if stream == "DLQ" else None
        await js.publish(subject, body, headers=headers)
    return published


async def stored(js: Any, stream: str, seq: int) -> bytes | None:
    try:
        return (await js.get_msg(stream, seq)).data
    except NotFoundError:
        return None


@pytest.mark.parametrize("stream", sorted(STREAMS))
async def test_exactly_the_users_messages_up_to_the_bound_go_and_every_other_stays_byte_for_byte(js, stream) -> None:
    published = await publish(js, stream)
    bound = len(published) * 2 // 3
    # A durable of tipstream's, part way: the scrub reads through its own consumer and leaves this one be.
    await reset_durable(js, stream, durable_of(stream), 3, 100)
    seen: list[tuple[int, int]] = []
    report = await scrub(js, stream, FORGET, bound, progress=lambda scanned, through: seen.append((scanned, through)))

    gone = [seq for seq, (_, owner) in enumerate(published, 1) if owner in FORGET and seq <= bound]
    assert gone and any(owner in FORGET for _, owner in published[bound:])  # both sides of the bound are tried
    for seq, (body, _) in enumerate(published, 1):
        assert await stored(js, stream, seq) == (None if seq in gone else body), seq
    assert (report.stream, report.through_seq, report.scanned) == (stream, bound, bound)
    assert (report.matched, report.deleted, report.already_gone) == (len(gone), len(gone), 0)
    assert report.elapsed_s > 0
    assert seen[-1] == (bound, bound)
    durable = await js.consumer_info(stream, durable_of(stream))
    assert durable.config.opt_start_seq == 3 and durable.delivered.consumer_seq == 0
    assert [c.name for c in await js.consumers_info(stream)] == [durable_of(stream)]  # its own consumer removed


async def test_a_second_run_finds_nothing(js, monkeypatch) -> None:
    published = await publish(js, "SIGNALS")
    monkeypatch.setattr(scrub_module, "PROGRESS_EVERY", 10)
    seen: list[tuple[int, int]] = []
    first = await scrub(js, "SIGNALS", FORGET, 10**9, progress=lambda scanned, through: seen.append((scanned, through)))
    assert seen == [(10, 44), (20, 44), (30, 44), (40, 44), (44, 44)] and len(published) == 44
    again = await scrub(js, "SIGNALS", FORGET, 10**9)
    assert first.deleted == sum(owner is not None for _, owner in published) > 0
    assert first.through_seq == again.through_seq == len(published)
    assert (again.scanned, again.matched, again.deleted) == (len(published) - first.deleted, 0, 0)


async def test_nothing_to_do_is_no_error(js) -> None:
    assert (await scrub(js, "NO_SUCH_STREAM", FORGET, 100)).scanned == 0
    assert (await scrub(js, "SIGNALS", FORGET, 100)).scanned == 0  # empty
    published = await publish(js, "SIGNALS")
    for through, users in ((0, FORGET), (len(published), frozenset())):
        report = await scrub(js, "SIGNALS", users, through)
        assert (report.through_seq, report.scanned, report.matched, report.deleted) == (0, 0, 0, 0)
    await js.purge_stream("SIGNALS")  # the first sequence moves past every one published
    await publish(js, "SIGNALS")
    assert (await scrub(js, "SIGNALS", FORGET, len(published))).scanned == 0
    assert [await stored(js, "SIGNALS", len(published) + seq) for seq in range(1, len(published) + 1)] == [
        body for body, _ in published]


async def test_a_scrubbed_body_is_erased_from_the_store_files_not_only_unlinked(nats_server: NatsServer) -> None:
    """nats-py's delete_msg sends no `no_erase`, so the server overwrites the message in its block file."""
    client = await connect(nats_server.url)
    js = client.jetstream()
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    secret, kept = event(1, "u-1", labels=["secret-of-u-1"]), event(2, "u-2", labels=["kept-of-u-2"])
    for body in (secret, kept):
        await js.publish("signals.task.created", orjson.dumps(body))
    assert (await scrub(js, "SIGNALS", FORGET, 2)).deleted == 1
    await client.close()
    nats_server.stop()  # its buffers written out
    stored_bytes = b"".join(p.read_bytes() for p in (nats_server.store / "jetstream").rglob("*") if p.is_file())
    assert b"kept-of-u-2" in stored_bytes and b"secret-of-u-1" not in stored_bytes


async def test_a_message_gone_before_its_delete_is_counted_not_an_error(js) -> None:
    await publish(js, "SIGNALS")
    await js.delete_msg("SIGNALS", 1)
    assert await delete_all(js, "SIGNALS", [1, 2]) == (1, 1)


async def test_a_delivery_lost_on_the_way_is_read_again_not_passed_over(js, monkeypatch) -> None:
    """AckNone redelivers nothing: a gap in the consumer's sequence must send the reader back."""
    published = await publish(js, "SIGNALS")
    monkeypatch.setattr(scrub_module, "BATCH", 8)
    on_message, calls = scrub_module._Reader._on_message, []

    def dropping_one(self: Any, reply: bytes, body: bytes, status: bytes, pending: Any, headers: Any = None) -> None:
        calls.append(reply)
        if reply and len(calls) == 13:
            return  # as a slow consumer's dropped buffer would
        on_message(self, reply, body, status, pending, headers)

    monkeypatch.setattr(scrub_module._Reader, "_on_message", dropping_one)
    read: list[int] = []
    assert await scrub_module.read_through(js, "SIGNALS", 1, len(published), lambda seq, _: read.append(seq)) == len(
        published)
    assert read == list(range(1, len(published) + 1))


@pytest.fixture
def no_jetstream(tmp_path: Path) -> Iterator[NatsServer]:
    server = limited_account_server(tmp_path / "no-js", None)
    server.start()
    yield server
    server.stop()


async def test_an_account_without_jetstream_is_told_how_to_enable_it(no_jetstream) -> None:
    client = await connect(account_url(no_jetstream))
    try:
        with pytest.raises(ScrubError, match="enable JetStream"):
            await scrub(client.jetstream(timeout=2), "SIGNALS", FORGET, 100)
    finally:
        await client.close()


def one_second_for_deletes(monkeypatch) -> None:
    """What is told after the wait for a delete's answer is under test, not its length: nats-py's 5 s, cut to 1 s."""
    from nats.js.manager import JetStreamManager

    api_request = JetStreamManager._api_request

    async def shorter(self: Any, subject: str, req: bytes = b"", timeout: float = 5) -> Any:
        return await api_request(self, subject, req, timeout=min(timeout, 1.0) if ".MSG.DELETE." in subject else timeout)

    monkeypatch.setattr(JetStreamManager, "_api_request", shorter)


async def test_a_user_not_allowed_to_delete_is_told_which_subject(tmp_path: Path, monkeypatch) -> None:
    """The server answers a denied publish with -ERR and nothing on the reply subject: 5 s (delete_msg's wait)."""
    one_second_for_deletes(monkeypatch)
    store = tmp_path / "denied"
    store.mkdir()
    (store / "accounts.conf").write_text(
        'accounts { T: { jetstream: enabled, users: [{user: t, password: t, permissions: '
        '{publish: {deny: ["$JS.API.STREAM.MSG.DELETE.>"]}}}] } }\n')
    server = NatsServer(store, args=("-c", str(store / "accounts.conf")))
    server.start()
    async def permissions_violation(e: Exception) -> None:  # the server's -ERR: nats-py then waits out the request
        pass

    client = await connect(account_url(server), error_cb=permissions_violation)
    try:
        js = client.jetstream(timeout=1)
        await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
        await js.publish("signals.task.created", orjson.dumps(event(1, "u-1")))
        with pytest.raises(ScrubError, match=r"may publish to \$JS.API.STREAM.MSG.DELETE.SIGNALS"):
            await scrub(js, "SIGNALS", FORGET, 10)
        assert await stored(js, "SIGNALS", 1)
    finally:
        await client.close()
        server.stop()


async def test_a_server_that_hangs_during_a_delete_is_named_not_only_the_permissions(
        nats_server: NatsServer, monkeypatch) -> None:
    """No answer comes from a server that hangs either (SIGSTOP'd for 25 s during a forget, in a soak): the log said
    only to check the user's permissions, which were fine, and the next try went through once it answered."""
    one_second_for_deletes(monkeypatch)
    client = await connect(nats_server.url)
    try:
        js = client.jetstream()
        await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
        await js.publish("signals.task.created", orjson.dumps(event(1, "u-1")))
        nats_server.process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(nats_server.process.pid)
            with pytest.raises(ScrubError, match="no answer to deleting message 1 of stream SIGNALS: the NATS server "
                                                 "hangs or is overloaded") as raised:
                await delete_all(js, "SIGNALS", [1])
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        assert r"may publish to $JS.API.STREAM.MSG.DELETE.SIGNALS" in str(raised.value)
        assert sum(await delete_all(js, "SIGNALS", [1])) == 1  # erased now, or by the delete it got no answer to
        assert await stored(js, "SIGNALS", 1) is None
    finally:
        await client.close()


async def test_a_stream_that_denies_deletes_names_the_setting(js) -> None:
    await js.add_stream(StreamConfig(name="KEPT", subjects=["kept.>"], deny_delete=True))
    await js.publish("kept.x", orjson.dumps(event(1, "u-1")))
    with pytest.raises(ScrubError, match="deny_delete"):
        await scrub(js, "KEPT", FORGET, 10)


async def test_a_dlq_copy_cut_before_its_users_id_goes_with_the_original_it_was_cut_from(js) -> None:
    # The DLQ keeps a body's head when the copy and its headers pass max_payload: an event whose user_id came
    # last left a copy that named no one, everything else it held (a task's title, its labels) kept for 30 days.
    from streams.jetstream import DLQ_SEQ, DLQ_STREAM

    originals = {}
    for i, user in enumerate(("u-1", "u-10", ODD)):
        body = orjson.dumps({"id": f"e-{i}", "type": "task.created", "ts": TS, "data": {"task_id": "t", "title": "x"},
                             "user_id": user})
        originals[user] = (await js.publish("signals.task.created", body)).seq, body
    for user, (seq, body) in originals.items():
        head = body[: body.index(b'"user_id"')]
        await js.publish("dlq.signals.task.created", head, headers={
            DLQ_REASON: "test", DLQ_TRUNCATED: str(len(body)), DLQ_STREAM: "SIGNALS", DLQ_SEQ: str(seq)})
    # One whose original is gone (past its retention) stays: it names no one, and nothing tells whose it was.
    await js.publish("dlq.signals.task.created", b'{"id": "e-9", "type"', headers={
        DLQ_REASON: "test", DLQ_TRUNCATED: "1048600", DLQ_STREAM: "SIGNALS", DLQ_SEQ: "999"})

    report = await scrub(js, "DLQ", FORGET, 10**9)
    assert (report.scanned, report.deleted) == (4, 2)
    assert [await stored(js, "DLQ", seq) is None for seq in (1, 2, 3, 4)] == [True, False, True, False]
    assert await stored(js, "SIGNALS", originals["u-1"][0]) == originals["u-1"][1], "the originals are SIGNALS' scrub's"


async def test_a_dlq_copy_cut_from_a_stream_made_again_since_is_not_taken_for_what_is_now_at_its_sequence(js) -> None:
    # A stream deleted and made again counts its sequences from 1 again: the message at a cut copy's original
    # sequence is then another event, and one of the user being forgotten took the copy, another user's, with it.
    from streams.jetstream import DLQ_SEQ, DLQ_STREAM

    body = orjson.dumps({"id": "e-0", "type": "task.created", "ts": TS, "data": {"task_id": "t", "title": "x"},
                         "user_id": "u-10"})
    seq = (await js.publish("signals.task.created", body)).seq
    head = body[: body.index(b'"user_id"')]
    copy = (await js.publish("dlq.signals.task.created", head, headers={
        DLQ_REASON: "test", DLQ_TRUNCATED: str(len(body)), DLQ_STREAM: "SIGNALS", DLQ_SEQ: str(seq)})).seq
    await js.delete_stream("SIGNALS")
    await ensure_streams(js, max_age_days=1, max_bytes=-1, duplicate_window_s=60, dlq_max_age_days=1)
    for i in range(seq):
        await js.publish("signals.task.created", orjson.dumps(event(i, "u-1")))

    report = await scrub(js, "DLQ", frozenset({"u-1"}), 10**9)
    assert report.deleted == 0 and await stored(js, "DLQ", copy) == head


async def test_an_export_shows_the_dlq_copies_cut_before_their_users_id_that_forgetting_deletes(js) -> None:
    # The right of access reads what forgetting deletes: a copy cut before its user's id is theirs by its
    # original (`cut_copy_of`), and the export left it out while the erasure deleted it as theirs.
    from app.export import from_streams
    from streams.jetstream import DLQ_SEQ, DLQ_STREAM

    copies = {}
    for i, user in enumerate(("u-1", "u-10")):
        body = orjson.dumps({"id": f"e-{i}", "type": "task.created", "ts": TS, "data": {"task_id": "t", "title": "x"},
                             "user_id": user})
        seq = (await js.publish("signals.task.created", body)).seq
        head = body[: body.index(b'"user_id"')]
        copies[user] = (await js.publish("dlq.signals.task.created", head, headers={
            DLQ_REASON: "test", DLQ_TRUNCATED: str(len(body)), DLQ_STREAM: "SIGNALS", DLQ_SEQ: str(seq)})).seq

    found = await from_streams(js, "u-1")
    assert [item["seq"] for item in found["DLQ"]] == [copies["u-1"]]
    assert found["DLQ"][0]["message"].startswith('{"id":"e-0"')
    report = await scrub(js, "DLQ", frozenset({"u-1"}), 10**9)
    assert report.deleted == 1


async def test_a_pull_request_that_cannot_be_sent_reads_again_at_once(js, monkeypatch, caplog) -> None:
    """A pass asks for the next batch from its message handler, in a task of its own: left to the event
    loop, the failed publish was printed as 'Task exception was never retrieved' at garbage collection,
    and the pass stalled until its stall watch (STALL_S) read again."""
    published = await publish(js, "SIGNALS")
    monkeypatch.setattr(scrub_module, "BATCH", 4)
    client, asked = js._nc, []
    publish_to = client.publish

    async def refuse_the_second(subject: str, *args: Any, **kwargs: Any) -> None:
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            asked.append(subject)
            if len(asked) == 2:
                raise ConnectionError("the publish refused")
        await publish_to(subject, *args, **kwargs)

    monkeypatch.setattr(client, "publish", refuse_the_second)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        report = await scrub(js, "SIGNALS", FORGET, 10**9)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert report.deleted == sum(owner is not None for _, owner in published)
    assert "a pull request failed (ConnectionError('the publish refused'))" in caplog.text
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported
