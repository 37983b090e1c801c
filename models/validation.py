"""Offline evaluation of a reward model over the decision log: progressive validation and fairness.

A version's model card (app/evaluation.py; docs/learning.md, "Model registry") says how a model of
its configuration would have done on the rewards logged: `progressive_validation` replays them
through it, each decision predicted before it is learned, and `fairness_check` compares the same
records across user segments (`tenure_segment`, `timezone_segment`).

Apart from models/reward.py because nothing here serves or learns: it judges a `TipModel` from
outside, and the model never needs it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

from river import metrics, stats

from models.reward import TipModel, check_reward, within_bounds

Record = tuple[Mapping[str, Any], float, float]  # (features as served, reward, score served)


CALIBRATION_BINS = 10


class _RocAuc:
    """Exact ROC AUC: the share of (positive, negative) pairs the scores put in order, a tie
    counting half (Mann-Whitney U / (positives * negatives)). River's `ROCAUC` counts each
    example against `n_thresholds` fixed cut points over [0, 1] instead: every score between
    two of them ties, so a model that ranks perfectly within a narrow band (rewards rare, every
    score near 0.1) read 0.71 at 50 thresholds, not 1. One count per distinct score."""

    def __init__(self) -> None:
        self.counts: dict[float, list[int]] = {}  # score -> [negatives, positives]

    def update(self, positive: bool, score: float) -> None:
        counts = self.counts.get(score)
        if counts is None:
            counts = self.counts[score] = [0, 0]
        counts[positive] += 1

    def get(self) -> float | None:
        below = pairs = positives = 0.0  # pairs: twice the ordered pairs, a tie once
        for score in sorted(self.counts):
            negatives, pos = self.counts[score]
            pairs += pos * (2 * below + negatives)
            below += negatives
            positives += pos
        if not positives or not below:
            return None
        return pairs / (2 * positives * below)


class _Metrics:
    """Log loss (reward-weighted), ROC AUC on reward >= 0.5 (exact, ties count half), mean reward
    and mean score, and the expected calibration error: over `CALIBRATION_BINS` equal-width score
    bins, the mean |mean score - mean reward| weighed by each bin's share of the examples.

    Beside the log loss, `log_loss_base_rate`: that of predicting, for every example, the mean
    reward of those before it ((sum + 1) / (n + 2)), which knows no user and no tip. A log loss of
    0.71 says nothing on its own (soft rewards are not 0 or 1, so even a perfect model's is above
    0); below its base rate's, the model's probabilities are the better.

    >>> m = _Metrics()
    >>> for reward, score in [(1.0, 0.9), (0.0, 0.1)] * 50:
    ...     m.update(reward, score)
    >>> report = m.get()
    >>> round(report["log_loss"], 3), round(report["log_loss_base_rate"], 3)
    (0.105, 0.714)
    """

    def __init__(self) -> None:
        self.log_loss, self.log_loss_base_rate = metrics.LogLoss(), metrics.LogLoss()
        self.auc = _RocAuc()
        self.reward, self.score = stats.Mean(), stats.Mean()
        self.n = self.positives = 0
        # Per bin, sum(score) - sum(reward). The gap between the overall means (what this used to
        # report) reads 0 for a model that says 0.9 to every 0 and 0.1 to every 1.
        self.bin_gap = [0.0] * CALIBRATION_BINS

    def update(self, reward: float, score: float) -> None:
        if not math.isfinite(score):  # a calibration bin of NaN was a bare ValueError
            raise Diverged(f"it scored {score!r} after {self.n} of the rewards")
        # Log loss of a soft label r = r * loss(True) + (1 - r) * loss(False): two weighted updates.
        base_rate = (self.reward.get() * self.n + 1.0) / (self.n + 2.0)
        if reward > 0.0:
            self.log_loss.update(True, score, w=reward)
            self.log_loss_base_rate.update(True, base_rate, w=reward)
        if reward < 1.0:
            self.log_loss.update(False, score, w=1.0 - reward)
            self.log_loss_base_rate.update(False, base_rate, w=1.0 - reward)
        positive = reward >= 0.5
        self.auc.update(positive, score)
        self.reward.update(reward)
        self.score.update(score)
        self.bin_gap[min(max(int(score * CALIBRATION_BINS), 0), CALIBRATION_BINS - 1)] += score - reward
        self.n += 1
        self.positives += positive

    def get(self) -> dict[str, float | None]:
        return {
            "n": self.n,
            "positives": self.positives,  # what ROC AUC ranks against the n - positives negatives
            "log_loss": self.log_loss.get() if self.n else None,
            "log_loss_base_rate": self.log_loss_base_rate.get() if self.n else None,
            "roc_auc": self.auc.get(),  # None with a single class: AUC is undefined
            "mean_reward": self.reward.get() if self.n else None,
            "mean_score": self.score.get() if self.n else None,
            "calibration_error": sum(map(abs, self.bin_gap)) / self.n if self.n else None,
        }


class Diverged(ValueError):
    """A model scored a number that is not finite: its weights overflowed as it learned (a step
    too large for them, such as a learning rate of 1e308)."""


# (features, reward); (features, reward, the key of the decision it is a tip of); or that and
# (when the decision was served, when its reward arrived), both in seconds since the epoch: the
# arrival is also the log time the model learns the reward at (`TipModel.learn_one`'s `at_ms`).
Example = (tuple[Mapping[str, Any], float] | tuple[Mapping[str, Any], float, Hashable]
           | tuple[Mapping[str, Any], float, Hashable, float, float])


def progressive_validation(model: TipModel, stream: Iterable[Example], *,
                           records: list[Record] | None = None) -> dict[str, float | None]:
    """Predict, score, then learn, over a log of (features, reward); River's progressive validation.

    An example may carry a third item, the key of its decision: consecutive examples with the
    same key are the rewarded tips of one decision, all predicted before any is learned (then
    learned in stream order). They share the user and the features as served, so learning one
    tip's reaction before predicting the next would score the model with what was not known
    when the decision was made. An example without a key stands alone.

    Rewards come late: a user reacts minutes or hours after being served, and may be served
    again meanwhile. An example may then also carry when its decision was served and when its
    reward arrived (a fourth and fifth item; the stream in the order served): each decision is
    predicted with only the rewards that had arrived by then (at or before its time), and a
    reward is learned in order of arrival (ties: in stream order), as the service learned it, and
    at that time (`learn_one`'s `at_ms`), so the model forgets users who left as the service's did.
    This is River's delayed progressive validation (`river.evaluate.progressive_val_score` with
    `moment` and `delay`), as an event-time merge: O(n log n). Learning each reward right after
    its decision instead scores the model with what it could not have known when it served.
    Without the times, a decision's rewards are learned right after it is predicted. Rewards
    still waiting at the end of the stream are learned then, so `model` learns every example
    but those with a number beyond `INPUT_BOUND`, which `TipModel.learn_one` would skip: they are
    neither predicted nor learned, and the report counts them in `skipped` (absent when none).

    `model` learns from the stream (pass `model.clone()` to keep a model untouched). When
    `records` is a list, (x, reward, prediction) triples are appended to it for
    `fairness_check`. ROC AUC is exact, ties counting half (not River's thresholded `ROCAUC`).

    >>> stream = [({"tip_id": "a"}, 1.0), ({"tip_id": "b"}, 0.0)] * 200
    >>> report = progressive_validation(TipModel(learning_rate=0.2), stream)
    >>> report["n"], report["roc_auc"] > 0.95, report["log_loss"] < 0.3, round(report["mean_reward"], 6)
    (400, True, True, 0.5)

    The user's one reaction to both tips of a decision: keyed, the second is not predicted from the first.

    >>> x = {"user_id": "u-1", "tip_id": "a"}
    >>> records = []
    >>> _ = progressive_validation(TipModel(), [(x, 1.0, "d-1"), ({**x, "tip_id": "b"}, 1.0, "d-1")], records=records)
    >>> [score for _, _, score in records]
    [0.5, 0.5]

    Served at 0 and at 10, the first decision's reward arrived at 60: the second is predicted
    without it. Had it arrived at 10, the second would have been predicted with it.

    >>> records = []
    >>> _ = progressive_validation(TipModel(), [(x, 1.0, "d-1", 0, 60), (x, 1.0, "d-2", 10, 70)], records=records)
    >>> [score for _, _, score in records]
    [0.5, 0.5]
    >>> records = []
    >>> _ = progressive_validation(TipModel(), [(x, 1.0, "d-1", 0, 10), (x, 1.0, "d-2", 10, 70)], records=records)
    >>> records[1][2] > 0.5
    True
    """
    m = _Metrics()
    arrivals: list[tuple[float, int, Mapping[str, Any], float]] = []  # a heap: rewards not learned yet
    order = skipped = 0
    for run, served in _by_decision(stream):
        while arrivals and served is not None and arrivals[0][0] <= served:
            arrived, _, x, reward = heapq.heappop(arrivals)
            model.learn_one(x, reward, round(arrived * 1000))
        # Left out as the learner leaves it out (`TipModel.learn_one`): predicted, a number past the
        # bound (+-1e308 from another publisher) made the score NaN, and the card "diverged".
        decision = [example for example in run if within_bounds(example[0])]
        skipped += len(run) - len(decision)
        scores = [model.predict_one(x) for x, _, _ in decision]
        for (x, reward, arrived), score in zip(decision, scores):
            m.update(reward, score)
            if records is not None:
                records.append((x, reward, score))
            if arrived is None:
                model.learn_one(x, reward)
            else:
                heapq.heappush(arrivals, (arrived, order, x, reward))
                order += 1
    while arrivals:
        arrived, _, x, reward = heapq.heappop(arrivals)
        model.learn_one(x, reward, round(arrived * 1000))
    report = m.get()
    if skipped:
        report["skipped"] = skipped
    return report


def _by_decision(stream: Iterable[Example]) -> Iterator[tuple[list[tuple[Mapping[str, Any], float, float | None]],
                                                              float | None]]:
    """Runs of consecutive examples with one decision key, as (x, reward, arrived) with rewards
    checked, and when the run's decision was served (None: untimed)."""
    run: list[tuple[Mapping[str, Any], float, float | None]] = []
    key: Hashable = None
    served: float | None = None
    for example in stream:
        this = example[2] if len(example) > 2 else None
        if run and (this is None or this != key):
            yield run, served
            run = []
        timed = len(example) > 4
        if not run:
            served = float(example[3]) if timed else None  # type: ignore[misc]
        arrived = float(example[4]) if timed else None  # type: ignore[misc]
        run.append((example[0], check_reward(example[1]), arrived))
        key = this
    if run:
        yield run, served


# A segment's ROC AUC takes part in a fairness gap only with at least this many positives (reward
# >= 0.5) and this many negatives. AUC ranks each positive against each negative: over 30 records
# with 1 positive it is where one example falls, 0 or 1 by chance (a random scorer's AUC has a
# standard deviation of ~0.30 there), and such a segment was named the worst. With 10 of each,
# ~0.13; the floor trades that noise against leaving small segments out.
MIN_CLASS_N = 10
# Fewer records than this are reported but not compared in a fairness check: noise.
MIN_RECORDS = 30


def too_few(metrics: Mapping[str, Any]) -> str | None:
    """Why a card's overall metrics are too few to read, by the floors the fairness check holds a
    segment to, or None. The card printed ROC AUC 0.5 and calibration error 0 over 4 rewards (2
    positives) without a word, while it left a segment of 29 out of every gap.

    >>> too_few({"n": 4, "positives": 2})
    '4 rewards (the fairness check compares at least 30); ROC AUC from 2 positives and 2 negatives (it needs 10 of each)'
    >>> too_few({"n": 500, "positives": 497}), too_few({"n": 500, "positives": 250}), too_few({"n": 0})
    ('ROC AUC from 497 positives and 3 negatives (it needs 10 of each)', None, None)
    """
    n, positives = _number(metrics.get("n")), _number(metrics.get("positives"))
    if not n:
        return None
    reasons = []
    if n < MIN_RECORDS:
        reasons.append(f"{_count(int(n), 'reward')} (the fairness check compares at least {MIN_RECORDS})")
    if positives is not None and min(positives, n - positives) < MIN_CLASS_N:  # cards made before: unknown
        reasons.append(f"ROC AUC from {_count(int(positives), 'positive')} and {_count(int(n - positives), 'negative')} "
                       f"(it needs {MIN_CLASS_N} of each)")
    return "; ".join(reasons) or None


def fairness_check(records: Iterable[Record], segment_fn: Callable[[Mapping[str, Any]], str], *,
                   min_n: int = MIN_RECORDS, min_class: int = MIN_CLASS_N) -> dict[str, Any]:
    """Metrics per user segment and the largest gap between segments.

    `records` are (features as served, reward, score served), e.g. from the decision log or
    `progressive_validation(..., records=...)`. Gaps only compare segments with at least
    `min_n` records (smaller ones are reported but would be noise), and the ROC AUC gap only
    those of them with at least `min_class` positives and `min_class` negatives
    (`MIN_CLASS_N`); `auc_left_out` says, for each segment compared otherwise, why its AUC is
    not. Each segment reports its `positives` beside `n`.

    >>> recs = [({"seconds_since_active": 60}, 1.0, 0.9), ({"seconds_since_active": 60}, 0.0, 0.2),
    ...         ({"seconds_since_active": 9e6}, 1.0, 0.5), ({"seconds_since_active": 9e6}, 0.0, 0.5)]
    >>> report = fairness_check(recs, tenure_segment, min_n=1, min_class=1)
    >>> sorted(report["segments"]), report["max_gap"]["roc_auc"], report["worst"]["roc_auc"]
    (['established', 'new'], 0.5, 'new')
    >>> report = fairness_check(recs, tenure_segment, min_n=1)
    >>> report["max_gap"]["roc_auc"], report["max_gap"]["log_loss"] > 0, report["auc_left_out"]["new"]
    (None, True, '1 positive and 1 negative: ROC AUC needs 10 of each')
    """
    per: dict[str, _Metrics] = {}
    for x, reward, score in records:
        seg = segment_fn(x)
        m = per.get(seg)
        if m is None:
            m = per[seg] = _Metrics()
        m.update(float(reward), float(score))
    segments = {seg: m.get() for seg, m in sorted(per.items())}
    compared = [seg for seg, s in segments.items() if s["n"] >= min_n]
    auc_left_out: dict[str, str] = {}
    for seg in compared:
        positives, negatives = segments[seg]["positives"], segments[seg]["n"] - segments[seg]["positives"]
        if min(positives, negatives) < min_class:
            auc_left_out[seg] = (f"{_count(positives, 'positive')} and {_count(negatives, 'negative')}: "
                                 f"ROC AUC needs {min_class} of each")
    gaps: dict[str, float | None] = {}
    worst: dict[str, str | None] = {}
    # For each metric, which direction is "worse" decides the segment named in `worst`.
    for metric, higher_is_better in (("roc_auc", True), ("log_loss", False), ("calibration_error", False),
                                      ("mean_reward", True)):
        values = {seg: segments[seg][metric] for seg in compared if segments[seg][metric] is not None
                  and not (metric == "roc_auc" and seg in auc_left_out)}
        if len(values) < 2:
            gaps[metric], worst[metric] = None, None
            continue
        gaps[metric] = max(values.values()) - min(values.values())
        worst[metric] = (min if higher_is_better else max)(values, key=values.__getitem__)
    return {"segments": segments, "compared": compared, "max_gap": gaps, "worst": worst, "min_n": min_n,
            "min_class": min_class, "auc_left_out": auc_left_out}


def _count(n: int, noun: str) -> str:
    # As streams.log_throttle.counted, but for its thousands' mark: models/ imports nothing of streams/ or app/.
    return f"{n} {noun}" + ("" if n == 1 else "s")


NEW_USER_AFTER_S = 7 * 86_400.0


def tenure_segment(x: Mapping[str, Any], inactive_s: float = NEW_USER_AFTER_S) -> str:
    """"new" or "established": the `is_new_user` flag when logged, else no signal for
    `inactive_s` (a new user's `seconds_since_active` is its 30-day fallback; a long-lapsed
    user looks the same, which is acceptable for this check).

    >>> tenure_segment({"is_new_user": True}), tenure_segment({"seconds_since_active": 120.0})
    ('new', 'established')
    """
    flag = x.get("is_new_user")
    if type(flag) is bool or _number(flag) is not None:  # another publisher's 0 / 1 too, not its text
        return "new" if flag else "established"
    since = _number(x.get("seconds_since_active"))
    return "new" if since is None or since >= inactive_s else "established"


def _number(value: Any) -> float | None:
    """A logged number, or None for anything else: a decision from another publisher may log text
    where /score logs a number ("+01:00" for an offset), and comparing it with one raised a
    TypeError that failed every card (register, evaluate) while the decision was among the newest."""
    return value if type(value) is int or type(value) is float else None


def timezone_segment(x: Mapping[str, Any]) -> str:
    """Time-zone region from a logged `utc_offset_min`: americas, emea, apac, or unknown.

    >>> [timezone_segment({"utc_offset_min": m}) for m in (-300, 60, 540)], timezone_segment({})
    (['americas', 'emea', 'apac'], 'unknown')

    By the offset logged with each decision, so a zone whose clocks change across a bound changes
    region with them: Greenland's (America/Nuuk, -2:00 in winter, -1:00 in summer since 2024) is
    americas in winter and emea in summer, -1:00 being Cape Verde's and the Azores' winter too.

    >>> timezone_segment({"utc_offset_min": -120}), timezone_segment({"utc_offset_min": -60})
    ('americas', 'emea')
    """
    offset = _number(x.get("utc_offset_min"))
    if offset is None:
        return "unknown"
    if offset < -600:  # west of Hawaii: Niue, American Samoa
        return "apac"
    if offset <= -120:  # to Newfoundland in summer (-2:30) and Greenland in winter (-2:00); the Azores are -1:00
        return "americas"
    return "emea" if offset < 300 else "apac"
