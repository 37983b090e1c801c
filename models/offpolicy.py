"""Off-policy evaluation: what another policy would have earned, from the decisions logged.

Each logged decision served one tip first, drawn by the serving (logging) policy with the
probability it logged for every candidate (its `propensity`), and earned a reward. A target
policy (a shadow's first choice, or the champion without exploration) would have put each tip
first with some probability: 1 for its choice, or 1/k for each of k tips it ranks equal (see
`app.evaluation.policy_value`). Inverse propensity scoring re-weights each decision's reward
by `w = target(served) / propensity(served)`, 0 where the target would not have served that tip:

- `ips`: `sum(w * reward) / n`, unbiased when every propensity is right, given support (below),
  and `logged` holds every decision: a log that keeps only decisions somebody reacted to (the
  rewarded log, `app.evaluation.policy_value`) divides by the logging policy's reacted count;
- `snips` (self-normalised): `sum(w * reward) / sum(w)`, a little biased but far less
  variable; it is the estimate a card reports, with a 95% interval (the delta method's spread,
  Student's t quantile: below);
- `effective_n`: `sum(w) ** 2 / sum(w ** 2)`, how many decisions the estimate is really worth.

Both need support: every tip the target might put first must have had a propensity > 0. A
decision without it (a greedy answer, `explore: false`, gives every other tip 0) hides what
the target would have earned there at any weight. Kept, it would pull IPS towards 0 (or, its
served tip one of several the target might choose, stand in for the others), and nothing
would say how much of the log the estimate covers. It is left out and counted in
`skipped_unsupported`: the estimate is then the target's value on the supported decisions.

Which decisions those are depends on the target, which biases a target whose choice is not
fixed in advance (a shadow's first tip): of the greedy answers it keeps only those where the
shadow agreed with the served tip, each at weight 1, so its estimate leans towards what greedy
earned. `full_support=True` keeps only the decisions where every logged tip could have been
served, whatever the target: two policies compared that way rest on the same decisions.

The interval is `snips` plus or minus Student's t quantile times the delta method's spread,
with `(sum(w^2))^2 / sum(w^4) - 1` degrees of freedom: as many as the decisions less one when
the weights are equal, a handful when a few large weights make up the spread (`estimate` says
why). It is None when that has too little to stand on: an effective n under `MIN_EFFECTIVE_N`,
or rewards that are all alike (their spread reads 0, and one agreeing decision would give
`(1.0, 1.0)`). Simulated epsilon-greedy logs at effective n 32 gave coverage 0.93-0.94 for mean
rewards of 0.2-0.5; for rare ones it is erratic (Wald's interval): 0.90 for 0.1, 0.999 for 0.05
(a fifth of those logs, every reward 0, get none) but 0.88 at effective n 67: with rare rewards,
read the interval as too narrow. Softmax and Thompson sampling logs have heavy-tailed weights:
there the normal's quantile covered 81-96% (effective n 130-520), this one 90-98%
(`bench/offpolicy_coverage.py`), 20-60% wider; under epsilon-greedy (bounded weights) it is 0-6%
wider than the normal's. No interval shows what the log never served: where the target chooses
tips served at propensities near 0 (Thompson sampling on the prior's narrow posteriors), SNIPS
rests on the decisions where it chose what was served, and leans towards the logging policy's
value; `ips / snips` (the mean weight, 1 on average over a log that covers the target) then reads
well under 1 (docs/learning.md, "Policy value").

>>> logged = [({"a": 1.0}, {"a": 0.9, "b": 0.1}, "a", 1.0), ({"a": 1.0}, {"a": 0.9, "b": 0.1}, "b", 0.0),
...           ({"b": 1.0}, {"a": 0.95, "b": 0.05}, "b", 0.0), ({"a": 1.0}, {"a": 0.9, "b": 0.1}, "a", 0.0)]
>>> value = estimate(logged)
>>> value.n, value.agreed, round(value.ips, 3), round(value.snips, 3), round(value.effective_n, 2), value.ci95
(4, 3, 0.278, 0.05, 1.23, None)

A target that ranks "a" and "b" equal chooses each half the time: a decision serving either
agrees, at half the weight.

>>> tie = estimate([({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}, "b", 1.0),
...                 ({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}, "a", 0.0)])
>>> tie.agreed, tie.ips, tie.snips
(2, 0.5, 0.5)
>>> estimate([({"b": 1.0}, {"a": 0.5, "b": 0.5}, "a", 1.0)]).snips is None  # the target never agreed
True
>>> greedy_answer = ({"b": 1.0}, {"a": 1.0, "b": 0.0}, "a", 0.2)  # "b" could not have been served
>>> unsupported = estimate([greedy_answer, ({"b": 1.0}, {"a": 0.5, "b": 0.5}, "b", 0.8)])
>>> unsupported.n, unsupported.skipped_unsupported, unsupported.ips
(1, 1, 1.6)
>>> agreeing = ({"a": 1.0}, {"a": 1.0, "b": 0.0}, "a", 0.2)  # a target that agreed with the greedy answer
>>> estimate([agreeing]).n, estimate([agreeing], full_support=True).skipped_unsupported
(1, 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

MIN_EFFECTIVE_N = 30  # below it, no interval (the usual floor for a normal or t approximation)

# One decision: the target policy's probability of putting each tip first (tips left out: 0),
# the logging policy's (the logged propensities), the tip served first and its reward.
Logged = tuple[Mapping[str, float], Mapping[str, float], str, float]


@dataclass(frozen=True, slots=True)
class PolicyValue:
    n: int  # decisions the estimate rests on
    agreed: int  # of which the target policy could have served the same tip first
    ips: float | None
    snips: float | None
    ci95: tuple[float, float] | None  # around snips, within [0, 1] (rewards are); None: too few to say
    effective_n: float
    skipped_unsupported: int = 0  # decisions left out: a tip the target might choose had propensity 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weighable(propensity: float) -> bool:
    """A served tip's propensity that can weigh its reward: in (0, 1], and a normal float, whose
    inverse does not overflow (a subnormal one, under ~2e-308, gives an infinite weight).

    >>> weighable(0.05), weighable(1e-300), weighable(1e-310), weighable(0.0), weighable(1.5)
    (True, True, False, False, False)
    """
    return 0.0 < propensity <= 1.0 and 1.0 / propensity < math.inf


def estimate(logged: Iterable[Logged], full_support: bool = False) -> PolicyValue:
    """The value of the target policy of `logged` (see the module's doc). With `full_support`,
    a decision counts only if every logged tip could have been served (see the module's doc)."""
    n = agreed = unsupported = 0
    weights: list[float] = []
    rewards: list[float] = []
    for target, propensities, served, reward in logged:
        propensity = propensities.get(served, 0.0)
        if not weighable(propensity):
            raise ValueError(f"the served tip's propensity must be in (0, 1] and at least ~2e-308, got {propensity!r}; "
                             "was the decision logged by a policy that never serves it?")
        if full_support and not all(p > 0.0 for p in propensities.values()):
            unsupported += 1
            continue
        if any(chance > 0.0 and not propensities.get(tip, 0.0) > 0.0 for tip, chance in target.items()):
            unsupported += 1
            continue
        n += 1
        chance = target.get(served, 0.0)
        if not 0.0 <= chance <= 1.0:
            raise ValueError(f"the target's probability of a tip must be in [0, 1], got {chance!r}")
        if chance == 0.0:
            continue
        agreed += 1
        weights.append(chance / propensity)
        rewards.append(reward)
    if not agreed:
        return PolicyValue(n, 0, 0.0 if n else None, None, None, 0.0, unsupported)
    # As shares of the largest weight: all but IPS are the same for weights scaled alike, and a tip
    # served at a propensity of 1e-80 (another publisher's) has a weight whose w^4 below overflows
    # (an OverflowError: every `evaluate` failed), at 1e-160 one whose w^2 does (effective n NaN).
    top = max(weights)
    weights = [w / top for w in weights]
    total = sum(weights)
    weighted = sum(w * r for w, r in zip(weights, rewards))
    snips = weighted / total
    squares = sum(w * w for w in weights)
    effective_n = total * total / squares
    interval = None
    if effective_n >= MIN_EFFECTIVE_N and min(rewards) != max(rewards):
        spread = math.sqrt(sum((w * (r - snips)) ** 2 for w, r in zip(weights, rewards))) / total
        # Student's t, not the normal, with Satterthwaite's degrees of freedom for that spread:
        # it sums w^2 (r - snips)^2, so with heavy-tailed weights (softmax, Thompson) a few
        # decisions make up most of it, and a log that missed the rarer large weights reads it
        # too small, with nothing in the normal's 1.96 to allow for that (it covered 81-96% in
        # bench/offpolicy_coverage.py's logs; this, 90-98%). Were every reward's variance the
        # same, the sum would be worth (sum w^2)^2 / sum w^4 squared deviations (the Kish
        # effective n of the weights w^2); less 1 for the estimated mean, that is Student's
        # n - 1 when the weights are equal, so bounded weights (epsilon-greedy) keep ~1.96.
        # Not a studentised bootstrap: 80-93% on those logs, 1.8 s at 27,000 agreeing decisions.
        # Not bounds that use E[w] = 1 (empirical likelihood): the card's log holds only the
        # decisions somebody reacted to, where E[w] is not 1.
        freedom = max(squares * squares / sum(w ** 4 for w in weights) - 1.0, 1.0)
        # Imported here, not with the module: the CLI's commands that train nothing (migrate, models list) import
        # this module through the registry, and started 0.4 s later for SciPy (River loads it for those that do).
        from scipy.special import stdtrit  # Student's t quantile

        half = float(stdtrit(freedom, 0.975)) * spread
        interval = (max(0.0, snips - half), min(1.0, snips + half))
    return PolicyValue(n, agreed, top * weighted / n, snips, interval, effective_n, unsupported)
