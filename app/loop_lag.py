"""How late the event loop runs a timer: a sample of how long something held the loop.

Everything the service does shares one event loop: a step that runs long without yielding (a
read on the loop, a large copy) holds every request and every stream meanwhile, and shows in
no other metric. A timer due every `INTERVAL_S` that fires late by `x` seconds saw the loop held
for about `x`; `tipstream_event_loop_lag_seconds` keeps those samples.

>>> import asyncio, time
>>> async def demo():
...     lags = []
...     watcher = asyncio.create_task(watch(lags.append, interval_s=0.01))
...     await asyncio.sleep(0.015)
...     time.sleep(0.05)  # something holds the loop
...     await asyncio.sleep(0.02)
...     watcher.cancel()
...     return max(lags) >= 0.03
>>> asyncio.run(demo())
True
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

INTERVAL_S = 0.25


async def watch(observe: Callable[[float], object], interval_s: float | None = None) -> None:
    """Sleep `interval_s` (`INTERVAL_S`), observe how much later than that the loop woke, for ever."""
    interval_s = INTERVAL_S if interval_s is None else interval_s
    clock = time.perf_counter
    while True:
        due = clock() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(clock() - due, 0.0))
