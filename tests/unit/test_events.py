"""The wire contract: what is accepted, what is refused and why, and the committed schema."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.docs import generated
from streams import events, fold
from streams.events import Rejection, check_subject, parse_event
from streams.features import evaluate
from streams.fold import UserState, apply, to_ms

GOOD = {
    "task.created": {"task_id": "t-1", "due": "2026-11-27T09:00:00+01:00", "priority": 2, "project_id": "p", "labels": ["a"]},
    "task.completed": {"task_id": "t-1"},
    "task.rescheduled": {"task_id": "t-1", "due": "2026-11-28T09:00:00+01:00"},
    "task.deleted": {"task_id": "t-1"},
    "app.opened": {},
    "tip.shown": {"tip_id": "tip-1", "decision_id": "d-1"},
    "tip.reacted": {"tip_id": "tip-1", "decision_id": "d-1", "reaction": "liked"},
}


def envelope(kind: str, data: dict | None = None, **extra: object) -> dict:
    body = {"id": f"e-{kind}", "type": kind, "user_id": "u-42", "ts": "2026-11-26T08:01:02.123+01:00", "v": 1,
            "data": GOOD[kind] if data is None else data}
    body.update(extra)
    return body


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_every_type_parses_and_keeps_its_local_time(kind: str) -> None:
    event = parse_event(orjson.dumps(envelope(kind)))
    assert not isinstance(event, Rejection), event
    assert event.type == kind and event.user_id == "u-42"
    assert event.ts.hour == 8 and event.ts.utcoffset().total_seconds() == 3600
    assert check_subject(event, events.subject_for(kind)) is None


@pytest.mark.parametrize(("kind", "data"), [
    ("task.created", {"task_id": "t-1", "due": None, "priority": None, "project_id": None, "labels": None}),
    ("tip.shown", {"tip_id": "tip-1", "decision_id": None}),
    ("tip.reacted", {"tip_id": "tip-1", "decision_id": None, "reaction": "liked"}),
    ("app.opened", None),
])
def test_null_in_an_optional_field_reads_as_absent(kind: str, data: dict | None) -> None:
    """As every optional field of the contract is: Go's encoding/json writes a nil slice or map as
    null, and `labels: null` (or an app.opened's `data: null`) dead-lettered the whole event."""
    event = parse_event(orjson.dumps({**envelope(kind), "data": data}))
    assert not isinstance(event, Rejection), event
    bare = {key: value for key, value in (data or {}).items() if value is not None}
    body = {k: v for k, v in envelope(kind).items() if k != "data"} | ({"data": bare} if data is not None else {})
    assert verdict(event) == verdict(parse_event(orjson.dumps(body)))


GO_ZERO_VALUES = [
    ("task.created", {"task_id": "t-1", "due": "0001-01-01T00:00:00Z", "priority": 0, "project_id": "",
                      "labels": None}),
    ("tip.shown", {"tip_id": "tip-1", "decision_id": ""}),
    ("tip.reacted", {"tip_id": "tip-1", "decision_id": "", "reaction": "liked"}),
]


@pytest.mark.parametrize(("kind", "data"), GO_ZERO_VALUES)
def test_a_go_zero_value_in_an_optional_field_reads_as_absent(kind: str, data: dict) -> None:
    """A Go struct without `omitempty` writes "" for an id and 0 for a priority it never set: each
    refused, the whole event was dead-lettered over a field the service does not keep."""
    event = parse_event(orjson.dumps(envelope(kind, data)))
    assert not isinstance(event, Rejection), event
    assert getattr(event.data, "decision_id", None) is None
    assert getattr(event.data, "priority", None) is None and getattr(event.data, "project_id", None) is None


def test_a_go_zero_value_does_not_hide_what_else_is_wrong() -> None:
    body = envelope("tip.reacted", {"tip_id": "tip-1", "decision_id": "", "reaction": "loved"})
    rejection = parse_event(orjson.dumps(body))
    assert isinstance(rejection, Rejection) and "'data.reaction'" in rejection.reason, rejection
    # Only the zero value is absent: another bad priority, or an empty id the contract requires, is refused.
    for data in ({"task_id": "t-1", "priority": 5, "project_id": ""}, {"task_id": "", "priority": 0}):
        rejection = parse_event(orjson.dumps(envelope("task.created", data)))
        assert isinstance(rejection, Rejection) and rejection.kind == "invalid_field", rejection
        assert ("'data.priority'" if data["task_id"] else "'data.task_id'") in rejection.reason


def test_a_due_before_the_unix_epoch_s_second_second_is_no_due() -> None:
    """Go's zero time.Time is written even with `omitempty`; kept, it made the task overdue for ever."""
    state = UserState()
    dues = ("0001-01-01T00:00:00Z", "1970-01-01T00:00:00+00:00", "1970-01-01T00:00:01.999Z", "1970-01-01T00:00:02Z")
    for n, due in enumerate(dues):
        apply(state, parse_event(orjson.dumps(envelope("task.created", {"task_id": f"t-{n}", "due": due}, id=f"e{n}"))))
    values = evaluate(state, to_ms(parse_event(orjson.dumps(envelope("app.opened"))).ts))
    assert values["open_tasks"].value == 4 and values["overdue_tasks"].value == 1  # only the last


def _due_s_of_earlier_releases(due: Any) -> int:
    return fold.NO_DUE if due is None else max(1, min(to_ms(due) // 1000, 2**32 - 1))


def test_a_zero_due_held_in_a_checkpoint_of_an_earlier_release_is_no_due_and_its_event_a_duplicate() -> None:
    """Releases before kept a due at or before the epoch as 1 (s): their checkpoints hold such records.
    Read as the fold writes them now, they count no task overdue, and the same event redelivered (a
    replay from the checkpoint's positions) is a duplicate, not a second task.created."""
    created = parse_event(orjson.dumps(envelope("task.created", {"task_id": "t", "due": "0001-01-01T00:00:00Z"})))
    with mock.patch.object(fold, "_due_s", _due_s_of_earlier_releases):
        earlier = UserState()
        apply(earlier, created)
    restored = UserState.from_bytes(earlier.to_bytes())
    assert not apply(restored, created), "a redelivery is a duplicate"
    now = UserState()
    apply(now, created)
    assert restored == now
    values = evaluate(restored, to_ms(created.ts))
    assert values["tasks_created_7d"].value == 1 and values["overdue_tasks"].value == 0


def test_unknown_fields_are_tolerated_but_not_kept() -> None:
    body = envelope("task.completed", {"task_id": "t", "colour": "red"}, source="mobile")
    event = parse_event(orjson.dumps(body))
    assert event.data.task_id == "t"
    assert not hasattr(event, "source") and not hasattr(event.data, "colour")


@pytest.mark.parametrize(
    ("raw", "kind", "names"),
    [
        (b'{"id": "x", ', "invalid_json", "JSON"),
        (b"[1, 2]", "invalid_json", "object"),
        (b'\xff\xfe{"id": "x"}', "invalid_json", "JSON"),
        (orjson.dumps(envelope("task.completed")).replace(b"t-1", b"t-\xff"), "invalid_utf8", "unicode"),
        (orjson.dumps({**envelope("app.opened"), "type": "task.exploded"}), "unknown_type", "task.exploded"),
        (orjson.dumps({k: v for k, v in envelope("app.opened").items() if k != "type"}), "missing_field", "type"),
        (orjson.dumps({k: v for k, v in envelope("app.opened").items() if k != "user_id"}), "missing_field", "user_id"),
        (orjson.dumps(envelope("task.created", {"task_id": "t", "priority": "high"})), "invalid_field", "data.priority"),
        (orjson.dumps(envelope("task.created", {"task_id": "t", "priority": 9})), "invalid_field", "data.priority"),
        (orjson.dumps(envelope("tip.reacted", {"tip_id": "t", "reaction": "meh"})), "invalid_field", "data.reaction"),
        (orjson.dumps(envelope("task.completed", {})), "missing_field", "data.task_id"),
        # No offset: the reason says what to send, not pydantic's "Input should have timezone info".
        (orjson.dumps({**envelope("app.opened"), "ts": "2026-11-26T08:01:02"}), "invalid_field",
         "'ts': must be ISO 8601 text with the user's UTC offset"),
        (orjson.dumps(envelope("task.rescheduled", {"task_id": "t", "due": "2026-11-27T09:00:00"})), "invalid_field",
         "'data.due': must be ISO 8601 text with a UTC offset"),
        # An offset in hours alone, as PostgreSQL prints it: pydantic's reason named "extra characters" only.
        (orjson.dumps({**envelope("app.opened"), "ts": "2026-11-26T08:01:02+01"}), "invalid_field",
         "'ts': must be ISO 8601 text with the user's UTC offset as +hh:mm, -hh:mm or Z"),
        # Unix time has no offset: read as UTC, it made the user's zone UTC (their newest event's).
        (orjson.dumps({**envelope("app.opened"), "ts": 1764140462}), "invalid_field", "'ts': must be ISO 8601"),
        (orjson.dumps({**envelope("app.opened"), "ts": 1764140462.123}), "invalid_field", "with the user's UTC offset"),
        (orjson.dumps({**envelope("app.opened"), "ts": "1764140462123"}), "invalid_field", "'ts': must be ISO 8601"),
        (orjson.dumps({**envelope("app.opened"), "id": "x" * 129}), "invalid_field", "id"),
        (orjson.dumps({**envelope("app.opened"), "v": 7}), "unsupported_version", "v=7"),
        # The version as text read "v='1' is not supported; this server reads v1": the problem is the type.
        (orjson.dumps({**envelope("app.opened"), "v": "1"}), "invalid_field", "'v': must be the event contract's version as a JSON integer"),
        (orjson.dumps({**envelope("app.opened"), "v": None}), "invalid_field", "'v': must be the event contract's version as a JSON integer"),
        (orjson.dumps({**envelope("app.opened"), "v": 1.5}), "invalid_field", "'v': must be the event contract's version as a JSON integer"),
        # orjson could not write the reason: the TypeError escaped, and ingest retried the event for ever.
        (orjson.dumps({**envelope("app.opened"), "v": ["2**64"]}).replace(b'"2**64"', str(2**64).encode()), "invalid_field",
         "as a JSON integer (this server reads 1), not [18446744073709551616]"),
        # Half an emoji, quoted as JSON writes it: as it was, the reason could not be put in a DLQ header.
        (orjson.dumps({**envelope("app.opened"), "v": ["half"]}).replace(b'"half"', b'"\\ud83d"'), "invalid_field",
         'not ["\\ud83d"]'),
        # A type that is no string, said as JSON (it read "type 'None' is not an event type").
        (orjson.dumps({**envelope("app.opened"), "type": None}), "invalid_field", "'type': must be an event type, a string, not null"),
        (orjson.dumps({**envelope("app.opened"), "type": 5}), "invalid_field", "'type': must be an event type, a string, not 5"),
        # A number of the wrong JSON type: pydantic's lax mode read `true` and "2" as numbers, and folded them.
        (orjson.dumps({**envelope("app.opened"), "v": True}), "invalid_field",
         "'v': must be the event contract's version as a JSON integer (this server reads 1), not true"),
        (orjson.dumps(envelope("task.created", {"task_id": "t", "priority": "2"})), "invalid_field",
         "'data.priority': must be a JSON number, not text or a boolean"),
        (orjson.dumps(envelope("task.created", {"task_id": "t", "priority": True})), "invalid_field", "data.priority"),
    ],
)
def test_bad_events_are_refused_with_a_reason_that_names_the_problem(raw: bytes, kind: str, names: str) -> None:
    result = parse_event(raw)
    assert isinstance(result, Rejection)
    assert result.kind == kind, result
    assert names in result.reason, result.reason


def test_a_whole_number_written_with_a_fraction_is_still_a_number() -> None:
    """JSON Schema's `integer` (docs/events.schema.json) takes 1.0: so does the contract, while refusing a
    boolean or text where a number goes."""
    event = parse_event(orjson.dumps({**envelope("task.created", {"task_id": "t", "priority": 2.0}), "v": 1.0}))
    assert not isinstance(event, Rejection), event
    assert event.v == 1 and event.data.priority == 2 and type(event.data.priority) is int


def test_half_an_emoji_in_an_unknown_field_is_tolerated_and_in_a_kept_one_refused_naming_it() -> None:
    """JavaScript's JSON.stringify writes a string cut inside an emoji as a lone surrogate escape
    (`"\\ud83d"`). pydantic's parser refused such a body whole ("unexpected end of hex escape"), so
    one in a field the contract does not know refused the event, which unknown fields must not do."""
    cut = '"Buy milk \\ud83d"'
    body = orjson.dumps(envelope("task.created", {**GOOD["task.created"], "title": "x"}, note="n"))
    raw = body.replace(b'"x"', cut.encode()).replace(b'"n"', b'"\\udc00"')
    event = parse_event(raw)
    assert not isinstance(event, Rejection), event
    assert event.data.task_id == "t-1" and event.ts.hour == 8
    from streams.wire import decode_wire_event

    assert decode_wire_event("signals.task.created", raw) == event
    for field in ("user_id", "task_id", "labels"):
        kept = orjson.dumps(envelope("task.created", {**GOOD["task.created"], "labels": ["ok", "x"]}, user_id="x"))
        if field == "user_id":
            kept = kept.replace(b'"user_id":"x"', f'"user_id":{cut}'.encode())
        elif field == "task_id":
            kept = kept.replace(b'"task_id":"t-1"', f'"task_id":{cut}'.encode())
        else:
            kept = kept.replace(b'"ok","x"', f'"ok",{cut}'.encode())
        result = parse_event(kept)
        assert isinstance(result, Rejection) and result.kind == "invalid_field", (field, result)
        where = {"user_id": "'user_id'", "task_id": "'data.task_id'", "labels": "'data.labels.1'"}[field]
        assert result.reason.startswith(f"field {where}: holds half a UTF-16 surrogate pair"), result.reason
    # Not JSON for another reason as well: refused as before.
    result = parse_event(raw.replace(b'"n"', b"NaN").replace(b'"\\udc00"', b"NaN"))
    assert isinstance(result, Rejection) and result.kind == "invalid_json", result
    result = parse_event(raw[:-1])
    assert isinstance(result, Rejection) and result.kind == "invalid_json", result
    # Only a lone surrogate takes that path: nested past pydantic's parser's limit, a body is refused
    # whether or not it holds a \u escape elsewhere (with one, Python's parser read it and it was accepted).
    deep = orjson.dumps(envelope("app.opened", x="deep", y="A")).replace(b'"deep"', b"[" * 300 + b"]" * 300)
    for body in (deep, deep.replace(b'"A"', b'"\\u0041"')):
        result = parse_event(body)
        assert isinstance(result, Rejection) and "recursion limit" in result.reason, result


def test_feedback_on_a_signal_subject_is_refused() -> None:
    event = parse_event(orjson.dumps(envelope("tip.reacted")))
    rejection = check_subject(event, "signals.tip.reacted")
    assert rejection and rejection.kind == "subject_mismatch" and "feedback.tip.reacted" in rejection.reason


def test_upcasters_bring_old_versions_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hypothetical v0 that called the task `todo`: registering one step is all it takes.
    monkeypatch.setitem(events.UPCASTERS, ("task.completed", 0),
                        lambda raw: {**raw, "v": 1, "data": {"task_id": raw["data"]["todo"]}})
    old = {**envelope("task.completed"), "v": 0, "data": {"todo": "t-7"}}
    event = parse_event(orjson.dumps(old))
    assert not isinstance(event, Rejection), event
    assert event.data.task_id == "t-7" and event.v == 1


@pytest.mark.parametrize(("key", "step", "old"), [
    # Applied again to its own output: KeyError, and the event was refused.
    (("task.completed", 0), lambda raw: {**raw, "data": {"task_id": raw["data"]["todo"]}},
     {**envelope("task.completed", {"todo": "t-7"}), "v": 0}),
    # Applied again and again: never returned.
    (("task.completed", 0), lambda raw: {**raw, "user_id": raw.get("user", raw.get("user_id"))},
     {**{k: v for k, v in envelope("task.completed", {"task_id": "t-7"}).items() if k != "user_id"}, "user": "u",
      "v": 0}),
])
def test_an_upcaster_that_leaves_v_as_it_was_still_brings_the_event_forward(monkeypatch: pytest.MonkeyPatch, key: Any,
                                                                            step: Any, old: dict[str, Any]) -> None:
    """A step that returned `{**raw, ...}` without writing the next `v` was looked up again with the same
    version: applied twice (refused), or for ever, when `parse_event` never returned and ingest's event
    loop (and /score with it) stopped."""
    monkeypatch.setitem(events.UPCASTERS, key, step)
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(parse_event(orjson.dumps(old))), daemon=True)
    worker.start()
    worker.join(timeout=2)
    assert result, "parse_event did not return"
    assert not isinstance(result[0], Rejection), result[0]
    assert result[0].data.task_id == "t-7" and result[0].v == 1


@pytest.mark.parametrize(("key", "step", "old"), [
    # v0 called the user `user`: its first error is user_id missing, not the version.
    (("task.completed", 0), lambda raw: {**{k: v for k, v in raw.items() if k != "user"}, "user_id": raw["user"], "v": 1},
     {**{k: v for k, v in envelope("task.completed").items() if k != "user_id"}, "user": "u-42", "v": 0}),
    # v0 called the type `task.done`: its first error is an unknown type.
    (("task.done", 0), lambda raw: {**raw, "type": "task.completed", "v": 1},
     {**envelope("task.completed"), "type": "task.done", "v": 0}),
])
def test_an_old_event_is_upcast_whatever_its_first_error(monkeypatch: pytest.MonkeyPatch, key: Any, step: Any,
                                                          old: dict[str, Any]) -> None:
    """Upcasting was tried only when the first error was a wrong field or version: an old event lacking
    a field ours requires, or of a type since renamed, was refused though an upcaster was registered."""
    monkeypatch.setitem(events.UPCASTERS, key, step)
    event = parse_event(orjson.dumps(old))
    assert not isinstance(event, Rejection), event
    assert (event.type, event.user_id, event.data.task_id, event.v) == ("task.completed", "u-42", "t-1", 1)


def test_an_old_event_of_a_renamed_type_is_taken_on_its_own_type_s_subject(monkeypatch: pytest.MonkeyPatch) -> None:
    """A v0 `task.done`, upcast to `task.completed`, comes on `signals.task.done` as its publisher was told to
    send it: it was dead-lettered as subject_mismatch, naming a type that publisher never sent."""
    monkeypatch.setitem(events.UPCASTERS, ("task.done", 0), lambda raw: {**raw, "type": "task.completed", "v": 1})
    raw = orjson.dumps({**envelope("task.completed"), "type": "task.done", "v": 0})
    from streams.wire import decode_wire_event

    event = decode_wire_event("signals.task.done", raw)  # as ingest reads it
    assert not isinstance(event, Rejection), event
    assert event.type == "task.completed"
    assert check_subject(event, "signals.task.done", raw) is None
    assert check_subject(event, "signals.task.completed", raw) is None
    # The family still holds: a signal cannot pose as feedback, under its old name or its new one.
    for subject in ("feedback.task.done", "feedback.task.completed", "signals.task.deleted"):
        rejection = check_subject(event, subject, raw)
        assert rejection is not None and rejection.kind == "subject_mismatch", subject
    # An event of this version is held to its own type's subject.
    current = orjson.dumps({**envelope("task.completed"), "v": 1})
    assert check_subject(parse_event(current), "signals.task.done", current) is not None


def test_an_upcast_event_still_invalid_is_refused_for_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(events.UPCASTERS, ("task.completed", 0), lambda raw: {**raw, "v": 1})
    result = parse_event(orjson.dumps({**envelope("task.completed", {"task": "t-7"}), "v": 0}))
    assert isinstance(result, Rejection) and result.kind == "missing_field", result
    assert result.reason == "field 'data.task_id' is required (upcast from v0)"  # not "v=0 is not supported"
    # A version no upcaster reads is refused as before.
    result = parse_event(orjson.dumps({**envelope("app.opened"), "v": 0}))
    assert isinstance(result, Rejection) and result.kind == "unsupported_version", result


@pytest.mark.parametrize("upcasters", [{}, {("task.completed", 0): lambda raw: {**raw, "v": 1}}])
@pytest.mark.parametrize("newer", [
    {**envelope("task.completed"), "v": 2},
    {**envelope("task.completed", {"task": "t-7"}), "v": 2},  # a field renamed
    {**envelope("task.completed"), "type": "task.archived", "v": 2},  # a type added
    {**envelope("app.opened"), "ts": 1764140462, "v": 3},  # time as a number
    {**{k: v for k, v in envelope("app.opened").items() if k != "user_id"}, "user": "u-42", "v": 2},
])
def test_an_event_of_a_newer_version_is_refused_as_such_naming_the_fix(newer: dict[str, Any], upcasters: Any) -> None:
    """An event of a newer contract was refused for its first error: a type or field this version does
    not know read "unknown_type" or "missing_field", and its publisher looked for a bug of theirs when
    this server was the one behind. The reason says so, and what to do."""
    with mock.patch.dict(events.UPCASTERS, upcasters, clear=True):
        result = parse_event(orjson.dumps(newer))
    assert isinstance(result, Rejection) and result.kind == "unsupported_version", result
    version = newer["v"]
    assert f"v={version} is newer than the events this server reads (v1)" in result.reason, result.reason
    assert f"upgrade tipstream to a release that reads v{version}" in result.reason, result.reason


def test_an_old_version_without_an_upcaster_names_the_fix() -> None:
    result = parse_event(orjson.dumps({**envelope("app.opened"), "v": 0}))
    assert isinstance(result, Rejection) and result.kind == "unsupported_version", result
    assert "no upcaster for v0" in result.reason and "send v1" in result.reason, result.reason


@pytest.mark.parametrize("data", [{"task": "t-7"}, "t-7", None])
def test_an_old_event_its_upcaster_cannot_read_is_refused_not_raised(monkeypatch: pytest.MonkeyPatch,
                                                                      data: object) -> None:
    """Upcasters are written for well-formed old events. One that fails on a malformed one (here a
    KeyError or TypeError) used to escape `parse_event`: the ingest retried its chunk for ever, and
    the stream stopped at that event."""
    monkeypatch.setitem(events.UPCASTERS, ("task.completed", 0),
                        lambda raw: {**raw, "v": 1, "data": {"task_id": raw["data"]["todo"]}})
    result = parse_event(orjson.dumps({**envelope("task.completed"), "v": 0, "data": data}))
    assert isinstance(result, Rejection) and result.kind == "unsupported_version", result
    assert "v=0" in result.reason and "upcasting it failed" in result.reason
    assert "no upcaster" not in result.reason, result.reason  # there is one: it could not read this event


@pytest.mark.parametrize("kind", ["task.created", "task.rescheduled"])
def test_the_published_schema_takes_every_kind_of_due_the_contract_takes(kind: str) -> None:
    """`due` takes Unix time (a number, or digits in a string; above 2e10, milliseconds) besides ISO 8601 text with
    an offset, where `ts` refuses it: docs/events.schema.json said text only, and a publisher that checks its events
    against it refused what the contract takes."""
    from jsonschema import Draft202012Validator

    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "events.schema.json").read_text())
    validator = Draft202012Validator(schema)
    for due in ("2026-11-27T09:00:00+01:00", 1764576000, 1764576000.5, "1764576000", 1764576000000):
        event = envelope(kind, {"task_id": "t-1", "due": due})
        taken = parse_event(orjson.dumps(event))
        assert not isinstance(taken, Rejection), (due, taken)
        assert validator.is_valid(event), (due, [e.message for e in validator.iter_errors(event)])
    assert taken.data.due == datetime(2025, 12, 1, 8, tzinfo=UTC)  # milliseconds, in UTC


def test_committed_docs_match_the_code() -> None:
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    for name, text in generated().items():
        committed = (docs / name).read_text()
        assert committed == text, f"docs/{name} is stale: run `tipstream docs` and commit the result"
    schema = json.loads((docs / "events.schema.json").read_text())
    assert set(schema["discriminator"]["mapping"]) == set(GOOD)


def test_the_metrics_and_settings_the_docs_name_exist() -> None:
    """The README, the operator's guide's alerts and docs/ name series and settings by hand: a rename would leave an
    alert that never fires."""
    import re
    from pathlib import Path

    import app.learning_metrics  # noqa: F401 - its series join the registry on import
    from app.metrics import METRICS
    from app.settings import Settings

    series = {sample.name for family in METRICS.registry.collect() for sample in family.samples}
    series |= {family.name for family in METRICS.registry.collect()}
    suffixes = ("_bucket", "_sum", "_count", "_total")
    settings = {f"TIPSTREAM_{name.upper()}" for name in Settings.model_fields}
    root = Path(__file__).resolve().parents[2]
    for path in (root / "README.md", *sorted((root / "docs").glob("*.md"))):
        text = path.read_text()
        for name in set(re.findall(r"\btipstream_[a-z_]+[a-z]", text)):
            stem = next((name.removesuffix(s) for s in suffixes if name.endswith(s)), name)
            assert name in series or stem in series, f"{path.name} names {name}, which /metrics does not have"
        for name in set(re.findall(r"\bTIPSTREAM_[A-Z0-9_]+[A-Z0-9]", text)):
            assert name in settings or name.startswith("TIPSTREAM_TEST_"), f"{path.name} names {name}, not a setting"


def test_the_series_the_alerts_select_by_label_exist_before_their_first_count() -> None:
    """`increase()` of a series that first appears at 40 is 0: an alert on a labelled outcome that
    the service did not expose at 0 from the start missed the burst that created it."""
    import re
    from pathlib import Path

    # Each module exposes its outcomes as it is imported.
    import app.decision_publisher
    import app.learner  # noqa: F401
    from app.metrics import METRICS

    present = {(sample.name, tuple(sorted(sample.labels.items())))
               for family in METRICS.registry.collect() for sample in family.samples}
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    selected = set(re.findall(r'\b(tipstream_[a-z_]+_total)\{(\w+)="(\w+)"\}', guide))
    assert selected, "docs/operations.md's alerts select no labelled series any more: update this test"
    for name, label, value in selected:
        assert (name, ((label, value),)) in present, f"{name}{{{label}=\"{value}\"}} appears only once counted"


def test_the_latency_alerts_can_fire() -> None:
    """`histogram_quantile` reads no further than a histogram's largest finite bucket: an alert whose
    threshold is at or past it never fires, and a change of buckets would silence one unseen."""
    import re
    from pathlib import Path

    import app.learning_metrics  # noqa: F401 - its series join the registry on import
    from app.ingest import StreamIngest
    from app.metrics import METRICS
    from streams import jetstream as jsx
    from streams.store import OnlineStore

    # A stream's ingest makes its labelled series, as a start does.
    StreamIngest(None, None, jsx.SIGNALS, OnlineStore(), None, batch=1, max_event_bytes=1, max_uncheckpointed=1)
    bounds: dict[str, set[float]] = {}
    labels: dict[str, set[str]] = {}
    for family in METRICS.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                bounds.setdefault(sample.name, set()).add(float(sample.labels["le"]))
                labels.setdefault(sample.name, set()).update(sample.labels)
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    alerts = re.findall(r"histogram_quantile\([\d.]+, sum by \(([\w, ]+)\) \(rate\((\w+_bucket)\[\w+\]\)\)\) > ([\d.]+)",
                        guide)
    assert len(alerts) >= 4, "docs/operations.md's latency alerts are written otherwise: update this test"
    for by, name, threshold in alerts:
        assert float(threshold) < max(bounds[name]), f"{name}'s largest finite bucket is {max(bounds[name])}"
        assert {label.strip() for label in by.split(",")} <= labels[name], (name, by)
    # A quantile misses a rare long sample (the event loop held once for seconds is one tick late among
    # 1,200 in 5 minutes): the guide counts those above a bucket's bound. `le` is matched as text, as
    # exposed ("1.0"): one written otherwise ("1") selects nothing and the alert never fires.
    exposed = {(family.name + "_bucket", sample.labels["le"]) for family in METRICS.registry.collect()
               for sample in family.samples if sample.name.endswith("_bucket")}
    selected = re.findall(r'(tipstream_\w+_bucket)\{le="([^"]+)"\}', guide)
    assert selected, "docs/operations.md no longer counts the samples above a bucket's bound: update this test"
    for name, bound in selected:
        assert (name, bound) in exposed, f'{name}{{le="{bound}"}} is no series /metrics exposes'


def test_the_alerts_match_the_series_they_combine() -> None:
    """PromQL divides or subtracts two series only where all their labels match, unless told which to
    leave out (`ignoring`). The late-reactions alert divided `tipstream_feedback_total{outcome="late"}` by
    `{outcome="credited"}`: no pair matched, the result was empty, and the alert never fired."""
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = guide.split("\n## Watching it\n", 1)[1].split("\n### Disk\n", 1)[0]
    combined = 0
    for expr in re.findall(r"`([^`]*tipstream_[^`]*)`", section):
        sides = []
        for name, matchers in re.findall(r"(tipstream_\w+)(?:\{([^}]*)\})?", expr):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
            if name.endswith("_bucket"):
                labels.setdefault("le", "any")  # a bucket's every series has one; _count and _sum have none
            sides.append(labels)
        if len(sides) < 2:
            continue
        combined += 1
        left_out = {label.strip() for group in re.findall(r"ignoring\(([^)]*)\)", expr) for label in group.split(",")}
        for labels in sides[1:]:
            differing = {k for k in labels.keys() | sides[0].keys() if labels.get(k) != sides[0].get(k)}
            assert differing <= left_out, f"{expr}: no series pairs up across {sorted(differing - left_out)}"
    assert combined >= 2, "docs/operations.md's alerts combine fewer series than this test knew: update it"


def test_each_streams_dlq_reasons_are_exposed_at_0_from_its_start() -> None:
    """The operator's guide alerts on `increase(tipstream_dlq_total[10m])`: a reason first counted in a burst
    appeared at its full count, and increase() read 0."""
    import re
    from pathlib import Path

    from app.ingest import StreamIngest
    from app.metrics import METRICS
    from streams import jetstream as jsx
    from streams.events import REJECTION_KINDS
    from streams.store import OnlineStore

    root = Path(__file__).resolve().parents[2]
    made = set()
    for path in (*(root / "app").glob("*.py"), *(root / "streams").glob("*.py")):
        text = path.read_text()
        made |= set(re.findall(r'Rejection\(\s*"(\w+)"', text))
        made |= {kind for pair in re.findall(r'kind = "(\w+)" if .* else "(\w+)"', text) for kind in pair}
    assert made and made <= set(REJECTION_KINDS), f"kinds missing from REJECTION_KINDS: {made - set(REJECTION_KINDS)}"

    StreamIngest(None, None, jsx.FEEDBACK, OnlineStore(), None, batch=1, max_event_bytes=1,
                 max_uncheckpointed=1)
    exposed = {sample.labels["reason"] for family in METRICS.registry.collect() for sample in family.samples
               if sample.name == "tipstream_dlq_total" and sample.labels.get("stream") == "FEEDBACK"}
    assert exposed >= set(REJECTION_KINDS)


def test_readme_lists_every_setting() -> None:
    from pathlib import Path

    from app.docs import readme_with_settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme_with_settings(readme) == readme, "README's settings table is stale: run `tipstream docs`"


def test_the_readme_s_examples_are_taken_as_a_reader_sends_them() -> None:
    """Readers publish the README's events and post its /score body as they are: each must be taken,
    an event on the subject the README's rule gives its type. The Python one, run as it is, stamps the current
    time: its fixed date, long past, moved no 7-day count, and a new user took the service for broken."""
    import re
    import textwrap

    from app.score_request import parse_request

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    python = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    imports = "".join(line + "\n" for line in python.splitlines() if line.startswith(("import ", "from ")))
    made = re.search(r"^( *now = .*?\n)?( *event = \{.*?\}\n)", python, re.DOTALL | re.MULTILINE)
    namespace: dict[str, Any] = {}
    exec(imports + textwrap.dedent("".join(part for part in made.groups() if part)), namespace)  # noqa: S102 - the README's own lines
    sent = namespace["event"]
    assert abs(datetime.fromisoformat(sent["ts"]) - datetime.now(UTC)).total_seconds() < 60, sent["ts"]
    examples = re.findall(r"```json\n(.*?)```", readme, re.DOTALL) + [json.dumps(sent)]
    found = set()
    for text in examples:
        event = parse_event(text.encode())
        assert not isinstance(event, Rejection), (event, text)
        subject = "feedback.tip.reacted" if event.type == "tip.reacted" else f"signals.{event.type}"
        assert check_subject(event, subject) is None, (subject, text)
        found.add(event.type)
    assert found == {"task.completed", "tip.reacted"}, "the README's examples changed: update this test"
    body = re.search(r"curl -s localhost:8000/score .*? -d '(.*?)'", readme, re.DOTALL).group(1)
    assert parse_request(body.encode()).user_id == "u-42"


def test_docs_learning_s_score_example_is_a_request_and_its_answer_fits_it() -> None:
    """Its request held `[...]` where a value goes, and one candidate, whose answer would have
    propensity 1: the answer shown (0.93, and more tips) needs three under the default epsilon."""
    import re

    from app.score_request import parse_request
    from app.settings import Settings

    learning = (Path(__file__).resolve().parents[2] / "docs" / "learning.md").read_text()
    request, answer = re.search(r"## `POST /score`\n\n```json\n(.*?)```\nanswers\n```json\n(.*?)```", learning,
                                re.DOTALL).groups()
    candidates = len(parse_request(request.encode()).candidates)
    shown = float(re.search(r'"propensity": ([\d.]+)', answer).group(1))
    epsilon = Settings.model_fields["policy_epsilon"].default
    assert round(1 - epsilon + epsilon / candidates, 2) == shown, (candidates, shown)


def test_docs_elsewhere_leave_other_readmes_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.docs import README_END, README_START, write_docs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("someone else's README, without the settings markers\n")
    own = tmp_path / "own.md"
    own.write_text(f"before\n{README_START}\nstale\n{README_END}\nafter\n")
    written = write_docs(tmp_path / "out", readme=own)
    assert own in written and "TIPSTREAM_DATA_DIR" in own.read_text() and own.read_text().endswith("after\n")
    assert (tmp_path / "README.md").read_text() == "someone else's README, without the settings markers\n"
    assert write_docs(tmp_path / "out", readme=tmp_path / "README.md")[0].name == "events.schema.json"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({**envelope("app.opened"), "user_id": "u\x00"}, "user_id"),
        (envelope("task.completed", {"task_id": "t\x00"}), "data.task_id"),
        (envelope("task.created", {"task_id": "t", "labels": ["ok", "b\x00d"]}), "data.labels.1"),
        (envelope("tip.reacted", {"tip_id": "tip-1", "decision_id": "d\x00", "reaction": "acted"}), "data.decision_id"),
    ],
)
@pytest.mark.parametrize("path", ["contract", "ingest"])
def test_a_nul_in_a_kept_text_is_refused_naming_the_field(body: dict, names: str, path: str) -> None:
    """PostgreSQL cannot store it: one such user id failed every checkpoint after it. Both ways
    in: the contract's parser, and the ingest's decoder, which calls pydantic-core directly."""
    from streams.wire import decode_wire_event

    raw = orjson.dumps(body)
    result = parse_event(raw) if path == "contract" else decode_wire_event(events.subject_for(body["type"]), raw)
    assert isinstance(result, Rejection) and result.kind == "invalid_field", result
    assert f"'{names}'" in result.reason and "NUL" in result.reason


def test_a_nul_where_nothing_keeps_it_or_an_escaped_backslash_is_accepted() -> None:
    unknown = parse_event(orjson.dumps(envelope("task.completed", {"task_id": "t", "note": "a\x00b"})))
    assert not isinstance(unknown, Rejection), unknown
    text = parse_event(orjson.dumps(envelope("task.completed", {"task_id": "t\\u0000"})))
    assert not isinstance(text, Rejection) and text.data.task_id == "t\\u0000"


# -- the ingest's fast decoder against the contract ---------------------------------------------

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 2**40), st.floats(allow_nan=False), st.text(max_size=4),
    st.sampled_from(["", "\x00", "t\x00", "2026-11-26T08:00:00", "2026-11-26T09:00:00-05:00", "x" * 129, "liked",
                     "task.created", "tip.reacted", "1"]),
    st.lists(st.integers(-9, 9), max_size=2), st.builds(dict),
)


@st.composite
def near_valid_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """(subject, body): a valid event with up to three fields dropped, retyped, added or given a
    NUL, at times an old `v` or a few bytes spliced in, on its own subject or another."""
    kind = draw(st.sampled_from(sorted(GOOD)))
    body = envelope(kind, dict(GOOD[kind]), v=draw(st.sampled_from([1, 1, 1, 0])))
    for _ in range(draw(st.integers(0, 3))):
        target = body if draw(st.booleans()) else body.get("data")
        if not isinstance(target, dict):
            continue
        field = draw(st.sampled_from(sorted(target) + ["colour", "source"]))
        change = draw(st.sampled_from(["drop", "set", "nul"]))
        if change == "drop":
            target.pop(field, None)
        elif change == "set":
            target[field] = draw(ODD_VALUES)
        elif isinstance(target.get(field), str):
            target[field] += "\x00"
    raw = orjson.dumps(body)
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=3)) + raw[at + draw(st.integers(0, 3)):]
    own = events.subject_for(kind)
    return draw(st.sampled_from([own, own, "signals.app.opened", "feedback.tip.reacted"])), raw


def verdict(result: Any) -> tuple[Any, ...]:
    """A rejection as it is dead-lettered, or what the fold keeps of the event."""
    if isinstance(result, Rejection):
        return "dlq", result.kind, result.reason
    state = UserState()
    apply(state, result)
    return "applied", result.user_id, state.to_bytes()


@settings(max_examples=400, derandomize=True, deadline=None)
@given(near_valid_messages())
def test_the_ingest_decoder_gives_the_contracts_verdict(message: tuple[str, bytes]) -> None:
    """The ingest's decoder calls pydantic-core directly and checks the subject itself; the
    contract is `parse_event` then `check_subject`. Same message, same verdict: accepted into the
    same state, or dead-lettered for the same reason. With an upcaster registered (a v0 of two
    types), so the slow path that upcasts is compared too."""
    from streams.wire import decode_wire_event

    subject, raw = message
    v0 = {("task.completed", 0): lambda raw: {**raw, "v": 1}, ("tip.reacted", 0): lambda raw: {**raw, "v": 1}}
    with mock.patch.dict(events.UPCASTERS, v0):
        contract = parse_event(raw)
        if not isinstance(contract, Rejection):
            contract = check_subject(contract, subject) or contract
        assert verdict(decode_wire_event(subject, raw)) == verdict(contract)


@pytest.mark.parametrize(("ts", "accepted"), [
    ("0001-01-01T00:00:00+05:00", False),  # 0000-12-31T19:00Z: no datetime can hold it
    ("0001-01-01T05:00:00+05:00", True),
    ("9999-12-31T23:59:59.999-00:01", False),
    ("9999-12-31T23:59:59.999+00:00", True),
])
def test_an_event_time_must_be_an_instant_a_datetime_can_hold(ts: str, accepted: bool) -> None:
    """One accepted event in year 0 (UTC) failed every later `user_features` pass, for every user in
    it: its row is stamped with the user's newest event as a datetime."""
    from datetime import UTC, datetime

    from app.offline import feature_row
    from streams.store import OnlineStore

    event = parse_event(orjson.dumps({**envelope("app.opened"), "ts": ts}))
    if not accepted:
        assert isinstance(event, Rejection) and event.kind == "invalid_field" and "'ts'" in event.reason, event
        return
    store = OnlineStore()
    store.apply(event)
    row = feature_row(event.user_id, store, datetime.now(UTC))
    assert row is not None and abs(row["as_of"] - event.ts).total_seconds() < 0.001
