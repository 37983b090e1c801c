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
from datetime import datetime, timedelta, timezone
from hashlib import blake2b
from typing import Any, Callable

DAY_MS = 86_400_000
HORIZON_DAYS = 31  # longest window (30 d) plus one day, so `(now - 30d, now]` is exact for now >= newest
ACTIVE_DAYS_KEPT = 62
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
NO_DUE = 0

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
    """A stable 32-bit fingerprint (Python's hash() changes per process)."""
    return int.from_bytes(blake2b(text.encode(), digest_size=4).digest(), "little")


def to_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


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
        if not ts_col or ts > ts_col[-1]:
            index = len(ts_col)  # the common case: in order
        else:
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

    __slots__ = ("logs", "newest_ms", "offset_s", "active_days")

    def __init__(self) -> None:
        self.logs: dict[str, Log] = {kind: Log(kind) for kind in KINDS}
        self.newest_ms = -(2**62)
        self.offset_s = 0  # UTC offset of the newest event: the user's current zone
        self.active_days = array("i")  # sorted local epoch days with any signal

    @property
    def cutoff_ms(self) -> int:
        return (self.newest_ms // DAY_MS - HORIZON_DAYS) * DAY_MS

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserState) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """Compact and canonical: equal states give equal bytes."""
        parts = [struct.pack("<qi", self.newest_ms, self.offset_s), _pack(self.active_days)]
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
        pos = _unpack_into(state.active_days, view, 12)
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
    return NO_DUE if due is None else max(1, min(int(due.timestamp()), 2**32 - 1))


def _payload(event: Any) -> tuple[int, ...]:
    data = event.data
    kind = event.type
    if kind == "task.created":
        return (fingerprint(data.task_id), _due_s(data.due), data.priority or 0)
    if kind == "task.completed":
        return (fingerprint(data.task_id), event.ts.hour)
    if kind == "task.rescheduled":
        return (fingerprint(data.task_id), _due_s(data.due))
    if kind == "task.deleted":
        return (fingerprint(data.task_id),)
    if kind == "tip.shown":
        return (fingerprint(data.tip_id),)
    if kind == "tip.reacted":
        return (fingerprint(data.tip_id), REACTION_CODES[data.reaction])
    return ()


def apply(state: UserState, event: Any) -> bool:
    """Fold one event into `state`; False when it changed nothing (a duplicate, or too old to matter).

    Steps, in order:
    1. Drop the event if it is older than every window can reach from the newest event.
    2. Insert it into its kind's log; a (time, fingerprint) already there is a duplicate.
    3. Advance the newest time and zone, prune what fell out of every window.
    4. Mark the local day active (signals only: reacting to a tip is not using the app).
    """
    ts_ms = to_ms(event.ts)
    if ts_ms < state.cutoff_ms:
        return False
    if not state.logs[event.type].insert(ts_ms, fingerprint(event.id), _payload(event)):
        return False
    offset_s = int(event.ts.utcoffset().total_seconds())
    if ts_ms > state.newest_ms:
        previous_day = state.newest_ms // DAY_MS
        state.newest_ms = ts_ms
        state.offset_s = offset_s
        if ts_ms // DAY_MS != previous_day:
            _prune_logs(state)
        _prune_active_days(state)
    elif ts_ms == state.newest_ms and offset_s > state.offset_s:
        state.offset_s = offset_s  # same instant, two zones: pick one deterministically
        _prune_active_days(state)
    if event.type in SIGNAL_KINDS:
        _mark_active(state, (ts_ms // 1000 + offset_s) // 86_400)
    return True


# Pruning depends only on the newest event, never on arrival order, so any order of
# the same events prunes to the same state.
def _prune_logs(state: UserState) -> None:
    cutoff = state.cutoff_ms
    for log in state.logs.values():
        log.prune_before(cutoff)


def _prune_active_days(state: UserState) -> None:
    days = state.active_days
    if days:
        del days[: bisect_left(days, _newest_local_day(state) - ACTIVE_DAYS_KEPT)]


def _newest_local_day(state: UserState) -> int:
    return (state.newest_ms // 1000 + state.offset_s) // 86_400


def _mark_active(state: UserState, local_day: int) -> None:
    days = state.active_days
    if local_day < _newest_local_day(state) - ACTIVE_DAYS_KEPT:
        return
    index = bisect_left(days, local_day)
    if index == len(days) or days[index] != local_day:
        days.insert(index, local_day)


FoldFn = Callable[[UserState, Any], bool]
