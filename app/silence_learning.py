"""The learner's silences (`TIPSTREAM_SILENCE_REWARD`): when a decision nobody reacted to within the
wait learns that reward for the tip it served first, and the learning of it.

Silence is judged in FEEDBACK's time, as the join window is: a decision's silence is learned just
before the first feedback stored after it is due (`release`, from `Learner.on_feedback`), or, with
none, by the clock (less `SILENCE_READ_ALLOWANCE_MS`, for feedback stored but not yet read) once
FEEDBACK has caught up (`horizon_ms`). A replay of the log (a restart, a rebuild) learns it at the
same place among the rewards as live. The decisions waiting for theirs are `app/silence.py`'s heap.

A part of the learner rather than a model of its own: a silence is a reward, learned as a reaction's
is (`Learner._learn`, which tests wrap), and FEEDBACK's time, the join cache and the feedback
deferred at a start (`Learner._due`) are the learner's; so it holds the learner and reads them there.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson

from app.join_cache import Entry, created_ms
from app.learner_told import tell_silences_evicted
from app.learning_metrics import SILENCES
from app.silence import Silences
from streams.ack_subject import stored_ms

if TYPE_CHECKING:
    from app.learner import Learner

_SILENCE = {name: SILENCES.labels(name) for name in ("credited", "answered", "evicted")}

# By the clock, a decision's silence is learned this long after it is due: feedback stored before
# then has been read by FEEDBACK's ingest (live, it reads within milliseconds), so the reaction it
# missed is not taken for silence, which a replay of the log would not do.
SILENCE_READ_ALLOWANCE_MS = 5_000
# Silences learned between two chances for the API to run (`learn_in_turns`), as ingest folds CHUNK
# events: ~85 us each with two live models, so one turn stays under ~25 ms. After a restart, every
# decision of the wait before the stop fell due at once (60,000 at 100 decisions/s): learned in one
# turn, at the first feedback read back or the first checkpoint, they held the loop for seconds.
SILENCES_PER_TURN = 256


class SilenceLearning:
    def __init__(self, learner: Learner, reward: float, after_s: float) -> None:
        self.learner, self.reward = learner, reward
        self.waits = Silences(int(after_s * 1000))

    def __len__(self) -> int:
        """Decisions waiting for their silence (some the join cache let go, until swept)."""
        return len(self.waits)

    def due_ms(self, decision_id: str, entry: Entry) -> int:
        return created_ms(decision_id, entry) + self.waits.after_ms

    def watch(self, decision_id: str, entry: Entry) -> None:
        """A decision the join cache took, with no credit: it waits for its silence."""
        self.waits.watch(decision_id, self.due_ms(decision_id, entry))

    def drop(self, decision_ids: set[str]) -> None:
        self.waits.drop(decision_ids)

    def silenced(self, decision_id: str, entry: Entry) -> bool:
        """The decision's only credit is its silence's (stamped the millisecond after its wait, `learn`)."""
        return (entry.credits is not None and len(entry.credits) == 1
                and entry.rewarded_ms == self.due_ms(decision_id, entry) + 1)

    def horizon_ms(self) -> int:
        """Silences due before this are learned without waiting for more feedback: by the clock,
        less the allowance, live; in FEEDBACK's time while it is read back (or not at all, before
        any feedback is read), and while its ingest is held up (`ReadUpTo.drained`): paused for
        checkpoints (the database away), a backlog not folded yet, NATS away. By the clock then, a
        reaction stored within the wait and read later was counted `late` and its silence learned,
        which a replay of the log, reading the reaction first, does not do."""
        learner = self.learner
        read = learner.feedback_read
        if read.caught_up and not learner.replaying and read.drained():
            return int(learner.clock() * 1000) - SILENCE_READ_ALLOWANCE_MS
        return learner._feedback_time_ms()

    def release_before_joined(self, joinable_ms: int) -> None:
        """Before the feedback that waited for a decision is credited: the silences the clock had learned,
        live, when the decision came (due before its stored time, less the allowance) first, also read
        back (deferred until FEEDBACK's time passes the decision's, where both fall due): else a replay
        learned this feedback before them, live after."""
        self.release(min(joinable_ms - SILENCE_READ_ALLOWANCE_MS, self.horizon_ms()))

    def before_message(self, reply: bytes) -> Awaitable[None] | None:
        """The FEEDBACK ingest asks this before each message (`reply`, its ack subject): when silences
        are due before it was stored, learn them in turns of the loop (`learn_in_turns`), before the
        message, where `on_feedback` learns them (in one turn)."""
        before_ms = stored_ms(reply)
        if not self.waits.due_before(before_ms):
            return None
        return self.learn_in_turns(lambda: before_ms)

    async def learn_in_turns(self, before: Callable[[], float]) -> None:
        """Learn the silences due before `before()`, `SILENCES_PER_TURN` per turn of the loop. Not those
        due after a deferred feedback's decision less the allowance: that feedback is learned first
        (`release_before_joined`); `on_feedback` or `snapshot` learns them in their order."""
        waits = self.waits
        while True:
            before_ms = before()
            due = self.learner._due
            if due:
                before_ms = min(before_ms, due[0][0] - SILENCE_READ_ALLOWANCE_MS)
            if not waits.due_before(before_ms):
                return
            self.release(before_ms, SILENCES_PER_TURN)
            if not waits.due_before(before_ms):
                return
            await asyncio.sleep(0)

    def release(self, before_ms: float, limit: int | None = None) -> None:
        """Credit the silence reward to the first tip of each decision due before `before_ms` that no
        reaction was credited to (an answer to any of its tips counts); the first `limit` only."""
        joins = self.learner.joins
        evicted = 0
        for decision_id, due_ms in itertools.islice(self.waits.due(before_ms), limit):
            entry = joins.get(decision_id)
            if entry is None:
                evicted += 1
            elif entry.credits:
                if entry.rewarded_ms != due_ms + 1:  # not its own silence, learned before a reaction came (`_credit`)
                    _SILENCE["answered"].inc()
            else:
                self.learn(decision_id, entry, due_ms)
        held = len(joins)
        evicted += self.waits.sweep(lambda decision_id: joins.get(decision_id) is not None, held)
        if evicted:
            _SILENCE["evicted"].inc(evicted)
            tell_silences_evicted(evicted)

    def learn_before_reaction(self, decision_id: str, entry: Entry, due_ms: int) -> None:
        """Learn the silence of a decision still watched, before a reaction stored after it was due is
        credited (`Learner._credit`): its wait ends here, not when `release` finds it due."""
        self.learn(decision_id, entry, due_ms)
        self.waits.settled(decision_id)

    def learn(self, decision_id: str, entry: Entry, due_ms: int) -> None:
        """Stamped the millisecond after the wait, when it is known: a reaction stored at its last one
        answers it (`Silences.due`), so no reaction credited is stamped so, and a credit stamped so is
        the silence's (`silenced`). Stamped with `due_ms`, as such a reaction, it was told from it by
        nothing: the reaction sent again counted `late`, its wait not `answered`."""
        decision = entry.decision if entry.decision is not None else orjson.loads(entry.data)
        self.learner._learn(decision_id, entry, decision, decision["ranked"][0], self.reward, due_ms + 1)
        _SILENCE["credited"].inc()
