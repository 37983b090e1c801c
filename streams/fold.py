"""The fold: (state, event) -> state, one pure function per event type, no I/O.

Each user's state is a set of small time-sorted logs, one per event kind, holding
exactly what some feature window can still reach (30 days behind the user's newest
event). Features are evaluated from these logs at any `now` (see `features.py`), so
windows are exact over event time and late events land where their time says.

Why logs and not counters: the same events in any order, any batching, with any
duplicates, must give the same state. Sorted logs keyed by (time, event fingerprint)
are canonical, and the fingerprint found at the same time is how a redelivered event
is recognised long after JetStream's duplicate window has passed.

>>> from streams.events import parse_event
>>> state = UserState()
>>> raw = b'{"id": "e1", "type": "task.completed", "user_id": "u", "ts": "2026-11-26T08:00:00+01:00", "data": {"task_id": "t"}}'
>>> apply(state, parse_event(raw)), apply(state, parse_event(raw))
(True, False)
>>> len(state.logs["task.completed"])
1
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left
from datetime import date, datetime, timedelta, timezone  # noqa: F401 - the doctests use them
from zlib import crc32
from typing import Any, Callable

DAY_MS = 86_400_000
HORIZON_DAYS = 31  # longest window (30 d) plus one day, so `(now - 30d, now]` is exact for now >= newest
NO_DUE = 0
_EPOCH_DAY = date(1970, 1, 1).toordinal()

REACTION_CODES = {"acted": 0, "liked": 1, "snoozed": 2, "dismissed": 3, "disliked": 4}

# Per event kind: the payload columns kept beside (ts, fingerprint), with array typecodes.
# 'q' ms since epoch, 'I' 32-bit fingerprints or seconds, 'B' small codes.
KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "task.created": (("task", "I"), ("due_s", "I"), ("priority", "B")),
    "task.completed": (("task", "I"), ("local_hour", "B")),
    "task.rescheduled": (("task", "I"), ("due_s", "I")),
    "task.deleted": (("task", "I"),),
    "app.opened": (),
    "tip.shown": (("tip", "I"),),
    "tip.reacted": (("tip", "I"), ("reaction", "B")),
}
SIGNAL_KINDS = tuple(k for k in KINDS if k != "tip.reacted")


def fingerprint(text: str) -> int:
    """A stable 32-bit fingerprint (Python's hash() changes per process).

    CRC-32: fast, and two ids of equal length that differ in at most 32 bits never
    collide, which covers counters and ULIDs minted close together.
    """
    return crc32(text.encode())


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, exactly (floored), in integer arithmetic.

    >>> to_ms(datetime(2026, 11, 26, 8, 0, 0, 999_999, tzinfo=timezone.utc)) % 1000
    999
    >>> to_ms(datetime(1970, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
    0
    """
    offset = moment.utcoffset()
    return _local_ms(moment) - (offset.days * 86_400 + offset.seconds) * 1000


def _local_ms(moment: datetime) -> int:
    # datetime.timestamp() goes through float seconds and the tzinfo again: slower, and inexact.
    return (((moment.toordinal() - _EPOCH_DAY) * 86_400 + moment.hour * 3600 + moment.minute * 60 + moment.second)
            * 1000 + moment.microsecond // 1000)


class Log:
    """A time-sorted column store: ts (ms), fp (event fingerprint), then payload columns."""

    __slots__ = ("ts", "fp", "cols")

    def __init__(self, kind: str) -> None:
        self.ts = array("q")
        self.fp = array("I")
        self.cols = tuple(array(code) for _, code in KINDS[kind])

    def __len__(self) -> int:
        return len(self.ts)

    def insert(self, ts: int, fp: int, payload: tuple[int, ...]) -> bool:
        """Insert in (ts, fp) order; False when that exact event is already here."""
        ts_col = self.ts
        if not ts_col or ts > ts_col[-1]:  # the common case: in order, so append
            ts_col.append(ts)
            self.fp.append(fp)
            for column, value in zip(self.cols, payload):
                column.append(value)
            return True
        index = bisect_left(ts_col, ts)
        fp_col = self.fp
        while index < len(ts_col) and ts_col[index] == ts:
            if fp_col[index] == fp:
                return False
            if fp_col[index] > fp:
                break
            index += 1
        ts_col.insert(index, ts)
        self.fp.insert(index, fp)
        for column, value in zip(self.cols, payload):
            column.insert(index, value)
        return True

    def prune_before(self, cutoff_ms: int) -> None:
        drop = bisect_left(self.ts, cutoff_ms)
        if drop:
            del self.ts[:drop]
            del self.fp[:drop]
            for column in self.cols:
                del column[:drop]


class UserState:
    """Everything the fold knows of one user."""

    __slots__ = ("logs", "newest_ms", "offset_s")

    def __init__(self) -> None:
        self.logs: dict[str, Log] = {kind: Log(kind) for kind in KINDS}
        self.newest_ms = -(2**62)
        self.offset_s = 0  # UTC offset of the newest event: the user's current zone

    @property
    def cutoff_ms(self) -> int:
        return (self.newest_ms // DAY_MS - HORIZON_DAYS) * DAY_MS

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserState) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """Compact and canonical: equal states give equal bytes."""
        parts = [struct.pack("<qi", self.newest_ms, self.offset_s)]
        for log in self.logs.values():
            parts.append(_pack(log.ts))
            parts.append(_pack(log.fp))
            parts.extend(_pack(column) for column in log.cols)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "UserState":
        state = cls()
        state.newest_ms, state.offset_s = struct.unpack_from("<qi", blob, 0)
        view = memoryview(blob)
        pos = 12
        for log in state.logs.values():
            pos = _unpack_into(log.ts, view, pos)
            pos = _unpack_into(log.fp, view, pos)
            for column in log.cols:
                pos = _unpack_into(column, view, pos)
        return state


def _pack(column: array) -> bytes:
    return struct.pack("<I", len(column)) + column.tobytes()


def _unpack_into(column: array, view: memoryview, pos: int) -> int:
    (count,) = struct.unpack_from("<I", view, pos)
    end = pos + 4 + count * column.itemsize
    column.frombytes(view[pos + 4 : end])
    return end


def _due_s(due: datetime | None) -> int:
    return NO_DUE if due is None else max(1, min(to_ms(due) // 1000, 2**32 - 1))


# One function per event type: what of the event its log keeps, beside time and id.
PAYLOAD: dict[str, Callable[[Any], tuple[int, ...]]] = {
    "task.created": lambda e: (fingerprint(e.data.task_id), _due_s(e.data.due), e.data.priority or 0),
    "task.completed": lambda e: (fingerprint(e.data.task_id), e.ts.hour),
    "task.rescheduled": lambda e: (fingerprint(e.data.task_id), _due_s(e.data.due)),
    "task.deleted": lambda e: (fingerprint(e.data.task_id),),
    "app.opened": lambda e: (),
    "tip.shown": lambda e: (fingerprint(e.data.tip_id),),
    "tip.reacted": lambda e: (fingerprint(e.data.tip_id), REACTION_CODES[e.data.reaction]),
}


class FutureEvent(ValueError):
    """The event is stamped later than the caller's limit (a publisher's clock running ahead)."""


def apply(state: UserState, event: Any, max_ts_ms: int | None = None) -> bool:
    """Fold one event into `state`; False when it changed nothing (a duplicate, or too old to matter).

    `max_ts_ms`, when given, refuses events stamped later with FutureEvent: one such event
    would become the user's newest and prune their history.

    Steps, in order:
    1. Drop the event if it is older than every window can reach from the newest event.
    2. Insert it into its kind's log; a (time, fingerprint) already there is a duplicate.
    3. Advance the newest time and zone, prune what fell out of every window.
    """
    moment = event.ts
    offset = moment.utcoffset()
    offset_s = offset.days * 86_400 + offset.seconds
    ts_ms = _local_ms(moment) - offset_s * 1000
    if max_ts_ms is not None and ts_ms > max_ts_ms:
        raise FutureEvent(f"ts {moment.isoformat()} is later than the limit")
    newest = state.newest_ms
    if ts_ms < (newest // DAY_MS - HORIZON_DAYS) * DAY_MS:
        return False
    kind = event.type
    if not state.logs[kind].insert(ts_ms, fingerprint(event.id), PAYLOAD[kind](event)):
        return False
    if ts_ms > newest or (ts_ms == newest and offset_s > state.offset_s):
        # A newer event, or the same instant in a second zone (the larger offset wins,
        # so the choice doesn't depend on arrival order).
        state.newest_ms, state.offset_s = ts_ms, offset_s
        if ts_ms // DAY_MS != newest // DAY_MS:
            _prune_logs(state)
    return True


def _prune_logs(state: UserState) -> None:
    # The cutoff depends only on the newest event, never on arrival order, so any
    # order of the same events prunes to the same state.
    cutoff = state.cutoff_ms
    for log in state.logs.values():
        log.prune_before(cutoff)

