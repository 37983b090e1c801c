"""Model cards from the decision log: progressive validation and fairness across user segments.

The log is `tip_scores`: each rewarded decision gives one (features as served, reward)
example per credited tip, in decision order. A version's configuration is evaluated by
training a fresh model of it over that log, predicting each example before learning it
(River's progressive validation); the records then feed `fairness_check` by tenure (new vs
established users) and by time-zone region (from the logged `utc_offset_min`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

import orjson
from sqlalchemy import Engine, select

from app import db
from app.decisions import learning_input
from models.registry import ModelCard
from models.reward import Record, TipModel, fairness_check, progressive_validation, tenure_segment, timezone_segment

Example = tuple[dict[str, Any], float]


def rewarded_log(engine: Engine, limit: int) -> list[Example]:
    """The newest `limit` rewarded examples, oldest first."""
    table = db.tip_scores
    query = (select(table.c.decision, table.c.rewards).where(table.c.rewarded_at.is_not(None))
             .order_by(table.c.created_at.desc(), table.c.decision_id.desc()).limit(limit))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    examples: list[Example] = []
    for text, rewards in reversed(rows):
        examples.extend(examples_of(orjson.loads(text), rewards or {}))
    return examples[-limit:]


def examples_of(decision: Mapping[str, Any], rewards: Mapping[str, float]) -> Iterator[Example]:
    by_tip = {c["tip_id"]: c for c in decision["ranked"]}
    for tip_id, reward in rewards.items():
        candidate = by_tip.get(tip_id)
        if candidate is not None:
            yield learning_input(decision["features"], candidate), float(reward)


def evaluate(params: Mapping[str, Any], examples: list[Example], min_n: int = 30) -> tuple[TipModel, ModelCard]:
    """A model trained on `examples` by progressive validation, and the card's metrics and fairness.

    >>> examples = [({"tip_id": "a", "utc_offset_min": 60}, 1.0), ({"tip_id": "b", "utc_offset_min": -300}, 0.0)] * 50
    >>> model, card = evaluate({"learning_rate": 0.2}, examples)
    >>> card.offline_metrics["n"], model.n_learned, sorted(card.fairness["timezone"]["segments"])
    (100, 100, ['americas', 'emea'])
    """
    model = TipModel(**params)
    records: list[Record] = []
    metrics: dict[str, Any] = dict(progressive_validation(model, examples, records=records))
    metrics["evaluated_at"] = datetime.now(timezone.utc).isoformat()
    metrics["source"] = "progressive validation over the rewarded decision log (tip_scores)"
    fairness = {
        "tenure": fairness_check(records, tenure_segment, min_n=min_n),
        "timezone": fairness_check(records, timezone_segment, min_n=min_n),
    }
    return model, ModelCard(inputs=model.describe_inputs(), offline_metrics=metrics, fairness=fairness)
