"""The offline metrics of models/validation.py against references computed by hand here."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from models.validation import CALIBRATION_BINS, _Metrics, fairness_check, timezone_segment


def _auc(rewards: list[float], scores: list[float]) -> float:
    """Every (positive, negative) pair: 1 in order, 1/2 tied."""
    pos = [s for r, s in zip(rewards, scores) if r >= 0.5]
    neg = [s for r, s in zip(rewards, scores) if r < 0.5]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def _log_loss(rewards: list[float], scores: list[float]) -> float:
    eps = 1e-15
    return -sum(r * math.log(min(max(s, eps), 1 - eps)) + (1 - r) * math.log(1 - min(max(s, eps), 1 - eps))
                for r, s in zip(rewards, scores)) / len(rewards)


def _ece(rewards: list[float], scores: list[float]) -> float:
    bins: dict[int, list[tuple[float, float]]] = {}
    for r, s in zip(rewards, scores):
        bins.setdefault(min(int(s * CALIBRATION_BINS), CALIBRATION_BINS - 1), []).append((r, s))
    n = len(rewards)
    return sum(len(b) / n * abs(sum(s for _, s in b) / len(b) - sum(r for r, _ in b) / len(b)) for b in bins.values())


def _report(rewards: list[float], scores: list[float]) -> dict:
    m = _Metrics()
    for r, s in zip(rewards, scores):
        m.update(r, s)
    return m.get()


def test_roc_auc_is_exact_for_scores_in_a_narrow_band() -> None:
    # Rare rewards, every score near 0.1, and a perfect ranking: River's ROCAUC(50) read 0.71.
    rng = random.Random(0)
    rewards = [float(rng.random() < 0.3) for _ in range(1000)]
    scores = [0.10 + 0.01 * r + 0.005 * rng.random() for r in rewards]
    assert _report(rewards, scores)["roc_auc"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_references_with_ties_and_soft_rewards(seed: int) -> None:
    rng = random.Random(seed)
    rewards = [rng.choice((0.0, 0.0, 1.0, 0.5, 0.2, 0.8)) for _ in range(300)]
    # Few distinct scores: many ties, within and across classes; 0 and 1 included.
    scores = [rng.choice((0.0, 0.05, 0.1, 0.1000001, 0.35, 0.5, 0.9, 1.0)) for _ in range(300)]
    report = _report(rewards, scores)
    assert report["roc_auc"] == pytest.approx(_auc(rewards, scores), abs=1e-12)
    positive = [s for r, s in zip(rewards, scores) if r >= 0.5]
    negative = [s for r, s in zip(rewards, scores) if r < 0.5]
    u = stats.mannwhitneyu(positive, negative, alternative="two-sided").statistic
    assert report["roc_auc"] == pytest.approx(u / (len(positive) * len(negative)), abs=1e-12)
    assert report["log_loss"] == pytest.approx(_log_loss(rewards, scores), rel=1e-9)
    base_rates = [(sum(rewards[:i]) + 1) / (i + 2) for i in range(len(rewards))]  # knowing only the rewards before
    assert report["log_loss_base_rate"] == pytest.approx(_log_loss(rewards, base_rates), rel=1e-9)
    assert report["calibration_error"] == pytest.approx(_ece(rewards, scores), abs=1e-12)
    assert report["mean_reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert report["mean_score"] == pytest.approx(sum(scores) / len(scores))


def test_roc_auc_edge_cases() -> None:
    assert _report([1.0, 0.0], [0.3, 0.3])["roc_auc"] == 0.5  # one tie: half
    assert _report([1.0, 0.0], [0.2, 0.3])["roc_auc"] == 0.0
    assert math.copysign(1.0, _report([1.0, 0.0], [0.2, 0.3])["roc_auc"]) == 1.0  # not -0.0
    assert _report([1.0, 1.0], [0.2, 0.3])["roc_auc"] is None  # one class
    assert _report([0.4, 0.0], [0.2, 0.3])["roc_auc"] is None  # 0.4 is a negative
    empty = _Metrics().get()
    assert empty["n"] == 0 and all(v is None for k, v in empty.items() if k not in ("n", "positives"))


def test_fairness_segments_report_exact_auc_and_counts() -> None:
    rng = random.Random(4)
    records = []
    for _ in range(600):
        offset = rng.choice((-300, 60, 540))
        reward = float(rng.random() < 0.2)
        records.append(({"utc_offset_min": offset}, reward, 0.1 + 0.003 * reward * (offset + 301) / 841
                        + 0.002 * rng.random()))
    report = fairness_check(records, timezone_segment)
    for seg, s in report["segments"].items():
        mine = [(r, sc) for x, r, sc in records if timezone_segment(x) == seg]
        rewards, scores = [r for r, _ in mine], [sc for _, sc in mine]
        assert (s["n"], s["positives"]) == (len(mine), sum(r >= 0.5 for r in rewards))
        assert s["roc_auc"] == pytest.approx(_auc(rewards, scores), abs=1e-12)


def test_segments_read_a_logged_value_of_another_type_as_not_given() -> None:
    """A decision from another publisher may log `utc_offset_min` as text ("+01:00") or
    `seconds_since_active` as one: comparing them with numbers raised a TypeError, and every
    `register` and `evaluate` failed (a 500) while one such decision was among the newest rewarded.
    A bool is no offset (True read as +00:01, EMEA), and a text `is_new_user` ("false") no flag."""
    from app import evaluation
    from models.validation import tenure_segment

    assert timezone_segment({"utc_offset_min": "+01:00"}) == "unknown"
    assert timezone_segment({"utc_offset_min": True}) == "unknown"
    assert timezone_segment({"utc_offset_min": 60.0}) == "emea"
    assert tenure_segment({"seconds_since_active": "long"}) == "new"
    assert tenure_segment({"is_new_user": "false", "seconds_since_active": 60}) == "established"
    assert tenure_segment({"is_new_user": False, "seconds_since_active": 9e6}) == "established"
    assert tenure_segment({"is_new_user": 1, "seconds_since_active": 60}) == "new"
    decision = {"id": "x", "ts": "2026-11-26T09:00:00+01:00",
                "features": {"utc_offset_min": "+01:00", "seconds_since_active": "long"},
                "ranked": [{"tip_id": "a", "score": 0.5, "propensity": 1.0}]}
    _, card = evaluation.evaluate({}, evaluation.rewarded_log([(decision, {"a": 1.0})], 10))
    assert card.fairness["timezone"]["segments"]["unknown"]["n"] == 1
    assert card.fairness["tenure"]["segments"]["new"]["n"] == 1


def test_progressive_validation_leaves_out_what_the_learner_skips() -> None:
    """The learner skips an example with a number beyond +-1e9 (a decision from another publisher
    may carry one: /score refuses them). A card predicted it all the same: over scaled inputs with a
    small spread, +-1e308 made the score NaN, and every `register` and `evaluate` was refused as "the
    model overflowed" while that decision was among the newest rewarded."""
    from app import evaluation
    from models.reward import TipModel
    from models.validation import progressive_validation

    rng = random.Random(0)
    decisions = [({"id": f"x{i}", "ts": "2026-11-26T09:00:00+01:00",
                   "features": {"len": 1.0 + rng.random() * 1e-6, "width": 1.0 + rng.random() * 1e-6},
                   "ranked": [{"tip_id": "a", "score": 0.5, "propensity": 1.0}]}, {"a": rng.choice([0.0, 1.0])})
                 for i in range(200)]
    decisions.insert(100, ({**decisions[0][0], "id": "big", "features": {"len": 1e308, "width": -1e308}}, {"a": 1.0}))
    model, card = evaluation.evaluate({}, evaluation.rewarded_log(decisions, 1000))
    assert card.offline_metrics["n"] == 200 and card.offline_metrics["skipped"] == 1
    assert model.n_learned == 200 and model.n_skipped == 0, "left out, as the learner leaves it out"
    assert "skipped" not in progressive_validation(TipModel(), [({"len": 1e9}, 1.0)]), "at the bound: used"


def test_a_step_that_overflows_in_river_is_diverged_not_an_error_of_its_own() -> None:
    """An l2 of 1e308 overflows in River's own arithmetic (an OverflowError) before any score is
    NaN: a registration or evaluation was a bare 500, where the model that scored NaN was a 422."""
    from app import evaluation
    from models.validation import Diverged

    examples = [({"tip_id": "a", "len": 2.0}, 1.0), ({"tip_id": "b", "len": 3.0}, 0.0)] * 3
    with pytest.raises(Diverged, match="overflowed"):
        evaluation.evaluate({"l2": 1e308}, examples)


def test_a_diverging_factorisation_machine_is_refused_without_numpy_warnings() -> None:
    """Its overflows were numpy RuntimeWarnings on the service's stderr, lines that told the operator
    nothing the 422 naming params does not."""
    import warnings

    from app import evaluation
    from models.validation import Diverged

    examples = [({"tip_id": "a", "len": 2.0, "category": "x"}, 1.0), ({"tip_id": "b", "len": 3.0, "category": "y"}, 0.0)]
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Diverged, match="scored nan"):
        warnings.simplefilter("always")
        evaluation.evaluate({"kind": "fm", "learning_rate": 1e10}, examples * 20)
    assert [str(w.message) for w in caught] == []
