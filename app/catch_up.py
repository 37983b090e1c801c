"""A stream's catch-up after a start, told in the log as it goes.

A rebuild re-reads up to `TIPSTREAM_STREAM_MAX_AGE_DAYS` of each stream, and a start after a
long stop the events since: minutes to hours for a busy app, during which the log said only
"consuming SIGNALS from sequence 1" and `/readyz` answered 503. Now, every `REPORT_EVERY_S`
seconds while behind, one line with what is read, what is left, the rate and the time to go;
and one line once caught up.

Events read are the messages delivered, not the span of sequences: a stream past its retention
(`TIPSTREAM_STREAM_MAX_AGE_DAYS`, `TIPSTREAM_STREAM_MAX_BYTES`) starts well after sequence 1, where a
rebuild's consumer starts, and counting sequences told the aged-out ones as read (143,217 read of
43,217 kept), with a rate and a time left off by as much.

>>> ticks = iter([0.0, 5.0, 10.0, 12.5])
>>> progress = CatchUpProgress("SIGNALS", every_s=10, clock=lambda: next(ticks))
>>> progress.begin(pending=1_000)
>>> progress.read(count=200, pending=800) is None  # 5 s in: not yet
True
>>> progress.read(count=200, pending=600)
'SIGNALS: catching up, 400 events read, 600 to go (40 events/s, about 15 s left)'
>>> progress.read(count=600, pending=0)
'SIGNALS: caught up, 1,000 events read in 12.5 s (80 events/s)'
>>> progress.begin(pending=3)  # a reconnect's restart: nothing more is told
>>> progress.read(count=3, pending=0) is None
True

One message read back (DECISIONS, at many a restart) is told as one:

>>> ticks = iter([0.0, 0.5])
>>> one = CatchUpProgress("DECISIONS", clock=lambda: next(ticks))
>>> one.begin(pending=1)
>>> one.read(count=1, pending=0)
'DECISIONS: caught up, 1 event read in 0.5 s (2 events/s)'
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("tipstream.ingest")
REPORT_EVERY_S = 10.0


class CatchUpProgress:
    """Steps: `begin` when the consumer starts with `pending` messages behind it; `read` after
    each chunk folded, with its number of messages (it logs, and returns the line it logged).
    Once caught up it says nothing more: later consumer restarts (a NATS reconnect) read a few
    events, not a backlog. A stream read again from its first message gets a new one
    (`StreamIngest._restart_consumer`)."""

    def __init__(self, stream: str, every_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.clock = stream, clock
        self.every_s = REPORT_EVERY_S if every_s is None else every_s
        self._reading = self._done = False
        self._read = 0
        self._started = self._next_report = 0.0

    def begin(self, pending: int) -> None:
        if not self._done and not self._reading and pending:
            self._reading, self._read = True, 0
            self._started = self.clock()
            self._next_report = self._started + self.every_s

    def read(self, count: int, pending: int) -> str | None:
        """`count` more messages delivered (a chunk), `pending` left behind the last of them."""
        if not self._reading:
            return None
        now = self.clock()
        self._read += count
        done = self._read
        rate = done / max(now - self._started, 1e-9)
        if pending == 0:
            line = (f"{self.stream}: caught up, {done:,} event{'' if done == 1 else 's'} read in {now - self._started:.1f} s "
                    f"({rate:,.0f} events/s)")
            self._reading, self._done = False, True
        elif now >= self._next_report:
            self._next_report = now + self.every_s
            line = (f"{self.stream}: catching up, {done:,} events read, {pending:,} to go "
                    f"({rate:,.0f} events/s, about {pending / max(rate, 1e-9):,.0f} s left)")
        else:
            return None
        log.info("%s", line)
        return line
