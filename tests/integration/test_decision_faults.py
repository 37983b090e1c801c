"""The decision log and the learner under faults: rewards learned once, rows that keep them."""

from __future__ import annotations

import httpx
import orjson
import pytest
import sqlalchemy as sa

from app import decision_spool
from tests.conftest import eventually
from tests.e2e.test_learning import BODY, count, feedback, publish


def tip_scores(url: str) -> dict[str, object]:
    """decision id -> its rewards, as written."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select decision_id, rewards from tip_scores")).all()
    finally:
        engine.dispose()
    return {d: orjson.loads(r) if isinstance(r, str) else r for d, r in rows}


@pytest.mark.parametrize("landed", [False, True])
async def test_a_decision_spooled_at_a_stop_keeps_the_reward_it_was_credited(
        start_service, nc, tmp_path, landed: bool) -> None:
    """Feedback can be credited before JetStream acknowledges its decision (the join cache holds it
    from the answer on). When the stop then spools the decision, the next start must rejoin it with
    the credit the learner's snapshot kept: its row carries the reward, and a re-sent reaction is
    not learned a second time. `landed`: the decision had reached the stream after all (its
    acknowledgement lost), so the start also reads it back from DECISIONS."""
    settings = {"checkpoint_every_s": 0.1}
    running = await start_service(**settings)
    js = nc.jetstream()
    await js.delete_stream("DECISIONS")  # JetStream refuses every decision: it stays unpublished
    async with httpx.AsyncClient(base_url=running.base_url) as http:
        decision = (await http.post("/score", json=BODY)).json()["decision_id"]
    await publish(js, feedback("f-1", decision, "tip-focus-1", "acted"))
    await eventually(lambda: running.service.learner.credited == 1)
    learned = running.service.lineup.champion.n_learned
    await running.stop()
    spool = tmp_path / "data" / decision_spool.SPOOL_NAME
    assert spool.exists(), "the stop kept the unpublished decision"
    if landed:  # put in the stream as the refused publish would have
        [(subject, _, payload)] = decision_spool.read(spool)
        await js.add_stream(name="DECISIONS", subjects=["decisions.>"])
        await js.publish(subject, payload, headers={"Nats-Msg-Id": decision})

    again = await start_service(**settings)  # the start creates DECISIONS again
    service = again.service
    await eventually(lambda: service.publisher.published == 1, timeout=20)
    url = service.settings.sqlalchemy_url
    await eventually(lambda: decision in tip_scores(url), timeout=10)
    assert tip_scores(url)[decision] == {"tip-focus-1": 1.0}, "the row keeps the reward learned before the stop"
    duplicates = count("duplicate")
    await publish(js, feedback("f-1-again", decision, "tip-focus-1", "acted"))
    await eventually(lambda: service.store.positions.get("FEEDBACK") == 2)
    assert service.lineup.champion.n_learned == learned, "the reaction was learned twice"
    assert count("duplicate") == duplicates + 1
