"""Users whose state is only in the checkpoint are read in a worker thread, off the event loop.

A user still cold after a restart, or let go of while idle (`OnlineStore.rest`), is read back
from the database by the first event or request that needs them. Read on the event loop, one
slow read held up everything the service does: a table locked by an operator's `VACUUM FULL` or
`ALTER TABLE` on PostgreSQL, or a server stopped while its kernel still acknowledged, froze
`/healthz`, every `/score` and every stream until the database answered, however long. Read in a
thread, only what needs that user waits, for at most `LOAD_TIMEOUT_S`; then it is a 503 with
`Retry-After` (a request) or a retry of the chunk (ingest), as for a database that is away.

The reads have threads of their own, `READERS` of them. A read that gives up waiting leaves its
thread blocked until the database answers (a lock lasts as long as the operator's command): in
the loop's default executor, a few dozen of them (a /score for each of as many idle users) took
every worker thread, and what else the service runs in a thread (the offline writer, tip_scores
retention, model saves, the checkpointer's probes, the embedded NATS server's restart) waited for
the lock too. Fewer than the connections the engine keeps (5), so they never hold them all either;
more than one read at a time, as on the event loop before.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from app.db import briefly
from app.metrics import METRICS
from streams.log_throttle import LogThrottle, since_last_line
from streams.store import OnlineStore, StateUnavailable

log = logging.getLogger("tipstream.thaw")

LOAD_TIMEOUT_S = 10.0
READERS = 4
_readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="tipstream-user-read")
# One line a minute for waits given up, one for the driver's errors: a /score per idle user repeats them.
_failure_lines = LogThrottle(per_window=1)


async def load_state(store: OnlineStore, user_id: str) -> None:
    """Read `user_id`'s checkpointed state in a worker thread and put it in the store. A read made
    stale meanwhile (users let go of: `OnlineStore.install` leaves it out) is made again, in the
    thread too: the caller's own read, on the spot, ran on the event loop. Raises StateUnavailable
    when a read fails, or when the user is not in by `LOAD_TIMEOUT_S`."""
    fetch = store.fetch_cold
    assert fetch is not None, "users in the checkpoint only need fetch_cold"
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + LOAD_TIMEOUT_S
    try:
        while store.in_checkpoint_only(user_id):
            rested = store.rested
            try:
                # One queued behind stuck reads is dropped unstarted when the wait gives up. Not wait_for,
                # which can drop a stop's cancellation (`periodic.woken`).
                async with asyncio.timeout_at(deadline):
                    blobs = await loop.run_in_executor(_readers, fetch, [user_id])
            except Exception as error:  # whatever the driver raises, or the timeout
                cause = _cause(error)
                _tell(cause, timed_out=isinstance(error, TimeoutError))
                raise StateUnavailable(cause) from error  # not the user's id: ingest logs it
            store.install(user_id, blobs.get(user_id), rested)
    finally:
        METRICS.user_reads.observe(loop.time() - started)


def _cause(error: BaseException) -> str:
    """Why a read failed, in one line: a driver's error goes on with its SQL and parameters (the user's id)."""
    if isinstance(error, TimeoutError):
        return (
            f"the database did not answer within {LOAD_TIMEOUT_S:g} s: a table locked (VACUUM FULL, ALTER TABLE "
            "or LOCK on user_state) or the server stuck"
        )
    return briefly(error)


def _tell(cause: str, timed_out: bool) -> None:
    """The warning the 503 for such a user points to ("see the warnings in the log"): none was written, and
    a `user_state` locked on PostgreSQL gave 503s after 10 s each with nothing in the log. It does not name the
    user: the log is not erased when a user is forgotten (docs/operations.md, "Forgetting a user")."""
    left_out = _failure_lines.allow(timed_out)
    if left_out is None:
        return
    log.warning(
        "a user's state could not be read from the checkpoint (%s). Users not in memory (cold after a start, "
        "or idle) get 503 from /score and their features, and their events wait, until it answers%s",
        cause,
        since_last_line(left_out),
    )
