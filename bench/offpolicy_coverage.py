"""How often the off-policy estimate's 95% interval (models/offpolicy.py) holds the true value.

    python bench/offpolicy_coverage.py                  # 3 pools x 9 logs, 400 replications each (~40 s)
    python bench/offpolicy_coverage.py --seeds 1 --replications 200

Steps:
1. Simulated logs (`tests/unit/test_models_offpolicy.py`, `heavy_tailed_logs`): 500 contexts of
   10 tips, served by softmax (temperature 0.05 and 0.07) or Thompson sampling (concentration
   10), 1,000, 2,000 and 4,000 decisions a log; the target serves its own first choice, whose
   true value the simulation knows. Then epsilon-greedy (0.3, 500 decisions, bounded weights).
2. For each log, whether the card's interval (`ci95`) holds the truth, beside the interval as it
   was (the same spread, the normal's 1.96). Logs with an effective n under 30 get no interval
   and are not counted (`judged`).
3. The time `estimate` takes over 50,000 decisions (a card's log at its largest).
Every figure but the time is the same on any machine for a seed.
Last line: {"bench": "offpolicy_coverage", "normal": [min, max], "ci95": [min, max], ..., "ms_50k": ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.offpolicy import estimate
from tests.unit.test_models_offpolicy import heavy_tailed_logs, logged_decisions, normal_interval, true_value

LOGS = [("softmax", {"temperature": 0.05}), ("softmax", {"temperature": 0.07}), ("thompson", {"noise": 0.15})]


def coverage(logs: list[list], truth: float) -> dict[str, float]:
    judged = covered = normal = 0
    widths, normal_widths, effective = [], [], []
    for log in logs:
        value = estimate(log)
        if value.ci95 is None:
            continue
        judged += 1
        low, high = normal_interval(log, value.snips)
        covered += value.ci95[0] <= truth <= value.ci95[1]
        normal += low <= truth <= high
        widths.append(value.ci95[1] - value.ci95[0])
        normal_widths.append(high - low)
        effective.append(value.effective_n)
    if not judged:
        raise SystemExit("no log had an interval (effective n under 30 in every one): more --replications")
    return {"judged": judged, "effective_n": statistics.median(effective), "normal": normal / judged,
            "ci95": covered / judged, "normal_width": statistics.median(normal_widths), "ci95_width": statistics.median(widths)}


def show(name: str, found: dict[str, float]) -> None:
    print(f"{name:<40} judged {found['judged']:>4}  effective n {found['effective_n']:>5.0f}  "
          f"normal {found['normal']:.3f} (width {found['normal_width']:.3f})  "
          f"ci95 {found['ci95']:.3f} (width {found['ci95_width']:.3f})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="context pools 1, 2, ... (default 3)")
    parser.add_argument("--replications", type=int, default=400, help="logs per setting (default 400)")
    args = parser.parse_args()
    heavy = []
    for seed in range(1, 1 + args.seeds):
        for decisions in (1000, 2000, 4000):
            for policy, settings in LOGS:
                found = coverage(*heavy_tailed_logs(policy, decisions, args.replications, seed=seed, **settings))
                show(f"{policy} {settings} {decisions} pool {seed}", found)
                heavy.append(found)
    choice = {"new": "a", "busy": "b"}
    greedy = coverage([[({choice[kind]: 1.0}, p, served, r) for kind, served, p, r in logged_decisions(500, 0.3, seed)]
                       for seed in range(args.replications)], true_value(choice))
    show("epsilon_greedy 0.3, 500", greedy)
    log = heavy_tailed_logs("softmax", 50_000, 1, temperature=0.07)[0][0]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        estimate(log)
        times.append(time.perf_counter() - start)
    print(f"estimate over 50,000 decisions: {min(times) * 1000:.1f} ms (best of 5)")
    print(json.dumps({"bench": "offpolicy_coverage",
                      "normal": [min(f["normal"] for f in heavy), max(f["normal"] for f in heavy)],
                      "ci95": [min(f["ci95"] for f in heavy), max(f["ci95"] for f in heavy)],
                      "epsilon_greedy": {"normal": greedy["normal"], "ci95": greedy["ci95"]},
                      "ms_50k": round(min(times) * 1000, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
