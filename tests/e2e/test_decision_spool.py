"""Decisions a clean stop kept in the spool survive a crash of the next run until JetStream has them."""

from __future__ import annotations

from pathlib import Path

import orjson
import sqlalchemy as sa
from nats.js.api import StreamConfig

from app import decision_spool
from app.decision_ids import new_decision_id
from app.settings import Settings
from tests.e2e.support import ServiceProcess, wait_until

NOW = "2026-11-26T09:00:00+01:00"


def decision_event(decision_id: str) -> bytes:
    return orjson.dumps({
        "id": decision_id, "type": "decision.scored", "v": 1, "ts": NOW, "user_id": "u-1", "model_version": "v1",
        "policy": "greedy", "features": {"user_id": "u-1", "hour_of_day": 9},
        "ranked": [{"tip_id": "tip-focus-1", "category": "focus", "score": 0.5, "propensity": 1.0}]})


def logged(data_dir: Path, decision_id: str) -> bool:
    engine = sa.create_engine(f"sqlite:///{data_dir / 'tipstream.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("select 1 from tip_scores where decision_id = :d"),
                                {"d": decision_id}).first() is not None
    except sa.exc.OperationalError:
        return False  # no tables yet
    finally:
        engine.dispose()


async def test_a_crash_before_the_spooled_decisions_are_acknowledged_keeps_them(nats_server, nc, tmp_path) -> None:
    settings = Settings()
    js = nc.jetstream()
    # DECISIONS with the service's own limits (so it is left as it is) and a message size that every
    # decision exceeds: JetStream refuses them, as when it is away right after the start.
    config = {"name": "DECISIONS", "subjects": ["decisions.>"], "max_age": settings.stream_max_age_days * 86_400,
              "max_bytes": settings.stream_max_bytes, "duplicate_window": settings.duplicate_window_s}
    await js.add_stream(StreamConfig(**config, max_msg_size=64))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    spool = data_dir / decision_spool.SPOOL_NAME
    decision = new_decision_id()
    decision_spool.save(spool, [("decisions.score", decision, decision_event(decision))])
    env = {"NATS_URL": nats_server.url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2"}

    service = ServiceProcess(data_dir, env).start()
    # Refused for good (err_code 10054): held aside, not sent again until a reconnect or the next start.
    wait_until(lambda: f"JetStream refused decision {decision}" in service.log(), 10, "a refused publish")
    service.kill()
    assert spool.exists(), "the spooled decision is still only in memory: the crash lost it"

    await js.update_stream(StreamConfig(**config, max_msg_size=-1))
    service = ServiceProcess(data_dir, env).start()
    wait_until(lambda: logged(data_dir, decision), 10, "the spooled decision's tip_scores row")
    wait_until(lambda: not spool.exists(), 5, "the spool removed once JetStream has every decision in it")
    assert service.stop(), service.log()
    assert (await js.stream_info("DECISIONS")).state.messages == 1
