"""Work the service hands to worker threads, known until each piece ends.

A task awaiting `asyncio.to_thread` that is cancelled (the stop cancels the service's loops) stops
awaiting; the thread goes on. A user_features write, a tip_scores delete, an erasure's last
transaction or a checkpoint's could then commit after the stop had released the database lock, under
another service started on the same database since. Such work runs through `ThreadWork.run`, and the
stop waits for it (`ThreadWork.ended`) before it lets go of the database.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("tipstream")
# The stop says what it waits for once it has waited this long: a write held up (the database slow, a
# row locked) must not look like a stop that hangs.
TELL_AFTER_S = 1.0


@functools.cache
def _pool() -> ThreadPoolExecutor:
    # Of its own, as asyncio's default executor is (the same size): that one hands out no handle on the
    # thread's own future, which is what ends with the work, not with the task that awaited it.
    return ThreadPoolExecutor(thread_name_prefix="tipstream-work")


class ThreadWork:
    def __init__(self) -> None:
        self._running: dict[Future[Any], str] = {}

    async def run(self, what: str, function: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
        """`function(*args)` in a worker thread (as `asyncio.to_thread`; on `executor`, if given), known as
        `what` (the stop's log names it) until it ends, also after the task awaiting it was cancelled."""
        call = functools.partial(contextvars.copy_context().run, function, *args)
        future = (executor or _pool()).submit(call)
        self._running[future] = what
        future.add_done_callback(self._running.pop)  # in the worker thread: a dict's pop is atomic
        return await asyncio.wrap_future(future)

    async def ended(self, timeout_s: float) -> list[str]:
        """Wait for the work running now to end, `timeout_s` at most, logging what it waits for after
        TELL_AFTER_S; what still runs then."""
        waiting = {asyncio.wrap_future(future): what for future, what in dict(self._running).items()}
        if not waiting:
            return []
        _, pending = await asyncio.wait(waiting, timeout=min(TELL_AFTER_S, timeout_s))
        if pending and timeout_s > TELL_AFTER_S:
            log.info("stopping: waiting up to %g s for %s in worker threads, begun before the stop", timeout_s,
                     named(waiting[future] for future in pending))
            _, pending = await asyncio.wait(pending, timeout=timeout_s - TELL_AFTER_S)
        return [waiting[future] for future in pending]


def named(whats: Any) -> str:
    """Each of `whats` once, with how many times it came when more than once.

    >>> named(["a user_features write", "a tip_scores delete", "a user_features write"])
    'a user_features write (2), a tip_scores delete'
    """
    return ", ".join(what if n == 1 else f"{what} ({n})" for what, n in Counter(whats).items())
