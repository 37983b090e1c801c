"""A stream's lag told while its ingest folds no chunk: held (checkpoints behind, a fold retried), its consumer
being made again, or its pull requests unanswered. Set only as a chunk was folded, the lag stayed at its last
value (0) through each while the stream grew: /readyz and tipstream_stream_lag said nothing waited.

The consumer's count when it answers, else the stream's (`streams.delivery.stored_past`); its silences are
told once each, bounded with the consumer's others (`StreamIngest.gone_lines`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nats.js import JetStreamContext

from streams import jetstream as jsx
from streams import pull
from streams.answers import answered
from streams.delivery import stored_past
from streams.log_throttle import since_last_line

if TYPE_CHECKING:
    from app.ingest import StreamIngest

# Ingest's: what an operator filters on, and what its lines have always been told under.
log = logging.getLogger("tipstream.ingest")

# How often a hold (checkpoints failing, a user's state that cannot be read) asks the server for the
# stream's lag: no chunk is folded meanwhile, and the lag was set only as one was.
LAG_WHILE_HELD_EVERY_S = 5.0
# How often, while its consumer is being re-created, ingest asks the stream how far it goes (`while_recreating`):
# on a NATS cluster that lost a node, a stream gets a leader, and stores events, seconds before its consumer does
# (1-2 s on a 3-node 2.15.1 cluster here), and the lag said 0 meanwhile.
LAG_WHILE_RECREATING_EVERY_S = 1.0


class LagWatch:
    """The lag of `ingest`'s stream while it folds nothing, each call bounded by `call_timeout_s`."""

    def __init__(self, ingest: StreamIngest, call_timeout_s: float) -> None:
        self.ingest, self.call_timeout_s = ingest, call_timeout_s
        self.held_every_s = LAG_WHILE_HELD_EVERY_S
        self.asked_at = -math.inf
        self.unanswered_task: asyncio.Future[None] | None = None  # `_while_unanswered`, while it runs
        self.info_unanswered = False  # the consumer's last consumer_info failed (`ask`): told once till it answers

    def stop(self) -> None:
        if self.unanswered_task is not None:
            self.unanswered_task.cancel()

    def consumer_made(self) -> None:
        """The old consumer's silence is not the new one's: kept, the new one's first consumer_info unanswered went
        untold (`ask`)."""
        self.info_unanswered = False

    def unanswered(self) -> None:
        """The puller's requests go unanswered (`pull.BatchPuller.unanswered`): no 503 says the consumer has no
        leader, its node hangs. The lag is read from the stream meanwhile (`_while_unanswered`)."""
        if self.unanswered_task is None or self.unanswered_task.done():
            self.unanswered_task = asyncio.ensure_future(self._while_unanswered(self.ingest.puller))

    async def _while_unanswered(self, puller: pull.BatchPuller | None) -> None:
        """While `puller`'s requests go unanswered, the lag as the stream counts it, every
        LAG_WHILE_RECREATING_EVERY_S. Set only by a chunk folded, it stayed at its last value (0) for as long as a
        hung node led the consumer (until its cluster elected another, ~5 s on a 3-node 2.9 cluster here), while
        the stream, led by another node, stored events: /readyz and tipstream_stream_lag said nothing waited. The
        consumer's own count (consumer_info) is its leader's to answer, so it is not asked."""
        if puller is None:
            return
        ingest = self.ingest

        def still() -> bool:
            return puller is ingest.puller and puller.unanswered

        # Told already if ingest waits and its asks for consumer_info go unanswered too (`ask`): one cause.
        left_out = None if self._info_silent() else ingest.gone_lines.allow("unanswered")
        if left_out is not None:
            more = since_last_line(left_out, "time", "times")
            log.warning("the consumer %s of stream %s answers no pull request, neither with messages nor with a "
                        "status: the NATS server leading it hangs or is cut off (on a cluster, until the other nodes "
                        "elect another leader). The lag is read from the stream meanwhile. If this goes on, look at "
                        "that server (`nats server report jetstream` shows which streams and consumers have no "
                        "leader)%s", ingest.durable, ingest.spec.name, more)
        told_at, reconnects = time.monotonic(), ingest.nc.stats["reconnects"]
        js = ingest.nc.jetstream(timeout=self.call_timeout_s)
        while still():
            await self._from_stream(js, still)
            await asyncio.sleep(LAG_WHILE_RECREATING_EVERY_S)
        # The warning above was the last word when the server came back on the same connection (a hung server
        # resumed, SIGCONT): the operator was left to guess whether it still held. A reconnect (the connection dropped
        # after its pings went unanswered) or a consumer made again says so in lines of its own.
        if (left_out is not None and puller is ingest.puller and not puller.stopped and not puller.paused
                and ingest.nc.is_connected and ingest.nc.stats["reconnects"] == reconnects):
            log.info("the consumer %s of stream %s answers pull requests again, %.0f s after the line saying it "
                     "answered none; ingest reads on", ingest.durable, ingest.spec.name, time.monotonic() - told_at)

    async def ask(self) -> None:
        """While ingest holds, the lag as the server counts it, every `held_every_s`: set only as a
        chunk was folded, it stayed at its last value (0) through a hold of minutes while the stream grew, and
        the operator's guide's alert on `tipstream_stream_lag` for ingest held never fired. The consumer's count, or the
        stream's when the consumer does not answer (no leader, or its node hangs: a held ingest asks no messages,
        so `_while_unanswered` does not see that silence) or a cluster node without its copy yet answers for it
        (`jsx.knows_nothing_of_the_consumer`); the consumer's last lag stayed until the cluster
        elected it another leader. The first failure while the consumer is in use is told (the lag alone changed
        without a word why), unless its pull requests' silence is told already, then none until it answers again."""
        ingest = self.ingest
        now = time.monotonic()
        if now - self.asked_at < self.held_every_s or not ingest.nc.is_connected:
            return
        self.asked_at = now
        js = ingest.nc.jetstream(timeout=self.call_timeout_s)
        try:  # bounded by `answered`, its cancellation kept as each request's (`pull.IngestClient.request`)
            info = await answered(js.consumer_info(ingest.spec.name, ingest.durable), self.call_timeout_s)
        except Exception as error:  # noqa: BLE001 - the consumer has no leader, hangs or is gone: the stream's count
            # Not while it is made again (its puller stopped): `_retry` tells why. Nor while its pull requests go
            # unanswered (a fold retried, the puller asking on): `_while_unanswered` tells that silence.
            if not self.info_unanswered and ingest.puller is not None and not ingest.puller.stopped:
                self.info_unanswered = True
                if self.unanswered_task is None or self.unanswered_task.done():
                    self._tell_info_unanswered(error)
            await self._from_stream(js, lambda: True)
            return
        if jsx.knows_nothing_of_the_consumer(info, ingest.nc._server_info):
            # A cluster node without the consumer's copy yet: its counts of 0 read as nothing waiting for a sample.
            await self._from_stream(js, lambda: True)
            return
        self.info_unanswered = False
        # Not delivered yet, and delivered but not folded: as a folded chunk counts it, after the position.
        ingest.tell_lag((info.num_pending or 0) + ingest.unfolded())

    def _info_silent(self) -> bool:
        """Whether the consumer answered no consumer_info when last asked (`ask`), and ingest still waits, so
        asks again: once the wait is over, that failure says nothing of the consumer now. While it waits, an ask
        starts every `held_every_s`, or as the one before ends, which waits for two calls at most
        (consumer_info, then the stream's), each bounded by `call_timeout_s`; the bound here has one more of each."""
        since = time.monotonic() - self.asked_at
        return self.info_unanswered and since < 2 * self.held_every_s + 3 * self.call_timeout_s

    def _tell_info_unanswered(self, error: Exception) -> None:
        """One warning, bounded as the consumer's other silences are (`gone_lines`), that the consumer answered
        no consumer_info to `ask`."""
        ingest = self.ingest
        left_out = ingest.gone_lines.allow("no consumer_info")
        if left_out is None:
            return
        more = since_last_line(left_out, "time", "times")
        log.warning("the consumer %s of stream %s answers no consumer_info (%s: %s) while ingest waits, held for "
                    "checkpoints or retrying: no NATS node leads it now, the server leading it hangs or is cut off (on "
                    "a cluster, until the other nodes elect another leader), or it was deleted. The lag is read from the "
                    "stream meanwhile. If this goes on, look at that server (`nats server report jetstream` shows "
                    "which streams and consumers have no leader; `nats consumer info %s %s` whether it is there)%s",
                    ingest.durable, ingest.spec.name, type(error).__name__, error, ingest.spec.name, ingest.durable,
                    more)

    async def while_recreating(self, js: JetStreamContext) -> None:
        """Until the consumer is made again (cancelled then), the lag as the stream counts it, every
        LAG_WHILE_RECREATING_EVERY_S: what it stores past the position is unread. Set only by a chunk folded or a
        consumer made, it stayed at its last value (0) while a stream that had a leader again stored events its
        consumer, with none yet, could not deliver: /readyz and tipstream_stream_lag said nothing waited."""
        ingest = self.ingest
        while True:
            # Not once the new consumer's puller runs: the consumer's own count (`_restart_consumer`) is the lag then.
            await self._from_stream(js, lambda: ingest.puller is None or ingest.puller.stopped)
            await asyncio.sleep(LAG_WHILE_RECREATING_EVERY_S)

    async def _from_stream(self, js: JetStreamContext, still: Callable[[], bool]) -> None:
        """The lag as the stream counts it, what it stores past the position (`stored_past`), set if `still()` holds
        once it is had: an answer of the consumer meanwhile says more."""
        ingest = self.ingest
        try:  # bounded by `answered` (`ask`)
            state = (await answered(js.stream_info(ingest.spec.name), self.call_timeout_s)).state
        except Exception:  # noqa: BLE001 - no leader yet, or NATS away: the last lag known stays
            return
        if still():
            ingest.tell_lag(stored_past(ingest.store.positions.get(ingest.spec.name, 0), state.last_seq, state.messages))
