"""Reactions waiting for the decision they name, bounded in count and age.

Feedback can come before its decision: the decision is still on its way through DECISIONS (read
back after a start, or published by another process), or it never comes (a client inventing
ids). Each reaction waits here until its decision arrives (`take`), or is given up on as the
oldest past `max_count` or older than `max_age_s` (`expire`). The learner counts the outcomes.

A reaction waits as (decision, tip, user): only the decision says whose it is, so another user's
reaction to the same tip (an app's bug, or someone naming another user's decision id) waits beside
the decision's user's own, which it would otherwise shut out as a duplicate; the learner refuses
it when the decision comes (`wrong_user`). The same user's again is a duplicate.

The waiting reactions are part of the learner's snapshot. At the bound (100,000 by default)
serialising them all took 22-29 ms of the event loop, every snapshot, so they are held by the
bucket of time they arrived in (`BUCKET_S`) and a snapshot serialises again only the buckets an
arrival, a join or an expiry changed.

>>> waiting = WaitingFeedback(max_count=3, max_age_s=60)
>>> waiting.hold("d-1", "tip-a", ("acted", 100.0, "u-1", None))
>>> waiting.hold("d-2", "tip-b", ("liked", 101.0, "u-9", None))  # not d-2's user, which only d-2 can tell
>>> waiting.hold("d-2", "tip-b", ("liked", 101.5, "u-2", None))
>>> waiting.hold("d-3", "tip-c", ("liked", 102.0, "u-3", None))
>>> waiting.expire(now=102.0)  # past the count: the oldest goes
1
>>> waiting.take("d-2")
{('tip-b', 'u-9'): ('liked', 101.0, 'u-9', None), ('tip-b', 'u-2'): ('liked', 101.5, 'u-2', None)}
>>> len(waiting), waiting.holds("d-3", "tip-c", "u-3"), waiting.holds("d-3", "tip-c", "u-9"), waiting.expire(now=163.0)
(1, True, False, 1)
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson

# Seconds of arrival per bucket: enough buckets that few change between two snapshots, few enough
# that each holds many reactions.
BUCKET_S = 5

# (reaction, arrival in s, user id, when FEEDBACK stored it in ms): the arrival times the wait, on
# the learner's clock, or in FEEDBACK's time while a start reads it back (`Learner._waiting_now`);
# the stored time stamps the reward once the decision comes. The user is None only in what a
# snapshot from before 2026-12-03 saved.
Waiting = tuple[str, float, str | None, int | None]
# (tip id, user id): a decision's reactions by this, one per user for each tip.
Key = tuple[str, str | None]


def _bucket(arrived: float) -> int:
    return int(arrived // BUCKET_S)


class WaitingFeedback:
    def __init__(self, max_count: int, max_age_s: float) -> None:
        self.max_count, self.max_age_s = max_count, max_age_s
        self.by_decision: dict[str, dict[Key, Waiting]] = {}
        self._count = 0
        # Arrival order, for giving up on the oldest; it may also hold entries joined since, which
        # are skipped when they come up.
        self._order: deque[tuple[float, str, Key]] = deque()
        # bucket -> decisions with a reaction waiting since then; and the buckets serialised and
        # unchanged since.
        self._buckets: dict[int, set[str]] = {}
        self._json: dict[int, bytes] = {}
        # The last reaction given up on (decision, tip, user), for the log to name one the publisher can look for.
        self.last_given_up: tuple[str, str, str | None] | None = None

    def __len__(self) -> int:
        """Reactions waiting."""
        return self._count

    def holds(self, decision_id: str, tip_id: str, user_id: str | None) -> bool:
        return (tip_id, user_id) in self.by_decision.get(decision_id, ())

    def hold(self, decision_id: str, tip_id: str, entry: Waiting) -> None:
        """`entry` waits for `decision_id`; the caller knows (`holds`) that none of its user's for
        this tip does."""
        key = (tip_id, entry[2])
        self.by_decision.setdefault(decision_id, {})[key] = entry
        self._count += 1
        self._order.append((entry[1], decision_id, key))
        bucket = _bucket(entry[1])
        self._buckets.setdefault(bucket, set()).add(decision_id)
        self._json.pop(bucket, None)

    def take(self, decision_id: str) -> dict[Key, Waiting] | None:
        """The reactions waiting for `decision_id`, which has arrived, in the order they came: they
        wait no more."""
        waiting = self.by_decision.pop(decision_id, None)
        if waiting:
            self._count -= len(waiting)
            for entry in waiting.values():
                self._unbucket(decision_id, entry[1], {})
        return waiting

    def drop_user(self, user_id: str) -> int:
        """Let go of every reaction of `user_id` waiting (a user to forget); how many."""
        dropped = 0
        for decision_id in list(self.by_decision):
            waiting = self.by_decision[decision_id]
            for key in [key for key in waiting if key[1] == user_id]:
                entry = waiting.pop(key)
                self._count -= 1
                dropped += 1
                self._unbucket(decision_id, entry[1], waiting)
            if not waiting:
                del self.by_decision[decision_id]
        return dropped

    def expire(self, now: float) -> int:
        """Give up on the oldest reactions past the count, and on those older than `max_age_s`;
        how many."""
        order, by_decision, expired = self._order, self.by_decision, 0
        while order and (self._count > self.max_count or order[0][0] < now - self.max_age_s):
            arrived, decision_id, key = order.popleft()
            # Skipped: joined since, or joined and waiting again (a decision without a time in its
            # id, let go by the join cache, the reaction sent again): that wait has its own place.
            if self._waits(arrived, decision_id, key):
                waiting = by_decision[decision_id]
                del waiting[key]
                self._count -= 1
                expired += 1
                self.last_given_up = (decision_id, *key)
                self._unbucket(decision_id, arrived, waiting)
                if not waiting:
                    del by_decision[decision_id]
        if len(order) > 2 * self.max_count:
            # Mostly reactions joined since, kept until they come to the front: they go, those waiting stay
            # (within the count and the age). Given up from the front instead, a reaction waiting well within
            # both went, its decision coming in time, once twice the count had joined behind it.
            # One place each (a reaction joined and waiting again may have two alike): at most the count are
            # left, so it is rebuilt once per `max_count` arrivals at most.
            kept: deque[tuple[float, str, Key]] = deque()
            placed: set[tuple[str, Key]] = set()
            for arrived, decision_id, key in order:
                if (decision_id, key) not in placed and self._waits(arrived, decision_id, key):
                    placed.add((decision_id, key))
                    kept.append((arrived, decision_id, key))
            self._order = kept
        return expired

    def _waits(self, arrived: float, decision_id: str, key: Key) -> bool:
        """Whether the reaction `_order` holds as (`arrived`, `decision_id`, `key`) still waits there."""
        waiting = self.by_decision.get(decision_id)
        entry = waiting.get(key) if waiting is not None else None
        return entry is not None and entry[1] == arrived

    def _unbucket(self, decision_id: str, arrived: float, still_waiting: dict[Key, Waiting]) -> None:
        """A reaction for `decision_id` that arrived at `arrived` waits no more; `still_waiting`
        is what of that decision does."""
        bucket = _bucket(arrived)
        self._json.pop(bucket, None)
        if any(_bucket(entry[1]) == bucket for entry in still_waiting.values()):
            return
        decisions = self._buckets.get(bucket)
        if decisions is not None:
            decisions.discard(decision_id)
            if not decisions:
                del self._buckets[bucket]

    def snapshot(self) -> list[orjson.Fragment]:
        """By bucket, each a list of [decision, tip, reaction, arrival, user, stored] in JSON (a map
        by decision and tip cannot hold two users' reactions to a tip): those unchanged since the
        last snapshot as they were serialised then. As fragments, which the state's `orjson.dumps`
        copies once: joined here first, the copies of megabytes took ~4 ms."""
        by_decision, serialised = self.by_decision, self._json
        parts = []
        for bucket, decisions in self._buckets.items():
            data = serialised.get(bucket)
            if data is None:
                data = serialised[bucket] = orjson.dumps([
                    (d, tip, *entry) for d in decisions for (tip, _), entry in by_decision[d].items()
                    if _bucket(entry[1]) == bucket])
            parts.append(orjson.Fragment(data))
        return parts

    def restore(self, state: dict[str, Any], now: float) -> None:
        """Hold again what a snapshot saved (`snapshot` under `waiting_rows`, or an earlier release's
        forms), in the order it arrived in, as arriving `now`: its decision can only come once
        DECISIONS is re-read, and time spent stopped must not give up on it before that."""
        if "waiting_rows" in state:
            saved = [row for bucket in state["waiting_rows"] for row in bucket]
        elif "waiting_buckets" in state:  # before 2026-12-05: by bucket, {decision: {tip: entry}}, one user a tip
            saved = [[d, t, *entry] for bucket in state["waiting_buckets"] for d, tips in bucket.items()
                     for t, entry in tips.items()]
        elif "waiting" in state:  # before 2026-12-03's buckets: the whole map
            saved = [[d, t, *entry] for d, tips in state["waiting"].items() for t, entry in tips.items()]
        else:  # the first form, a list; some entries without the user (before 2026-12-03) or the stored time
            saved = state["pending"]
        for decision_id, tip_id, reaction, _, *rest in sorted(saved, key=lambda item: item[3]):
            user, stored = (rest + [None, None])[:2]
            self.hold(decision_id, tip_id, (reaction, now, user, stored))
