"""A stream's catch-up after a start, told in the log as it goes.

A rebuild re-reads up to `TIPSTREAM_STREAM_MAX_AGE_DAYS` of each stream, and a start after a
long stop the events since: minutes to hours for a busy app, during which the log said only
"consuming SIGNALS from sequence 1" and `/readyz` answered 503. Now, every `REPORT_EVERY_S`
seconds while behind, one line with what is read, what is left, the rate and the time to go;
and one line once caught up.

>>> ticks = iter([0.0, 5.0, 10.0, 12.5])
>>> progress = CatchUpProgress("SIGNALS", every_s=10, clock=lambda: next(ticks))
>>> progress.begin(first_seq=1, pending=1_000)
>>> progress.read(seq=200, pending=800) is None  # 5 s in: not yet
True
>>> progress.read(seq=400, pending=600)
'SIGNALS: catching up, 400 events read, 600 to go (40 events/s, about 15 s left)'
>>> progress.read(seq=1_000, pending=0)
'SIGNALS: caught up, 1,000 events read in 12.5 s (80 events/s)'
>>> progress.begin(first_seq=1_001, pending=3)  # a reconnect's restart: nothing more is told
>>> progress.read(seq=1_003, pending=0) is None
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("tipstream.ingest")
REPORT_EVERY_S = 10.0


class CatchUpProgress:
    """Steps: `begin` when the consumer starts at `first_seq` with `pending` behind it; `read`
    after each chunk folded (it logs, and returns the line it logged). Once caught up it says
    nothing more: later consumer restarts (a NATS reconnect) read a few events, not a backlog."""

    def __init__(self, stream: str, every_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.clock = stream, clock
        self.every_s = REPORT_EVERY_S if every_s is None else every_s
        self._first_seq: int | None = None
        self._done = False
        self._started = self._next_report = 0.0

    def begin(self, first_seq: int, pending: int) -> None:
        if not self._done and self._first_seq is None and pending:
            self._first_seq = first_seq
            self._started = self.clock()
            self._next_report = self._started + self.every_s

    def read(self, seq: int, pending: int) -> str | None:
        if self._first_seq is None:
            return None
        now = self.clock()
        done = seq - self._first_seq + 1
        rate = done / max(now - self._started, 1e-9)
        if pending == 0:
            line = (f"{self.stream}: caught up, {done:,} events read in {now - self._started:.1f} s "
                    f"({rate:,.0f} events/s)")
            self._first_seq, self._done = None, True
        elif now >= self._next_report:
            self._next_report = now + self.every_s
            line = (f"{self.stream}: catching up, {done:,} events read, {pending:,} to go "
                    f"({rate:,.0f} events/s, about {pending / max(rate, 1e-9):,.0f} s left)")
        else:
            return None
        log.info("%s", line)
        return line
