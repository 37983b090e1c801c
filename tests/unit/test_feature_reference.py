"""Every profile feature against a brute-force reference over the raw events, written from the
words of DESIGN.md ("Core profile features") and docs/features.md, not from the fold.

Histories are adversarial: out of order, redelivered, on window edges to the millisecond,
after `now`, in non-UTC offsets that change, task lifecycles in odd orders (completed before
created, deleted then re-created), and old enough that the fold has pruned part of them.
A feature's value must equal the reference, or be its fallback, flagged, when there is no data
or (only at a `now` before the newest event) when its window reaches past what the fold holds.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from streams import fold
from streams.events import parse_event
from streams.features import FEATURE_NAMES, FEATURES, SOURCE_KINDS, evaluate, snapshot
from streams.fold import DAY_MS, UserState, apply
from streams.store import OnlineStore

MS, DAY, EPOCH = timedelta(milliseconds=1), timedelta(days=1), datetime(1970, 1, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)  # a Go time.Time never set
SIGNALS = {"task.created", "task.completed", "task.rescheduled", "task.deleted", "app.opened", "tip.shown"}
KINDS = [*sorted(SIGNALS), "tip.reacted"]
REACTIONS = ["acted", "liked", "snoozed", "dismissed", "disliked"]
OFFSETS = [timedelta(hours=5, minutes=30), timedelta(hours=-3), timedelta(hours=9, minutes=45),
           timedelta(hours=-9, minutes=-30), timedelta(hours=14), timedelta(hours=-12), timedelta(hours=1)]
BY_NAME = {f.name: f for f in FEATURES}


def completion_hours(completed: list[dict[str, Any]], created: list[dict[str, Any]]) -> list[float]:
    """Hours from each task's earliest creation among `created` to its completion in `completed`."""
    spans = []
    for done in completed:
        made = [e["at"] for e in created if e["data"]["task_id"] == done["data"]["task_id"]]
        if made and min(made) <= done["at"]:
            spans.append((done["at"] - min(made)) / timedelta(hours=1))
    return spans


def reference(raw: list[dict[str, Any]], now_ms: int, current_offset: timedelta) -> dict[str, Any]:
    """Each feature at `now_ms`; None where there is no data (the registry's fallback applies)."""
    now = EPOCH + now_ms * MS
    seen: set[str] = set()
    past = []
    for e in raw:
        at = datetime.fromisoformat(e["ts"])
        if e["id"] not in seen and at <= now:  # an id is applied once; nothing after `now` is known at `now`
            past.append({**e, "at": at})
        seen.add(e["id"])

    def win(kind: str, days: int) -> list[dict[str, Any]]:  # (now - days, now]
        return sorted((e for e in past if e["type"] == kind and now - days * DAY < e["at"]), key=lambda e: e["at"])

    created, completed = len(win("task.created", 7)), len(win("task.completed", 7))
    hours = Counter(e["at"].hour for e in win("task.completed", 28))
    reactions = Counter(e["data"]["reaction"] for e in win("tip.reacted", 30))
    signals = [e["at"] for e in past if e["type"] in SIGNALS]
    closed = {e["data"]["task_id"] for e in win("task.completed", 30) + win("task.deleted", 30)}
    open_due = {e["data"]["task_id"]: e["data"].get("due") for e in win("task.created", 30)
                if e["data"]["task_id"] not in closed}
    for e in win("task.rescheduled", 30):
        if e["data"]["task_id"] in open_due:
            open_due[e["data"]["task_id"]] = e["data"]["due"]
    zone = timezone(current_offset)
    active = {t.astimezone(zone).date() for t in signals}
    day = now.astimezone(zone).date()
    day -= DAY * (day not in active)
    streak = 0
    while day in active:
        streak, day = streak + 1, day - DAY
    spans = completion_hours(win("task.completed", 28), win("task.created", 30))
    return {
        "tasks_created_7d": created,
        "tasks_completed_7d": completed,
        "completion_rate_7d": (completed + 1) / (created + 2),
        "preferred_hour": min(range(24), key=lambda h: (-hours[h], h)) if hours else None,
        "tip_volume_24h": len(win("tip.shown", 1)),
        "tip_positive_rate_30d": (reactions["acted"] + reactions["liked"] + 1) / (sum(reactions.values()) + 2),
        "seconds_since_active": (now - max(signals)) / timedelta(seconds=1) if signals else None,
        "open_tasks": len(open_due),
        # Kept to the second: a due before the epoch's second second is a zero value, no due.
        "overdue_tasks": sum(1 for due in open_due.values()
                             if due and EPOCH + 2 * SECOND <= datetime.fromisoformat(due) <= now),
        "postpone_rate_30d": len(win("task.rescheduled", 30)) / (len(win("task.created", 30)) + 1),
        "active_day_streak": streak,
        "mean_hours_to_complete_28d": sum(spans) / len(spans) if spans else None,
        "engagement_score": sum(0.5 ** ((now - t) / DAY / 3) for t in signals if now - 30 * DAY < t),
        "app_opens_7d": len(win("app.opened", 7)),
        "tip_dismiss_rate_30d": (reactions["dismissed"] + reactions["disliked"] + 1) / (sum(reactions.values()) + 2),
    }


def history(rng: random.Random, now: datetime) -> list[dict[str, Any]]:
    """Events around `now` in arrival order, a third of them on a window's edge to the millisecond."""
    offsets = rng.sample(OFFSETS, rng.choice([1, 1, 2]))
    tasks = [f"t-{i}" for i in range(rng.randint(1, 6))]
    span_ms = rng.choice([3, 10, 35, 70]) * DAY_MS
    raw = []
    for _ in range(rng.choice([1, 3, 10, 30, 60, 120])):
        kind, r = rng.choice(KINDS), rng.random()
        if r < 0.35:
            at = now - rng.choice([0, 1, 7, 28, 30, 31, 32]) * DAY + rng.choice([-1, 0, 1, 2]) * MS
        elif r < 0.45:
            at = now + rng.randint(1, 3 * DAY_MS) * MS
        else:
            at = now - rng.randint(0, span_ms) * MS
        # Whole seconds: the fold keeps due times in seconds.
        due = rng.choice([now, now - MS, at + timedelta(hours=rng.randint(-72, 72)),
                          now + timedelta(seconds=rng.randint(-5000, 5000)), GO_ZERO_TIME, EPOCH,
                          EPOCH + SECOND, EPOCH + 2 * SECOND]).replace(microsecond=0)
        # Go's zero time in another offset is before year 1.
        due_text = (due if due < EPOCH else due.astimezone(timezone(rng.choice(OFFSETS)))).isoformat()
        task = rng.choice(tasks)
        data = {"task.created": {"task_id": task, **({"due": due_text} if rng.random() < 0.8 else {})},
                "task.completed": {"task_id": task}, "task.deleted": {"task_id": task},
                "task.rescheduled": {"task_id": task, "due": due_text}, "app.opened": {},
                "tip.shown": {"tip_id": f"tip-{rng.randint(0, 3)}"},
                "tip.reacted": {"tip_id": "tip-0", "reaction": rng.choice(REACTIONS)}}[kind]
        raw.append({"id": f"evt-{rng.getrandbits(48):012x}", "type": kind, "user_id": "u",
                    "ts": at.astimezone(timezone(rng.choice(offsets))).isoformat(), "data": data})
    raw += [rng.choice(raw) for _ in range(rng.randint(0, 8))]  # redeliveries
    rng.shuffle(raw)
    return raw


def oldest_kept(raw: list[dict[str, Any]], state: UserState, cap: int | None) -> dict[str, int]:
    """Per kind with `cap` events or more in the fold's horizon, the time (ms) of its cap-th newest:
    what lies before it may have been dropped (the fold cannot tell `cap` events from more)."""
    times: dict[str, set[tuple[int, str]]] = {}
    for e in raw:
        at_ms = (datetime.fromisoformat(e["ts"]) - EPOCH) // MS
        if at_ms >= state.cutoff_ms:
            times.setdefault(e["type"], set()).add((at_ms, e["id"]))
    return {kind: sorted(held, reverse=True)[cap - 1][0] for kind, held in times.items()
            if cap is not None and len(held) >= cap}


def dropped_by_cap(name: str, now: int, oldest: dict[str, int]) -> bool:
    """Whether the feature at `now` reads before the oldest record of a kind at the cap."""
    window_days = BY_NAME[name].window_days
    for kind in SOURCE_KINDS[name] & oldest.keys():
        if window_days is not None and now - window_days * DAY_MS < oldest[kind]:
            return True
        if name == "seconds_since_active" and now < oldest[kind]:
            return True
        if name == "active_day_streak":  # the day that ended it may have held a dropped signal
            return True
    return False


@pytest.mark.parametrize("cap", [None, 3])
def test_every_feature_equals_the_reference_or_is_a_flagged_fallback(cap: int | None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With `cap`, each kind's log keeps only its `cap` newest records (the fold's MAX_RECORDS_PER_KIND,
    lowered so that these short histories reach it): a feature is then exact over every event, or a
    flagged fallback where it reads before what a kind at the cap still holds."""
    if cap is not None:
        monkeypatch.setattr(fold, "MAX_RECORDS_PER_KIND", cap)
    rng = random.Random(20261126)
    compared = capped = 0
    for _ in range(250):
        now0 = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(days=rng.randint(40, 80), milliseconds=rng.randint(0, DAY_MS))
        raw = history(rng, now0)
        store = OnlineStore()
        for event in raw:
            store.apply(parse_event(orjson.dumps(event)))
        state = store.users["u"]
        oldest = oldest_kept(raw, state, cap)
        capped += bool(oldest)
        for kind in KINDS:
            assert state.count(kind) <= (cap or fold.MAX_RECORDS_PER_KIND)
            if kind in oldest:
                assert state.count(kind) == cap and state.first_ms(kind) == oldest[kind]
        stamps = [datetime.fromisoformat(e["ts"]) for e in raw]
        current_offset = max(t.utcoffset() for t in stamps if t == max(stamps))  # type: ignore[type-var]
        newest = state.newest_ms
        for now in {(now0 - EPOCH) // MS, newest, newest + 1, newest + DAY_MS, newest - 1, newest - 5 * DAY_MS,
                    newest + rng.randint(0, 40 * DAY_MS), newest - rng.randint(0, 40 * DAY_MS)}:
            expected, got = reference(raw, now, current_offset), evaluate(state, now)
            for name in FEATURE_NAMES:
                value, want, feature = got[name], expected[name], BY_NAME[name]
                where = (name, now - newest, value, want)
                # None of its events held at or before `now`: unknown (the app may not publish them), not 0.
                unsourced = not any((state.times(kind) <= now).any() for kind in SOURCE_KINDS[name])
                assert value.fallback or not unsourced, where
                if value.fallback and unsourced:
                    assert value.value == feature.fallback and not value.fresh, where
                elif value.fallback:
                    assert value.value == feature.fallback and not value.fresh, where
                    # For want of data, or a window reaching past what the fold holds (never at/after the newest
                    # event); the two unwindowed ones earlier, or when what they need was dropped (all signals).
                    if feature.window_days is not None:
                        reaches_past = now < newest and now - feature.window_days * DAY_MS + 1 < state.cutoff_ms
                    else:
                        reaches_past = now < newest or any(state.cutoff_ms > (t - EPOCH) // MS for t in stamps)
                    assert want is None or reaches_past or dropped_by_cap(name, now, oldest), where
                else:
                    assert want is not None and math.isclose(value.value, want, rel_tol=1e-9, abs_tol=1e-9), where
                    assert value.fresh == (value.age_s is not None and value.age_s <= feature.ttl_s), where
                compared += 1
            snap = snapshot(state, now)  # reused by /score until its edge: carried values stay the evaluated ones
            later = (now + snap.until_ms) // 2
            carried = snap.values_at(later)
            assert all(math.isclose(carried[k], v.value, rel_tol=1e-9) for k, v in evaluate(state, later).items())
    assert compared > 250 * 5 * len(FEATURE_NAMES)
    assert capped > 100 if cap else not capped


def _event(i: int, kind: str, at: datetime, **data: Any) -> Any:
    return parse_event(orjson.dumps({"id": f"e{i}", "type": kind, "user_id": "u", "ts": at.isoformat(), "data": data}))


def test_an_unrelated_later_event_does_not_change_task_features_at_the_same_now() -> None:
    # The fold's cutoff follows the newest event (to its day). Task features used to read every
    # closure, reschedule and creation the fold still held, so an app open at `now` that moved the
    # cutoff by a day dropped a deletion 31.75 days back: open_tasks went 0 -> 1, overdue 1 -> 0 and
    # the mean hours to complete 738.0 -> its fallback.
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    old = now - timedelta(days=31, hours=18)  # past the 30-day windows, held until the cutoff moves
    events = [_event(0, "task.deleted", old, task_id="t"),
              _event(1, "task.rescheduled", old, task_id="t", due=(now - timedelta(hours=1)).isoformat()),
              _event(2, "task.created", now - timedelta(days=1), task_id="t", due=(now + timedelta(days=3)).isoformat()),
              _event(3, "task.created", old, task_id="u"), _event(4, "task.completed", now - timedelta(days=1), task_id="u")]
    before, after = UserState(), UserState()
    for event in events:
        apply(before, event)
        apply(after, event)
    apply(after, _event(5, "app.opened", now))
    assert before.cutoff_ms < after.cutoff_ms
    at = (now - EPOCH) // MS
    for name in ("open_tasks", "overdue_tasks", "mean_hours_to_complete_28d"):
        assert evaluate(before, at)[name] == evaluate(after, at)[name], name
    values = evaluate(after, at)
    assert values["open_tasks"].value == 1 and values["overdue_tasks"].value == 0  # t: re-created, due in 3 days
    assert values["mean_hours_to_complete_28d"].fallback  # u's creation is not in the last 30 days


def test_a_task_created_again_counts_again_and_its_latest_creation_sets_its_due() -> None:
    """As the descriptions say: `task.created` events are counted, and a second one for the same
    task without `due` clears the first's (an app re-sending the task as it now is)."""
    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    state = UserState()
    apply(state, _event(0, "task.created", now - timedelta(days=2), task_id="t", due=(now - timedelta(days=1)).isoformat()))
    at = (now - EPOCH) // MS
    assert evaluate(state, at)["overdue_tasks"].value == 1
    apply(state, _event(1, "task.created", now - timedelta(hours=1), task_id="t"))
    values = evaluate(state, at)
    assert values["overdue_tasks"].value == 0 and values["open_tasks"].value == 1
    assert values["tasks_created_7d"].value == 2
