"""`app.simulate.Unacknowledged`: how long a run publishes to a JetStream that acknowledges none before it gives up."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app import simulate


def test_a_run_acknowledged_nothing_gives_up_60_s_after_the_events_were_sent(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The stall was timed from the end of the first 5 s wait for acknowledgements, not from the publish: the run
    gave up 65 s after it, saying 'for 60 s'. Waits of 5 s on simulate's clock, not slept."""
    now = [0.0]  # the events sent

    class Unanswering:
        def jetstream(self, timeout: float) -> object:
            async def account_info() -> None:
                raise TimeoutError

            return SimpleNamespace(account_info=account_info)

    unacknowledged = simulate.Unacknowledged(Unanswering(), "nats://127.0.0.1:4222", 5.0, clock=lambda: now[0])

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


def test_chunks_acknowledged_in_part_are_told_at_once_then_once_a_minute_and_when_they_go_through_whole(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A server acknowledging part of every chunk: 'JetStream acknowledged N of M events' was printed at each chunk
    for as long as it lasted. 30 chunks, 5 s apart on simulate's clock (not slept), each acknowledged in part at
    its first wait and whole at the next; then one whole at its first wait, which ends the stretch."""
    now = [0.0]
    unacknowledged = simulate.Unacknowledged(object(), "nats://127.0.0.1:4222", 5.0, clock=lambda: now[0])

    async def run() -> None:
        for _ in range(30):
            now[0] += 5.0
            await unacknowledged(40, 50)
            unacknowledged.recovered()  # the rest acknowledged at the try again
        now[0] += 1.0
        unacknowledged.recovered()  # a chunk acknowledged whole, no wait
        now[0] += 1.0
        await unacknowledged(10, 50)  # a later stretch: told at once
        unacknowledged.recovered()

    asyncio.run(run())
    told = capsys.readouterr().err.splitlines()
    partial = "JetStream acknowledged 40 of 50 events within 5 s; publishing the rest again"
    # Tries at 5 .. 150 s: told at 5, 65 (11 left out since) and 125 (11 more).
    assert told[:3] == [partial, f"{partial} (11 more tries acknowledged in part since the last line)",
                        f"{partial} (11 more tries acknowledged in part since the last line)"], told
    assert told[3] == ("JetStream acknowledges every event within 5 s again, after 151 s of some left "
                       "unacknowledged (30 tries acknowledged in part)"), told
    assert told[4] == "JetStream acknowledged 10 of 50 events within 5 s; publishing the rest again", told
    assert len(told) == 5, told

