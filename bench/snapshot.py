"""What the learner's snapshot costs the event loop, and the checkpoint, as rewarded decisions pile up.

    python bench/snapshot.py                                  # 100,000 rewarded decisions over 3 days
    python bench/snapshot.py --credited 20000 --rounds 10     # a quick run

Every few seconds a checkpoint takes the learner's snapshot on the event loop (/score waits
meanwhile) and writes it in its transaction. What it holds for the join window grows with the
traffic: a credit for every rewarded decision of the last `TIPSTREAM_LEARNER_JOIN_WINDOW_S`.
This measures one steady-state snapshot (`--per-round` new rewards in the `--every-s` since the
last one, for decisions made a minute before) with a small history and with a large one. The
learner's clock is simulated: the history is rewarded as it would have been, over the window.

Steps:
1. A learner over a logistic-regression champion in a temporary SQLite registry; `--users`
   users, so that the model's size is the same in both phases.
2. Baseline: reward `--baseline` decisions spread over half the join window, then `--rounds`
   rounds of `--per-round` fresh rewards, each followed by a snapshot (timed: the loop's share)
   and its write (bytes of `learner_state` rows written).
3. The same after rewarding `--credited` decisions in all, over the window's other half.
4. A registration's look for the rewards its new model has not seen (`Learner.unseen_rewards`,
   on the loop too): against a read of the log that holds every credit but the `--per-round`
   given since; the longest stretch it holds the loop between two yields (`unseen_ms`) and all
   of them (`unseen_total_ms`), medians of `--rounds`.
5. The same snapshots again with `--waiting` reactions held for decisions that have not arrived
   (another publisher's, say; `TIPSTREAM_LEARNER_PENDING_MAX` at most, saved with every
   snapshot), arriving steadily over the time they may wait, and one more with each reward of
   the rounds, so that at the bound the oldest expire as new ones come.
Goal: the loop's time and the bytes a snapshot writes do not grow with the rewarded decisions
held (ratio large/small near 1); no turn of the loop over a few ms for a registration's look
(its whole time does grow with them). Last line:
{"bench": "snapshot", "credited": ..., "loop_ms_small": ..., "loop_ms_large": ..., "loop_ratio": ...,
 "bytes_small": ..., "bytes_large": ..., "unseen_ms": ..., "unseen_total_ms": ..., "waiting": ...,
 "loop_ms_waiting": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from app import migrate
from app.db import make_engine
from app.decisions import TipScoresLog
from app.evaluation import TrainedOn
from app.learner import Learner
from app.lineup import Lineup
from app.registry_store import RegistryStore
from app.settings import DEFAULT_REWARDS, Settings
from streams.events import parse_event
from streams.store import OnlineStore

TIPS = [f"tip-{c}-{i}" for c in ("focus", "planning", "breaks", "batching", "review") for i in range(4)]


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


class Rewarder:
    """Serves a decision made a minute before the clock's time and rewards one of its tips at that
    time, through the learner's sinks."""

    def __init__(self, learner: Learner, users: int, clock: Clock) -> None:
        self.learner, self.users, self.clock, self.n = learner, users, clock, 0
        self.sink = learner.feedback_sink()

    def reward(self) -> None:
        made_ms = self.clock.ms - 60_000
        self.n += 1
        n, user = self.n, f"u-{self.n % self.users}"
        # The service's own id layout (`decisions.new_decision_id`): creation time, then unique bits.
        decision_id = f"d-{made_ms:012x}{n:016x}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(made_ms / 1000))
        tips = TIPS[n % 10: n % 10 + 10]
        decision = {"id": decision_id, "type": "decision.scored", "ts": ts, "user_id": user, "model_version": "v1",
                    "policy": "greedy", "features": {"hour_of_day": n % 24, "tasks_created_7d": n % 7},
                    "ranked": [{"tip_id": t, "category": t.split("-")[1], "score": 0.5, "propensity": 0.1}
                               for t in tips]}
        payload = orjson.dumps(decision)
        self.learner.served(decision_id, payload, decision)
        self.learner.published(decision_id, payload)
        event = {"id": f"f-{n}", "type": "tip.reacted", "user_id": user, "ts": ts,
                 "data": {"tip_id": tips[n % 3], "decision_id": decision_id, "reaction": "liked"}}
        self.sink(parse_event(orjson.dumps(event)))


class Waiter:
    """Feedback naming a decision that never comes (another publisher's, say): it waits."""

    def __init__(self, learner: Learner, users: int, clock: Clock) -> None:
        self.learner, self.users, self.clock, self.n = learner, users, clock, 0

    def wait(self) -> None:
        self.n += 1
        self.learner.on_feedback(parse_event(orjson.dumps({
            "id": f"w-{self.n}", "type": "tip.reacted", "user_id": f"u-{self.n % self.users}",
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.clock.ms / 1000)),
            "data": {"tip_id": TIPS[0], "decision_id": f"elsewhere-{self.n}", "reaction": "liked"}})))


class WaitingToo:
    """A rewarder that also brings a waiting reaction with each reward."""

    def __init__(self, rewarder: Rewarder, waiter: Waiter) -> None:
        self.rewarder, self.waiter, self.clock = rewarder, waiter, rewarder.clock

    def reward(self) -> None:
        self.rewarder.reward()
        self.waiter.wait()


def in_turns(coroutine: Any) -> tuple[Any, list[float]]:
    """Run a coroutine that only yields to the loop (`asyncio.sleep(0)`): its result, and how long
    each stretch between two yields held the loop (s)."""
    turns = []
    while True:
        started = time.perf_counter()
        try:
            coroutine.send(None)
        except StopIteration as done:
            turns.append(time.perf_counter() - started)
            return done.value, turns
        turns.append(time.perf_counter() - started)


def snapshot_round(learner: Learner, rewarder: Rewarder | WaitingToo, engine: Any, per_round: int,
                   every_ms: int) -> tuple[float, int]:
    for _ in range(per_round):
        rewarder.clock.ms += every_ms // per_round
        rewarder.reward()
    started = time.perf_counter()
    snapshot = learner.snapshot(force=True)
    loop_s = time.perf_counter() - started
    assert snapshot is not None
    with engine.begin() as conn:
        learner.write(conn, snapshot)
    learner.saved(snapshot)
    written = len(snapshot["state"]) + len(snapshot["prior"]) + sum(
        len(data) for data in (snapshot.get("credits") or {}).values() if data is not None)
    return loop_s * 1000, written


def phase(learner: Learner, rewarder: Rewarder | WaitingToo, engine: Any, rounds: int, per_round: int,
          every_ms: int) -> tuple[float, int]:
    measured = [snapshot_round(learner, rewarder, engine, per_round, every_ms) for _ in range(rounds)]
    return statistics.median(ms for ms, _ in measured), int(statistics.median(size for _, size in measured))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--credited", type=int, default=100_000, help="rewarded decisions held in the large phase")
    parser.add_argument("--baseline", type=int, default=1_000, help="rewarded decisions held in the small phase")
    parser.add_argument("--rounds", type=int, default=20, help="snapshots timed in each phase (the median counts)")
    parser.add_argument("--per-round", type=int, default=100, help="new rewards between two snapshots")
    parser.add_argument("--every-s", type=float, default=5.0, help="simulated time between two snapshots")
    parser.add_argument("--waiting", type=int, default=defaults.learner_pending_max,
                        help="reactions waiting for their decision in the last phase (default: the bound)")
    parser.add_argument("--users", type=int, default=300, help="users the decisions are for")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tipstream-bench-") as tmp:
        url = f"sqlite:///{tmp}/snapshot.db"
        migrate.upgrade(url)
        engine = make_engine(url)
        lineup = Lineup(RegistryStore(engine), engine, eval_max_rewards=100)
        lineup.load("logreg", None)
        window_s = defaults.learner_join_window_s
        every_ms = int(args.every_s * 1000)
        # Each phase's history is spread over most of the window, ending where the phase's rounds begin.
        spread_ms = int(window_s * 1000) // 2
        clock = Clock(int(time.time() * 1000) - 2 * spread_ms)
        learner = Learner(lineup, OnlineStore(), TipScoresLog(), rewards=DEFAULT_REWARDS, cache_mb=4096,
                          window_s=window_s, pending_max=max(args.waiting, 1), pending_max_age_s=defaults.learner_pending_max_age_s,
                          snapshot_every_s=0,
                          clock=clock)
        rewarder = Rewarder(learner, args.users, clock)

        def fill(count: int) -> None:
            started = time.perf_counter()
            for _ in range(count):
                clock.ms += spread_ms // max(count, 1)
                rewarder.reward()
            print(f"rewarded {count} decisions over {spread_ms / 3_600_000:.0f} h in {time.perf_counter() - started:.1f}s",
                  flush=True)

        fill(args.baseline)
        small_ms, small_bytes = phase(learner, rewarder, engine, args.rounds, args.per_round, every_ms)
        print(f"{learner.credited} rewarded: snapshot {small_ms:.2f} ms of the loop, {small_bytes} bytes written")
        fill(args.credited - learner.credited)
        large_ms, large_bytes = phase(learner, rewarder, engine, args.rounds, args.per_round, every_ms)
        print(f"{learner.credited} rewarded: snapshot {large_ms:.2f} ms of the loop, {large_bytes} bytes written")
        credited = learner.credited
        read = TrainedOn(frozenset((d, t) for d, entry in learner.joins.credited.items() for t in entry.credits), None)
        for _ in range(args.per_round):
            rewarder.reward()
        longest, total = [], []
        for _ in range(args.rounds):
            unseen, turns = in_turns(learner.unseen_rewards(read))
            longest.append(max(turns))
            total.append(sum(turns))
        assert len(unseen) == args.per_round, len(unseen)
        unseen_ms, unseen_total_ms = statistics.median(longest) * 1000, statistics.median(total) * 1000
        print(f"{learner.credited} rewarded, {len(unseen)} of them unseen by a new model: found in "
              f"{unseen_total_ms:.2f} ms, {len(turns)} turns of the loop, the longest {unseen_ms:.2f} ms")
        # Reactions naming decisions that never come, arriving steadily over the time they may wait
        # (`TIPSTREAM_LEARNER_PENDING_MAX_AGE_S`), as many as the bound, and more in each round:
        # the oldest expire as new ones come.
        waiter = Waiter(learner, args.users, clock)
        spacing_ms = int(defaults.learner_pending_max_age_s * 1000) // max(args.waiting, 1)
        for _ in range(args.waiting):
            clock.ms += spacing_ms
            waiter.wait()
        waiting_rewarder = WaitingToo(rewarder, waiter)
        waiting_ms, _ = phase(learner, waiting_rewarder, engine, args.rounds, args.per_round, every_ms)
        print(f"{len(learner.waiting)} waiting: snapshot {waiting_ms:.2f} ms of the loop")
        engine.dispose()
    print(json.dumps({"bench": "snapshot", "credited": credited, "loop_ms_small": round(small_ms, 2),
                      "loop_ms_large": round(large_ms, 2), "loop_ratio": round(large_ms / small_ms, 2),
                      "bytes_small": small_bytes, "bytes_large": large_bytes, "unseen_ms": round(unseen_ms, 2),
                      "unseen_total_ms": round(unseen_total_ms, 2),
                      "waiting": args.waiting,
                      "loop_ms_waiting": round(waiting_ms, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
