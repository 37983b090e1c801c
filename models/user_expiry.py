"""Forgetting users who left: which of a model's features are a user's own, and when that user
last taught it something.

A model gains weights with every user who reacts (their `user_id` one-hot and its crosses), and
kept them for as long as the version lived: 1.4 KB a user, so ~1.4 GB and a ~0.5 s copy on the
event loop per snapshot at a million users, most of whom never come back. `UserExpiry` names the
features of the users whose last reaction is more than `ttl_ms` older than the newest one
learned, so the model can drop them; a user who returns starts again from what every user
shares, as a new one does.

Time here is the log's (when JetStream stored each reaction), never the clock's: a rebuild from
the log, or a restart that replays it, learns the same reactions at the same times, and so
forgets the same users at the same points, to the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

DAY_MS = 86_400_000


class UserExpiry:
    """Each user's own feature names and last reaction (log time, ms).

    `touch` records a reaction and answers the feature names of the users who have not reacted
    for more than `ttl_ms`. It looks for them once per `sweep_ms` of log time (1/32 of the TTL:
    a user goes between `ttl_ms` and 1/32 more after their last reaction), over every user: a
    Python loop, ~0.1 s at a million users in the order first seen, ~0.4 s once their
    reactions have interleaved (each entry is then a cache miss). Looking at every reaction, for the oldest user only,
    needs a table kept in order of last reaction, and the snapshot's copy of an OrderedDict
    took 0.3 us a user on the event loop, a plain dict's 0.01.

    >>> expiry = UserExpiry(ttl_ms=64)  # a sweep every 2 ms
    >>> expiry.touch("a", ["user_id_a"], at_ms=0)
    []
    >>> expiry.touch("b", ["user_id_b"], at_ms=5)
    []
    >>> expiry.touch("b", ["user_id_b", "user_id*category=b*focus"], at_ms=65)  # "a" last reacted at 0
    ['user_id_a']
    >>> len(expiry), expiry.keys_of("b")
    (1, ('user_id_b', 'user_id*category=b*focus'))

    A reaction stored before the newest one learned (the log's order is the learner's, not the
    stored times') counts at the newest time:

    >>> expiry.touch("c", ["user_id_c"], at_ms=3), expiry.touch("b", [], at_ms=100)
    ([], [])
    >>> expiry.touch("b", [], at_ms=130)
    ['user_id_c']

    A user back after more than `ttl_ms`, whom no sweep had found yet, loses what they taught
    before all the same: their old features are answered too, to be dropped before this
    reaction is learned.

    >>> expiry.touch("b", ["user_id_b"], at_ms=200), expiry.keys_of("b")
    (['user_id_b', 'user_id*category=b*focus'], ('user_id_b',))
    """

    def __init__(self, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be > 0, got {ttl_ms!r}")
        self.ttl_ms = ttl_ms
        self.sweep_ms = max(1, ttl_ms // 32)
        self.now_ms = 0  # the newest log time learned
        self.next_sweep_ms = 0
        # user -> (last reaction, own feature names). The values are immutable, so a shallow copy
        # is a snapshot (`__deepcopy__`).
        self.users: dict[str, tuple[int, tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self.users)

    def keys_of(self, user: str) -> tuple[str, ...]:
        entry = self.users.get(user)
        return entry[1] if entry is not None else ()

    def touch(self, user: str, keys: Iterable[str], at_ms: int) -> list[str]:
        """Record that `user`, whose own features include `keys`, reacted at `at_ms`; answer the
        own features of the users found to have not reacted for more than `ttl_ms`, `user`'s
        from before this reaction among them when that is so (drop them before learning it)."""
        now = self.now_ms = max(self.now_ms, int(at_ms))
        cutoff = now - self.ttl_ms
        users = self.users
        entry = users.get(user)
        gone: list[str] = []
        if entry is not None and entry[0] < cutoff:
            # Gone by the rule, only not swept yet (sweeps are 1/32 of the TTL apart, and a quiet
            # log's first reaction is the one that sweeps): taught on top of the old weights,
            # they would keep them for good.
            gone.extend(entry[1])
            entry = None
        if entry is None:
            own = tuple(keys)
        else:
            own = entry[1]
            added = tuple(k for k in keys if k not in own)  # a handful of names: a tuple scan is cheapest
            if added:
                own += added
        users[user] = (now, own)
        if now < self.next_sweep_ms:
            return gone
        self.next_sweep_ms = now + self.sweep_ms
        gone_users = [u for u, (last, _) in users.items() if last < cutoff]
        for u in gone_users:
            gone.extend(users.pop(u)[1])
        return gone

    # -- copies and snapshots ------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> UserExpiry:
        # Its values are immutable, so a shallow copy of the table is a deep one, at C speed
        # (`TipModel.frozen` takes it on the event loop).
        clone = UserExpiry(self.ttl_ms)
        clone.now_ms, clone.next_sweep_ms, clone.users = self.now_ms, self.next_sweep_ms, self.users.copy()
        return clone

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Flat buffers, as the model's tables (`models.reward._Pickler`): a million users pickled
        # one tuple at a time hold the writer thread's GIL for one long C call.
        values = self.users.values()
        return _from_buffers, (self.ttl_ms, self.now_ms, self.next_sweep_ms, orjson.dumps(list(self.users)),
                               np.fromiter((last for last, _ in values), np.int64, len(values)).tobytes(),
                               orjson.dumps([own for _, own in values]))


def _from_buffers(ttl_ms: int, now_ms: int, next_sweep_ms: int, users: bytes, lasts: bytes, owns: bytes) -> UserExpiry:
    """
    >>> import pickle
    >>> expiry = UserExpiry(ttl_ms=10); _ = expiry.touch("a", ["user_id_a"], at_ms=7)
    >>> pickle.loads(pickle.dumps(expiry)).users
    {'a': (7, ('user_id_a',))}
    """
    expiry = UserExpiry(ttl_ms)
    expiry.now_ms, expiry.next_sweep_ms = now_ms, next_sweep_ms
    expiry.users = dict(zip(orjson.loads(users), zip(np.frombuffer(lasts, np.int64).tolist(), map(tuple, orjson.loads(owns)))))
    return expiry
