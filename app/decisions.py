"""The decision log: every /score answer as an event on `decisions.>`, and as a `tip_scores` row.

A decision event (wire contract v1, subject `decisions.score`, header `Nats-Msg-Id` = its id)::

    {"id": "d-0193...", "type": "decision.scored", "v": 1, "ts": "2026-11-26T08:00:00.123+01:00",
     "user_id": "u-42", "model_version": "v1", "shadow_version": "v2", "prompt_version": null,
     "policy": "epsilon_greedy", "explore": true, "features_at": "2026-11-26T08:00:00.100+01:00",
     "features": {"user_id": "u-42", "hour_of_day": 8, ...},        # shared by every candidate
     "caller_features": ["preferred_hour"],                          # filled in from the request
     "ranked": [{"tip_id": "tip-focus-1", "category": "focus", "score": 0.71, "propensity": 0.93,
                 "model_score": 0.74, "shadow_score": 0.55}, ...],  # in the order served
     "shadow": {"version": "v2", "first": "tip-breaks-2"}}

The learner joins feedback with the `features` and the candidate's own fields, so a model
learns from the features as they were served.

>>> payload = encode({"id": "d-1", "type": "decision.scored", "user_id": "u"})
>>> decoded = decode_decision("decisions.score", payload)
>>> decoded.id, decoded.data == payload
('d-1', True)
>>> decode_decision("decisions.score", b'{"id": 7}').kind
'invalid_field'
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from nats.js import JetStreamContext
from sqlalchemy.engine import Connection

from app import db
from app.learning_metrics import DECISION_QUEUE, DECISION_ROWS, DECISIONS
from streams.events import Rejection

log = logging.getLogger("tipstream.decisions")

SUBJECT_SCORE = "decisions.score"
DECISION_TYPE = "decision.scored"
_ID_PREFIX = b'{"id":"'


def new_decision_id() -> str:
    """Time-ordered and unique without coordination: ms since the epoch, then 64 random bits.

    >>> a, b = new_decision_id(), new_decision_id()
    >>> a != b and a.startswith("d-") and len(a) == 30
    True
    """
    return f"d-{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"


def encode(decision: dict[str, Any]) -> bytes:
    """The event's bytes; `id` first, so consumers can read it without parsing the rest."""
    return orjson.dumps(decision)


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision read back from the DECISIONS stream: its id, and its bytes (parsed on demand)."""

    id: str
    data: bytes

    def parsed(self) -> dict[str, Any]:
        return orjson.loads(self.data)


def decode_decision(subject: str, data: bytes) -> LoggedDecision | Rejection:
    """The ingest `decode` for DECISIONS: the id from the first bytes when they are ours, else a full parse."""
    if data.startswith(_ID_PREFIX):
        end = data.find(b'"', len(_ID_PREFIX))
        if 0 < end <= len(_ID_PREFIX) + 128 and b"\\" not in data[len(_ID_PREFIX):end]:
            return LoggedDecision(data[len(_ID_PREFIX):end].decode(), data)
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        return Rejection("invalid_json", f"decision is not valid JSON: {error}")
    if not isinstance(body, dict):
        return Rejection("invalid_json", "a decision must be a JSON object")
    ident = body.get("id")
    if not isinstance(ident, str) or not 1 <= len(ident) <= 128:
        return Rejection("invalid_field", "field 'id' must be a string of 1-128 characters")
    if not isinstance(body.get("ranked"), list) or not isinstance(body.get("features"), dict):
        return Rejection("missing_field", "a decision needs 'ranked' (a list) and 'features' (an object)")
    return LoggedDecision(ident, data)


def candidate_input(tip_id: str, category: str | None, features: dict[str, Any] | None) -> dict[str, Any]:
    """A candidate's own model inputs; /score and the learner both build them here (no skew).

    >>> candidate_input("tip-1", "focus", {"length_s": 30})
    {'tip_id': 'tip-1', 'category': 'focus', 'length_s': 30}
    """
    x: dict[str, Any] = {"tip_id": tip_id}
    if category is not None:
        x["category"] = category
    if features:
        x.update(features)
    return x


def learning_input(shared: dict[str, Any], logged: dict[str, Any]) -> dict[str, Any]:
    """The model input of a logged candidate: the decision's shared features and its own.

    >>> learning_input({"hour_of_day": 8}, {"tip_id": "t", "score": 0.4, "propensity": 1.0})
    {'hour_of_day': 8, 'tip_id': 't'}
    """
    return {**shared, **candidate_input(logged["tip_id"], logged.get("category"), logged.get("features"))}


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def tip_score_row(decision: dict[str, Any], text: str, rewards: dict[str, float] | None,
                  rewarded_at_ms: int | None) -> dict[str, Any]:
    """The `tip_scores` row of a decision (and the rewards credited to it so far)."""
    first = decision["ranked"][0]
    created = datetime.fromisoformat(decision["ts"])
    return {
        "decision_id": decision["id"], "user_id": decision["user_id"], "created_at": created,
        "kind": decision.get("type", DECISION_TYPE).split(".", 1)[-1], "model_version": decision["model_version"],
        "shadow_version": decision.get("shadow_version"), "prompt_version": decision.get("prompt_version"),
        "policy": decision.get("policy", ""), "tip_id": first["tip_id"], "score": first["score"],
        "propensity": first["propensity"], "decision": text, "rewards": rewards or None,
        "reward": (rewards or {}).get(first["tip_id"]),
        "rewarded_at": _utc(rewarded_at_ms) if rewarded_at_ms is not None else None,
    }


class TipScoresLog:
    """Checkpoint participant writing `tip_scores` rows in the checkpoint's transaction.

    Rows are marked (decision logged, reward credited) on the event loop and upserted at the
    next checkpoint, together with the stream positions they reflect. A write that fails is
    retried with the next checkpoint: rows stay here until a save is confirmed (`saved`).
    """

    name = "tip_scores"

    def __init__(self) -> None:
        self.dirty: dict[str, dict[str, Any]] = {}
        self._unconfirmed: dict[int, dict[str, dict[str, Any]]] = {}
        self._confirmed: list[int] = []  # appended from the checkpoint's worker thread
        self._gen = 0

    def mark(self, row: dict[str, Any]) -> None:
        self.dirty[row["decision_id"]] = row

    @property
    def backlog(self) -> int:
        return len(self.dirty) + sum(len(rows) for rows in self._unconfirmed.values())

    def snapshot(self) -> tuple[int, list[dict[str, Any]]] | None:
        while self._confirmed:
            self._unconfirmed.pop(self._confirmed.pop(), None)
        if not self.dirty and not self._unconfirmed:
            return None
        # Checkpoints run one at a time, so older generations still here failed: merge them in
        # (the newest row of a decision wins).
        rows: dict[str, dict[str, Any]] = {}
        for gen in sorted(self._unconfirmed):
            rows.update(self._unconfirmed.pop(gen))
        rows.update(self.dirty)
        self.dirty = {}
        self._gen += 1
        self._unconfirmed[self._gen] = rows
        return self._gen, list(rows.values())

    def write(self, conn: Connection, snapshot: tuple[int, list[dict[str, Any]]] | None) -> None:
        if snapshot is None:
            return
        _, rows = snapshot
        for start in range(0, len(rows), 5_000):
            db.upsert(conn, db.tip_scores, rows[start : start + 5_000], ["decision_id"])

    def saved(self, snapshot: tuple[int, list[dict[str, Any]]]) -> None:
        self._confirmed.append(snapshot[0])
        DECISION_ROWS.inc(len(snapshot[1]))


class DecisionLogFull(Exception):
    """The queue stayed full: JetStream is away or slower than /score."""


class DecisionPublisher:
    """Publishes decisions to JetStream without holding /score up, and never drops one.

    `offer` queues a decision (or says the queue is full: the caller waits with `put`, and
    refuses the request if room does not come). Steps of the drain loop:
    1. Wait for decisions; take up to `batch` of them.
    2. `publish_async` each (`Nats-Msg-Id` = decision id; at most `window` unacknowledged).
    3. Await the batch's acknowledgements, up to `ack_timeout_s`.
    4. Decisions not acknowledged go back to the front of the queue and are published again
       after a backoff; JetStream's duplicate window drops the copies of any that had landed.
    """

    def __init__(self, js: Callable[[], JetStreamContext], *, queue_max: int, batch: int,
                 ack_timeout_s: float = 5.0) -> None:
        self._js, self.queue_max, self.batch, self.ack_timeout_s = js, queue_max, batch, ack_timeout_s
        self.queue: deque[tuple[str, str, bytes]] = deque()  # (subject, decision id, payload)
        self.inflight = 0
        self.published = 0
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> int:
        return len(self.queue) + self.inflight

    def offer(self, subject: str, decision_id: str, payload: bytes) -> bool:
        """Queue a decision; False when the queue is full (nothing was queued)."""
        if len(self.queue) + self.inflight >= self.queue_max:
            self._room.clear()
            return False
        self.queue.append((subject, decision_id, payload))
        self._idle.clear()
        self._work.set()
        return True

    async def put(self, subject: str, decision_id: str, payload: bytes, timeout_s: float) -> None:
        """`offer`, waiting up to `timeout_s` for room; raises DecisionLogFull after that."""
        deadline = time.monotonic() + timeout_s
        while not self.offer(subject, decision_id, payload):
            left = deadline - time.monotonic()
            if left <= 0:
                DECISIONS.labels("refused").inc()
                raise DecisionLogFull(
                    f"{self.waiting} decisions are waiting for JetStream (TIPSTREAM_DECISION_QUEUE_MAX="
                    f"{self.queue_max}); is NATS reachable? Retry shortly.")
            try:
                await asyncio.wait_for(self._room.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued decision is acknowledged; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            log.warning("%d decisions not yet published at shutdown; they were served but are not in the log",
                        self.waiting)
            return False

    def _free(self, count: int) -> None:
        self.inflight -= count
        if len(self.queue) + self.inflight < self.queue_max:
            self._room.set()
        if not self.queue and not self.inflight:
            self._idle.set()
        DECISION_QUEUE.set(self.waiting)

    async def run(self) -> None:
        backoff = 0.1
        while True:
            await self._work.wait()
            if not self.queue:
                self._work.clear()
                continue
            count = min(self.batch, len(self.queue))
            items = [self.queue.popleft() for _ in range(count)]
            self.inflight += count
            failed = await self._publish(items)
            if failed:
                self.queue.extendleft(reversed(failed))
                DECISIONS.labels("retried").inc(len(failed))
            self.published += count - len(failed)
            DECISIONS.labels("published").inc(count - len(failed))
            self._free(count)
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

    async def _publish(self, items: list[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
        """Publish a batch; the items not acknowledged."""
        js = self._js()
        futures: list[asyncio.Future[Any]] = []
        try:
            for subject, decision_id, payload in items:
                futures.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": decision_id}))
            await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), self.ack_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - NATS away, timeouts: retried
            log.warning("publishing %d decisions failed (%s); retrying", len(items), error)
        failed = []
        for i, item in enumerate(items):
            future = futures[i] if i < len(futures) else None
            if future is None or not future.done() or future.cancelled() or future.exception() is not None:
                if future is not None and not future.done():
                    future.cancel()  # releases its slot in the publish window
                failed.append(item)
        return failed
