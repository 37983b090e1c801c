"""How fast the service learns each user's taste, on the simulator: reward earned per round.

    python bench/quality.py                                  # the defaults, 200 users, 30 rounds, 3 seeds
    python bench/quality.py --set model_optimizer=sgd --set model_learning_rate=0.1
    python bench/quality.py --users 50 --rounds 60 --seeds 1  # the unit test's size
    python bench/quality.py --rounds 60 --drift-at 30         # tastes change halfway: how fast it adapts
    python bench/quality.py --rounds 60 --drift-at 30 --set model_user_forgetting=0  # as before forgetting
    python bench/quality.py --clicks-only                    # the app publishes acted and liked only
    python bench/quality.py --clicks-only --set silence_reward=0  # ... and silence is learned as 0

Steps:
1. Simulated users with hidden tastes (two liked tip categories of five) are each scored on
   10 of the 20 tips once a round, through the service's own scorer, policy, learner and
   registry (`tests/unit/test_scoring_quality.py`, `simulate_in_process`), in-process.
2. Each user reacts to the tip ranked first; the reaction goes back through the feedback sink.
3. Report the mean reward in each sixth of the run beside a random pick's among the same
   candidates; the ceiling is ~0.67 with the default 10% exploration (a liked tip every time
   but when exploring).
Speed is not measured here: every figure is a reward, the same on any machine for a seed.
Last line: {"bench": "quality", "reward_by_sixth": [...], "random": ..., "final_gain": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.settings import Settings
from tests.unit.test_scoring_quality import simulate_in_process


def sixths(values: list[float]) -> list[float]:
    k = max(len(values) // 6, 1)
    return [statistics.mean(values[i * k:(i + 1) * k]) for i in range(6)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200, help="simulated users (default 200)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds: one /score and one reaction per user (default 30)")
    parser.add_argument("--seeds", type=int, default=3, help="runs with populations 11, 12, ... (default 3)")
    parser.add_argument("--drift-at", type=int, default=None, metavar="ROUND",
                        help="from this round on, every user likes two of the categories they disliked")
    parser.add_argument("--clicks-only", action="store_true",
                        help="publish only acted and liked reactions (users ignore the tips they do not like)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a service setting, e.g. model_optimizer=sgd or policy=thompson (repeatable)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    by_sixth, randoms = [], []
    for seed in range(11, 11 + args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(data_dir=Path(tmp), **overrides)
            earned, baseline, _ = simulate_in_process(Path(tmp), settings, args.users, args.rounds, seed, args.drift_at,
                                                    args.clicks_only)
        by_sixth.append(sixths(earned))
        randoms.append(statistics.mean(baseline))
        print(f"population {seed}: reward by sixth of the run " + " ".join(f"{r:.3f}" for r in by_sixth[-1])
              + f"; a random pick {randoms[-1]:.3f}", flush=True)
    mean_sixths = [round(statistics.mean(run[i] for run in by_sixth), 3) for i in range(6)]
    random_pick = round(statistics.mean(randoms), 3)
    print(f"mean over {args.seeds} populations: " + " ".join(f"{r:.3f}" for r in mean_sixths)
          + f"; a random pick {random_pick:.3f}")
    print(json.dumps({"bench": "quality", "reward_by_sixth": mean_sixths, "random": random_pick,
                      "final_gain": round(mean_sixths[-1] - random_pick, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
