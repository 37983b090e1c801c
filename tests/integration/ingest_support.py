"""What the tests that run a `StreamIngest`, or another of the service's loops, by hand share."""

from __future__ import annotations

import asyncio
from typing import Any

from app.ingest import StreamIngest


async def stop_reading(ingest: StreamIngest, nc: Any, *tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (those running `ingest.run()` or a part of it; None: one not started yet) and wait for them
    to end, whatever they raised, then stop `ingest` and close `nc`. One still running a second later is cancelled
    again, as the service's stop does (`app.background`): nats-py drops a cancellation that comes with an answer, and
    waited for once, such a task held the test's teardown for ever."""
    await cancelled(*tasks)
    await ingest.stop()
    await nc.close()


async def cancelled(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (None: one not started yet) and wait for them to end, whatever they raised; one still running a
    second later is cancelled again (see `stop_reading`)."""
    started = [task for task in tasks if task is not None]
    running = set(started)
    while running:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=1)
    await asyncio.gather(*started, return_exceptions=True)  # what they raised, retrieved
