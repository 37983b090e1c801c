"""Checkpoint transactions in a process of their own, off the serving interpreter.

A checkpoint under load writes thousands of rows (user states, `tip_scores`). In a thread,
the rows' Python work competes for the GIL with the event loop. `db.upsert` writes many rows
per statement, so the GIL changes hands once per statement rather than once per row
(`bench/row_writes.py`: 10-13 us a row beside a busy loop, against 195-347 with
`executemany`), but the Python work remains. In a worker process both run at full speed on
their own core.

The worker gets plain data: positions, serialised states, and (write function, snapshot)
pairs, the functions pickled by name. It dies with the service (PR_SET_PDEATHSIG), so a
killed service never leaves a half-written transaction running: the database rolls it back.

A checkpoint of many users comes in batches (`begin`, `add`s, `commit`) into one transaction the
worker holds open (`OpenCheckpoint`): sent whole, a catch-up's million states (6.4 GB) were held
in the service, pickled across, and held again here, and the service's resident memory doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from sqlalchemy.exc import StatementError

from app.checkpoint_rows import OpenCheckpoint, Write

log = logging.getLogger("tipstream.checkpoints")
_open: Any = None  # the worker's OpenCheckpoint


def _start_worker(database_url: str, service_pid: int, log_level: str) -> None:
    from app.db import make_engine
    from app.log_setup import start_spawned

    global _open
    start_spawned(service_pid, log_level)
    _open = OpenCheckpoint(make_engine(database_url))


def _sent_back(step: Callable[..., None]) -> Callable[..., None]:
    """`step`, whose SQLAlchemy error reaches the service without the statement's parameters. Pickled with them
    (`StatementError.__reduce__`, whatever `hide_parameters` says), SQLite's states, bound as memoryviews, failed
    the pickling: the service got 'TypeError: cannot pickle memoryview objects' for a full disk, a locked
    database, a trigger's refusal or missing tables, told as an outage with no fix. Nor are users' states and ids
    sent across for an error's sake."""
    @functools.wraps(step)
    def call(*args: Any) -> None:
        try:
            step(*args)
        except StatementError as error:
            error.params = None
            raise

    return call


@_sent_back
def _save(positions: dict[str, int], states: list[tuple[str, bytes]], writes: Sequence[Write],
          marks: dict[str, int] | None = None, committed: dict[str, int] | None = None) -> None:
    _open.begin(writes, committed, states)
    _open.commit(positions, marks, [])


@_sent_back
def _begin(writes: Sequence[Write], committed: dict[str, int] | None, states: list[tuple[str, bytes]]) -> None:
    _open.begin(writes, committed, states)


@_sent_back
def _add(states: list[tuple[str, bytes]]) -> None:
    _open.add(states)


@_sent_back
def _commit(positions: dict[str, int], marks: dict[str, int] | None, states: list[tuple[str, bytes]]) -> None:
    _open.commit(positions, marks, states)


def _rollback() -> None:
    _open.rollback()


class CheckpointWriter:
    """Runs `write_checkpoint` transactions in one worker process (restarted if it dies)."""

    def __init__(self, database_url: str, log_level: str = "info") -> None:
        self.database_url = database_url
        self.log_level = log_level  # the worker's (`Settings.log_level`): it logs as the service does
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork of a process with an event loop and threads is not safe.
            self._pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"),
                                             initializer=_start_worker,
                                             initargs=(self.database_url, os.getpid(), self.log_level))
        return self._pool

    async def save(self, positions: dict[str, int], states: list[tuple[str, bytes]], writes: Sequence[Write],
                   marks: dict[str, int] | None = None, committed: dict[str, int] | None = None) -> None:
        await self._call(_save, positions, states, list(writes), marks, committed)

    async def begin(self, writes: Sequence[Write], committed: dict[str, int] | None,
                    states: list[tuple[str, bytes]]) -> None:
        """Opens a checkpoint's transaction with its first batch (rolling back one left open)."""
        await self._call(_begin, list(writes), committed, states)

    async def add(self, states: list[tuple[str, bytes]]) -> None:
        await self._call(_add, states)

    async def commit(self, positions: dict[str, int], marks: dict[str, int] | None,
                     states: list[tuple[str, bytes]]) -> None:
        await self._call(_commit, positions, marks, states)

    def rollback(self) -> None:
        """Queued after the call in flight, not waited for: a failed or cancelled checkpoint's transaction
        must not hold the database's locks until the next checkpoint's begin."""
        if self._pool is not None:
            with contextlib.suppress(BrokenProcessPool, RuntimeError):  # a dead worker's transaction is gone
                self._pool.submit(_rollback)

    async def _call(self, function: Callable[..., None], *args: Any) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor(), function, *args)
        except BrokenProcessPool:
            log.warning("the checkpoint writer process died; the next checkpoint starts a new one")
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
            raise

    def close(self, wait: bool = True) -> None:
        """`wait` False: the worker may be stuck in a statement to a database that hangs; it ends with the service
        (PR_SET_PDEATHSIG), and what it had not committed is rolled back."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
            self._pool = None
