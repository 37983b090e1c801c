"""The online store: every user's fold state in memory, and the stream positions it reflects.

The API reads it from the same event loop that ingest writes it from, between two
chunks of events, so reads need no locks and never see half an event.

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

from typing import Any, Iterable

from streams.fold import UserState, apply


class OnlineStore:
    def __init__(self) -> None:
        self.users: dict[str, UserState] = {}
        self.positions: dict[str, int] = {}
        self.applied = 0
        self.ignored = 0  # duplicates, and events older than any window can reach
        self._dirty: set[str] = set()

    def apply(self, event: Any) -> bool:
        state = self.users.get(event.user_id)
        if state is None:
            state = self.users[event.user_id] = UserState()
        if apply(state, event):
            self.applied += 1
            self._dirty.add(event.user_id)
            return True
        self.ignored += 1
        return False

    def advance(self, stream: str, seq: int) -> None:
        self.positions[stream] = seq

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def begin_checkpoint(self) -> tuple[dict[str, int], list[str]]:
        """Positions now, and the users changed since the last checkpoint (handed over, not copied).

        A user's state serialised later may hold events past these positions; that is
        safe, because replaying from the positions re-applies them and the fold ignores
        what it already holds.
        """
        dirty, self._dirty = self._dirty, set()
        return dict(self.positions), sorted(dirty)

    def abort_checkpoint(self, users: Iterable[str]) -> None:
        """The write failed: those users still need saving."""
        self._dirty.update(users)

    def load(self, positions: dict[str, int], states: Iterable[tuple[str, bytes]]) -> None:
        self.positions = dict(positions)
        for user_id, blob in states:
            self.users[user_id] = UserState.from_bytes(blob)
