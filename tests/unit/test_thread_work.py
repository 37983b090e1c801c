"""`app/thread_work.py`: work in worker threads, known until it ends, also once its awaiting task is cancelled."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from app.thread_work import TELL_AFTER_S, ThreadWork


async def test_work_whose_task_was_cancelled_is_waited_for_then_given_up_on_past_the_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    """asyncio.to_thread forgets its thread once the task awaiting it is cancelled: the stop could not tell
    that a write was still on its way to the database."""
    caplog.set_level(logging.INFO, logger="tipstream")
    threads, release, began = ThreadWork(), threading.Event(), threading.Event()

    def held_up() -> str:
        began.set()
        release.wait(10)
        return "written"

    task = asyncio.ensure_future(threads.run("a user_features write", held_up))
    await asyncio.to_thread(began.wait, 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert await threads.ended(TELL_AFTER_S + 0.2) == ["a user_features write"], "past the bound: still running"
    assert "stopping: waiting up to 1.2 s for a user_features write in worker threads" in caplog.text
    release.set()
    assert await threads.ended(10) == []


async def test_work_that_ended_is_not_waited_for() -> None:
    threads = ThreadWork()
    assert await threads.run("a tip_scores delete", sum, [1, 2]) == 3
    with pytest.raises(ZeroDivisionError):
        await threads.run("a checkpoint", divmod, 1, 0)
    assert await asyncio.wait_for(threads.ended(10), 0.5) == []
