"""Exporting a user: what tipstream holds of one user, for a request to see it (the right of access).

Read, never written: the events of theirs the streams hold (SIGNALS, FEEDBACK, the DLQ) and the
decisions made for them (DECISIONS), found as forgetting finds them (`streams.scrub`); their rows in
the database (`user_state`, the events their state keeps, `user_features`, `tip_scores`, `erasures`,
`erasures_earlier`); and their own features' weights in each model version saved (`TipModel.forget_user`
drops the same). The scan reads every
stream through a consumer of its own, in this process: a running service is not slowed by it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from nats.js.errors import NotFoundError
from sqlalchemy import JSON, Table, select
from sqlalchemy.engine import Engine

from app import db
from app.erasure import earlier_erasures, read_rows
from app.registry_store import decoded_model
from streams import jetstream as jsx
from streams.fold import KINDS, REACTION_CODES, ZERO_DUE, UserState
from streams.scrub import Cut, belongs, cut_copy_of, head_of, info_or_none, read_through, spellings, theirs_by_original
from streams.store import UnreadableState

READ = (jsx.SIGNALS.name, jsx.FEEDBACK.name, jsx.DECISIONS.name, jsx.DLQ.name)


def message(body: bytes) -> Any:
    """A message's body as its JSON, or as text when it is not JSON (a dead-lettered one may not be).

    >>> message(b'{"user_id": "u"}'), message(b'{"user_id": "u", "d')
    ({'user_id': 'u'}, '{"user_id": "u", "d')
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "backslashreplace")


async def from_streams(js: Any, user_id: str,
                       progress: Callable[[str, int, int], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per stream, the user's messages in the order stored: `{"seq": ..., "message": ...}`."""
    found: dict[str, list[dict[str, Any]]] = {}
    users, spelt = frozenset((user_id,)), spellings((user_id,))
    for stream in READ:
        theirs: list[dict[str, Any]] = []
        # A stream never created holds nothing of theirs. NATS not answering fails the export (`ScrubError`):
        # taken for a stream never created, it showed none of their messages, as if the stream held none.
        info = await info_or_none(js, stream)
        if info is None:
            found[stream] = theirs
            continue

        cut: list[Cut] = []

        def keep(seq: int, body: bytes, headers: Any = None, theirs: list[dict[str, Any]] = theirs,
                 cut: list[Cut] = cut) -> None:
            if belongs(body, users, spelt):
                theirs.append({"seq": seq, "message": message(body)})
            elif (original := cut_copy_of(headers)) is not None:
                cut.append((seq, *original, head_of(body)))

        if info.state.messages:
            await read_through(js, stream, max(info.state.first_seq, 1), info.state.last_seq, keep,
                               None if progress is None else lambda n, of, s=stream: progress(s, n, of),
                               with_headers=True)
        # A DLQ copy cut before its user's id is theirs by its original, as forgetting judges it (and deletes it).
        for seq in await theirs_by_original(js, cut, users, spelt):
            with contextlib.suppress(NotFoundError):  # gone since the scan
                theirs.append({"seq": seq, "message": message((await js.get_msg(stream, seq)).data or b"")})
        theirs.sort(key=lambda item: item["seq"])
        found[stream] = theirs
    return found


def from_database(engine: Engine, user_id: str) -> dict[str, Any]:
    """Their rows, and their own features' weights in each version's saved model."""
    with engine.connect() as conn:
        state = conn.execute(select(db.user_state.c.state).where(db.user_state.c.user_id == user_id)).scalar()
        features = conn.execute(db.json_as_text(db.user_features)
                                .where(db.user_features.c.user_id == user_id)).mappings().first()
        scores = conn.execute(db.json_as_text(db.tip_scores).where(db.tip_scores.c.user_id == user_id)
                              .order_by(db.tip_scores.c.created_at)).mappings().all()
        # Read column by column: the request's row damaged (its bounds cut short) failed the export, naming neither;
        # then exported as null, while a damaged column of another table was exported as the text it holds.
        erasure = next(iter(read_rows(conn, db.erasures, db.erasures.c.user_id == user_id, held=True)), None)
        versions = conn.execute(select(db.model_versions.c.version, db.model_versions.c.model)
                                .where(db.model_versions.c.model.is_not(None))).all()
    weights = {}
    for version, blob in versions:
        model = decoded_model(version, blob)
        table = model._tables()[0]
        own = {name: float(table[name]) for name in sorted(model._names_of(user_id)) if name in table}
        if own:
            weights[version] = own
    return {
        "user_state": kept_events(_state(user_id, bytes(state))) if state is not None else None,
        "user_features": _row(_json_decoded(features, db.user_features)),
        "tip_scores": [_row(_json_decoded(row, db.tip_scores)) for row in scores],
        "erasure": _row(erasure),
        "erasures_earlier": [_row(row) for row in earlier_erasures(engine, user_id, held=True)],
        "model_weights": weights,
    }


def _json_decoded(row: Any, table: Table) -> dict[str, Any] | None:
    """`row` read by `db.json_as_text(table)`, its JSON columns decoded; one that cannot be is exported as the text it
    holds: the row is theirs all the same.

    >>> _json_decoded({"user_id": "u", "features": '{"a": 1}', "fallbacks": "null"}, db.user_features)
    {'user_id': 'u', 'features': {'a': 1}, 'fallbacks': None}
    >>> _json_decoded({"user_id": "u", "features": '{"a": 1', "fallbacks": None}, db.user_features)["features"]
    '{"a": 1'
    """
    if row is None:
        return None
    decoded = dict(row)
    for column in table.columns:
        if isinstance(column.type, JSON) and decoded.get(column.name) is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                decoded[column.name] = orjson.loads(decoded[column.name])
    return decoded


def _state(user_id: str, blob: bytes) -> UserState:
    """The state in the user's row; UnreadableState, naming them and the fixes, when it is damaged (a ValueError
    traceback, after every stream had been read)."""
    try:
        return UserState.from_bytes(blob)
    except ValueError as error:
        raise UnreadableState(user_id, str(error)) from None


def kept_events(state: UserState) -> dict[str, Any]:
    """A `user_state` row as a person reads it: the events of each kind it keeps (their last 31 days, as
    `streams.fold` packs them), at their time in the user's offset, with what each record holds. The
    streams may have let those events go (their retention, `TIPSTREAM_STREAM_MAX_BYTES`) while the state
    keeps them, for as long as the user is not forgotten. `fp` and `task` are fingerprints (CRC-32 bits) of
    the event's and the task's ids; `due` is the task's due time.

    >>> from streams.events import parse_event
    >>> from streams.fold import apply
    >>> state = UserState()
    >>> apply(state, parse_event(b'{"id": "e1", "type": "task.completed", "user_id": "u", "ts": "2026-11-26T08:00:00+01:00",'
    ...                          b' "data": {"task_id": "t"}}'))
    True
    >>> kept = kept_events(state)
    >>> kept["utc_offset"], kept["events"]["task.completed"][0]["at"], kept["events"]["task.completed"][0]["local_hour"]
    ('+01:00', '2026-11-26T08:00:00.000+01:00', 8)
    """
    zone = timezone(timedelta(seconds=state.offset_s))
    reactions = {code: name for name, code in REACTION_CODES.items()}
    events: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        for record in state.records(kind).tolist():  # tuples: ts, fp, then the kind's own fields
            at_ms = record[0] + state.base_ms
            event: dict[str, Any] = {"at": datetime.fromtimestamp(at_ms / 1000, zone).isoformat(timespec="milliseconds"),
                                     "fp": record[1]}
            for name, value in zip(state.records(kind).dtype.names[2:], record[2:], strict=True):
                if name == "due_s":
                    event["due"] = datetime.fromtimestamp(value, UTC).isoformat() if value > ZERO_DUE else None
                elif name == "reaction":
                    event["reaction"] = reactions.get(value, value)
                else:
                    event[name] = value
            events.setdefault(kind, []).append(event)
    sign, offset = "-" if state.offset_s < 0 else "+", abs(state.offset_s)
    return {"utc_offset": f"{sign}{offset // 3600:02d}:{offset % 3600 // 60:02d}", "events": events}


def _row(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {str(key): _value(value) for key, value in dict(row).items()}


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, str) and value[:1] in "{[":  # JSON text: SQLite's JSON columns, the decision event
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


async def export_user(js: Any, engine: Engine, user_id: str,
                      progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Everything held of the user. UnreadableState when their `user_state` row is damaged, UnreadableModel when
    a version's saved model is: the database is read first, so that is said before the scan of every stream
    (minutes for large ones), not after it."""
    rows = from_database(engine, user_id)
    streams = await from_streams(js, user_id, progress)
    return {"user_id": user_id, "exported_at": datetime.now(UTC).isoformat(), "streams": streams, **rows}
