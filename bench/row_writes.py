"""Checkpoint rows written by a thread while the event loop is busy: executemany vs `db.upsert`.

    python bench/row_writes.py                      # tip_scores, 5,000 rows a batch (a checkpoint's worth), 2 batches
    python bench/row_writes.py --table user_state   # users' states (binary): multi-row VALUES
    python bench/row_writes.py --rows 200 --batches 1

Checkpoints write from a worker thread beside the event loop (`TIPSTREAM_CHECKPOINT_WRITER`
`thread`, the default on two cores). SQLite's driver releases the GIL around each row's step
of an `executemany` and must take it back before the next row; a busy loop gives it up only
at the switch interval (the service's, 0.5 ms), so every row waits for it, and each
hand-over costs both threads CPU. `db.upsert` sends up to 500 rows as one JSON array in one
statement instead: the GIL is released once per statement. A table with binary columns
(`user_state`) gets multi-row VALUES statements, bound in C: once per statement too.

Steps:
1. A SQLite database in a temporary directory, migrated as the service migrates it.
2. A busy thread stands in for the event loop (pure Python, always runnable); `--idle` leaves it out.
3. Write `--batches` batches of `--rows` rows of `--table` each, in their own transactions:
   first with SQLAlchemy's `executemany` (what `db.upsert` did before), then with `db.upsert`.
4. The busy thread notes its longest wait between two steps: how long a write kept the GIL
   from it (the event loop's stall). Encoding a statement's rows holds the GIL throughout, so
   `db.upsert` encodes at most `JSON_ROWS_PER_STATEMENT` (500) at a time.
Goals: `db.upsert` at least 5x faster per row beside the busy thread (measured for
tip_scores: 195-347 us a row against 12-13 us, user states 197.5 against 10.4; alone, 12.5 us
against 10.5), and a longest wait near the switch interval, not the encoding of a whole
checkpoint (0.5-0.8 ms). A small run (`--rows 500 --batches 1`) can show one slow first
transaction: it is the commit's, not the statement's.
Last line: {"bench": "row_writes", "table": ..., "rows": ..., "executemany_us_per_row": ..., "upsert_us_per_row": ...,
"speedup": ..., "executemany_stall_ms": ..., "upsert_stall_ms": ...}

    python bench/row_writes.py --against 0008 --batches 20     # db.upsert at the head schema against 0008's

`--against REVISION`: what a schema change (an index) costs the checkpoint's writes. `db.upsert` alone, its
batches alternating between the head schema and REVISION's (no busy thread; the database migrated down and up between two,
untimed; `--database-url`: PostgreSQL, an empty database of yours), in one table that grows for both alike.
Last line: {"bench": "row_writes", "table": ..., "rows": ..., "against": ..., "head_us_per_row": ...,
"against_us_per_row": ..., "ratio": ...} (medians of the batches; ratio: the median of each pair's, head's time
over REVISION's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app import db, migrate
from app.bootstrap import GIL_SWITCH_INTERVAL_S
from app.decision_ids import served_before_bound
from streams.fold import to_ms


def decision_rows(batch: int, count: int) -> list[dict[str, Any]]:
    created = datetime(2026, 11, 26, 8, tzinfo=UTC)
    served = to_ms(created) + batch * count  # ids as `new_decision_id` makes them, a millisecond apart
    return [{"decision_id": served_before_bound(served + i) + f"{batch:08x}{i:08x}", "user_id": f"u-{i % 2000}", "created_at": created,
             "kind": "scored", "model_version": "v1", "shadow_version": None, "prompt_version": None,
             "policy": "epsilon_greedy", "tip_id": f"tip-focus-{i % 12}", "score": 0.5, "propensity": 0.9,
             "decision": None, "rewards": None, "reward": None, "rewarded_at": None} for i in range(count)]


def state_rows(batch: int, count: int) -> list[dict[str, Any]]:
    state = bytes(range(256)) * 3  # about a user's state after a few days of events
    return [{"user_id": f"u-{batch:04d}-{i:06d}", "state": state, "updated_at": datetime(2026, 11, 26, 8, tzinfo=UTC)}
            for i in range(count)]


TABLES = {"tip_scores": (db.tip_scores, "decision_id", decision_rows), "user_state": (db.user_state, "user_id", state_rows)}


def executemany(conn: Any, table: Any, key: str, rows: list[dict[str, Any]]) -> None:
    statement = sqlite_insert(table)
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name != key}
    conn.execute(statement.on_conflict_do_update(index_elements=[key], set_=updates), rows)


def upsert(conn: Any, table: Any, key: str, rows: list[dict[str, Any]]) -> None:
    db.upsert(conn, table, rows, [key])


def timed(engine: Any, write: Any, table: Any, key: str, batches: list[list[dict[str, Any]]]) -> float:
    """Seconds per row over all batches."""
    started = time.perf_counter()
    for rows in batches:
        with engine.begin() as conn:
            write(conn, table, key, rows)
    return (time.perf_counter() - started) / sum(map(len, batches))


def against(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """`db.upsert`'s batches alternating between the head schema and `args.against`'s, in one database."""
    table, key, make_rows = TABLES[args.table]
    head = migrate.revisions()[-1]
    times: dict[str, list[float]] = {head: [], args.against: []}
    migrate.upgrade(url)
    for b in range(args.batches):
        for revision in (head, args.against) if b % 2 else (args.against, head):  # each goes first half the time
            (migrate.upgrade if revision == head else migrate.downgrade)(url, revision)
            engine = db.make_engine(url)
            timed(engine, upsert, table, key, [make_rows(0, 2)])  # connected, statement prepared
            times[revision].append(timed(engine, upsert, table, key, [make_rows(1 + 2 * b + (revision == head),
                                                                                args.rows)]))
            engine.dispose()
    migrate.upgrade(url)
    engine = db.make_engine(url)
    with engine.begin() as conn:  # an empty database, as it was given
        conn.execute(table.delete())
    engine.dispose()
    new, old = statistics.median(times[head]), statistics.median(times[args.against])
    # Of each pair of batches written one after the other: a busy spell on a shared machine falls on both.
    ratio = statistics.median(a / b for a, b in zip(times[head], times[args.against], strict=True))
    print(f"{args.table}: db.upsert at {head} {new * 1e6:.1f} us a row, at {args.against} {old * 1e6:.1f} "
          f"(medians of {args.batches} batches of {args.rows} rows each); ratio {ratio:.3f} (median of the pairs')")
    return {"bench": "row_writes", "table": args.table, "rows": args.rows * args.batches, "against": args.against,
            "head_us_per_row": round(new * 1e6, 2), "against_us_per_row": round(old * 1e6, 2),
            "ratio": round(ratio, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000, help="rows per batch (default 5000)")
    parser.add_argument("--batches", type=int, default=2, help="batches per way of writing (default 2)")
    parser.add_argument("--table", choices=sorted(TABLES), default="tip_scores", help="what to write (default tip_scores)")
    parser.add_argument("--idle", action="store_true", help="no busy thread: the writes alone")
    parser.add_argument("--against", metavar="REVISION",
                        help="db.upsert alone, alternating between the head schema and this revision's")
    parser.add_argument("--database-url", default=os.environ.get("TIPSTREAM_BENCH_DATABASE_URL"),
                        help="with --against: an empty database of yours (default: SQLite in a temporary directory)")
    args = parser.parse_args()
    if args.against:
        if args.against not in migrate.revisions()[:-1]:
            parser.error(f"--against {args.against}: name a revision before the head, {migrate.revisions()[-1]}")
        with tempfile.TemporaryDirectory(prefix="tipstream-bench-") as data_dir:
            print(json.dumps(against(args, args.database_url or f"sqlite:///{Path(data_dir) / 'rows.db'}")))
        return 0

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    stop = threading.Event()
    stalls: dict[str, float] = {}  # the busy thread's longest wait between two steps, by phase
    phase = "warm-up"

    def busy() -> None:
        spin, last = 0, time.perf_counter()
        while not stop.is_set():
            for i in range(100):
                spin += i
            now = time.perf_counter()
            stalls[phase] = max(stalls.get(phase, 0.0), now - last)
            last = now

    with tempfile.TemporaryDirectory(prefix="tipstream-bench-") as data_dir:
        url = f"sqlite:///{Path(data_dir) / 'rows.db'}"
        migrate.upgrade(url)
        engine = db.make_engine(url)
        table, key, make_rows = TABLES[args.table]
        with engine.begin() as conn:  # compile both statements before timing
            executemany(conn, table, key, make_rows(0, 2))
            upsert(conn, table, key, make_rows(0, 2))
        loop = threading.Thread(target=busy, daemon=True)
        if not args.idle:
            loop.start()
        try:
            many_batches = [make_rows(1 + b, args.rows) for b in range(args.batches)]
            one_batches = [make_rows(1 + args.batches + b, args.rows) for b in range(args.batches)]
            phase = "executemany"
            many_s = timed(engine, executemany, table, key, many_batches)
            phase = "upsert"
            one_s = timed(engine, upsert, table, key, one_batches)
        finally:
            stop.set()
        engine.dispose()
    beside = "alone" if args.idle else "beside a busy thread"
    print(f"{args.table}: {args.rows * args.batches} rows each way, {beside}: executemany {many_s * 1e6:.1f} us a row, "
          f"db.upsert {one_s * 1e6:.1f} us a row ({many_s / one_s:.1f}x)")
    figures = {"bench": "row_writes", "table": args.table, "rows": args.rows * args.batches,
               "executemany_us_per_row": round(many_s * 1e6, 1), "upsert_us_per_row": round(one_s * 1e6, 1),
               "speedup": round(many_s / one_s, 1)}
    if not args.idle:
        many_stall, one_stall = stalls.get("executemany", 0.0) * 1e3, stalls.get("upsert", 0.0) * 1e3
        print(f"the busy thread's longest wait for the GIL: {many_stall:.2f} ms during executemany, "
              f"{one_stall:.2f} ms during db.upsert")
        figures.update(executemany_stall_ms=round(many_stall, 2), upsert_stall_ms=round(one_stall, 2))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
