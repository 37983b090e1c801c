"""The fold alone: microseconds per event, without NATS, validation or checkpoints.

    python bench/fold.py                        # 100k events, best of 5 passes
    python bench/fold.py --events 20000 --repeat 1
    python bench/fold.py --events 20000 --one-instant   # one user's events, all stamped alike

Events come from the simulator (2,000 users), are validated once up front, then folded
into a fresh online store per pass; the best pass is reported (the machine is shared, so
the fastest pass is the least disturbed). For a figure that noise cannot move, count
instructions instead (valgrind is on every machine here; a fixed hash seed, as string hashing
changes dict layouts and so the count):

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/fold.py --events 20000 --repeat 1
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/fold.py --events 20000 --repeat 0

The difference of the two "Collected" totals, divided by 20,000, is the fold's instructions per event.
Last line: {"bench": "fold", "us_per_event": ..., "events": ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from ingest import synthetic

from streams.store import OnlineStore
from streams.wire import decode_wire_event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5, help="passes over the events; the best is reported")
    parser.add_argument("--one-instant", action="store_true",
                        help="every event one user's, at one instant: a publisher stamping a burst alike, each "
                             "insert placed among all the others (20,000 took ~14 s when that was a walk)")
    args = parser.parse_args()

    raw = one_instant(args.events) if args.one_instant else synthetic(args.events, 2_000)
    events = [decode_wire_event(subject, orjson.dumps(event)) for subject, event in raw]
    gc.freeze()  # as the service does after start-up: the events are long-lived here
    best = float("inf")
    for _ in range(args.repeat):
        store = OnlineStore()
        started = time.perf_counter()
        for event in events:
            store.apply(event)
        best = min(best, time.perf_counter() - started)
    if args.repeat:
        print(f"fold: {best / len(events) * 1e6:.2f} us per event (best of {args.repeat} passes over {len(events):,})")
        print(json.dumps({"bench": "fold", "us_per_event": round(best / len(events) * 1e6, 3), "events": len(events)}))


def one_instant(count: int) -> list[tuple[str, dict]]:
    return [("signals.task.created", {"id": f"e{i}", "type": "task.created", "user_id": "u",
                                      "ts": "2026-11-26T08:00:00+01:00", "data": {"task_id": f"t{i}"}})
            for i in range(count)]


if __name__ == "__main__":
    main()
