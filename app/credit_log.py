"""The rewards credited to decisions, saved as a log of one-minute rows: a snapshot writes what is new.

The learner remembers, for every decision of its join window, what it credited: feedback
replayed after a restart, or sent again, must find its reward there and not be learned twice.
These credits belong with the models and the FEEDBACK position (a credit saved ahead of the
model that learned it would make the replay skip it), so they are written with the learner's
snapshot, in its transaction. Written whole, they took 355-437 ms of the event loop and 7.1 MB
of SQL at 102,000 rewarded decisions (`bench/snapshot.py`), every few seconds, growing with the
window. Here each minute of credits is a row of `learner_state` (`credits:<minute since the
epoch>`), holding each decision credited in that minute with all its credits so far: a
snapshot writes the rows of the minutes since the last one known to be saved, and deletes
those older than the join window. Read back in order, a decision's newest row wins.

>>> log = CreditLog()
>>> log.credit("d-1", {"tip-1": 1.0}, 1_000, now_ms=120_500)
>>> log.changes(gen=1)
{'credits:2': b'{"d-1":[{"tip-1":1.0},1000]}'}
>>> log.credit("d-1", {"tip-1": 1.0, "tip-2": 0.3}, 2_000, now_ms=185_000)
>>> log.confirmed(1); log.changes(gen=2)
{'credits:3': b'{"d-1":[{"tip-1":1.0,"tip-2":0.3},2000]}'}
>>> CreditLog().load({"credits:3": b'{"d-1":[{"tip-1":1.0,"tip-2":0.3},2000]}',
...                   "credits:2": b'{"d-1":[{"tip-1":1.0},1000]}'})
{'d-1': ({'tip-1': 1.0, 'tip-2': 0.3}, 2000)}
>>> log.drop_before(180_000)  # minute 2 is out of the join window; gen 2 is not confirmed yet
>>> log.changes(gen=3)
{'credits:2': None, 'credits:3': b'{"d-1":[{"tip-1":1.0,"tip-2":0.3},2000]}'}
"""

from __future__ import annotations

from collections import OrderedDict

import orjson

from app.start_errors import reading_learner_row

MINUTE_MS = 60_000
ROW_PREFIX = "credits:"
Credits = tuple[dict[str, float], int | None]


class CreditLog:
    """Credits by the minute they were given; only minutes not yet known to be saved stay in memory."""

    def __init__(self) -> None:
        self._open: dict[int, dict[str, list]] = {}  # minute -> {decision id: [credits, rewarded ms]}
        # Minutes with a row (or about to have one), oldest first: minutes only grow, and the oldest
        # leave first, which an OrderedDict does in O(1) (a dict would rescan its deleted slots).
        self._rows: OrderedDict[int, None] = OrderedDict()
        self._newest = 0  # credits never go to a minute before it, whose row may be saved and closed
        self._dirty: set[int] = set()
        # The last snapshot not confirmed, and the minutes it wrote. One is enough: each snapshot
        # writes again every minute of those before it not confirmed (kept one per snapshot, N
        # failed in a row, a database outage, held N ever larger sets).
        self._unconfirmed_gen: int | None = None
        self._unconfirmed: set[int] = set()
        # Decisions of forgotten users whose credits the saved rows may still hold -> the snapshot that
        # last asked for them to go (None: none yet): asked again until one is confirmed.
        self._forgotten: dict[str, int | None] = {}

    def credit(self, decision_id: str, credits: dict[str, float], rewarded_ms: int | None, now_ms: int) -> None:
        """Record all of a decision's credits so far, given at `now_ms`."""
        minute = self._newest = max(now_ms // MINUTE_MS, self._newest)
        self._open.setdefault(minute, {})[decision_id] = [credits, rewarded_ms]
        self._rows[minute] = None
        self._dirty.add(minute)

    def forget(self, decision_ids: set[str]) -> None:
        """Let go of these decisions' credits (a forgotten user's): from the minutes in memory now, and
        from the rows saved, closed ones too, by the next snapshot (`forgotten`).

        >>> log = CreditLog()
        >>> log.credit("d-1", {"tip-1": 1.0}, 1_000, now_ms=120_500)
        >>> log.credit("d-2", {"tip-1": 0.0}, 1_000, now_ms=120_600)
        >>> log.forget({"d-1"}); log.changes(gen=1), log.forgotten(gen=1)
        ({'credits:2': b'{"d-2":[{"tip-1":0.0},1000]}'}, ['d-1'])
        >>> log.confirmed(1); log.forgotten(gen=2)
        []
        """
        for minute, credits in self._open.items():
            if not credits.keys().isdisjoint(decision_ids):
                for decision_id in decision_ids:
                    credits.pop(decision_id, None)
                self._dirty.add(minute)
        self._forgotten.update(dict.fromkeys(decision_ids))

    def forgotten(self, gen: int) -> list[str]:
        """The decisions whose credits snapshot `gen` deletes from every saved row (`forget`)."""
        for decision_id in self._forgotten:
            self._forgotten[decision_id] = gen
        return sorted(self._forgotten)

    def drop_before(self, ms: int) -> None:
        """Delete the minutes that end at or before `ms`: their decisions are out of the join window."""
        rows = self._rows
        while rows and (next(iter(rows)) + 1) * MINUTE_MS <= ms:
            minute, _ = rows.popitem(last=False)
            self._open.pop(minute, None)
            self._dirty.add(minute)

    def changes(self, gen: int) -> dict[str, bytes | None]:
        """The rows snapshot `gen` writes (None: delete): the minutes changed since the last snapshot,
        and again those of snapshots not confirmed (failed)."""
        minutes = self._dirty | self._unconfirmed
        self._dirty = set()
        if minutes:
            self._unconfirmed_gen, self._unconfirmed = gen, minutes
        # A minute emptied (`forget`) goes: a row of no credits would stay until the window passed it.
        return {f"{ROW_PREFIX}{m}": orjson.dumps(self._open[m]) if m in self._rows and self._open.get(m) else None
                for m in sorted(minutes)}

    def confirmed(self, gen: int) -> None:
        """Snapshot `gen` is saved, and with it the minutes of those before it: past minutes saved
        leave memory (the newest stays open: more credits may come in it)."""
        if self._unconfirmed_gen is not None and self._unconfirmed_gen <= gen:
            self._unconfirmed_gen, self._unconfirmed = None, set()
        if self._forgotten:
            self._forgotten = {d: sent for d, sent in self._forgotten.items() if sent is None or sent > gen}
        keep = self._dirty | self._unconfirmed
        for minute in [m for m in self._open if m != self._newest and m not in keep]:
            del self._open[minute]

    def load(self, rows: dict[str, bytes]) -> dict[str, Credits]:
        """Read the `credits:<minute>` rows of `learner_state` (others are ignored): each decision's
        credits, from the newest row it is in. Credits given from now on go to a later minute."""
        minutes = sorted((int(name[len(ROW_PREFIX):]), data) for name, data in rows.items()
                         if name.startswith(ROW_PREFIX))
        credits: dict[str, Credits] = {}
        for minute, data in minutes:
            with reading_learner_row(f"{ROW_PREFIX}{minute}"):  # a traceback named neither the row nor a fix
                for decision_id, (rewards, rewarded_ms) in orjson.loads(data).items():
                    credits[decision_id] = (rewards, rewarded_ms)
            self._rows[minute] = None
            self._newest = max(self._newest, minute + 1)
        return credits
