"""`streams.scrub.read_through` reads a pass again after a gap or a stall: bounded when the passes stop moving.

The reader's passes are driven here without a server (`_Reader.run_from` replaced): each says where the next
must start, as a pass that lost a delivery or saw nothing arrive does (tests/integration/test_scrub.py reads
again after a real gap)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from streams import scrub as scrub_module
from streams.scrub import ScrubError, read_through


class _Js:
    _nc = None  # the reader's own pass, replaced here, is what would use it


def passes(monkeypatch: pytest.MonkeyPatch, outcomes: Iterator[tuple[int, str] | None]) -> list[int]:
    """Each pass hands on every sequence from where it starts up to the one the next `outcomes` gives, and
    ends there (None: read through), for the reason it names; the starts, in order."""
    starts: list[int] = []

    async def run_from(self: Any, start: int) -> int | None:
        await asyncio.sleep(0)  # a pass waits on the server: a stuck loop must still let the test's timeout in
        starts.append(start)
        outcome = next(outcomes)
        if outcome is None:
            return None
        again_from, self.why = outcome
        for seq in range(start, again_from):
            self.on_body(seq, b"{}")
            self.last_seq, self.scanned = seq, self.scanned + 1
        return again_from

    monkeypatch.setattr(scrub_module._Reader, "run_from", run_from)
    return starts


async def test_passes_that_stop_moving_give_up_naming_the_stream_the_sequence_and_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message the reader never gets past (every pass stalls at it) was read again from it for good: the forget
    (or the export) hung without a word past the warnings, its request never told done nor failed."""
    starts = passes(monkeypatch, itertools.chain([(7, "deliveries 3..3 were lost on the way")],
                                                 itertools.repeat((7, "nothing arrived for a while"))))
    with pytest.raises(ScrubError) as raised:
        await asyncio.wait_for(read_through(_Js(), "SIGNALS", 1, 100, lambda seq, body: None), timeout=10)
    assert starts == [1] + [7] * scrub_module.STUCK_PASSES
    said = str(raised.value)
    assert "stream SIGNALS" in said and "#7" in said and "nothing arrived for a while" in said, said
    assert "check" in said and "tries again by itself" in said, said


async def test_passes_that_move_on_are_read_again_however_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long scrub over a flaky link: each pass gets a little further, and the stuck ones between are fewer
    than the bound each time; it must still finish."""
    outcomes: list[tuple[int, str] | None] = []
    for seq in range(2, 40):
        outcomes += [(seq - 1, "nothing arrived for a while")] * (scrub_module.STUCK_PASSES - 1 if seq > 2 else 0)
        outcomes.append((seq, "deliveries lost on the way"))
    starts = passes(monkeypatch, iter([*outcomes, None]))
    read: list[int] = []
    assert await asyncio.wait_for(read_through(_Js(), "SIGNALS", 1, 100, lambda seq, _: read.append(seq)),
                                  timeout=10) == 38
    assert read == list(range(1, 39)) and len(starts) > 100
