"""`tipstream run --demo`: the synthetic app closes the learning loop through the real service."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import NatsServer
from tests.e2e.support import ServiceProcess, wait_until

pytestmark = pytest.mark.slow


def test_demo_scores_tips_over_http_and_the_learner_credits_every_reaction(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "data", args=("--demo", "400")).start()
    try:
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") >= 50,
                   what="50 demo reactions credited")
        # Every reaction names a decision that /score made: none is left unjoined.
        for outcome in ("no_decision", "unknown_decision", "unknown_tip", "duplicate"):
            assert service.metric("tipstream_feedback_total", outcome=outcome) == 0, outcome
        wait_until(lambda: service.metric("tipstream_decisions_total", outcome="published") >= 50,
                   what="the demo's decisions in the log")
        assert service.metric("tipstream_events_applied_total", stream="SIGNALS") > 0
        dead = [line for line in service.get("/metrics").text.splitlines()
                if line.startswith("tipstream_dlq_total{") and not line.endswith(" 0.0")]
        assert not dead, dead
        wait_until(lambda: service.get("/models").json()["models"][0]["n_learned"] > 0, what="the champion learned")
    finally:
        assert service.stop(), service.log()
    assert "a tick failed" not in service.log()  # the service stopping is not the demo failing


def test_port_0_runs_on_the_port_the_system_picked_and_says_which(tmp_path: Path) -> None:
    """`tipstream run` printed `http://127.0.0.1:0`, and the demo asked /score on port 0."""
    service = ServiceProcess(tmp_path / "data", env={"TIPSTREAM_PORT": "0"}, args=("--demo", "400"))
    service.start_on_printed_port()
    try:
        assert service.port != 0
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") >= 20,
                   what="20 demo reactions credited")
    finally:
        assert service.stop(), service.log()
    assert "a tick failed" not in service.log()


def test_the_demo_rides_out_nats_away_as_the_service_does(tmp_path: Path, nats_server: NatsServer) -> None:
    """A NATS server that stops answering (here SIGSTOP: a restart, a full account refuse alike) made a
    tick's publish time out, and the demo stopped for good while the service rode it out."""
    service = ServiceProcess(tmp_path / "data", env={"NATS_URL": nats_server.url}, args=("--demo", "200")).start()
    try:
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") >= 20,
                   what="20 demo reactions credited")
        assert nats_server.process is not None
        nats_server.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: "demo: a tick failed" in service.log(), timeout=30, what="a tick failing")
        finally:
            nats_server.process.send_signal(signal.SIGCONT)
        credited = service.metric("tipstream_feedback_total", outcome="credited")
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") >= credited + 20,
                   timeout=60, what="the demo going on once NATS answers again")
    finally:
        assert service.stop(), service.log()
    assert "demo traffic stopped" not in service.log()
