"""Exploration policies and their logged propensities (models/policy.py)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest
from scipy import integrate, stats

from models.policy import EpsilonGreedy, Greedy, Softmax, ThompsonSampling, make_policy

SCORES = [0.2, 0.7, 0.5, 0.65]
ALL = [Greedy(), EpsilonGreedy(0.2), Softmax(0.1), ThompsonSampling()]


def _first_frequencies(policy, scores, n, seed=0, samples=None) -> list[float]:
    rng = random.Random(seed)
    counts = Counter(policy.rank(scores, rng, samples)[0][0] for _ in range(n))
    return [counts[i] / n for i in range(len(scores))]


@pytest.mark.parametrize("policy", ALL, ids=repr)
def test_every_policy_returns_a_permutation_and_propensities_summing_to_1(policy) -> None:
    rng = random.Random(1)
    for n in (1, 2, 4, 10, 50):
        scores = [rng.random() for _ in range(n)]
        order, propensities = policy.rank(scores, rng)
        assert sorted(order) == list(range(n))
        assert len(propensities) == n
        assert sum(propensities) == pytest.approx(1.0, abs=1e-12)
        assert all(0.0 <= p <= 1.0 for p in propensities)
    assert policy.rank([], rng) == ([], [])


@pytest.mark.parametrize("policy", ALL, ids=repr)
def test_deterministic_given_the_rng(policy) -> None:
    a = [policy.rank(SCORES, r) for r in [random.Random(42)] * 20]
    b = [policy.rank(SCORES, r) for r in [random.Random(42)] * 20]
    assert a == b


@pytest.mark.parametrize("policy", ALL, ids=repr)
def test_non_finite_scores_are_refused(policy) -> None:
    with pytest.raises(ValueError, match="finite"):
        policy.rank([0.1, math.nan], random.Random(0))


def test_greedy_ties_go_to_the_lower_index() -> None:
    assert Greedy().rank([0.3, 0.9, 0.9, 0.1], random.Random(0)) == ([1, 2, 0, 3], [0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 1.0])
def test_epsilon_greedy_propensities(eps: float) -> None:
    n = len(SCORES)
    _, p = EpsilonGreedy(eps).rank(SCORES, random.Random(0))
    assert p[1] == pytest.approx(1 - eps + eps / n)
    assert p[0] == p[2] == p[3] == pytest.approx(eps / n)
    freq = _first_frequencies(EpsilonGreedy(eps), SCORES, 20_000)
    assert freq == pytest.approx(p, abs=0.012)


def test_epsilon_greedy_keeps_the_rest_in_greedy_order() -> None:
    rng = random.Random(5)
    for _ in range(200):
        order, _ = EpsilonGreedy(0.5).rank(SCORES, rng)
        rest = order[1:]
        assert rest == sorted(rest, key=lambda i: -SCORES[i])


def test_softmax_propensities_are_the_softmax_and_match_frequencies() -> None:
    t = 0.15
    _, p = Softmax(t).rank(SCORES, random.Random(0))
    weights = [math.exp(s / t) for s in SCORES]
    assert p == pytest.approx([w / sum(weights) for w in weights], abs=1e-12)
    assert _first_frequencies(Softmax(t), SCORES, 20_000) == pytest.approx(p, abs=0.012)


def test_softmax_samples_the_whole_order_plackett_luce() -> None:
    t = 0.15
    weights = [math.exp(s / t) for s in SCORES]
    total = sum(weights)
    # P(second = j) = sum_i P(first = i) * w_j / (total - w_i)
    expected = [sum(weights[i] / total * weights[j] / (total - weights[i]) for i in range(4) if i != j)
                for j in range(4)]
    rng = random.Random(3)
    seconds = Counter(Softmax(t).rank(SCORES, rng)[0][1] for _ in range(20_000))
    assert [seconds[j] / 20_000 for j in range(4)] == pytest.approx(expected, abs=0.012)


def test_softmax_temperature_controls_exploration() -> None:
    _, cold = Softmax(0.001).rank(SCORES, random.Random(0))
    _, hot = Softmax(100.0).rank(SCORES, random.Random(0))
    assert cold[1] == pytest.approx(1.0)
    assert hot == pytest.approx([0.25] * 4, abs=0.01)


ALPHA = [2.0, 30.0, 12.0, 5.0]
BETA = [8.0, 12.0, 8.0, 3.0]


def _true_first_probabilities(alpha, beta) -> list[float]:
    draws = np.random.default_rng(0).beta(alpha, beta, size=(400_000, len(alpha)))
    return (np.bincount(draws.argmax(axis=1), minlength=len(alpha)) / len(draws)).tolist()


def test_thompson_propensities_match_first_place_frequencies() -> None:
    samples = {"alpha": ALPHA, "beta": BETA}
    truth = _true_first_probabilities(ALPHA, BETA)
    policy = ThompsonSampling()
    rng = random.Random(11)
    runs = [policy.rank(SCORES, rng, samples) for _ in range(3000)]
    assert runs[0][1] == pytest.approx(truth, abs=0.003)  # 400,000 draws: ~0.001 of noise
    assert all(p == runs[0][1] for _, p in runs)  # integrated, not estimated: the same every time
    firsts = Counter(order[0] for order, _ in runs)
    assert [firsts[i] / 3000 for i in range(4)] == pytest.approx(truth, abs=0.03)


def _quad_first_probabilities(alpha, beta) -> list[float]:
    """integrate.quad, below 1/2 in x and above it in y = 1 - x (Beta(b, a)), so that the steep
    ends of a density sit at 0, where floats are fine, with breakpoints down to 1e-12."""
    points = [0.0, 1e-12, 1e-9, 1e-6, 1e-3, 0.05, 0.2, 0.5]
    n, out = len(alpha), []
    for i in range(n):
        def low(x, i=i):
            return stats.beta.pdf(x, alpha[i], beta[i]) * math.prod(
                stats.beta.cdf(x, alpha[j], beta[j]) for j in range(n) if j != i)

        def high(y, i=i):
            return stats.beta.pdf(y, beta[i], alpha[i]) * math.prod(
                stats.beta.sf(y, beta[j], alpha[j]) for j in range(n) if j != i)

        out.append(sum(integrate.quad(f, lo, hi, limit=500)[0]
                       for f in (low, high) for lo, hi in itertools.pairwise(points)))
    return out


@pytest.mark.parametrize(
    ("alpha", "beta"),
    [
        ([3.0, 5.0], [7.0, 5.0]),
        ([1.0, 80.0, 5.0], [9.0, 20.0, 5.0]),
        ([0.117, 0.107], [1.883, 1.893]),  # two new tips (concentration 2), steep at 0: was 0.006 off
        ([1.9, 1.8, 1.95], [0.1, 0.2, 0.05]),  # steep at 1
        ([0.3, 0.2], [0.7, 0.8]),  # unbounded at both ends
        ([0.8, 60.0, 0.3, 150.0], [199.2, 140.0, 1.7, 50.0]),  # the prior's widest and narrowest
    ],
)
def test_thompson_propensities_agree_with_numerical_integration(alpha, beta) -> None:
    _, p = ThompsonSampling().rank([0.5] * len(alpha), random.Random(0), {"alpha": alpha, "beta": beta})
    assert p == pytest.approx(_quad_first_probabilities(alpha, beta), abs=3e-4)


def test_thompson_propensities_of_rare_rewards_at_the_prior_s_full_concentration() -> None:
    """Means of 0.25-1% at the prior's cap (200) are narrow for 256 cells: 0.008 off before
    they were doubled for it."""
    alpha, beta = [0.5, 2.0, 1.0], [49.5, 198.0, 99.0]
    _, p = ThompsonSampling().rank([0.5] * 3, random.Random(0), {"alpha": alpha, "beta": beta})
    assert p == pytest.approx(_quad_first_probabilities(alpha, beta), abs=1e-3)


def test_thompson_never_logs_0_for_a_tip_that_can_come_first() -> None:
    """Counted from 128 joint draws, 37% of the tips that could come first logged 0, so
    off-policy evaluation left those decisions out as ones the policy could not have made."""
    rng = np.random.default_rng(3)
    concentration = rng.uniform(2, 200, 10)
    mean = rng.uniform(0.05, 0.6, 10)
    alpha, beta = (mean * concentration).tolist(), ((1 - mean) * concentration).tolist()
    truth = _true_first_probabilities(alpha, beta)
    _, p = ThompsonSampling().rank([0.5] * 10, random.Random(0), {"alpha": alpha, "beta": beta})
    can_come_first = [i for i, t in enumerate(truth) if t > 0]
    assert len(can_come_first) >= 5 and all(p[i] > 0 for i in can_come_first)
    assert p == pytest.approx(truth, abs=0.003)


def test_thompson_serves_by_its_propensities_when_draws_crowd_at_1() -> None:
    """Beta(1.99, 0.01) rounds to exactly 1.0 most of the time: ordered by such draws, the
    ties went to the lower index, and the first tip was served ~3/4 of the time, not 1/2."""
    samples = {"alpha": [1.99, 1.99], "beta": [0.01, 0.01]}
    rng = random.Random(5)
    runs = [ThompsonSampling().rank([0.5, 0.5], rng, samples) for _ in range(4000)]
    assert runs[0][1] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert sum(order[0] == 0 for order, _ in runs) / 4000 == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("at_zero", [True, False])
def test_thompson_serves_by_its_propensities_when_gamma_draws_underflow(at_zero: bool) -> None:
    """The prior gives a tip scoring ~0 Beta(2e-6, 2): its Gamma(2e-6) draw underflowed to 0,
    every such tip tied, and the first of them was served every time (mirrored: scoring ~1)."""
    tiny, wide = [2e-6, 4e-6, 6e-6], [2.0, 2.0, 2.0]
    alpha, beta = (tiny, wide) if at_zero else (wide, tiny)
    rng = random.Random(7)
    runs = [ThompsonSampling().rank([0.5] * 3, rng, {"alpha": alpha, "beta": beta}) for _ in range(3000)]
    # Near 0, where all three sit, x^shape is each CDF: P(first) goes by shape, 1 : 2 : 3. Near
    # 1, -log(1 - x) is exponential at rate shape: P(first) = P(its exponential is the largest).
    expected = [1 / 6, 2 / 6, 3 / 6] if at_zero else [7 / 12, 4 / 15, 3 / 20]
    assert runs[0][1] == pytest.approx(expected, abs=1e-3)
    firsts = Counter(order[0] for order, _ in runs)
    assert [firsts[i] / 3000 for i in range(3)] == pytest.approx(expected, abs=0.03)


def test_thompson_two_candidates_against_the_closed_form() -> None:
    a1, b1, a2, b2 = 3.0, 7.0, 5.0, 5.0
    p_first, _ = integrate.quad(lambda x: stats.beta.pdf(x, a1, b1) * stats.beta.cdf(x, a2, b2), 0, 1)
    _, p = ThompsonSampling().rank([0.3, 0.5], random.Random(0), {"alpha": [a1, a2], "beta": [b1, b2]})
    assert p[0] == pytest.approx(p_first, abs=1e-4)


def test_thompson_without_posteriors_uses_the_scores() -> None:
    _, p = ThompsonSampling(concentration=200.0).rank([0.1, 0.9, 0.5], random.Random(0))
    assert p[1] > 0.99
    _, p = ThompsonSampling(concentration=2.0).rank([0.1, 0.9, 0.5], random.Random(0))
    assert 0.4 < p[1] < 0.9  # wide posteriors: real exploration


def test_thompson_refuses_bad_posteriors() -> None:
    policy = ThompsonSampling()
    with pytest.raises(ValueError, match="one value per candidate"):
        policy.rank([0.1, 0.2], random.Random(0), {"alpha": [1.0], "beta": [1.0]})
    with pytest.raises(ValueError, match="> 0"):
        policy.rank([0.1, 0.2], random.Random(0), {"alpha": [1.0, 0.0], "beta": [1.0, 1.0]})
    with pytest.raises(ValueError, match="alpha"):
        policy.rank([0.1, 0.2], random.Random(0), {"a": [1.0, 1.0]})


def test_make_policy_builds_each_policy() -> None:
    assert make_policy("epsilon_greedy", epsilon=0.2) == EpsilonGreedy(0.2)
    assert make_policy("Epsilon-Greedy", epsilon="0.05") == EpsilonGreedy(0.05)
    assert make_policy("softmax", temperature=0.3) == Softmax(0.3)
    assert make_policy("thompson", cells="64", concentration=None) == ThompsonSampling(64)
    assert make_policy("greedy") == Greedy()
    assert make_policy("softmax", epsilon=None).params == {"temperature": 0.1}  # None: not set


def test_make_policy_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of: epsilon_greedy, softmax, thompson, greedy"):
        make_policy("linucb")
    with pytest.raises(ValueError, match="does not take epsilon; it accepts: temperature"):
        make_policy("softmax", epsilon=0.1)
    with pytest.raises(ValueError, match="it accepts: no parameters"):
        make_policy("greedy", epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon must be between 0 and 1"):
        make_policy("epsilon_greedy", epsilon=1.5)
    with pytest.raises(ValueError, match="temperature"):
        make_policy("softmax", temperature="hot")
    with pytest.raises(ValueError, match="temperature"):
        Softmax(0.0)
    with pytest.raises(ValueError, match="cells"):
        ThompsonSampling(cells=8)


@pytest.mark.parametrize("scores, t", [
    ([0.5, 0.5], 1e-16),  # s / t ~ 5e15: a float's spacing there (1) swallows the Gumbel noise
    ([0.5, 0.5], 1e-300),  # s / t overflows to inf for both
    ([1e308, 1e308], 0.1),  # the same with scores that are not probabilities
    ([0.3, 0.5, 0.5], 1e-17),
])
def test_softmax_order_matches_its_propensities_at_extreme_scales(scores: list[float], t: float) -> None:
    _, p = Softmax(t).rank(scores, random.Random(0))
    assert _first_frequencies(Softmax(t), scores, 20_000) == pytest.approx(p, abs=0.012)
