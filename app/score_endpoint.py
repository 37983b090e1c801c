"""POST /score over HTTP: a plain ASGI app in Starlette's router, around `scoring.Scorer`.

Starlette wraps a function endpoint in a `Request`, an exception handler and a `Response`.
In one Starlette app called in-process, a function endpoint returning a small JSON body cost
101,000 instructions a request and a raw ASGI route answering the same bytes 60,000
(callgrind). For /score the difference is ~25,000, 4% of a 10-candidate request:
`bench/score_cost.py` under callgrind, 1,300 against 300 requests, two runs each, counted
639-646k instructions a request before and 614-620k after. So this endpoint reads the ASGI
messages and writes its answer itself. It still goes through Starlette's middleware, its
router and its 500 handler, and its `post` method carries the OpenAPI description.

Steps:
1. Refuse a body not declared `application/json` (415) or declared larger than
   `TIPSTREAM_SCORE_MAX_BODY_BYTES` (413), and a query string (422: the request is the body).
   Read it straight from the ASGI messages, refusing more than that bound (413) before reading
   it all. A refusal drops the rest of the body first (up to `request_body.DRAIN_MAX_BYTES`), so
   that the client reads the answer, not the reset of a connection closed with bytes unread.
2. While `TIPSTREAM_MAX_UNWRITTEN_DECISIONS` decisions' rows wait for a checkpoint (the
   database is away), answer 503 with `Retry-After`: serving on would hold ever more of them.
3. Validate and score (`score_request.parse_request`, `Scorer.score`); a bad request is a 422
   naming the field, and nothing is logged. A user whose state is in the checkpoint only (cold
   after a restart, or let go of while idle) is read first, in a worker thread (`app/thaw.py`);
   if the database does not answer, a 503 with `Retry-After`.
4. Queue the decision for the log without waiting for JetStream; when the queue stays full,
   answer 503 with `Retry-After`, and nothing was served. So too when the user was forgotten
   while it waited for room: it was made with the state the forget dropped.
5. Hand the decision to the learner's join cache, then answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

from app.decision_publisher import DecisionLogFull, DecisionTooLarge, DecisionWithdrawn
from app.decisions import SUBJECT_SCORE
from app.learning_metrics import SCORE_REQUESTS, SCORE_SECONDS
from app.request_body import ClientGone, Receive, drain, read_body
from app.score_request import RequestError, parse_request
from app.thaw import load_state
from streams.store import StateUnavailable

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_ANSWERED = SCORE_REQUESTS.labels("200")
# Every status /score answers, at 0 from the start: `increase()` of a series that first appears at its
# first count is 0, so an alert on 503s missed the burst that made the series.
for _status in ("413", "415", "422", "503"):
    SCORE_REQUESTS.labels(_status)
_JSON = (b"content-type", b"application/json")
# A user not in memory (cold after a restart, or idle) whose read from the checkpoint failed (`app/thaw.py`).
UNAVAILABLE = {"error": "user_id: this user's state is still to be loaded from the checkpoint, and the database did "
                        "not give it (away, or a table locked: see the warning in the log); try again shortly",
               "field": "user_id"}


def too_large(limit: int) -> dict[str, Any]:
    return {"error": f"body: larger than {limit} bytes (TIPSTREAM_SCORE_MAX_BODY_BYTES)", "field": "body"}


def refusal_by_headers(scope: MutableMapping[str, Any], limit: int) -> tuple[int, dict[str, Any]] | None:
    """The status and answer for a request its headers refuse: a declared length past `limit`
    (413), or a body not declared JSON (415). A body of another media type was read as JSON: a web
    page could have any visitor's browser log decisions here with a plain form or text POST, which
    no CORS preflight stops, as one of `application/json` does."""
    media = b""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                return 413, too_large(limit)
        elif name == b"content-type":
            media = value.partition(b";")[0].strip().lower()
    if media == b"application/json" or media.endswith(b"+json"):
        return None
    given = f"'{media.decode('latin-1')}'" if media else "none"
    return 415, {"error": f"Content-Type: the body must be sent as JSON, with `Content-Type: application/json` "
                          f"(given: {given})", "field": "Content-Type"}


def refusal_by_query(query: bytes) -> tuple[int, dict[str, Any]] | None:
    """A 422 for a query string: /score takes its request in the body only, and `?explore=false`
    was answered as if not given (exploring), where an unknown field of the body is refused."""
    if not query:
        return None
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    name = pairs[0][0] if pairs else ""
    error = RequestError(name or "query", (f"unknown query parameter {name!r}; " if name else "")
                         + 'POST /score takes no query string: its request is the JSON body (e.g. {"explore": false})')
    return 422, error.body()


async def send_json(send: Send, status: int, body: dict[str, Any], *headers: tuple[bytes, bytes]) -> None:
    (_ANSWERED if status == 200 else SCORE_REQUESTS.labels(str(status))).inc()
    payload = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(payload)).encode()), _JSON, *headers]})
    await send({"type": "http.response.body", "body": payload})


class ScoreEndpoint:
    """The ASGI app of `POST /score` (see the module's docstring for the steps)."""

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        service = scope["app"].state.service
        limit = service.settings.score_max_body_bytes
        refused = refusal_by_headers(scope, limit) or refusal_by_query(scope.get("query_string", b""))
        if refused is not None:
            await drain(receive, scope)
            await send_json(send, *refused)
            return
        try:
            body = await read_body(receive, limit)
        except ClientGone:
            return
        if body is None:
            await send_json(send, 413, too_large(limit))
            return
        unwritten = service.decision_log.backlog
        if unwritten >= service.settings.max_unwritten_decisions:
            # Asked for now, not at the next timed checkpoint: a bound under the decisions served in one
            # TIPSTREAM_CHECKPOINT_EVERY_S refused /score for the rest of it while the database answered.
            # Why, as ingest's hold says it: "is the database away?" while it answered and a small bound was the cause.
            because = "no checkpoint has written them yet"
            if service.checkpointer is not None:
                service.checkpointer.wanted()
                because = service.checkpointer.behind_because()
            await send_json(send, 503, {
                "error": f"{unwritten} decisions wait for a checkpoint to write their tip_scores rows ({because}); "
                         "/score answers again once they are written (TIPSTREAM_MAX_UNWRITTEN_DECISIONS)",
                "field": None}, (b"retry-after", b"5"))
            return
        started = time.perf_counter()
        try:
            request, scorer = parse_request(body), service.scorer
            if scorer.store.in_checkpoint_only(request.user_id):
                await load_state(scorer.store, request.user_id)
                started = time.perf_counter()
            scored = scorer.score(request)
        except RequestError as error:
            await send_json(send, 422, error.body())
            return
        except StateUnavailable:
            await send_json(send, 503, UNAVAILABLE, (b"retry-after", b"5"))
            return
        SCORE_SECONDS.observe(time.perf_counter() - started)
        publisher = service.publisher
        if not publisher.offer(SUBJECT_SCORE, scored.decision_id, scored.payload):
            try:
                await publisher.put(SUBJECT_SCORE, scored.decision_id, scored.payload,
                                    service.settings.decision_enqueue_timeout_s)
            except DecisionTooLarge as error:  # no wait mends it: a 503 had clients ask again for good
                await send_json(send, 413, {"error": str(error), "field": "candidates"})
                return
            except DecisionLogFull as error:
                await send_json(send, 503, {"error": str(error), "field": None}, (b"retry-after", b"1"))
                return
            except DecisionWithdrawn:
                await send_json(send, 503, {
                    "error": f"user {request.user_id!r} was forgotten while this answer waited for room in the "
                             "decision log; nothing was served: ask again", "field": None}, (b"retry-after", b"1"))
                return
        service.learner.served(scored.decision_id, scored.payload, scored.decision)
        await send_json(send, 200, scored.response)

    async def post(self) -> None:
        """
        requestBody:
          required: true
          content:
            application/json:
              schema: {$ref: '#/components/schemas/ScoreRequest'}
        responses:
          200:
            description: the candidates ranked, first the one to show; the answer is logged as a decision
            content:
              application/json:
                schema: {$ref: '#/components/schemas/ScoreAnswer'}
          413: {description: "the body is larger than TIPSTREAM_SCORE_MAX_BODY_BYTES, or the answer's decision
            larger than the NATS server takes in a message (its max_payload); nothing was served"}
          415: {description: 'the body is not declared JSON: send it with `Content-Type: application/json`'}
          422: {description: 'a bad request: every problem in `errors`; nothing was logged'}
          503:
            description: "the decision log is backed up (JetStream or the database away), or the user's state is
              still to be loaded from the database, which is away, or the user was forgotten while the answer
              waited for room in the decision log; nothing was served"
            headers:
              Retry-After: {schema: {type: integer}, description: seconds}
        """
        raise NotImplementedError("the OpenAPI document reads this docstring; requests go to __call__")
