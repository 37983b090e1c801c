"""The users a kind of whose events is at the fold's cap, as last checkpointed: counted and told.

One user's publisher sending in a loop fills a kind of their state to `MAX_RECORDS_PER_KIND`, and the
fold drops its oldest records. The checkpoint task (`app/checkpoints.py`) hands over the users each
checkpoint saved, and those of them whose serialised state is large enough to be at the cap; the count
is `tipstream_users_at_event_cap`, and the users found are logged, a line a minute at most.
"""

from __future__ import annotations

import logging
from bisect import bisect_left

from app.metrics import METRICS
from streams.fold import DAY_MS, HORIZON_DAYS, MAX_RECORDS_PER_KIND, SIZES, at_cap
from streams.log_throttle import LogThrottle, counted
from streams.store import OnlineStore

log = logging.getLogger("tipstream.checkpoints")
# No smaller state can hold a kind at the fold's cap: only these are looked at.
HEAVY_STATE_BYTES = MAX_RECORDS_PER_KIND * min(SIZES)
_TOLD = LogThrottle()


class UsersAtCap:
    def __init__(self, store: OnlineStore) -> None:
        self.store = store
        # Users with a kind at the fold's cap, as last saved -> the oldest record such a kind holds (ms).
        self.users: dict[str, int] = {}
        store.on_forget.append(self._forget)

    def _forget(self, user_id: str) -> None:
        """A user forgotten: never saved again, they stayed counted (their id held) up to 31 days."""
        if self.users.pop(user_id, None) is not None:
            METRICS.users_at_cap.set(len(self.users))

    def count(self, saved: list[str], heavy: list[str]) -> None:
        """Keep count of the users a kind of whose events is at the fold's cap, as last saved, and
        tell the operator of those there: one user's publisher sending in a loop, most likely."""
        # Counted while what a capped kind holds is within the horizon of the log's time: some window
        # reaches it. Past that, a user whose flood stopped was counted for good (never saved again,
        # or let go of from memory), and not after a start: the alert fired until one. `saved` is
        # sorted (`checkpoints.sorted_in_turns`): a few searches, not a pass over every user saved.
        horizon_ms = (self.store.newest_ms // DAY_MS - HORIZON_DAYS) * DAY_MS
        self.users = {user_id: oldest for user_id, oldest in self.users.items()
                      if oldest >= horizon_ms and not _among(saved, user_id)}
        found = []
        for user_id in heavy:
            state = self.store.users.get(user_id)
            capped = at_cap(state) if state is not None else []
            if capped and (oldest := max(at for _, at in capped)) >= horizon_ms:
                self.users[user_id] = oldest
                found.append(f"{user_id!r} ({', '.join(kind for kind, _ in capped)})")
        METRICS.users_at_cap.set(len(self.users))
        if found and _TOLD.allow("at_cap") is not None:
            log.warning(
                "%s %s events of one kind in 31 days, the most a user's state keeps of a kind: %s. "
                "Their oldest events of that kind are dropped, and their features reading before what is kept are "
                "fallbacks. A publisher sending the same user's events in a loop? Find it by the user id; the "
                "events are still in the stream.", counted(len(found), "user holds", "users hold"),
                f"{MAX_RECORDS_PER_KIND:,}", "; ".join(found[:5]))


def _among(ordered: list[str], item: str) -> bool:
    at = bisect_left(ordered, item)
    return at < len(ordered) and ordered[at] == item
