"""The service's background tasks: each loop of its background work (the ingests, the checkpointer,
the decision publisher and tail, the user_features passes, the warm-up, ...) runs as a task held here,
which the stop cancels. A task that ends with an exception is a bug, and the service stops for it.

Apart from `bootstrap.Service`, which starts the tasks and says what failing means (`fail`): what is
here is only how a task's end is looked at and how a stop makes sure each ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from app.db import one_line

log = logging.getLogger("tipstream")
# A task the stop cancelled and still running after this long dropped the cancellation: it is cancelled again.
STOP_CANCEL_AGAIN_S = 1.0


class BackgroundTasks:
    def __init__(self, fail: Callable[[str], None]) -> None:
        self.tasks: list[asyncio.Task[Any]] = []
        self._fail = fail  # the service stops with this message (once: not while stopping, nor after a failure)

    def start(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task of the service's background work, held to the stop, which cancels it. Each loop retries
        what it expects to fail (the database or NATS away) itself; what else ends one is a bug, and the
        service stops for it (`_ended`)."""
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._ended)
        self.tasks.append(task)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        """A task that raised stops the service (exit code 1): its supervisor starts it again from the last
        checkpoint. Left to the stop to look at, the service answered /readyz 200 with, say, its SIGNALS ingest
        gone, serving ever older features."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("the service's %s task failed:", task.get_name(), exc_info=error)
        self._fail(f"The service's {task.get_name()} task failed ({type(error).__name__}: {one_line(error)}), a bug in "
                   "tipstream (its traceback is logged above): please report it. tipstream stops (exit code 1) so that "
                   "its supervisor starts it again; what it read since its last checkpoint is read again, and nothing "
                   "is counted twice.")

    async def cancel(self) -> None:
        """Cancel every task and wait for each to end. One still running `STOP_CANCEL_AGAIN_S` later had its
        cancellation dropped under it (nats-py's requests wait with Python 3.11's `asyncio.wait_for`, which
        drops one that comes with the answer: `periodic.woken`) and went on: it is cancelled again. Waited
        for once, the stop waited for it for ever, and no later signal ended the process."""
        await self.end(self.tasks)

    async def end(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel `tasks` and wait for each to end, as `cancel` does all of them."""
        for task in tasks:
            task.cancel()
        running = {task for task in tasks if not task.done()}
        while running:
            _, running = await asyncio.wait(running, timeout=STOP_CANCEL_AGAIN_S)
            if running:
                log.warning("stopping: %s went on after being cancelled; cancelling again",
                            ", ".join(sorted(task.get_name() for task in running)))
                for task in running:
                    task.cancel()
