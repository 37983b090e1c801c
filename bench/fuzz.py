"""A bounded fuzz drill of the two ways in, the wire and the HTTP API, against the real service.

    python bench/fuzz.py                               # 3,000 messages, 1,500 requests
    python bench/fuzz.py --messages 600 --requests 300  # a quick run
    python bench/fuzz.py --seed 7                      # another draw (the default draw is the same each run)

Starts `tipstream run` (embedded NATS, SQLite, an admin token) in a temporary data directory, then:
1. the wire: publishes to `signals.<type>` and `feedback.<type>` valid events of the contract (v1) and
   broken ones, each labelled by how it was made (a wrong type, a missing field, an unknown type, odd
   unicode, ids of 128 and 129 characters, huge payloads, times at their edges, not JSON, not an object,
   deep nesting, duplicate keys, odd or missing `Nats-Msg-Id`s, a subject that disagrees with the type, `v`
   values). Checked exactly: every invalid message stored lands on `dlq.>` once, with the kind and a
   reason naming the problem; every valid one is folded (the tracked users' features at a fixed instant
   are those the contract's semantics give, counted here by hand, and every feature the pure fold's);
   /readyz answers 200 throughout and each stream's lag returns to 0. What the contract leaves open (nesting past the parser's depth, a key given
   twice) must come to one outcome, folded or dead-lettered, never both; `NaN` in a field the contract does
   not name is ignored with the field (docs/operations.md, "Invalid events: the DLQ"), in one it names refused.
2. HTTP: requests for every operation of /openapi.json, bodies drawn from its schemas and then broken
   (wrong types, unknown and missing fields, huge, deep, not JSON, NaN, duplicate keys, the wrong
   content-type, odd Hosts, paths and percent-encoding, long user ids), over raw sockets. Checked: no 5xx,
   each 4xx names its problem, a refused /score logs no decision (DECISIONS grows by /score's 200s exactly).
3. a rebuild from the log (`tipstream migrate base`, start again): every wire user's features equal live.
The HTTP requests go meanwhile, from 4 clients (`--apart`: after the events). Then no traceback in the
service's log. The draw is `random.Random(--seed)`: the same run each time.
Last line: {"bench": "fuzz", "problems": 0, ...}; the exit status is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import nats
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (
    ROOT,
    ServiceProcess,
    add_settings_option,
    metric,
    request_once,
    service_environment,
    settings_given,
)

from streams.events import parse_event
from streams.features import evaluate
from streams.fold import UserState, apply

TOKEN = "bench-fuzz-admin-token-0123456789"
DAY_MS = 86_400_000
MAX_EVENT_BYTES = 16_384  # the default TIPSTREAM_MAX_EVENT_BYTES
OFFSETS = ["Z", "+00:00", "+01:00", "+05:45", "+14:00", "-12:00", "-09:30", "+23:59", "-00:00"]
# Tracked users: odd but valid ids (combining marks, right-to-left text and its override, 4-byte emoji,
# 128 characters): every valid event is one of theirs, so their features count what was folded.
TRACKED = ["fz-0", "fz-1", "fz-e\u0301\u0301", "fz-\u05e9\u05dc\u05d5\u05dd\u202e", "fz-\U0001f600\U0001f468\u200d\U0001f469",
           "fz-" + "x" * 125, "\U0001f600" * 128, "fz-\u00a0sp ace"]
REACTIONS = ["acted", "liked", "snoozed", "dismissed", "disliked"]
SIGNAL_TYPES = ["task.created", "task.completed", "task.rescheduled", "task.deleted", "app.opened", "tip.shown"]
CHECKED = ["tasks_created_7d", "tasks_completed_7d", "completion_rate_7d", "tip_volume_24h", "tip_positive_rate_30d",
           "seconds_since_active"]


def iso(ms: int, offset: str) -> str:
    """`ms` since the epoch as ISO 8601 text in `offset` (Z, or ±hh:mm), to the millisecond."""
    if offset in ("Z", "-00:00"):
        zone = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        zone = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    moment = datetime.fromtimestamp(ms / 1000, UTC).astimezone(zone)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}"
    return text + ("Z" if offset == "Z" else offset if offset == "-00:00" else moment.strftime("%z")[:3] + ":"
                   + moment.strftime("%z")[3:])


# --- the wire ------------------------------------------------------------------------------------------


@dataclass
class Message:
    subject: str
    body: bytes
    headers: dict[str, str] | None
    label: str  # "valid", "invalid" or "either" (the contract does not say: one outcome, never both)
    how: str
    kind: str = ""  # the DLQ kind an invalid one must get
    needle: str = ""  # what its reason must name
    event: dict[str, Any] | None = None  # a valid one's event, for the hand count


@dataclass
class Wire:
    at_ms: int
    rng: random.Random
    serial: int = 0
    folded: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)  # user -> (type, ms, reaction)
    states: dict[str, UserState] = field(default_factory=dict)  # user -> the pure fold of their valid events

    def next_id(self) -> str:
        self.serial += 1
        return f"fz-evt-{self.serial}"

    def ts(self) -> tuple[str, int]:
        """An event time in the last 35 days, in any offset; one in eight on a window's edge."""
        r = self.rng
        if r.random() < 0.125:
            ms = self.at_ms - r.choice([0, 1, DAY_MS, DAY_MS - 1, 7 * DAY_MS, 7 * DAY_MS - 1, 30 * DAY_MS,
                                        30 * DAY_MS - 1, -3_600_000])
        else:
            ms = self.at_ms - r.randrange(1, 35 * DAY_MS)
        return iso(ms, r.choice(OFFSETS)), ms

    def text_id(self, prefix: str) -> str:
        return self.rng.choice([f"{prefix}-{self.rng.randrange(50)}", f"{prefix}-\u05d0\u0301", "\U0001f4a9" * 128,
                                "t" * 128, f"{prefix} sp", "*", ">", "a.b"])

    def event(self, kind: str | None = None, user: str | None = None) -> tuple[dict[str, Any], int]:
        r = self.rng
        kind = kind or r.choice(SIGNAL_TYPES + ["tip.reacted"] * 2)
        ts, ms = self.ts()
        data: dict[str, Any] | None
        if kind == "task.created":
            data = {"task_id": self.text_id("t")}
            if r.random() < 0.5:
                data["due"] = self.ts()[0]
            if r.random() < 0.5:
                data["priority"] = r.choice([0, 1, 2, 3, 4, None])
            if r.random() < 0.3:
                data["labels"] = r.choice([[], None, ["\U0001f600"], ["l" * 128] * 64])
            if r.random() < 0.3:
                data["project_id"] = r.choice(["", None, "p" * 128])
        elif kind in ("task.completed", "task.deleted"):
            data = {"task_id": self.text_id("t")}
        elif kind == "task.rescheduled":
            data = {"task_id": self.text_id("t"), "due": self.ts()[0]}
        elif kind == "app.opened":
            data = r.choice([{}, None, "absent", {"screen": "home"}])
        elif kind == "tip.shown":
            data = {"tip_id": self.text_id("tip")}
            if r.random() < 0.5:
                data["decision_id"] = r.choice(["", None, "d-1", "d" * 128])
        else:
            data = {"tip_id": self.text_id("tip"), "reaction": r.choice(REACTIONS)}
            if r.random() < 0.5:
                data["decision_id"] = r.choice(["", None, "d-1", "d" * 128])
        event: dict[str, Any] = {"id": self.next_id(), "type": kind, "user_id": user or r.choice(TRACKED), "ts": ts}
        if data != "absent":
            event["data"] = data
        if r.random() < 0.3:
            event["v"] = 1
        if r.random() < 0.2:  # unknown fields: kept out of state, never a refusal
            event[r.choice(["client", "x\u0301", "\U0001f600", "nul"])] = r.choice(
                [{"app": "ios"}, "\u0000", [1, [2, [3]]], "\u202eevil", None])
        return event, ms

    def valid(self) -> Message:
        event, _ = self.event()
        headers = self.rng.choice([{"Nats-Msg-Id": event["id"]}] * 6 + [None, {"Nats-Msg-Id": event["id"] + "-other"},
                                                                          {"X-Odd": "\u00e9".encode().decode("latin-1")}])
        if self.rng.random() < 0.03:  # valid, at the start of time: older than every window (ignored), never refused
            event["user_id"] = "fz-year-1"
            event["ts"] = self.rng.choice(["0001-01-01T00:00:00Z", "0001-01-02T13:59:00+14:00", "0001-01-01T00:00:00-12:00",
                                           "0001-01-01T00:00:00.000001-00:00"])
            body = dump(event)
            return Message(subject_of(event["type"]), body, headers, "valid", "valid: year 1")
        body = dump(event)
        if self.rng.random() < 0.05:  # not JSON, in a field the contract does not name: ignored with it
            body = body.replace(b'"id"', b'"n":' + self.rng.choice([b"NaN", b"Infinity", b"-Infinity"]) + b',"id"', 1)
        return Message(subject_of(event["type"]), body, headers, "valid", "valid", event=event)

    def invalid(self) -> Message:
        """A valid event broken one way, for a tracked user (were it folded, their features would say so)."""
        r = self.rng
        event, _ = self.event()
        subject = subject_of(event["type"])
        how = r.choice(INVALID)
        kind, needle, body = INVALID_KIND[how], "", None
        key = how.split(":", 1)[1] if ":" in how else ""
        if how.startswith("missing:"):
            if key.startswith("data."):
                event, _ = self.event("tip.reacted" if key == "data.reaction" else "task.completed")
                subject = subject_of(event["type"])
            if key.startswith("data."):
                del event["data"][key[5:]]
            else:
                del event[key]
            needle = key
        elif how.startswith("wrong:"):
            value = {"id": 123, "user_id": ["u"], "type": 5, "ts": 1764140400, "data": "x"}.get(key)
            if key == "data.reaction":
                event, _ = self.event("tip.reacted")
                subject = subject_of("tip.reacted")
                event["data"]["reaction"] = r.choice(["meh", "LIKED", "", 1, None])
            elif key == "data.priority":
                event, _ = self.event("task.created")
                subject = subject_of("task.created")
                event["data"]["priority"] = r.choice(["high", 5, -1, 1.5, 2**64, "2", True])
            elif key == "data.labels":
                event, _ = self.event("task.created")
                subject = subject_of("task.created")
                event["data"]["labels"] = r.choice([["l"] * 65, ["l" * 129], "work", [1]])
            elif key == "data":
                event, _ = self.event(r.choice(["task.created", "tip.reacted"]))
                subject = subject_of(event["type"])
                event["data"] = value
            else:
                event[key] = value
            needle = key
        elif how.startswith("long:"):
            field_name = key.removeprefix("data.")
            if key.startswith("data."):
                event, _ = self.event("task.completed")
                subject = subject_of("task.completed")
                event["data"][field_name] = "t" * 129
            else:
                event[field_name] = r.choice(["i" * 129, "\U0001f600" * 129, ""])
            needle = key
        elif how.startswith("nul:"):
            if key == "data.task_id":
                event, _ = self.event("task.deleted")
                subject = subject_of("task.deleted")
                event["data"]["task_id"] = "t\u0000"
            else:
                event[key] = event[key] + "\u0000"
            needle = key
        elif how.startswith("surrogate:"):
            body = dump(event).replace(b'"user_id":"', b'"user_id":"\\ud83d', 1)
            needle = "user_id"
        elif how.startswith("ts:"):
            event["ts"] = r.choice(BAD_TS)
            needle = "ts"
        elif how == "future":
            event["ts"] = r.choice(["9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999+14:00",
                                    iso(self.at_ms + 3 * DAY_MS, "+01:00")])
            needle = "ts"
        elif how == "unknown type":
            event["type"] = r.choice(["task.exploded", "decision.scored", "TASK.CREATED", "task.created ", ""])
            subject = "signals." + event["type"] if event["type"].strip(". ") == event["type"] and event["type"] else (
                "signals.task.created")
            needle = repr(event["type"])
        elif how.startswith("v:"):
            event["v"] = {"v:2": 2, "v:0": 0, "v:-1": -1, "v:big": 2**64}.get(how, None)
            if how == "v:text":
                event["v"] = "1"
            elif how == "v:float":
                event["v"] = 1.5
            elif how == "v:bool":
                event["v"] = True
            elif how == "v:null":
                event["v"] = None
            kind = "unsupported_version" if type(event["v"]) is int else "invalid_field"
            needle = "v="if kind == "unsupported_version" else "'v'"
        elif how == "subject":
            family = "feedback" if subject.startswith("signals.") else "signals"
            subject = r.choice([f"{family}.{event['type']}", "signals.app.opened" if event["type"] != "app.opened"
                                else "signals.tip.shown", subject + ".x"])
            needle = subject
        elif how == "oversized":
            # Past NATS's max_payload (1 MiB), the publish is refused: nothing stored, nothing to dead-letter.
            event["pad"] = "p" * r.choice([MAX_EVENT_BYTES, 200_000, 900_000, 1_100_000])
            needle = "limit"
        elif how == "not json":
            body = r.choice([b"not json", b"{", dump(event)[:-1], b"", b" \n", b"{'id': 1}", b"\xef\xbb\xbf" + dump(event)])
            needle = "JSON"
        elif how == "bad utf-8":
            body = dump(event).replace(b'"ts"', b'"\xff\xfe":1,"ts"', 1)
            needle = "JSON"
        elif how == "not object":
            body = r.choice([dump([event]), b"null", b"42", b'"event"', b"true"])
            needle = "object"
        elif how == "nan":  # in a field of the contract (in another, it is ignored with the field: `valid`)
            event, _ = self.event("task.created")
            subject = subject_of("task.created")
            event["data"]["priority"] = 1
            body = dump(event).replace(b'"priority":1', b'"priority":' + r.choice([b"NaN", b"Infinity", b"-Infinity"]))
            needle = "data.priority"
        if body is None:
            body = dump(event)
        return Message(subject, body, {"Nats-Msg-Id": f"bad-{self.serial}"} if r.random() < 0.7 else None,
                       "invalid", how, kind, needle)

    def either(self) -> Message:
        """What the contract leaves open (deep nesting, a key given twice): one outcome, never both; for throwaway
        users, whose features are not checked."""
        r = self.rng
        event, _ = self.event(user=f"fz-either-{r.randrange(4)}")
        how = r.choice(["deep", "duplicate key"])
        if how == "deep":
            depth = r.choice([64, 200, 1_000, 5_000])
            body = dump(event)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
        else:
            key = r.choice(["type", "user_id", "id", "ts"])
            other = {"type": '"task.exploded"', "user_id": '"fz-either-dup"', "id": '"fz-dup"', "ts": '"2026-11-26"'}[key]
            body = dump(event)[:-1] + f',"{key}":{other}}}'.encode()
        return Message(subject_of(event["type"]), body, {"Nats-Msg-Id": event["id"]}, "either", how)


INVALID = ["missing:id", "missing:user_id", "missing:ts", "missing:data.task_id", "missing:data.reaction",
           "wrong:id", "wrong:user_id", "wrong:type", "wrong:ts", "wrong:data", "wrong:data.reaction",
           "wrong:data.priority", "wrong:data.labels", "long:id", "long:user_id", "long:data.task_id", "nul:user_id",
           "nul:id", "nul:data.task_id", "surrogate:user_id", "ts:bad", "future", "unknown type", "v:2", "v:0", "v:-1",
           "v:big", "v:text", "v:float", "v:bool", "v:null", "subject", "oversized", "not json", "bad utf-8",
           "not object", "nan"]
INVALID_KIND = {how: "invalid_field" for how in INVALID} | {
    "missing:id": "missing_field", "missing:user_id": "missing_field", "missing:ts": "missing_field",
    "missing:data.task_id": "missing_field", "missing:data.reaction": "missing_field", "future": "future_ts",
    "unknown type": "unknown_type", "subject": "subject_mismatch", "oversized": "oversized", "not json": "invalid_json",
    "bad utf-8": "invalid_utf8", "not object": "invalid_json"}
BAD_TS = ["2026-11-26T08:01:02", "2026-11-26T08:01:02+01", "2026-12-31T23:59:60Z", "2026-06-30T23:59:60+00:00",
          "2026-02-30T00:00:00Z", "2026-11-26T08:01:02+24:00", "", "20261126T080102Z", "1764140400",
          "2026-11-26", "0000-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-00:01", "now"]


def subject_of(kind: str) -> str:
    return f"{'feedback' if kind == 'tip.reacted' else 'signals'}.{kind}"


def dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def headers_of(message: Any) -> dict[str, str]:
    """A stored message's headers from its bytes (nats-py's get_msg reads them with the email package)."""
    if not message.hdrs:
        return {}
    lines = base64.b64decode(message.hdrs).decode().split("\r\n")[1:]
    return {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}


def expected_features(records: list[tuple[str, int, str]], at_ms: int) -> dict[str, float]:
    """DESIGN's core profile features over `records`, counted by hand: windows `(at - w, at]`."""
    def count(kind: str, days: int, reactions: tuple[str, ...] = ()) -> int:
        return sum(1 for k, ms, reaction in records if k == kind and at_ms - days * DAY_MS < ms <= at_ms
                   and (not reactions or reaction in reactions))

    created, completed = count("task.created", 7), count("task.completed", 7)
    signals = [ms for k, ms, _ in records if k != "tip.reacted" and ms <= at_ms]
    return {"tasks_created_7d": created, "tasks_completed_7d": completed,
            "completion_rate_7d": (completed + 1) / (created + 2), "tip_volume_24h": count("tip.shown", 1),
            "tip_positive_rate_30d": (count("tip.reacted", 30, ("acted", "liked")) + 1) / (count("tip.reacted", 30) + 2),
            "seconds_since_active": (at_ms - max(signals)) / 1000 if signals else 30 * 86_400.0}


async def wire_phase(service: ServiceProcess, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    at_ms = (int(time.time() * 1000) // 1000) * 1000
    wire = Wire(at_ms, random.Random(args.seed))
    nc = await nats.connect(service.nats_url, max_reconnect_attempts=2)
    js = nc.jetstream(timeout=10)
    dlq_from = (await js.stream_info("DLQ")).state.last_seq + 1
    before = await scrape(service)
    stored: dict[tuple[str, int], Message] = {}
    resent, not_stored, readyz_not_200 = 0, 0, 0
    watching = True

    async def watch_readyz() -> None:
        nonlocal readyz_not_200
        while watching:
            status, _ = await request_once(service.port, "GET", "/readyz")
            readyz_not_200 += status != 200
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_readyz())
    started = time.perf_counter()
    sent: list[Message] = []
    for i in range(args.messages):
        roll = wire.rng.random()
        if roll < 0.45:
            message = wire.valid()
        elif roll < 0.9:
            message = wire.invalid()
        elif roll < 0.95:
            message = wire.either()
        elif sent:  # the same bytes again under another Nats-Msg-Id, or none: folded once
            again = wire.rng.choice(sent)
            message = Message(again.subject, again.body, wire.rng.choice([None, {"Nats-Msg-Id": f"again-{i}"}]),
                              again.label, "sent again", again.kind, again.needle, None)
            resent += again.label == "valid"
        else:
            continue
        try:
            ack = await js.publish(message.subject, message.body, headers=message.headers)
        except Exception:  # noqa: BLE001 - refused by NATS (past max_payload; a subject no stream takes): not stored
            not_stored += 1
            if not nc.is_connected:
                await nc.close()
                nc = await nats.connect(service.nats_url)
                js = nc.jetstream(timeout=10)
            continue
        if ack.duplicate:
            not_stored += 1
            continue
        stored[(ack.stream, ack.seq)] = message
        sent.append(message)
        if message.event is not None:
            event = message.event
            wire.folded.setdefault(event["user_id"], []).append(
                (event["type"], wire_ms(event["ts"]), (event.get("data") or {}).get("reaction", "")))
            apply(wire.states.setdefault(event["user_id"], UserState()), parse_event(message.body))
    published_s = time.perf_counter() - started
    drained_s = await until_caught_up(service, js, problems)
    watching = False
    await watcher
    after = await scrape(service)

    # Every invalid message stored is in the DLQ once, with its kind and a reason naming the problem.
    last = (await js.stream_info("DLQ")).state.last_seq
    dead: dict[tuple[str, int], dict[str, str]] = {}
    for seq in range(dlq_from, last + 1):
        headers = headers_of(await js.get_msg("DLQ", seq))
        where = (headers.get("Tipstream-Original-Stream", "?"), int(headers.get("Tipstream-Original-Seq", "0")))
        if where in dead:
            problems.append(f"wire: {where} dead-lettered twice")
        dead[where] = headers
    await nc.close()
    invalid = {where: m for where, m in stored.items() if m.label == "invalid"}
    for where, message in invalid.items():
        headers = dead.get(where)
        if headers is None:
            problems.append(f"wire: invalid ({message.how}) not dead-lettered: {message.subject} {message.body[:200]!r}")
            continue
        kind, reason = headers.get("Tipstream-Dlq-Kind", ""), headers.get("Tipstream-Dlq-Reason", "")
        if kind != message.kind or message.needle.lower() not in reason.lower():
            problems.append(f"wire: {message.how} dead-lettered as {kind!r} ({reason[:300]!r}); expected {message.kind!r} "
                            f"naming {message.needle!r}: {message.body[:200]!r}")
    for where, headers in dead.items():
        message = stored.get(where)
        if message is not None and message.label == "valid":
            problems.append(f"wire: a valid event dead-lettered ({headers.get('Tipstream-Dlq-Reason')}): "
                            f"{message.subject} {message.body[:200]!r}")
    either_dead = sum(1 for where, m in stored.items() if m.label == "either" and where in dead)
    valid_stored = sum(1 for m in stored.values() if m.label == "valid")
    either_stored = sum(1 for m in stored.values() if m.label == "either")
    taken = sum(after[f"{k}|{s}"] - before[f"{k}|{s}"] for k in ("applied", "ignored") for s in ("SIGNALS", "FEEDBACK"))
    if taken != valid_stored + either_stored - either_dead:
        problems.append(f"wire: {taken} events folded or ignored; {valid_stored} valid and "
                        f"{either_stored - either_dead} open-ended ones not dead-lettered were stored")
    dlq_counted = after["dlq"] - before["dlq"]
    if dlq_counted != len(invalid) + either_dead or len(dead) != dlq_counted:
        problems.append(f"wire: {len(invalid)} invalid and {either_dead} open-ended stored, {len(dead)} DLQ entries, "
                        f"tipstream_dlq_total moved by {dlq_counted}")
    if readyz_not_200:
        problems.append(f"wire: /readyz answered other than 200 {readyz_not_200} times")
    mismatched = await check_features(service, wire, problems, "live")
    by_how: dict[str, int] = {}
    for m in stored.values():
        by_how[m.how] = by_how.get(m.how, 0) + 1
    return {"at_ms": at_ms, "wire": wire, "stored": len(stored), "valid": valid_stored, "invalid": len(invalid),
            "either": either_stored, "either_dead_lettered": either_dead, "resent_valid": resent,
            "not_stored": not_stored, "dead_lettered": len(dead), "published_s": published_s, "drained_s": drained_s,
            "feature_mismatches": mismatched, "by_how": by_how}


def short(text: str) -> str:
    """A user id as a problem line shows it: 128 emoji fill a screen."""
    return repr(text) if len(text) <= 24 else f"{text[:12]!r}...({len(text)} characters)"


def wire_ms(ts: str) -> int:
    moment = datetime.fromisoformat(ts)
    return int((moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1))


async def check_features(service: ServiceProcess, wire: Wire, problems: list[str], when: str) -> int:
    mismatched = 0
    at = quote(iso(wire.at_ms, "+00:00"), safe="")
    for user in TRACKED:
        status, body = await request_once(service.port, "GET", f"/users/{quote(user, safe='')}/features?at={at}")
        if status != 200:
            problems.append(f"features {when}: {short(user)} answered {status}: {body[:300]!r}")
            continue
        got = {name: value["value"] for name, value in orjson.loads(body)["features"].items()}
        want = expected_features(wire.folded.get(user, []), wire.at_ms)
        for name in CHECKED:
            if abs(got[name] - want[name]) > 1e-9:
                mismatched += 1
                problems.append(f"features {when}: {short(user)} {name} = {got[name]}, the contract's count says {want[name]}")
        # Every feature, the others too, as the pure fold gives them over the same events (the service's
        # ingest, checkpoints and rebuild against its own core).
        pure = evaluate(wire.states.get(user), wire.at_ms)
        for name, value in pure.items():
            if name in got and abs(got[name] - value.value) > 1e-6:
                mismatched += 1
                problems.append(f"features {when}: {short(user)} {name} = {got[name]}, the pure fold says {value.value}")
    return mismatched


async def scrape(service: ServiceProcess) -> dict[str, float]:
    _, body = await request_once(service.port, "GET", "/metrics")
    text = body.decode()
    figures = {f"{what}|{stream}": metric(text, f"tipstream_events_{what}_total", f'stream="{stream}"')
               for what in ("applied", "ignored") for stream in ("SIGNALS", "FEEDBACK", "DECISIONS")}
    figures["dlq"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("tipstream_dlq_total{"))
    figures["score_200"] = metric(text, "tipstream_score_requests_total", 'status="200"')
    for stream in ("SIGNALS", "FEEDBACK", "DECISIONS"):
        figures[f"lag|{stream}"] = metric(text, "tipstream_stream_lag", f'stream="{stream}"')
        figures[f"position|{stream}"] = metric(text, "tipstream_stream_position", f'stream="{stream}"')
    return figures


async def until_caught_up(service: ServiceProcess, js: Any, problems: list[str], within_s: float = 60.0) -> float:
    """Seconds until every stream's lag is 0 and its position its last message's."""
    started = time.perf_counter()
    while True:
        figures = await scrape(service)
        behind = []
        for stream in ("SIGNALS", "FEEDBACK", "DECISIONS"):
            last = (await js.stream_info(stream)).state.last_seq
            if figures[f"lag|{stream}"] != 0 or figures[f"position|{stream}"] != last:
                behind.append(f"{stream} lag {figures[f'lag|{stream}']:.0f}, at {figures[f'position|{stream}']:.0f} of {last}")
        if not behind:
            return time.perf_counter() - started
        if time.perf_counter() - started > within_s:
            problems.append(f"not caught up within {within_s:.0f} s (a stall): {'; '.join(behind)}")
            return float("nan")
        await asyncio.sleep(0.05)


# --- HTTP ------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(port: int, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes | None, host: bytes = b"127.0.0.1") -> Answer | None:
    """One request on a connection of its own, byte for byte; None when the connection closed without an answer."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, b"Connection: close", *(n + b": " + v for n, v in headers)]
    if body is not None:
        head.append(b"Content-Length: %d" % len(body))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
        try:
            received = await asyncio.wait_for(reader.read(-1), 30)
        except ConnectionResetError:
            return None
    finally:
        writer.close()
    status_head, _, rest = received.partition(b"\r\n\r\n")
    if not status_head:
        return None
    lines = status_head.split(b"\r\n")
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        parsed[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return Answer(int(lines[0].split()[1]), parsed, rest)


class Draw:
    """Values for a JSON schema of /openapi.json (the subset it uses), and values that break it."""

    def __init__(self, rng: random.Random, components: dict[str, Any]) -> None:
        self.rng, self.components = rng, components

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.components[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def valid(self, schema: dict[str, Any], depth: int = 0) -> Any:
        r, schema = self.rng, self.resolve(schema)
        for branch in ("anyOf", "oneOf"):
            if branch in schema:
                return self.valid(r.choice(schema[branch]), depth + 1)
        if "enum" in schema:
            return r.choice(schema["enum"])
        types = schema.get("type", "object")
        kind = r.choice(types) if isinstance(types, list) else types
        if kind == "null":
            return None
        if kind == "boolean":
            return r.random() < 0.5
        if kind in ("integer", "number"):
            low, high = schema.get("minimum", -1000), schema.get("maximum", 1000)
            low = max(low, schema.get("exclusiveMinimum", low - 1) + 1e-3) if kind == "number" else low
            value = r.choice([low, high, (low + high) / 2, r.uniform(low, high)])
            return int(value) if kind == "integer" else value
        if kind == "string":
            if schema.get("format") == "date-time":
                return iso(1_764_144_000_000 + r.randrange(-10**9, 10**9), r.choice(OFFSETS[1:8]))
            low, high = schema.get("minLength", 0), min(schema.get("maxLength", 24), 128)
            if "pattern" in schema and "A-Za-z0-9" in schema["pattern"]:
                return "v" + "".join(r.choice("abc019._-") for _ in range(max(0, min(high, 8) - 1)))
            alphabet = "ab\u00e9\u05d0\U0001f600 -_"
            return "".join(r.choice(alphabet) for _ in range(r.choice([max(low, 1), high, (low + high) // 2])))
        if kind == "array":
            items = schema.get("items", {})
            count = r.randint(schema.get("minItems", 0), min(schema.get("maxItems", 4), 4))
            return [self.valid(items, depth + 1) for _ in range(count)]
        out: dict[str, Any] = {}
        required = schema.get("required", [])
        for name, sub in schema.get("properties", {}).items():
            if name in required or (depth < 4 and r.random() < 0.5):
                out[name] = self.valid(sub, depth + 1)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and depth < 4 and r.random() < 0.5:
            for i in range(r.randint(0, min(schema.get("maxProperties", 3), 3))):
                out[f"f_{i}"] = self.valid(extra, depth + 1)
        return out


WRONG = [None, True, 0, -1, 1e308, 2**64, "", "x" * 300, [], {}, [None], {"a": {"b": None}}, "\u0000", "\ud800"]


def paths_in(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_in(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths_in(item, (*prefix, i))
    return found


def get_at(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


def set_at(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copy = orjson.loads(orjson.dumps(value))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = new
    return copy


@dataclass
class Http:
    port: int
    draw: Draw
    schemas: dict[str, Any]
    answered: dict[str, int] = field(default_factory=dict)
    score_200: int = 0
    fields_checked: int = 0  # 422s checked to name the one field broken


OPERATIONS_LEFT_ALONE = {"/admin/users/{user_id}/forget"}  # users drawn for it are HTTP ones (fz-h-*)


async def http_phase(service: ServiceProcess, args: argparse.Namespace, problems: list[str],
                     wire_users: list[str]) -> dict[str, Any]:
    _, raw = await request_once(service.port, "GET", "/openapi.json")
    document = orjson.loads(raw)
    rng = random.Random(args.seed + 1)
    draw = Draw(rng, document["components"]["schemas"])
    operations = [(method.upper(), path, op) for path, ops in document["paths"].items()
                  for method, op in ops.items() if method in ("get", "post", "put", "delete", "patch")]
    http = Http(service.port, draw, document["components"]["schemas"])
    score = next(operation for operation in operations if operation[:2] == ("POST", "/score"))
    nc = await nats.connect(service.nats_url)
    js = nc.jetstream(timeout=10)
    # Its last sequence, not its count: a user forgotten meanwhile takes their decisions out.
    decisions_before = (await js.stream_info("DECISIONS")).state.last_seq
    before = await scrape(service)
    took: dict[str, list[float]] = {}  # each operation's answer times, s
    drawn = iter(range(args.requests))

    async def client() -> None:
        for i in drawn:  # shared: each request drawn once, the draw in the same order whichever client sends it
            if i < 2 * len(operations):  # every operation twice, then /score (the hot path) for one in three
                method, path, op = operations[i % len(operations)]
            else:
                method, path, op = score if rng.random() < 0.35 else rng.choice(operations)
            request = make_request(rng, draw, method, path, op)
            asked = time.perf_counter()
            answer = await raw_request(service.port, *request[:4], host=request[4])
            took.setdefault(f"{method} {path}", []).append(time.perf_counter() - asked)
            judge(http, problems, method, path, request, answer)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    http_s = time.perf_counter() - started
    await until_caught_up(service, js, problems)
    decisions = (await js.stream_info("DECISIONS")).state.last_seq - decisions_before
    await nc.close()
    after = await scrape(service)
    counted = after["score_200"] - before["score_200"]
    if not decisions == counted == http.score_200:
        problems.append(f"http: /score answered 200 {http.score_200} times (its metric: {counted:.0f}); DECISIONS "
                        f"grew by {decisions}: a refused /score logged a decision, or a 200 logged none")
    slowest = sorted(took.items(), key=lambda item: -sum(item[1]))[:3]
    return {"requests": args.requests, "operations": len(operations), "seconds": http_s, "answered": http.answered,
            "score_200": http.score_200, "decisions": decisions, "fields_checked": http.fields_checked,
            "slowest": ", ".join(f"{name} {sum(times):.1f} s over {len(times)} (max {max(times):.2f})"
                                 for name, times in slowest)}


def make_request(rng: random.Random, draw: Draw, method: str, path: str,
                 op: dict[str, Any]) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes | None, bytes, str, str]:
    """(method, target, headers, body, host, expectation, how it was broken): the expectation "ok" (2xx),
    "refused" (4xx) or "any" (not 5xx)."""
    expect = "ok"
    user = rng.choice(["fz-h-1", "fz-h-\u00e9\u0301", "fz-h-" + "u" * 123, "\U0001f601" * 128, "fz-h-a b", "fz-h-a/b"])
    version = rng.choice(["v1", "v2", "nope", "v" * 64])
    target = path.replace("{user_id}", quote(user, safe="")).replace("{version}", quote(version, safe=""))
    headers: list[tuple[bytes, bytes]] = []
    body: bytes | None = None
    host = b"127.0.0.1"
    if path.startswith("/admin/"):
        token = rng.choice([TOKEN] * 8 + ["", "wrong-token-0123456789", TOKEN + "x", "\u00e9"])
        if token == TOKEN:
            headers.append((b"Authorization", b"Bearer " + token.encode()))
        else:
            if token:
                headers.append((b"Authorization", b"Bearer " + token.encode("latin-1", "replace")))
            expect = "refused"
    if path.startswith("/models/") and version not in ("v1",):
        expect = "any"
    if path.startswith("/admin/models") or path == "/admin/rollback":
        expect = "any" if expect == "ok" else expect  # 404 and 409 follow the registry's state
    if "/forget" in path and expect == "ok":
        expect = "any"  # 409 while one is under way
    if "{user_id}" in path and path.endswith("/features"):
        choice = rng.random()
        if choice < 0.3:
            target += "?at=" + quote(rng.choice(["2026-11-26T09:00:00+01:00", "0001-01-01T00:00:00Z",
                                                  "9999-12-31T23:59:59-00:00", "2026-12-31T23:59:59.999999+14:00"]), safe="")
        elif choice < 0.45:
            target += "?at=" + rng.choice(["2026-11-26", "now", "%ZZ", "2026-11-26T09:00:00", "NaN", "", "x" * 5000])
            expect = "refused"
        elif choice < 0.5:
            target += "?other=1"
            expect = "refused"
    broken = ""
    request_body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if request_body is not None and not (path == "/admin/models" and expect == "ok" and rng.random() < 0.9):
        value = draw.valid(request_body)
        if path == "/score":
            value["user_id"] = rng.choice([user, *TRACKED_SAMPLE])
            for i, candidate in enumerate(value["candidates"]):  # each a different tip (the schema cannot say it)
                candidate["tip_id"] = f"{i}-{candidate['tip_id']}"[:128]
        body = orjson.dumps(value)
        headers.append((b"Content-Type", rng.choice([b"application/json", b"application/json; charset=utf-8"])))
        schema = draw.resolve(request_body)
        if rng.random() < 0.6:
            body, expect, broken = broken_body(rng, value, schema, draw, expect)
            if body is None:
                body = b""
    elif request_body is not None:
        body = orjson.dumps({"version": "v" + str(rng.randrange(10**6))})  # a valid register: trains; rare
        headers.append((b"Content-Type", b"application/json"))
    if rng.random() < 0.15:  # the request line and headers themselves
        how = rng.choice(["host", "path", "percent", "query", "content-type", "long user", "method", "absolute"])
        broken = f"{broken}, {how}" if broken else how
        if how == "host":
            host = rng.choice([b"evil.example", b"127.0.0.1:1", b"localhost", b"[::1]", b"127.0.0.1\x00", b"",
                               b"xn--e1a.example", b"\xc3\xa9.local", b"localhost:abc", b"localhost..", b"127.1",
                               b"[::1]rebound.example", b"localhost.evil.example"])
            expect = "any" if host in (b"localhost", b"[::1]", b"127.0.0.1:1") else "refused"
        elif how == "path":
            target = rng.choice([path.replace("{", "").replace("}", "") + "/", "/" + target, target + "/..", "/..%2f",
                                 "/%00", "/" + "a" * 9000, "*", target + "#frag"]).encode("latin-1", "replace").decode("latin-1")
            expect = "any"
        elif how == "percent":
            target = target.replace("/", "/%2", 1) if rng.random() < 0.5 else target + "%"
            expect = "any"
        elif how == "query":
            target += rng.choice(["?", "?a=1&a=2", "?%ZZ", "?" + "q" * 9000])
            expect = "any"
        elif how == "content-type" and body is not None:
            headers = [h for h in headers if h[0] != b"Content-Type"]
            headers.append((b"Content-Type", rng.choice([b"text/plain", b"application/x-www-form-urlencoded",
                                                         b"application/jsonx", b"multipart/form-data; boundary=x"])))
            expect = "refused" if body else "any"  # no body to read as another type: the defaults, where it may be empty
        elif how == "long user" and "{user_id}" in path:
            target = path.replace("{user_id}", quote(rng.choice(["u" * 129, "\U0001f600" * 129, "u\u0000"]), safe=""))
            expect = "refused"
        elif how == "absolute":  # as sent to a proxy: the target's host is the request's, not the Host header's
            authority = rng.choice(["127.0.0.1", "localhost:8000", "evil.example", "[::1]", "127.0.0.1.evil.example"])
            target = f"http://{authority}{target}"
            expect = expect if authority in ("127.0.0.1", "localhost:8000", "[::1]") else "refused"
        elif how == "method":
            method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
            expect = "refused"
    return method.encode(), target.encode(), headers, body, host, expect, broken


TRACKED_SAMPLE = TRACKED[:3]


def broken_body(rng: random.Random, value: Any, schema: dict[str, Any], draw: Draw,
                expect: str) -> tuple[bytes | None, str, str]:
    how = rng.choice(["wrong type", "unknown field", "missing", "huge", "deep", "not json", "nan", "duplicate key",
                      "not object", "empty"])
    refused = "refused"
    if how == "wrong type" and isinstance(value, dict) and paths_in(value):
        path = rng.choice(paths_in(value))
        broken = set_at(value, path, rng.choice(WRONG))  # written in ASCII: half a surrogate pair as its escape
        if schema_valid(broken, schema, draw):  # a value the schema takes as well
            return json.dumps(broken).encode(), "any" if expect != "refused" else expect, how
        where = ".".join(map(str, path)) if schema_valid(value, schema, draw) else ""
        return json.dumps(broken).encode(), refused, f"{how}: {where}" if where else how
    # The key to name, when the body was valid but for it (the draw can make a value its schema refuses).
    if how == "unknown field":
        key = rng.choice(["extra", "User_Id", "\u00e9", ""])
        named = key or '""'  # as a refusal writes a key named ""
        return orjson.dumps({**value, key: 1}), refused, f"{how}: {named}" if schema_valid(value, schema, draw) else how
    if how == "missing" and schema.get("required"):
        left_out = rng.choice(schema["required"])
        return (orjson.dumps({k: v for k, v in value.items() if k != left_out}), refused,
                f"{how}: {left_out}" if schema_valid(value, schema, draw) else how)
    if how == "huge":
        return orjson.dumps({**value, "pad": "p" * rng.choice([300_000, 2_000_000])}), refused, how
    if how == "deep":
        depth = rng.choice([100, 1_000, 100_000])
        return orjson.dumps(value)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}", refused, how
    if how == "not json":
        return rng.choice([b"{", b"{'a': 1}", orjson.dumps(value)[:-1], b"\xff\xfe", b"\xef\xbb\xbf" + orjson.dumps(value)]), refused, how
    if how == "nan":
        token = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"])
        numbers = [path for path in paths_in(value) if type(get_at(value, path)) in (int, float)]
        if numbers:  # in place of a number the schema allows, else in a field of its own
            return dump(set_at(value, rng.choice(numbers), "__number__")).replace(b'"__number__"', token), refused, how
        return orjson.dumps(value)[:-1] + b',"n":' + token + b"}", refused, how
    if how == "duplicate key" and value:
        key = rng.choice(sorted(value))
        return orjson.dumps(value)[:-1] + f',"{key}":{{"dup":[1]}}}}'.encode(), "any" if expect != "refused" else expect, how
    if how == "not object":
        return rng.choice([b"[]", b"null", b"1", b'"x"']), refused, how
    if how == "empty":
        return b"", "any" if expect != "refused" else expect, how  # an empty body takes the defaults on some
    return orjson.dumps(value), expect, ""  # nothing of that kind to break: as drawn


def schema_valid(value: Any, schema: dict[str, Any], draw: Draw) -> bool:
    try:
        jsonschema.validate(value, {**schema, "components": {"schemas": draw.components}},
                            cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError:
        return False
    return True


def judge(http: Http, problems: list[str], method: str, path: str, request: tuple[Any, ...], answer: Answer | None) -> None:
    shown = (f"{request[0].decode()} {request[1][:150]!r} (Host {request[4]!r}, {request[6] or 'as drawn'}) "
             f"{request[3][:200] if request[3] else b''!r}")
    if answer is None:
        problems.append(f"http: no answer (the connection closed): {shown}")
        return
    http.answered[str(answer.status)] = http.answered.get(str(answer.status), 0) + 1
    expect = request[5]
    if path == "/score" and answer.status == 200 and request[0] == b"POST":
        http.score_200 += 1
    if answer.status >= 500 and not (path == "/readyz" and answer.status == 503):
        problems.append(f"http: {answer.status} {answer.body[:300]!r} for {shown}")
    elif expect == "ok" and not 200 <= answer.status < 300:
        problems.append(f"http: {answer.status} {answer.body[:300]!r} for a valid request: {shown}")
    elif expect == "refused" and not 400 <= answer.status < 500:
        problems.append(f"http: {answer.status} for a request to refuse: {shown}")
    if 400 <= answer.status < 500:
        text = answer.body.decode("utf-8", "replace")
        said = ""
        if answer.headers.get("content-type", "").startswith("application/json"):
            try:
                said = orjson.loads(answer.body).get("error", "")
            except (orjson.JSONDecodeError, AttributeError):
                said = ""
        else:
            said = text
        if len(said.strip()) < 8:
            problems.append(f"http: {answer.status} names no problem ({answer.body[:200]!r}) for {shown}")
        field = request[6].partition(": ")[2]  # the key left out or added, the value of a wrong type
        if answer.status == 422 and field and ", " not in request[6]:  # when nothing else was broken
            http.fields_checked += 1
            named = orjson.loads(answer.body).get("field") if said else None
            # A wrong type is named where it is, or at the object holding it (a candidate's `features`).
            expected = field if not request[6].startswith("wrong type") else field.split(".")[0]
            if named is None or not (named == field or named.startswith(expected)):
                problems.append(f"http: the 422 names {named!r}, not {field!r} ({answer.body[:200]!r}) for {shown}")


# --- the rebuild --------------------------------------------------------------------------------------------


async def rebuild_phase(service: ServiceProcess, wire: Wire, settings: dict[str, str],
                        problems: list[str]) -> tuple[ServiceProcess, float]:
    """Stop, `tipstream migrate base`, start again on the same data directory: the features come back."""
    # `migrate base` refuses while a user's erasure is under way (a rebuild would bring them back).
    waited = time.perf_counter()
    while True:
        _, body = await request_once(service.port, "GET", "/metrics")
        if not metric(body.decode(), "tipstream_erasures_unfinished"):
            break
        if time.perf_counter() - waited > 60:
            problems.append("rebuild: erasures still unfinished after 60 s (tipstream_erasures_unfinished)")
            break
        await asyncio.sleep(0.1)
    service.shutdown()
    env = service_environment(data_dir=service.data_dir, **settings)
    done = subprocess.run([sys.executable, "-m", "app.cli", "migrate", "base"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        problems.append(f"rebuild: tipstream migrate base failed: {done.stderr[-1000:]}")
    started = time.perf_counter()
    again = ServiceProcess(data_dir=service.data_dir, admin_token=TOKEN, **settings)
    await again.wait_ready(120)
    nc = await nats.connect(again.nats_url)
    await until_caught_up(again, nc.jetstream(timeout=10), problems, 120)
    await nc.close()
    rebuilt_s = time.perf_counter() - started
    await check_features(again, wire, problems, "after the rebuild")
    return again, rebuilt_s


def tracebacks(log: Path) -> list[str]:
    text = log.read_text(errors="replace")
    found = []
    start = 0
    while (at := text.find("Traceback (most recent call last)", start)) >= 0:
        found.append(text[max(0, at - 300):at + 1500])
        start = at + 1
    return found


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="wire messages to publish")
    parser.add_argument("--requests", type=int, default=1500, help="HTTP requests to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4, help="HTTP requests in flight at once")
    parser.add_argument("--apart", action="store_true", help="the HTTP requests after the events, not meanwhile")
    parser.add_argument("--data-dir", type=Path, default=None, help="the service's data directory (default: a temporary one)")
    parser.add_argument("--no-rebuild", action="store_true", help="leave out the rebuild from the log")
    add_settings_option(parser)
    args = parser.parse_args()
    settings = settings_given(parser, args.set)
    problems: list[str] = []
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tipstream-fuzz-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(data_dir=data_dir, admin_token=TOKEN, **settings)
    log = service.data_dir / "service.log"
    try:
        await service.wait_ready()
        if args.apart:
            wire = await wire_phase(service, args, problems)
            http = await http_phase(service, args, problems, TRACKED)
        else:  # the requests while the events are published and folded
            wire, http = await asyncio.gather(wire_phase(service, args, problems),
                                              http_phase(service, args, problems, TRACKED))
        print(f"wire: {wire['stored']} messages stored ({wire['valid']} valid, {wire['invalid']} invalid, "
              f"{wire['either']} open-ended of which {wire['either_dead_lettered']} dead-lettered; "
              f"{wire['not_stored']} refused by NATS or dropped as duplicates), published in {wire['published_s']:.1f} s, "
              f"caught up {wire['drained_s']:.2f} s later; {wire['dead_lettered']} DLQ entries")
        print(f"http: {http['requests']} requests over {http['operations']} operations in {http['seconds']:.1f} s, "
              f"answers {dict(sorted(http['answered'].items()))}; /score 200 {http['score_200']}, "
              f"decisions logged {http['decisions']}; {http['fields_checked']} 422s checked to name the one field "
              f"broken; the most time: {http['slowest']}")
        _, body = await request_once(service.port, "GET", "/metrics")
        text = body.decode()
        wakes = metric(text, "tipstream_event_loop_lag_seconds_count")
        stalls = {limit: wakes - metric(text, "tipstream_event_loop_lag_seconds_bucket", f'le="{limit}"')
                  for limit in ("0.1", "0.25", "1.0")}
        print(f"event loop: {wakes:.0f} timer wakes, late by more than 0.1 s {stalls['0.1']:.0f}, 0.25 s "
              f"{stalls['0.25']:.0f}, 1 s {stalls['1.0']:.0f}")
        if stalls["1.0"]:
            problems.append(f"the event loop was held for more than 1 s {stalls['1.0']:.0f} times (a stall)")
        rebuilt_s = float("nan")
        if not args.no_rebuild:
            service, rebuilt_s = await rebuild_phase(service, wire["wire"], settings, problems)
            print(f"rebuild: caught up {rebuilt_s:.1f} s after its start, features compared for {len(TRACKED)} users")
    finally:
        service.shutdown()
    found = tracebacks(log)
    problems += [f"traceback in the service's log: {t}" for t in found]
    for problem in problems[:50]:
        print("PROBLEM", problem)
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more")
    print(json.dumps({"bench": "fuzz", "problems": len(problems), "messages_stored": wire["stored"],
                      "valid": wire["valid"], "invalid": wire["invalid"], "dead_lettered": wire["dead_lettered"],
                      "drained_s": round(wire["drained_s"], 3), "requests": http["requests"],
                      "http_5xx": sum(n for s, n in http["answered"].items() if s.startswith("5")),
                      "score_200": http["score_200"], "decisions": http["decisions"],
                      "rebuild_s": round(rebuilt_s, 2), "loop_late_over_100ms": stalls["0.1"],
                      "tracebacks": len(found)}))
    if args.data_dir is None and not problems:
        shutil.rmtree(data_dir, ignore_errors=True)
    elif problems:
        print(f"the service's data directory and log are kept: {service.data_dir}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
