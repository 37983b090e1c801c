"""Checkpoint stores: where a checkpoint's states, positions and participants' rows go (memory, SQL).

What the checkpoint task (`app/checkpoints.py`) writes through, in one transaction each: `save`, or for a
checkpoint of many users `begin`, `add`s and `commit`, run in the writer process (`app/checkpoint_writer.py`)
or in a thread of its own (`InThread`). The rows come from `app/checkpoint_rows.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine, select
from sqlalchemy.engine import Connection

from app import db
from app.checkpoint_rows import OpenCheckpoint, PositionsBehind, positions_behind, write_checkpoint
from app.thread_work import ThreadWork


class Participant(Protocol):
    """Other state saved in the checkpoint's transaction (models, the learner's joins)."""

    name: str

    def snapshot(self) -> Any:
        """Called on the event loop at step 1: a cheap, consistent copy to write later."""

    # write(conn, snapshot): called inside the checkpoint transaction, with nothing but the
    # snapshot: a staticmethod, because it may run in the checkpoint writer process.
    write: Callable[[Connection, Any], None]

    def saved(self, snapshot: Any) -> None:
        """Called on the event loop once the transaction holding `snapshot` has committed."""


class CheckpointStore(Protocol):
    def load(self) -> tuple[dict[str, int], Iterator[tuple[str, bytes]]]: ...

    def save(self, positions: dict[str, int], states: list[tuple[str, bytes]],
             extras: Sequence[tuple[Participant, Any]] = (), marks: dict[str, int] | None = None,
             committed: dict[str, int] | None = None) -> None:
        """In one transaction, which raises `PositionsBehind` (and commits nothing) if the store holds
        older positions than `committed`, the ones this service committed last."""
        ...

    # `save` in batches, for a checkpoint of many users: its transaction opened with the first batch,
    # held open across `add`s, committed with the last; a failed call, `rollback` or another `begin`
    # rolls it back. Called one at a time, from one thread.
    def begin(self, extras: Sequence[tuple[Participant, Any]], committed: dict[str, int] | None,
              states: list[tuple[str, bytes]]) -> None: ...

    def add(self, states: list[tuple[str, bytes]]) -> None: ...

    def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
               states: list[tuple[str, bytes]]) -> None: ...

    def rollback(self) -> None: ...

    def reachable(self) -> bool:
        """Whether the store answers now (asked while a failed checkpoint waits to retry)."""
        ...


class MemoryCheckpointStore:
    """For tests and the pure-core examples: same contract, no database."""

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}
        self.marks: dict[str, int] = {}
        self.states: dict[str, bytes] = {}
        self.extras: dict[str, Any] = {}
        self._open: tuple[list[tuple[str, bytes]], Sequence[tuple[Participant, Any]], dict[str, int] | None] | None
        self._open = None  # a checkpoint in batches: its states so far, its extras and committed positions

    def load(self) -> tuple[dict[str, int], Iterator[tuple[str, bytes]]]:
        return dict(self.positions), iter(list(self.states.items()))

    def save(self, positions: dict[str, int], states: list[tuple[str, bytes]],
             extras: Sequence[tuple[Participant, Any]] = (), marks: dict[str, int] | None = None,
             committed: dict[str, int] | None = None) -> None:
        if committed and (behind := positions_behind(committed, self.positions)):
            raise PositionsBehind(behind)
        self.states.update(states)
        self.positions.update(positions)
        for stream in positions:
            if marks and stream in marks:
                self.marks[stream] = marks[stream]
            else:
                self.marks.pop(stream, None)
        for participant, snapshot in extras:
            self.extras[participant.name] = snapshot

    def begin(self, extras: Sequence[tuple[Participant, Any]], committed: dict[str, int] | None,
              states: list[tuple[str, bytes]]) -> None:
        self._open = (list(states), extras, committed)

    def add(self, states: list[tuple[str, bytes]]) -> None:
        if self._open is None:
            raise RuntimeError("no checkpoint is open")
        self._open[0].extend(states)

    def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
               states: list[tuple[str, bytes]]) -> None:
        if self._open is None:
            raise RuntimeError("no checkpoint is open")
        held, extras, committed = self._open
        self._open = None
        self.save(positions, held + states, extras, marks, committed)

    def rollback(self) -> None:
        self._open = None

    def reachable(self) -> bool:
        return True


class SqlCheckpointStore:
    """SQLite or PostgreSQL, through SQLAlchemy Core."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._open = OpenCheckpoint(engine)

    def load(self) -> tuple[dict[str, int], Iterator[tuple[str, bytes]]]:
        with self.engine.connect() as conn:
            positions = {row.stream: row.seq for row in conn.execute(select(db.stream_positions))}
        return positions, self.states()

    def position_times(self) -> dict[str, tuple[datetime, int | None]]:
        """When each stream's position was last written (the checkpoint's time, which the message at
        that position was stored before), and when NATS stored that message (µs; None: not known)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.stream_positions))
            return {row.stream: (row.updated_at, row.stored_us) for row in rows}

    def reachable(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except Exception:  # noqa: BLE001 - whatever the driver raises: not yet
            return False
        return True

    def user_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(db.user_state.c.user_id)).scalars())

    def fetch(self, user_ids: list[str]) -> dict[str, bytes]:
        table = db.user_state
        with self.engine.connect() as conn:
            rows = conn.execute(select(table.c.user_id, table.c.state).where(table.c.user_id.in_(user_ids)))
            return {user_id: bytes(blob) for user_id, blob in rows}

    def states(self) -> Iterator[tuple[str, bytes]]:
        """Every user's state, streamed (the warm-up after a lazy restore)."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=10_000).execute(
                select(db.user_state.c.user_id, db.user_state.c.state)
            )
            for user_id, blob in result:
                yield user_id, bytes(blob)

    def save(self, positions: dict[str, int], states: list[tuple[str, bytes]],
             extras: Sequence[tuple[Participant, Any]] = (), marks: dict[str, int] | None = None,
             committed: dict[str, int] | None = None) -> None:
        with self.engine.begin() as conn:
            write_checkpoint(conn, positions, states, [(p.write, snapshot) for p, snapshot in extras], marks,
                             committed)

    def begin(self, extras: Sequence[tuple[Participant, Any]], committed: dict[str, int] | None,
              states: list[tuple[str, bytes]]) -> None:
        self._open.begin([(p.write, snapshot) for p, snapshot in extras], committed, states)

    def add(self, states: list[tuple[str, bytes]]) -> None:
        self._open.add(states)

    def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
               states: list[tuple[str, bytes]]) -> None:
        self._open.commit(positions, marks, states)

    def rollback(self) -> None:
        self._open.rollback()


class Batched(Protocol):
    """A checkpoint's transaction open across calls, as `CheckpointWriter` runs it in its process."""

    async def begin(self, opening: Any, committed: dict[str, int] | None, states: list[tuple[str, bytes]]) -> None: ...

    async def add(self, states: list[tuple[str, bytes]]) -> None: ...

    async def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
                     states: list[tuple[str, bytes]]) -> None: ...

    def rollback(self) -> None: ...


class InThread:
    """A store's batched save (`CheckpointStore.begin`...) in a thread of its own: its calls run in turn on the
    one connection that holds the transaction, and a rollback waits for the call in flight, as in the writer
    process (`asyncio.to_thread` could run them side by side)."""

    def __init__(self, target: CheckpointStore, threads: ThreadWork) -> None:
        self.target, self.threads = target, threads
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tipstream-checkpoint")

    async def begin(self, extras: Sequence[tuple[Participant, Any]], committed: dict[str, int] | None,
                    states: list[tuple[str, bytes]]) -> None:
        await self.threads.run("a checkpoint", self.target.begin, extras, committed, states, executor=self._thread)

    async def add(self, states: list[tuple[str, bytes]]) -> None:
        await self.threads.run("a checkpoint", self.target.add, states, executor=self._thread)

    async def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
                     states: list[tuple[str, bytes]]) -> None:
        await self.threads.run("a checkpoint", self.target.commit, positions, marks, states, executor=self._thread)

    def rollback(self) -> None:
        self._thread.submit(self.target.rollback)
