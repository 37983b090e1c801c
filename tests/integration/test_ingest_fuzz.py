"""Property-based fuzzing of the event path end to end: a publisher's messages on a real JetStream, the
service's consumers, decode and upcast, the fold and the DLQ.

One service (a real nats-server, SQLite, or PostgreSQL where it is reachable) runs for the whole module in a
thread of its own; hypothesis publishes batches of near-valid and hostile messages to it: every subject family
and wrong ones, bodies broken in every way (cut, invalid UTF-8, a NUL, deep, duplicate keys, huge), numbers and
times at their edges, ids one past their length, publishers' headers (odd, repeated and very long
`Nats-Msg-Id`s, the DLQ's own headers), versions old and unknown, the same event sent again, and consumers
re-created in the middle of a batch (a reconnect's redelivery).

What every batch must come to, message by message as JetStream stored it:
- folded exactly once, or in the DLQ once with the kind and reason the contract gives it (`parse_event`,
  `check_subject`, the size and clock bounds), its original subject, stream and sequence;
- each stream's position past its last message (the consumer kept running), and nothing counted twice;
- each user's state the one `streams.fold.apply` gives over the events accepted, good events after bad ones
  included.

The suite draws the same examples each run (`derandomize`); `TIPSTREAM_TEST_FUZZ_EXPLORE=1` draws new ones, more.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.decisions import decode_decision
from streams import jetstream as jsx
from streams.events import (
    FAMILY_OF_TYPE,
    REACTIONS,
    REJECTION_KINDS,
    UPCASTERS,
    Rejection,
    check_subject,
    parse_event,
)
from streams.fold import UserState, apply, to_ms
from tests.conftest import NatsServer
from tests.integration.served import served_in_a_thread, until
from tests.integration.test_api_fuzz import HOSTILE, TEXT, Pairs, Raw, _database, dump

EXPLORE = bool(os.environ.get("TIPSTREAM_TEST_FUZZ_EXPLORE"))
FUZZ = settings(max_examples=600 if EXPLORE else 120, derandomize=not EXPLORE, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
MAX_EVENT_BYTES = 4096
MAX_FUTURE_S = 86_400.0
DECISION_MAX_BYTES = 262_144 * 4  # max(max_event_bytes, score_max_body_bytes * 4), as bootstrap bounds DECISIONS
# A batch not folded or dead-lettered within this long is a stuck consumer.
SETTLE_WITHIN_S = 30.0
TYPES = sorted(FAMILY_OF_TYPE)


@dataclass(repr=False)
class Fuzzed:
    service: Any
    loop: asyncio.AbstractEventLoop
    url: str
    max_payload: int = 0
    batches: Iterator[int] = field(default_factory=itertools.count)
    examples: int = 0
    messages: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    # Each user's state as the pure fold makes it of every event accepted so far: a hostile user id (" ")
    # is no batch's own.
    states: dict[str, UserState] = field(default_factory=dict)

    def __repr__(self) -> str:  # hypothesis prints it with each failing example
        return f"Fuzzed({self.url})"

    def on_loop(self, fn: Any) -> Any:
        """`fn()` run on the service's loop: its store is that loop's alone."""

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)


@pytest.fixture(scope="module")
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("ingest-fuzz")
    server = NatsServer(tmp / "nats")
    server.start()
    # An older version to upcast, so that the slow path runs in the service as a new version would make it.
    UPCASTERS[("task.completed", 0)] = _task_completed_v0
    try:
        yield from _serve(request, tmp, server)
    finally:
        del UPCASTERS[("task.completed", 0)]
        server.stop()


def _task_completed_v0(raw: dict[str, Any]) -> dict[str, Any]:
    """v0 named the task `task`: a malformed v0 event makes this raise, as a real upcaster may."""
    return {**raw, "v": 1, "data": {"task_id": raw["data"]["task"]}}


def _serve(request: pytest.FixtureRequest, tmp: Path, server: NatsServer) -> Iterator[Fuzzed]:
    from app.api import create_app
    from app.settings import Settings

    app = create_app(Settings(data_dir=tmp / "data", nats_url=server.url, port=0, database_url=_database(request, tmp),
                              max_event_bytes=MAX_EVENT_BYTES, max_future_s=MAX_FUTURE_S, checkpoint_every_s=0.2))
    with served_in_a_thread(app, "ingest-fuzz-service") as served:
        result = Fuzzed(app.state.service, served.loop, server.url)
        yield result
        print(f"\ningest fuzz: {result.examples} batches, {result.messages} messages stored, "
              f"outcomes {dict(sorted(result.kinds.items()))}")
        assert not served.failed and served.thread.is_alive(), f"the service stopped: {served.failed}"


# --- what a publisher sends ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    subject: str
    body: bytes
    headers: tuple[tuple[str, str], ...] | None
    missing: str | None = None  # a top-level key left out: the reason must name it


GOOD_TS = st.sampled_from([
    "2026-11-26T08:01:02.123+01:00", "2026-11-26T08:01:02Z", "2026-11-20T23:59:59.999999-23:59",
    "2026-11-26T00:00:00+23:59", "2026-10-01T12:00:00+05:45", "2026-11-26T08:01:02.123456789+01:00",
    "2026-11-26T08:01:02,5+01:00", "2026-11-26 08:01:02+01:00", "2026-11-26T08:01:02-00:00", "2024-02-29T00:00:00Z",
    "0001-01-01T00:00:00+00:00", "0001-01-01T23:59:00+23:59", "0001-01-01T00:00:00-23:59", "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59+23:59", "2100-01-01T00:00:00+01:00", "1970-01-01T00:00:00Z", "1969-12-31T23:59:59.999-00:01",
    "2026-12-05T00:00:00+14:00", "2026-09-01T00:00:00-12:00",
])
BAD_TS = st.sampled_from([
    "2026-11-26T08:01:02+01", "2026-11-26T08:01:02", "2026-11-26T08:01:02+24:00", "2026-02-29T00:00:00Z",
    "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "20261126T080102Z", "1764140400", "",
    "2026-13-01T00:00:00Z",
])
TS = st.sampled_from(list(GOOD_TS.elements) * 2 + list(BAD_TS.elements) + list(GOOD_TS.elements) * 2)
ID_EDGES = ["x", "é" * 64, "😀" * 32, "y" * 127, "a b", "id\ttab", "dot.ted", "*", ">"]


def ids(tag: str) -> st.SearchStrategy[str]:
    """Ids around the contract's bounds (1-128 characters), unique to the batch; one in eight not valid."""
    valid = [f"{tag}-{i}" for i in range(4)] + [f"{tag}-{s}"[:128] for s in ID_EDGES] + [
        f"{tag}-" + "z" * (128 - len(tag) - 1)]
    invalid = ["", "\x00", "n\x00ul", f"{tag}-" + "z" * (128 - len(tag))]
    # Hypothesis leans to a list's ends (and a one_of's last branch): the invalid ones in the middle.
    return st.sampled_from(valid * 3 + invalid + valid * 4)


OPTIONAL_ID = st.one_of(st.none(), st.just(""), st.sampled_from(["d-1", "d" * 128, "d" * 129]))
PRIORITY = st.sampled_from([None, 0, 1, 4, 5, -1, 2**63, 2**64, 1.0, 1.5, True, "1"])
LABELS = st.sampled_from([None, [], ["a"], ["x" * 128], ["x" * 129], ["a"] * 64, ["a"] * 65, [1], "a"])
REACTION = st.sampled_from([*REACTIONS, "", "LIKED", None, 1])
VERSION = st.sampled_from([1] * 4 + [0, 0, 0, -1, 2, 2**64, 1.0, "1", None, True] + [1] * 4)


def event_dicts(tag: str) -> st.SearchStrategy[dict[str, Any]]:
    """An event of any type, its fields near and at the contract's edges, for one of a few users of the batch."""
    task = st.fixed_dictionaries({"task_id": ids(tag)}, optional={
        "due": st.one_of(st.none(), TS), "priority": PRIORITY, "project_id": OPTIONAL_ID, "labels": LABELS})
    data = {
        "task.created": task,
        "task.completed": st.one_of(st.fixed_dictionaries({"task_id": ids(tag)}),
                                    st.fixed_dictionaries({"task": ids(tag)})),  # as v0 named it
        "task.rescheduled": st.fixed_dictionaries({"task_id": ids(tag), "due": TS}),
        "task.deleted": st.fixed_dictionaries({"task_id": ids(tag)}),
        "app.opened": st.sampled_from([{}, None, {"x": 1}]),
        "tip.shown": st.fixed_dictionaries({"tip_id": ids(tag)}, optional={"decision_id": OPTIONAL_ID}),
        "tip.reacted": st.fixed_dictionaries({"tip_id": ids(tag), "reaction": REACTION},
                                             optional={"decision_id": st.one_of(OPTIONAL_ID, ids(tag))}),
    }
    valid = [f"{tag}-u1", f"{tag}-u2", f"{tag}-ü", (tag + "-") + "w" * (127 - len(tag))]
    users = st.sampled_from(valid * 3 + [(tag + "-") + "w" * (128 - len(tag)), ""] + valid * 3)
    return st.sampled_from(TYPES).flatmap(lambda kind: st.fixed_dictionaries(
        {"id": ids(tag), "type": st.just(kind), "user_id": users, "ts": TS, "data": data[kind]},
        optional={"v": VERSION, "extra": st.sampled_from(["\x00", "😀", "a" * 100])}))


def _subject(kind: str) -> str:
    return f"{FAMILY_OF_TYPE.get(kind, 'signals')}.{kind}"


SUBJECTS = st.sampled_from(["right"] * 6 + ["other family", "signals.task.exploded",
                            "feedback.tip.shown", "signals.tip.reacted.x", "signals.task", "feedback.x.y.z",
                            "signals." + "a" * 1100, "feedback." + ".b" * 600] + ["right"] * 6)
BROKEN = st.sampled_from(["cut", "xff", "bom", "utf16", "empty", "spaces", "nul", "deep", "pad", "huge", "lone",
                          "not object", "nan"])


SCORES = st.sampled_from([0.5] * 3 + [0, 1, -1, 1e308, -1e308, 2**63 - 1, 2**63, 2**64 - 1, 5e-324, True, "1", None]
                         + [0.5] * 3)


def decision_dicts(tag: str) -> st.SearchStrategy[dict[str, Any]]:
    """A decision as /score logs it, for this batch's users and tips (so that feedback may join it), its
    numbers and texts at their edges: another publisher's on DECISIONS."""
    candidate = st.fixed_dictionaries(
        {"tip_id": ids(tag), "score": SCORES, "propensity": SCORES},
        optional={"category": st.sampled_from(["focus", None, 1, "c" * 200]),
                  "features": st.one_of(st.just({"len": 3}), st.dictionaries(TEXT, LEAF_FEATURES, max_size=3))})
    full = st.fixed_dictionaries(
        {"id": st.sampled_from([f"{tag}-0", f"{tag}-1", f"{tag}-" + "z" * (128 - len(tag) - 1)]),
         "type": st.sampled_from(["decision.scored", "decision.generated", "decision." + "x" * 17, 5]),
         "user_id": st.sampled_from([f"{tag}-u1", f"{tag}-u2", "", f"{tag}-ü", f"{tag}-u1"]),
         "model_version": st.sampled_from(["m1", "m" * 64, "m" * 65, "", "m1"]),
         "ts": st.one_of(GOOD_TS, TS), "ranked": st.lists(candidate, min_size=0, max_size=3).filter(
             lambda ranked: len({str(c["tip_id"]) for c in ranked}) == len(ranked)),
         "features": st.one_of(st.just({"hour_of_day": 9}), st.dictionaries(TEXT, LEAF_FEATURES, max_size=4))},
        optional={"policy": st.sampled_from(["greedy", "p" * 33, None]),
                  "greedy": st.sampled_from([f"{tag}-1", None, 1]),
                  "shadow": st.sampled_from([None, {"version": "s", "first": f"{tag}-1"}, {"version": "s"}, "s"]),
                  "prompt_version": st.sampled_from(["v1", None, "v" * 65])})
    # Most of the drawn decisions have a field the check refuses: also a valid one with a single field drawn.
    valid = {"id": f"{tag}-0", "type": "decision.scored", "user_id": f"{tag}-u1", "model_version": "m1",
             "ts": "2026-11-26T08:00:00+01:00", "policy": "greedy", "features": {"hour_of_day": 9},
             "ranked": [{"tip_id": f"{tag}-1", "score": 0.5, "propensity": 1.0}]}
    one_field = st.tuples(full, st.sampled_from(sorted({*valid, "shadow_version", "prompt_version", "greedy"}))).map(
        lambda drawn: {**valid, drawn[1]: drawn[0][drawn[1]]} if drawn[1] in drawn[0] else valid)
    return st.one_of(full, one_field)


LEAF_FEATURES = st.one_of(st.sampled_from([0, 1.5, -(2**63), 2**64 - 1, 1e308, True, None, "", "x" * 1000, [], {}]),
                          TEXT)


@st.composite
def messages(draw: st.DrawFn, tag: str) -> Sent:
    if draw(st.integers(0, 9)) == 5:  # one in ten on DECISIONS, mostly decisions
        decision = draw(st.one_of(decision_dicts(tag), decision_dicts(tag), event_dicts(tag)))
        subject = draw(st.sampled_from(["decisions.decision.scored", "decisions.x", "decisions." + "d" * 1100]))
        broken = not draw(st.integers(0, 4))
        body = _broken(draw(BROKEN), decision, draw(st.integers(0, 10_000))) if broken else dump(decision)
        return Sent(subject, body, None)
    event = draw(event_dicts(tag))
    how = draw(st.sampled_from(["as is"] * 4 + ["drop", "replace", "duplicate key", "extra", "broken"] + ["as is"] * 4))
    body: bytes
    missing = None
    if how == "as is":
        body = dump(event)
    elif how == "drop":
        missing = draw(st.sampled_from(sorted(event)))
        body = dump({k: v for k, v in event.items() if k != missing})
        if missing in ("data", "v", "extra", "type"):
            missing = None  # optional for some types, or said as "type" through the discriminator
    elif how == "replace":
        key = draw(st.sampled_from(sorted(event)))
        body = dump({**event, key: draw(HOSTILE)})
    elif how == "duplicate key":
        key = draw(st.sampled_from(sorted(event)))
        other = draw(HOSTILE)
        items = [(k, v) for k, v in event.items() if k != key]
        pair = [(key, other), (key, event[key])] if draw(st.booleans()) else [(key, event[key]), (key, other)]
        body = dump(Pairs(tuple(items + pair)))
    elif how == "extra":
        body = dump({**event, draw(TEXT): draw(HOSTILE)})
    else:
        body = _broken(draw(BROKEN), event, draw(st.integers(0, 10_000)))
    where = draw(SUBJECTS)
    kind = event["type"]
    if where == "right":
        subject = _subject(kind)
    elif where == "other family":
        subject = f"{'signals' if FAMILY_OF_TYPE[kind] == 'feedback' else 'feedback'}.{kind}"
    else:
        subject = where
    header = draw(st.sampled_from(["id", "id", "none", "dlq headers", "long", "odd", "same for all", "empty"]))
    headers: dict[str, str] | None
    if header == "id":
        headers = {"Nats-Msg-Id": str(event["id"])} if event["id"] and "\x00" not in event["id"] else None
    elif header == "none":
        headers = None
    elif header == "dlq headers":
        headers = {jsx.DLQ_KIND: "unknown_type", jsx.DLQ_REASON: "forged", jsx.DLQ_STREAM: "SIGNALS",
                   jsx.DLQ_SEQ: "999999999", jsx.DLQ_SUBJECT: "signals.x"}
    elif header == "long":
        headers = {"Nats-Msg-Id": f"{tag}-" + "L" * 3000, "X-Long": "v" * 3000}
    elif header == "odd":
        headers = {"Nats-Msg-Id": draw(st.sampled_from([f"{tag} sp", f"{tag}:é", f"{tag}-" + "😀", f"{tag}\t"]))}
    elif header == "same for all":
        headers = {"Nats-Msg-Id": f"{tag}-shared"}  # JetStream stores the first and drops the rest
    else:
        headers = {"Nats-Msg-Id": ""}
    return Sent(subject, body, None if headers is None else tuple(headers.items()), missing)


def _broken(how: str, event: dict[str, Any], at: int) -> bytes:
    """The bytes of `event` broken `how`: only that one made (all of them, a megabyte among them, took 0.2 s a call
    and half the fuzz's time)."""
    good = dump(event)
    cut = at % max(len(good), 1)
    return {
        "cut": lambda: good[:cut],
        "xff": lambda: good[:cut] + b"\xff\xfe" + good[cut:],
        "bom": lambda: b"\xef\xbb\xbf" + good,
        "utf16": lambda: good.decode().encode("utf-16"),
        "empty": lambda: b"",
        "spaces": lambda: b" \n\t ",
        "nul": lambda: good.replace(b'"id":"', b'"id":"\\u0000', 1),
        "deep": lambda: dump({**event, "extra": Raw(b"[" * (at % 5000 + 1) + b"]" * (at % 5000 + 1))}),
        "pad": lambda: dump({**event, "pad": "p" * (MAX_EVENT_BYTES - len(good) - 9 + at % 3)}),  # around the limit
        "huge": lambda: dump({**event, "pad": "h" * (1_048_576 - len(good) - 300 - at % 200)}),  # near max_payload
        "lone": lambda: good.replace(b'"ts"', b'"t\\ud83ds":0,"ts"', 1),
        "not object": lambda: dump([event]),
        "nan": lambda: good.replace(b'"id"', b'"n":NaN,"id"', 1),
    }[how]()


# --- what the contract says of each ------------------------------------------------------------------------


def verdict(subject: str, body: bytes, stored_ms: int, stream: str = "SIGNALS") -> Any:
    """The event, or the Rejection the contract gives it, as the service must judge it."""
    if stream == "DECISIONS":
        if len(body) > DECISION_MAX_BYTES:
            return Rejection("oversized", f"event is {len(body)} bytes; the limit is {DECISION_MAX_BYTES}")
        return decode_decision(subject, body)
    if len(body) > MAX_EVENT_BYTES:
        return Rejection("oversized", f"event is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    event = parse_event(body)
    if isinstance(event, Rejection):
        return event
    if (mismatch := check_subject(event, subject, body)) is not None:
        return mismatch
    if to_ms(event.ts) > stored_ms + MAX_FUTURE_S * 1000:
        return Rejection("future_ts", f"ts {event.ts.isoformat()} is more than")
    return event


def headers_of(message: Any) -> dict[str, str]:
    """A stored message's headers as its bytes say, in UTF-8: nats-py's get_msg reads them with the email
    package, which gives a value outside ASCII as an email Header object."""
    if not message.hdrs:
        return {}
    lines = base64.b64decode(message.hdrs).decode().split("\r\n")[1:]
    return {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}


def _header_reason(reason: str) -> str:
    return " ".join(reason.split()).encode("utf-8", "backslashreplace").decode()[:1024]


async def _publish(fuzzed: Fuzzed, batch: list[Sent], reset_after: int | None) -> list[tuple[int, str, int]]:
    """Publish the batch; the (index in the batch, stream, sequence) of each message JetStream stored."""
    client = await nats.connect(fuzzed.url)
    stored: list[tuple[int, str, int]] = []
    try:
        fuzzed.max_payload = client.max_payload
        js = client.jetstream(timeout=5)
        for i, sent in enumerate(batch):
            if i == reset_after:  # as a reconnect does: every consumer re-created at its position, mid-batch
                for ingest in fuzzed.service.ingests:
                    fuzzed.loop.call_soon_threadsafe(ingest.request_reset)
            try:
                ack = await js.publish(sent.subject, sent.body, headers=dict(sent.headers) if sent.headers else None)
            except Exception:  # noqa: BLE001 - refused by NATS (too large, a header it will not take): not stored
                if not client.is_connected:  # headers and body past max_payload: the server closes the connection
                    await client.close()
                    client = await nats.connect(fuzzed.url)
                    js = client.jetstream(timeout=5)
                continue
            if not ack.duplicate:
                stored.append((i, ack.stream, ack.seq))
    finally:
        await client.close()
    return stored


async def _read_back(url: str, stored: list[tuple[str, int]], dlq_from: int) -> tuple[list[Any], list[Any]]:
    """The stored messages as JetStream holds them, and the DLQ's messages from `dlq_from` on."""
    client = await nats.connect(url)
    try:
        js = client.jetstream(timeout=5)
        originals = [await js.get_msg(stream, seq) for stream, seq in stored]
        last = (await js.stream_info("DLQ")).state.last_seq
        dlq = [await js.get_msg("DLQ", seq) for seq in range(dlq_from, last + 1)]
    finally:
        await client.close()
    return originals, dlq


@given(data=st.data())
@FUZZ
def test_every_message_is_folded_once_or_dead_lettered_with_its_reason(fuzzed: Fuzzed, data: st.DataObject) -> None:
    tag = f"b{next(fuzzed.batches)}"
    batch = data.draw(st.lists(messages(tag), min_size=1, max_size=12), label="batch")
    # The same bytes again, under another Nats-Msg-Id or none (a publisher's retry after the duplicate window,
    # a replay): stored again by JetStream, and the fold must recognise it.
    for i in data.draw(st.lists(st.integers(0, len(batch) - 1), max_size=3), label="sent again"):
        header = data.draw(st.sampled_from([None, (("Nats-Msg-Id", f"{tag}-again-{len(batch)}"),)]))
        batch.append(Sent(batch[i].subject, batch[i].body, header, batch[i].missing))
    # A valid event last, after whatever hostile ones: it must still be folded.
    closing = {"id": f"{tag}-last", "type": "app.opened", "user_id": f"{tag}-u1", "ts": "2026-11-26T08:00:00+01:00",
               "data": {}}
    batch.append(Sent("signals.app.opened", orjson.dumps(closing), (("Nats-Msg-Id", closing["id"]),)))
    reset_after = data.draw(st.one_of(st.none(), st.integers(0, len(batch) - 1)), label="consumers re-created at")

    service = fuzzed.service
    store = service.store
    dlq_from = asyncio.run(_dlq_next(fuzzed.url))
    applied, ignored = fuzzed.on_loop(lambda: (store.applied, store.ignored))
    published = asyncio.run(_publish(fuzzed, batch, reset_after))
    stored, indexes = [(stream, seq) for _, stream, seq in published], [i for i, _, _ in published]
    kinds_of: dict[tuple[str, int], str] = {}
    reasons_of: dict[tuple[str, int], str] = {}
    assert stored, "the closing event was stored at least"
    last = {stream: max(seq for s, seq in stored if s == stream) for stream, _ in stored}
    assert until(lambda: all(positions.get(s, 0) >= seq for positions in [fuzzed.on_loop(lambda: dict(store.positions))]
                             for s, seq in last.items()), timeout=SETTLE_WITHIN_S), (
        f"a consumer stopped short: positions {fuzzed.on_loop(lambda: dict(store.positions))}, stored up to {last}")
    originals, dlq = asyncio.run(_read_back(fuzzed.url, stored, dlq_from))

    dead = {}
    for message in dlq:
        headers = headers_of(message)
        key = (headers.get(jsx.DLQ_STREAM), int(headers.get(jsx.DLQ_SEQ, "0")))
        assert key not in dead, f"dead-lettered twice: {key}"
        dead[key] = message
    accepted: dict[str, list[tuple[str, Any]]] = {}
    for (stream, seq), original in zip(stored, originals, strict=True):
        expected = verdict(original.subject, original.data or b"", to_ms(original.time), stream)
        outcome = f"{stream}: " + ("taken" if not isinstance(expected, Rejection) else expected.kind)
        fuzzed.kinds[outcome] = fuzzed.kinds.get(outcome, 0) + 1
        message = dead.pop((stream, seq), None)
        if stream == "DECISIONS" and not isinstance(expected, Rejection):
            assert message is None, f"{stream} #{seq} is a decision but was dead-lettered: {headers_of(message)}"
            continue
        if not isinstance(expected, Rejection):
            assert message is None, f"{stream} #{seq} is valid but was dead-lettered: {message.headers}"
            accepted.setdefault(expected.user_id, []).append((stream, expected))
            continue
        assert message is not None, f"{stream} #{seq} ({expected}) is neither folded nor in the DLQ"
        headers = headers_of(message)
        assert headers[jsx.DLQ_KIND] == expected.kind, (headers, expected)
        assert headers[jsx.DLQ_KIND] in REJECTION_KINDS
        kinds_of[(stream, seq)], reasons_of[(stream, seq)] = headers[jsx.DLQ_KIND], headers[jsx.DLQ_REASON]
        if expected.kind in ("oversized", "future_ts"):
            assert headers[jsx.DLQ_REASON].startswith(expected.reason), (headers, expected)
        else:
            assert headers[jsx.DLQ_REASON] == _header_reason(expected.reason), (headers, expected)
        assert headers[jsx.DLQ_SUBJECT] == original.subject
        assert message.subject == f"dlq.{original.subject}" if len(original.subject) <= 1024 else (
            message.subject.endswith(".subject_too_long"))
        body = original.data or b""
        if jsx.DLQ_TRUNCATED in headers:
            assert headers[jsx.DLQ_TRUNCATED] == str(len(body)) and body.startswith(message.data or b"")
        else:
            assert (message.data or b"") == body, "the DLQ keeps the original bytes"
    assert not dead, f"dead-lettered, though not stored by this batch: {sorted(dead)}"
    for (stream, seq), i in zip(stored, indexes, strict=True):
        if batch[i].missing is not None and (stream, seq) in kinds_of and kinds_of[(stream, seq)] == "missing_field":
            assert f"'{batch[i].missing}'" in reasons_of[(stream, seq)], (batch[i], reasons_of[(stream, seq)])

    # Each user's state is one pass of the pure fold over the events accepted, whatever came between.
    folded_new = 0
    for user, events in accepted.items():
        state = fuzzed.states.setdefault(user, UserState())
        for _, event in events:
            folded_new += apply(state, event)
        served = fuzzed.on_loop(lambda user=user: store.state_of(user))
        assert served is not None and served.to_bytes() == state.to_bytes(), f"user {user!r}"
    total = sum(len(events) for events in accepted.values())
    applied_now, ignored_now = fuzzed.on_loop(lambda: (store.applied, store.ignored))
    assert applied_now - applied + ignored_now - ignored == total, "each event accepted handed to the fold once"
    if all(len({stream for stream, _ in events}) == 1 for events in accepted.values()):
        # One stream per user: the fold saw their events in this order, so what changed a state is known.
        assert applied_now - applied == folded_new, "each event that changed a state counted once"
    # What earlier batches left in memory was written (a checkpoint every 0.2 s): a value a row's column refuses
    # failed every later one.
    assert fuzzed.on_loop(lambda: service.checkpointer.last_error) is None
    fuzzed.examples += 1
    fuzzed.messages += len(stored)


async def _dlq_next(url: str) -> int:
    client = await nats.connect(url)
    try:
        return (await client.jetstream(timeout=5).stream_info("DLQ")).state.last_seq + 1
    finally:
        await client.close()


def test_what_the_fuzz_folded_is_checkpointed_and_the_service_is_ready(fuzzed: Fuzzed) -> None:
    """Run after the batches (file order): what they left in memory (states, positions, decisions' rows) is
    written to the database, and every consumer has caught up."""
    checkpointer = fuzzed.service.checkpointer
    asyncio.run_coroutine_threadsafe(checkpointer.checkpoint(), fuzzed.loop).result(60)
    assert checkpointer.last_error is None or not checkpointer.uncheckpointed, checkpointer.last_error
    assert until(lambda: fuzzed.on_loop(lambda: fuzzed.service.ready), timeout=SETTLE_WITHIN_S)
