"""A failure in the service's background work is noticed: never a task or a connection that stops
while the service answers as if all were well (stale features, no learning)."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime
from typing import Any

import nats

from app import ingest
from streams import pull
from streams.jetstream import publish_events
from streams.log_throttle import LogThrottle
from tests.conftest import eventually

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def _signal(event_id: str, user_id: str = "u-1") -> tuple[str, dict[str, Any]]:
    return "signals.app.opened", {"id": event_id, "type": "app.opened", "user_id": user_id,
                                  "ts": NOW.isoformat(), "v": 1, "data": {}}


async def _publish(url: str, *events: tuple[str, dict[str, Any]]) -> None:
    client = await nats.connect(url)
    await publish_events(client.jetstream(), list(events))
    await client.close()


def _raise_once(function: Any, error: Exception) -> Any:
    raised: list[Exception] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        if not raised:
            raised.append(error)
            raise error
        return function(*args, **kwargs)

    once.raised = raised  # type: ignore[attr-defined]
    return once


async def test_a_background_task_that_fails_stops_the_service_with_a_message(
    start_service, nats_server, monkeypatch, caplog
) -> None:
    """A task ended by an exception nothing in it expected (here, once, SIGNALS' ingest loop, outside
    the retries of its fold) was noticed by nobody: the task was held in a list until the stop, whose
    gather took its exception and said nothing. The service answered /readyz 200 and served ever older
    features, its SIGNALS ingest gone. Now the log has the traceback and the service stops with exit
    code 1 (its supervisor starts it again, from the last checkpoint)."""
    running = await start_service()
    service = running.service
    told: list[str] = []
    service.on_fatal = told.append
    await _publish(nats_server.url, _signal("e-1"))
    await eventually(lambda: service.store.applied == 1)

    bug = _raise_once(ingest.delivered_in_turn, RuntimeError("a bug of ours"))
    monkeypatch.setattr(ingest, "delivered_in_turn", bug)
    with caplog.at_level(logging.ERROR, logger="tipstream"):
        await _publish(nats_server.url, _signal("e-2"))
        await eventually(lambda: bug.raised)
        await eventually(lambda: told, timeout=5)
    assert told == [service.fatal]
    assert "ingest SIGNALS" in told[0] and "RuntimeError: a bug of ours" in told[0] and "exit code 1" in told[0]
    assert any(r.exc_info and r.exc_info[1] is bug.raised[0] for r in caplog.records), "the traceback is logged"


async def test_a_bug_in_a_message_handler_does_not_stop_the_connection_reading(
    start_service, nats_server, caplog, monkeypatch
) -> None:
    """nats-py's read loop ends, without a word to the service, on an exception from what a message is
    handed to: here the decision publisher's, as JetStream acknowledges a decision (the learner's
    `published`, raising once). The connection still read as connected, so nothing reconnected for
    minutes (until its pings went unanswered), /readyz said ready, and no event was folded, no
    decision acknowledged meanwhile. The handler's error is logged, and the connection reads on."""
    monkeypatch.setattr(pull, "_HANDLER_FAILURES", LogThrottle())  # told once a minute
    running = await start_service()
    service = running.service
    published = _raise_once(service.publisher.on_published, RuntimeError("a bug of ours"))
    service.publisher.on_published = published
    await _publish(nats_server.url, _signal("e-1"))
    await eventually(lambda: service.store.applied == 1)
    with caplog.at_level(logging.ERROR):
        async with running.http() as http:
            answer = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "tip-focus-1"}]})
            assert answer.status_code == 200, answer.text
        await eventually(lambda: published.raised)
        await _publish(nats_server.url, _signal("e-2"))
        await eventually(lambda: service.store.applied == 2, timeout=10)
    assert service.ready and service.fatal is None
    assert any(r.exc_info and r.exc_info[1] is published.raised[0] for r in caplog.records), "the traceback is logged"
    # The decisions served after it are acknowledged as before.
    async with running.http() as http:
        answer = await http.post("/score", json={"user_id": "u-1", "candidates": [{"tip_id": "tip-focus-1"}]})
        assert answer.status_code == 200, answer.text
    await eventually(lambda: service.publisher.published == 2 and service.publisher.waiting == 0)


async def test_a_pull_request_that_cannot_be_sent_is_told_and_asked_again(start_service, nats_server, caplog) -> None:
    """A message handler asks for more messages in a task of its own. That task was left to the event loop,
    which holds it weakly: what it raised (the publish refused, the connection going) was printed at garbage
    collection as 'Task exception was never retrieved', and the request was never sent. The watchdog that
    then asks again ended for good on the same refusal, and nothing asked for SIGNALS any more."""
    caplog.set_level(logging.INFO, logger="tipstream")
    running = await start_service()
    service = running.service
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        publish = service.nc.publish
        refused: list[str] = []

        async def refuse_once(subject: str, *args: Any, **kwargs: Any) -> None:
            if subject.startswith("$JS.API.CONSUMER.MSG.NEXT.SIGNALS") and len(refused) < 2:  # the watchdog's too
                refused.append(subject)
                raise ConnectionError("the publish refused")
            await publish(subject, *args, **kwargs)

        # The watchdog asks again 2 s past a request's expiry: 0.2 s here, not the service's second.
        next(i for i in service.ingests if i.spec.name == "SIGNALS").puller.expires_s = 0.2
        service.nc.publish = refuse_once
        await eventually(lambda: len(refused) == 2, timeout=10)  # an idle stream's pull request ends, then the watchdog's
        gc.collect()
        await _publish(nats_server.url, _signal("e-1"))
        await eventually(lambda: service.store.applied == 1, timeout=10)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported
    assert "could not ask $JS.API.CONSUMER.MSG.NEXT.SIGNALS" in caplog.text and "the publish refused" in caplog.text
