"""Synthetic traffic: a population of users with time zones, daily rhythms, tasks and tip tastes.

Pure and seeded: the same seed gives the same events. `tipstream simulate` publishes
them through JetStream; tests and benchmarks use them directly.

>>> population = Population(users=3, seed=7)
>>> events = list(population.history(days=2, start_ms=1_790_000_000_000))
>>> sorted({e["type"] for _, e in events}) == sorted(EVENT_MIX)
True
>>> all(subject.endswith(e["type"]) for subject, e in events)
True
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from streams.events import REACTIONS, subject_for

DAY_MS = 86_400_000
# What a typical user does in a day (about 20 events).
EVENT_MIX = {
    "app.opened": 4.0, "task.created": 6.0, "task.completed": 5.0, "task.rescheduled": 1.0,
    "task.deleted": 1.0, "tip.shown": 2.0, "tip.reacted": 1.0,
}
# The same day without tips: for an app that shows the tips /score picks (`score_body`, `react`).
APP_MIX = {kind: weight for kind, weight in EVENT_MIX.items() if not kind.startswith("tip.")}
TIP_CATEGORIES = ("focus", "planning", "breaks", "batching", "review")
TIPS_PER_CATEGORY = 4
OFFSETS_MIN = (-480, -300, -240, 0, 60, 120, 330, 540)


@dataclass
class SimUser:
    user_id: str
    offset_min: int
    peak_hour: float  # local hour of most activity
    taste: dict[str, float]  # category -> probability of a positive reaction
    open_tasks: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
    task_counter: int = 0


def tip_ids() -> list[str]:
    return [f"tip-{c}-{i}" for c in TIP_CATEGORIES for i in range(TIPS_PER_CATEGORY)]


def category_of(tip_id: str) -> str:
    return tip_id.split("-")[1] if tip_id.count("-") >= 2 else "other"


def local_time(user: SimUser, at: datetime) -> datetime:
    return at.astimezone(timezone(timedelta(minutes=user.offset_min)))


def score_body(user: SimUser, at: datetime, tips: Sequence[str]) -> dict[str, Any]:
    """The `/score` request the user's app sends to pick one of `tips` at `at`, in the user's time zone.

    >>> user = SimUser("u-1", 60, 14.0, {})
    >>> score_body(user, datetime(2026, 11, 26, 8, tzinfo=timezone.utc), ["tip-focus-0"])
    {'user_id': 'u-1', 'context': {'now': '2026-11-26T09:00:00+01:00'}, 'candidates': [{'tip_id': 'tip-focus-0', 'category': 'focus'}]}
    """
    return {"user_id": user.user_id, "context": {"now": local_time(user, at).isoformat()},
            "candidates": [{"tip_id": tip, "category": category_of(tip)} for tip in tips]}


def expected_reward(user: SimUser, tips: Sequence[str], rewards: Mapping[str, float]) -> float:
    """What a tip picked at random among `tips` earns `user` on average (`Population.reaction`'s odds).

    >>> user = SimUser("u-1", 0, 14.0, {"focus": 0.75, "breaks": 0.1})
    >>> rewards = {"acted": 1.0, "liked": 0.8, "snoozed": 0.3, "dismissed": 0.0, "disliked": 0.0}
    >>> round(expected_reward(user, ["tip-focus-0"], rewards), 4), round(expected_reward(user, ["tip-breaks-1"], rewards), 4)
    (0.7, 0.18)
    """
    positive = statistics.mean(rewards[reaction] for reaction in REACTIONS[:2])
    negative = statistics.mean(rewards[reaction] for reaction in REACTIONS[2:])
    return statistics.mean(user.taste.get(category_of(tip), 0.1) * positive
                           + (1 - user.taste.get(category_of(tip), 0.1)) * negative for tip in tips)


class Population:
    def __init__(self, users: int, seed: int = 1, user_prefix: str = "u",
                 mix: Mapping[str, float] = EVENT_MIX, traffic_seed: int | None = None, run: str = "") -> None:
        """`seed` draws the users (time zones, rhythms, tastes) and, unless `traffic_seed` is given,
        what they do; event ids are unique per (`seed`, `traffic_seed`, `run`): a `run` of its own
        lets the same traffic be sent again, which JetStream would otherwise drop as duplicates.

        >>> first, second = Population(3, seed=7, traffic_seed=1), Population(3, seed=7, traffic_seed=2)
        >>> [user.taste for user in first.users] == [user.taste for user in second.users]
        True
        >>> first.live(1_790_000_000_000)[1]["id"] != second.live(1_790_000_000_000)[1]["id"]
        True
        """
        self._kinds, self._weights = tuple(mix), tuple(mix.values())
        self.rng = random.Random(seed)
        self.users = [self._make_user(f"{user_prefix}-{i}") for i in range(users)]
        self.tips = tip_ids()
        self._seq = 0
        run = f".{run}" if run else ""
        self._prefix = f"sim{seed}{run}-{user_prefix}"
        if traffic_seed is not None:
            self.rng.seed(traffic_seed)
            self._prefix = f"sim{seed}.{traffic_seed}{run}-{user_prefix}"

    def _make_user(self, user_id: str) -> SimUser:
        rng = self.rng
        liked = rng.sample(TIP_CATEGORIES, 2)
        taste = {c: (0.75 if c in liked else 0.1) for c in TIP_CATEGORIES}
        return SimUser(user_id, rng.choice(OFFSETS_MIN), rng.gauss(14, 3) % 24, taste)

    def activity(self, user: SimUser, local_hour: float) -> float:
        """Relative activity at a local hour: a daily bump around the user's peak, quiet at night."""
        distance = min(abs(local_hour - user.peak_hour), 24 - abs(local_hour - user.peak_hour))
        return 0.05 + math.exp(-(distance**2) / 18)

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}-{self._seq}"

    def event(self, user: SimUser, ts_ms: int) -> tuple[str, dict[str, Any]]:
        """One plausible next event for `user` at `ts_ms`."""
        rng = self.rng
        kind = rng.choices(self._kinds, self._weights)[0]
        if kind in ("task.completed", "task.rescheduled", "task.deleted") and not user.open_tasks:
            kind = "task.created"
        if kind == "tip.reacted" and not user.shown:
            kind = "tip.shown"
        zone = timezone(timedelta(minutes=user.offset_min))
        moment = datetime.fromtimestamp(ts_ms / 1000, tz=zone)
        data: dict[str, Any] = {}
        if kind == "task.created":
            user.task_counter += 1
            task_id = f"t-{user.task_counter}"
            user.open_tasks.append(task_id)
            data = {"task_id": task_id, "priority": rng.randint(1, 4)}
            if rng.random() < 0.6:
                data["due"] = (moment + timedelta(hours=rng.uniform(2, 72))).isoformat()
        elif kind in ("task.completed", "task.deleted"):
            task_id = user.open_tasks.pop(rng.randrange(len(user.open_tasks)))
            data = {"task_id": task_id}
        elif kind == "task.rescheduled":
            data = {"task_id": rng.choice(user.open_tasks), "due": (moment + timedelta(days=rng.uniform(1, 3))).isoformat()}
        elif kind == "tip.shown":
            tip = rng.choice(self.tips)
            user.shown = (user.shown + [tip])[-5:]
            data = {"tip_id": tip}
        elif kind == "tip.reacted":
            tip = user.shown.pop()
            data = {"tip_id": tip, "reaction": self.reaction(user, tip)}
        event = {"id": self._next_id(), "type": kind, "user_id": user.user_id,
                 "ts": moment.isoformat(timespec="milliseconds"), "v": 1, "data": data}
        return subject_for(kind), event

    def reaction(self, user: SimUser, tip_id: str) -> str:
        """Users react according to a hidden taste per tip category."""
        if self.rng.random() < user.taste.get(category_of(tip_id), 0.1):
            return self.rng.choice(REACTIONS[:2])
        return self.rng.choice(REACTIONS[2:])

    def react(self, user: SimUser, answer: Mapping[str, Any], at: datetime, event_id: str) -> dict[str, Any]:
        """The user's reaction to the tip ranked first in a `/score` answer: a `tip.reacted`
        feedback event naming the decision, so the learner can credit it."""
        top = answer["ranked"][0]["tip_id"]
        return {"id": event_id, "type": "tip.reacted", "user_id": user.user_id,
                "ts": local_time(user, at).isoformat(timespec="milliseconds"), "v": 1,
                "data": {"tip_id": top, "decision_id": answer["decision_id"], "reaction": self.reaction(user, top)}}

    def live(self, now_ms: int) -> tuple[str, dict[str, Any]]:
        """An event at `now_ms` from a user picked by how active they are at their local hour."""
        while True:
            user = self.rng.choice(self.users)
            local_hour = ((now_ms / 3_600_000) + user.offset_min / 60) % 24
            if self.rng.random() < self.activity(user, local_hour) / 1.05:
                return self.event(user, now_ms)

    def history(self, days: int, start_ms: int, per_day: float = sum(EVENT_MIX.values())) -> Iterator[tuple[str, dict[str, Any]]]:
        """`days` of traffic from `start_ms`, in time order, about `per_day` events per user and day."""
        for day in range(days):
            moments: list[tuple[int, int]] = []
            for index, user in enumerate(self.users):
                for _ in range(self._poisson(per_day)):
                    moments.append((start_ms + day * DAY_MS + self._time_of_day_ms(user), index))
            moments.sort()
            for ts_ms, index in moments:
                yield self.event(self.users[index], ts_ms)

    def _time_of_day_ms(self, user: SimUser) -> int:
        while True:
            utc_hour = self.rng.uniform(0, 24)
            if self.rng.random() < self.activity(user, (utc_hour + user.offset_min / 60) % 24) / 1.05:
                return int(utc_hour * 3_600_000)

    def _poisson(self, mean: float) -> int:
        # Knuth's method is fine for means around 20.
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1
