"""The learner's bookkeeping as a checkpoint participant: its snapshots' generations, which of them
were saved, when the next is due, the models' copies, and the saved state's form.

Each snapshot is a generation; the checkpointer says which it saved (`saved`), and the next
snapshot learns so (`confirm`): one still unconfirmed then failed, and is taken again at once.
Models go into a snapshot only when they learned since the last one known to be saved; the event
loop only copies them (`ModelBytes`), and the snapshots are spaced by what that and serialising
the copies cost (`next_gen`).

>>> book = SnapshotBook(every_s=5)
>>> book.next_gen(now=100.0, resume=(3, 1), changed=True, force=False)
1
>>> book.next_gen(now=101.0, resume=(4, 1), changed=True, force=False)  # unconfirmed: it failed
2
>>> book.saved({"gen": 2, "learn_seq": 7, "models": {}}); book.confirm(lambda gen: None)
>>> book.next_gen(now=102.0, resume=(5, 1), changed=True, force=False), book.models_saved_seq
(None, 7)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine

from app import db
from app.learning_metrics import MODEL_SNAPSHOT_SECONDS
from models.reward import TipModel

MODELS_LOOP_SHARE = 0.01  # of the event loop's time, at most, spent serialising models for snapshots


class ModelBytes:
    """A frozen model (`TipModel.frozen`) whose bytes are made where the checkpoint is written:
    in the writer thread, or, when pickled on its way to the writer process, in the thread
    that feeds it. Either way not on the event loop, which only took the copy."""

    __slots__ = ("model", "seconds")

    def __init__(self, model: Any) -> None:
        self.model, self.seconds = model, 0.0

    def to_bytes(self) -> bytes:
        started = time.perf_counter()
        data: bytes = self.model.to_bytes()
        self.seconds = time.perf_counter() - started
        return data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return bytes, (self.to_bytes(),)  # the writer process receives plain bytes


class SnapshotBook:
    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.positions = (0, 0)  # (FEEDBACK, DECISIONS) of the last snapshot taken
        # On the learner's `timer`, which never steps: on the wall clock, a step back of an hour (NTP
        # correcting a VM) held every snapshot back for that hour, and a restart then replayed it all.
        self.last = -math.inf
        self.models_cost_s = 0.0  # what copying and serialising the models took last time
        self.unconfirmed: list[int] = []
        self.confirmed: list[tuple[int, int | None]] = []  # (generation, learn_seq of its models)
        self.gen = 0
        self.models_saved_seq = 0  # rewards learned by the models in SQL (the learner's `_learn_seq`)

    def confirm(self, confirmed: Callable[[int], None]) -> None:
        """Take in the generations saved since the last snapshot, each told to `confirmed` (the
        credit log's)."""
        while self.confirmed:
            gen, learn_seq = self.confirmed.pop()
            self.unconfirmed = [g for g in self.unconfirmed if g > gen]
            confirmed(gen)
            if learn_seq is not None:
                self.models_saved_seq = max(self.models_saved_seq, learn_seq)

    def next_gen(self, now: float, resume: tuple[int, int], changed: bool, force: bool) -> int | None:
        """The generation of a snapshot to take at `now` (the timer's), resuming the streams at
        `resume`, or None: nothing `changed` since the last, or too soon after it."""
        # Checkpoints run one at a time, so an unconfirmed snapshot here is one that failed: retry now.
        failed = bool(self.unconfirmed)
        # Models grow with the users who give feedback (a user x category cross each). The loop
        # copies them (~18 ms for 240k AdaGrad weights) and the writer serialises the copies (~100
        # ms more, taking the GIL in turns). Snapshots are spaced so that both together stay under
        # MODELS_LOOP_SHARE of the time; a restart replays a little more.
        every_s = max(self.every_s, self.models_cost_s / MODELS_LOOP_SHARE)
        # Read further with nothing learned (feedback without a decision) is a change too: the
        # next start re-reads from these positions, and they stood still for such feedback.
        changed = changed or resume != self.positions
        if not force and not failed and (not changed or now - self.last < every_s):
            return None
        self.gen += 1
        self.unconfirmed.append(self.gen)
        self.positions = resume
        self.last = now
        return self.gen

    def models(self, learning: list[tuple[str, TipModel]],
               timer: Callable[[], float]) -> dict[str, tuple[ModelBytes, int]]:
        """A frozen copy of each model that learns, with its count of rewards learned; the bytes are
        made where the checkpoint is written."""
        started = timer()
        models = {v: (ModelBytes(m.frozen()), m.n_learned) for v, m in learning}
        self.models_cost_s = timer() - started
        MODEL_SNAPSHOT_SECONDS.observe(self.models_cost_s)
        return models

    def saved(self, snapshot: dict[str, Any]) -> None:
        self.confirmed.append((snapshot["gen"], snapshot["learn_seq"]))
        # Serialising took the GIL from the loop in short turns rather than one long one, but it
        # took it: the next snapshot is spaced by the whole cost.
        self.models_cost_s += sum(blob.seconds for blob, _ in snapshot["models"].values())


def state_bytes(resume: tuple[int, int], waiting_rows: list[orjson.Fragment], evicted_upto_ms: int,
                feedback_ms: int, rows_to_rebuild: bool) -> bytes:
    """The learner's `learner_state` row: the positions to resume from and what it holds besides
    the models, the prior and the credits, which have rows of their own."""
    return orjson.dumps({
        "positions": {"FEEDBACK": resume[0], "DECISIONS": resume[1]},
        # Empty: the credits are in their minutes' rows. Kept so that a release from before the
        # credit log, rolled back to, starts (it read this key unconditionally).
        "credits": {},
        # By bucket of arrival (`WaitingFeedback.snapshot`). `waiting_buckets` (by bucket, one user
        # a tip), `waiting` (the whole map) and `pending` (the older list form) stay, empty, for
        # earlier releases rolled back to.
        "waiting_rows": waiting_rows,
        "waiting_buckets": [],
        "waiting": {},
        "pending": [],
        "evicted_upto_ms": evicted_upto_ms,
        "feedback_ms": feedback_ms,
        "rows_to_rebuild": rows_to_rebuild,
    })


def saved_rows(engine: Engine) -> dict[str, Any]:
    """The learner's rows as the last checkpoint left them, by name (`app.checkpoint_rows`)."""
    with engine.connect() as conn:
        query = select(db.learner_state.c.name, db.learner_state.c.state)
        return {name: state for name, state in conn.execute(query)}
