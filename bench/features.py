"""A profile cache miss of /score: evaluating every profile feature of one user, in-process.

    python bench/features.py                    # 200 users with 2 days of history, best of 3
    python bench/features.py --days 30          # a month of history (~6,000 events a user)
    python bench/features.py --users 50 --repeat 1

/score reuses a user's feature snapshot while it stays exact (`features.Snapshot`); the
service bench reuses 93-96% of them, but real traffic, with a user scored a few times a day,
misses nearly every time, and each miss pays for `features.snapshot`. This times it whole and
by part: setting up the per-kind views, each feature, and the snapshot's validity horizon.

Steps:
1. Fold `--days` of simulated history for `--users` users into an online store.
2. Time `snapshot` for every user at a `now` just past the newest event, `--repeat` passes;
   the best pass is reported (the machine is shared).
3. Time the parts the same way, each on fresh evaluations, so none reuses another's work
   (in a snapshot, `open_tasks` and `overdue_tasks` share one pass over the tasks).
Last line: {"bench": "features", "days": ..., "events_per_user": ..., "snapshot_us": ..., "setup_us": ..., "valid_until_us": ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from streams import features
from streams.events import parse_event
from streams.simulator import Population
from streams.store import OnlineStore

START_MS = 1_795_000_000_000


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def best_us(users: int, repeat: int, one_pass: Callable[[], float]) -> float:
    """The best pass's microseconds per user; `one_pass` returns the seconds it timed."""
    return min(one_pass() for _ in range(repeat)) / users * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200, help="users with history (default 200)")
    parser.add_argument("--days", type=int, default=2, help="days of history per user (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is reported (default 3)")
    args = parser.parse_args()

    store = OnlineStore()
    for _, event in Population(users=args.users, seed=1).history(days=args.days, start_ms=START_MS):
        store.apply(parse_event(orjson.dumps(event)))
    users = list(store.users.values())
    now = max(state.newest_ms for state in users) + 1_000
    sizes = sorted(sum(map(len, state.logs)) for state in users)
    median = sizes[len(sizes) // 2]
    n, repeat = len(users), max(args.repeat, 1)

    def fresh() -> list[features._Evaluation]:
        return [features._Evaluation(state, now) for state in users]

    def feature_pass(name: str) -> float:
        evaluations = fresh()  # each part on fresh evaluations: none reuses another's work
        return timed(lambda: [evaluation.value(name) for evaluation in evaluations])

    def horizon_pass() -> float:
        evaluations = fresh()
        for evaluation in evaluations:
            evaluation._open_tasks()  # `snapshot` has computed them for the features by then
        return timed(lambda: [features._valid_until(evaluation) for evaluation in evaluations])

    snapshot_us = best_us(n, repeat, lambda: timed(lambda: [features.snapshot(state, now) for state in users]))
    setup_us = best_us(n, repeat, lambda: timed(fresh))
    parts = {f.name: best_us(n, repeat, lambda name=f.name: feature_pass(name)) for f in features.FEATURES}
    valid_until_us = best_us(n, repeat, horizon_pass)

    print(f"{n} users, {args.days} days of history, {median} events a user (median)")
    print(f"snapshot (a profile cache miss): {snapshot_us:.1f} us")
    print(f"  per-kind views (setup): {setup_us:.1f} us")
    for name, us in parts.items():
        print(f"  {name:<28} {us:.1f} us")
    print(f"  validity horizon: {valid_until_us:.1f} us")
    print(json.dumps({"bench": "features", "days": args.days, "events_per_user": median,
                      "snapshot_us": round(snapshot_us, 1), "setup_us": round(setup_us, 1),
                      "valid_until_us": round(valid_until_us, 1)}))


if __name__ == "__main__":
    main()
