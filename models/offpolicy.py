"""Off-policy evaluation: what another policy would have earned, from the decisions logged.

Each logged decision served one tip first, with the probability the serving policy gave it
(its `propensity`), and earned a reward. A deterministic target policy (a shadow's first
choice, or the champion without exploration) agreed with the served tip or not. Inverse
propensity scoring re-weights the agreeing decisions by `1 / propensity`:

- `ips`: `sum(agree * reward / p) / n`, unbiased when every propensity is right and > 0;
- `snips` (self-normalised): `sum(agree * reward / p) / sum(agree / p)`, a little biased but
  far less variable; it is the estimate a card reports, with a 95% interval (delta method);
- `effective_n`: `sum(w) ** 2 / sum(w ** 2)`, how many decisions the estimate is really worth.

>>> logged = [(True, 0.9, 1.0), (False, 0.9, 0.0), (True, 0.05, 0.0), (True, 0.9, 0.0)]
>>> value = estimate(logged)
>>> value.n, value.agreed, round(value.ips, 3), round(value.snips, 3), round(value.effective_n, 2)
(4, 3, 0.278, 0.05, 1.23)
>>> estimate([(False, 0.5, 1.0)]).snips is None  # the target never agreed: nothing to say
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

Z95 = 1.959964


@dataclass(frozen=True, slots=True)
class PolicyValue:
    n: int  # decisions looked at
    agreed: int  # of which the target policy would have served the same tip first
    ips: float | None
    snips: float | None
    ci95: tuple[float, float] | None  # around snips, within [0, 1] (rewards are)
    effective_n: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(logged: Iterable[tuple[bool, float, float]]) -> PolicyValue:
    """`logged`: per decision, (the target agrees with the served tip, its propensity, the reward)."""
    n = agreed = 0
    weights: list[float] = []
    rewards: list[float] = []
    for agrees, propensity, reward in logged:
        n += 1
        if not agrees:
            continue
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"the served tip's propensity must be in (0, 1], got {propensity!r}; "
                             "was the decision logged by a policy that never serves it?")
        agreed += 1
        weights.append(1.0 / propensity)
        rewards.append(reward)
    if not agreed:
        return PolicyValue(n, 0, 0.0 if n else None, None, None, 0.0)
    total = sum(weights)
    weighted = sum(w * r for w, r in zip(weights, rewards))
    snips = weighted / total
    squares = sum(w * w for w in weights)
    spread = math.sqrt(sum((w * (r - snips)) ** 2 for w, r in zip(weights, rewards))) / total
    interval = (max(0.0, snips - Z95 * spread), min(1.0, snips + Z95 * spread))
    return PolicyValue(n, agreed, weighted / n, snips, interval, total * total / squares)
