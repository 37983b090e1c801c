"""What /score's metric updates cost: prometheus_client's own metrics against `app.loop_metrics`.

    python bench/metrics_cost.py                   # 200,000 rounds, best of 3
    python bench/metrics_cost.py --rounds 20000 --repeat 1

One round is what a /score makes: two counter increments (the feature cache's, the status')
and one latency observation. Timed for prometheus_client's Counter and Histogram, for the
loop metrics, and for an empty round (the loop itself), each on its own registry. For counts
that the machine's noise cannot move, count instructions, with and without the rounds:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/metrics_cost.py --only prometheus --rounds 20000 --repeat 1
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/metrics_cost.py --only prometheus --rounds 0 --repeat 1

The difference of the two "Collected" totals, divided by the rounds, is the instructions per
round (2026-11-27: 18,530 with `--only prometheus`, 4,073 with `--only loop`, the loop's own
call included).
Last line: {"bench": "metrics_cost", "prometheus_us": ..., "loop_us": ..., "empty_us": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, Counter, Histogram

from app.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)  # as tipstream_score_seconds
LATENCY_S = 0.0004  # a /score's own work on a slow day: the third bucket


def one_round(kind: str) -> Callable[[], None]:
    registry = CollectorRegistry()
    if kind == "empty":
        return lambda: None
    if kind == "prometheus":
        counter = Counter("bench_requests_total", "Requests.", ["status"], registry=registry).labels("200")
        histogram = Histogram("bench_seconds", "Time.", buckets=BUCKETS, registry=registry)
    else:
        counter = LoopCounter("bench_requests_total", "Requests.", ["status"], registry=registry).labels("200")
        histogram = LoopHistogram("bench_seconds", "Time.", buckets=BUCKETS, registry=registry)
    inc, observe = counter.inc, histogram.observe

    def update() -> None:
        inc()
        inc()
        observe(LATENCY_S)

    return update


def best_us(update: Callable[[], None], rounds: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(rounds):
            update()
        best = min(best, (time.perf_counter() - started) / max(rounds, 1) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200_000, help="rounds per pass (default 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is reported (default 3)")
    parser.add_argument("--only", choices=("prometheus", "loop", "empty"), help="time one kind (for callgrind)")
    args = parser.parse_args()

    kinds = [args.only] if args.only else ["prometheus", "loop", "empty"]
    figures = {kind: best_us(one_round(kind), args.rounds, max(args.repeat, 1)) for kind in kinds}
    for kind, us in figures.items():
        print(f"{kind:>10}: {us:.3f} us a round")
    if args.only:
        return
    ratio = (figures["loop"] - figures["empty"]) / (figures["prometheus"] - figures["empty"])
    print(f"loop metrics cost {ratio:.2f} x prometheus_client's, the loop itself set aside")
    print(json.dumps({"bench": "metrics_cost", "prometheus_us": round(figures["prometheus"], 3),
                      "loop_us": round(figures["loop"], 3), "empty_us": round(figures["empty"], 3),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
