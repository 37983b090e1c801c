"""Model cards from the decision log: progressive validation and fairness across user segments.

The log is `tip_scores`: each rewarded decision gives one (features as served, reward)
example per credited tip, in decision order, the tips of a decision in the order their
rewards came. A version's configuration is evaluated by training a fresh model of it over
that log, predicting each decision with only the rewards that had arrived (`rewarded_at`)
when it was served, and learning rewards in order of arrival (River's delayed progressive
validation, a decision at a time); the records then feed `fairness_check` by tenure (new vs
established users) and by time-zone region (from the logged `utc_offset_min`). A version
that has served or shadowed also gets `policy_value`: the reward its own choices would have
earned, estimated off-policy from the logged propensities.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Engine, Select, Text, cast, select

from app import db
from app.decision_ids import decision_time_ms
from app.decisions import learning_input
from models import offpolicy
from models.policy import ThompsonSampling
from models.registry import SOFT_REWARDS_LEARNED, ModelCard
from models.reward import TipModel
from models.validation import (
    Diverged,
    Example,
    Record,
    fairness_check,
    progressive_validation,
    tenure_segment,
    timezone_segment,
)

# The logged decision and its rewards by tip; as read from `tip_scores`, also when its last
# reward arrived (`rewarded_at`).
Decision = tuple[dict[str, Any], dict[str, float]] | tuple[dict[str, Any], dict[str, float], datetime | None]


def rewarded_query(limit: int) -> Select:
    """The newest `limit` decisions that earned any reward, newest first: read off the index of the rewarded rows
    (`ix_tip_scores_rewarded`, 0010), in its order; its condition is the index's. The rewards as their text, decoded
    row by row (`rewarded_decisions`), and the decision's id, to name a row that cannot be."""
    table = db.tip_scores
    return (select(table.c.decision, cast(table.c.rewards, Text), table.c.rewarded_at, table.c.decision_id)
            .where(db.tip_scores_rewarded)
            .order_by(table.c.created_at.desc(), table.c.decision_id.desc()).limit(limit))


@dataclass(frozen=True, slots=True)
class LogRead:
    """The rewarded decisions read (`rewarded_decisions`), and of the rows read, how many could not be decoded
    (left out) and the first of them: its decision id and why."""

    decisions: list[Decision]
    damaged: int = 0
    first_damaged: tuple[str, str] | None = None


def rewarded_decisions(engine: Engine, limit: int) -> LogRead:
    """The newest `limit` decisions that earned any reward, oldest first. A row whose decision or rewards cannot be
    decoded (cut short, or overwritten by hand or by a disk fault) is left out and counted: decoded all at once,
    one failed every card and every registration with a JSONDecodeError (or KeyError, ...) naming no row. A rebuild
    from the log writes such rows again."""
    with engine.connect() as conn:
        rows = conn.execute(rewarded_query(limit)).all()
    decisions: list[Decision] = []
    damaged, first = 0, None
    for text, rewards, rewarded, decision_id in reversed(rows):
        decoded, why = _decoded_row(text, rewards)
        if decoded is None:
            damaged += 1
            first = first or (decision_id, why)
        else:
            decisions.append((*decoded, rewarded))
    return LogRead(decisions, damaged, first)


def _decoded_row(decision: str | None, rewards: str | None) -> tuple[Any, str]:
    """A row's decision and rewards decoded from their text, or None and why they cannot be. PostgreSQL keeps only
    JSON in the rewards' column, but not only this shape.

    >>> _decoded_row('{"id": "d-1", "ranked": []}', '{"t-1": 1.0}')
    (({'id': 'd-1', 'ranked': []}, {'t-1': 1.0}), '')
    >>> _decoded_row('{"id": "d-1", "ran', '{"t-1": 1.0}')
    (None, 'its decision: JSONDecodeError: unexpected end of data: line 1 column 19 (char 18)')
    >>> _decoded_row('{"id": "d-1"}', '"overwritten"')
    (None, "its rewards: not an object of rewards by tip: 'overwritten'")
    """
    try:
        body = orjson.loads(decision or b"")
    except orjson.JSONDecodeError as error:
        return None, f"its decision: {type(error).__name__}: {error}"
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return None, f"its decision: not a decision: {decision!r:.60}"
    try:
        by_tip = orjson.loads(rewards) if rewards is not None else {}
    except orjson.JSONDecodeError as error:
        return None, f"its rewards: {type(error).__name__}: {error}"
    if by_tip is None:
        by_tip = {}
    if not isinstance(by_tip, dict) or not all(isinstance(value, int | float) for value in by_tip.values()):
        return None, f"its rewards: not an object of rewards by tip: {by_tip!r:.60}"
    return (body, by_tip), ""


@dataclass(frozen=True, slots=True)
class TrainedOn:
    """Which rewards a model trained on the log has seen: the (decision, tip) pairs read, and, when
    the read stopped at its limit, the creation time (ms, by its id) of the oldest decision in it
    (older rewards were left out on purpose)."""

    credits: frozenset[tuple[str, str]]
    from_ms: int | None
    # The first row of the read that could not be decoded (`LogRead.first_damaged`), for the service to log: the
    # evaluation process has no log of its own.
    first_damaged: tuple[str, str] | None = None


def trained_on(decisions: list[Decision], limit: int, first_damaged: tuple[str, str] | None = None) -> TrainedOn:
    """What a model trained on `decisions` (`rewarded_decisions(..., limit)`) has seen; `limit` less the rows
    left out as damaged, which the read counted.

    Every reward read counts, also those `rewarded_log` cut (more than `limit` examples: the oldest go):
    left out on purpose, as those older than the read are (`from_ms`), a registration must not learn them
    from the join cache (`JoinCache.unseen_rewards`) after the newer ones, out of their order.

    >>> read = [({"id": "d-019c5e8a2b10" + "0" * 16}, {"a": 1.0})]
    >>> trained_on(read, limit=10).from_ms is None, len(trained_on(read, limit=10).credits)
    (True, 1)
    >>> trained_on(read, limit=1).from_ms  # the read was cut: older rewards were left out
    1771112639248
    """
    credits = frozenset((decision["id"], tip) for decision, rewards, *_ in decisions for tip in rewards)
    if len(decisions) < limit:
        return TrainedOn(credits, None, first_damaged)
    created = [t for decision, *_ in decisions if (t := decision_time_ms(decision["id"])) is not None]
    return TrainedOn(credits, min(created) if created else None, first_damaged)


def rewarded_log(decisions: list[Decision], limit: int) -> list[Example]:
    """The newest `limit` examples of `decisions`, oldest first, each keyed by its decision's
    place in the list, so that progressive validation predicts a decision's tips before
    learning any of them.

    Read from `tip_scores` (`rewarded_decisions`), with `rewarded_at`, an example also carries
    when its decision was served and when its reward arrived (seconds since the epoch), so that
    progressive validation predicts each decision with only the rewards that had arrived by
    then, and the examples go in the order served. Served: the time in our decision ids, the
    service's clock (the logged `ts` is the caller's `context.now` when given, a backfill's
    past); else the logged `ts`. `rewarded_at` is when JetStream stored the feedback. A row keeps one
    `rewarded_at`, its last reward's: each of its tips is taken to arrive then, which may learn
    an earlier reaction later than the service did, never sooner. Without `rewarded_at`, the
    rewards arrive when their decision was served (learned right after it is predicted).

    >>> decision = {"features": {"hour_of_day": 9}, "ranked": [{"tip_id": "a"}, {"tip_id": "b"}]}
    >>> rewarded_log([(decision, {"b": 1.0, "a": 0.0}), (decision, {"a": 1.0})], 10)
    [({'hour_of_day': 9, 'tip_id': 'b'}, 1.0, 0), ({'hour_of_day': 9, 'tip_id': 'a'}, 0.0, 0), ({'hour_of_day': 9, 'tip_id': 'a'}, 1.0, 1)]
    >>> at_8 = {**decision, "ts": "2026-11-26T09:00:00+01:00"}
    >>> rewarded_log([(at_8, {"a": 1.0}, None), (at_8, {"b": 0.0}, datetime(2026, 11, 26, 9, tzinfo=UTC))], 10)
    [({'hour_of_day': 9, 'tip_id': 'a'}, 1.0, 0, 1795680000.0, 1795680000.0), ({'hour_of_day': 9, 'tip_id': 'b'}, 0.0, 1, 1795680000.0, 1795683600.0)]
    """
    return card_slice(decisions, limit)[0]


def card_slice(decisions: list[Decision], limit: int) -> tuple[list[Example], list[Decision]]:
    """`rewarded_log(decisions, limit)`, and the decisions it reaches back to: those from the first of its
    examples' on, in the order served. A card's policy value is computed over these, so that it and the
    offline metrics read the same stretch of the log: over all of `decisions` it reached further back, when
    decisions with several rewards gave more than `limit` examples and the oldest were cut.

    >>> decision = {"features": {}, "ranked": [{"tip_id": "a"}, {"tip_id": "b"}]}
    >>> logged = [({**decision, "n": i}, {"a": 1.0, "b": 0.0}) for i in range(3)]
    >>> examples, reached = card_slice(logged, 3)
    >>> len(examples), [d["n"] for d, _ in reached]  # the first decision's rewards were cut: it is not in
    (3, [1, 2])
    """
    examples: list[Example] = []
    order: list[Decision] = []
    timed: list[tuple[float, int, Decision]] = []
    for key, logged in enumerate(decisions):
        served = _served_s(logged[0]) if len(logged) > 2 else None
        if served is not None:
            timed.append((served, key, logged))
        else:  # untimed: in the order given, learned right after it is predicted
            order.append(logged)
            examples.extend((x, reward, key) for x, reward in examples_of(logged[0], logged[1]))
    # In the order served. The query's, `created_at`, is the logged `ts`: the caller's clock when
    # it gave `context.now`, and SQLite keeps its wall time without the offset.
    timed.sort(key=lambda item: item[:2])
    for served, key, logged in timed:
        decision, rewards, *rest = logged
        order.append(logged)
        arrived = _seconds(rest[0]) if rest and rest[0] is not None else served
        examples.extend((x, reward, key, served, arrived) for x, reward in examples_of(decision, rewards))
    if len(examples) <= limit:
        return examples, order
    kept = examples[-limit:]
    # Where its oldest example's decision is in `order`: keys are places in `decisions`, not in `order`.
    place = {id(logged): i for i, logged in enumerate(order)}
    first = place[id(decisions[kept[0][2]])]
    return kept, order[first:]


def _served_s(decision: Mapping[str, Any]) -> float | None:
    """When the service served `decision`, in seconds since the epoch (None: it does not say)."""
    ms = decision_time_ms(decision["id"]) if isinstance(decision.get("id"), str) else None
    if ms is not None:
        return ms / 1000
    try:
        return _seconds(datetime.fromisoformat(decision["ts"]))
    except (KeyError, TypeError, ValueError):
        return None


def _seconds(at: datetime) -> float:
    """Seconds since the epoch; a time without a zone (SQLite gives them back so) is UTC, as stored."""
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


def examples_of(decision: Mapping[str, Any], rewards: Mapping[str, float]) -> Iterator[tuple[dict[str, Any], float]]:
    """(features as served, reward) of each credited tip, in the order the rewards came."""
    by_tip = {c["tip_id"]: c for c in decision["ranked"]}
    for tip_id, reward in rewards.items():
        candidate = by_tip.get(tip_id)
        if candidate is not None:
            yield learning_input(decision["features"], candidate), float(reward)


def policy_value(decisions: list[Decision], version: str, silence_reward: float | None = None) -> dict[str, Any]:
    """What `version` would have earned without exploration, estimated from the logged
    propensities (`models.offpolicy`), beside what the served policy earned.

    The reward of a decision is that of the tip served first (0 when only other tips got a
    reaction); decisions nobody reacted to are not counted, as the learner does not learn from
    silence. With `silence_reward` (`TIPSTREAM_SILENCE_REWARD`) they are, at that reward (their rows
    hold it), and a first tip left alone while another got a reaction counts at it too: at 0, such a
    decision counted below one nobody reacted to, and below itself had that reaction come after the
    wait (the silence is learned first then, `SilenceLearning.release`). As shadow, the version's choice is its logged first tip, compared with the
    champion's best on the same decisions; as champion, its best-scored tip.

    Ties: the champion without exploration puts the first of equal scores in the caller's
    order first, which the served order does not show (it moves an explored tip to the front).
    Ties are common: every tip nobody has reacted to scores the base rate. So a decision logs
    that choice (`greedy`). A decision logged before it did is read as greedy with ties broken
    at random: each of k tips sharing the best score is the choice with probability 1/k, what
    greedy earns on average over the callers' orders. (The shadow's logged first already breaks
    its ties as it would.)

    Every candidate's logged propensity goes to the estimate, which leaves out (and counts, in
    `skipped_unsupported`) the decisions that could not have served the version's choice: an
    answer to `explore: false` is greedy, every tip but its first at propensity 0. The shadow
    and the champion's greedy are compared on the decisions that could have served any tip
    (`full_support`): leaving out only those where the shadow disagreed would keep the greedy
    answers it agreed with, and lean its estimate towards the champion's.

    >>> decision = {"model_version": "v1", "shadow": {"version": "v2", "first": "b"},
    ...             "ranked": [{"tip_id": "a", "score": 0.9, "propensity": 0.95},
    ...                        {"tip_id": "b", "score": 0.1, "propensity": 0.05}]}
    >>> report = policy_value([(decision, {"a": 1.0})], "v2")
    >>> report["as_shadow"]["decisions"], report["as_shadow"]["logged_reward"], report["as_shadow"]["estimate"]["agreed"]
    (1, 1.0, 0)
    >>> report["as_shadow"]["champion_greedy"]["snips"]
    1.0

    Three tips tie, and the explored "c" was served. Greedy would have served the caller's first, "a";
    without that logged, it would have served "c" one time in three.

    >>> tied = {"model_version": "v1", "greedy": "a", "ranked": [
    ...     {"tip_id": t, "score": 0.5, "propensity": p} for t, p in (("c", 0.1), ("a", 0.8), ("b", 0.1))]}
    >>> policy_value([(tied, {"c": 1.0})], "v1")["as_champion"]["greedy"]["agreed"]
    0
    >>> del tied["greedy"]
    >>> greedy = policy_value([(tied, {"c": 1.0})], "v1")["as_champion"]["greedy"]
    >>> greedy["agreed"], round(greedy["ips"], 4)  # one decision, weighed (1/3) / 0.1
    (1, 3.3333)
    >>> policy_value([({**decision, "ranked": [{"tip_id": "a", "score": 0.9, "propensity": 0.0}]}, {})], "v1")
    {'source': 'inverse propensity scoring over the rewarded decision log (tip_scores)', 'skipped_without_propensity': 1}
    """
    as_champion: list[offpolicy.Logged] = []
    as_shadow: list[tuple[offpolicy.Logged, offpolicy.Logged]] = []
    shadow_under_thompson = unusable = 0
    for decision, rewards, *_ in decisions:
        ranked = decision["ranked"]
        served = ranked[0]
        if not offpolicy.weighable(served.get("propensity", 0.0)):
            unusable += 1  # logged without a usable propensity: it can weigh nothing, or nothing finite
            continue
        propensities = {c["tip_id"]: float(c.get("propensity", 0.0)) for c in ranked}
        if decision.get("greedy") in propensities:
            greedy = {decision["greedy"]: 1.0}
        else:
            top = max(c["score"] for c in ranked)
            best = [c["tip_id"] for c in ranked if c["score"] == top]
            greedy = {tip: 1.0 / len(best) for tip in best}
        tip = served["tip_id"]
        reward = float(rewards.get(tip, silence_reward or 0.0))
        logged = (greedy, propensities, tip, reward)
        if decision.get("model_version") == version:
            as_champion.append(logged)
        shadow = decision.get("shadow") or {}
        if shadow.get("version") == version:
            as_shadow.append((logged, ({shadow["first"]: 1.0}, propensities, tip, reward)))
            shadow_under_thompson += decision.get("policy") == ThompsonSampling.name
    report: dict[str, Any] = {"source": "inverse propensity scoring over the rewarded decision log (tip_scores)"}
    if unusable:
        report["skipped_without_propensity"] = unusable
    if as_champion:
        report["as_champion"] = {
            "decisions": len(as_champion),
            "logged_reward": sum(r for *_, r in as_champion) / len(as_champion),
            "greedy": offpolicy.estimate(as_champion).to_dict(),
        }
    if as_shadow:
        report["as_shadow"] = {
            "decisions": len(as_shadow),
            "logged_reward": sum(r for (*_, r), _ in as_shadow) / len(as_shadow),
            "estimate": offpolicy.estimate((own for _, own in as_shadow), full_support=True).to_dict(),
            "champion_greedy": offpolicy.estimate((champion for champion, _ in as_shadow), full_support=True).to_dict(),
            # Its choices the champion and the prior disfavour were served at propensities near 0 there, and its
            # estimate leans towards the champion's beyond its interval (docs/learning.md, "Policy value").
            "served_under_thompson": shadow_under_thompson,
        }
    return report


def evaluate(params: Mapping[str, Any], examples: list[Example], min_n: int = 30,
             soft_labels: bool | None = None) -> tuple[TipModel, ModelCard]:
    """A model trained on `examples` by progressive validation (delayed, when the examples carry
    their times: see `rewarded_log`), and the card's metrics and fairness. `soft_labels`: how it learns a
    reward between 0 and 1 (`TipModel.soft_labels`), that of the version evaluated; None: as a model made
    now does. The card says which (`soft_rewards_learned`).

    >>> examples = [({"tip_id": "a", "utc_offset_min": 60}, 1.0), ({"tip_id": "b", "utc_offset_min": -300}, 0.0)] * 50
    >>> model, card = evaluate({"learning_rate": 0.2}, examples)
    >>> card.offline_metrics["n"], model.n_learned, sorted(card.fairness["timezone"]["segments"])
    (100, 100, ['americas', 'emea'])
    >>> card.offline_metrics["soft_rewards_learned"], evaluate({}, [], soft_labels=False)[1].offline_metrics["soft_rewards_learned"]
    ('in one step, as a soft label', 'as two weighted binary steps')
    """
    model = TipModel(**params)
    if soft_labels is not None:
        model.soft_labels = soft_labels
    records: list[Record] = []
    try:
        # A diverging model is told by its scores, below, and refused by name: numpy's overflow
        # warnings on the way were lines on the service's stderr that told the operator nothing.
        with np.errstate(over="ignore", invalid="ignore"):
            metrics: dict[str, Any] = dict(progressive_validation(model, examples, records=records))
    except ArithmeticError as error:  # River's own step overflowed (l2 1e308): a bare 500 where NaN scores were a 422
        raise Diverged(f"a learning step overflowed ({error}) after {model.n_learned} of the rewards") from None
    metrics["evaluated_at"] = datetime.now(UTC).isoformat()
    metrics["source"] = "progressive validation over the rewarded decision log (tip_scores)"
    # Cards did not say it: one computed before soft labels (its logistic regression learning 0.8 as two weighted
    # steps) read as one computed since (`models.registry.older_metrics`).
    metrics["soft_rewards_learned"] = SOFT_REWARDS_LEARNED[model.soft_labels]
    fairness = {
        "tenure": fairness_check(records, tenure_segment, min_n=min_n),
        "timezone": fairness_check(records, timezone_segment, min_n=min_n),
    }
    return model, ModelCard(inputs=model.describe_inputs(), offline_metrics=metrics, fairness=fairness)
