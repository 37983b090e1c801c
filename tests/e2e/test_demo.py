"""`tipstream run --demo`: the synthetic app closes the learning loop through the real service."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import account_url, limited_account_server
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


def test_the_demo_goes_on_past_jetstream_refusing_its_events(tmp_path: Path) -> None:
    """An account whose storage is full refuses every publish, and nats-py never settles the
    acknowledgement: the demo waited on its tick for good, /score unasked, while the service went on."""
    server = limited_account_server(tmp_path / "nats", "max_file: 200KB")
    server.start()
    # JetStream refuses the decisions too: a stop waits out any bound for them (5 s), as with 0.5 s. A tick
    # fails once its events wait 1 s for their acknowledgements, not 5.
    service = ServiceProcess(tmp_path / "data", env={"NATS_URL": account_url(server)}, args=("--demo", "300"),
                             patches={"app.bootstrap.STOP_FLUSH_S": 0.5, "streams.jetstream.PUBLISH_ACK_WAIT_S": 1.0})
    try:
        service.start()

        def scored() -> float:
            return sum(service.metric("tipstream_score_requests_total", status=s) for s in ("200", "503"))

        # The /score requests counted before the failure is logged: the count is read first, then the log
        # (the tick after the failure asks /score at once; counted after the line, it was already in,
        # and the test waited out one more refused tick). The failed tick asked /score before its
        # wait for acknowledgements, within which the last count is read.
        before = [0.0]

        def failed() -> bool:
            count = scored()
            if "demo: a tick failed" in service.log():
                return True
            before[0] = count
            return False

        wait_until(failed, timeout=60, what="JetStream refusing a tick")
        wait_until(lambda: scored() > before[0], timeout=60, what="the demo going on")
    finally:
        try:
            assert service.stop(), service.log()
        finally:
            server.stop()
    assert "demo traffic stopped" not in service.log()
