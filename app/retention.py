"""How long the SQL decision log keeps its rows: `tip_scores` older than a bound are deleted.

Every `/score` answer adds a row, and nothing else ever removes one: at the ~5,000 answers a
second one service gives here, the table grew by ~430 million rows a day, until the disk was
full. The streams keep `TIPSTREAM_STREAM_MAX_AGE_DAYS` of the log, so a rebuild cannot bring
older rows back anyway; the SQL log keeps `TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS` (the same 90 days
by default; 0 keeps them all).

Steps of one pass (every `EVERY_S` seconds):
1. The cut is the wall clock less the bound.
2. Delete the `batch_for` rows that may go first: whose decision was made (`created_at`) or served (the time in
   its id) before the cut, and whose `rewarded_at` (if any) is before it too, in a transaction of their own, in
   a worker thread (SQLite and psycopg let go of the GIL while the database works), read off the index of when
   each row may go (`db.tip_scores_goes_at`, migration 0009): a pass reads about the rows it deletes.
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

Rows made before the cut and rewarded after it (a reward comes up to the join window, 3 days, after its
decision) cannot go yet: ~1.8 million at 5,000 answers a second with a tenth rewarded an hour later. Walking
`created_at`'s index and then the primary key's from the oldest, as before 0009, every pass read them all
again before any row it deleted, and on SQLite held the write lock (the checkpoint's) meanwhile. A pass with
nothing to delete, beside 1M younger rows (`python bench/retention.py`, `--database-url` for PostgreSQL), with
0, 10,000, 100,000 and 300,000 such rows: on SQLite 3.4, 62, 1,425 and 3,244 ms before, 1.3-3.7 ms now; on
PostgreSQL 4.8, 17, 85 and 573 ms before, 1.5-4.6 ms now. A backlog of 100,000 rows beside the 300,000 went in
18.3 s before, 12.7 s after on SQLite (the deletes themselves), 2.5 and 1.0-1.4 s on PostgreSQL; in 8.8 s on
SQLite, 1,000 rows a transaction, on the faster machine where 10,000 took 6.3 s (`BATCH`). The index costs each
row the checkpoint writes 5-25% (`python bench/row_writes.py --against 0008 --batches 20`, alternating): on
SQLite 25.4 -> 31.8 and 30.3 -> 36.9 us in a quiet spell, ratios 1.05 and 1.06 in a busy one; on PostgreSQL
ratios 0.98-1.17 over six runs (1.18-1.38 with a regular expression in its place, `db._POSTGRESQL_SERVED`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, select
from sqlalchemy.engine import Connection

from app import db
from app.decision_ids import served_before_bound
from app.learning_metrics import DECISION_ROWS_PRUNED
from app.thread_work import ThreadWork
from streams.fold import to_ms

log = logging.getLogger("tipstream.retention")
# Rows a transaction. SQLite's holds the one write lock, the checkpoint's too: 10,000 held it up to 1.1 s over a
# backlog beside 1M rows (25-30 us a row deleted, and the WAL checkpoint its commit sets off), 1,000 up to 0.13 s,
# at 11,400 rows a second against 15,800 (`python bench/retention.py [--batch 10000]`, `longest_batch_ms`).
# PostgreSQL locks only the rows: 10,000 take 25-100 ms.
BATCH = {"sqlite": 1_000}
BATCH_ELSEWHERE = 10_000
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


def goes_at_key(dialect_name: str, cut: datetime) -> datetime | str:
    """`cut` as `db.tip_scores_goes_at` is compared with. SQLite's is in milliseconds (floored), as 12 hex digits
    (1970 for any time before: its expression has none earlier); a row within a millisecond of the cut goes at
    the next pass.

    >>> goes_at_key("sqlite", datetime(2026, 2, 14, 23, 43, 59, 248_999, UTC))
    '019c5e8a2b10'
    """
    return cut if dialect_name == "postgresql" else served_before_bound(max(to_ms(cut), 0)).removeprefix("d-")


def batch_for(dialect_name: str) -> int:
    """
    >>> batch_for("sqlite"), batch_for("postgresql")
    (1000, 10000)
    """
    return BATCH.get(dialect_name, BATCH_ELSEWHERE)


def delete_before(conn: Connection, cut: datetime, limit: int) -> int:
    """Delete up to `limit` rows whose decision was made or served before `cut` and whose last reward was too
    (steps 2-3), the earliest to go first, read off the index of when each may go; how many went."""
    table, goes_at = db.tip_scores, db.tip_scores_goes_at
    # In the outer statement too: PostgreSQL re-checks a row a concurrent checkpoint has just
    # rewarded against the outer conditions only, and the subquery's answer was read before it.
    old = goes_at < goes_at_key(conn.dialect.name, cut)
    # Rows a checkpoint holds (rewriting old rows: a rebuild from the log, a backfill) are left for the
    # next pass, not waited for: waiting, the delete and the checkpoint each held rows the other
    # wanted, and PostgreSQL aborted one of them (deadlock detected), the checkpoint as often as not.
    # Locked here first, the rows deleted are waited on by a checkpoint at most, never the other way.
    oldest = select(table.c.decision_id).where(old).order_by(goes_at).limit(limit).with_for_update(skip_locked=True)
    return conn.execute(delete(table).where(table.c.decision_id.in_(oldest.scalar_subquery()), old)).rowcount


class TipScoresRetention:
    """Keeps `tip_scores` to `max_age_days`; the service runs `prune` every `EVERY_S` seconds."""

    def __init__(self, engine: Engine, max_age_days: float, clock: Callable[[], float] = time.time,
                 batch: int | None = None, threads: ThreadWork | None = None) -> None:
        self.engine, self.max_age_days, self.clock = engine, max_age_days, clock
        self.batch = batch or batch_for(engine.dialect.name)
        self.longest_batch_s = 0.0  # the longest a delete's transaction took, from its start (a wait for a lock in it)
        self.threads = threads or ThreadWork()  # its deletes, which the stop waits for
        self.refused: str | None = None  # why the database is no longer this service's: it deletes no row
        # Awaited before each batch's delete (the service's lock made sure of, `refused` set if another took it):
        # another service's own bound (TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS) may keep rows this one's deletes.
        self.before_write: Callable[[], Awaitable[None]] | None = None

    def _delete_batch(self, cut: datetime) -> int:
        started = time.perf_counter()
        with self.engine.begin() as conn:
            deleted = delete_before(conn, cut, self.batch)
        self.longest_batch_s = max(self.longest_batch_s, time.perf_counter() - started)
        return deleted

    async def prune(self) -> int:
        """One pass (steps 1-3); the rows deleted."""
        cut = cut_for(self.clock(), self.max_age_days)
        if cut is None:
            return 0
        total, started = 0, time.monotonic()
        next_report = started + PROGRESS_EVERY_S
        while True:
            if self.before_write is not None and self.refused is None:
                await self.before_write()
            if self.refused is not None:
                break
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
