"""Background steps that run every so often and outlive their own failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.db import one_line

log = logging.getLogger("tipstream")


async def every(interval_s: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `step` every `interval_s` seconds, forever; a failure is logged and the next round retries.

    >>> async def demo():
    ...     calls = []
    ...     async def step():
    ...         calls.append(1)
    ...         if len(calls) == 1:
    ...             raise RuntimeError("database away")
    ...     task = asyncio.create_task(every(0.001, step, "a demo step"))
    ...     while len(calls) < 3:
    ...         await asyncio.sleep(0.001)
    ...     task.cancel()
    ...     return len(calls) >= 3
    >>> asyncio.run(demo())
    True
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - retried next round; the step decides what is fatal
            log.warning("%s failed (%s); trying again in %gs", what, one_line(error), interval_s)
