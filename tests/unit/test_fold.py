"""The fold: order, batching and duplicates don't matter; every feature matches a direct computation."""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streams import fold
from streams.events import parse_event
from streams.features import ENGAGEMENT_HALF_LIFE_DAYS, FEATURE_NAMES, FEATURES, WINDOW_DAYS, evaluate, snapshot
from streams.fold import DAY_MS, REACTION_CODES, UserState, apply, fingerprint, to_ms
from streams.simulator import Population
from streams.store import OnlineStore

BASE = datetime(2026, 10, 1, tzinfo=UTC)
KINDS = ["task.created", "task.completed", "task.rescheduled", "task.deleted", "app.opened", "tip.shown", "tip.reacted"]
REACTIONS = ["acted", "liked", "snoozed", "dismissed", "disliked"]


@st.composite
def raw_event(draw: Any, index: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(KINDS))
    offset = timedelta(minutes=draw(st.sampled_from(ZONES_MIN)))
    moment = (BASE + timedelta(minutes=draw(st.integers(0, 45 * 24 * 60)), milliseconds=draw(st.integers(0, 999))))
    task = f"t-{draw(st.integers(0, 12))}"
    data: dict[str, Any] = {
        "task.created": {"task_id": task, "due": (moment + timedelta(hours=draw(st.integers(-48, 96)))).isoformat()},
        "task.completed": {"task_id": task},
        "task.rescheduled": {"task_id": task, "due": (moment + timedelta(days=1)).isoformat()},
        "task.deleted": {"task_id": task},
        "app.opened": {},
        "tip.shown": {"tip_id": f"tip-{draw(st.integers(0, 3))}"},
        "tip.reacted": {"tip_id": "tip-0", "reaction": draw(st.sampled_from(REACTIONS))},
    }[kind]
    return {"id": f"e-{index}", "type": kind, "user_id": "u", "ts": moment.astimezone(timezone(offset)).isoformat(),
            "data": data}


ZONES_MIN = [-480, 0, 60, 330]


def in_zone(ts: str, minutes: int) -> str:
    """`ts` (ISO 8601) as the same instant written in UTC offset `minutes`."""
    return datetime.fromisoformat(ts).astimezone(timezone(timedelta(minutes=minutes))).isoformat()


def sent_again(draw: Any, events: list[dict[str, Any]], max_size: int) -> list[dict[str, Any]]:
    """Some of `events` redelivered: as they were, or with their time written in another zone (a device that
    moved since, re-rendering on a retry: for task.completed another local hour, the same event)."""
    again = draw(st.lists(st.tuples(st.sampled_from(events), st.sampled_from([None, *ZONES_MIN])), max_size=max_size))
    return [e if minutes is None else {**e, "ts": in_zone(e["ts"], minutes)} for e, minutes in again]


@st.composite
def raw_log(draw: Any) -> list[dict[str, Any]]:
    size = draw(st.integers(1, 60))
    events = [draw(raw_event(i)) for i in range(size)]
    return events + sent_again(draw, events, 10)


@st.composite
def event_log(draw: Any) -> list[Any]:
    return [parse_event(orjson.dumps(e)) for e in draw(raw_log())]


def fold_all(events: list[Any]) -> UserState:
    state = UserState()
    for event in events:
        apply(state, event)
    return state


@settings(max_examples=60, deadline=None)
@given(event_log(), st.randoms(use_true_random=False))
def test_any_order_with_duplicates_gives_the_same_state(events: list[Any], rng: random.Random) -> None:
    shuffled = events[:]
    rng.shuffle(shuffled)
    assert fold_all(shuffled) == fold_all(events)


@settings(max_examples=40, deadline=None)
@given(event_log(), st.data())
def test_two_halves_with_a_checkpoint_between_equal_the_whole(events: list[Any], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(events)))
    store = OnlineStore()
    for event in events[:cut]:
        store.apply(event)
    restored = OnlineStore()
    restored.load({}, [(u, s.to_bytes()) for u, s in store.users.items()])
    for event in events:  # replay from before the checkpoint: already-folded events count once
        restored.apply(event)
    assert restored.users["u"] == fold_all(events)


@settings(max_examples=80, deadline=None)
@given(event_log(), st.data())
def test_a_snapshot_equals_a_fresh_evaluation_everywhere_it_reaches(events: list[Any], data: st.DataObject) -> None:
    state = fold_all(events)
    at = state.newest_ms + data.draw(st.integers(-40 * DAY_MS, 2 * DAY_MS), label="at - newest")
    snap = snapshot(state, at)
    assert snap.until_ms > at
    # Every instant where some feature could change, and the one before it: a snapshot reaching
    # one edge too far, or missing one, is caught.
    edges = {t + days * DAY_MS for kind in KINDS for t in state.times(kind).tolist() for days in (0, *WINDOW_DAYS)}
    edges |= {due * 1000 for kind in ("task.created", "task.rescheduled") for due in state.records(kind)["due_s"].tolist()}
    nows = {at, snap.until_ms - 1} | {t + d for t in edges for d in (-1, 0) if at <= t + d < snap.until_ms}
    for now in sorted(nows):
        fresh = {name: v.value for name, v in evaluate(state, now).items()}
        carried = snap.values_at(now)
        for name in FEATURE_NAMES:
            assert math.isclose(carried[name], fresh[name], rel_tol=1e-12, abs_tol=1e-12), (name, now - at)
        assert snap.fallbacks == {name for name, v in evaluate(state, now).items() if v.fallback}


def test_long_absences_and_far_dates_keep_exact_times_in_any_order() -> None:
    def opened(i: int, at: datetime) -> Any:
        return parse_event(orjson.dumps({"id": f"o{i}", "type": "app.opened", "user_id": "u", "ts": at.isoformat()}))

    # Gaps longer than 32 bits of milliseconds (49.7 days), dates far from now, one before 1970.
    moments = [datetime(1969, 12, 25, tzinfo=UTC), BASE, BASE + timedelta(days=3, milliseconds=7),
               BASE + timedelta(days=60), BASE + timedelta(days=200, hours=5), BASE + timedelta(days=205),
               datetime(2100, 1, 1, 23, 59, 59, 999_000, tzinfo=UTC),
               datetime(2100, 1, 20, tzinfo=UTC)]
    events = [opened(i, m) for i, m in enumerate(moments)]
    forward, backward = fold_all(events), fold_all(events[::-1])
    assert forward == backward
    assert forward.times("app.opened").tolist() == [to_ms(m) for m in moments[-2:]]
    now = to_ms(moments[-1])
    assert evaluate(forward, now)["seconds_since_active"].value == 0.0
    assert evaluate(forward, now)["app_opens_7d"].value == 1
    edge = to_ms(moments[-2]) + 7 * DAY_MS  # the first 2100 event leaves (now - 7d, now] exactly here
    assert evaluate(forward, edge - 1)["app_opens_7d"].value == 1
    assert evaluate(forward, edge)["app_opens_7d"].value == 0


def test_a_snapshot_ends_where_an_open_task_falls_overdue() -> None:
    created = parse_event(orjson.dumps({"id": "c", "type": "task.created", "user_id": "u", "ts": "2026-11-26T10:00:00Z",
                                        "data": {"task_id": "t", "due": "2026-11-26T12:00:00Z"}}))
    state = fold_all([created])
    snap = snapshot(state, state.newest_ms)
    due_ms = to_ms(datetime(2026, 11, 26, 12, tzinfo=UTC))
    assert snap.until_ms == due_ms
    assert snap.values_at(due_ms - 1)["overdue_tasks"] == 0 and evaluate(state, due_ms)["overdue_tasks"].value == 1


def _v1_blob(events: list[Any]) -> bytes:
    """A checkpoint as the previous layout wrote it: int64 times, 32-bit fingerprints, a column per field."""
    columns = {"task.created": "IIB", "task.completed": "IB", "task.rescheduled": "II", "task.deleted": "I",
               "app.opened": "", "tip.shown": "I", "tip.reacted": "IB"}
    state = fold_all(events)
    parts = [struct.pack("<qi", state.newest_ms, state.offset_s)]
    for kind, codes in columns.items():
        rows = sorted({(to_ms(e.ts), fingerprint(e.id), *_v1_payload(e)) for e in events if e.type == kind
                       and to_ms(e.ts) >= state.cutoff_ms})
        for n, code in enumerate("qI" + codes):
            parts.append(struct.pack(f"<I{len(rows)}{code}", len(rows), *(row[n] for row in rows)))
    return b"".join(parts)


def _v1_payload(e: Any) -> tuple[int, ...]:
    due = lambda d: 0 if d is None else to_ms(d) // 1000  # noqa: E731
    return {"task.created": lambda: (fingerprint(e.data.task_id), due(e.data.due), e.data.priority or 0),
            "task.completed": lambda: (fingerprint(e.data.task_id), e.ts.hour),
            "task.rescheduled": lambda: (fingerprint(e.data.task_id), due(e.data.due)),
            "task.deleted": lambda: (fingerprint(e.data.task_id),),
            "app.opened": lambda: (),
            "tip.shown": lambda: (fingerprint(e.data.tip_id),),
            "tip.reacted": lambda: (fingerprint(e.data.tip_id), REACTION_CODES[e.data.reaction])}[e.type]()


@settings(max_examples=30, deadline=None)
@given(event_log())
def test_a_checkpoint_in_the_previous_layout_is_upcast_to_the_same_state(events: list[Any]) -> None:
    assert UserState.from_bytes(_v1_blob(events)) == fold_all(events)


@settings(max_examples=30, deadline=None)
@given(event_log(), st.data())
def test_a_checkpoint_cut_short_or_overwritten_is_refused_not_read_as_another_state(
        events: list[Any], data: st.DataObject) -> None:
    """A row cut short in its last log's records was read as a shorter log, not a whole number of records: a
    wrong state without a word, which failed later in whatever read it. Either layout, any cut or extra byte."""
    for blob in (fold_all(events).to_bytes(), _v1_blob(events)):
        cut = data.draw(st.integers(0, len(blob) - 1), label="cut at")
        with pytest.raises(ValueError, match="^not a user state: "):
            UserState.from_bytes(blob[:cut])
        with pytest.raises(ValueError, match="^not a user state: "):
            UserState.from_bytes(blob + data.draw(st.binary(min_size=1, max_size=8), label="extra"))


def reference_features(raw: list[dict[str, Any]], now: datetime, *, kept_from: datetime, offset: timedelta
                       ) -> dict[str, Any]:
    """Every profile feature computed directly from the raw events, the way its declaration words it.

    `kept_from`: the fold's horizon (nothing older is kept); `offset`: the user's current UTC offset.
    A feature whose window reaches before `kept_from` is not known: it is its declared fallback.
    """
    seen, events = set(), []
    # Of copies of one event in several zones, the fold keeps the largest local hour (`fold._insert`).
    for event in sorted(raw, key=lambda e: -datetime.fromisoformat(e["ts"]).hour):
        at = datetime.fromisoformat(event["ts"])
        if event["id"] not in seen and kept_from <= at <= now:
            seen.add(event["id"])
            events.append({**event, "at": at})
    events.sort(key=lambda e: e["at"])  # "latest" is by event time, not by arrival

    def within(event: dict[str, Any], days: float) -> bool:
        return now - timedelta(days=days) < event["at"]

    def of(kind: str, days: float = 365) -> list[dict[str, Any]]:
        return [e for e in events if e["type"] == kind and within(e, days)]

    def due_s(event: dict[str, Any]) -> int:
        due = event["data"].get("due")
        return to_ms(datetime.fromisoformat(due)) // 1000 if due else 0

    created, completed = len(of("task.created", 7)), len(of("task.completed", 7))
    hours = Counter(e["at"].hour for e in of("task.completed", 28))
    reactions = [e["data"]["reaction"] for e in of("tip.reacted", 30)]
    signals = [e["at"] for e in events if e["type"] != "tip.reacted"]
    closed = {e["data"]["task_id"] for e in of("task.completed", 30) + of("task.deleted", 30)}
    due = {e["data"]["task_id"]: due_s(e) for e in of("task.created", 30) if e["data"]["task_id"] not in closed}
    for e in of("task.rescheduled", 30):  # in time order: the latest wins
        if e["data"]["task_id"] in due:
            due[e["data"]["task_id"]] = due_s(e)
    zone = timezone(offset)
    active_days = {t.astimezone(zone).date() for t in signals}
    day = now.astimezone(zone).date()
    day -= timedelta(days=0 if day in active_days else 1)
    streak = 0
    while day in active_days:
        streak, day = streak + 1, day - timedelta(days=1)
    streak = min(streak, 32)  # at most 32
    if streak < 32 and datetime.combine(day, datetime.min.time(), zone) < kept_from:  # ended by a day held in part
        streak = 0
    spans = []
    for done in of("task.completed", 28):
        made = [e["at"] for e in of("task.created", 30) if e["data"]["task_id"] == done["data"]["task_id"]]
        if made and min(made) <= done["at"]:
            spans.append((done["at"] - min(made)) / timedelta(hours=1))
    half_life_s = ENGAGEMENT_HALF_LIFE_DAYS * 86_400
    values = {
        "tasks_created_7d": created,
        "tasks_completed_7d": completed,
        "completion_rate_7d": (completed + 1) / (created + 2),
        "preferred_hour": min(hours, key=lambda h: (-hours[h], h)) if hours else 9,
        "tip_volume_24h": len(of("tip.shown", 1)),
        "tip_positive_rate_30d": (sum(r in ("acted", "liked") for r in reactions) + 1) / (len(reactions) + 2),
        "seconds_since_active": (now - max(signals)).total_seconds() if signals else 30 * 86_400.0,
        "app_opens_7d": len(of("app.opened", 7)),
        "open_tasks": len(due),
        "overdue_tasks": sum(1 for d in due.values() if d and d * 1000 <= to_ms(now)),
        "postpone_rate_30d": len(of("task.rescheduled", 30)) / (len(of("task.created", 30)) + 1),
        "active_day_streak": streak,
        "mean_hours_to_complete_28d": sum(spans) / len(spans) if spans else 24.0,
        "engagement_score": sum(0.5 ** ((now - t).total_seconds() / half_life_s)
                                for t in signals if now - t < timedelta(days=30)),
        "tip_dismiss_rate_30d": (sum(r in ("dismissed", "disliked") for r in reactions) + 1) / (len(reactions) + 2),
    }
    for feature in FEATURES:
        if feature.window_days and now - timedelta(days=feature.window_days) + timedelta(milliseconds=1) < kept_from:
            values[feature.name] = feature.fallback
    return values


def assert_features_match(state: UserState, raw: list[dict[str, Any]], now: datetime) -> int:
    """Every feature of `state` at `now` against the reference; returns how many were compared."""
    expected = reference_features(raw, now, kept_from=datetime.fromtimestamp(state.cutoff_ms / 1000, UTC),
                                  offset=timedelta(seconds=state.offset_s))
    got = evaluate(state, to_ms(now))
    assert set(expected) == set(FEATURE_NAMES)
    for name, value in expected.items():
        assert math.isclose(got[name].value, value, rel_tol=1e-9, abs_tol=1e-9), (name, got[name].value, value)
    return len(expected)


def test_core_features_match_a_direct_computation_over_the_raw_events() -> None:
    population = Population(users=6, seed=3)
    raw = [event for _, event in population.history(days=40, start_ms=to_ms(BASE))]
    rng = random.Random(5)
    raw += rng.sample(raw, 200)  # redeliveries
    late = rng.sample(raw, 300)
    arrival = [e for e in raw if e not in late] + late  # some arrive late, out of order
    assert len(raw) > 3_000
    store = OnlineStore()
    for event in arrival:
        store.apply(parse_event(orjson.dumps(event)))
    checked = 0
    for user in population.users:
        mine = [e for e in raw if e["user_id"] == user.user_id]
        state = store.users[user.user_id]
        for hours_after in (0, 1, 13, 30, 24 * 3, 24 * 8):
            now = datetime.fromtimestamp(state.newest_ms / 1000, tz=UTC) + timedelta(hours=hours_after)
            checked += assert_features_match(state, mine, now)
    assert checked == 6 * 6 * len(FEATURE_NAMES)


@settings(max_examples=150, deadline=None)
@given(raw_log(), st.integers(-3 * 24, 3 * 24))
def test_every_feature_matches_a_direct_computation_in_any_order_and_with_duplicates(raw: list[dict[str, Any]],
                                                                                    hours_after: int) -> None:
    # Two dues for one task at one instant: which is "the latest" is not defined, so not compared.
    dues = {(e["data"]["task_id"], datetime.fromisoformat(e["ts"])): e["id"] for e in raw if "due" in e["data"]}
    assume(len(dues) == len({e["id"] for e in raw if "due" in e["data"]}))
    state = fold_all([parse_event(orjson.dumps(e)) for e in raw])
    now = datetime.fromtimestamp(state.newest_ms / 1000, tz=UTC) + timedelta(hours=hours_after, milliseconds=1)
    assert_features_match(state, raw, now)


def test_windows_are_half_open_over_event_time() -> None:
    def created(i: int, at: datetime) -> Any:
        return parse_event(orjson.dumps({"id": f"c{i}", "type": "task.created", "user_id": "u", "ts": at.isoformat(),
                                         "data": {"task_id": f"t{i}"}}))

    now = BASE + timedelta(days=10)
    state = fold_all([created(0, now - timedelta(days=7)), created(1, now - timedelta(days=7) + timedelta(milliseconds=1)),
                      created(2, now), created(3, now + timedelta(milliseconds=1))])
    assert evaluate(state, to_ms(now))["tasks_created_7d"].value == 2  # (now - 7d, now]


def test_state_stays_bounded_as_time_goes_on() -> None:
    population = Population(users=1, seed=9)
    state = UserState()
    sizes = []
    for day, (_, event) in enumerate(population.history(days=120, start_ms=to_ms(BASE))):
        apply(state, parse_event(orjson.dumps(event)))
        if day % 400 == 0:
            sizes.append(state.events_kept)
    stamps = [t for kind in KINDS for t in state.times(kind).tolist()]
    span_days = (max(stamps) - min(stamps)) / DAY_MS
    assert span_days <= 32
    assert max(sizes[-5:]) < 2 * min(sizes[len(sizes) // 2:])  # flat, not growing


def test_a_window_reaching_before_what_the_fold_holds_is_flagged_not_cut_short() -> None:
    # 60 days of one app open and one reaction a day: the fold keeps 31 days behind the newest.
    state = UserState()
    for d in range(60):
        at = BASE + timedelta(days=d, hours=12)
        apply(state, parse_event(orjson.dumps({"id": f"o{d}", "type": "app.opened", "user_id": "u", "ts": at.isoformat()})))
        apply(state, parse_event(orjson.dumps({"id": f"r{d}", "type": "tip.reacted", "user_id": "u", "ts": at.isoformat(),
                                               "data": {"tip_id": "t", "reaction": "acted" if d < 45 else "dismissed"}})))
    newest = state.newest_ms
    # Unknown at any `now`: no task or tip.shown event held (the app may not publish them).
    no_tasks = {"tasks_created_7d", "tasks_completed_7d", "completion_rate_7d", "preferred_hour", "open_tasks",
                "overdue_tasks", "postpone_rate_30d", "mean_hours_to_complete_28d", "tip_volume_24h"}
    assert {name for name, v in evaluate(state, newest).items() if v.fallback} == no_tasks
    assert snapshot(state, newest).fallbacks == no_tasks
    for days_back in (10, 20):
        now = newest - days_back * DAY_MS
        values, snap = evaluate(state, now), snapshot(state, now)
        for name in ("tip_positive_rate_30d", "tip_dismiss_rate_30d", "engagement_score"):
            assert values[name].fallback and not values[name].fresh, (days_back, name)
            assert name in snap.fallbacks
        assert values["tip_positive_rate_30d"].value == 0.5  # the declared fallback, not a truncated 0.75
        assert snap.until_ms <= state.cutoff_ms + 30 * DAY_MS - 1  # a snapshot never outlives the flag
    whole_again = state.cutoff_ms + 30 * DAY_MS - 1  # the first `now` whose 30-day window the fold holds whole
    assert evaluate(state, whole_again - 1)["tip_positive_rate_30d"].fallback
    assert not evaluate(state, whole_again)["tip_positive_rate_30d"].fallback
    assert "tip_positive_rate_30d" not in snapshot(state, whole_again).fallbacks
    at_10 = evaluate(state, newest - 10 * DAY_MS)
    assert at_10["app_opens_7d"].value == 7 and not at_10["app_opens_7d"].fallback and at_10["app_opens_7d"].fresh
    assert at_10["seconds_since_active"].value == 0.0 and not at_10["seconds_since_active"].fallback
    assert at_10["active_day_streak"].fallback  # it runs into the pruned days
    # ...and a fallback is not fresh, however recent the user's signals (it was, for the streak).
    assert not at_10["active_day_streak"].fresh
    assert not any(v.fresh and v.fallback for days in (0, 3, 10, 20) for v in evaluate(state, newest - days * DAY_MS).values())


def test_a_heavy_user_s_log_grows_in_place_and_folds_to_the_same_state() -> None:
    """Past APPEND_IN_PLACE_BYTES a kind's log is a bytearray appended in place (before, every
    event copied the whole log: 80,000 events for one user took 1.9 s against 0.12 s spread over
    1,000 users). In order, out of order, across a day's prune and with features evaluated in
    between, the state is the one the same events fold to in another order."""
    from streams.fold import APPEND_IN_PLACE_BYTES

    events = [parse_event(orjson.dumps({"id": f"o{i}", "type": "app.opened", "user_id": "u",
                                        "ts": (BASE + timedelta(seconds=40 * i)).isoformat()}))
              for i in range(12_000)]  # ~5.6 days: the horizon moves, no rebase
    late = events[5_000::997]  # arrive after newer ones
    heavy = UserState()
    for i, event in enumerate(e for e in events if e not in late):
        apply(heavy, event)
        if i % 1_500 == 0:  # numpy views of the log come and go between folds
            evaluate(heavy, heavy.newest_ms)
            snapshot(heavy, heavy.newest_ms)
    for event in late:
        assert apply(heavy, event)
    assert any(isinstance(log, bytearray) and len(log) >= APPEND_IN_PLACE_BYTES for log in heavy.logs)
    shuffled = events[:]
    random.Random(5).shuffle(shuffled)
    reference = UserState()
    for event in shuffled:
        apply(reference, event)
    assert heavy.to_bytes() == reference.to_bytes()
    assert UserState.from_bytes(heavy.to_bytes()) == heavy
    assert not apply(heavy, events[-1]), "a duplicate is still one"
    held = heavy.records("app.opened")  # a reader that keeps its view across a fold
    later = parse_event(orjson.dumps({"id": "later", "type": "app.opened", "user_id": "u",
                                      "ts": (BASE + timedelta(days=6)).isoformat()}))
    assert apply(heavy, later) and len(held) == heavy.count("app.opened") - 1


def _records_read_to_insert(state: UserState, event: Any, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many records of its kind's log folding `event` into a copy of `state` reads (a time or a
    record's bytes): a search reads a few per doubling of the log, a walk each record it passes."""
    reads = [0]
    i = fold.KIND_INDEX[event.type]
    copy = UserState.from_bytes(state.to_bytes())

    class Counted(type(copy.logs[i])):  # type: ignore[misc]
        def __getitem__(self, at: Any) -> Any:
            reads[0] += 1
            return super().__getitem__(at)

    def unpack_ts(*args: Any) -> Any:
        reads[0] += 1
        return fold._TS.unpack_from(*args)

    copy.logs[i] = Counted(copy.logs[i])
    with monkeypatch.context() as patched:
        patched.setattr(fold, "_unpack_ts", unpack_ts)
        assert apply(copy, event)
    return reads[0]


def test_many_events_of_one_user_at_one_instant_fold_in_linear_time_and_dedup(monkeypatch: pytest.MonkeyPatch) -> None:
    # A publisher sending many events of one user stamped at one instant made each insert walk
    # every record of that instant in Python: 20,000 took ~14 s, stalling ingest for everyone.
    # Told by the records an insert reads, not by a stopwatch a loaded machine fails (the time is
    # bench/fold.py --one-instant's).
    def one_instant(ids: range) -> list[bytes]:
        return [f'{{"id": "e{i}", "type": "task.created", "user_id": "u", "ts": "2026-11-26T08:00:00+01:00", '
                f'"data": {{"task_id": "t{i}"}}}}'.encode() for i in ids]

    events = [parse_event(raw) for raw in one_instant(range(20_000))]
    state = UserState()
    assert all(apply(state, e) for e in events)
    more = [parse_event(raw) for raw in one_instant(range(20_000, 20_020))]
    reads = [_records_read_to_insert(state, event, monkeypatch) for event in more]
    assert max(reads) <= 4 * len(events).bit_length(), f"records read per insert among {len(events):,}: {reads}"
    assert not any(apply(state, e) for e in events[::97])  # each one again is a duplicate
    shuffled = UserState()
    for e in random.Random(7).sample(events, len(events)):
        apply(shuffled, e)
    assert shuffled == state and state.count("task.created") == 20_000


@settings(max_examples=60, deadline=None)
@given(event_log(), st.randoms(use_true_random=False))
def test_at_the_event_cap_any_order_with_duplicates_gives_the_same_state(events: list[Any],
                                                                         rng: random.Random) -> None:
    """Each kind keeps its newest MAX_RECORDS_PER_KIND records (lowered to 3 here, so these short
    logs reach it): the newest of a set, whatever order it came in and however often."""
    shuffled = events[:]
    rng.shuffle(shuffled)
    with mock.patch.object(fold, "MAX_RECORDS_PER_KIND", 3):
        state = fold_all(events)
        assert fold_all(shuffled) == state
        assert all(state.count(kind) <= 3 for kind in KINDS)
        assert not any(apply(state, event) for event in events), "each one again changes nothing"


def test_a_flood_of_one_user_s_events_keeps_the_newest_at_the_cap() -> None:
    """A publisher in a loop for one user: past MAX_RECORDS_PER_KIND the oldest record goes (in place,
    for a heavy log), an event older than all kept changes nothing, and any order folds the same."""
    cap = fold.MAX_RECORDS_PER_KIND
    events = [parse_event(orjson.dumps({"id": f"o{i}", "type": "app.opened", "user_id": "u",
                                        "ts": (BASE + timedelta(seconds=10 * i)).isoformat()}))
              for i in range(cap + 500)]
    state = UserState()
    assert all(apply(state, event) for event in events)
    assert state.count("app.opened") == cap and state.first_ms("app.opened") == to_ms(events[500].ts)
    assert not apply(state, events[0]) and not apply(state, events[499]), "older than every record kept"
    assert state.count("app.opened") == cap
    shuffled = UserState()
    for event in random.Random(3).sample(events, len(events)):
        apply(shuffled, event)
    assert shuffled == state


@st.composite
def crowded_log(draw: Any) -> list[Any]:
    """A publisher in a loop: many events of a few kinds at a few instants, in several zones, so
    that a kind at the cap (3 here) drops records sharing the newest instant."""
    instants = [BASE + timedelta(seconds=s) for s in draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))]
    raw = []
    for i in range(draw(st.integers(1, 10))):
        moment = draw(st.sampled_from(instants))
        offset = timedelta(minutes=draw(st.sampled_from(ZONES_MIN)))
        kind = draw(st.sampled_from(["app.opened", "app.opened", "tip.reacted", "task.completed"]))
        data = {"app.opened": {}, "tip.reacted": {"tip_id": "tip-0", "reaction": draw(st.sampled_from(REACTIONS))},
                "task.completed": {"task_id": f"t-{draw(st.integers(0, 1))}"}}[kind]
        raw.append({"id": f"e-{i}", "type": kind, "user_id": "u", "ts": moment.astimezone(timezone(offset)).isoformat(),
                    "data": data})
    # Sent again: as it was, or with its time written in another zone (the same instant, so the same event).
    return [parse_event(orjson.dumps(e)) for e in raw + sent_again(draw, raw, 4)]


@settings(max_examples=150, deadline=None)
@given(crowded_log(), st.randoms(use_true_random=False))
def test_at_the_cap_many_events_at_one_instant_in_several_zones_fold_the_same_in_any_order(
        events: list[Any], rng: random.Random) -> None:
    """The user's zone is the largest offset among their newest instant's events, also of one the cap
    drops at once: it came after the kind's kept records at that instant, or before them."""
    shuffled = events[:]
    rng.shuffle(shuffled)
    with mock.patch.object(fold, "MAX_RECORDS_PER_KIND", 3):
        state = fold_all(events)
        assert fold_all(shuffled) == state
        assert not any(apply(state, event) for event in events), "each one again changes nothing"


@settings(max_examples=150, deadline=None)
@given(crowded_log(), st.randoms(use_true_random=False))
def test_many_events_at_one_instant_in_several_zones_fold_the_same_in_any_order(events: list[Any],
                                                                                rng: random.Random) -> None:
    """Below the cap too: an event sent again with its time in another zone is the same record, a
    duplicate, and its zone counts at the newest instant whether it came first or second."""
    shuffled = events[:]
    rng.shuffle(shuffled)
    state = fold_all(events)
    assert fold_all(shuffled) == state
    newest = [e for e in events if to_ms(e.ts) == state.newest_ms]
    assert state.offset_s == max(e.ts.utcoffset().total_seconds() for e in newest)
    assert not any(apply(state, event) for event in events), "each one again changes nothing"


def test_an_event_sent_again_in_another_zone_counts_its_zone_in_either_order() -> None:
    # A publisher re-sending an event past JetStream's duplicate window may write its time in the zone
    # the device is in by then. The user's zone (the streak's days, /score's hour without context.now)
    # was that of whichever copy came first.
    sent = {"id": "e", "type": "app.opened", "user_id": "u", "ts": "2026-11-26T08:00:00+01:00"}
    first, again = (parse_event(orjson.dumps(e)) for e in (sent, {**sent, "ts": "2026-11-26T09:00:00+02:00"}))
    one, other = fold_all([first]), fold_all([again])
    assert apply(one, again), "the zone changed"
    assert not apply(other, first) and not apply(one, again)
    assert one == other and one.offset_s == 7200 and one.count("app.opened") == 1


def _completed(event_id: str, ts: str, task: str = "t") -> Any:
    return parse_event(orjson.dumps({"id": event_id, "type": "task.completed", "user_id": "u", "ts": ts,
                                     "data": {"task_id": task}}))


def test_a_completion_sent_again_in_another_zone_counts_once_in_either_order() -> None:
    # The record keeps the completion's local hour (preferred_hour): the same event re-sent with its time
    # written in another zone was a second record, and counted twice (tasks_completed_7d 2, the rate moved).
    created = parse_event(orjson.dumps({"id": "c", "type": "task.created", "user_id": "u",
                                        "ts": "2026-11-25T09:00:00+01:00", "data": {"task_id": "t"}}))
    first, again = _completed("e", "2026-11-26T08:00:00+01:00"), _completed("e", "2026-11-26T07:00:00+00:00")
    later = _completed("f", "2026-11-26T10:00:00+01:00", task="u")
    # In order, the second copy at the log's last time (the append's edge), and with a later one between.
    orders = [[created, first, again], [created, again, first], [again, created, later, first],
              [created, first, later, again]]
    states = [fold_all(events) for events in orders]
    for state in states[:2]:
        assert state == states[0] and state.count("task.completed") == 1
        assert state.records("task.completed")["local_hour"].tolist() == [8]  # the larger local hour
        values = evaluate(state, state.newest_ms + 1)
        assert values["tasks_completed_7d"].value == 1 and values["completion_rate_7d"].value == 2 / 3
        assert values["preferred_hour"].value == 8 and state.offset_s == 3600
    assert states[2] == states[3] and states[2].count("task.completed") == 2
    one = fold_all([created, first])
    assert not apply(one, again) and one == states[0], "the smaller local hour changes nothing"
    other = fold_all([created, again])
    assert apply(other, first) and other.dropped == 1, "the larger one replaces it, and says so"
    assert other == states[0] and not apply(other, again) and not apply(other, first)


def test_a_checkpoint_holding_a_completion_in_two_local_hours_restores_to_one() -> None:
    """Written before a completion's copies were one event, by either layout: the state restored is the one
    the events fold to now (one record, the larger local hour), and each event again changes nothing."""
    copies = [_completed("e", "2026-11-26T08:00:00+01:00"), _completed("e", "2026-11-26T07:00:00+00:00"),
              _completed("e", "2026-11-26T15:30:00+08:30")]
    events = [_completed("d", "2026-11-25T08:00:00+01:00"), *copies, _completed("f", "2026-11-27T08:00:00+01:00")]
    folded = fold_all(events)
    assert folded.count("task.completed") == 3
    before = UserState.from_bytes(folded.to_bytes())
    i, record = fold.KIND_INDEX["task.completed"], fold.RECORDS["task.completed"]
    rows = sorted(record.pack(to_ms(e.ts) - before.base_ms, fingerprint(e.id) & 0xFFFF, fingerprint("t"), e.ts.hour)
                  for e in events)
    before.logs[i] = b"".join(sorted(rows, key=lambda r: (record.unpack(r)[0], r)))
    assert before.count("task.completed") == 5
    for blob in (before.to_bytes(), _v1_blob(events)):
        restored = UserState.from_bytes(blob)
        assert restored == folded and restored.records("task.completed")["local_hour"].tolist() == [8, 15, 8]
        assert not any(apply(restored, event) for event in events) and restored == folded
    with mock.patch.object(fold, "MAX_RECORDS_PER_KIND", 2):  # merged before the cap counts
        assert UserState.from_bytes(before.to_bytes()) == fold_all(events)


def test_a_dropped_event_s_zone_counts_at_the_newest_instant() -> None:
    def opened(i: int, ts: str) -> Any:
        return parse_event(orjson.dumps({"id": f"e{i}", "type": "app.opened", "user_id": "u", "ts": ts}))

    with mock.patch.object(fold, "MAX_RECORDS_PER_KIND", 3):
        events = [opened(i, "2026-11-26T08:00:00+00:00") for i in range(4)]
        # At one time, records are in the order of their bytes: the fingerprint's, little-endian.
        lowest = min(events, key=lambda e: struct.pack("<H", fingerprint(e.id) & 0xFFFF))
        zoned = opened(int(lowest.id[1:]), "2026-11-26T10:00:00+02:00")  # the same event id, instant and record
        others = [e for e in events if e is not lowest]
        first, last = fold_all([zoned, *others]), fold_all(others)
        assert apply(last, zoned), "the zone changed"
        assert last == first and last.offset_s == 7200 and last.count("app.opened") == 3


@settings(max_examples=30, deadline=None)
@given(event_log())
def test_a_checkpoint_holding_more_than_the_cap_restores_to_the_state_its_events_fold_to(events: list[Any]) -> None:
    """Written before the cap, by either layout: the state restored is the one the events fold to now,
    and each event again changes nothing (it dropped the excess while saying it had not)."""
    uncapped = fold_all(events).to_bytes()
    with mock.patch.object(fold, "MAX_RECORDS_PER_KIND", 3):
        folded = fold_all(events)
        for blob in (uncapped, _v1_blob(events)):
            restored = UserState.from_bytes(blob)
            assert restored == folded
            assert not any(apply(restored, event) for event in events) and restored == folded


@st.composite
def horizon_crossing_log(draw: Any) -> list[Any]:
    """Few instants (so records share times at the cap), some a day, the horizon (31 days) or a rebase
    (8 days) apart, in several zones, with redeliveries."""
    days = [0, 1, 7, 8, 9, 16, 30, 31, 32, 40, 49]
    instants = [BASE + timedelta(days=draw(st.sampled_from(days)), milliseconds=draw(st.sampled_from([0, 1, DAY_MS - 1])))
                for _ in range(draw(st.integers(1, 5)))]
    raw = []
    for i in range(draw(st.integers(1, 20))):
        moment, kind, task = draw(st.sampled_from(instants)), draw(st.sampled_from(KINDS)), f"t-{draw(st.integers(0, 2))}"
        offset = timezone(timedelta(minutes=draw(st.sampled_from(ZONES_MIN))))
        data = {"task.created": {"task_id": task, "due": (moment + timedelta(hours=3)).isoformat()},
                "task.completed": {"task_id": task}, "task.deleted": {"task_id": task},
                "task.rescheduled": {"task_id": task, "due": moment.isoformat()}, "app.opened": {},
                "tip.shown": {"tip_id": "tip-0"}, "tip.reacted": {"tip_id": "tip-0", "reaction": "liked"}}[kind]
        raw.append({"id": f"e-{i}", "type": kind, "user_id": "u", "ts": moment.astimezone(offset).isoformat(),
                    "data": data})
    return [parse_event(orjson.dumps(e)) for e in raw + sent_again(draw, raw, 5)]


@settings(max_examples=80, deadline=None)
@given(horizon_crossing_log(), st.integers(1, 3), st.data())
def test_at_the_cap_a_live_fold_with_restarts_and_views_alive_equals_the_whole_log_s(
        events: list[Any], cap: int, data: st.DataObject) -> None:
    """Heavy users' logs (bytearrays grown and cut in place, here from the first record) with numpy
    views of them alive (the copy on BufferError), restarts from the checkpoint's bytes between
    events, the daily prune and the rebase: the state is the one the whole log folds to in order."""
    with mock.patch.object(fold, "MAX_RECORDS_PER_KIND", cap), mock.patch.object(fold, "APPEND_IN_PLACE_BYTES", 0):
        whole = fold_all(sorted(events, key=lambda e: (e.ts, e.id)))
        live, views = UserState(), []
        for event in data.draw(st.permutations(events), label="arrival"):
            step = data.draw(st.sampled_from(["fold", "fold", "restart", "view", "release"]), label="step")
            if step == "restart":
                live, views = UserState.from_bytes(live.to_bytes()), []
            elif step == "view":
                views.append(live.records(data.draw(st.sampled_from(KINDS), label="kind")))
            elif step == "release":
                views.clear()
            apply(live, event)
        assert live == whole
