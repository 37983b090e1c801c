"""What the tests that run a `StreamIngest` by hand share."""

from __future__ import annotations

import asyncio
from typing import Any

from app.ingest import StreamIngest


async def stop_reading(ingest: StreamIngest, nc: Any, *tasks: asyncio.Task[Any] | None) -> None:
    """Cancel `tasks` (those running `ingest.run()`; None: one not started yet) and wait for them to end, whatever
    they raised, then stop `ingest` and close `nc`."""
    started = [task for task in tasks if task is not None]
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)
    await ingest.stop()
    await nc.close()
