"""Evaluation's read of the decision log (`evaluation.rewarded_decisions`): the newest rewarded decisions.

    python bench/evaluation_read.py                                   # SQLite in a temporary directory, 1M rows
    python bench/evaluation_read.py --against 0009                    # and at 0009's schema, in the same table
    python bench/evaluation_read.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
    python bench/evaluation_read.py --rows 20000 --waiting 2000 --limit 500 --repeat 1   # a small run

Nine decisions in ten are never rewarded, and the newest wait for their rewards (up to the join window,
`TIPSTREAM_LEARNER_JOIN_WINDOW_S`; at ~5,000 answers a second, ~18M rows an hour). A card's evaluation reads the
newest `TIPSTREAM_CARD_EVAL_MAX_REWARDS` (50,000) rewarded ones, by `created_at` then `decision_id`.

Steps:
1. The database migrated as the service migrates it (PostgreSQL: give an empty database of your own; the
   bench fills `tip_scores` and empties it at the end).
2. `--rows` rows made over the 30 days before the last hour, a tenth rewarded an hour later with their
   decision's text (~2 KB, as the learner writes a rewarded row back); then `--waiting` rows made in the last
   hour, unrewarded yet; written in time order, as the checkpoint writes them. PostgreSQL's statistics
   refreshed (VACUUM ANALYZE, as autovacuum keeps them).
3. `rewarded_decisions(engine, --limit)` timed `--repeat` times (median), and its query's plan printed.
4. With `--against REVISION`: the database migrated down to it, the same again, then up to the head, timed
   (the upgrade's index builds over the table).
Last line: {"bench": "evaluation_read", "database": ..., "rows": ..., "waiting": ..., "limit": ...,
"head_ms": ..., "against": ..., "against_ms": ..., "upgrade_s": ...}
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa
from retention import FILL_BATCH, NOW, make_row  # bench/retention.py's rows, as /score and the learner write them

from app import db, evaluation, migrate
from app.settings import Settings


def fill(engine: sa.Engine, rows: Any) -> None:
    """In batches of up to FILL_BATCH rows, a row's reward in a later one than the row (as a checkpoint has each
    decision once: a statement may not write a row twice)."""
    batch: dict[str, dict[str, Any]] = {}
    for row in itertools.chain(rows, [None]):
        if row is None or len(batch) == FILL_BATCH or row["decision_id"] in batch:
            with engine.begin() as conn:
                db.upsert(conn, db.tip_scores, list(batch.values()), ["decision_id"])
            batch = {}
        if row is not None:
            batch[row["decision_id"]] = row


def plan(engine: sa.Engine, limit: int) -> list[str]:
    query = evaluation.rewarded_query(limit).compile(engine, compile_kwargs={"literal_binds": True})
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        return [str(row[-1]) for row in conn.exec_driver_sql(explain + str(query))]


def timed_reads(url: str, limit: int, repeat: int) -> float:
    """Milliseconds, the median of `repeat` reads after one to warm the caches."""
    engine = db.make_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE tip_scores")
    print("  " + "\n  ".join(plan(engine, limit)))
    assert len(evaluation.rewarded_decisions(engine, limit).decisions) == limit, "fewer rewarded rows than --limit"
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        evaluation.rewarded_decisions(engine, limit)
        times.append(time.perf_counter() - started)
    engine.dispose()
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("TIPSTREAM_BENCH_DATABASE_URL"),
                        help="an empty database of yours (default: SQLite in a temporary directory)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows made before the last hour (default 1000000)")
    parser.add_argument("--waiting", type=int, default=100_000,
                        help="rows made in the last hour, waiting for their rewards (default 100000)")
    parser.add_argument("--limit", type=int, default=Settings.model_fields["card_eval_max_rewards"].default,
                        help="rewarded decisions read (default: TIPSTREAM_CARD_EVAL_MAX_REWARDS's, 50000)")
    parser.add_argument("--repeat", type=int, default=5, help="reads timed (default 5)")
    parser.add_argument("--against", metavar="REVISION", help="also at this revision's schema, in the same table")
    args = parser.parse_args()
    if args.against and args.against not in migrate.revisions()[:-1]:
        parser.error(f"--against {args.against}: name a revision before the head, {migrate.revisions()[-1]}")

    rand = random.Random(7)
    tmp = tempfile.TemporaryDirectory(prefix="tipstream-bench-")
    url = args.database_url or f"sqlite:///{Path(tmp.name) / 'tipstream.db'}"
    head = migrate.revisions()[-1]
    migrate.upgrade(url)
    engine = db.make_engine(url)
    with engine.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(db.tip_scores)).scalar_one():
            parser.error("tip_scores holds rows already: give an empty database")

    def written() -> Any:
        """Rows as the checkpoint writes them, in time order: each decision as made, a tenth again an hour later
        with its reward (on PostgreSQL an update: a new row version, where the table then ends)."""
        start, step = NOW - timedelta(hours=1) - timedelta(days=30), timedelta(days=30) / args.rows
        total, pending = args.rows + args.waiting, collections.deque[tuple[datetime, dict[str, Any]]]()
        for i in range(total):
            made = start + step * i if i < args.rows else NOW - timedelta(hours=1) * (1 - (i - args.rows) / args.waiting)
            while pending and pending[0][0] <= made:
                yield pending.popleft()[1]
            new = make_row(rand, made, None)
            if i < args.rows and rand.random() < 0.1:
                rewarded = made + timedelta(hours=1)
                pending.append((rewarded, {**make_row(rand, made, rewarded), "decision_id": new["decision_id"]}))
            yield new
        yield from (row for _, row in pending)

    figures: dict[str, Any] = {"bench": "evaluation_read", "database": engine.dialect.name, "rows": args.rows,
                               "waiting": args.waiting, "limit": args.limit}
    try:
        print(f"{engine.dialect.name}: {args.rows:,} rows, a tenth rewarded, and {args.waiting:,} newer waiting")
        fill(engine, written())
        figures["head_ms"] = round(timed_reads(url, args.limit, args.repeat), 1)
        print(f"at {head}: {figures['head_ms']:.1f} ms to read the newest {args.limit:,} rewarded (median of "
              f"{args.repeat})", flush=True)
        if args.against:
            migrate.downgrade(url, args.against)
            figures["against"] = args.against
            figures["against_ms"] = round(timed_reads(url, args.limit, args.repeat), 1)
            print(f"at {args.against}: {figures['against_ms']:.1f} ms", flush=True)
            started = time.perf_counter()
            migrate.upgrade(url)
            figures["upgrade_s"] = round(time.perf_counter() - started, 2)
            print(f"the upgrade from {args.against} to {head}: {figures['upgrade_s']:.2f} s")
    finally:
        migrate.upgrade(url)
        with engine.begin() as conn:  # its pages too: a table left bloated misleads the next run's planner
            conn.execute(sa.text("TRUNCATE tip_scores") if conn.dialect.name == "postgresql" else sa.delete(db.tip_scores))
        engine.dispose()
        tmp.cleanup()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
