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

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from streams.fold import DAY_MS, SIGNAL_KINDS, Log, UserState

HOUR_MS = 3_600_000
ENGAGEMENT_HALF_LIFE_DAYS = 3.0
POSITIVE_REACTIONS = (0, 1)  # acted, liked
NEGATIVE_REACTIONS = (3, 4)  # dismissed, disliked


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    dtype: Literal["int", "float"]
    freshness: Literal["batched", "jit"]
    ttl_s: float | None
    source: str
    fallback: int | float
    description: str


@dataclass(frozen=True, slots=True)
class FeatureValue:
    value: int | float
    age_s: float | None
    fresh: bool
    fallback: bool


def _f(name: str, dtype: Any, ttl_days: float | None, source: str, fallback: Any, description: str, freshness: Any = "batched") -> Feature:
    return Feature(name, dtype, freshness, None if ttl_days is None else ttl_days * 86_400, source, fallback, description)


FEATURES: tuple[Feature, ...] = (
    _f("tasks_created_7d", "int", 7, "task.created", 0, "Tasks created in the last 7 days."),
    _f("tasks_completed_7d", "int", 7, "task.completed", 0, "Tasks completed in the last 7 days."),
    _f("completion_rate_7d", "float", 7, "task.created, task.completed", 0.5,
       "`(tasks_completed_7d + 1) / (tasks_created_7d + 2)`."),
    _f("preferred_hour", "int", 28, "task.completed", 9,
       "Local hour (0-23) with the most completions in 28 days; ties go to the earliest hour."),
    _f("tip_volume_24h", "int", 1, "tip.shown", 0, "Tips shown in the last 24 hours."),
    _f("tip_positive_rate_30d", "float", 30, "tip.reacted", 0.5,
       "`(acted + liked + 1) / (reactions + 2)` over 30 days."),
    _f("seconds_since_active", "float", 30, "all signals", 30 * 86_400.0,
       "`now` minus the time of the latest signal at or before `now`."),
    _f("open_tasks", "int", 30, "task.created, task.completed, task.deleted", 0,
       "Tasks created in the last 30 days and neither completed nor deleted by `now`."),
    _f("overdue_tasks", "int", 30, "task.created, task.rescheduled, task.completed, task.deleted", 0,
       "Open tasks whose due time (the latest reschedule, else the creation's `due`) is at or before `now`."),
    _f("postpone_rate_30d", "float", 30, "task.rescheduled, task.created", 0.0,
       "`reschedules / (tasks created + 1)` over 30 days."),
    _f("active_day_streak", "int", 2, "all signals", 0,
       "Consecutive local days (in the user's current offset) with any signal, ending today or yesterday; "
       "at most 31, the fold's horizon."),
    _f("mean_hours_to_complete_28d", "float", 28, "task.created, task.completed", 24.0,
       "Mean hours from creation to completion, over completions in 28 days whose creation is known."),
    _f("engagement_score", "float", 30, "all signals", 0.0,
       f"Sum over signals in 30 days of `0.5 ** (age_days / {ENGAGEMENT_HALF_LIFE_DAYS:g})`: half-life {ENGAGEMENT_HALF_LIFE_DAYS:g} days."),
    _f("app_opens_7d", "int", 7, "app.opened", 0, "App opens in the last 7 days."),
    _f("tip_dismiss_rate_30d", "float", 30, "tip.reacted", 0.5,
       "`(dismissed + disliked + 1) / (reactions + 2)` over 30 days."),
)
CONTEXT_FEATURES: tuple[Feature, ...] = (
    _f("hour_of_day", "int", None, "request: context.now in the user's offset", 12,
       "Local hour of the request.", freshness="jit"),
    _f("day_of_week", "int", None, "request: context.now in the user's offset", 0,
       "Local weekday of the request, Monday = 0.", freshness="jit"),
    _f("context_task_count", "int", None, "request: context.tasks", 0,
       "Number of tasks in the request's task list.", freshness="jit"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
BY_NAME = {f.name: f for f in FEATURES + CONTEXT_FEATURES}


def _span(log: Log, start_ms: int, end_ms: int) -> tuple[int, int]:
    """Index range of events in (start, end]."""
    return bisect_right(log.ts, start_ms), bisect_right(log.ts, end_ms)


def _count(log: Log, now: int, window_ms: int) -> int:
    lo, hi = _span(log, now - window_ms, now)
    return hi - lo


def _latest(logs: list[Log], now: int) -> int | None:
    best = None
    for log in logs:
        hi = bisect_right(log.ts, now)
        if hi and (best is None or log.ts[hi - 1] > best):
            best = log.ts[hi - 1]
    return best


class _Evaluation:
    """Evaluates every profile feature of one user at `now` (ms)."""

    def __init__(self, state: UserState, now: int) -> None:
        self.state, self.now, self.logs = state, now, state.logs

    def value(self, name: str) -> tuple[Any, bool]:
        return getattr(self, name)()

    def tasks_created_7d(self) -> tuple[int, bool]:
        return _count(self.logs["task.created"], self.now, 7 * DAY_MS), False

    def tasks_completed_7d(self) -> tuple[int, bool]:
        return _count(self.logs["task.completed"], self.now, 7 * DAY_MS), False

    def completion_rate_7d(self) -> tuple[float, bool]:
        return (self.tasks_completed_7d()[0] + 1) / (self.tasks_created_7d()[0] + 2), False

    def preferred_hour(self) -> tuple[int, bool]:
        log = self.logs["task.completed"]
        lo, hi = _span(log, self.now - 28 * DAY_MS, self.now)
        if lo == hi:
            return BY_NAME["preferred_hour"].fallback, True
        counts = np.bincount(np.frombuffer(log.cols[1], dtype=np.uint8)[lo:hi], minlength=24)
        return int(np.argmax(counts)), False  # argmax returns the first, i.e. earliest, maximum

    def tip_volume_24h(self) -> tuple[int, bool]:
        return _count(self.logs["tip.shown"], self.now, DAY_MS), False

    def _reactions_30d(self) -> np.ndarray:
        log = self.logs["tip.reacted"]
        lo, hi = _span(log, self.now - 30 * DAY_MS, self.now)
        return np.frombuffer(log.cols[1], dtype=np.uint8)[lo:hi]

    def tip_positive_rate_30d(self) -> tuple[float, bool]:
        codes = self._reactions_30d()
        return (int(np.isin(codes, POSITIVE_REACTIONS).sum()) + 1) / (len(codes) + 2), False

    def tip_dismiss_rate_30d(self) -> tuple[float, bool]:
        codes = self._reactions_30d()
        return (int(np.isin(codes, NEGATIVE_REACTIONS).sum()) + 1) / (len(codes) + 2), False

    def seconds_since_active(self) -> tuple[float, bool]:
        latest = _latest([self.logs[k] for k in SIGNAL_KINDS], self.now)
        if latest is None:
            return BY_NAME["seconds_since_active"].fallback, True
        return (self.now - latest) / 1000, False

    def _open_tasks(self) -> dict[int, int]:
        """Open task fingerprint -> due (s, 0 for none), as of `now`."""
        now = self.now
        created = self.logs["task.created"]
        lo, hi = _span(created, now - 30 * DAY_MS, now)
        due_of = {created.cols[0][i]: created.cols[1][i] for i in range(lo, hi)}
        if not due_of:
            return due_of
        for kind in ("task.completed", "task.deleted"):
            log = self.logs[kind]
            for i in range(bisect_right(log.ts, now)):
                due_of.pop(log.cols[0][i], None)
        moved = self.logs["task.rescheduled"]
        for i in range(bisect_right(moved.ts, now)):  # in time order, so the latest wins
            task = moved.cols[0][i]
            if task in due_of:
                due_of[task] = moved.cols[1][i]
        return due_of

    def open_tasks(self) -> tuple[int, bool]:
        return len(self._open_tasks()), False

    def overdue_tasks(self) -> tuple[int, bool]:
        now_s = self.now / 1000
        return sum(1 for due in self._open_tasks().values() if due and due <= now_s), False

    def postpone_rate_30d(self) -> tuple[float, bool]:
        window = 30 * DAY_MS
        moved = _count(self.logs["task.rescheduled"], self.now, window)
        return moved / (_count(self.logs["task.created"], self.now, window) + 1), False

    def active_day_streak(self) -> tuple[int, bool]:
        offset_ms = self.state.offset_s * 1000
        stamps = [np.frombuffer(self.logs[k].ts, dtype=np.int64)[: bisect_right(self.logs[k].ts, self.now)]
                  for k in SIGNAL_KINDS]
        days = np.unique((np.concatenate(stamps) + offset_ms) // DAY_MS)
        today = (self.now + offset_ms) // DAY_MS
        if not len(days) or days[-1] < today - 1:
            return 0, False
        # Length of the run of consecutive days that ends at the latest active day.
        gaps = np.nonzero(np.diff(days) != 1)[0]
        return int(len(days) - (gaps[-1] + 1 if len(gaps) else 0)), False

    def mean_hours_to_complete_28d(self) -> tuple[float, bool]:
        created, done = self.logs["task.created"], self.logs["task.completed"]
        lo, hi = _span(done, self.now - 28 * DAY_MS, self.now)
        created_at: dict[int, int] = {}
        for i in range(bisect_right(created.ts, self.now)):
            created_at.setdefault(created.cols[0][i], created.ts[i])
        spans = [done.ts[i] - created_at[done.cols[0][i]] for i in range(lo, hi)
                 if created_at.get(done.cols[0][i], done.ts[i] + 1) <= done.ts[i]]
        if not spans:
            return BY_NAME["mean_hours_to_complete_28d"].fallback, True
        return sum(spans) / len(spans) / HOUR_MS, False

    def engagement_score(self) -> tuple[float, bool]:
        total = 0.0
        scale = ENGAGEMENT_HALF_LIFE_DAYS * DAY_MS
        for kind in SIGNAL_KINDS:
            log = self.logs[kind]
            lo, hi = _span(log, self.now - 30 * DAY_MS, self.now)
            if hi > lo:
                ages = self.now - np.frombuffer(log.ts, dtype=np.int64)[lo:hi]
                total += float(np.exp2(-ages / scale).sum())
        return total, False

    def app_opens_7d(self) -> tuple[int, bool]:
        return _count(self.logs["app.opened"], self.now, 7 * DAY_MS), False


_SOURCES: dict[str, tuple[str, ...]] = {
    f.name: tuple(SIGNAL_KINDS) if f.source == "all signals" else tuple(s.strip() for s in f.source.split(","))
    for f in FEATURES
}


def evaluate(state: UserState | None, now_ms: int) -> dict[str, FeatureValue]:
    """Every profile feature at `now_ms`; a user never seen gets fallbacks, flagged."""
    if state is None:
        return {f.name: FeatureValue(f.fallback, None, False, True) for f in FEATURES}
    evaluation = _Evaluation(state, now_ms)
    values: dict[str, FeatureValue] = {}
    for feature in FEATURES:
        value, used_fallback = evaluation.value(feature.name)
        latest = _latest([state.logs[k] for k in _SOURCES[feature.name]], now_ms)
        age_s = None if latest is None else (now_ms - latest) / 1000
        fresh = age_s is not None and feature.ttl_s is not None and age_s <= feature.ttl_s
        values[feature.name] = FeatureValue(value, age_s, fresh, used_fallback)
    return values


def context_features(local_hour: int, local_weekday: int, tasks: list[Any] | None) -> dict[str, int]:
    """The request-time features; callers pass `now` already in the user's offset."""
    return {"hour_of_day": local_hour, "day_of_week": local_weekday, "context_task_count": len(tasks or ())}


def features_markdown() -> str:
    """docs/features.md, generated from the declarations."""
    lines = [
        "# Features",
        "",
        "Generated from `streams/features.py` by `tipstream docs`; do not edit by hand.",
        "Windows are `(now - w, now]` over event time. `batched`: folded from the streams ahead of",
        "the request and evaluated at `now`; `jit`: computed from the request, never cached.",
        "",
        "| name | dtype | freshness | TTL | source | fallback | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FEATURES + CONTEXT_FEATURES:
        ttl = "-" if f.ttl_s is None else f"{f.ttl_s / 86_400:g} d"
        lines.append(f"| `{f.name}` | {f.dtype} | {f.freshness} | {ttl} | {f.source} | {f.fallback} | {f.description} |")
    return "\n".join(lines) + "\n"

