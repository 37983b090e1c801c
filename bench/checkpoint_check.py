"""What the check of a checkpoint's positions costs: checkpoint transactions with and without it.

    python bench/checkpoint_check.py                               # SQLite in a temporary directory
    python bench/checkpoint_check.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
    python bench/checkpoint_check.py --users 1 --rounds 50         # a checkpoint of one user

Each checkpoint's transaction first reads the stream positions the database holds and compares them
with those the service committed last (`checkpoint_rows.check_positions`): a database that lost
commits under the service (a failover, a restore) must not get newer positions over the hole.

Steps:
1. The database migrated as the service migrates it (give PostgreSQL an empty database of your own:
   the bench writes `user_state` and `stream_positions` rows there).
2. `--rounds` rounds; each writes two checkpoints of `--users` users' states (`--state-bytes` each,
   over a pool of 5,000 users, so most are updates, as live) and three streams' positions: one as
   before (no check), one checked. Which goes first is drawn at random (seeded): alternated, SQLite's
   WAL checkpoint (every 1,000 pages, about every fourth commit of 500 users) fell on the same one
   every time, and doubled its median.
3. Each checkpoint is timed from `BEGIN` to the commit's return; the checked one also times its
   check alone.
Goal: the check adds well under 1 ms to a checkpoint (three rows read by primary key).
Last line: {"bench": "checkpoint_check", "database": ..., "users": ..., "plain_ms_p50": ..., "checked_ms_p50": ...,
"plain_ms_p90": ..., "checked_ms_p90": ..., "check_alone_ms_p50": ..., "check_alone_ms_p90": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import migrate
from app.checkpoint_rows import check_positions, write_checkpoint
from app.db import make_engine

POOL = 5_000


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("TIPSTREAM_BENCH_DATABASE_URL"))
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--state-bytes", type=int, default=1_500)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="tipstream-bench-")
    url = args.database_url or f"sqlite:///{Path(tmp.name) / 'tipstream.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    blob = os.urandom(args.state_bytes)
    plain: list[float] = []
    checked: list[float] = []
    alone: list[float] = []
    committed: dict[str, int] = {}
    order = random.Random(7)
    for _ in range(args.rounds):
        for checking in ((False, True) if order.random() < 0.5 else (True, False)):
            seq = len(plain) + len(checked) + 1
            positions = {"SIGNALS": seq * 100, "FEEDBACK": seq * 10, "DECISIONS": seq * 3}
            first = (seq * args.users) % POOL
            states = [(f"u-{(first + i) % POOL}", blob) for i in range(args.users)]
            started = time.perf_counter()
            with engine.begin() as conn:
                if checking and committed:
                    check_positions(conn, committed)
                    alone.append(time.perf_counter() - started)
                write_checkpoint(conn, positions, states)
            (checked if checking else plain).append(time.perf_counter() - started)
            committed = positions
    engine.dispose()
    figures = {"bench": "checkpoint_check", "database": engine.dialect.name, "users": args.users,
               "plain_ms_p50": statistics.median(plain) * 1e3, "checked_ms_p50": statistics.median(checked) * 1e3,
               "plain_ms_p90": quantile(plain, 0.9) * 1e3, "checked_ms_p90": quantile(checked, 0.9) * 1e3,
               "check_alone_ms_p50": statistics.median(alone) * 1e3, "check_alone_ms_p90": quantile(alone, 0.9) * 1e3}
    print(f"{engine.dialect.name}, {args.rounds} rounds, {args.users} users a checkpoint: "
          f"p50 {figures['plain_ms_p50']:.2f} ms as before, {figures['checked_ms_p50']:.2f} ms checked; "
          f"the check alone p50 {figures['check_alone_ms_p50']:.3f} ms, p90 {figures['check_alone_ms_p90']:.3f} ms")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
