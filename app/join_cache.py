"""The learner's join cache: the decisions feedback can still be joined with, oldest first.

A decision is held from when /score serves it, or when DECISIONS brings it back (a start's re-read,
another publisher's), until it leaves the join window or the memory budget lets it go, the oldest
first. While DECISIONS is re-read after a start, the decisions it brings back wait in a segment of
their own (`replayed`), ahead of those /score serves meanwhile, so that the cache stays in creation
order; `join_replayed` puts the two together once DECISIONS has caught up. Those it brings from past where
FEEDBACK has been read wait in a third (`ahead`) until FEEDBACK's time reaches when they were stored
(`release_ahead`): found by feedback meanwhile, as live, but let go of by no one, nor making others go.

The cache also knows which of its entries hold credits (`credited`): a model registered later
learns the rewards its training over the log missed from these (`unseen_rewards`). A user to forget
has their decisions found here (`decisions_of`) and let go (`drop`).

>>> joins = JoinCache(limit_bytes=10 * 1024)
>>> joins.add("d-1", Entry(b"{}", position=1, added_ms=1_000, decision=None))
>>> joins.add("d-2", Entry(b"{}", position=2, added_ms=2_000, decision=None))
>>> joins.evict(horizon=1_500)  # d-1 was added before the window's start
>>> list(joins.cache), joins.get("d-1"), joins.evicted_upto_ms, joins.front_position()
(['d-2'], None, 1000, 2)
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from app.decision_ids import decision_time_ms
from app.evaluation import TrainedOn, examples_of
from streams.scrub import belongs, may_belong, owners, spellings

# Bytes a cache entry costs beyond its payload, measured with tracemalloc: the entry and its
# OrderedDict slot 211, the decision id 79, the bytes object's header 33.
ENTRY_OVERHEAD = 323
# Budget bytes per decision remembered after it was let go with credits (`JoinCache.let_go_credited`): at ~620
# bytes each (~120 of them its users, read off the decision as it goes: ~25 us), 4096 holds ~15% of the budget in them.
LET_GO_BYTES_PER_ENTRY = 4_096


@dataclass(slots=True)
class Entry:
    data: bytes  # the decision event
    position: int  # DECISIONS position when added: re-reading from there finds it again
    added_ms: int
    decision: dict[str, Any] | None  # parsed form, kept only until its tip_scores row is marked
    credits: dict[str, float] | None = None
    rewarded_ms: int | None = None
    logged: bool = False  # read back from the DECISIONS stream
    stored_ms: int = 0  # when JetStream stored it, when read back from DECISIONS (0: not known)


def created_ms(decision_id: str, entry: Entry) -> int:
    """When the decision was made, the same on every read of the log: the time in our ids;
    another publisher's, when JetStream stored it (else when it was first held)."""
    return decision_time_ms(decision_id) or entry.stored_ms or entry.added_ms


class JoinCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        # Oldest first. An OrderedDict, not a dict: a dict evicted from the front scans the
        # deleted slots before its first live entry on every `next(iter())`: 122-269 us per
        # decision served once the default 256 MB is full (bench/caches.py). O(1) here.
        self.cache: OrderedDict[str, Entry] = OrderedDict()
        # Decisions re-read from DECISIONS after a start (`Learner.restore`) until caught up: older than
        # any /score serves meanwhile, so they are evicted first (`evict`), then joined in front.
        self.replayed: OrderedDict[str, Entry] = OrderedDict()
        # Decisions read back from past where FEEDBACK has been read (its time: `Learner._feedback_time_ms`), in the
        # order JetStream stored them, until FEEDBACK's time reaches that (`release_ahead`): FEEDBACK waits for
        # DECISIONS read further (`streams.read_up_to.DECISIONS_READ_AHEAD_S`) so that a decision of ours that JetStream
        # stored after a reaction to it is held when the reaction is read, as live held it from /score on. In the
        # cache at once, they made the oldest go sooner than live, and their reactions counted `expired`. Their
        # bytes are `ahead_bytes`, not `bytes`: the memory budget does not let them go.
        self.ahead: OrderedDict[str, Entry] = OrderedDict()
        self.ahead_bytes = 0
        self.bytes = 0
        self.evicted_upto_ms = 0  # decisions created before this are no longer joinable
        # The entries holding credits (a registration learns those its training missed).
        self.credited: dict[str, Entry] = {}
        # While `unseen_rewards` yields to the loop: the entries credited meanwhile, kept even if the
        # cache lets them go before it looks again (the live models learned their rewards).
        self.credited_during_scan: dict[str, Entry] | None = None
        # The credits of decisions let go before JetStream acknowledged them (the memory budget, JetStream
        # refusing for a while): their row is marked on the acknowledgement (`Learner.published`), with these.
        # At most the decisions waiting for JetStream (`TIPSTREAM_DECISION_QUEUE_MAX`).
        self.let_go_unlogged: dict[str, tuple[dict[str, float], int | None]] = {}
        # Another publisher's decisions (no time in their id) the memory budget let go with credits, within the join
        # window: id -> (credits, rewarded ms, when made: `created_ms`, its users: `owners`), oldest first, until the
        # window passes them. Their users, for a forget (`decisions_of`): else a copy stored after the request was done
        # came back with the forgotten user's rewards, in its row with their features as served.
        # A copy stored again (its publisher sending again after JetStream's duplicate window) is the same decision:
        # held without these, a reaction delivered again was learned twice (`Learner.add_logged`). Ours need none
        # once a start's read-back of DECISIONS is over (`end_read_back`): `evicted_upto_ms` keeps them let go. During
        # it (`reading_back`), which holds again what it reads, every decision let go with credits is kept here.
        self.let_go_credited: OrderedDict[str, tuple[dict[str, float], int | None, int, tuple[str, ...]]]
        self.let_go_credited = OrderedDict()
        self.reading_back = False
        # At most this many, the oldest going first: ~620 bytes each (tracemalloc), ~15% beside the budget. A
        # window's worth of another publisher's decisions let go with credits could outgrow the cache itself (3 days
        # at 100 a second, one in ten rewarded: 2.6 million); one past the bound, stored again, is held as new.
        self.let_go_max = max(1_000, limit_bytes // LET_GO_BYTES_PER_ENTRY)
        # The decisions the read-back brought into `replayed` since `mark`, for `added_since`: no walk back to a
        # mark finds them, as `join_replayed` may have put them in front of /score's since. Noted from a mark to
        # the `added_since` after it, or the `unmark` that ends an erasure's look however it ends, and only while
        # DECISIONS is read back after a start.
        self._replayed_since_mark: list[str] | None = None

    def __len__(self) -> int:
        return len(self.cache) + len(self.replayed) + len(self.ahead)

    def get(self, decision_id: str) -> Entry | None:
        entry = self.cache.get(decision_id)
        if entry is None and self.replayed:
            entry = self.replayed.get(decision_id)
        if entry is None and self.ahead:
            entry = self.ahead.get(decision_id)
        return entry

    def add(self, decision_id: str, entry: Entry, replayed: bool = False, ahead: bool = False) -> None:
        """Hold `entry`; the caller evicts (`evict`) once it has done what the entry's arrival asks. `ahead`: a
        decision read back from past FEEDBACK's time, held apart until `release_ahead`."""
        if ahead:
            self.ahead[decision_id] = entry
            self.ahead_bytes += len(entry.data) + ENTRY_OVERHEAD
        else:
            (self.replayed if replayed else self.cache)[decision_id] = entry
            self.bytes += len(entry.data) + ENTRY_OVERHEAD
        if (replayed or ahead) and self._replayed_since_mark is not None:
            self._replayed_since_mark.append(decision_id)

    def release_ahead(self, upto_ms: float) -> Entry | None:
        """The decisions read ahead that JetStream stored until `upto_ms` join the read-back's segment, in their
        order; the last of them (None: none). The caller evicts.

        >>> joins = JoinCache(limit_bytes=10 * 1024)
        >>> for n, stored in enumerate((100, 200, 300)):
        ...     joins.add(f"d-{n}", Entry(b"{}", position=n, added_ms=stored, decision=None, stored_ms=stored), ahead=True)
        >>> joins.release_ahead(250).stored_ms, list(joins.replayed), list(joins.ahead), joins.get("d-2").stored_ms
        (200, ['d-0', 'd-1'], ['d-2'], 300)
        """
        ahead, last = self.ahead, None
        while ahead:
            first_id, first = next(iter(ahead.items()))
            if first.stored_ms > upto_ms:
                break
            ahead.popitem(last=False)
            size = len(first.data) + ENTRY_OVERHEAD
            self.ahead_bytes -= size
            self.replayed[first_id] = first
            self.bytes += size
            last = first
        return last

    def evict(self, horizon: int, leaving: Callable[[str, Entry], None] | None = None) -> None:
        """Oldest first (creation order: the replayed segment, then insertion order): past the
        memory budget, or past the join window (added before `horizon`). `leaving` is told of each
        before it goes, while it is still held (`Learner._leaving`).

        >>> joins = JoinCache(limit_bytes=0)  # any decision is past the budget
        >>> joins.add("other-1", Entry(b"{}", 1, added_ms=5_000, decision=None, credits={"t": 1.0}, stored_ms=5_000))
        >>> joins.evict(horizon=1_000); dict(joins.let_go_credited)
        {'other-1': ({'t': 1.0}, None, 5000, ())}
        >>> joins.evict(horizon=6_000); dict(joins.let_go_credited)  # its window has passed
        {}
        >>> joins.let_go_max = 1  # past its bound, the oldest goes
        >>> for n in (1, 2):
        ...     joins.add(f"other-{n}", Entry(b"{}", n, 7_000 + n, None, credits={"t": 1.0}, stored_ms=7_000 + n))
        >>> joins.evict(horizon=6_000); list(joins.let_go_credited)
        ['other-2']
        """
        while True:
            cache = self.replayed or self.cache
            if not cache:
                break
            first_id, first = next(iter(cache.items()))
            if self.bytes <= self.limit and first.added_ms >= horizon:
                break
            if leaving is not None:
                leaving(first_id, first)
            cache.popitem(last=False)
            self.credited.pop(first_id, None)
            if first.credits and not first.logged:
                self.let_go_unlogged[first_id] = (first.credits, first.rewarded_ms)
            for_memory = first.added_ms >= horizon
            if first.credits and (self.reading_back or (for_memory and decision_time_ms(first_id) is None)):
                self.let_go_credited[first_id] = (first.credits, first.rewarded_ms, created_ms(first_id, first),
                                                  tuple(owners(first.data)))
            self.bytes -= len(first.data) + ENTRY_OVERHEAD
            self.evicted_upto_ms = max(self.evicted_upto_ms, decision_time_ms(first_id) or first.added_ms)
        let_go = self.let_go_credited
        while let_go and (len(let_go) > self.let_go_max or next(iter(let_go.values()))[2] < horizon):
            let_go.popitem(last=False)

    def end_read_back(self) -> None:
        """A start's read-back of DECISIONS has caught up: ours let go stay let go from now on (`let_go_credited`)."""
        self.reading_back = False
        for decision_id in [d for d in self.let_go_credited if decision_time_ms(d) is not None]:
            del self.let_go_credited[decision_id]

    def join_replayed(self) -> None:
        """DECISIONS has been read back to its end after a start: the decisions it brought go in
        front of those served meanwhile, which are newer."""
        if self.replayed:
            # A snapshot resumes DECISIONS from the front's position. Those served meanwhile now follow
            # the read-back's, though served at a position it had not passed yet (it passed our own, held
            # already, before bringing another's): resumed from further on, a restart did not hold them,
            # and their reactions were never learned. So the read-back's are held from no further on.
            served_from = min((entry.position for entry in self.cache.values()), default=None)
            if served_from is not None:
                for entry in self.replayed.values():
                    entry.position = min(entry.position, served_from)
            self.replayed.update(self.cache)
            self.cache, self.replayed = self.replayed, OrderedDict()

    def front_position(self) -> int | None:
        """The oldest DECISIONS position an entry was added at: re-reading from it finds them all
        again (None: nothing held)."""
        fronts = [next(iter(c.values())).position for c in (self.replayed, self.cache, self.ahead) if c]
        return min(fronts) if fronts else None

    def note_credited(self, decision_id: str, entry: Entry) -> None:
        """`entry` holds credits now: a registration's look for unseen rewards goes over these,
        and over those noted while it yields to the loop."""
        self.credited[decision_id] = entry
        if self.credited_during_scan is not None:
            self.credited_during_scan[decision_id] = entry

    async def unseen_rewards(self, trained_on: TrainedOn, chunk: int) -> list[tuple[dict[str, Any], float, int | None]]:
        """The (features as served, reward, when it reached the log) examples credited here that
        a model trained on the log (`trained_on`) has not seen: rows not written yet when it was
        read, or credited since.

        It tests every credited decision of the join window, nearly all of them seen: 70 ms of the
        loop in one turn at 100k decisions on a slow day (`bench/snapshot.py`), memory-bound. So
        it goes over a copy of their ids, yielding to the loop every `chunk` of them
        (`Learner.UNSEEN_SCAN_CHUNK`: ~100 ms in all, no turn over ~6), then over those credited
        while it yielded."""
        seen, from_ms = trained_on.credits, trained_on.from_ms
        examples: list[tuple[dict[str, Any], float, int | None]] = []
        given: dict[str, set[str]] = {}  # decision -> tips taken already, for the second pass

        def take(decision_id: str, entry: Entry) -> None:
            credits = entry.credits
            if not credits:
                return
            taken = given.get(decision_id, ())
            for tip in credits:
                if (decision_id, tip) not in seen and tip not in taken:
                    break
            else:
                return
            created = decision_time_ms(decision_id)
            if from_ms is not None and created is not None and created < from_ms:
                return  # older than what the read kept: left out on purpose
            unseen = {tip: reward for tip, reward in credits.items() if (decision_id, tip) not in seen and tip not in taken}
            given.setdefault(decision_id, set()).update(unseen)
            decision = entry.decision if entry.decision is not None else orjson.loads(entry.data)
            examples.extend((x, reward, entry.rewarded_ms) for x, reward in examples_of(decision, unseen))

        # The ids, not (id, entry) pairs: 100k new tuples set off a collection of the whole heap
        # (290 ms in one turn, bench/snapshot.py).
        credited = self.credited
        ids = list(credited)
        self.credited_during_scan = again = {}
        try:
            for start in range(0, len(ids), chunk):
                await asyncio.sleep(0)  # the first time: after the copy, itself ~3-5 ms at 100k
                for decision_id in ids[start:start + chunk]:
                    entry = credited.get(decision_id)
                    if entry is None:
                        continue  # the join cache let it go meanwhile
                    for tip in entry.credits:  # the cheap test first: nothing built for those seen
                        if (decision_id, tip) not in seen:
                            take(decision_id, entry)
                            break
        finally:
            self.credited_during_scan = None
        for decision_id, entry in again.items():  # also those the join cache let go since
            take(decision_id, entry)
        return examples

    async def decisions_of(self, user_id: str, until_ms: int, chunk: int) -> list[str]:
        """The ids of `user_id`'s decisions held (or let go with credits), made until `until_ms`, looked over
        `chunk` at a time, the event loop running between (`Learner.FORGET_SCAN_CHUNK`; a full cache, ~100,000
        decisions, is ~330 ms of matching)."""
        # Matched as the log's messages are (`streams.scrub.belongs`: another publisher's JSON may spell
        # the id with escapes, "zo\u00eb").
        users = frozenset((user_id,))
        spelt = spellings(users)
        theirs: list[str] = []
        for cache in (self.replayed, self.cache, self.ahead):
            held = list(cache.items())
            for start in range(0, len(held), chunk):
                theirs += [decision_id for decision_id, entry in held[start : start + chunk]
                           if belongs(entry.data, users, spelt) and created_ms(decision_id, entry) <= until_ms]
                await asyncio.sleep(0)
        # And those let go with credits (`let_go_credited`): a copy stored again comes back with them.
        let_go = list(self.let_go_credited.items())
        for start in range(0, len(let_go), chunk):
            theirs += [decision_id for decision_id, (_, _, made_ms, users_of) in let_go[start : start + chunk]
                       if user_id in users_of and made_ms <= until_ms]
            await asyncio.sleep(0)
        return theirs

    def mark(self) -> str | None:
        """`added_since`'s mark: the id of the decision /score added last (None while none is held). The
        decisions the read-back brings are noted from now to the `added_since`."""
        self._replayed_since_mark = []
        return next(reversed(self.cache), None)

    def unmark(self) -> None:
        """The look the mark was for has ended, whether `added_since` was reached or not (an exception, a
        cancellation): nothing more is noted. Noted on, every decision the rest of the read-back brought (all of
        DECISIONS, on a rebuild) was held in that list until the next erasure's look."""
        self._replayed_since_mark = None

    def added_since(self, mark: str | None, user_ids: frozenset[str], until_ms: int) -> dict[str, list[str]]:
        """Of the decisions added after `mark` (`mark()` then), those of `user_ids` made until `until_ms`, by
        user: /score adds at the end, so a walk back to the mark reads only those. A mark gone was let go of
        with all before it (the cache lets the oldest go first), or dropped: then every decision is read.
        Those the read-back brought since are noted apart: walked over /score's alone, a decision of the user's
        another publisher made during an erasure's look, read back then, stayed held, learned and given a row.

        >>> joins = JoinCache(1 << 20)
        >>> joins.add("d-1", Entry(b'{"user_id": "u"}', position=1, added_ms=1_000, decision=None))
        >>> mark = joins.mark()
        >>> joins.add("d-2", Entry(b'{"user_id": "u"}', position=2, added_ms=2_000, decision=None))
        >>> joins.add("d-3", Entry(b'{"user_id": "v"}', position=3, added_ms=3_000, decision=None))
        >>> joins.add("r-1", Entry(b'{"user_id": "u"}', position=4, added_ms=2_000, decision=None), replayed=True)
        >>> joins.added_since(mark, frozenset({"u", "v"}), 2_500), joins.added_since(None, frozenset({"u"}), 2_500)
        ({'u': ['d-2', 'r-1']}, {'u': ['d-2', 'd-1']})
        """
        replayed, self._replayed_since_mark = self._replayed_since_mark or [], None
        spelt = spellings(user_ids)
        found: dict[str, list[str]] = {}
        seen: set[str] = set()

        def look(decision_id: str, entry: Entry) -> None:
            if may_belong(entry.data, spelt) and created_ms(decision_id, entry) <= until_ms:
                seen.add(decision_id)
                for user_id in owners(entry.data) & user_ids:
                    found.setdefault(user_id, []).append(decision_id)

        for decision_id, entry in reversed(self.cache.items()):
            if decision_id == mark:
                break
            look(decision_id, entry)
        for decision_id in replayed:
            if decision_id not in seen and (entry := self.get(decision_id)) is not None:  # not let go of since
                look(decision_id, entry)
        return found

    def drop(self, decision_ids: list[str]) -> tuple[set[str], set[str]]:
        """Let go of these (a forgotten user's), those still held: the ids that went, and those of them
        that held credits, or were let go with credits before (`let_go_credited`)."""
        gone: set[str] = set()
        credited: set[str] = set()
        for decision_id in decision_ids:  # the cache may have let some go meanwhile
            self.let_go_unlogged.pop(decision_id, None)
            if self.let_go_credited.pop(decision_id, None) is not None:
                credited.add(decision_id)  # the credit log holds them too
            if decision_id in self.ahead:
                entry = self.ahead.pop(decision_id)
                self.ahead_bytes -= len(entry.data) + ENTRY_OVERHEAD
            else:
                cache = self.replayed if decision_id in self.replayed else self.cache
                entry = cache.pop(decision_id, None)
                if entry is None:
                    continue
                self.bytes -= len(entry.data) + ENTRY_OVERHEAD
            gone.add(decision_id)
            self.credited.pop(decision_id, None)
            if entry.credits:
                credited.add(decision_id)
        return gone, credited
