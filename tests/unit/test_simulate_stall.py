"""`app.simulate.Unacknowledged`: how long a run publishes to a JetStream that acknowledges none before it gives up."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app import simulate


def test_a_run_acknowledged_nothing_gives_up_60_s_after_the_events_were_sent(monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The stall was timed from the end of the first 5 s wait for acknowledgements, not from the publish: the run
    gave up 65 s after it, saying 'for 60 s'. Waits of 5 s on simulate's clock, not slept."""
    now = [0.0]  # the events sent
    monkeypatch.setattr(simulate, "time", SimpleNamespace(monotonic=lambda: now[0]))

    class Unanswering:
        def jetstream(self, timeout: float) -> object:
            async def account_info() -> None:
                raise TimeoutError

            return SimpleNamespace(account_info=account_info)

    unacknowledged = simulate.Unacknowledged(Unanswering(), "nats://127.0.0.1:4222", 5.0)

    async def stall() -> int:
        waits = 0
        while True:
            now[0] += 5.0  # a wait for acknowledgements, none come
            waits += 1
            try:
                await unacknowledged(0, 50)
            except simulate.GaveUp as gave_up:
                assert "acknowledged none of the events for 60 s (12 tries)" in str(gave_up), gave_up
                return waits

    assert asyncio.run(stall()) == 12  # the 12th wait ends 60 s after the publish
    assert "acknowledged none of 50 events within 5 s" in capsys.readouterr().err
