"""Exploration policies: order candidates and log each one's propensity.

Every policy answers `rank(scores, rng, samples=None) -> (order, propensities)`:

- `order`: candidate indices, best first;
- `propensities[i]` (input order): the probability that the policy puts candidate `i` first,
  given these scores. They sum to 1 and are what the decision log records, so that rewards
  can later be re-weighted (inverse propensity scoring) to evaluate another policy offline.

Ties in scores go to the lower index, and all randomness comes from `rng`, so a policy is
deterministic given the rng's state.

>>> import random
>>> policy = make_policy("epsilon_greedy", epsilon=0.1)
>>> policy.rank([0.2, 0.9, 0.5], random.Random(3))
([1, 2, 0], [0.03333333333333333, 0.9333333333333333, 0.03333333333333333])
>>> make_policy("greedy").rank([0.2, 0.9, 0.5], random.Random(3))
([1, 2, 0], [0.0, 1.0, 0.0])
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from models.thompson import first_probabilities

Ranking = tuple[list[int], list[float]]


def _check_finite(scores: Sequence[float]) -> None:
    for s in scores:
        if not math.isfinite(s):  # a NaN would make any order meaningless
            raise ValueError(f"scores must be finite numbers, got {s!r}")


def _greedy_order(scores: Sequence[float]) -> list[int]:
    _check_finite(scores)
    # sorted() is stable, so equal scores keep input order: ties go to the lower index.
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not value > 0.0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


class Policy:
    """Base class: subclasses set `name` and `PARAMS` and implement `rank`."""

    name: ClassVar[str] = ""
    PARAMS: ClassVar[tuple[str, ...]] = ()

    def rank(self, scores: Sequence[float], rng: random.Random, samples: Mapping[str, Any] | None = None) -> Ranking:
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.PARAMS}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params  # type: ignore[attr-defined]


class Greedy(Policy):
    """No exploration: best score first, propensity 1 for it.

    >>> Greedy().rank([0.5, 0.5, 0.1], random.Random(0))
    ([0, 1, 2], [1.0, 0.0, 0.0])
    """

    name = "greedy"

    def rank(self, scores: Sequence[float], rng: random.Random, samples: Mapping[str, Any] | None = None) -> Ranking:
        order = _greedy_order(scores)
        propensities = [0.0] * len(scores)
        if order:
            propensities[order[0]] = 1.0
        return order, propensities


class EpsilonGreedy(Policy):
    """With probability 1 - epsilon the greedy order; otherwise a uniformly random candidate
    first and the rest in greedy order (so the list below the explored tip stays useful).

    Propensity of the greedy top: 1 - epsilon + epsilon / n; of any other: epsilon / n.

    >>> EpsilonGreedy(0.5).rank([0.1, 0.3], random.Random(1))  # this draw explores
    ([0, 1], [0.25, 0.75])
    """

    name = "epsilon_greedy"
    PARAMS = ("epsilon",)

    def __init__(self, epsilon: float = 0.1) -> None:
        epsilon = float(epsilon)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be between 0 and 1, got {epsilon!r}")
        self.epsilon = epsilon

    def rank(self, scores: Sequence[float], rng: random.Random, samples: Mapping[str, Any] | None = None) -> Ranking:
        order = _greedy_order(scores)
        n = len(order)
        if n == 0:
            return order, []
        eps = self.epsilon
        propensities = [eps / n] * n
        propensities[order[0]] += 1.0 - eps
        if rng.random() < eps:
            pick = rng.randrange(n)
            order.remove(pick)
            order.insert(0, pick)
        return order, propensities


class Softmax(Policy):
    """Plackett-Luce sampling with P(first = i) = exp(s_i / T) / sum_j exp(s_j / T).

    Scores are probabilities, so T = 0.1 means a 0.1 higher score is e times likelier to
    come first. The whole order is sampled with the Gumbel-max trick (keys s_i / T + Gumbel
    noise, sorted), whose first element has exactly the softmax distribution.

    >>> order, p = Softmax(0.1).rank([0.2, 0.3], random.Random(0))
    >>> [round(x, 4) for x in p]
    [0.2689, 0.7311]
    """

    name = "softmax"
    PARAMS = ("temperature",)

    def __init__(self, temperature: float = 0.1) -> None:
        self.temperature = _positive_finite("temperature", temperature)

    def rank(self, scores: Sequence[float], rng: random.Random, samples: Mapping[str, Any] | None = None) -> Ranking:
        _check_finite(scores)
        n = len(scores)
        if n == 0:
            return [], []
        t = self.temperature
        top = max(scores)
        # Shifted by the top score, for the weights and the keys alike: s / t itself overflows
        # (or, near 1e16 and past, has a spacing that swallows the Gumbel noise) at a tiny
        # temperature, and equal keys then went to the lower index, not by the propensities.
        logits = [(s - top) / t for s in scores]
        weights = [math.exp(z) for z in logits]
        total = sum(weights)
        propensities = [w / total for w in weights]
        keys = []
        for i, z in enumerate(logits):
            u = rng.random() or 5e-324  # random() may return 0.0; log(0) is undefined
            keys.append((z - math.log(-math.log(u)), -i))
        order = [-i for _, i in sorted(keys, reverse=True)]
        return order, propensities


class ThompsonSampling(Policy):
    """Order by one draw from each candidate's Beta posterior.

    `samples` gives the posteriors: ``{"alpha": [...], "beta": [...]}`` in candidate order
    (`PopularityPrior.thompson_samples` builds it from the model's scores and the tips'
    observation counts); the scores are then only validated. Without `samples` each score s
    becomes Beta(1 + s * concentration, 1 + (1 - s) * concentration).

    The propensity P(i is first) has no closed form for n Betas; `models.thompson`
    integrates it over `cells` cells of [0, 1]. (Counted from 128 joint draws, as before, it
    was 0 for 37% of the candidates that could come first, so off-policy evaluation left out
    decisions Thompson sampling did support, and at least 1/128 for the one served.)

    >>> order, p = ThompsonSampling().rank([0.1, 0.8, 0.5], random.Random(0),
    ...     samples={"alpha": [1, 80, 5], "beta": [9, 20, 5]})
    >>> order[0], round(sum(p), 12), [float(f"{x:.3g}") for x in p]
    (1, 1.0, [1.68e-06, 0.975, 0.0246])
    """

    name = "thompson"
    PARAMS = ("cells", "concentration")

    def __init__(self, cells: int = 256, concentration: float = 10.0) -> None:
        if float(cells) != int(cells) or not 16 <= int(cells) <= 65_536:
            raise ValueError(f"cells must be a whole number from 16 to 65536, got {cells!r}")
        self.cells = int(cells)
        self.concentration = _positive_finite("concentration", concentration)
        self._bits = np.random.PCG64(0)
        self._numpy = np.random.Generator(self._bits)

    def _generator(self, rng: random.Random) -> np.random.Generator:
        """numpy's generator, its state drawn from `rng`. The state is set, not seeded: seeding
        a new generator hashes its seed, 18-26 us against 2-3."""
        self._bits.state = {"bit_generator": "PCG64", "state": {"state": rng.getrandbits(128), "inc": _PCG64_INC},
                            "has_uint32": 0, "uinteger": 0}
        return self._numpy

    def rank(self, scores: Sequence[float], rng: random.Random, samples: Mapping[str, Any] | None = None) -> Ranking:
        _check_finite(scores)
        n = len(scores)
        if n == 0:
            return [], []
        if samples is None:
            c = self.concentration
            clipped = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
            alpha, beta = 1.0 + clipped * c, 1.0 + (1.0 - clipped) * c
        else:
            try:
                alpha = np.asarray(samples["alpha"], dtype=float)
                beta = np.asarray(samples["beta"], dtype=float)
            except KeyError as exc:
                raise ValueError("Thompson sampling needs samples={'alpha': [...], 'beta': [...]}") from exc
            if alpha.shape != (n,) or beta.shape != (n,):
                raise ValueError(f"samples['alpha'] and samples['beta'] need one value per candidate ({n})")
            if not (np.all(alpha > 0) and np.all(beta > 0) and np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))):
                raise ValueError("Beta parameters must be finite and > 0")
        # A Beta draw is G_a / (G_a + G_b) for Gamma draws: ordered by log(G_b / G_a), not by the
        # draw itself, which rounds to exactly 1.0 for ~1 in 6 draws of Beta(1.95, 0.05); such
        # ties went to the lower index, 0.003 away from the propensities.
        numbers = self._generator(rng)
        keys = _log_gamma_draws(numbers, beta) - _log_gamma_draws(numbers, alpha)
        order = np.argsort(keys, kind="stable").tolist()
        return order, first_probabilities(alpha, beta, self.cells).tolist()


def _log_gamma_draws(numbers: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    """log of one Gamma(shape) draw each. Below shape 1 a draw underflows to 0 (always, for the
    prior's Beta(2e-6, 2) of a tip scoring ~0), and tied candidates went by index: the first
    was always served, whatever the propensities said. So it is drawn in logs, as
    G(shape + 1) * U^(1 / shape) (Marsaglia and Tsang), for every shape: picking out the small
    ones cost more than the uniform draws."""
    return np.log(numbers.standard_gamma(shape + 1.0)) + np.log1p(-numbers.random(len(shape))) / shape  # U in (0, 1]


_PCG64_INC = np.random.PCG64(0).state["state"]["inc"]  # any odd number: the stream PCG64(0) uses

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (EpsilonGreedy, Softmax, ThompsonSampling, Greedy)
}


def make_policy(name: str, **params: Any) -> Policy:
    """A policy from settings-like values: a name and its parameters (None = default).

    >>> make_policy("softmax", temperature="0.2")
    Softmax(temperature=0.2)
    >>> make_policy("ucb")
    Traceback (most recent call last):
    ...
    ValueError: Unknown exploration policy 'ucb'; choose one of: epsilon_greedy, softmax, thompson, greedy.
    """
    key = str(name).strip().lower().replace("-", "_")
    cls = POLICIES.get(key)
    if cls is None:
        raise ValueError(f"Unknown exploration policy {name!r}; choose one of: {', '.join(POLICIES)}.")
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(cls.PARAMS))
    if unknown:
        accepted = ", ".join(cls.PARAMS) or "no parameters"
        raise ValueError(f"Policy {key!r} does not take {', '.join(unknown)}; it accepts: {accepted}.")
    for k, v in given.items():
        if isinstance(v, str):  # values read from the environment arrive as text
            try:
                given[k] = float(v)
            except ValueError:
                raise ValueError(f"Policy {key!r}: {k} must be a number, got {v!r}") from None
    try:
        return cls(**given)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Policy {key!r}: {exc}") from exc
