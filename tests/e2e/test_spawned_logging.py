"""The processes `tipstream run` spawns (the checkpoint writer, a card's evaluation) log as the service does.

Real `tipstream run`, real nats-server, SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa

from tests.e2e.support import ServiceProcess, wait_until

pytestmark = pytest.mark.slow
TOKEN = "t" * 16
NOW = "2026-11-26T09:00:00+01:00"
# The service's line format (`log_setup.configure_logging`): time, level, logger, message.
SERVICE_LINE = r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR tipstream\.checkpoints: The learner_state row 'credits:1'"


async def test_a_line_the_checkpoint_writer_process_logs_reaches_the_service_s_log_in_its_format(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """The checkpoint writer process had no logging set up: the error it logs for a damaged minute of credits
    (`checkpoint_rows._delete_credits`) came out as the bare message (logging's last resort), without time, level
    or logger, and an info line of it not at all."""
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": database_url, "TIPSTREAM_CHECKPOINT_WRITER": "process",
           "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2", "TIPSTREAM_ADMIN_TOKEN": TOKEN}
    service = ServiceProcess(tmp_path / "data", env).start()
    body = {"user_id": "u-1", "explore": False, "context": {"now": NOW},
            "candidates": [{"tip_id": "tip-focus-1", "category": "focus"}]}
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
        decision = (await http.post("/score", json=body)).json()["decision_id"]
    reaction = {"id": "f-1", "type": "tip.reacted", "user_id": "u-1", "ts": NOW, "v": 1,
                "data": {"tip_id": "tip-focus-1", "decision_id": decision, "reaction": "acted"}}
    await nc.jetstream().publish("feedback.tip.reacted", orjson.dumps(reaction), headers={"Nats-Msg-Id": "f-1"})
    wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 1, what="the reaction credited")

    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:  # a minute long closed, cut short while the service runs
            conn.execute(sa.text("insert into learner_state (name, state, updated_at) values ('credits:1', :s, "
                                 "current_timestamp)"), {"s": b'{"d-1": [{"a"'})
    finally:
        engine.dispose()
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
        forget = await http.post("/admin/users/u-1/forget", json={"actor": "test"},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert forget.status_code == 202, forget.text

    log = tmp_path / "data" / "service.log"
    wait_until(lambda: "'credits:1'" in log.read_text(), what="the writer's line about the damaged row")
    said = log.read_text()
    assert re.search(SERVICE_LINE, said), said[-3000:]
    assert service.stop(), service.log()
