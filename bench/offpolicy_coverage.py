"""How often the off-policy estimate's 95% interval (models/offpolicy.py) holds the true value.

    python bench/offpolicy_coverage.py                  # 3 pools x 9 logs, 400 replications each (~40 s);
                                                        # then 2 x 8 logs served through Scorer (~20 s)
    python bench/offpolicy_coverage.py --seeds 1 --replications 200 --score-runs 2

Steps:
1. Simulated logs (`tests/unit/test_models_offpolicy.py`, `heavy_tailed_logs`): 500 contexts of
   10 tips, served by softmax (temperature 0.05 and 0.07) or Thompson sampling (concentration
   10), 1,000, 2,000 and 4,000 decisions a log; the target serves its own first choice, whose
   true value the simulation knows. Then epsilon-greedy (0.3, 500 decisions, bounded weights).
2. For each log, whether the card's interval (`ci95`) holds the truth, beside the interval as it
   was (the same spread, the normal's 1.96). Logs with an effective n under 30 get no interval
   and are not counted (`judged`).
3. The time `estimate` takes over 50,000 decisions (a card's log at its largest).
4. Through `Scorer`, as /score serves (`--score-runs` runs of `--score-decisions`): 40 users who
   each like one of 3 categories, 6 tips, 4 candidates a request, every decision rewarded
   (P(acted) 0.1-0.3, +0.5 in the liked category), learned by the champion (defaults), a shadow
   (SGD at 0.1) and the prior; then `policy_value` of each, against what their choices would
   have earned. Under epsilon-greedy (0.2) and under Thompson sampling, which /score draws from
   the prior's posteriors: there a shadow's choices that the prior and the champion disfavour
   are served at propensities near 0, and its estimate leans towards the champion's.
Every figure but the time is the same on any machine for a seed.
Last line: {"bench": "offpolicy_coverage", "normal": [min, max], "ci95": [min, max], ..., "ms_50k": ...}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import migrate
from app.db import make_engine
from app.decisions import learning_input
from app.evaluation import policy_value
from app.lineup import Lineup
from app.registry_store import RegistryStore
from app.score_request import parse_request
from app.scoring import Scorer
from models.offpolicy import estimate
from models.policy import make_policy
from models.reward import TipModel
from streams.events import parse_event
from streams.store import OnlineStore
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


def through_score(policy: str, params: dict[str, float], decisions: int, seed: int, folder: str) -> dict[str, float]:
    """Step 4: one log served by `Scorer`; each version's estimate beside what its choices would have earned."""
    url = f"sqlite:///{folder}/run-{policy}-{seed}.db"
    migrate.upgrade(url)
    engine = make_engine(url)
    lineup = Lineup(RegistryStore(engine), engine, eval_max_rewards=10)
    lineup.load("logreg")
    lineup.shadow, lineup.shadow_version = TipModel(optimizer="sgd", learning_rate=0.1), "v2"
    rng, store = random.Random(seed), OnlineStore()
    scorer = Scorer(store, lineup, make_policy(policy, **params), random.Random(seed + 1), feature_cache_users=0)
    categories = ["focus", "breaks", "planning"]
    tips = {f"t{i}": categories[i % 3] for i in range(6)}
    users = {f"u{i}": rng.choice(categories) for i in range(40)}
    base = {tip: rng.uniform(0.1, 0.3) for tip in tips}

    def chance(user: str, tip: str) -> float:
        return base[tip] + (0.5 if tips[tip] == users[user] else 0.0)

    logged, greedy_truth, shadow_truth = [], [], []
    for k in range(decisions):
        user, now = rng.choice(sorted(users)), datetime.fromtimestamp(1_795_694_400 + 60 * k, UTC).isoformat()
        body = {"user_id": user, "candidates": [{"tip_id": t, "category": tips[t]} for t in rng.sample(sorted(tips), 4)],
                "context": {"now": now.replace("+00:00", "+01:00")}}
        decision = orjson.loads(scorer.score(parse_request(orjson.dumps(body))).payload)
        served = decision["ranked"][0]
        reward = 1.0 if rng.random() < chance(user, served["tip_id"]) else 0.0
        x = learning_input(decision["features"], served)
        for model in (lineup.champion, lineup.shadow):
            model.learn_one(x, reward)
        lineup.prior.update(served["tip_id"], reward)
        store.apply(parse_event(orjson.dumps({"id": f"e-{k}", "type": "tip.reacted", "user_id": user,
                                              "ts": body["context"]["now"], "data": {
                                                  "tip_id": served["tip_id"], "reaction": "acted" if reward else "dismissed"}})))
        logged.append((decision, {served["tip_id"]: reward}))
        greedy_truth.append(chance(user, decision["greedy"]))
        shadow_truth.append(chance(user, decision["shadow"]["first"]))
    engine.dispose()
    found = {}
    for name, value, truth in (("champion", policy_value(logged, "v1")["as_champion"]["greedy"], greedy_truth),
                               ("shadow", policy_value(logged, "v2")["as_shadow"]["estimate"], shadow_truth)):
        ci95, mean = value["ci95"], statistics.mean(truth)
        found[name] = {"truth": mean, "snips": value["snips"], "covered": ci95 is not None and ci95[0] <= mean <= ci95[1],
                       "effective_n": value["effective_n"], "mean_weight": value["ips"] / value["snips"]}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="context pools 1, 2, ... (default 3)")
    parser.add_argument("--replications", type=int, default=400, help="logs per setting (default 400)")
    parser.add_argument("--score-runs", type=int, default=8, help="logs served through Scorer per policy (default 8)")
    parser.add_argument("--score-decisions", type=int, default=3000, help="decisions in each (default 3000)")
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
    served: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for policy, params in (("epsilon_greedy", {"epsilon": 0.2}), ("thompson", {})):
            runs = [through_score(policy, params, args.score_decisions, seed, folder)
                    for seed in range(1, 1 + args.score_runs)]
            for role in ("champion", "shadow"):
                found = [run[role] for run in runs]
                served[f"{policy}_{role}_covered"] = sum(f["covered"] for f in found)
                print(f"through Scorer, {policy} {params}, {role}: covered {sum(f['covered'] for f in found)} of "
                      f"{len(found)}; truth {_span(f['truth'] for f in found)}, estimate {_span(f['snips'] for f in found)}, "
                      f"effective n {_span((f['effective_n'] for f in found), 0)}, "
                      f"ips / snips {_span(f['mean_weight'] for f in found)}", flush=True)
    print(json.dumps({"bench": "offpolicy_coverage",
                      "normal": [min(f["normal"] for f in heavy), max(f["normal"] for f in heavy)],
                      "ci95": [min(f["ci95"] for f in heavy), max(f["ci95"] for f in heavy)],
                      "epsilon_greedy": {"normal": greedy["normal"], "ci95": greedy["ci95"]},
                      "through_score": served, "ms_50k": round(min(times) * 1000, 1)}))
    return 0


def _span(values: object, digits: int = 2) -> str:
    found = sorted(values)  # type: ignore[call-overload]
    return f"{found[0]:.{digits}f}-{found[-1]:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
