"""A retention pass of `tip_scores` (app/retention.py): with nothing to delete, as rows made before the cut but
rewarded after it pile up, and with a backlog to delete.

    python bench/retention.py                                    # SQLite in a temporary directory, 1M rows
    python bench/retention.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
    python bench/retention.py --rows 20000 --late 0,2000 --backlog 5000 --repeat 1   # a small run

A row made (or served) before the cut whose reward came after it is kept until the cut passes that reward
too; a reward comes up to the join window (`TIPSTREAM_LEARNER_JOIN_WINDOW_S`, 3 days) after its decision.
At ~5,000 answers a second with a tenth rewarded an hour later, that is ~1.8M such rows at any time.

Steps:
1. The database migrated as the service migrates it (PostgreSQL: give an empty database of your own; the
   bench fills `tip_scores` and empties it at the end).
2. `--rows` rows made and served over the bound (`TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS`, 90 days) up to now,
   as /score makes them: ids as `new_decision_id` makes them for the time served, a tenth rewarded an hour
   later with their decision's text (~2 KB, as the learner writes a rewarded row back).
3. For each count of `--late` (rising): rows made within the join window before the cut and rewarded after
   it are added up to that count, then a pass with nothing to delete is timed `--repeat` times (median).
4. `--backlog` rows made before the cut (half unrewarded, half rewarded before the cut), then the pass
   that deletes them, timed: rows a second, and the longest of its transactions (on SQLite, how long it held
   the write lock the checkpoint waits for).
Goal: a pass reads about what it deletes: the steady pass takes about as long with 300k late rows as with none.
Last line: {"bench": "retention", "database": ..., "rows": ..., "steady_ms": {late: ms, ...},
"steady_ms_at_most_late": ..., "backlog": ..., "backlog_s": ..., "backlog_rows_per_s": ...,
"longest_batch_ms": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa

from app import db, migrate
from app.decision_ids import served_before_bound
from app.retention import TipScoresRetention
from app.settings import Settings
from streams.fold import to_ms

NOW = datetime(2026, 12, 6, 12, tzinfo=UTC)
DECISION_TEXT = '{"pad": "' + "x" * 1990 + '"}'  # a rewarded row's decision event, ~2 KB
FILL_BATCH = 5_000


def make_row(rand: random.Random, made: datetime, rewarded: datetime | None) -> dict[str, Any]:
    decision_id = served_before_bound(to_ms(made)) + f"{rand.getrandbits(64):016x}"
    # The decision's own id in its text: a card's read leaves a decision without one out, as damaged.
    decision = f'{{"id": "{decision_id}", {DECISION_TEXT[1:]}'
    rewards = {"decision": decision, "rewards": {"t1": 1.0}, "reward": 1.0} if rewarded else {}
    return {"decision_id": decision_id, "user_id": f"u-{rand.randrange(100_000)}", "created_at": made,
            "kind": "logreg", "model_version": "v1", "shadow_version": None, "prompt_version": None,
            "policy": "epsilon_greedy", "tip_id": f"tip-{rand.randrange(12)}", "score": 0.5, "propensity": 0.9,
            "decision": None, "rewards": None, "reward": None, "rewarded_at": rewarded, **rewards}


def fill(engine: sa.Engine, rows: Any, count: int, what: str) -> None:
    started, batch = time.monotonic(), []
    for done in range(1, count + 1):
        batch.append(next(rows))
        if len(batch) == FILL_BATCH or done == count:
            with engine.begin() as conn:
                db.upsert(conn, db.tip_scores, batch, ["decision_id"])
            batch = []
            if done % 200_000 == 0 or done == count:
                print(f"  {what}: {done:,} of {count:,} rows ({time.monotonic() - started:.0f} s)", flush=True)


def analyze(engine: sa.Engine) -> None:
    """Fresh statistics, as autovacuum (PostgreSQL) keeps them; SQLite's planner reads none unless asked."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE tip_scores")


def timed_pass(retention: TipScoresRetention) -> tuple[float, int]:
    started = time.perf_counter()
    deleted = asyncio.run(retention.prune())
    return time.perf_counter() - started, deleted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("TIPSTREAM_BENCH_DATABASE_URL"),
                        help="an empty database of yours (default: SQLite in a temporary directory)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows younger than the cut (default 1000000)")
    parser.add_argument("--late", default="0,10000,100000,300000",
                        help="counts of rows made before the cut, rewarded after it (default 0,10000,100000,300000)")
    parser.add_argument("--backlog", type=int, default=100_000, help="rows to delete in the last pass (default 100000)")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows a delete transaction (default: the service's for the database, app/retention.py)")
    parser.add_argument("--repeat", type=int, default=5, help="steady passes timed at each count (default 5)")
    args = parser.parse_args()
    lates = sorted(int(count) for count in args.late.split(","))

    max_age_days = Settings.model_fields["tip_scores_max_age_days"].default  # the defaults, not this shell's
    bound = timedelta(days=max_age_days)
    window = timedelta(seconds=Settings.model_fields["learner_join_window_s"].default)
    cut, rand = NOW - bound, random.Random(7)
    tmp = tempfile.TemporaryDirectory(prefix="tipstream-bench-")
    url = args.database_url or f"sqlite:///{Path(tmp.name) / 'tipstream.db'}"
    migrate.upgrade(url)
    engine = db.make_engine(url)
    with engine.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(db.tip_scores)).scalar_one():
            parser.error("tip_scores holds rows already: give an empty database")
    retention = TipScoresRetention(engine, max_age_days, clock=NOW.timestamp, batch=args.batch)

    def young() -> Any:
        while True:
            made = cut + (NOW - cut) * rand.random()
            rewarded = made + timedelta(hours=1) if rand.random() < 0.1 and made + timedelta(hours=1) < NOW else None
            yield make_row(rand, made, rewarded)

    def late() -> Any:  # made within the join window before the cut, rewarded after the cut, within the window
        while True:
            made = cut - window * rand.random()
            yield make_row(rand, made, cut + (made + window - cut) * rand.random())

    def backlog() -> Any:
        while True:
            made = cut - timedelta(days=1) - bound * rand.random()
            yield make_row(rand, made, made + timedelta(hours=1) if rand.random() < 0.5 else None)

    steady_ms: dict[int, float] = {}
    try:
        print(f"{engine.dialect.name}: {args.rows:,} rows younger than the cut ({bound.days} days before now)")
        fill(engine, young(), args.rows, "younger than the cut")
        have = 0
        for count in lates:
            if count > have:
                fill(engine, late(), count - have, "made before the cut, rewarded after it")
                have = count
            analyze(engine)
            timed_pass(retention)  # warm the caches
            times = []
            for _ in range(args.repeat):
                took, deleted = timed_pass(retention)
                assert deleted == 0, deleted
                times.append(took)
            steady_ms[count] = round(statistics.median(times) * 1e3, 2)
            print(f"a pass with nothing to delete, {count:,} rows rewarded after the cut: {steady_ms[count]:.2f} ms "
                  f"(median of {args.repeat})", flush=True)
        fill(engine, backlog(), args.backlog, "backlog")
        analyze(engine)
        retention.longest_batch_s = 0.0
        backlog_s, deleted = timed_pass(retention)
        assert deleted == args.backlog, (deleted, args.backlog)
        longest_ms = retention.longest_batch_s * 1e3
        print(f"a pass with a backlog: {deleted:,} rows deleted in {backlog_s:.2f} s ({deleted / backlog_s:,.0f} a second), "
              f"{retention.batch:,} a transaction, the longest {longest_ms:.0f} ms")
    finally:
        with engine.begin() as conn:
            conn.execute(sa.delete(db.tip_scores))
        engine.dispose()
        tmp.cleanup()
    print(json.dumps({"bench": "retention", "database": engine.dialect.name, "rows": args.rows,
                      "steady_ms": {str(count): ms for count, ms in steady_ms.items()},
                      "steady_ms_at_most_late": steady_ms[lates[-1]], "backlog": args.backlog,
                      "backlog_s": round(backlog_s, 3), "backlog_rows_per_s": round(args.backlog / backlog_s),
                      "longest_batch_ms": round(longest_ms, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
