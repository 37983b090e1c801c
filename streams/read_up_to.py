"""One stream's ingest following another's: how far a stream has been read, in the time JetStream stored its
messages (`ReadUpTo`), for the ingest of another (`app/ingest.py`, `StreamIngest`'s `after`) to wait on, and
how much further than each of its messages FEEDBACK waits for DECISIONS to be read (`DECISIONS_READ_AHEAD_S`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How much later than a reaction to it JetStream may store a decision of ours, at most in the usual run: /score
# answers, then the publisher sends its queue at once, in batches (TIPSTREAM_DECISION_BATCH); one whose
# acknowledgement does not come in 5 s is sent again, a refused one within a second (`app.decision_publisher`),
# and a NATS cluster elects a new leader for DECISIONS in 4-9 s. Until DECISIONS has caught up after a start,
# FEEDBACK waits for it read this much further than each message (`StreamIngest`'s `after_ahead_ms`): an app
# that reacts within milliseconds of the answer stores its reaction first, and live learned it at once, the
# decision held from /score on; read back, it waited for the decision, and the rewards stored in between were
# learned before it (AdaGrad: other weights than live's). Later still (NATS away for longer, decisions spooled
# at a stop and published at the next start), the reaction waits for the decision, as before.
DECISIONS_READ_AHEAD_S = 10.0


class ReadUpTo:
    """How far a stream has been read since the start, in the time JetStream stored its messages:
    another stream's ingest waits on it (`StreamIngest`'s `after`)."""

    def __init__(self, caught_up: bool = False) -> None:
        self.stored_ms = 0
        self.caught_up = caught_up
        self._moved = asyncio.Event()
        self.advanced = asyncio.Event()  # set at each `advance`, for a reader of its own to clear (`StreamIngest.room`)
        # The stored time another stream's ingest waits for this one to be read past (`reached`), and when it asks:
        # an ingest that holds back for that other one (`StreamIngest.room`) reads on up to there.
        self.wanted_ms = 0
        self.asked = asyncio.Event()
        # Whether everything stored in the stream until a moment ago has been read, now: unlike
        # `caught_up` (once, for good), false again while ingest is held up (paused for checkpoints,
        # a backlog delivered and not folded yet, a consumer re-created). The ingest reading the
        # stream sets it (`StreamIngest.drained`); the learner's silence asks it before trusting
        # the clock (`SilenceLearning.horizon_ms`).
        self.drained: Callable[[], bool] = lambda: self.caught_up
        self.on_caught_up: Callable[[], None] | None = None  # told once, as it catches up (`Learner.feedback_caught_up`)

    def advance(self, stored_ms: int, caught_up: bool) -> None:
        self.stored_ms = max(self.stored_ms, stored_ms)
        if caught_up and not self.caught_up:
            self.caught_up = True
            if self.on_caught_up is not None:
                self.on_caught_up()
        self._moved.set()
        self.advanced.set()

    async def reached(self, stored_ms: int) -> None:
        """Until the stream has been read past messages stored at `stored_ms`, or to its end."""
        if not self.caught_up and self.stored_ms < stored_ms and stored_ms > self.wanted_ms:
            self.wanted_ms = stored_ms
            self.asked.set()
        while not self.caught_up and self.stored_ms < stored_ms:
            self._moved.clear()
            await self._moved.wait()

