"""Forgetting users who left: when each user last taught a model something, and what names
their own features.

A model gains weights with every user who reacts (their `user_id` one-hot and its crosses), and
kept them for as long as the version lived: 1.4 KB a user, so ~1.4 GB and a ~0.5 s copy on the
event loop per snapshot at a million users, most of whom never come back. `UserExpiry` tells the
model which users have not reacted for more than `ttl_ms` of the newest reaction learned, so it
can drop their features; a user who returns starts again from what every user shares, as a new
one does.

Time here is the log's (when JetStream stored each reaction), never the clock's: a rebuild from
the log, or a restart that replays it, learns the same reactions at the same times, and so
forgets the same users at the same points, to the same weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import orjson

DAY_MS = 86_400_000
BUCKETS_PER_TTL = 32

Gone = list[tuple[str, tuple[Hashable, ...]]]  # (user, their tags)


class UserExpiry:
    """Each user's last reaction (log time, ms) and tags: what the model needs to name the user's
    own features (`TipModel` tags a cross by the other member's label; here they are opaque,
    hashable and JSON-able). Equal tags are stored once (`canonical`), so a user costs a pointer a
    tag, also after a restart.

    `touch` records a reaction and answers the (user, tags) of those who have not reacted for more
    than `ttl_ms`. Users are kept in buckets of `ttl_ms / 32` of log time by their last reaction,
    so a bucket whose end is `ttl_ms` behind goes whole, at a cost that grows with the users it
    holds, not with all of them (a sweep over all took 0.1-0.6 s of the event loop at a million).
    A user goes at most 1/32 of the TTL late, unless they come back first: then they are answered
    at once, to start anew.

    >>> expiry = UserExpiry(ttl_ms=64)  # buckets of 2 ms
    >>> expiry.touch("a", [], at_ms=0), expiry.touch("b", [], at_ms=5)
    ([], [])
    >>> expiry.touch("b", [("focus",)], at_ms=65)  # "a" reacted 65 ms ago; its bucket, [0, 2), ends at 2
    []
    >>> expiry.touch("b", [], at_ms=66)
    [('a', ())]
    >>> len(expiry), expiry.users["b"]
    (1, (66, (('focus',),)))

    A reaction stored before the newest one learned (the log's order is the learner's, not the
    stored times') counts at the newest time:

    >>> expiry.touch("c", [], at_ms=3), expiry.users["c"][0]
    ([], 66)

    A user back after more than `ttl_ms`, whose bucket has not gone yet, is answered all the same,
    before this reaction is learned, with the tags of before it; they keep only the new ones:

    >>> expiry.touch("b", [("breaks",)], at_ms=131), expiry.users["b"]
    ([('b', (('focus',),))], (131, (('breaks',),)))
    """

    def __init__(self, ttl_ms: int) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be > 0, got {ttl_ms!r}")
        self.ttl_ms = ttl_ms
        self.bucket_ms = max(1, ttl_ms // BUCKETS_PER_TTL)
        self.now_ms = 0  # the newest log time learned
        # user -> (last reaction, tags). Immutable values: a shallow copy is a snapshot.
        self.users: dict[str, tuple[int, tuple[Hashable, ...]]] = {}
        self.buckets: dict[int, set[str]] = {}  # last reaction // bucket_ms -> those users
        self.canonical: dict[Hashable, Hashable] = {}  # each tag once
        # No bucket below this is left (a reaction goes to the bucket of the newest time, never an
        # older one): until the cutoff's bucket moves past it, there is nothing to look for.
        self.swept_below = 0

    def __len__(self) -> int:
        return len(self.users)

    def touch(self, user: str, tags: Iterable[Hashable], at_ms: int) -> Gone:
        """Record that `user`, whose own features include those `tags` name, reacted at `at_ms`;
        answer the (user, tags) of those found to have not reacted for more than `ttl_ms`, `user`
        among them, with the tags of before this reaction, when that is so."""
        now = self.now_ms = max(self.now_ms, int(at_ms))
        cutoff = now - self.ttl_ms
        gone: Gone = []
        users, buckets = self.users, self.buckets
        bucket = now // self.bucket_ms
        entry = users.get(user)
        own: tuple[Hashable, ...] = ()
        if entry is not None:
            last, own = entry
            was = last // self.bucket_ms
            if was != bucket:
                left = buckets[was]
                left.discard(user)
                if not left:
                    del buckets[was]
                buckets.setdefault(bucket, set()).add(user)
                # Keyed anew by this very string, as the bucket now holds it: the table kept the
                # first one, and each user's id would be held twice.
                del users[user]
            if last < cutoff:
                # Gone by the rule, only not swept yet: taught on top of the old weights, they
                # would keep them for good.
                gone.append((user, own))
                own = ()
        else:
            buckets.setdefault(bucket, set()).add(user)
        added = tuple(tag for tag in tags if tag not in own)  # a handful: a tuple scan is cheapest
        if added:
            canonical = self.canonical
            own += tuple(canonical.setdefault(tag, tag) for tag in added)
        users[user] = (now, own)
        # Bucket i holds [i * bucket_ms, (i + 1) * bucket_ms): all of it is older than the cutoff
        # once i < cutoff // bucket_ms.
        ended = cutoff // self.bucket_ms
        if ended > self.swept_below:
            self.swept_below = ended
            for i in sorted(i for i in buckets if i < ended):  # a few dozen buckets at most
                for u in buckets.pop(i):
                    gone.append((u, users.pop(u)[1]))
        return gone

    def forget(self, user: str) -> tuple[Hashable, ...] | None:
        """Stop keeping `user` (a request to forget them); the tags of their own features, or None
        when they are not held.

        >>> expiry = UserExpiry(ttl_ms=64)
        >>> expiry.touch("a", [("focus",)], at_ms=0), expiry.touch("b", [], at_ms=1)
        ([], [])
        >>> expiry.forget("a"), expiry.forget("a"), len(expiry), expiry.buckets
        ((('focus',),), None, 1, {0: {'b'}})
        """
        entry = self.users.pop(user, None)
        if entry is None:
            return None
        bucket = entry[0] // self.bucket_ms
        held = self.buckets.get(bucket)
        if held is not None:
            held.discard(user)
            if not held:
                del self.buckets[bucket]
        return entry[1]

    # -- copies and snapshots ------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> UserExpiry:
        # The values are immutable, so shallow copies of the tables are deep ones, at C speed
        # (`TipModel.frozen` takes it on the event loop).
        clone = UserExpiry(self.ttl_ms)
        clone.now_ms, clone.swept_below = self.now_ms, self.swept_below
        clone.users, clone.canonical = self.users.copy(), self.canonical.copy()
        clone.buckets = {i: users.copy() for i, users in self.buckets.items()}
        return clone

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Flat buffers, as the model's tables (`models.snapshot._Pickler`): a million users pickled
        # one tuple at a time hold the writer thread's GIL for one long C call. Tags are written
        # once, users' tags as their numbers; buckets follow from the times.
        number = {tag: n for n, tag in enumerate(self.canonical)}
        values = self.users.values()
        return _from_buffers, (self.ttl_ms, self.now_ms, orjson.dumps(list(self.canonical)),
                               orjson.dumps(list(self.users)),
                               np.fromiter((last for last, _ in values), np.int64, len(values)).tobytes(),
                               orjson.dumps([[number[tag] for tag in own] for _, own in values]))


def _tag(item: Any) -> Hashable:
    return tuple(_tag(i) for i in item) if type(item) is list else item  # JSON gave tuples back as lists


def _from_buffers(ttl_ms: int, now_ms: int, tags: bytes, users: bytes, lasts: bytes, owns: bytes) -> UserExpiry:
    """
    >>> import pickle
    >>> expiry = UserExpiry(ttl_ms=10); _ = expiry.touch("a", [(0, "focus")], at_ms=7)
    >>> again = pickle.loads(pickle.dumps(expiry))
    >>> again.users, again.buckets, again.canonical
    ({'a': (7, ((0, 'focus'),))}, {7: {'a'}}, {(0, 'focus'): (0, 'focus')})
    """
    expiry = UserExpiry(ttl_ms)
    expiry.now_ms = now_ms
    table = [_tag(tag) for tag in orjson.loads(tags)]
    expiry.canonical = {tag: tag for tag in table}
    names = orjson.loads(users)
    times = np.frombuffer(lasts, np.int64).tolist()
    expiry.users = {user: (last, tuple(table[n] for n in own))
                    for user, last, own in zip(names, times, orjson.loads(owns))}
    bucket_ms = expiry.bucket_ms
    for user, last in zip(names, times):
        expiry.buckets.setdefault(last // bucket_ms, set()).add(user)
    return expiry
