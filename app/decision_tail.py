"""DECISIONS is read back only for what this process did not write itself.

The learner needs every decision in the log: its own from `/score` (it holds them from the
moment they are served) and any that another publisher writes. Reading its own back cost 25-30 us
of service CPU per decision under load, so once the DECISIONS ingest has caught up it pauses,
and the stream position follows JetStream's acknowledgements of this process's publishes:
a sequence number acknowledged to us is a message the learner already holds.

Steps, every `tick_s`:
1. Reading and caught up (nothing pending, nothing buffered; not reading the stream again from its first
   message, `StreamIngest.current`): stop the consumer's puller
   (its outstanding pull request goes with it); follow, and tell `on_follow` (the learner
   joins the decisions it re-read after a start). A reconnect that restarts the consumer
   means reading again.
2. Each acknowledged sequence goes into a heap. While reading, those the consumer's position
   passes are let go; while following, the position advances over the ones that directly
   follow it, so everything up to the position is held.
3. Following: if the stream's last sequence seen one tick ago is still ahead of the
   position, a message there is not ours (or its acknowledgement was lost): read again from
   the position + 1, and follow again once caught up. Unless the stream says it holds no
   message there (`stream_next_seq`), or the last reading went through it: nats-server 2.9
   gives a sequence to a message it then refuses to store (the account's storage full), so the
   stream's last sequence can stay ahead of every message in it, and the consumer was
   re-created every other tick for as long as the account stayed full. The stream gone
   (deleted): read again, which creates the streams again (`StreamIngest._restart_consumer`).
   Its last sequence behind the position two ticks running: it was made again (deleted, then
   added, between two ticks), numbering from 1; read again, from its first message. Not
   followed, another publisher's decisions there were not read until the new stream passed
   the old position, and their feedback expired waiting for them.

The position only ever covers messages held, so a checkpoint's DECISIONS position stays
exact and a restart replays from it as before.

>>> import asyncio
>>> class Ingest:
...     current, lag, buffer, puller, resets, reset_needed = True, 0, [], None, 0, False
...     def request_reset(self): self.resets += 1
...     async def pause_reading(self): pass
>>> from streams.store import OnlineStore
>>> store = OnlineStore(); store.positions["DECISIONS"] = 10
>>> tail = OwnTail(Ingest(), store, stream_last_seq=None)
>>> asyncio.run(tail.follow())
>>> for seq in (12, 11, 14):
...     tail.stored(seq)
>>> store.positions["DECISIONS"]  # 13 is not acknowledged (yet): the position waits before it
12
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import NotFoundError

from app.periodic import every
from streams.answers import answered
from streams.store import OnlineStore

log = logging.getLogger("tipstream.decisions")
STREAM = "DECISIONS"
# How long a tick waits for the stream's answer: asked again at the next tick.
ASK_S = 2.0


class OwnTail:
    def __init__(self, ingest: Any, store: OnlineStore, stream_last_seq: Callable[[], Awaitable[int]] | None,
                 tick_s: float = 0.5, on_follow: Callable[[], None] | None = None,
                 stream_next_seq: Callable[[int], Awaitable[int | None]] | None = None) -> None:
        self.ingest, self.store, self.stream_last_seq, self.tick_s = ingest, store, stream_last_seq, tick_s
        self.stream_next_seq = stream_next_seq  # the first message at or after a sequence; None: none
        self.on_follow = on_follow
        self.following = False
        self.resumed = 0  # times a message not ours sent us back to reading
        self._acked: list[int] = []
        self._last_seen: int | None = None
        # The stream's last sequence when a reading from `position + 1` was asked for, and that position:
        # once following again, there is nothing past the position up to it (a sequence given to no
        # message). Forgotten when the position goes back (the stream re-created: its sequences anew).
        self._read_through, self._read_from = 0, 0
        # The stream's last sequence was under the position at the last tick: made anew since it was read (its
        # sequences from 1 again), unless an answer older than our latest acknowledgement (`tick`).
        self._ended_before = False

    @property
    def position(self) -> int:
        return self.store.positions.get(STREAM, 0)

    def stored(self, seq: int) -> None:
        """JetStream stored one of our decisions at `seq`."""
        position = self.position
        if seq > position:
            acked = self._acked
            heapq.heappush(acked, seq)
            if self.following:
                self._advance()
            else:  # the consumer moves the position meanwhile: what it passed need not be kept
                while acked[0] <= position:
                    heapq.heappop(acked)

    async def follow(self) -> None:
        await self.ingest.pause_reading()
        self.following = True
        self._last_seen = None
        self._advance()
        if self.on_follow is not None:
            self.on_follow()

    def _advance(self) -> None:
        acked, position = self._acked, self.position
        while acked and acked[0] <= position + 1:
            position = max(position, heapq.heappop(acked))
        if position != self.position:
            self.store.advance(STREAM, position)

    async def tick(self) -> None:
        ingest = self.ingest
        if self.following and (ingest.puller is not None or ingest.reset_needed):
            self.following = False  # the consumer reads again (a reconnect restarted it)
        if not self.following:
            if ingest.current and ingest.lag == 0 and not ingest.buffer and not ingest.reset_needed:
                await self.follow()
            return
        if self.stream_last_seq is None:
            return
        # What JetStream had acknowledged before the ask, so stored before the answer was made. The position read
        # after the answer also holds acknowledgements that came while it travelled, under a steady load at most
        # ticks: two ticks running, that was taken for a stream made anew, and its consumer restarted.
        asked_at = self.position
        try:
            last = await answered(self.stream_last_seq(), ASK_S)
        except NotFoundError:
            # Deleted while followed (`nats stream rm`, to empty it): no consumer's pull tells ingest, and
            # JetStream refused every decision until a restart. Read again, which makes the streams again.
            log.warning("stream %s is gone from NATS (deleted?); reading it again, which creates it again", STREAM)
            self.following = False
            self.ingest.request_reset()
            return
        except Exception as error:  # noqa: BLE001 - NATS away: the next tick asks again
            log.debug("could not read the DECISIONS stream's last sequence (%s)", error)
            return
        position = self.position
        if last < asked_at:
            # Two ticks running: the stream's answer and our acknowledgements come by different paths, and one
            # tick's can have left before our latest decision was stored.
            if self._ended_before:
                log.warning("stream %s ends at %d, before the position %d: created again (deleted, then made anew)? "
                            "reading it from its first message", STREAM, last, asked_at)
                self._ended_before = False
                self.following = False
                ingest.request_reset()  # the consumer, past the stream's end, starts it over (`StreamIngest`)
                return
            self._ended_before = True
        else:
            self._ended_before = False
        if position < self._read_from:
            self._read_through = 0
        if self._last_seen is not None and max(position, self._read_through) < self._last_seen:
            if await self._holds_none_after(position):
                self._read_through, self._read_from = last, position
                self._last_seen = last
                return
            log.info("DECISIONS holds messages not published here after %d: reading them", position)
            self.following = False
            self.resumed += 1
            self._read_through, self._read_from = last, position
            ingest.request_reset()  # the consumer restarts at the position + 1
        self._last_seen = last

    async def _holds_none_after(self, position: int) -> bool:
        """Whether the stream says it has no message past `position` (False when it cannot say)."""
        if self.stream_next_seq is None:
            return False
        try:
            return await answered(self.stream_next_seq(position + 1), ASK_S) is None
        except Exception as error:  # noqa: BLE001 - NATS away, or a server that cannot say: read, as before
            log.debug("could not look for a DECISIONS message after %d (%s)", position, error)
            return False

    async def run(self) -> None:
        await every(self.tick_s, self.tick, "the DECISIONS tail's tick")
