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

Each decision's users (its `user_id`) are saved with its credits, under the row's key
`""` (`USERS`), which no decision id is: a start restores credits until their decision is read back, and a user
forgotten meanwhile must take theirs with them (`Learner.forget_user`). Kept apart from the decisions' entries,
which stay `[credits, rewarded ms]`, so that a release from before (2026-12-08) still reads the row: it takes the
index for one more decision, which none ever names, where a third item in each entry stopped its start.

>>> log = CreditLog()
>>> log.credit("d-1", {"tip-1": 1.0}, 1_000, now_ms=120_500, users=("u-1",))
>>> log.changes(gen=1)
{'credits:2': b'{"d-1":[{"tip-1":1.0},1000],"":[{"d-1":["u-1"]},null]}'}
>>> log.credit("d-1", {"tip-1": 1.0, "tip-2": 0.3}, 2_000, now_ms=185_000, users=("u-1",))
>>> log.confirmed(1); log.changes(gen=2)
{'credits:3': b'{"d-1":[{"tip-1":1.0,"tip-2":0.3},2000],"":[{"d-1":["u-1"]},null]}'}
>>> CreditLog().load({"credits:3": b'{"d-1":[{"tip-1":1.0,"tip-2":0.3},2000],"":[{"d-1":["u-1"]},null]}',
...                   "credits:2": b'{"d-1":[{"tip-1":1.0},1000]}'})
{'d-1': ({'tip-1': 1.0, 'tip-2': 0.3}, 2000, ('u-1',))}
>>> log.drop_before(180_000)  # minute 2 is out of the join window; gen 2 is not confirmed yet
>>> log.changes(gen=3)
{'credits:2': None, 'credits:3': b'{"d-1":[{"tip-1":1.0,"tip-2":0.3},2000],"":[{"d-1":["u-1"]},null]}'}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

import orjson

from app.decision_ids import decision_time_ms
from app.start_errors import reading_learner_row

MINUTE_MS = 60_000
ROW_PREFIX = "credits:"
# A row's key for its decisions' users: {decision id: [user ids]}, as the entry [index, null] (see the docstring).
USERS = ""
Credits = tuple[dict[str, float], int | None]
# Also the decision's users; None: not known, saved by a release from before they were (2026-12-08), or in the
# learner's own row before the credit log. A forget cannot tell those are its user's: they stay, and a copy of the
# decision read back after it gets them back, until the join window passes them.
Restored = tuple[dict[str, float], int | None, tuple[str, ...] | None]


class CreditLog:
    """Credits by the minute they were given; only minutes not yet known to be saved stay in memory."""

    def __init__(self) -> None:
        self._open: dict[int, dict[str, list]] = {}  # minute -> {decision id: [credits, rewarded ms]}
        self._users: dict[int, dict[str, list[str]]] = {}  # minute -> {decision id: its users}, those known
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
        # Forgotten users -> (as of when, the snapshot that last asked): their decisions' entries go from every saved
        # row by the users saved with them (`theirs`), also those of decisions no longer held (`forget`).
        self._forgotten_users: dict[str, tuple[int, int | None]] = {}

    def credit(self, decision_id: str, credits: dict[str, float], rewarded_ms: int | None, now_ms: int, *,
               users: Collection[str] | None) -> None:
        """Record all of a decision's credits so far, given at `now_ms`, and its users (None: not known)."""
        minute = self._newest = max(now_ms // MINUTE_MS, self._newest)
        self._open.setdefault(minute, {})[decision_id] = [credits, rewarded_ms]
        if users is not None:
            self._users.setdefault(minute, {})[decision_id] = sorted(users)
        elif minute in self._users:
            self._users[minute].pop(decision_id, None)
        self._rows[minute] = None
        self._dirty.add(minute)

    def forget(self, decision_ids: set[str], users: Mapping[str, int] | None = None) -> None:
        """Let go of these decisions' credits (a forgotten user's), and of those whose saved users name one of
        `users` (user -> as of when, ms: `theirs`): from the minutes in memory now, and from the rows saved, closed
        ones too, by the next snapshot (`forgotten`, `forgotten_users`).

        By their users too: the join window keeps credits by the minute they were given in, and a decision by when
        it was made or stored, so one the cache let go past its window (reacted to later than made) keeps its
        credits saved until their minute leaves. Held by no cache a forget looks over, they stayed, the user's id
        with them: a start restored them, and a copy of the decision stored again came back with their rewards.

        >>> log = CreditLog()
        >>> log.credit("d-1", {"tip-1": 1.0}, 1_000, now_ms=120_500, users=("u-1",))
        >>> log.credit("d-2", {"tip-1": 0.0}, 1_000, now_ms=120_600, users=None)
        >>> log.credit("other-1", {"tip-1": 1.0}, 1_000, now_ms=120_700, users=("u-2",))  # no longer held
        >>> log.forget({"d-1"}, {"u-2": 130_000}); log.changes(gen=1), log.forgotten(gen=1)
        ({'credits:2': b'{"d-2":[{"tip-1":0.0},1000]}'}, ['d-1'])
        >>> log.forgotten_users(gen=1)
        {'u-2': 130000}
        >>> log.confirmed(1); log.forgotten(gen=2), log.forgotten_users(gen=2)
        ([], {})
        """
        users = users or {}
        for minute, credits in self._open.items():
            known = self._users.get(minute, {})
            going = {decision_id for decision_id in decision_ids if decision_id in credits}
            if users:
                going.update(decision_id for decision_id in credits
                             if theirs(decision_id, known.get(decision_id), users))
            for decision_id in going:
                del credits[decision_id]
                known.pop(decision_id, None)
            if going:
                self._dirty.add(minute)
        self._forgotten.update(dict.fromkeys(decision_ids))
        for user_id, until_ms in users.items():
            before = self._forgotten_users.get(user_id)  # asked for again: as of the later request
            self._forgotten_users[user_id] = (until_ms if before is None else max(until_ms, before[0]), None)

    def forgotten(self, gen: int) -> list[str]:
        """The decisions whose credits snapshot `gen` deletes from every saved row (`forget`)."""
        for decision_id in self._forgotten:
            self._forgotten[decision_id] = gen
        return sorted(self._forgotten)

    def forgotten_users(self, gen: int) -> dict[str, int]:
        """The users (-> as of when, ms) whose decisions' credits snapshot `gen` deletes from every saved row, by
        the users saved with them (`forget`, `theirs`)."""
        self._forgotten_users = {user_id: (until_ms, gen) for user_id, (until_ms, _) in self._forgotten_users.items()}
        return {user_id: until_ms for user_id, (until_ms, _) in sorted(self._forgotten_users.items())}

    def drop_before(self, ms: int) -> None:
        """Delete the minutes that end at or before `ms`: their decisions are out of the join window."""
        rows = self._rows
        while rows and (next(iter(rows)) + 1) * MINUTE_MS <= ms:
            minute, _ = rows.popitem(last=False)
            self._open.pop(minute, None)
            self._users.pop(minute, None)
            self._dirty.add(minute)

    def changes(self, gen: int) -> dict[str, bytes | None]:
        """The rows snapshot `gen` writes (None: delete): the minutes changed since the last snapshot,
        and again those of snapshots not confirmed (failed)."""
        minutes = self._dirty | self._unconfirmed
        self._dirty = set()
        if minutes:
            self._unconfirmed_gen, self._unconfirmed = gen, minutes
        # A minute emptied (`forget`) goes: a row of no credits would stay until the window passed it.
        return {f"{ROW_PREFIX}{m}": orjson.dumps(row(self._open[m], self._users.get(m)))
                if m in self._rows and self._open.get(m) else None for m in sorted(minutes)}

    def confirmed(self, gen: int) -> None:
        """Snapshot `gen` is saved, and with it the minutes of those before it: past minutes saved
        leave memory (the newest stays open: more credits may come in it)."""
        if self._unconfirmed_gen is not None and self._unconfirmed_gen <= gen:
            self._unconfirmed_gen, self._unconfirmed = None, set()
        if self._forgotten:
            self._forgotten = {d: sent for d, sent in self._forgotten.items() if sent is None or sent > gen}
        if self._forgotten_users:
            self._forgotten_users = {user_id: (until_ms, sent) for user_id, (until_ms, sent)
                                     in self._forgotten_users.items() if sent is None or sent > gen}
        keep = self._dirty | self._unconfirmed
        for minute in [m for m in self._open if m != self._newest and m not in keep]:
            del self._open[minute]
            self._users.pop(minute, None)

    def load(self, rows: dict[str, bytes]) -> dict[str, Restored]:
        """Read the `credits:<minute>` rows of `learner_state` (others are ignored): each decision's
        credits and users, from the newest row it is in. Credits given from now on go to a later minute."""
        minutes = sorted((int(name[len(ROW_PREFIX):]), data) for name, data in rows.items()
                         if name.startswith(ROW_PREFIX))
        credits: dict[str, Restored] = {}
        # One tuple per user, not one per decision: 426 bytes a credit restored, against 525 (422 without users;
        # tracemalloc, 100,000 credits of 5,000 users).
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        for minute, data in minutes:
            with reading_learner_row(f"{ROW_PREFIX}{minute}"):  # a traceback named neither the row nor a fix
                entries, users = split_row(orjson.loads(data))
                for decision_id, (rewards, rewarded_ms) in entries.items():
                    known = users.get(decision_id)
                    credits[decision_id] = (rewards, rewarded_ms,
                                            shared.setdefault(key := tuple(known), key) if known is not None else None)
            self._rows[minute] = None
            self._newest = max(self._newest, minute + 1)
        return credits


def row(entries: dict[str, list], users: dict[str, list[str]] | None) -> dict[str, Any]:
    """A minute's row: its decisions' entries, and the users of those known (`USERS`).

    >>> row({"d-1": [{"a": 1.0}, None], "d-2": [{"a": 0.0}, None]}, {"d-1": ["u-1"], "gone": ["u-2"]})
    {'d-1': [{'a': 1.0}, None], 'd-2': [{'a': 0.0}, None], '': [{'d-1': ['u-1']}, None]}
    """
    known = {decision_id: users[decision_id] for decision_id in entries if decision_id in users} if users else {}
    return {**entries, USERS: [known, None]} if known else entries


def split_row(saved: dict[str, Any]) -> tuple[dict[str, list], dict[str, list[str]]]:
    """A row read back: its decisions' entries, and their users known (none in a row saved before they were).

    >>> split_row({"d-1": [{"a": 1.0}, None], "": [{"d-1": ["u-1"]}, None]}), split_row({"d-1": [{"a": 1.0}, None]})
    (({'d-1': [{'a': 1.0}, None]}, {'d-1': ['u-1']}), ({'d-1': [{'a': 1.0}, None]}, {}))
    """
    index = saved.pop(USERS, None)
    return saved, (index[0] if index else {})


def theirs(decision_id: str, users: list[str] | None, forgotten: Mapping[str, int]) -> bool:
    """Whether a decision saved with `users` (None: not saved, not known) is of a user `forgotten` (-> as of when,
    ms): made until then by the time in its id, as `Learner._forgotten` judges; another publisher's (no time in its
    id) whatever its time. Its entry says only when it was last rewarded, by NATS's clock, not the one the request
    was acted on by: a second ahead, kept. One stored after the request (the user come back) and credited before
    the snapshot that deletes goes too, and its reaction sent again after a restart is learned again.

    >>> made_2024 = "d-018f5c2a3b4c" + "0" * 16
    >>> theirs(made_2024, ["u-1"], {"u-1": 2_000_000_000_000}), theirs(made_2024, ["u-1"], {"u-1": 1_000})
    (True, False)
    >>> theirs("other-1", ["u-1"], {"u-1": 1_000}), theirs("other-1", None, {"u-1": 1_000})
    (True, False)
    """
    if not users or forgotten.keys().isdisjoint(users):
        return False
    made_ms = decision_time_ms(decision_id)
    return made_ms is None or any(made_ms <= forgotten[user_id] for user_id in users if user_id in forgotten)


def without(saved: dict[str, Any], decision_ids: Collection[str],
            users: Mapping[str, int] | None = None) -> dict[str, Any] | None:
    """A row read back, rid of `decision_ids` (forgotten users' decisions) and of the decisions it saved as of
    `users` (forgotten, -> as of when: `theirs`), their users too; None when no decision is left (the row goes);
    `saved` itself when it held none of them.

    >>> saved = {"d-1": [{"a": 1.0}, None], "d-2": [{"a": 0.0}, None], "": [{"d-1": ["u-1"], "d-2": ["u-2"]}, None]}
    >>> without(saved, {"d-1"}), without(saved, {"d-1", "d-2"}), without(saved, {"d-3"}) is saved
    ({'d-2': [{'a': 0.0}, None], '': [{'d-2': ['u-2']}, None]}, None, True)
    >>> without(saved, set(), {"u-2": 1_000}), without(saved, set(), {"u-3": 1_000}) is saved
    ({'d-1': [{'a': 1.0}, None], '': [{'d-1': ['u-1']}, None]}, True)
    """
    index = saved.get(USERS, [{}])[0] if users else {}
    going = {decision_id for decision_id in decision_ids if decision_id in saved}
    going.update(decision_id for decision_id, known in index.items()
                 if decision_id in saved and theirs(decision_id, known, users or {}))
    if not going:
        return saved
    entries, known_users = split_row(dict(saved))
    kept = {decision_id: entry for decision_id, entry in entries.items() if decision_id not in going}
    return row(kept, known_users) if kept else None
