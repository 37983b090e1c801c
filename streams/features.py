"""One declaration per feature, read by serving, learning, replay and the docs.

Profile features are folded from the event stream ahead of any request (`batched`)
and evaluated over exact event-time windows `(now - w, now]`; context features are
computed from the request (`jit`) and never cached. `docs/features.md` is generated
from `FEATURES` (`tipstream docs`), and a test fails when it drifts.

>>> from streams.events import parse_event
>>> from streams.fold import UserState, apply, to_ms
>>> state = UserState()
>>> _ = apply(state, parse_event(b'{"id": "a", "type": "task.created", "user_id": "u", "ts": "2026-11-26T09:00:00+01:00", "data": {"task_id": "t"}}'))
>>> _ = apply(state, parse_event(b'{"id": "b", "type": "task.completed", "user_id": "u", "ts": "2026-11-26T10:00:00+01:00", "data": {"task_id": "t"}}'))
>>> values = evaluate(state, state.newest_ms)
>>> values["completion_rate_7d"].value, values["preferred_hour"].value, values["mean_hours_to_complete_28d"].value
(0.6666666666666666, 10, 1.0)
>>> evaluate(None, state.newest_ms)["preferred_hour"]
FeatureValue(value=9, age_s=None, fresh=False, fallback=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from streams.fold import (
    DAY_MS,
    HORIZON_DAYS,
    KIND_NAMES,
    MAX_RECORDS_PER_KIND,
    SIGNAL_KINDS,
    ZERO_DUE,
    UserState,
    at_cap,
)

HOUR_MS = 3_600_000
ENGAGEMENT_HALF_LIFE_DAYS = 3.0
POSITIVE_REACTIONS = (0, 1)  # acted, liked
NEGATIVE_REACTIONS = (3, 4)  # dismissed, disliked
STREAK_CAP = HORIZON_DAYS + 1  # active_day_streak: the newest event's (UTC) day and the 31 the fold keeps before it


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    dtype: Literal["int", "float"]
    freshness: Literal["batched", "jit"]
    ttl_s: float | None
    source: str
    fallback: int | float
    description: str
    window_days: int | None = None  # how far before `now` the value reads: where it stops being exact (see _cut_short)
    high: float | None = None  # the largest value it can take; every feature is >= 0

    @property
    def valid(self) -> str:
        """Its range, as docs/features.md shows it."""
        whole = " (whole)" if self.dtype == "int" else ""
        return (f">= 0{whole}" if self.high is None else f"0 to {self.high:g}{whole}")

    def problem(self, value: float) -> str | None:
        """Why `value` cannot be this feature's (a caller's `profile_features`), or None.

        >>> BY_NAME["preferred_hour"].problem(14), BY_NAME["preferred_hour"].problem(24)
        (None, 'must be 0 to 23 (whole), as the server computes it (docs/features.md); got 24')
        >>> BY_NAME["seconds_since_active"].problem(-5), BY_NAME["open_tasks"].problem(2.5) is not None
        ('must be >= 0, as the server computes it (docs/features.md); got -5', True)
        """
        if value < 0 or (self.high is not None and value > self.high) or (self.dtype == "int" and value != int(value)):
            return f"must be {self.valid}, as the server computes it (docs/features.md); got {value!r}"
        return None


@dataclass(frozen=True, slots=True)
class FeatureValue:
    value: int | float
    age_s: float | None
    fresh: bool
    fallback: bool


def _f(name: str, dtype: Any, ttl_days: float | None, source: str, fallback: Any, description: str, freshness: Any = "batched",
       window: int | None = None, high: float | None = None) -> Feature:
    return Feature(name, dtype, freshness, None if ttl_days is None else ttl_days * 86_400, source, fallback, description,
                   window, high)


FEATURES: tuple[Feature, ...] = (
    _f("tasks_created_7d", "int", 7, "task.created", 0, "`task.created` events in the last 7 days (a task created twice, with two event ids, counts twice).",
       window=7),
    _f("tasks_completed_7d", "int", 7, "task.completed", 0, "Tasks completed in the last 7 days.", window=7),
    _f("completion_rate_7d", "float", 7, "task.created, task.completed", 0.5,
       "`(tasks_completed_7d + 1) / (tasks_created_7d + 2)`.", window=7),
    _f("preferred_hour", "int", 28, "task.completed", 9,
       "Local hour (0-23) with the most completions in 28 days; ties go to the earliest hour.", window=28, high=23),
    _f("tip_volume_24h", "int", 1, "tip.shown", 0, "Tips shown in the last 24 hours.", window=1),
    _f("tip_positive_rate_30d", "float", 30, "tip.reacted", 0.5,
       "`(acted + liked + 1) / (reactions + 2)` over 30 days.", window=30, high=1),
    _f("seconds_since_active", "float", 30, "all signals", 30 * 86_400.0,
       "`now` minus the time of the latest signal at or before `now`."),
    _f("open_tasks", "int", 30, "task.created, task.completed, task.deleted", 0,
       "Tasks created in the last 30 days and neither completed nor deleted in them.", window=30),
    _f("overdue_tasks", "int", 30, "task.created, task.rescheduled, task.completed, task.deleted", 0,
       "Open tasks whose due time (the latest reschedule in 30 days, else the latest creation's `due`, so a "
       "`task.created` sent again without `due` clears it; kept to the second, rounded down) is at or before "
       "`now`. A `due` before 1970-01-01T00:00:02Z (Go's zero `time.Time`, Unix time 0) means none.",
       window=30),
    _f("postpone_rate_30d", "float", 30, "task.rescheduled, task.created", 0.0,
       "`reschedules / (tasks created + 1)` over 30 days.", window=30),
    _f("active_day_streak", "int", 2, "all signals", 0,
       "Consecutive local days (in the user's current offset) with any signal, ending today or yesterday; "
       "at most 32: the fold keeps the newest event's day and the 31 before it. A streak shorter than that, "
       "ended by a local day the fold holds only in part (at an earlier `now`; or, with an offset, the day "
       "31 back from the newest), is a fallback: pruned events may have continued it.", high=STREAK_CAP),
    _f("mean_hours_to_complete_28d", "float", 28, "task.created, task.completed", 24.0,
       "Mean hours from creation to completion, over completions in 28 days whose creation (the earliest) is in "
       "the last 30 days.", window=30),
    _f("engagement_score", "float", 30, "all signals", 0.0,
       f"Sum over signals in 30 days of `0.5 ** (age_days / {ENGAGEMENT_HALF_LIFE_DAYS:g})`: half-life {ENGAGEMENT_HALF_LIFE_DAYS:g} days.", window=30),
    _f("app_opens_7d", "int", 7, "app.opened", 0, "App opens in the last 7 days.", window=7),
    _f("tip_dismiss_rate_30d", "float", 30, "tip.reacted", 0.5,
       "`(dismissed + disliked + 1) / (reactions + 2)` over 30 days.", window=30, high=1),
)
CONTEXT_FEATURES: tuple[Feature, ...] = (
    _f("hour_of_day", "int", None, "request: context.now in its own offset; without it, or in `Z` (no offset "
       "told), the server's clock or that instant in the offset of the user's newest event (UTC for a user with "
       "none)", 12,
       "Local hour of the request.", freshness="jit", high=23),
    _f("day_of_week", "int", None, "request: context.now in its own offset; without it, or in `Z`, as "
       "`hour_of_day`", 0,
       "Local weekday of the request, Monday = 0.", freshness="jit", high=6),
    _f("context_task_count", "int", None, "request: context.tasks", 0,
       "Number of tasks in the request's task list.", freshness="jit"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
BY_NAME = {f.name: f for f in FEATURES + CONTEXT_FEATURES}

# Every window length a feature uses, in days: where the reach of a snapshot ends.
WINDOW_DAYS = (1, 7, 28, 30)
_WINDOW_MS = tuple(days * DAY_MS for days in WINDOW_DAYS)
_WINDOW_SPANS = np.array((0, *_WINDOW_MS), dtype=np.int64)  # `now` first, for one search per kind
_WINDOW_INDEX = {days: i for i, days in enumerate(WINDOW_DAYS)}
_WINDOWED = tuple((f.name, f.window_days * DAY_MS) for f in FEATURES if f.window_days)
_LONGEST_MS = max(span for _, span in _WINDOWED)


def _cut_short(state: UserState, now_ms: int, capped: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(name, first `now` at which it is exact again) of each feature whose window `(now - w, now]`
    reaches before the state's cutoff, or before the oldest record of a kind it reads that is at
    the fold's cap (`capped`, from `at_cap`): the fold dropped what lay there, so the value would
    be silently low. Empty whenever `now` is at or after the newest event's day (the horizon
    keeps 31 days for windows of at most 30) and no kind is at the cap, so /score's usual case
    costs two comparisons."""
    held_ms = now_ms - state.cutoff_ms + 1  # the longest window still wholly held
    cut = [] if held_ms >= _LONGEST_MS else [(name, now_ms + span - held_ms) for name, span in _WINDOWED
                                             if span > held_ms]
    for kind, oldest_ms in capped:
        cut += [(name, oldest_ms + span) for name, span, kinds in _REACH if kind in kinds and now_ms - span < oldest_ms]
    return cut


class _Evaluation:
    """Evaluates every profile feature of one user at `now` (ms), vectorised over the logs.

    Times are compared relative to the state's `base_ms` (as the logs keep them); each
    kind's records up to `now` are a numpy view, and windows are index ranges found by
    binary search, so a feature costs a few microseconds, not a loop over events.
    """

    def __init__(self, state: UserState, now: int) -> None:
        self.state, self.now, self.base = state, now, state.base_ms
        self.rel = now - state.base_ms
        self.records = {kind: state.records(kind) for kind in KIND_NAMES}
        self.stamps = {kind: records["ts"].astype(np.int64) for kind, records in self.records.items()}
        # One binary search per kind finds `now` and every window's start (`lo`), not one per feature.
        edges = self.rel - _WINDOW_SPANS
        self.hi: dict[str, int] = {}
        self._lows: dict[str, list[int]] = {}  # per kind, in WINDOW_DAYS order
        for kind, stamps in self.stamps.items():
            hi, *lows = stamps.searchsorted(edges, "right").tolist()
            self.hi[kind] = hi
            self._lows[kind] = lows
        self._open: dict[int, int] | None = None
        self._reactions: list[int] | None = None
        # Windows reaching before what the fold still holds (a `now` long before the newest
        # event): their features are unknown, and exact again from the `now` given.
        capped = at_cap(state)
        self.cut = dict(_cut_short(state, now, capped))
        # Where the streak's last day must begin to be known empty: a signal kind at the cap may
        # have had records on an earlier day.
        self.signals_held_from = max([state.cutoff_ms, *(oldest + 1 for kind, oldest in capped if kind in SIGNAL_KINDS)])
        # Kinds with no record at or before `now`: at an earlier `now` (`?at=`, a backfill), one whose first event
        # came later read as a known 0, though the answer given at that `now` was the fallback, flagged.
        self._unsourced = {kind for kind, hi in self.hi.items() if not hi}

    def latest(self, kind: str) -> int | None:
        hi = self.hi[kind]
        return int(self.stamps[kind][hi - 1]) + self.base if hi else None

    def lo(self, kind: str, days: int) -> int:
        """The index of the kind's first event in `(now - days, now]`."""
        index = _WINDOW_INDEX.get(days)
        if index is None:
            return int(self.stamps[kind].searchsorted(self.rel - days * DAY_MS, "right"))
        return self._lows[kind][index]

    def count(self, kind: str, days: int) -> int:
        return self.hi[kind] - self.lo(kind, days)

    def ts(self, kind: str) -> np.ndarray:
        """Times up to `now`, relative to `base`."""
        return self.stamps[kind][: self.hi[kind]]

    def col(self, kind: str, name: str) -> np.ndarray:
        return self.records[kind][name][: self.hi[kind]]

    def value(self, name: str) -> tuple[Any, bool]:
        """(value, is a fallback). A feature whose source events the fold holds none of at or
        before `now` is unknown rather than 0: the app may not publish them (only feedback, say),
        and the caller's `profile_features` value is then the one to use."""
        unsourced = self._unsourced
        if name in self.cut or (unsourced and unsourced >= SOURCE_KINDS[name]):
            return BY_NAME[name].fallback, True
        return getattr(self, name)()

    def tasks_created_7d(self) -> tuple[int, bool]:
        return self.count("task.created", 7), False

    def tasks_completed_7d(self) -> tuple[int, bool]:
        return self.count("task.completed", 7), False

    def completion_rate_7d(self) -> tuple[float, bool]:
        return (self.count("task.completed", 7) + 1) / (self.count("task.created", 7) + 2), False

    def preferred_hour(self) -> tuple[int, bool]:
        hours = self.col("task.completed", "local_hour")[self.lo("task.completed", 28):]
        if not len(hours):
            return BY_NAME["preferred_hour"].fallback, True
        return int(np.argmax(np.bincount(hours, minlength=24))), False  # argmax: the first, i.e. earliest, maximum

    def tip_volume_24h(self) -> tuple[int, bool]:
        return self.count("tip.shown", 1), False

    def _reaction_counts(self) -> list[int]:
        """Reactions in 30 days, counted per reaction code (acted, liked, snoozed, dismissed, disliked)."""
        if self._reactions is None:
            codes = self.col("tip.reacted", "reaction")[self.lo("tip.reacted", 30):]
            self._reactions = np.bincount(codes, minlength=5).tolist()
        return self._reactions

    def tip_positive_rate_30d(self) -> tuple[float, bool]:
        counts = self._reaction_counts()
        return (sum(counts[c] for c in POSITIVE_REACTIONS) + 1) / (sum(counts) + 2), False

    def tip_dismiss_rate_30d(self) -> tuple[float, bool]:
        counts = self._reaction_counts()
        return (sum(counts[c] for c in NEGATIVE_REACTIONS) + 1) / (sum(counts) + 2), False

    def seconds_since_active(self) -> tuple[float, bool]:
        stamps = [t for t in (self.latest(k) for k in SIGNAL_KINDS) if t is not None]
        if not stamps:
            return BY_NAME["seconds_since_active"].fallback, True
        return (self.now - max(stamps)) / 1000, False

    def _open_tasks(self) -> dict[int, int]:
        """Open task fingerprint -> due (s; NO_DUE or ZERO_DUE for none), as of `now`.

        Plain sets and dicts: for the few hundred tasks a user has, they beat numpy's set operations.
        """
        if self._open is not None:
            return self._open
        # Closures and reschedules are read from the same 30 days as creations, not from all the fold
        # holds: what it holds ends at a cutoff set by the newest event, so an unrelated later event
        # moved it and reopened (or re-dated) a task closed 31 days back and re-created since.
        lo = self.lo("task.created", 30)
        closed = set(self.col("task.completed", "task")[self.lo("task.completed", 30):].tolist())
        closed.update(self.col("task.deleted", "task")[self.lo("task.deleted", 30):].tolist())
        created = self.records["task.created"][lo : self.hi["task.created"]]
        due_of = {task: due for task, due in zip(created["task"].tolist(), created["due_s"].tolist()) if task not in closed}
        if due_of:
            moved = self.records["task.rescheduled"][self.lo("task.rescheduled", 30) : self.hi["task.rescheduled"]]
            for task, due in zip(moved["task"].tolist(), moved["due_s"].tolist()):  # in time order: the latest wins
                if task in due_of:
                    due_of[task] = due
        self._open = due_of
        return due_of

    def open_tasks(self) -> tuple[int, bool]:
        return len(self._open_tasks()), False

    def overdue_tasks(self) -> tuple[int, bool]:
        now_s = self.now / 1000
        return sum(1 for due in self._open_tasks().values() if ZERO_DUE < due <= now_s), False

    def postpone_rate_30d(self) -> tuple[float, bool]:
        return self.count("task.rescheduled", 30) / (self.count("task.created", 30) + 1), False

    def active_day_streak(self) -> tuple[int, bool]:
        # base is a whole day (UTC), so local day numbers can be taken relative to it.
        offset_ms = self.state.offset_s * 1000
        today = (self.rel + offset_ms) // DAY_MS
        days = today - (np.concatenate([self.ts(kind) for kind in SIGNAL_KINDS]) + offset_ms) // DAY_MS
        # By days ago, 0 = today, the last always False. Only as far back as the cap: sized by the
        # oldest event, a `now` in the year 9999 (`?at=`) built ~2.9 million days, 30 ms and tens of MB.
        active = np.zeros(STREAK_CAP + 2, dtype=bool)
        active[days[(days >= 0) & (days <= STREAK_CAP)]] = True
        flags = active.tolist()
        day = 0 if flags[0] else 1  # a streak survives until today is over
        streak = 0
        while flags[day]:
            streak, day = streak + 1, day + 1
        # Capped: the fold's horizon is in UTC days, so with an offset a local day it holds in part
        # (31-32 days back) could add a 33rd.
        if streak >= STREAK_CAP:
            return STREAK_CAP, False
        # The day that ended the streak shows no signal, which is known only if the fold holds it
        # whole, from its local midnight: else pruned events may have continued the streak. (Judged
        # by the local day the cutoff falls in, a streak ending on a day held whole at offset 0 was a
        # fallback, and one ending on a day held in part 31 days back was taken as exact.)
        if (today - day) * DAY_MS - offset_ms < self.signals_held_from - self.base:
            return BY_NAME["active_day_streak"].fallback, True
        return streak, False

    def mean_hours_to_complete_28d(self) -> tuple[float, bool]:
        lo, hi = self.lo("task.completed", 28), self.hi["task.completed"]
        # Creations in 30 days, not all the fold holds: its cutoff follows the newest event, so an
        # unrelated later event dropped a creation and changed the mean at the same `now`.
        start, end = self.lo("task.created", 30), self.hi["task.created"]
        if lo == hi or start == end:
            return BY_NAME["mean_hours_to_complete_28d"].fallback, True
        # The log is in time order and the sort is stable, so among a task's equal entries the
        # leftmost (where searchsorted lands) is its earliest creation.
        created = self.records["task.created"]["task"][start:end]
        order = created.argsort(kind="stable")
        tasks = created[order]
        done, done_at = self.records["task.completed"]["task"][lo:hi], self.stamps["task.completed"][lo:hi]
        at = np.minimum(tasks.searchsorted(done), end - start - 1)
        created_at = self.stamps["task.created"][start + order[at]]
        known = (tasks[at] == done) & (created_at <= done_at)
        spans = done_at[known] - created_at[known]
        if not len(spans):
            return BY_NAME["mean_hours_to_complete_28d"].fallback, True
        return int(spans.sum()) / len(spans) / HOUR_MS, False

    def engagement_score(self) -> tuple[float, bool]:
        stamps = np.concatenate([self.ts(k)[self.lo(k, 30):] for k in SIGNAL_KINDS])
        if not len(stamps):
            return 0.0, False
        return float(np.exp2(-(self.rel - stamps) / (ENGAGEMENT_HALF_LIFE_DAYS * DAY_MS)).sum()), False

    def app_opens_7d(self) -> tuple[int, bool]:
        return self.count("app.opened", 7), False


# Each profile feature's event kinds (its `source`), as the fold names them.
SOURCE_KINDS: dict[str, frozenset[str]] = {
    f.name: frozenset(SIGNAL_KINDS) if f.source == "all signals" else frozenset(s.strip() for s in f.source.split(","))
    for f in FEATURES
}


# How far before `now` each feature reads, and from which kinds, for a kind at the fold's cap: its
# window, or for the latest signal only `now` itself (the streak judges the day that ends it).
_REACH = tuple((f.name, (f.window_days or 0) * DAY_MS, SOURCE_KINDS[f.name]) for f in FEATURES
               if f.name != "active_day_streak")


def evaluate(state: UserState | None, now_ms: int) -> dict[str, FeatureValue]:
    """Every profile feature at `now_ms`; a user never seen gets fallbacks, flagged.

    So does a feature whose window reaches before what the fold still holds of the user (a
    `now` long before their newest event): its exact value is not known, so it is treated as
    unknown (fallback, not fresh), and /score takes the caller's value for it when given.
    """
    if state is None:
        return {f.name: FeatureValue(f.fallback, None, False, True) for f in FEATURES}
    evaluation = _Evaluation(state, now_ms)
    latest = {kind: evaluation.latest(kind) for kind in KIND_NAMES}
    values: dict[str, FeatureValue] = {}
    for feature in FEATURES:
        value, used_fallback = evaluation.value(feature.name)
        stamps = [latest[k] for k in SOURCE_KINDS[feature.name] if latest[k] is not None]
        age_s = (now_ms - max(stamps)) / 1000 if stamps else None
        # A fallback is not the user's data, however recent their events: never fresh (docs/features.md).
        fresh = not used_fallback and age_s is not None and feature.ttl_s is not None and age_s <= feature.ttl_s
        values[feature.name] = FeatureValue(value, age_s, fresh, used_fallback)
    return values


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Profile feature values at `at_ms`, exact for any `now` in `[at_ms, until_ms)` while the state holds.

    Between two events, most features only change when `now` crosses an edge: an event
    entering or leaving a window, a due time passing, a local midnight. `until_ms` is the
    first such edge, so `/score` can reuse a snapshot and still serve exact windows. The two
    features that change continuously are carried forward exactly: `seconds_since_active`
    from the latest signal, `engagement_score` by its decay (all its terms share the factor).

    >>> from streams.events import parse_event
    >>> from streams.fold import UserState, apply
    >>> state = UserState()
    >>> _ = apply(state, parse_event(b'{"id": "a", "type": "app.opened", "user_id": "u", "ts": "2026-11-26T09:00:00Z"}'))
    >>> snap = snapshot(state, state.newest_ms)
    >>> (snap.until_ms - snap.at_ms) // HOUR_MS  # the streak's local midnight comes first
    15
    >>> snap.values_at(snap.at_ms + HOUR_MS)["seconds_since_active"]
    3600.0
    """

    at_ms: int
    until_ms: int
    values: dict[str, int | float]
    fallbacks: frozenset[str]
    latest_signal_ms: int | None

    def covers(self, now_ms: int) -> bool:
        return self.at_ms <= now_ms < self.until_ms

    def values_at(self, now_ms: int) -> dict[str, int | float]:
        """The values at `now_ms`; only meaningful where `covers(now_ms)`."""
        elapsed = now_ms - self.at_ms
        if elapsed == 0:
            return self.values
        values = dict(self.values)
        if self.latest_signal_ms is not None and "seconds_since_active" not in self.fallbacks:  # cut short: stays so
            values["seconds_since_active"] = (now_ms - self.latest_signal_ms) / 1000
        values["engagement_score"] = values["engagement_score"] * 2.0 ** (-elapsed / (ENGAGEMENT_HALF_LIFE_DAYS * DAY_MS))
        return values


def snapshot(state: UserState, now_ms: int) -> Snapshot:
    """Evaluate every profile feature at `now_ms`, and find how long the values hold."""
    evaluation = _Evaluation(state, now_ms)
    values: dict[str, int | float] = {}
    fallbacks = []
    # It ends where a window cut short is whole again, too.
    until = min([_valid_until(evaluation), *evaluation.cut.values()])
    for feature in FEATURES:
        value, used_fallback = evaluation.value(feature.name)
        values[feature.name] = value
        if used_fallback:
            fallbacks.append(feature.name)
    signals = [t for t in (evaluation.latest(k) for k in SIGNAL_KINDS) if t is not None]
    return Snapshot(now_ms, until, values, frozenset(fallbacks), max(signals) if signals else None)


def _valid_until(evaluation: _Evaluation) -> int:
    """The first `now` after `evaluation.now` at which some profile feature may change (continuous ones aside)."""
    now, offset_ms = evaluation.now, evaluation.state.offset_s * 1000
    until = ((now + offset_ms) // DAY_MS + 1) * DAY_MS - offset_ms  # active_day_streak: the next local midnight
    # Relative to the logs' base until the end: plain ints from `.item`, one pass per kind (this
    # runs on every profile cache miss of /score).
    until -= evaluation.base
    for kind, stamps in evaluation.stamps.items():
        hi = evaluation.hi[kind]
        if hi < len(stamps):
            until = min(until, stamps.item(hi))  # a later event comes into view
        if not hi:
            continue
        for lo, span in zip(evaluation._lows[kind], _WINDOW_MS):
            if lo < hi:
                until = min(until, stamps.item(lo) + span)  # the oldest event in the window leaves it
    until += evaluation.base
    for due_s in evaluation._open_tasks().values():
        if due_s > ZERO_DUE and due_s * 1000 > now:
            until = min(until, due_s * 1000)  # an open task falls overdue
    return until


def context_features(local_hour: int, local_weekday: int, tasks: list[Any] | None) -> dict[str, int]:
    """The request-time features; callers pass `now` already in the offset to read them in."""
    return {"hour_of_day": local_hour, "day_of_week": local_weekday, "context_task_count": len(tasks or ())}


def features_markdown() -> str:
    """docs/features.md, generated from the declarations."""
    lines = [
        "# Features",
        "",
        "Generated from `streams/features.py` by `tipstream docs`; do not edit by hand.",
        "Windows are `(now - w, now]` over event time. `batched`: folded from the streams ahead of",
        "the request and evaluated at `now`; `jit`: computed from the request, never cached.",
        "Times are kept to the millisecond, rounded down, events' and `now` alike: an event at",
        "08:00:00.0005 counts in a window ending at 08:00:00.000.",
        "",
        "The fold keeps each user's events within 31 days of their newest event. At an earlier `now`",
        "(`?at=`, `context.now`, a backfill), a window that reaches before that is not known whole: the",
        "feature takes its fallback, flagged `fallback` and not `fresh` (and /score takes the caller's",
        "`profile_features` value for it). At or after the newest event, every window is whole.",
        "A feature whose source events the fold holds none of for the user at or before `now` (an app that",
        "publishes feedback but no task events, say; at an earlier `now`, a kind whose first event came",
        "later) is unknown too: its fallback, flagged, and the caller's value.",
        "",
        f"A user's state keeps at most {MAX_RECORDS_PER_KIND:,} events of one kind in those 31 days, the",
        "newest: a publisher sending one user's events in a loop otherwise grew it, and each evaluation of",
        "it, without bound. A feature reading before the oldest event kept of a kind at that cap takes its",
        "fallback, flagged, as above (`tipstream_users_at_event_cap` counts such users).",
        "",
        "A caller's `profile_features` value outside a feature's range is refused (422).",
        "",
        "| name | dtype | range | freshness | TTL | source | fallback | description |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in FEATURES + CONTEXT_FEATURES:
        ttl = "-" if f.ttl_s is None else f"{f.ttl_s / 86_400:g} d"
        lines.append(f"| `{f.name}` | {f.dtype} | {f.valid} | {f.freshness} | {ttl} | {f.source} | {f.fallback} | "
                     f"{f.description} |")
    return "\n".join(lines) + "\n"

