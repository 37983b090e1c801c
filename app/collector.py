"""Keeps users' long-lived state out of the cycle collector's full passes.

Each user's fold state is two objects the collector tracks, and a full collection visits
every tracked object: with a million users one pass took 650-740 ms here, a stall of the
event loop (ingest and every /score) each time the collector decides to run one.
`gc.freeze()` moves what is alive now to a generation no pass visits. Users come from a
checkpoint (the warm-up) or from the streams (a first start replaying a long log, or new
users), so this freezes whenever `every_users` more users have come into memory since the last time
(`OnlineStore.taken_in`: the store's size stays flat once idle users leave, and by it the users coming in were
never frozen).

A start that will freeze as users load freezes once before (`FreezePolicy.before_warm_up`): what the
start made (modules, models, the user ids) was otherwise visited by the first check's pass, beside
the warm-up and the requests it serves (108 ms, against 20-23 ms for the later ones, at 300,000
users with `bench/restart.py`).

Steps of `FreezePolicy.check`:
1. Compare the users taken into memory with their count at the last freeze; below `every_users` more, stop.
2. Collect first (that pass visits only what is not frozen yet), so that no garbage is frozen.
3. Freeze what is left, and remember that count.

Frozen objects are still freed by reference counting; only a cycle among them that dies
later is never collected, which long-lived user states and models do not form.

>>> policy = FreezePolicy(every_users=100)
>>> policy.due(99), policy.due(100)
(False, True)
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("tipstream.collector")


class FreezePolicy:
    def __init__(self, every_users: int) -> None:
        self.every_users = every_users
        self.users_at_freeze = 0

    def due(self, users: int) -> bool:
        return self.every_users > 0 and users - self.users_at_freeze >= self.every_users

    def before_warm_up(self, users_to_load: int) -> None:
        """Freeze what the start made, before `users_to_load` load beside the requests served; not for fewer
        than a freeze's step, which the warm-up would not freeze for at all."""
        if self.due(users_to_load):
            started = time.perf_counter()
            gc.collect()
            gc.freeze()
            log.info("start: long-lived objects frozen out of collections (%.0f ms)",
                     (time.perf_counter() - started) * 1000)

    def check(self, users: int) -> bool:
        """Freeze now if enough users have come into memory since the last freeze; True if it did."""
        if not self.due(users):
            return False
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.users_at_freeze = users
        # Not `gc.get_freeze_count()`: it walks every frozen object, 31 ms of each freeze at 300,000 users and more
        # than the freeze itself, growing with the users.
        log.info("%d users: long-lived objects frozen out of collections (%.0f ms)", users,
                 (time.perf_counter() - started) * 1000)
        return True
