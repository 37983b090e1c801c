"""The fold: (state, event) -> state, one pure function per event type, no I/O.

Each user's state is a set of small time-sorted logs, one per event kind, holding
exactly what some feature window can still reach (`HORIZON_DAYS`, 31 days behind the day of
the user's newest event: the longest window, 30 days, and one more), up to
`MAX_RECORDS_PER_KIND` records a kind. Features are evaluated from these logs at any `now`
(see `features.py`), so windows are exact over event time and late events land where their
time says.

Why logs and not counters: the same events in any order, any batching, with any
duplicates, must give the same state. Sorted logs of whole records are canonical, and
finding the same record again is how a redelivered event is recognised long after
JetStream's duplicate window has passed.

A log is one immutable `bytes` of packed fixed-size records (`RECORDS`), replaced on each
change: the fewest objects per user, no over-allocation, and a reader holding a view of
it never blocks the fold. Times are kept in milliseconds relative to the user's
`base_ms` (the horizon's start, rounded down to `REBASE_DAYS`), so they fit 32 bits.

>>> from streams.events import parse_event
>>> state = UserState()
>>> raw = b'{"id": "e1", "type": "task.completed", "user_id": "u", "ts": "2026-11-26T08:00:00+01:00", "data": {"task_id": "t"}}'
>>> apply(state, parse_event(raw)), apply(state, parse_event(raw))
(True, False)
>>> state.count("task.completed"), state.times("task.completed").tolist() == [to_ms(datetime(2026, 11, 26, 7, tzinfo=timezone.utc))]
(1, True)
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone  # noqa: F401 - the doctests use them
from typing import Any
from zlib import crc32

import numpy as np

DAY_MS = 86_400_000
HORIZON_DAYS = 31  # longest window (30 d) plus one day, so `(now - 30d, now]` is exact for now >= newest
REBASE_DAYS = 8  # kept times span < HORIZON_DAYS + 1 + REBASE_DAYS days of base_ms: 40 < 49.7, the reach of 32 bits
NO_DUE = 0
ZERO_DUE = 1  # a due before 1970-01-01T00:00:02Z (a zero value, not a date): none, as NO_DUE
_EPOCH_DAY = date(1970, 1, 1).toordinal()

REACTION_CODES = {"acted": 0, "liked": 1, "snoozed": 2, "dismissed": 3, "disliked": 4}

# Per event kind: the record's fields after (ts: ms since base_ms, u32; fp: 16 bits of the
# event id's CRC-32), with struct codes. Only what some feature reads is kept; a feature
# needing more is added here and filled by replaying the log.
KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "task.created": (("task", "I"), ("due_s", "I")),
    "task.completed": (("task", "I"), ("local_hour", "B")),
    "task.rescheduled": (("task", "I"), ("due_s", "I")),
    "task.deleted": (("task", "I"),),
    "app.opened": (),
    "tip.shown": (),
    "tip.reacted": (("reaction", "B"),),
}
KIND_NAMES = tuple(KINDS)
KIND_INDEX = {kind: i for i, kind in enumerate(KINDS)}
SIGNAL_KINDS = tuple(k for k in KINDS if k != "tip.reacted")
RECORDS = {kind: struct.Struct("<IH" + "".join(code for _, code in fields)) for kind, fields in KINDS.items()}
SIZES = tuple(RECORDS[kind].size for kind in KINDS)
DTYPES = {kind: np.dtype([("ts", "<u4"), ("fp", "<u2")] + [(name, "<" + code.replace("I", "u4").replace("B", "u1"))
                                                             for name, code in fields])
          for kind, fields in KINDS.items()}
# Fields that render the event's time rather than name the event: the same event sent again with its
# `ts` written in another UTC offset (a device that moved zones since, re-rendering on a retry) keeps
# another local hour, and was a second record, counted twice (tasks_completed_7d, completion_rate_7d).
# Such a field is its record's last, so the bytes before it (`KEY_SIZES`) name the event: a log holds
# one record of each, the one with the largest rendering (see `_insert`).
RENDERED = {"task.completed": "local_hour"}
assert all(KINDS[kind][-1][0] == name for kind, name in RENDERED.items())
KEY_SIZES = tuple(RECORDS[kind].size - (struct.calcsize(KINDS[kind][-1][1]) if kind in RENDERED else 0)
                  for kind in KINDS)
_TS = struct.Struct("<I")
_unpack_ts = _TS.unpack_from
_HEADER = struct.Struct("<4sqiq")  # magic, newest_ms, offset_s, base_ms
_MAGIC = b"TSU2"
_LENGTH = struct.Struct("<I")


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


class UserState:
    """Everything the fold knows of one user: one packed log per kind, and where time stands."""

    __slots__ = ("base_ms", "dropped", "logs", "newest_ms", "offset_s")

    def __init__(self) -> None:
        self.logs: list[bytes] = [b""] * len(KINDS)
        self.newest_ms = -(2**62)
        self.offset_s = 0  # UTC offset of the newest event: the user's current zone
        self.base_ms = 0  # what the logs' times count from (see _base_for)
        # Records the cap dropped from this object, or replaced by a copy of the same event rendered in
        # another zone (not saved: no part of the state). Such a fold keeps the newest time, zone and the
        # logs' total length, which are otherwise what tells a reader (/score's snapshot cache) that the
        # state changed.
        self.dropped = 0

    @property
    def cutoff_ms(self) -> int:
        return (self.newest_ms // DAY_MS - HORIZON_DAYS) * DAY_MS

    def count(self, kind: str) -> int:
        i = KIND_INDEX[kind]
        return len(self.logs[i]) // SIZES[i]

    @property
    def events_kept(self) -> int:
        return sum(len(log) // size for log, size in zip(self.logs, SIZES))

    def records(self, kind: str) -> np.ndarray:
        """The kind's records as a read-only structured array (a view; `ts` relative to `base_ms`)."""
        return np.frombuffer(self.logs[KIND_INDEX[kind]], dtype=DTYPES[kind])

    def times(self, kind: str) -> np.ndarray:
        """The kind's event times, ms since the epoch, oldest first."""
        return self.records(kind)["ts"].astype(np.int64) + self.base_ms

    def first_ms(self, kind: str) -> int | None:
        log = self.logs[KIND_INDEX[kind]]
        return _unpack_ts(log, 0)[0] + self.base_ms if log else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserState) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        """Compact and canonical: equal states give equal bytes."""
        parts = [_HEADER.pack(_MAGIC, self.newest_ms, self.offset_s, self.base_ms)]
        for log in self.logs:
            parts.append(_LENGTH.pack(len(log)))
            parts.append(log)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes) -> UserState:
        """The state `to_bytes` wrote; ValueError for bytes it did not write whole (a row cut short or
        overwritten). A log cut short in its last records was read as a shorter one, and the state, wrong
        without a word, failed later in whatever read it, or was saved again as it was.

        >>> UserState.from_bytes(UserState().to_bytes()[:-1])
        Traceback (most recent call last):
        ...
        ValueError: not a user state: 51 bytes, cut short or overwritten (its lengths do not add up)
        """
        if blob[:4] != _MAGIC:
            return _from_v1_bytes(blob)
        damaged = ValueError(f"not a user state: {len(blob)} bytes, cut short or overwritten (its lengths do not add up)")
        if len(blob) < _HEADER.size + 4 * len(SIZES):
            raise damaged
        state = cls()
        _, state.newest_ms, state.offset_s, state.base_ms = _HEADER.unpack_from(blob, 0)
        pos = _HEADER.size
        cap = MAX_RECORDS_PER_KIND
        logs = state.logs
        for i, size in enumerate(SIZES):
            if pos + 4 > len(blob):
                raise damaged
            (length,) = _LENGTH.unpack_from(blob, pos)
            pos += 4
            if length % size or pos + length > len(blob):
                raise damaged
            log = blob[pos : pos + length]
            if KEY_SIZES[i] != size and length > size:
                log = _one_copy_each(log, i)
            # Read for every user at a start: the cap's slice only past it.
            logs[i] = log if len(log) <= cap * size else _capped(log, size)
            pos += length
        if pos != len(blob):
            raise damaged
        return state


def _from_v1_bytes(blob: bytes) -> UserState:
    """Upcast a checkpoint written before packed logs (int64 times, a column per field); ValueError for bytes
    that are neither format (a row overwritten by hand or by a disk fault)."""
    try:
        return _v1_state(blob)
    except struct.error:  # what unpack_from raises past the end
        raise ValueError(f"not a user state: {len(blob)} bytes, cut short or overwritten (not one of either "
                         "format)") from None


def _v1_state(blob: bytes) -> UserState:
    v1_columns = {"task.created": "IIB", "task.completed": "IB", "task.rescheduled": "II", "task.deleted": "I",
                  "app.opened": "", "tip.shown": "I", "tip.reacted": "IB"}
    v1_keep = {"task.created": (0, 1), "task.completed": (0, 1), "task.rescheduled": (0, 1), "task.deleted": (0,),
               "app.opened": (), "tip.shown": (), "tip.reacted": (1,)}
    state = UserState()
    state.newest_ms, state.offset_s = struct.unpack_from("<qi", blob, 0)
    state.base_ms = _base_for(state.cutoff_ms)
    pos = 12
    for i, kind in enumerate(KINDS):
        columns = []
        for code in "qI" + v1_columns[kind]:
            (count,) = _LENGTH.unpack_from(blob, pos)
            width = struct.calcsize(code)
            if pos + 4 + count * width > len(blob):
                raise struct.error("a column past the end")
            columns.append(struct.unpack_from(f"<{count}{code}", blob, pos + 4))
            pos += 4 + count * width
        stamps, fps, payload = columns[0], columns[1], columns[2:]
        kept = [payload[j] for j in v1_keep[kind]]
        record = RECORDS[kind]
        rows = {record.pack(ts - state.base_ms, fp & 0xFFFF, *(col[n] for col in kept))
                for n, (ts, fp) in enumerate(zip(stamps, fps)) if ts >= state.cutoff_ms}
        state.logs[i] = _capped(_one_copy_each(b"".join(sorted(rows, key=lambda r: (_unpack_ts(r)[0], r))), i),
                                record.size)
    if pos != len(blob):
        raise struct.error("bytes past the last column")
    return state


def _capped(log: bytes, size: int) -> bytes:
    # A checkpoint written before the cap (or with a higher one) may hold more: kept, the state
    # differed from the one its events fold to, and the next event of the kind dropped the excess
    # at once while its apply said it changed nothing.
    excess = len(log) - MAX_RECORDS_PER_KIND * size
    return log[excess:] if excess > 0 else log


def _one_copy_each(log: bytes, i: int) -> bytes:
    """Kind `i`'s log with one record of each event: a checkpoint written before `RENDERED` may hold a
    completion twice, in two local hours. The larger is kept, as the fold keeps it; kept both, the state
    differed from the one its events fold to, and the completion counted twice until it expired."""
    size, key = SIZES[i], KEY_SIZES[i]
    if key == size:
        return log
    stamps = np.frombuffer(log, dtype=DTYPES[KIND_NAMES[i]])["ts"]
    if not (stamps[1:] == stamps[:-1]).any():  # read for every user at a start: the common case is one numpy pass
        return log
    records = [log[at : at + size] for at in range(0, len(log), size)]
    # Copies of one event are adjacent, the larger local hour last: keep each record not followed by a copy.
    return b"".join(r for r, after in zip(records, [*records[1:], b""]) if r[:key] != after[:key])


def _due_s(due: datetime | None) -> int:
    # A due at or before the Unix epoch (Go's zero time.Time, 0001-01-01T00:00:00Z, written even with
    # `omitempty`; or a Unix time 0) is kept as ZERO_DUE, as every release has kept it, and read as no
    # due (features.py). Written as NO_DUE instead, the records held in checkpoints (and their
    # overdue tasks) stayed, and the same event redelivered was a second, new record.
    return NO_DUE if due is None else max(ZERO_DUE, min(to_ms(due) // 1000, 2**32 - 1))


# One function per event type: what of the event its record keeps, beside time and id.
PAYLOAD: dict[str, Callable[[Any], tuple[int, ...]]] = {
    "task.created": lambda e: (fingerprint(e.data.task_id), _due_s(e.data.due)),
    "task.completed": lambda e: (fingerprint(e.data.task_id), e.ts.hour),
    "task.rescheduled": lambda e: (fingerprint(e.data.task_id), _due_s(e.data.due)),
    "task.deleted": lambda e: (fingerprint(e.data.task_id),),
    "app.opened": lambda e: (),
    "tip.shown": lambda e: (),
    "tip.reacted": lambda e: (REACTION_CODES[e.data.reaction],),
}


# Per kind, what the fold needs of it in one lookup: log index, record packer, record size, payload, and
# how many of the record's bytes name the event (KEY_SIZES).
_PLAN = {kind: (KIND_INDEX[kind], RECORDS[kind].pack, RECORDS[kind].size, PAYLOAD[kind], KEY_SIZES[KIND_INDEX[kind]])
         for kind in KINDS}


class FutureEvent(ValueError):
    """The event is stamped later than the caller's limit (a publisher's clock running ahead)."""


def apply(state: UserState, event: Any, max_ts_ms: int | None = None) -> bool:
    """Fold one event into `state`; False when it changed nothing (a duplicate, or too old to matter).

    `max_ts_ms`, when given, refuses events stamped later with FutureEvent: one such event
    would become the user's newest and prune their history.

    Steps, in order:
    1. Drop the event if it is older than every window can reach from the newest event.
    2. A newer event on a later day moves the horizon: prune what fell out of every window
       (and every REBASE_DAYS, count times from a new base).
    3. Insert its record into its kind's log in (time, record) order; the same record
       already there is a duplicate (whose zone still counts at the newest instant). A
       completion's copy differing only in local hour (the same event re-sent with its time in
       another zone) is one too: the larger local hour is kept (see `_insert`).
    4. Past MAX_RECORDS_PER_KIND, drop the kind's oldest record (if that is this one, it
       changed nothing).
    5. Advance the newest time and zone.
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
    i, pack, size, payload, key = _PLAN[event.type]
    if ts_ms // DAY_MS > newest // DAY_MS:
        # Before the insert, so every kept time stays within 32 bits of base_ms. The event
        # itself is the newest, so neither the prune nor the dedup concerns it.
        _move_horizon(state, (ts_ms // DAY_MS - HORIZON_DAYS) * DAY_MS)
    rel = ts_ms - state.base_ms
    record = pack(rel, fingerprint(event.id) & 0xFFFF, *payload(event))
    log = state.logs[i]
    if not log or rel > _unpack_ts(log, len(log) - size)[0]:  # the common case: in order, so append
        if len(log) < APPEND_IN_PLACE_BYTES:
            log = state.logs[i] = log + record
        else:  # a heavy user's log: copying it for every event made their events cost O(n) each
            if log.__class__ is not bytearray:
                log = state.logs[i] = bytearray(log)
            try:
                log += record
            except BufferError:  # a numpy view of it is alive (none should be): copy, as for short logs
                log = state.logs[i] = log + record
    else:
        merged = _insert(log, record, size, key)
        if merged is None:
            # Already there, maybe sent again with its time in another zone (a device that moved since):
            # at the newest instant its zone counts as it would have, had it come first.
            if ts_ms == newest and offset_s > state.offset_s:
                state.offset_s = offset_s
                return True
            return False
        if len(merged) == len(log):  # a copy of the event in a smaller local hour replaced (see _insert)
            state.dropped += 1
        log = state.logs[i] = merged
    if len(log) > MAX_RECORDS_PER_KIND * size:  # by one record: from_bytes caps what a checkpoint holds
        oldest = bytes(log[:size])
        state.logs[i] = _without_oldest(log, size)
        state.dropped += 1
        if oldest == record:
            # Older than every record the kind keeps, but it may share the newest instant (every kept
            # record of the kind is then at it): its zone counts as it would have, come before them.
            if ts_ms == newest and offset_s > state.offset_s:
                state.offset_s = offset_s
                return True
            return False
    if ts_ms > newest or (ts_ms == newest and offset_s > state.offset_s):
        # A newer event, or the same instant in a second zone (the larger offset wins,
        # so the choice doesn't depend on arrival order).
        state.newest_ms, state.offset_s = ts_ms, offset_s
    return True


# A user's log of one kind keeps at most this many records, the newest (by time, then record bytes,
# as the log is ordered): a publisher stuck in a loop for one user grew that user's state without
# bound, and with it each evaluation of their features (on the event loop: 15 ms at 50,000
# task.created) and each checkpoint. 20,000 in the 31-day horizon is 645 a day of one kind, past
# what a person does. The newest N of a set do not depend on the order it came in, so the state
# stays canonical; features reading before a full kind's oldest record are fallbacks (features.py).
MAX_RECORDS_PER_KIND = 20_000


def at_cap(state: UserState) -> list[tuple[str, int]]:
    """(kind, time of its oldest record, ms) of each kind holding MAX_RECORDS_PER_KIND records: what
    lies before that time may have been dropped."""
    cap = MAX_RECORDS_PER_KIND
    return [(kind, _unpack_ts(log, 0)[0] + state.base_ms)
            for kind, log, size in zip(KINDS, state.logs, SIZES) if len(log) >= cap * size]


def _without_oldest(log: bytes | bytearray, length: int) -> bytes | bytearray:
    if log.__class__ is bytearray:
        try:
            del log[:length]  # O(1): CPython moves the bytearray's start
            return log
        except BufferError:  # a numpy view of it is alive: copy
            pass
    return log[length:]


# Past this, a kind's log grows in place (a bytearray, amortised O(1) a record) instead of as new
# bytes per event. Below it, bytes: no over-allocation for the many users with short logs
# (bench/memory.py). A numpy view of a log alive across a fold would block the resize; features
# build theirs per evaluation, on the event loop, and a blocked append copies instead.
APPEND_IN_PLACE_BYTES = 64 * 1024


def _insert(log: bytes, record: bytes, size: int, key: int) -> bytes | None:
    """`log` with `record` in (time, record bytes) order, or None when it is already there.

    A record whose first `key` bytes (all but a `RENDERED` field) equal another's is the same event
    rendered in another zone: of the two, the one with the larger last byte (local hour) is kept, in place
    of the other, whatever order they came in. A rule the records alone decide (they keep no offset),
    as a checkpoint and the cap need. At one instant the larger offset has the larger local hour, except
    across local midnight (23:00-01:00 and 00:00+00:00), where the zone's rule takes the other copy.
    """
    ts = _unpack_ts(record)[0]
    lo = _first_at_or_after(log, ts, size)
    # Records of one time are in byte order: a binary search among them, not a walk (a publisher
    # sending many events of one user at one instant made each insert O(n) in Python, stalling ingest).
    hi = _first_at_or_after(log, ts + 1, size)
    while lo < hi:
        mid = (lo + hi) // 2
        if log[mid * size : mid * size + size] < record:
            lo = mid + 1
        else:
            hi = mid
    at = lo * size
    if key != size:  # copies of one event are adjacent, in the order of their last byte
        if log[at : at + key] == record[:key]:  # the record, or a copy of it with a larger local hour
            return None
        if at and log[at - size : at - size + key] == record[:key]:  # a copy with a smaller local hour: replaced
            return log[: at - size] + record + log[at:]
    elif log[at : at + size] == record:
        return None
    return log[:at] + record + log[at:]


def _base_for(cutoff_ms: int) -> int:
    """Where times count from: the cutoff rounded down to REBASE_DAYS, so that records are
    rewritten every few days, not daily. A function of the cutoff alone: states stay canonical."""
    return cutoff_ms - cutoff_ms % (REBASE_DAYS * DAY_MS)


def _move_horizon(state: UserState, cutoff_ms: int) -> None:
    # The cutoff depends only on the newest event, never on arrival order, so any
    # order of the same events prunes to the same state.
    base = _base_for(cutoff_ms)
    shift, drop_before = base - state.base_ms, cutoff_ms - state.base_ms
    for i, kind in enumerate(KINDS):
        log = state.logs[i]
        if not log:
            continue
        if shift:  # rebase (every REBASE_DAYS): rewrite every time, dropping what fell out
            records = np.frombuffer(log, dtype=DTYPES[kind])
            stamps = records["ts"].astype(np.int64)
            kept = records[np.searchsorted(stamps, drop_before):].copy()
            kept["ts"] = stamps[len(stamps) - len(kept):] - shift
            state.logs[i] = kept.tobytes()
        elif _unpack_ts(log, 0)[0] < drop_before:  # daily: cut the expired head off
            state.logs[i] = log[_first_at_or_after(log, drop_before, SIZES[i]) * SIZES[i]:]
    state.base_ms = base


def _first_at_or_after(log: bytes, ts: int, size: int) -> int:
    """Index of the first record whose time is >= ts (binary search over the packed records)."""
    lo, hi = 0, len(log) // size
    while lo < hi:
        mid = (lo + hi) // 2
        if _unpack_ts(log, mid * size)[0] < ts:
            lo = mid + 1
        else:
            hi = mid
    return lo
