"""Waiting for nats-py's answers with a cancellation kept.

nats-py's requests wait with `asyncio.wait_for`, which on Python 3.11 hands a task cancelled in the turn of the
loop after the answer came (its waiter ended, the task not resumed yet) that answer, and drops the cancellation
(CPython gh-86296, fixed in 3.12). A loop asking NATS then went on after the stop cancelled it, which waited
`app.background.STOP_CANCEL_AGAIN_S` to cancel it again. Here, not in `app/`: the helpers of `streams/` that a
loop's stop can meet ask through it too (`streams/` does not import `app/`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def answered(work: Awaitable[T], timeout_s: float | None = None) -> T:
    """`work`'s result, waited for at most `timeout_s` (TimeoutError after; None: no bound but the request's own),
    run as a task of its own. A cancellation of this wait is kept whatever `work` does with it.

    >>> async def demo():
    ...     async def slow():
    ...         await asyncio.sleep(10)
    ...     try:
    ...         await answered(slow(), 0.001)
    ...     except TimeoutError as error:
    ...         return str(error), await answered(asyncio.sleep(0, "here"), 1), await answered(asyncio.sleep(0, "too"))
    >>> asyncio.run(demo())
    ('no answer within 0.001 s', 'here', 'too')
    """
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieved)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return task.result()


def _retrieved(task: asyncio.Future[object]) -> None:
    # Left alone, asyncio prints "exception was never retrieved" for work given up on that failed later.
    if not task.cancelled():
        task.exception()
