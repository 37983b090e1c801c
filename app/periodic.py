"""Background steps that run every so often and outlive their own failures, and the wait between them.

Not `asyncio.wait_for` for these waits: on Python 3.11, a task cancelled in the turn of the loop after what
it waits for has come (its waiter ended, the task not resumed yet) is handed that result instead, and the
cancellation is dropped (CPython gh-86296, fixed in 3.12). A loop of the service's then went on, and the
stop, which waits for every loop it cancels, waited for ever, whatever signal came next. `asyncio.timeout`
keeps the cancellation. nats-py's requests still wait so: a loop asks NATS through `streams.answers.answered`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from app.db import one_line
from streams.log_throttle import LogThrottle, counted, since_last_line

log = logging.getLogger("tipstream")


async def woken(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` has passed; whether it was set.

    >>> async def demo():
    ...     event = asyncio.Event()
    ...     asyncio.get_running_loop().call_later(0.001, event.set)
    ...     return await woken(event, 0.001 / 2), await woken(event, 10)
    >>> asyncio.run(demo())
    (False, True)
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def every(interval_s: float, step: Callable[[], Awaitable[object]], what: str,
                clock: Callable[[], float] = time.monotonic) -> None:
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
    # A step failing for as long as a fault lasts (the database away, its disk full) wrote a line every round, the
    # user_features pass's every 30 s: told at once, then once a minute with the rounds since, another kind of failure
    # at once, and once a round goes through again. Not cleared by a round that goes through: a step failing every
    # other round would be told twice a round. That it goes through is told after a failure told (`told`), not
    # throttled a minute apart itself: another kind of failure, told at once, was else the last word.
    lines, failed_at, failures, told = LogThrottle(clock=clock), 0.0, 0, False
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - retried next round; the step decides what is fatal
            failed_at, failures = failed_at if failures else clock(), failures + 1
            left_out = lines.allow(type(error))
            if left_out is not None:
                told = True
                log.warning("%s failed (%s); trying again in %gs%s", what, one_line(error), interval_s,
                            since_last_line(left_out, "failed round", "failed rounds"))
            continue
        if told:
            log.info("%s goes through again, %.0f s after the first round that failed (%s failed)", what,
                     clock() - failed_at, counted(failures, "round", "rounds"))
        failures, told = 0, False
