"""The popularity prior: each tip's rewards over all users, for new tips and new users (cold start)."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from models import snapshot
from models.reward import check_reward
from models.snapshot import stored_in_reward

# Tips whose rewards the popularity prior counts; past it, the tip rewarded longest ago leaves (its
# mean is the base rate again, as for a new tip). A tip id is the caller's, and every one rewarded
# was kept for good: ~200 bytes each, a new one with every reward of a client that makes them up,
# and catalogues churn. Far above a real catalogue (20 MB at the bound).
PRIOR_MAX_TIPS = 100_000


@stored_in_reward
class PopularityPrior:
    """Per-tip Beta(alpha, beta) pseudo-counts of rewards, global across users (cold start).

    A tip's prior is centred on the global mean reward with weight `strength`; each observed
    reward r adds r to alpha and 1 - r to beta. A tip never seen has the global mean.

    Blend rule (`blend`): score = w * model + (1 - w) * prior_mean, with
    ``w = n_tip / (n_tip + tip_k)``, multiplied by ``u / (u + user_k)`` when the caller knows
    how many reactions the user has given (`user_observations` = u). A new tip or a new user
    leans on popularity; the model takes over as observations accumulate (each factor is 0.5
    at n_tip = tip_k, resp. u = user_k).

    >>> prior = PopularityPrior(strength=2.0)
    >>> for r in (1.0, 1.0, 0.0, 1.0):
    ...     prior.update("tip-a", r)
    >>> prior.update("tip-b", 0.0)
    >>> round(prior.mean("tip-a"), 3), round(prior.mean("tip-b"), 3), round(prior.mean("never-seen"), 3)
    (0.69, 0.381, 0.571)
    >>> prior.blend("tip-a", model_score=0.9, user_observations=0) == prior.mean("tip-a")
    True
    >>> round(prior.blend("tip-a", model_score=0.9), 3)  # w = 4 / (4 + 20)
    0.725
    """

    def __init__(self, *, strength: float = 2.0, tip_k: float = 20.0, user_k: float = 5.0,
                 max_concentration: float = 200.0) -> None:
        if not (strength > 0 and tip_k > 0 and user_k > 0 and max_concentration > 0):
            raise ValueError("strength, tip_k, user_k and max_concentration must all be > 0")
        self.params: dict[str, float] = {
            "strength": float(strength), "tip_k": float(tip_k), "user_k": float(user_k),
            "max_concentration": float(max_concentration),
        }
        # tip_id -> [sum of rewards, observations], the tip rewarded longest ago first (`PRIOR_MAX_TIPS`).
        self._tips: OrderedDict[str, list[float]] = OrderedDict()
        self._reward_sum = 0.0
        self._n = 0.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if type(self._tips) is not OrderedDict:  # a snapshot from before the bound: a dict, in first-reward order
            self._tips = OrderedDict(self._tips)

    def clone(self, **changes: float) -> PopularityPrior:
        return PopularityPrior(**{**self.params, **changes})

    def update(self, tip_id: str, reward: float) -> None:
        reward = check_reward(reward)
        tips = self._tips
        counts = tips.get(tip_id)
        if counts is None:
            counts = tips[tip_id] = [0.0, 0.0]
            if len(tips) > PRIOR_MAX_TIPS:
                tips.popitem(last=False)
        else:
            tips.move_to_end(tip_id)
        counts[0] += reward
        counts[1] += 1.0
        self._reward_sum += reward
        self._n += 1.0

    @property
    def base_rate(self) -> float:
        """Global mean reward, Laplace-smoothed so it exists before any observation."""
        return (self._reward_sum + 1.0) / (self._n + 2.0)

    def count(self, tip_id: str) -> float:
        counts = self._tips.get(tip_id)
        return counts[1] if counts else 0.0

    def alpha_beta(self, tip_id: str) -> tuple[float, float]:
        s, m = self.params["strength"], self.base_rate
        reward_sum, n = self._tips.get(tip_id, (0.0, 0.0))
        return s * m + reward_sum, s * (1.0 - m) + (n - reward_sum)

    def mean(self, tip_id: str) -> float:
        a, b = self.alpha_beta(tip_id)
        return a / (a + b)

    def sample(self, tip_id: str, rng: random.Random) -> float:
        return rng.betavariate(*self.alpha_beta(tip_id))

    def model_weight(self, tip_id: str, user_observations: float | None = None) -> float:
        n = self.count(tip_id)
        w = n / (n + self.params["tip_k"])
        if user_observations is not None:
            w *= user_observations / (user_observations + self.params["user_k"])
        return w

    def blend(self, tip_id: str, model_score: float, user_observations: float | None = None) -> float:
        w = self.model_weight(tip_id, user_observations)
        return w * model_score + (1.0 - w) * self.mean(tip_id)

    def posterior(self, tip_id: str, model_score: float | None = None,
                  user_observations: float | None = None) -> tuple[float, float]:
        """Beta(alpha, beta) for Thompson sampling: mean = the blended score, concentration =
        strength + observations of the tip, capped at `max_concentration` so that a tip seen
        often keeps some exploration (tastes drift)."""
        mean = self.mean(tip_id) if model_score is None else self.blend(tip_id, model_score, user_observations)
        mean = min(max(mean, 1e-6), 1.0 - 1e-6)
        c = min(self.params["strength"] + self.count(tip_id), self.params["max_concentration"])
        return mean * c, (1.0 - mean) * c

    def thompson_samples(self, tip_ids: Sequence[str], model_scores: Sequence[float] | None = None,
                         user_observations: float | None = None) -> dict[str, list[float]]:
        """`posterior` for each candidate, shaped as `ThompsonSampling.rank`'s `samples`.

        >>> from models.policy import ThompsonSampling
        >>> prior = PopularityPrior()
        >>> samples = prior.thompson_samples(["a", "b"], [0.2, 0.9])
        >>> order, propensities = ThompsonSampling().rank([0.2, 0.9], random.Random(0), samples)
        >>> sorted(order), round(sum(propensities), 9)
        ([0, 1], 1.0)
        """
        scores: Sequence[float | None] = model_scores if model_scores is not None else [None] * len(tip_ids)
        alpha, beta = [], []
        for tip_id, score in zip(tip_ids, scores, strict=True):
            a, b = self.posterior(tip_id, score, user_observations)
            alpha.append(a)
            beta.append(b)
        return {"alpha": alpha, "beta": beta}

    def to_bytes(self) -> bytes:
        return snapshot.dumps(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> PopularityPrior:
        return snapshot.loads(cls, data)


__test__ = {"PopularityPrior": PopularityPrior}  # stored as models.reward's, which doctest would take it for
