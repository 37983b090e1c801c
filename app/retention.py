"""How long the SQL decision log keeps its rows: `tip_scores` older than a bound are deleted.

Every `/score` answer adds a row, and nothing else ever removes one: at the ~5,000 answers a
second one service gives here, the table grew by ~430 million rows a day, until the disk was
full. The streams keep `TIPSTREAM_STREAM_MAX_AGE_DAYS` of the log, so a rebuild cannot bring
older rows back anyway; the SQL log keeps `TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS` (the same 90 days
by default; 0 keeps them all).

Steps of one pass (every `EVERY_S` seconds):
1. The cut is the wall clock less the bound.
2. Delete the oldest `BATCH` rows whose decision was made (`created_at`) or served (the time in its id) before
   the cut, and whose `rewarded_at` (if any) is before it too, in a transaction of their own, in a worker thread
   (SQLite and psycopg let go of the GIL while the database works): by `created_at` (its index), then, while
   the batch has room, by when served (the primary key: ids of ours sort as the times in them, `decision_ids`).
   The checkpoint's transactions wait at most one batch. A row a checkpoint holds is left for the next pass
   (PostgreSQL's SKIP LOCKED): the pass waits for none.
3. Repeat until a batch comes back short: after a long stop, a backlog of millions goes in
   one pass, a batch at a time, with progress logged.

`created_at` is the decision's time, which is the request's `context.now` when one is given, so it may
lie ahead (a tip ranked for a later reminder) or in the past (a backfill). Ahead, `created_at` alone kept
the row as long (the user's features as served, once rewarded: for ever, for year 9999); when it was
served, the time in its id, bounds it too, as it bounds a request to forget the user. A decision of
another publisher's, whose id has no time in it, goes by its `created_at` only. In the past, a row may
go before its reward comes, inside the join window (`TIPSTREAM_LEARNER_JOIN_WINDOW_S`, measured from
when it was served); the reward then writes the whole row back (the learner holds the decision), and
`rewarded_at` keeps it for the bound. A row served in the present is older than the join window,
which the settings keep shorter than the bound, before it can go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, delete, func, select
from sqlalchemy.engine import Connection

from app import db
from app.decision_ids import ID_LENGTH, served_before_bound
from app.learning_metrics import DECISION_ROWS_PRUNED
from app.thread_work import ThreadWork
from streams.fold import to_ms

log = logging.getLogger("tipstream.retention")
BATCH = 10_000  # rows a transaction: 20-30 ms of SQLite's write lock, 25-100 ms on PostgreSQL (measured)
EVERY_S = 60.0
PROGRESS_EVERY_S = 10.0


def cut_for(now_s: float, max_age_days: float) -> datetime | None:
    """The instant before which rows go; None when it is before year 1, older than any row.

    >>> cut_for(90 * 86_400 + 60, 90).isoformat()
    '1970-01-01T00:01:00+00:00'
    >>> cut_for(90 * 86_400, 1e6), cut_for(90 * 86_400, 1e21)
    (None, None)
    """
    try:
        return datetime.fromtimestamp(now_s, UTC) - timedelta(days=max_age_days)
    except OverflowError:  # datetime's range: every pass failed, a warning a minute, for "keep them for ages"
        return None


def delete_before(conn: Connection, cut: datetime, limit: int) -> int:
    """Delete up to `limit` rows whose decision was made or served before `cut` and whose last reward was too
    (steps 2-3); how many went. The oldest by `created_at` first (its index), then the oldest served (the primary
    key's), as long as the batch has room."""
    table = db.tip_scores
    deleted = _delete_oldest(conn, table.c.created_at < cut, table.c.created_at, cut, limit)
    cut_ms = to_ms(cut)
    if deleted < limit and cut_ms > 0:  # no id of ours is older than 1970
        # A decision served for a `context.now` far ahead has that as its `created_at`: gone by it alone, its
        # row (the user's features as served, once rewarded) stayed for as long ahead, indefinitely for year 9999.
        # An id of another publisher's, not ours in form, has no time in it (`decision_ids`): its `created_at` only.
        ours = table.c.decision_id.startswith("d-") & (func.length(table.c.decision_id) == ID_LENGTH)
        served = (table.c.decision_id >= "d-") & (table.c.decision_id < served_before_bound(cut_ms)) & ours
        deleted += _delete_oldest(conn, served, table.c.decision_id, cut, limit - deleted)
    return deleted


def _delete_oldest(conn: Connection, old: ColumnElement[bool], order: ColumnElement[Any], cut: datetime,
                   limit: int) -> int:
    """Delete the first `limit` rows by `order` (an indexed column: the pass reads no more of the table than it
    deletes) that are `old` and unrewarded or rewarded before `cut`."""
    table = db.tip_scores
    # In the outer statement too: PostgreSQL re-checks a row a concurrent checkpoint has just
    # rewarded against the outer conditions only, and the subquery's answer was read before it.
    old = old & (table.c.rewarded_at.is_(None) | (table.c.rewarded_at < cut))
    # Rows a checkpoint holds (rewriting old rows: a rebuild from the log, a backfill) are left for the
    # next pass, not waited for: waiting, the delete and the checkpoint each held rows the other
    # wanted, and PostgreSQL aborted one of them (deadlock detected), the checkpoint as often as not.
    # Locked here first, the rows deleted are waited on by a checkpoint at most, never the other way.
    oldest = select(table.c.decision_id).where(old).order_by(order).limit(limit).with_for_update(skip_locked=True)
    return conn.execute(delete(table).where(table.c.decision_id.in_(oldest.scalar_subquery()), old)).rowcount


class TipScoresRetention:
    """Keeps `tip_scores` to `max_age_days`; the service runs `prune` every `EVERY_S` seconds."""

    def __init__(self, engine: Engine, max_age_days: float, clock: Callable[[], float] = time.time,
                 batch: int = BATCH, threads: ThreadWork | None = None) -> None:
        self.engine, self.max_age_days, self.clock, self.batch = engine, max_age_days, clock, batch
        self.threads = threads or ThreadWork()  # its deletes, which the stop waits for

    def _delete_batch(self, cut: datetime) -> int:
        with self.engine.begin() as conn:
            return delete_before(conn, cut, self.batch)

    async def prune(self) -> int:
        """One pass (steps 1-3); the rows deleted."""
        cut = cut_for(self.clock(), self.max_age_days)
        if cut is None:
            return 0
        total, started = 0, time.monotonic()
        next_report = started + PROGRESS_EVERY_S
        while True:
            deleted = await self.threads.run("a tip_scores delete", self._delete_batch, cut)
            total += deleted
            DECISION_ROWS_PRUNED.inc(deleted)
            if deleted < self.batch:
                break
            if time.monotonic() >= next_report:
                next_report += PROGRESS_EVERY_S
                log.info("deleting tip_scores rows made before %s: %d so far", cut.isoformat(), total)
        if total:
            log.info("deleted %d tip_scores rows made before %s (TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS=%g) in %.1fs",
                     total, cut.isoformat(), self.max_age_days, time.monotonic() - started)
        return total
