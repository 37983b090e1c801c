"""The service against an older nats-server than the bundled one: a product team's NATS_URL may
name the release their distribution ships (Debian 12's is 2.9.10, docs/operations.md, "Which NATS servers").
Every path that talks to JetStream runs once: streams created, ingest, the DLQ, the decision log
published and read back, the learner's join, a restart resuming from the checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.jetstream import DECISIONS, DLQ_KIND, DLQ_SEQ, next_stored, publish_events, release
from tests.conftest import NatsServer, eventually

# Debian's package installs it here; another path (an older release unpacked by hand) can be named.
OLDER_NATS_SERVER = os.environ.get("TIPSTREAM_TEST_OLDER_NATS_SERVER", "/usr/sbin/nats-server")
NOW = "2026-11-26T09:00:00+01:00"


def older_release() -> str:
    """The older server's version, or skip: a fresh machine may not have it (`apt-get install nats-server`)."""
    if not Path(OLDER_NATS_SERVER).exists():
        pytest.skip(f"no older nats-server at {OLDER_NATS_SERVER} (`apt-get install nats-server` gives Debian's "
                    "2.9.10, or set TIPSTREAM_TEST_OLDER_NATS_SERVER to another binary)")
    found = subprocess.run([OLDER_NATS_SERVER, "--version"], capture_output=True, text=True, timeout=10).stdout
    return found.strip().rsplit(" ", 1)[-1].lstrip("v")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """Overrides conftest's: `start_service` and `nc` use the older server."""
    older_release()
    server = NatsServer(tmp_path / "nats", binary=OLDER_NATS_SERVER)
    server.start()
    yield server
    server.stop()


def event(event_id: str, kind: str, **data: Any) -> dict[str, Any]:
    return {"id": event_id, "type": kind, "user_id": "u-1", "ts": NOW, "v": 1, "data": data}


async def test_the_service_runs_whole_on_an_older_nats_server(
        start_service, nc, caplog: pytest.LogCaptureFixture) -> None:
    version = older_release()
    assert nc._server_info["version"] == version
    caplog.set_level(logging.WARNING, logger="tipstream")
    settings = {"checkpoint_every_s": 0.2, "model_snapshot_every_s": 0}
    running = await start_service(**settings)
    service, js = running.service, nc.jetstream()
    signals = [("signals.task.created", event(f"e-{i}", "task.created", task_id=f"t-{i}")) for i in range(50)]
    await publish_events(js, signals)
    await js.publish("signals.task.created", orjson.dumps({k: v for k, v in signals[0][1].items() if k != "user_id"}))
    await eventually(lambda: service.store.applied == 50)

    async with running.http() as http:
        answer = (await http.post("/score", json={
            "user_id": "u-1", "explore": False, "context": {"now": NOW},
            "candidates": [{"tip_id": "tip-a"}, {"tip_id": "tip-b"}]})).json()
    # The decision is published (the publisher's own HPUB path and acks) and read back from DECISIONS.
    reaction = event("f-1", "tip.reacted", tip_id="tip-a", decision_id=answer["decision_id"], reaction="acted")
    await js.publish("feedback.tip.reacted", orjson.dumps(reaction), headers={"Nats-Msg-Id": "f-1"})
    await eventually(lambda: service.learner.credited == 1)
    assert service.publisher.published == 1

    # How the decision log's tail tells a sequence given to no message (decision_tail.py) on this server.
    assert await next_stored(js, DECISIONS, 1) == 1 and await next_stored(js, DECISIONS, 2) is None
    dead = await js.get_last_msg("DLQ", "dlq.signals.task.created")
    assert dead.headers[DLQ_KIND] == "missing_field" and dead.headers[DLQ_SEQ] == "51"
    await eventually(lambda: service.store.positions.get("SIGNALS") == 51)
    await eventually(lambda: not service.learner.snapshots.unconfirmed and not service.learner._changed)
    await running.stop()

    again = await start_service(**settings)
    assert again.service.store.positions["SIGNALS"] == 51, "resumed from the checkpoint"
    await eventually(lambda: again.service.ready)
    await js.publish("feedback.tip.reacted", orjson.dumps({**reaction, "id": "f-2"}), headers={"Nats-Msg-Id": "f-2"})
    await eventually(lambda: again.service.store.positions.get("FEEDBACK") == 2)
    assert again.service.learner.credited == 0, "the join cache came back from DECISIONS: a duplicate, not learned"
    assert (await js.stream_info("DLQ")).state.messages == 1, "not dead-lettered again on the restart"
    assert release(version) is not None
    noticed = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("tipstream")]
    assert noticed == [], f"nats-server {version}: {noticed}"
