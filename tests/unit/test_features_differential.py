"""Differential: every profile feature against a direct computation over the raw event list,
written from DESIGN.md ("Core profile features", "Wire contract") and the declarations'
descriptions (docs/features.md), not from the fold.

Histories put events on every window's edge to the millisecond, at `now` and after it, in
offsets from -12:00 to +14:00 (and +05:45), arriving shuffled and redelivered; task
reschedules and deletions of tasks never created; every reaction; feedback that is newer than
any signal; and runs of daily signals long enough to reach the fold's horizon. Each state is
also built in two halves with a checkpoint (to_bytes / from_bytes) between, and evaluated at
`now`s before the newest event, where the fold has pruned what lay past its horizon.

A value is either the reference's, exactly, or its declared fallback, flagged, where the
declarations say so: no data, or (only before the newest event) a window reaching past what
the fold holds; the streak, past a local day the fold holds only in part.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.events import parse_event
from streams.features import FEATURE_NAMES, FEATURES, SOURCE_KINDS, evaluate
from streams.fold import UserState, apply
from tests.unit.test_feature_reference import completion_hours

MS, DAY, EPOCH = timedelta(milliseconds=1), timedelta(days=1), datetime(1970, 1, 1, tzinfo=UTC)
SIGNALS = ("task.created", "task.completed", "task.rescheduled", "task.deleted", "app.opened", "tip.shown")
KINDS = (*SIGNALS, "tip.reacted")
REACTIONS = ("acted", "liked", "snoozed", "dismissed", "disliked")
OFFSETS = tuple(timedelta(minutes=m) for m in (0, 14 * 60, -12 * 60, 5 * 60 + 45, -(9 * 60 + 30), 60))
EDGE_DAYS = (0, 1, 7, 28, 30, 31, 32)
STREAK_CAP = 32  # "at most 32" (active_day_streak's description)
BY_NAME = {f.name: f for f in FEATURES}
ANCHOR = datetime(2026, 11, 26, 10, 17, 23, 456_000, tzinfo=UTC)


def _ms(at: datetime) -> int:
    return (at - EPOCH) // MS


def _at(ms: int) -> datetime:
    return EPOCH + ms * MS


@st.composite
def histories(draw: Any) -> list[dict[str, Any]]:
    """Raw events in arrival order (ids unique; redeliveries are exact copies)."""
    anchor = ANCHOR + draw(st.integers(0, 2 * 86_400_000)) * MS
    zones = draw(st.lists(st.sampled_from(OFFSETS), min_size=1, max_size=3))
    tasks = [f"t-{i}" for i in range(draw(st.integers(1, 5)))]
    raw: list[dict[str, Any]] = []
    used_due: set[tuple[str, str, int]] = set()

    def add(kind: str, at: datetime, zone: timedelta, **data: Any) -> None:
        raw.append({"id": f"evt-{len(raw)}", "type": kind, "user_id": "u",
                    "ts": at.astimezone(timezone(zone)).isoformat(timespec="milliseconds"), "data": data})

    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(KINDS))
        how = draw(st.sampled_from(("edge", "edge", "future", "past")))
        if how == "edge":
            at = anchor - draw(st.sampled_from(EDGE_DAYS)) * DAY + draw(st.sampled_from((-1, 0, 1))) * MS
        elif how == "future":
            at = anchor + draw(st.integers(1, 3 * 86_400_000)) * MS
        else:
            at = anchor - draw(st.integers(0, 40 * 86_400_000)) * MS
        zone = draw(st.sampled_from(zones))
        task = draw(st.sampled_from([*tasks, "never-created"]))
        # Whole seconds: the fold keeps dues to the second (overdue_tasks' description).
        due = (anchor.replace(microsecond=0) + draw(st.sampled_from((0, -1, 1, -3600, 7200, -86_400 * 3, 86_400 * 2))) * timedelta(seconds=1))
        due_text = due.astimezone(timezone(draw(st.sampled_from(OFFSETS)))).isoformat()
        if kind in ("task.created", "task.rescheduled"):
            if (kind, task, _ms(at)) in used_due:  # two dues for one task at one instant: "latest" is undefined
                continue
            used_due.add((kind, task, _ms(at)))
        data = {"task.created": {"task_id": task, **({"due": due_text} if draw(st.booleans()) else {})},
                "task.completed": {"task_id": task}, "task.deleted": {"task_id": task},
                "task.rescheduled": {"task_id": task, "due": due_text}, "app.opened": {},
                "tip.shown": {"tip_id": "tip-1"},
                "tip.reacted": {"tip_id": "tip-1", "reaction": draw(st.sampled_from(REACTIONS))}}[kind]
        add(kind, at, zone, **data)
    if draw(st.booleans()):  # a run of daily signals, long enough to reach the horizon
        zone = draw(st.sampled_from(zones))
        local_hour = draw(st.integers(0, 23))
        end = anchor - draw(st.integers(0, 3)) * DAY
        for d in range(draw(st.integers(25, 40))):
            local = (end - d * DAY).astimezone(timezone(zone)).replace(hour=local_hour, minute=30)
            if draw(st.integers(0, 30)) != 0:  # now and then a gap
                kind = draw(st.sampled_from(("app.opened", "tip.shown")))
                add(kind, local, zone, **({"tip_id": "tip-1"} if kind == "tip.shown" else {}))
    if draw(st.booleans()):  # feedback newer than every signal: it moves the horizon, not the activity
        add("tip.reacted", anchor + draw(st.integers(0, 45)) * DAY, zones[0], tip_id="tip-1",
            reaction=draw(st.sampled_from(REACTIONS)))
    if not raw:
        add("app.opened", anchor, zones[0])
    raw += draw(st.lists(st.sampled_from(raw), max_size=6))  # redelivered
    return draw(st.permutations(raw))


def reference(raw: list[dict[str, Any]], now: datetime, zone: timedelta, kept_from: datetime) -> dict[str, Any]:
    """Every feature at `now` over the whole raw list; None: no data (the fallback). The streak also
    comes as seen over what the fold holds (`kept_from` on), to tell where it can be known."""
    seen: set[str] = set()
    past = []
    for e in raw:
        if e["id"] in seen:
            continue
        seen.add(e["id"])
        at = datetime.fromisoformat(e["ts"])
        if at <= now:
            past.append({**e, "at": at})
    past.sort(key=lambda e: e["at"])

    def win(kind: str, days: int) -> list[dict[str, Any]]:
        return [e for e in past if e["type"] == kind and now - days * DAY < e["at"] <= now]

    created, completed = len(win("task.created", 7)), len(win("task.completed", 7))
    hours = Counter(e["at"].hour for e in win("task.completed", 28))  # the event's own offset
    best = max(hours.values(), default=0)
    reactions = Counter(e["data"]["reaction"] for e in win("tip.reacted", 30))
    n_reactions = sum(reactions.values())
    signals = [e["at"] for e in past if e["type"] in SIGNALS]
    closed = {e["data"]["task_id"] for e in win("task.completed", 30) + win("task.deleted", 30)}
    due: dict[str, Any] = {}
    for e in win("task.created", 30):
        if e["data"]["task_id"] not in closed:
            due[e["data"]["task_id"]] = e["data"].get("due")
    for e in win("task.rescheduled", 30):  # time order: the latest wins
        if e["data"]["task_id"] in due:
            due[e["data"]["task_id"]] = e["data"]["due"]
    local = timezone(zone)

    def streak_of(times: list[datetime]) -> tuple[int, datetime]:
        """(the streak, the local midnight starting the day that ended it)."""
        active = {t.astimezone(local).date() for t in times}
        day = now.astimezone(local).date()
        if day not in active:
            day -= DAY
        streak = 0
        while day in active:
            streak, day = streak + 1, day - DAY
        return streak, datetime.combine(day, datetime.min.time(), local)
    spans = completion_hours(win("task.completed", 28), win("task.created", 30))
    return {
        "tasks_created_7d": created,
        "tasks_completed_7d": completed,
        "completion_rate_7d": (completed + 1) / (created + 2),
        "preferred_hour": min(h for h in range(24) if hours[h] == best) if hours else None,
        "tip_volume_24h": len(win("tip.shown", 1)),
        "tip_positive_rate_30d": (reactions["acted"] + reactions["liked"] + 1) / (n_reactions + 2),
        "seconds_since_active": (now - max(signals)) / timedelta(seconds=1) if signals else None,
        "open_tasks": len(due),
        "overdue_tasks": sum(1 for d in due.values() if d is not None and datetime.fromisoformat(d) <= now),
        "postpone_rate_30d": len(win("task.rescheduled", 30)) / (len(win("task.created", 30)) + 1),
        "active_day_streak": (streak_of(signals)[0], streak_of([t for t in signals if t >= kept_from])),
        "mean_hours_to_complete_28d": sum(spans) / len(spans) if spans else None,
        "engagement_score": sum(0.5 ** ((now - t) / DAY / 3) for t in signals if now - 30 * DAY < t),
        "app_opens_7d": len(win("app.opened", 7)),
        "tip_dismiss_rate_30d": (reactions["dismissed"] + reactions["disliked"] + 1) / (n_reactions + 2),
    }


def fold(events: list[Any]) -> UserState:
    state = UserState()
    for event in events:
        apply(state, event)
    return state


def check(state: UserState, raw: list[dict[str, Any]], now_ms: int) -> None:
    stamps = [datetime.fromisoformat(e["ts"]) for e in raw]
    newest = max(stamps)
    zone = max(t.utcoffset() for t in stamps if t == newest)  # type: ignore[type-var]  # same instant: the larger
    assert state.newest_ms == _ms(newest) and state.offset_s == zone.total_seconds()
    cutoff = _at(state.cutoff_ms)
    assert newest - cutoff >= 31 * DAY  # "within 31 days of their newest event"
    now = _at(now_ms)
    want, got = reference(raw, now, zone, cutoff), evaluate(state, now_ms)
    assert set(got) == set(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        value, expected, feature = got[name], want[name], BY_NAME[name]
        where = (name, now - newest, value, expected)
        if not any((state.times(kind) <= now_ms).any() for kind in SOURCE_KINDS[name]):
            assert value.fallback, where  # none of its events held at or before `now`: unknown (the app may not publish them)
        elif name == "active_day_streak":
            true_streak, (held_streak, stop_midnight) = expected
            # Unknown only while what the fold holds is short of the cap and was stopped by a day it
            # does not hold whole; at the cap, or stopped by a day held whole, it is the true one, capped.
            if held_streak >= STREAK_CAP or stop_midnight >= cutoff:
                assert min(held_streak, STREAK_CAP) == min(true_streak, STREAK_CAP)  # the reference's own check
                assert not value.fallback and value.value == min(true_streak, STREAK_CAP), where
            else:
                assert value.fallback, where
        elif value.fallback:
            if feature.window_days is not None:
                cut_short = now - feature.window_days * DAY + MS < cutoff
                assert cut_short or expected is None, where
                assert now_ms < state.newest_ms or expected is None, where  # at/after newest: every window whole
            else:  # seconds_since_active: no signal, or the latest up to `now` was pruned
                assert expected is None or now - expected * timedelta(seconds=1) < cutoff, where
        else:
            assert expected is not None and math.isclose(value.value, expected, rel_tol=1e-9, abs_tol=1e-9), where
        if value.fallback:
            assert value.value == feature.fallback and not value.fresh, where


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(histories(), st.data())
def test_every_feature_matches_a_direct_computation_and_a_checkpoint_changes_nothing(
        raw: list[dict[str, Any]], data: st.DataObject) -> None:
    events = [parse_event(orjson.dumps(e)) for e in raw]
    whole = fold(events)
    cut = data.draw(st.integers(0, len(events)), label="checkpoint after")
    halves = UserState.from_bytes(fold(events[:cut]).to_bytes())
    for event in events[cut:]:
        apply(halves, event)
    assert halves.to_bytes() == whole.to_bytes()
    newest = whole.newest_ms
    anchor = _ms(ANCHOR)
    nows = {newest, newest + 1, newest - 1, newest + 86_400_000, anchor, anchor + 1,
            newest - data.draw(st.integers(0, 45 * 86_400_000), label="before newest"),
            whole.cutoff_ms + 30 * 86_400_000 - 1, whole.cutoff_ms + 30 * 86_400_000 - 2}
    for now_ms in sorted(nows):
        check(whole, raw, now_ms)
        assert evaluate(halves, now_ms) == evaluate(whole, now_ms)


def _opened(i: int, at: datetime) -> Any:
    return parse_event(orjson.dumps({"id": f"o{i}", "type": "app.opened", "user_id": "u", "ts": at.isoformat()}))


def test_a_streak_is_at_most_32_days_in_any_offset() -> None:
    # +14:00: the newest event, 12:00 UTC, is local 02:00 the next day, so the fold (pruning by UTC
    # day) holds 32 whole local days and 10 hours of a 33rd: the streak read 33.
    zone = timezone(timedelta(hours=14))
    newest = datetime(2026, 11, 26, 12, tzinfo=UTC).astimezone(zone)
    state = fold([_opened(d, (newest - d * DAY).replace(hour=15) if d else newest) for d in range(40)])
    for days_later in (0, 1):  # ending today, and yesterday
        value = evaluate(state, state.newest_ms + days_later * DAY // MS)["active_day_streak"]
        assert (value.value, value.fallback) == (32, False), days_later


def test_a_streak_ended_by_a_day_held_in_part_is_a_fallback_not_short() -> None:
    # -12:00: the newest event, 06:00 UTC, is local 18:00 the day before, and the fold holds the local
    # day 31 back only from 12:00. Its signal at 06:00 was pruned: the streak is 32, and read 31, exact.
    zone = timezone(timedelta(hours=-12))
    newest = datetime(2026, 11, 26, 6, tzinfo=UTC).astimezone(zone)
    state = fold([_opened(d, newest - d * DAY) for d in range(31)] + [_opened(99, (newest - 31 * DAY).replace(hour=6))])
    value = evaluate(state, state.newest_ms)["active_day_streak"]
    assert value.fallback and value.value == 0 and not value.fresh


def test_a_streak_ended_by_a_day_held_whole_is_exact_at_an_earlier_now() -> None:
    # UTC: the fold holds the cutoff's day from its midnight, so a day without a signal there ends
    # the streak for certain. It was a fallback whenever the streak reached that day.
    newest = datetime(2026, 11, 26, 9, tzinfo=UTC)
    days = [0, *range(4, 31)]  # nothing 1-3 days back, nor 31 (the cutoff's day, held whole)
    state = fold([_opened(d, newest - d * DAY) for d in days])
    assert _at(state.cutoff_ms) == datetime(2026, 10, 26, tzinfo=UTC) == (newest - 31 * DAY).replace(hour=0)
    value = evaluate(state, state.newest_ms - 3 * DAY // MS)["active_day_streak"]
    assert (value.value, value.fallback) == (27, False)


def test_a_far_future_now_costs_no_more_than_today() -> None:
    """`GET /users/{id}/features?at=9999-...` is a request anyone may send: the streak was counted
    in an array of one flag per day since the oldest event, ~2.9 million of them (30 ms, tens of MB)."""
    import tracemalloc

    newest = datetime(2026, 11, 26, 9, tzinfo=UTC)
    state = fold([_opened(d, newest - d * DAY) for d in range(31)])
    far = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp() * 1000)
    tracemalloc.start()
    value = evaluate(state, far)["active_day_streak"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (value.value, value.fallback) == (0, False) and peak < 1_000_000, peak


def test_a_due_time_counts_from_its_whole_second() -> None:
    # The records keep dues in seconds: a task due at 10:00:00.900 is overdue from 10:00:00.000, as
    # overdue_tasks' description says (it said "at or before `now`" only).
    assert "kept to the second, rounded down" in BY_NAME["overdue_tasks"].description
    due = datetime(2026, 11, 26, 10, tzinfo=UTC)
    state = fold([parse_event(orjson.dumps({"id": "c", "type": "task.created", "user_id": "u",
                                            "ts": (due - timedelta(hours=1)).isoformat(),
                                            "data": {"task_id": "t", "due": (due + 900 * MS).isoformat()}}))])
    assert evaluate(state, _ms(due) - 1)["overdue_tasks"].value == 0
    assert evaluate(state, _ms(due))["overdue_tasks"].value == 1
