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
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from app.checkpoint_rows import Write, write_checkpoint

log = logging.getLogger("tipstream.checkpoints")
_engine: Any = None


def _start_worker(database_url: str, service_pid: int) -> None:
    from app.db import make_engine
    from app.embedded_nats import die_with_service

    global _engine
    die_with_service(service_pid)
    _engine = make_engine(database_url)


def _save(positions: dict[str, int], states: list[tuple[str, bytes]], writes: Sequence[Write],
          marks: dict[str, int] | None = None, committed: dict[str, int] | None = None) -> None:
    with _engine.begin() as conn:
        write_checkpoint(conn, positions, states, writes, marks, committed)


class CheckpointWriter:
    """Runs `write_checkpoint` transactions in one worker process (restarted if it dies)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fork of a process with an event loop and threads is not safe.
            self._pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(self.database_url, os.getpid()))
        return self._pool

    async def save(self, positions: dict[str, int], states: list[tuple[str, bytes]], writes: Sequence[Write],
                   marks: dict[str, int] | None = None, committed: dict[str, int] | None = None) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor(), _save, positions, states, list(writes),
                                                             marks, committed)
        except BrokenProcessPool:
            log.warning("the checkpoint writer process died; the next checkpoint starts a new one")
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
