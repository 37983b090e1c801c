"""What each user who reacts adds to a model, and to the snapshot's copy on the event loop.

    python bench/model_size.py                          # 20,000 users, 20 reactions each, logreg
    python bench/model_size.py --kind fm --users 5000   # a factorisation machine
    python bench/model_size.py --users 2000 --reactions 5
    python bench/model_size.py --days 365 --ttl-days 90    # users who come and go over a year

The fold's state per user is bounded by its windows (`bench/memory.py`); a model's grows with
each user who reacts (`user_id`, and its cross with `category`: see `TipModel`'s inputs) until the
user has not reacted for `user_ttl_days` (`models.user_expiry`). This sizes that growth, and
what forgetting keeps of it when users come and go.

Steps:
1. A model of `--kind` learns `--reactions` rewards for each of 1,000 warm-up users, so that
   the weights every user shares (tips, categories, hours) exist before measuring.
2. With tracemalloc on, it learns the same for `--users` more: the memory they add, per user.
3. With tracemalloc off (it slows allocation several times), the model learns them again from
   scratch, and `TipModel.frozen` (what a checkpoint takes on the event loop) is timed, best of
   `--repeat`. Each user reacts on one day of `--days` (user k on day k * days / users, in the
   log's time), so with `--ttl-days` the model forgets those gone longer.
4. The share of the weights a model that keeps every user (`user_ttl_days` 0) would hold that
   this one holds (`weights_kept`), and the users it holds.
Last line: {"bench": "model_size", "kind": ..., "users": ..., "bytes_per_user": ..., "frozen_ms": ...,
"users_held": ..., "weights_kept": ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.reward import TipModel

CATEGORIES = [f"cat-{i}" for i in range(8)]
WARM_UP_USERS = 1_000
T0_MS = 1_790_000_000_000
DAY_MS = 86_400_000


def learn_users(model: TipModel, first: int, count: int, reactions: int, rng: random.Random,
                ms_per_user: float = 0.0) -> None:
    for user in range(first, first + count):
        at_ms = T0_MS + round(user * ms_per_user)
        for _ in range(reactions):
            category = rng.choice(CATEGORIES)
            x = {"user_id": f"u-{user}", "tip_id": f"{category}-{rng.randrange(5)}", "category": category,
                 "hour_of_day": rng.randrange(24), "preferred_hour": rng.randrange(24),
                 "tasks_created_7d": rng.randrange(20), "completion_rate_7d": rng.random()}
            model.learn_one(x, float(rng.random() < 0.4), at_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000, help="users measured (default 20,000)")
    parser.add_argument("--reactions", type=int, default=20, help="rewards learned per user (default 20)")
    parser.add_argument("--kind", choices=("logreg", "fm"), default="logreg")
    parser.add_argument("--repeat", type=int, default=3, help="timings of the copy; the best is reported")
    parser.add_argument("--days", type=float, default=0.0,
                        help="the log time the users' reactions span, a day each (default 0: all at once)")
    parser.add_argument("--ttl-days", type=float, default=90.0,
                        help="the model's user_ttl_days (default 90, the default's; 0 keeps every user)")
    args = parser.parse_args()

    model = TipModel(kind=args.kind, user_ttl_days=args.ttl_days)
    learn_users(model, 0, WARM_UP_USERS, args.reactions, random.Random(0))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    learn_users(model, WARM_UP_USERS, args.users, args.reactions, random.Random(1))
    gc.collect()
    bytes_per_user = (tracemalloc.get_traced_memory()[0] - before) / args.users
    tracemalloc.stop()

    total = WARM_UP_USERS + args.users
    spread = args.days * DAY_MS / total
    model = TipModel(kind=args.kind, user_ttl_days=args.ttl_days)
    learn_users(model, 0, total, args.reactions, random.Random(0), spread)
    keeper = TipModel(kind=args.kind, user_ttl_days=0)
    learn_users(keeper, 0, total, args.reactions, random.Random(0), spread)
    weights_kept = sum(map(len, model._tables())) / sum(map(len, keeper._tables()))
    users_held = model.users_held if model.users_held is not None else total
    timings = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        model.frozen()
        timings.append(time.perf_counter() - started)
    frozen_ms = min(timings) * 1000
    print(f"{args.kind}: {bytes_per_user:,.0f} bytes per user who reacted ({args.reactions} rewards each); "
          f"the snapshot's copy of a model that holds {users_held:,} of {total:,} users: {frozen_ms:.1f} ms on the loop "
          f"({weights_kept:.0%} of the weights a model that keeps every user holds)")
    print(json.dumps({"bench": "model_size", "kind": args.kind, "users": args.users,
                      "bytes_per_user": round(bytes_per_user), "frozen_ms": round(frozen_ms, 1),
                      "users_held": users_held, "weights_kept": round(weights_kept, 3)}))


if __name__ == "__main__":
    main()
