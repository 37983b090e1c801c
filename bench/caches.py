"""The two bounded caches on /score's path, once full: does evicting the oldest stay O(1)?

    python bench/caches.py                                  # the service's default sizes
    python bench/caches.py --decisions 60000 --users 30000  # a quick run

A plain dict used as a FIFO is not: deleting from the front leaves dead slots that every
`next(iter(d))` walks again, until the dict happens to resize. With the join cache's default
256 MB (~115k decisions of 2 KB) that cost 269 us per decision served, against 2.6 us before
the cache was full; nothing short of a long run at full budget showed it.

Steps:
1. Join cache (`Learner.served`, the default `TIPSTREAM_LEARNER_JOIN_CACHE_MB`): serve
   `--decisions` decisions of `--payload-bytes`; time the first half of the budget (nothing
   evicted: the baseline) and `--decisions` more once the budget is reached (one eviction each).
2. Feature cache (`Scorer`, `--users` users with one event each; it holds half of them, or
   `TIPSTREAM_FEATURE_CACHE_USERS` if that is fewer): profile lookups that all miss, timed
   while the cache fills (the baseline) and once it is full (each miss evicts the oldest).
Goal: each ratio (full / filling) < 2: eviction in constant time. Plain dicts measured 30
(join cache) and 1.6 (feature cache, where the evaluation of the profile dominates).
Last line: {"bench": "caches", "join_us_filling": ..., "join_us_full": ..., "join_ratio": ...,
"features_us_filling": ..., "features_us_full": ..., "features_ratio": ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.decision_ids import new_decision_id
from app.join_cache import ENTRY_OVERHEAD
from app.learner import Learner
from app.scoring import Scorer
from app.settings import Settings
from models.policy import make_policy
from streams.events import parse_event
from streams.store import OnlineStore


def join_cache(decisions: int, payload_bytes: int, cache_mb: float) -> tuple[float, float]:
    learner = Learner(None, OnlineStore(), None, rewards={}, cache_mb=cache_mb,  # type: ignore[arg-type]
                      window_s=86_400, pending_max=1, pending_max_age_s=1, snapshot_every_s=1)
    payload = b"x" * payload_bytes
    fits = int(cache_mb * 1024 * 1024) // (payload_bytes + ENTRY_OVERHEAD)
    ids = [new_decision_id() for _ in range(fits + decisions)]
    half = fits // 2
    started = time.perf_counter()
    for decision_id in ids[:half]:
        learner.served(decision_id, payload, {})
    filling = (time.perf_counter() - started) / half
    for decision_id in ids[half:fits]:
        learner.served(decision_id, payload, {})
    started = time.perf_counter()
    for decision_id in ids[fits:]:
        learner.served(decision_id, payload, {})
    full = (time.perf_counter() - started) / decisions
    assert len(learner.joins.cache) < fits + decisions, "the join cache did not evict"
    return filling * 1e6, full * 1e6


def feature_cache(users: int, capacity: int) -> tuple[float, float]:
    store = OnlineStore()
    for n in range(users):
        store.apply(parse_event(json.dumps({
            "id": f"e-{n}", "type": "task.completed", "user_id": f"u-{n}",
            "ts": "2026-11-26T09:00:00+00:00", "data": {"task_id": f"t-{n}"}}).encode()))
    scorer = Scorer(store, None, make_policy("greedy"), random.Random(0),  # type: ignore[arg-type]
                    feature_cache_users=capacity)
    now_ms = 1_795_705_200_000  # 2026-11-26T12:00Z, three hours after every user's event
    order = [f"u-{n}" for n in range(users)]
    gc.collect()
    gc.freeze()

    def lookups(ids: list[str]) -> float:
        started = time.perf_counter()
        for user_id in ids:
            scorer._profile(user_id, store.users[user_id], now_ms)
        return (time.perf_counter() - started) / len(ids) * 1e6

    filling = lookups(order[:capacity])
    full = lookups(order[capacity:])  # every one misses and evicts the oldest
    assert len(scorer._cache) == capacity
    return filling, full


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--decisions", type=int, default=200_000, help="decisions served once the join cache is full")
    parser.add_argument("--payload-bytes", type=int, default=2_000, help="size of a decision event (default 2000)")
    parser.add_argument("--cache-mb", type=float, default=defaults.learner_join_cache_mb,
                        help="join cache budget (default: the service's)")
    parser.add_argument("--users", type=int, default=2 * defaults.feature_cache_users,
                        help="users looked up once each; the feature cache holds half of them (default 400000)")
    args = parser.parse_args()

    join_filling, join_full = join_cache(args.decisions, args.payload_bytes, args.cache_mb)
    print(f"join cache: {join_filling:.2f} us per decision served while filling, {join_full:.2f} us once full")
    capacity = min(args.users // 2, defaults.feature_cache_users)
    features_filling, features_full = feature_cache(args.users, capacity)
    print(f"feature cache ({capacity} users): {features_filling:.2f} us per missed lookup while filling, "
          f"{features_full:.2f} us once full")
    print(json.dumps({"bench": "caches", "join_us_filling": round(join_filling, 2), "join_us_full": round(join_full, 2),
                      "join_ratio": round(join_full / join_filling, 2),
                      "features_us_filling": round(features_filling, 2), "features_us_full": round(features_full, 2),
                      "features_ratio": round(features_full / features_filling, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
