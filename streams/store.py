"""The online store: every user's fold state in memory, and the stream positions it reflects.

The API reads it from the same event loop that ingest writes it from, between two
events, so reads need no locks and never see half an event.

>>> from streams.events import parse_event
>>> store = OnlineStore()
>>> store.apply(parse_event(b'{"id": "e1", "type": "app.opened", "user_id": "u", "ts": "2026-11-26T08:00:00Z"}'))
True
>>> store.advance("SIGNALS", 1)
>>> positions, dirty = store.begin_checkpoint()
>>> positions, dirty
({'SIGNALS': 1}, ['u'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from streams.fold import DAY_MS, HORIZON_DAYS, FutureEvent, UserState, apply

# A user with no event for this long before the newest folded is idle: their state can leave memory
# (`rest`), being in the checkpoint, and comes back from it if they do (`state_of`, `apply`). The
# default of `OnlineStore.idle_days` (`TIPSTREAM_IDLE_USER_DAYS`): every window is empty by then.
IDLE_DAYS = HORIZON_DAYS + 1


class StateUnavailable(Exception):
    """A user's checkpointed state could not be read (the database is away); they stay cold, to
    be loaded at the next try. Its message says why in one line, not whose: the log shows it."""


class UnreadableState(StateUnavailable):
    """A user's `user_state` row is there and cannot be decoded (cut short, or overwritten by hand or by a disk
    fault). No retry mends it, and no state in its place is right: a fresh one served the user without their
    history, and the next checkpoint wrote it over the row, a loss no one was told of. The store tells
    `on_unreadable` (the service stops, with this message) and raises this, a StateUnavailable, so that what
    waits for the user waits as for a database away (a 503, an event not folded yet) until the stop."""

    def __init__(self, user_id: str, cause: str) -> None:
        super().__init__(
            f"{self.damaged(user_id, cause)} tipstream stops (exit code 1) rather than serve that user without their "
            f"history or save an empty state over the row. {self.fixes(user_id)} and start tipstream again.")
        self.user_id, self.cause = user_id, cause

    @staticmethod
    def damaged(user_id: str, cause: str) -> str:
        """What is wrong, for whatever read the row (the service, `tipstream users export`)."""
        return f"The user_state row of user {user_id!r} cannot be read ({cause}): the database holds it damaged."

    @staticmethod
    def fixes(user_id: str) -> str:
        """What mends it; a sentence left open, for what to do after.

        >>> UnreadableState.fixes("o'brien")[-61:]
        "delete it (DELETE FROM user_state WHERE user_id = 'o''brien')"
        """
        return ("Rebuild the database from the streams (docs/operations.md, 'Rebuilding from the log'), or restore it "
                "from a backup (docs/operations.md, 'Backups and restores'); or, to start this user afresh without the "
                f"history the row held, delete it (DELETE FROM user_state WHERE user_id = '{_sql_text(user_id)}')")


def _sql_text(text: str) -> str:
    """`text` as the inside of an SQL string literal, for an operator to paste.

    >>> _sql_text("o'brien")
    "o''brien"
    """
    return text.replace("'", "''")


class OnlineStore:
    def __init__(self) -> None:
        self.users: dict[str, UserState] = {}
        self.positions: dict[str, int] = {}
        self.applied = 0
        self.ignored = 0  # duplicates, and events older than any window can reach
        self._dirty: set[str] = set()
        # Lazy restore: users in the checkpoint not loaded yet, and how to fetch their state.
        self.cold: set[str] = set()
        # Idle users let go of since (`rest`): in the checkpoint too, fetched as cold ones are, but
        # not waited for by the warm-up (`cold` is what readiness waits on).
        self.dormant: set[str] = set()
        self.idle_days: float = IDLE_DAYS  # 0: every user stays in memory
        self.rested = 0  # users let go of since the start (`taken_in`)
        self.newest_ms = -(2**62)  # the newest event time folded or loaded: the log's time
        # Set by ingest from its clock: events stamped later are refused (fold.FutureEvent).
        self.max_ts_ms: int | None = None
        self.fetch_cold: Callable[[list[str]], dict[str, bytes]] | None = None
        # Told each user `rest` lets go of: what holds a user's state besides the store (/score's
        # feature cache) lets go of it too, else it stays in memory all the same.
        self.on_rest: list[Callable[[str], object]] = []
        # Told each user `forget` drops (a request to erase them): what keeps more of them than their
        # state (the checkpointer's count of users at the event cap) lets go of it.
        self.on_forget: list[Callable[[str], object]] = []
        # Told of a user whose checkpointed row cannot be decoded (`UnreadableState`): the service stops.
        self.on_unreadable: Callable[[UnreadableState], object] | None = None

    def state_of(self, user_id: str) -> UserState | None:
        """The user's state, loading it from the checkpoint first if it is still cold."""
        state = self.users.get(user_id)
        if state is None and (user_id in self.cold or user_id in self.dormant):
            state = self._thaw(user_id)
        return state

    def _thaw(self, user_id: str) -> UserState:
        """Read on the spot, on the caller's thread: the service reads a user off its event loop
        first (`app/thaw.py`), so this is the fallback of a path that did not."""
        assert self.fetch_cold is not None, "cold users need fetch_cold"
        try:
            blob = self.fetch_cold([user_id]).get(user_id)
        except Exception as error:  # whatever the database driver raises
            # Its first line: the rest is the SQL and its parameters, this user's id (ingest logs it).
            raise StateUnavailable(f"{type(error).__name__}: {error}".splitlines()[0]) from error
        return self._thawed(user_id, blob)

    def _thawed(self, user_id: str, blob: bytes | None) -> UserState:
        state = self.decoded(user_id, blob) if blob is not None else UserState()
        self.cold.discard(user_id)
        self.dormant.discard(user_id)
        self.users[user_id] = state
        return state

    def decoded(self, user_id: str, blob: bytes) -> UserState:
        """The state in a user's checkpointed row; UnreadableState (after `on_unreadable`) when it is damaged: the
        user stays cold, and their row as it is. Whatever reads a row in the service goes through this (the
        `user_features` passes too), so that a damaged one stops it wherever it is read.

        >>> store = OnlineStore()
        >>> told = []
        >>> store.on_unreadable = lambda error: told.append(error.user_id)
        >>> def tried(read):
        ...     try:
        ...         read()
        ...     except UnreadableState as error:
        ...         return str(error)[:70]
        >>> tried(lambda: store.decoded("u", b"TSU2 cut"))
        "The user_state row of user 'u' cannot be read (not a user state: 8 byt"
        >>> store.cold.add("u")
        >>> tried(lambda: store.warm([("u", b"TSU2 cut")]))
        "The user_state row of user 'u' cannot be read (not a user state: 8 byt"
        >>> store.cold, told
        ({'u'}, ['u', 'u'])
        """
        try:
            return UserState.from_bytes(blob)
        except ValueError as error:
            unreadable = UnreadableState(user_id, str(error))
        if self.on_unreadable is not None:
            self.on_unreadable(unreadable)
        raise unreadable

    def in_checkpoint_only(self, user_id: str) -> bool:
        """Whether the user's state is in the checkpoint and not in memory (cold, or dormant)."""
        return user_id not in self.users and (user_id in self.cold or user_id in self.dormant)

    def install(self, user_id: str, blob: bytes | None, rested_then: int) -> bool:
        """Take a user's state read from the checkpoint elsewhere (a worker thread) while `rested`
        was `rested_then`; False when it is left out: the user is in memory by now, or users were
        let go of meanwhile (this one may have been among them, with a newer row than was read).

        >>> store = OnlineStore()
        >>> store.dormant.add("u")
        >>> rested = store.rested
        >>> store.install("u", None, rested), store.in_checkpoint_only("u"), store.install("u", None, rested)
        (True, False, False)
        """
        if self.rested != rested_then or not self.in_checkpoint_only(user_id):
            return False
        self._thawed(user_id, blob)
        return True

    def warm(self, states: Iterable[tuple[str, bytes]]) -> int:
        """Load checkpointed users that nothing has needed yet; returns how many. One idle by the
        newest event loaded so far goes to `dormant` instead: memory holds the users who are active."""
        loaded = 0
        for user_id, blob in states:
            if user_id in self.cold:
                state = self.decoded(user_id, blob)
                self.newest_ms = max(self.newest_ms, state.newest_ms)
                self.cold.discard(user_id)
                if state.newest_ms < self.idle_before_ms():
                    self.dormant.add(user_id)
                else:
                    self.users[user_id] = state
                loaded += 1
        return loaded

    def apply(self, event: Any) -> bool:
        state = self.users.get(event.user_id)
        if state is None:
            if event.user_id in self.cold or event.user_id in self.dormant:
                state = self._thaw(event.user_id)
            else:
                state = self.users[event.user_id] = UserState()
        try:
            changed = apply(state, event, self.max_ts_ms)
        except FutureEvent:
            if state.newest_ms == UserState().newest_ms:
                del self.users[event.user_id]  # don't keep an empty user behind
            raise
        if changed:
            self.applied += 1
            self._dirty.add(event.user_id)
            self.newest_ms = max(self.newest_ms, state.newest_ms)
            return True
        self.ignored += 1
        return False

    def forget(self, user_id: str) -> bool:
        """Drop the user's state, a user to forget: from memory, and from what is loaded from the
        checkpoint (whose row the caller deletes); False when none was held. An event of theirs
        folded after this starts a new state.

        >>> from streams.events import parse_event
        >>> store = OnlineStore()
        >>> store.apply(parse_event(b'{"id": "e1", "type": "app.opened", "user_id": "u", "ts": "2026-11-26T08:00:00Z"}'))
        True
        >>> store.forget("u"), store.forget("u"), store.users, store.begin_checkpoint()
        (True, False, {}, ({}, []))
        """
        held = self.users.pop(user_id, None) is not None or user_id in self.cold or user_id in self.dormant
        self.cold.discard(user_id)
        self.dormant.discard(user_id)
        self._dirty.discard(user_id)
        for forget in (*self.on_rest, *self.on_forget):  # what holds their state besides the store lets go of it too
            forget(user_id)
        return held

    def advance(self, stream: str, seq: int) -> None:
        """Positions only move forward (two paths may report the same stream's progress)."""
        if seq > self.positions.get(stream, 0):
            self.positions[stream] = seq

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def begin_checkpoint(self, ordered: bool = True) -> tuple[dict[str, int], list[str]]:
        """Positions now, and the users changed since the last checkpoint (handed over, not copied),
        sorted unless `ordered` is False (the caller sorts them in turns of the event loop).

        A user's state serialised later may hold events past these positions; that is
        safe, because replaying from the positions re-applies them and the fold ignores
        what it already holds.
        """
        dirty, self._dirty = self._dirty, set()
        return dict(self.positions), sorted(dirty) if ordered else list(dirty)

    @property
    def taken_in(self) -> int:
        """Users that came into memory since the start, in it still or let go of since: the
        freezer's measure of growth. The store's size alone stays flat once idle users leave,
        and the users coming in (new, returning) were never frozen."""
        return len(self.users) + self.rested

    def idle_before_ms(self) -> int:
        """Users whose newest event is older than this are idle: `idle_days` before the newest
        event folded, from the start of its day (none when `idle_days` is 0)."""
        if not self.idle_days:
            return -(2**63)
        return self.newest_ms // DAY_MS * DAY_MS - round(self.idle_days * DAY_MS)

    def rest(self, user_ids: Iterable[str], keep: Callable[[str], bool] = lambda _: False,
             later: list[str] | None = None) -> int:
        """Let go of the states of those of `user_ids` that are idle, saved (not changed since the
        last checkpoint's hand-over, which must have committed) and not kept (`keep`); how many.
        The idle ones that are not saved or are kept go to `later`.

        >>> from streams.events import parse_event
        >>> store = OnlineStore()
        >>> for user, day in (("gone", "2026-09-01"), ("here", "2026-11-26")):
        ...     _ = store.apply(parse_event(f'{{"id": "{user}", "type": "app.opened", "user_id": "{user}", '
        ...                                 f'"ts": "{day}T08:00:00Z"}}'.encode()))
        >>> _ = store.begin_checkpoint()  # and its save committed
        >>> store.fetch_cold = lambda ids: {}  # where the checkpoint is read back from
        >>> store.rest(list(store.users)), sorted(store.users), store.dormant
        (1, ['here'], {'gone'})
        """
        if self.fetch_cold is None:  # nowhere to load them back from
            return 0
        before, users, dirty = self.idle_before_ms(), self.users, self._dirty
        rested = 0
        for user_id in user_ids:
            state = users.get(user_id)
            if state is None or state.newest_ms >= before:
                continue
            if user_id in dirty or keep(user_id):
                if later is not None:
                    later.append(user_id)
                continue
            del users[user_id]
            self.dormant.add(user_id)
            for forget in self.on_rest:
                forget(user_id)
            rested += 1
        self.rested += rested
        return rested

    def abort_checkpoint(self, users: Iterable[str]) -> None:
        """The write failed: those users still need saving."""
        self._dirty.update(users)

    def load(self, positions: dict[str, int], states: Iterable[tuple[str, bytes]]) -> None:
        """Every user's state at once (the bench scripts'; the service reads users as they come, `warm`, `install`).
        A damaged row is UnreadableState naming the user, as wherever else a row is read (`decoded`)."""
        self.positions = dict(positions)
        for user_id, blob in states:
            self.users[user_id] = self.decoded(user_id, blob)
