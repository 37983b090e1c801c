"""The wire contract, version 1: one pydantic model per event type, a union on `type`.

Parsing is the only way in: `parse_event` turns raw bytes into a typed event or a
`Rejection` that says, in words an app developer can act on, what was wrong.

>>> event = parse_event(b'{"id": "e1", "type": "task.completed", "user_id": "u-1",'
...                     b' "ts": "2026-11-26T08:01:02+01:00", "data": {"task_id": "t-9"}}')
>>> event.type, event.data.task_id, event.ts.hour
('task.completed', 't-9', 8)
>>> rejected = parse_event(b'{"id": "e2", "type": "task.exploded", "user_id": "u-1", "ts": "2026-11-26T08:00:00Z"}')
>>> rejected.kind
'unknown_type'
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import core_schema

CURRENT_VERSION = 1

Identifier = Annotated[str, Field(min_length=1, max_length=128)]


def is_user_id(text: str) -> bool:
    """Whether an event's `user_id` may be `text` (`Identifier`, and no NUL, which ingest refuses): what the
    routes and commands naming a user take.

    >>> is_user_id("u-1"), is_user_id(""), is_user_id("u" * 129), is_user_id("u-" + chr(0))
    (True, False, False, False)
    """
    return 1 <= len(text) <= 128 and "\x00" not in text


def _none_if_zero(value: Any) -> Any:
    return value or None


# A Go publisher writes a field it never set as its type's zero value, unless the field is tagged
# `omitempty`: "" for an id, 0 for a number. An optional field reads it as absent: refused, the whole
# event was dead-lettered over a field the service does not even keep.
OptionalIdentifier = Annotated[str, Field(max_length=128, description='1-128 characters; "" reads as absent'),
                               AfterValidator(_none_if_zero)] | None
ISO_TEXT = r"^\d{4}-"  # a year first: not a number of seconds


class _IsoText:
    """A time given as ISO 8601 text. pydantic also reads a number, or a string of digits, as Unix
    time in UTC: an event time has no offset then, and one such event made its user's zone UTC
    (the zone is their newest event's). Checked in pydantic-core: no Python call per event."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.chain_schema([core_schema.str_schema(pattern=ISO_TEXT), handler(source)])

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        return {"type": "string", "format": "date-time"}


class _JsonNumber:
    """A number as JSON writes one: pydantic's lax mode also read `true` as 1 and `"1"` as 1, so that
    `"v": true` was version 1 and `"priority": "2"` a priority, where the contract (and the JSON Schema it
    publishes) dead-letters a wrong type. A whole number written as `1.0` is still one, as JSON Schema's
    `integer` takes it. Checked in pydantic-core: no Python call per event."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        number = core_schema.union_schema([core_schema.int_schema(strict=True), core_schema.float_schema(strict=True)])
        return core_schema.chain_schema([
            core_schema.custom_error_schema(number, custom_error_type="json_number",
                                            custom_error_message="must be a JSON number, not text or a boolean"),
            handler(source)])

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        while schema["type"] != "chain":  # under an AfterValidator's wrapper
            schema = schema["schema"]  # type: ignore[typeddict-item]
        contract = schema["steps"][1]  # what the contract takes, not how the JSON type is checked first
        # The handler leaves out what the metadata adds (a Field's description): added here.
        return {**handler(contract), **contract.get("metadata", {}).get("pydantic_js_updates", {})}


class _DueJsonSchema:
    """What `due` takes, as its JSON Schema says: pydantic reads ISO 8601 text with a UTC offset, or Unix time in UTC
    (a number, or digits in a string; above 2e10, milliseconds). A due time is an instant whose local hour is never
    read, so Unix time loses nothing there, where `ts` refuses it (`_IsoText`). The schema said text only, and a
    publisher that checks against it refused what the contract takes."""

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        return {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"},
                          {"type": "string", "pattern": r"^[+-]?\d+(\.\d+)?$"}],
                "description": "ISO 8601 text with a UTC offset, or Unix time in UTC (seconds; above 2e10, "
                               "milliseconds), a number or digits in a string"}


DueTime = Annotated[AwareDatetime, _DueJsonSchema]


# An instant a datetime can hold in UTC, whatever the offset: one in year 0 was folded, then every
# `user_features` pass failed on it (its rows are stamped with the user's newest event).
EventTime = Annotated[AwareDatetime, Field(ge=datetime.min.replace(tzinfo=UTC), le=datetime.max.replace(tzinfo=UTC)),
                      _IsoText]
Reaction = Literal["acted", "liked", "snoozed", "dismissed", "disliked"]
REACTIONS: tuple[str, ...] = ("acted", "liked", "snoozed", "dismissed", "disliked")


class _Model(BaseModel):
    # Unknown fields are tolerated (newer publishers) but never reach state.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TaskCreatedData(_Model):
    task_id: Identifier
    due: DueTime | None = None
    priority: Annotated[int, Field(ge=0, le=4, description="1-4; 0 reads as absent"), _JsonNumber,
                        AfterValidator(_none_if_zero)] | None = None
    project_id: OptionalIdentifier = None
    # null reads as absent, as for the other optional fields: Go's encoding/json writes a nil slice
    # as null, and such a publisher's every task.created without labels was dead-lettered.
    labels: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=64)] | None = Field(
        default_factory=list)


class TaskRefData(_Model):
    task_id: Identifier


class TaskRescheduledData(_Model):
    task_id: Identifier
    due: DueTime


class AppOpenedData(_Model):
    pass


class TipShownData(_Model):
    tip_id: Identifier
    decision_id: OptionalIdentifier = None


class TipReactedData(_Model):
    tip_id: Identifier
    decision_id: OptionalIdentifier = None
    reaction: Reaction


class _Envelope(_Model):
    id: Identifier
    user_id: Identifier
    ts: EventTime
    v: Annotated[Literal[1], _JsonNumber] = 1


class TaskCreated(_Envelope):
    type: Literal["task.created"]
    data: TaskCreatedData


class TaskCompleted(_Envelope):
    type: Literal["task.completed"]
    data: TaskRefData


class TaskRescheduled(_Envelope):
    type: Literal["task.rescheduled"]
    data: TaskRescheduledData


class TaskDeleted(_Envelope):
    type: Literal["task.deleted"]
    data: TaskRefData


class AppOpened(_Envelope):
    type: Literal["app.opened"]
    data: AppOpenedData | None = AppOpenedData()  # null as absent (Go writes a nil map as null), as for labels


class TipShown(_Envelope):
    type: Literal["tip.shown"]
    data: TipShownData


class TipReacted(_Envelope):
    type: Literal["tip.reacted"]
    data: TipReactedData


Signal = TaskCreated | TaskCompleted | TaskRescheduled | TaskDeleted | AppOpened | TipShown
Feedback = TipReacted
Event = Annotated[Signal | Feedback, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)

SIGNAL_TYPES = frozenset(
    {"task.created", "task.completed", "task.rescheduled", "task.deleted", "app.opened", "tip.shown"}
)
FEEDBACK_TYPES = frozenset({"tip.reacted"})
FAMILY_OF_TYPE = {**{t: "signals" for t in SIGNAL_TYPES}, **{t: "feedback" for t in FEEDBACK_TYPES}}


# Upcasters turn an older payload (a dict) into the next version's shape, keyed by
# (type, version). Version 1 is the first, so the table is empty; adding version 2
# means registering the (type, 1) steps here and bumping CURRENT_VERSION.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcast(raw: dict[str, Any]) -> dict[str, Any]:
    """Apply upcasters until the payload is at CURRENT_VERSION (or no step is known)."""
    version = raw.get("v", 1)
    while isinstance(version, int) and version < CURRENT_VERSION:
        step = UPCASTERS.get((raw.get("type", ""), version))
        if step is None:
            break
        # One step is one version, whatever `v` it wrote: a step that left the old `v` in place (as
        # `{**raw, ...}` does) was found again, for ever, and blocked the event loop (/score with it).
        version += 1
        raw = {**step(raw), "v": version}
    return raw


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an event was refused: `kind` for metrics and headers, `reason` for people."""

    kind: str
    reason: str


class Refused(Exception):
    """Raised by an ingest's sink for a message it refuses once read: the ingest dead-letters it with this
    `rejection`, as one its decode refused. For what the decode cannot judge (when JetStream stored it)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


# Every `Rejection.kind`, here and in ingest (`oversized`, `future_ts`, `processing_failed`): each stream's
# `tipstream_dlq_total` has a series for each from the start, at 0, for the operator's guide's alert on its increase().
REJECTION_KINDS = ("invalid_json", "invalid_utf8", "unknown_type", "missing_field", "invalid_field",
                   "unsupported_version", "subject_mismatch", "oversized", "future_ts", "processing_failed")


HALF_A_PAIR = ("holds half a UTF-16 surrogate pair (a \\ud800-\\udfff escape alone), not a character: a text cut "
               "inside an emoji? Send whole characters")


def as_json(value: Any) -> str:
    """A value the publisher sent, written back as JSON for a reason: orjson raised on an integer past
    64 bits (`"v": [18446744073709551616]`), out of `parse_event`, and the ingest retried that event
    for ever, holding its stream."""
    text = json.dumps(value)  # ASCII: a lone surrogate left as it was could not be put in a header
    return text if len(text) <= 100 else text[:99] + "…"


def unsupported_version(version: int, what: str = "event", reads: int = CURRENT_VERSION,
                        upcasters: bool = True) -> Rejection:
    """The refusal of a version of `what`'s contract this server does not read (it reads `reads`), naming the fix:
    a newer one needs a newer tipstream (or the publisher to send this one), an older one an upcaster, or with no
    `upcasters` (decisions), the publisher to send this one.

    >>> unsupported_version(2).reason  # doctest: +ELLIPSIS
    'v=2 is newer than the events this server reads (v1): upgrade tipstream to a release that reads v2, ...'
    >>> unsupported_version(0, "decision", upcasters=False).reason
    'v=0 is not a decision contract version: this server reads v1 only (decisions have no upcasters); have the publisher send v1'
    """
    if version > reads:
        return Rejection("unsupported_version", f"v={version} is newer than the {what}s this server reads (v{reads}): "
                                                f"upgrade tipstream to a release that reads v{version}, or have the "
                                                f"publisher send v{reads}; then publish the {what} again")
    if not upcasters:
        return Rejection("unsupported_version", f"v={version} is not a {what} contract version: this server reads "
                                                f"v{reads} only ({what}s have no upcasters); have the publisher send "
                                                f"v{reads}")
    return Rejection("unsupported_version", f"v={version} is not supported: this server reads v{reads} and "
                                            f"has no upcaster for v{version}; have the publisher send "
                                            f"v{reads}, or register one in streams/events.py (UPCASTERS)")


def not_a_version(value: Any, what: str = "event", reads: int = CURRENT_VERSION) -> Rejection:
    """The refusal of a `v` that is no version number at all ("1", 1.5, null, true), written back as sent.

    >>> not_a_version(True).reason
    "field 'v': must be the event contract's version as a JSON integer (this server reads 1), not true"
    """
    return Rejection("invalid_field", f"field 'v': must be the {what} contract's version as a JSON integer "
                                      f"(this server reads {reads}), not {as_json(value)}")


def _describe(error: ValidationError) -> Rejection:
    first = error.errors(include_url=False)[0]
    # Drop the union branch name pydantic puts first in the location.
    loc = [str(part) for part in first["loc"]]
    if loc and loc[0] in FAMILY_OF_TYPE:
        loc = loc[1:]
    where = ".".join(loc) or "body"
    etype = first["type"]
    if etype == "json_invalid":
        detail = str(first.get("ctx", {}).get("error", first["msg"]))
        kind = "invalid_utf8" if "utf-8" in detail.lower() or "unicode" in detail.lower() else "invalid_json"
        return Rejection(kind, f"body is not valid JSON: {detail}")
    if etype == "union_tag_invalid":
        known = ", ".join(sorted(FAMILY_OF_TYPE))
        given = first["input"].get("type") if isinstance(first["input"], dict) else None
        if not isinstance(given, str):  # as JSON: pydantic's tag is str() of it, so null read 'None' and 5 read '5'
            return Rejection("invalid_field", f"field 'type': must be an event type, a string, not "
                                              f"{as_json(given)}; known: {known}")
        return Rejection("unknown_type", f"type {given!r} is not an event type; known: {known}")
    if etype == "union_tag_not_found":
        return Rejection("missing_field", "field 'type' is required")
    if etype == "missing":
        return Rejection("missing_field", f"field '{where}' is required")
    if where == "ts" and etype in ("string_type", "string_pattern_mismatch"):
        return Rejection("invalid_field", f"field 'ts': must be ISO 8601 text with the user's UTC offset, e.g. "
                                          f"2026-11-26T08:01:02.123+01:00, not {first['input']!r}")
    if where == "ts" and etype in ("datetime_parsing", "datetime_from_date_parsing"):
        # pydantic's "unexpected extra characters at the end of the input" for "+01" (an offset as
        # PostgreSQL prints it) did not say that the offset needs its minutes.
        return Rejection("invalid_field", f"field 'ts': must be ISO 8601 text with the user's UTC offset as +hh:mm, "
                                          f"-hh:mm or Z, e.g. 2026-11-26T08:01:02.123+01:00, not {first['input']!r} "
                                          f"({first.get('ctx', {}).get('error', first['msg'])})")
    if etype == "timezone_aware":  # pydantic's "Input should have timezone info" named no fix
        whose = "the user's" if where == "ts" else "a"
        return Rejection("invalid_field", f"field '{where}': must be ISO 8601 text with {whose} UTC offset, e.g. "
                                          f"2026-11-26T08:01:02.123+01:00, not {first['input']!r} (it has none)")
    if where == "v" and (type(first["input"]) is not int):  # "1", 1.0, null: not a version number at all
        return not_a_version(first["input"])
    if where == "v":
        return unsupported_version(first["input"])
    if etype == "string_unicode":  # pydantic's "unable to parse raw data as a unicode string"
        return Rejection("invalid_field", f"field '{where}': {HALF_A_PAIR}")
    if where == "body":
        return Rejection("invalid_json", f"body must be a JSON object: {first['msg']}")
    return Rejection("invalid_field", f"field '{where}': {first['msg']}")


def text_path(value: Any, bad: Callable[[str], bool], where: str = "") -> str | None:
    """The dotted path of the first text that is `bad`, a key or a value, if any (a bad key written with
    escapes, so that the path can be answered)."""
    if isinstance(value, str):
        return where if bad(value) else None
    if isinstance(value, BaseModel):
        value = {name: getattr(value, name) for name in type(value).model_fields}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        name = str(key)
        path = f"{where}.{name}" if where else name
        if bad(name):
            return path.encode("utf-8", "backslashreplace").decode()
        found = text_path(item, bad, path)
        if found is not None:
            return found
    return None


def _has_nul(text: str) -> bool:
    return "\x00" in text


def has_lone_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def without_nul(event: Any, raw: bytes) -> Any:
    """The event parsed from `raw`, or a Rejection when a text it keeps holds a NUL."""
    # PostgreSQL text cannot hold a NUL: one kept in state (a user id, say) failed every later
    # checkpoint. JSON carries a NUL only as this escape, so other events skip the walk.
    if b"\\u0000" in raw and (where := text_path(event, _has_nul)) is not None:
        return Rejection("invalid_field", f"field '{where}': must not contain the NUL character (\\u0000); "
                                          "the database cannot store it")
    return event


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def lenient_loads(raw: bytes) -> Any:
    """The payload decoded, as the slow paths read it: a lone surrogate escape (`\\ud83d`, half an
    emoji, as JavaScript's JSON.stringify writes a string cut inside one) is read too, which
    pydantic's parser and orjson refuse. None when it is not JSON at all."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        if "surrogate" not in str(error):  # refused for anything else: refused, as pydantic's parser does
            return None
    try:  # text first: from bytes, json.loads also reads UTF-16 and a BOM, which pydantic's parser refuses
        return json.loads(raw.decode(), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, NaN or Infinity, nested past the stack
        return None


def _kept(event: Any, raw: bytes) -> Any:
    """An event validated on a slow path, or a Rejection when a text it keeps cannot be stored."""
    where = text_path(event, has_lone_surrogate)
    if where is not None:
        return Rejection("invalid_field", f"field '{where}': {HALF_A_PAIR}")
    return without_nul(event, raw)


def parse_event(raw: bytes) -> Any:
    """Bytes to a typed event, or a Rejection naming the problem."""
    try:
        event = EVENT_ADAPTER.validate_json(raw)
    except ValidationError as error:
        rejection = _describe(error)
    else:
        return without_nul(event, raw)
    # Slow paths, only for a refused event: a lone surrogate, and old versions.
    payload = None
    if rejection.kind == "invalid_json" and ("surrogate" in rejection.reason or "hex escape" in rejection.reason):
        # pydantic's parser refuses a lone surrogate anywhere, so one in a field this contract does not
        # know (a title cut inside an emoji) refused the whole event, which unknown fields must not do.
        payload = lenient_loads(raw)
        if payload is None:
            return rejection
        try:
            return _kept(EVENT_ADAPTER.validate_python(payload), raw)
        except ValidationError as error:
            rejection = _describe(error)
    if payload is None and rejection.kind not in ("invalid_json", "invalid_utf8"):
        payload = lenient_loads(raw)
    version = payload.get("v") if isinstance(payload, dict) else None
    if type(version) is int and version > CURRENT_VERSION:
        # A newer contract's event: whatever its first error (a type or field this version does not know,
        # as a newer one may add or rename), what is wrong is that this server is older. It was refused as
        # an unknown type or a missing field, which sent its publisher looking for a bug of theirs.
        return unsupported_version(version)
    # Old versions: decode, upcast, validate again. Whatever the first error: an old event lacks
    # fields ours requires (missing_field) or has a type since renamed (unknown_type), which are what
    # upcasters are for; tried only on a wrong field or version, such events were refused.
    if not UPCASTERS or type(version) is not int or version >= CURRENT_VERSION:
        return rejection
    try:
        current = upcast(payload)
    except Exception as error:  # noqa: BLE001 - an upcaster meets a malformed old event: refuse it
        # Not "no upcaster for v0": there is one, and this event is not what it reads.
        said = (f"v={version} is read through an upcaster" if rejection.kind == "unsupported_version"
                else rejection.reason)
        return Rejection(rejection.kind, f"{said}; upcasting it failed ({error.__class__.__name__}: {error})")
    try:
        return _kept(EVENT_ADAPTER.validate_python(current), raw)
    except ValidationError as error:
        if current.get("v") != CURRENT_VERSION:  # no upcaster for its type and version: said as it was
            return rejection
        # Upcast, and still not a valid event: what is wrong with it, not "v0 is not supported".
        refused = _describe(error)
        return Rejection(refused.kind, f"{refused.reason} (upcast from v{version})")


def check_subject(event: Any, subject: str, raw: bytes | None = None) -> Rejection | None:
    """An event must arrive on `<family>.<type>`, so a feedback can't pose as a signal. An old event (`raw`,
    when given) of a type an upcaster renamed comes on its own type's subject: taken in the family of the
    type it became (it was dead-lettered as published on the wrong subject, naming a type its publisher
    never sent)."""
    family = FAMILY_OF_TYPE[event.type]
    expected = f"{family}.{event.type}"
    if subject == expected:
        return None
    if raw is not None and subject.startswith(f"{family}."):  # only then is the payload decoded again
        payload = lenient_loads(raw)
        sent = payload.get("type") if isinstance(payload, dict) else None
        version = payload.get("v") if isinstance(payload, dict) else None
        if type(version) is int and version < CURRENT_VERSION and subject == f"{family}.{sent}":
            return None
    return Rejection("subject_mismatch", f"type {event.type!r} must be published on {expected!r}, not {subject!r}")


def subject_for(event_type: str) -> str:
    """The subject an event of this type is published on."""
    return f"{FAMILY_OF_TYPE[event_type]}.{event_type}"


def json_schema() -> dict[str, Any]:
    """The contract as JSON Schema; committed as docs/events.schema.json."""
    schema = EVENT_ADAPTER.json_schema()
    schema["title"] = f"tipstream event, wire contract v{CURRENT_VERSION}"
    return schema
