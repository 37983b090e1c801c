"""The ingest loop: JetStream messages in, validated, folded into the online store, bad ones to the DLQ.

Where ingest resumes after a restart is decided by the last checkpoint, not by the
consumer's acknowledgements: on start the durable consumer is re-created at the checkpointed
position + 1 (after a reconnect, at the position in memory + 1), and events already folded are recognised
by the fold and counted once. Acknowledgements (ack-all, once per chunk) only tell the
server and its monitoring how far ingest has got.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from app.catch_up import CatchUpProgress
from app.checkpoints import Checkpointer
from app.dead_lettering import DeadLettering, processing_failed
from app.ingest_lag import LagWatch
from app.metrics import METRICS
from app.thaw import load_state
from streams import ack_subject, pull
from streams import jetstream as jsx
from streams.delivery import delivered_in_turn, holes_after, stored_until
from streams.events import REJECTION_KINDS, Refused, Rejection
from streams.fold import FutureEvent
from streams.log_throttle import LogThrottle, counted, since_last_line
from streams.read_up_to import ReadUpTo
from streams.store import OnlineStore, StateUnavailable
from streams.wire import decode_wire_event

log = logging.getLogger("tipstream.ingest")
CHUNK = 256  # events folded between two chances for the API to run
ACK_PENDING_BATCHES = 32  # pull requests' worth of messages a consumer may hold unacknowledged (max_ack_pending)
# Bytes delivered and not folded yet a stream's ingest holds before it stops asking for more (and those its requests
# still bring, `pull.PULL_MAX_BYTES`). Bounded by count only (max_ack_pending: 32 pull requests), a stream of events
# near NATS's 1 MB max_payload, each refused as oversized, held 32,768 of them: 32 GB.
BUFFER_MAX_BYTES = 32 << 20
# How long each JetStream call of a consumer's re-creation after a reconnect waits for its answer before it is
# asked again (`_retry`, `asking_again`). On a NATS cluster that lost a node, the stream's calls go unanswered until
# it has a new leader (4-9 s), and the new consumer's until its own copies elect one: waited out with the start's
# bound (10 s), ingest resumed 11-16 s after the loss. Each unanswered call is asked again at once: with a backoff
# doubling after each (to 6.4 s by then), a consumer that could be made 11 s after the loss was asked for at 16 s.
RESET_CALL_TIMEOUT_S = 2.0
# Told with a NATS call that timed out (`StreamIngest._retry`): "nats: timeout" alone said neither why nor what to do.
NO_ANSWER_FIX = (". No NATS node answered in time: on a NATS cluster, none leads it yet (an election after a node was "
                 "lost takes seconds, the stream or consumer has no leader until then), or the server hangs. If this "
                 "goes on, look at the servers (`nats server report jetstream` shows which streams and consumers have "
                 "no leader)")
# Told with a publish (the DLQ's copies) that timed out: a nats-server whose store's disk is full takes publishes and
# answers none, and the line named a cluster's election or a server that hangs only.
PUBLISH_NO_ANSWER_FIX = (NO_ANSWER_FIX + ". Or is its store's disk full? A nats-server that failed a write (its log "
                         "says 'no space left on device') stores nothing more until it is restarted, also once there "
                         "is room: free space on it and restart nats-server (tipstream restarts its embedded one "
                         "itself)")
# How often a hold for checkpoints looks again whether enough of them committed (and asks for one meanwhile).
HOLD_RECHECK_S = 0.2


class StreamIngest:
    """Steps per chunk of messages:
    1. Validate and fold each message into the online store (a user whose state is in the
       checkpoint only is read first, off the event loop); collect rejections.
    2. Publish the rejections to `dlq.<subject>`, up to `DLQ_IN_FLIGHT` at once, and wait for JetStream
       to store them all (`app/dead_lettering.py`).
    3. Advance the stream position (what the next checkpoint will record).
    4. Acknowledge the chunk's last message (ack-all), update metrics, nudge the checkpointer.
    """

    def __init__(self, nc: pull.IngestClient, js: JetStreamContext, spec: jsx.StreamSpec, store: OnlineStore,
                 checkpointer: Checkpointer, *, batch: int, max_event_bytes: int, max_uncheckpointed: int,
                 max_future_s: float | None = None,
                 decode: Callable[[str, bytes], Any] = decode_wire_event,
                 sink: Callable[..., bool] | None = None, sink_reply: bool = False,
                 dead_lettered_upto: int = 0, read: ReadUpTo | None = None, after: ReadUpTo | None = None,
                 after_ahead_ms: int = 0,
                 backlog: Callable[[], int] | None = None, max_backlog: int = 0, folds: bool = True,
                 ensure_streams: Callable[[], Awaitable[None]] | None = None,
                 before: Callable[[bytes], Awaitable[None] | None] | None = None,
                 room: Callable[[list[int]], int] | None = None, followed_by: ReadUpTo | None = None,
                 max_buffer_bytes: int = BUFFER_MAX_BYTES, pull_max_bytes: int = pull.PULL_MAX_BYTES,
                 store_failed: Callable[[str], str | None] | None = None) -> None:
        self.nc, self.js, self.spec, self.store, self.checkpointer = nc, js, spec, store, checkpointer
        # What says NATS failed to store (`jsx.gone_before`): a stream that starts past 1 is then told as one whose
        # first sequences were most likely never stored, not as events lost.
        self.store_failed = store_failed
        # Creates the streams again when this one is gone (a reconnect to a server whose store was lost).
        self.ensure_streams = ensure_streams
        # What else of this stream waits in memory for a checkpoint, and how much of it may: the
        # DECISIONS ingest's `tip_scores` rows (`TipScoresLog.backlog`), which its sink adds and
        # which folds no event, so `max_uncheckpointed` never held it (`_hold_if_checkpoints_lag`).
        self.backlog, self.max_backlog = backlog, max_backlog
        # decode: bytes to an event or a Rejection; sink: folds it (the online store, the learner
        # wrapping it for feedback, the learner's join cache for decisions) and says whether it
        # was new: the applied and ignored counts are its answers. `sink_reply`: the sink also takes the message's ack
        # subject, which says when JetStream stored it (the learner stamps rewards with that).
        self.decode, self.sink, self.sink_reply = decode, sink or store.apply, sink_reply
        # Whether the sink folds events into users' states (not DECISIONS'): a user whose state is
        # in the checkpoint only is then read first, in a worker thread (`app/thaw.py`).
        self.folds = folds
        self.batch, self.max_event_bytes, self.max_uncheckpointed = batch, max_event_bytes, max_uncheckpointed
        # A clock far ahead would make one event the user's "newest" and prune their history.
        self.max_future = None if max_future_s is None else timedelta(seconds=max_future_s)
        self.durable = jsx.durable_of(spec.name)
        # Where a chunk's rejections go; messages up to `dead_lettered_upto` were dead-lettered before this start.
        self.dlq = DeadLettering(nc, js, spec, retry=self._retry, upto=dead_lettered_upto, ensure_streams=ensure_streams)
        self._renewing = False  # taking a stream created again as the one read: not done yet (`_restart_consumer`)
        # (sequence, when NATS stored it, µs) of the last message read: a server back after a
        # reconnect with another message there is another stream (`_replaced_under_us`).
        self._last_read: tuple[int, int] | None = None
        self.clock = time.monotonic  # of `_retry`'s lines, a minute apart
        # A cluster without a quorum answers no call for as long as it lasts: asked again every 2 s, each a line.
        self._unanswered_lines = LogThrottle(per_window=6)
        # The consumer taking no pull request (`_consumer_gone`), and its other silences (`LagWatch`).
        self.gone_lines = LogThrottle(per_window=6)
        # The lag told while no chunk is folded (held, the consumer made again or unanswered).
        self.lag_watch = LagWatch(self, RESET_CALL_TIMEOUT_S)
        # A hold asks for its checkpoint, so a small TIPSTREAM_MAX_UNCHECKPOINTED_EVENTS holds briefly but often
        # (every second at 200 and 200 events/s): a warning apiece.
        self._hold_lines = LogThrottle(per_window=6)
        # `read`: how far this stream has been read, for another to wait on. `after`: until that
        # other stream has caught up once, a chunk waits for it to be read past when the chunk's
        # last message was stored. Every start makes FEEDBACK follow DECISIONS so: live,
        # a decision is known before its feedback comes, and rewards are learned in FEEDBACK's
        # order; read first, a reward waits and is learned in DECISIONS' order instead.
        self.read, self.after = read, after
        # How much further than a message's stored time `after` is read before it (DECISIONS_READ_AHEAD_S).
        self.after_ahead_ms = after_ahead_ms
        # `room`: until this stream has caught up once, how many of the messages of these sizes may be read now; for
        # the others it waits for `followed_by`, the stream that follows it (`after`), to read on, or to ask for more
        # of this one. The DECISIONS read-back, which FEEDBACK follows: read as fast as it goes, it ran ahead of FEEDBACK
        # by more than the learner's join cache holds (TIPSTREAM_LEARNER_JOIN_CACHE_MB), the oldest decisions left it
        # before their feedback was read, and a rebuild counted as `expired` reactions live had learned.
        self.room, self.followed_by = room, followed_by
        # Asked with each message's ack subject before it is handed to the sink: work to await first,
        # in turns of the loop (the learner's silences due before it was stored), or None.
        self.before = before
        if read is not None:
            read.drained = self.drained
        self.progress_every_s = jsx.ACK_WAIT_S / 3  # while a wait holds delivered messages (`_keep_in_progress`)
        self._progressed = 0.0
        self._held: list[pull.RawMsg] = []
        # Clear within a chunk's fold, which may wait (a user's state read, the learner): the store then holds
        # part of the chunk, past the stream's position. A user is forgotten between two chunks, the eraser
        # woken by this as the chunk ends (it polled a flag every 1 ms, for as long as a state read took).
        self.between_chunks = asyncio.Event()
        self.between_chunks.set()
        # How many of the chunk's events a try that failed (a state that could not be loaded) had
        # folded and counted: the next try sees them again as duplicates, which they are not.
        self._counted_by_failed_try = 0
        self.buffer: list[pull.RawMsg] = []
        self.buffered_bytes, self.max_buffer_bytes, self.pull_max_bytes = 0, max_buffer_bytes, pull_max_bytes
        self._full = False  # the puller paused for the buffer's bytes, not for checkpoints
        self.wake = asyncio.Event()
        self.reset_needed = False
        self.caught_up = False  # once, for good: the start's catch-up is done (the flows that wait for it ask this)
        # Why the stream is read again from its first message while the service runs (made anew, or an older copy of
        # its store), until that replay has caught up; None otherwise. Users' states are being rebuilt meanwhile, so
        # the service is not ready, as during the start's catch-up (`current`, /readyz): with `caught_up` alone, set
        # once for good, /readyz said 200 throughout.
        self.replaying: str | None = None
        # How many times the stream was taken for another and read again from its first message: how far the one
        # before was read tells nothing of it (`Service._lower_stream_limits_once_read`).
        self.renewals = 0
        self.catch_up = CatchUpProgress(spec.name)
        self.lag = 0
        self.puller: pull.BatchPuller | None = None
        self._applied = METRICS.ingested.labels(spec.name)
        self._fold_delay = METRICS.fold_delay.labels(spec.name)
        self._ignored = METRICS.ignored.labels(spec.name)
        self._lag = METRICS.lag.labels(spec.name)
        # At 0 from the start: a series that first appears at 1,000 (one bad publisher's burst) has no
        # increase() in Prometheus, and the operator's guide's DLQ alert never fired for it.
        for kind in REJECTION_KINDS:
            METRICS.dlq.labels(spec.name, kind)
        # The store's position, read when scraped: it also moves without this ingest (the DECISIONS
        # tail advances it over this process's acknowledged publishes).
        METRICS.position.labels(spec.name).set_function(lambda: store.positions.get(spec.name, 0))

    def tell_lag(self, lag: int) -> None:
        """The lag as /readyz and tipstream_stream_lag tell it."""
        self.lag = lag
        self._lag.set(lag)

    def unfolded(self) -> int:
        """Messages delivered and not folded yet."""
        return len(self._held) + len(self.buffer)

    @property
    def current(self) -> bool:
        """Caught up with the stream, and not reading it again from its first message (`replaying`): /readyz."""
        return self.caught_up and self.replaying is None

    def drained(self) -> bool:
        """Whether all this stream stored until a moment ago has been read: the server said it has
        nothing more for the pull request outstanding (it says so every `expires_s` when idle), and
        nothing delivered waits to be folded. False while ingest is paused for checkpoints (the
        database away), between consumers, or away from NATS: what is stored meanwhile is unread.
        Between consumers includes a re-creation asked for (`reset_needed`, as after a reconnect) that the loop
        has not taken yet: the old puller's last status still says the stream had nothing more."""
        puller = self.puller
        return (puller is not None and puller.idle and not puller.paused and not puller.stopped
                and not self.reset_needed and not self.buffer and not self._held and self.lag == 0
                and self.nc.is_connected)

    def _on_message(self, msg: pull.RawMsg) -> None:
        self.buffer.append(msg)
        self.buffered_bytes += len(msg[2])
        if len(self.buffer) == 1:
            self.wake.set()
        # Paused again if a hold's resume came in between: the bound is the buffer's, whoever paused.
        if self.buffered_bytes >= self.max_buffer_bytes and self.puller is not None and not self.puller.paused:
            self.puller.paused = self._full = True

    def _take_buffer(self) -> list[pull.RawMsg]:
        messages, self.buffer, self.buffered_bytes = self.buffer, [], 0
        if self._full:
            self._full = False
            if self.puller is not None:
                self.puller.go_on()
        return messages

    async def start(self) -> None:
        # The checkpointed position says what was read (and dead-lettered) before only on the stream
        # it was taken from. Past this stream's end, the stream was re-created (`reset_durable`
        # replays it from its first message): its bad events below that position were skipped,
        # neither folded nor dead-lettered.
        await self.dlq.start(await self.js.stream_info(self.spec.name))
        await self._restart_consumer()

    async def stop(self) -> None:
        if self.puller:
            await self.puller.stop()
        self.lag_watch.stop()

    async def pause_reading(self) -> None:
        """Stop asking for messages, and drop the pull request outstanding (`request_reset` reads again)."""
        if self.puller:
            await self.puller.stop()
            self.puller = None

    def request_reset(self) -> None:
        """After a reconnect: in-flight deliveries may be lost, so resume from our own position."""
        self.reset_needed = True
        self.wake.set()

    async def _restart_consumer(self, js: JetStreamContext | None = None) -> None:
        """Read on from the position with a new consumer, made through `js` (the start's context by default)."""
        js = js or self.js
        if self.puller:
            await self.puller.stop()
        self.buffer.clear()
        self.buffered_bytes, self._full = 0, False  # the new puller is not paused
        wanted = self.store.positions.get(self.spec.name, 0) + 1
        why = await self._replaced_under_us(wanted - 1, js)
        recreated = why is not None
        if recreated:
            wanted = 1
        try:
            pending, start = await jsx.reset_durable(js, self.spec.name, self.durable, wanted,
                                                     max_ack_pending=self.batch * ACK_PENDING_BATCHES,
                                                     store_failed=self.store_failed)
        except NotFoundError:
            if self.ensure_streams is None:
                raise
            # The server came back without the stream (its store lost or replaced, the stream deleted):
            # retried as it was, every re-creation failed for ever while /readyz said ready and
            # publishers were refused. The new stream is read from its first message, with its
            # position and what it dead-lettered its own, as at a start (`Service._forget_positions...`).
            log.error("stream %s is gone from NATS (was its store lost, or the stream deleted?); creating the "
                      "streams again and reading %s from its first message: what was folded stays, and nothing "
                      "is counted twice.", self.spec.name, self.spec.name)
            await self.ensure_streams()
            recreated, why = True, "it was gone from NATS, and is created again"
            pending, start = await jsx.reset_durable(js, self.spec.name, self.durable, 1,
                                                     max_ack_pending=self.batch * ACK_PENDING_BATCHES,
                                                     store_failed=self.store_failed)
        if recreated or start < wanted or self._renewing:
            # Created again, or past the stream's end (reset_durable replays it from its first
            # message: a server back with an older copy of its store). The position and what was
            # dead-lettered are the new stream's from here, as at a start: kept, the new stream's
            # bad events below the old position were neither folded nor dead-lettered. Until all of it is
            # done (`_renewing`): asking failed (NATS away again), the retry saw no re-created stream, and kept the
            # old stream's DLQ ids, whose sequences the new one numbers anew: its first bad events were dropped
            # by the DLQ as duplicates of the old one's, within its duplicate window.
            if not self._renewing:  # not a retry's: that one's reason stands
                self.renewals += 1
                why = why or f"it ends before {wanted - 1}, the position read to (made anew, or an older copy of its store?)"
                self.replaying = f"read again from its first message: {why}"
            self._renewing = True
            # Read again from its start, which may be a backlog of any length: told as the start's catch-up is,
            # where a catch-up, once done, told nothing more (a reconnect reads a few events).
            self.catch_up = CatchUpProgress(self.spec.name)
            self.store.positions[self.spec.name] = start - 1
            self._last_read = None  # the old stream's
            self.checkpointer.forget_stored(self.spec.name)
            await self.dlq.renew(js)
            self._renewing = False
        self.lag = pending
        self._lag.set(pending)  # also while FEEDBACK waits for DECISIONS at a start, before a chunk is folded
        self.caught_up = self.caught_up or pending == 0
        if pending == 0:
            self.replaying = None
        if self.read is not None:
            self.read.advance(0, self.caught_up)
        self.puller = pull.BatchPuller(self.nc, self.spec.name, self.durable, self.batch, self._on_message,
                                       on_gone=self._consumer_gone, max_bytes=self.pull_max_bytes,
                                       on_unanswered=self.lag_watch.unanswered)
        self.lag_watch.consumer_made()
        await self.puller.start()
        log.info("consuming %s from sequence %d", self.spec.name, start)
        self.catch_up.begin(pending)

    def _consumer_gone(self, why: str) -> None:
        """The server says the consumer takes no request (`pull.consumer_gone`): deleted (by an operator, or with its
        stream), or, with no responders, maybe led by no node now (a cluster's election, or no quorum). Made again
        from the position, as after a reconnect (the stream too, if it went with it)."""
        if self.reset_needed:
            return
        self.request_reset()
        # Bounded: a cluster that lacks a leader for minutes has each re-created consumer meet none again.
        left_out = self.gone_lines.allow(why)
        if left_out is None:
            return
        more = since_last_line(left_out, "time", "times")
        position = self.store.positions.get(self.spec.name, 0)
        if why == pull.DELETED:
            log.warning("the consumer %s of stream %s is gone from NATS (deleted, by hand or with its stream); making "
                        "it again and reading %s from %d%s", self.durable, self.spec.name, self.spec.name, position + 1,
                        more)
            return
        # No responders: told "gone (deleted?)", the operator looked for a deletion while a cluster had lost nodes.
        log.warning("the consumer %s of stream %s takes no pull request (503 no responders): no NATS node leads it "
                    "now (a cluster electing new leaders after a node was lost, or without a quorum: most of its "
                    "nodes down), or it was deleted; making it again and reading %s from %d once NATS answers. If "
                    "this goes on, start the cluster's missing nodes (`nats server report jetstream` shows them and "
                    "which streams have no leader)%s", self.durable, self.spec.name, self.spec.name, position + 1,
                    more)

    async def _replaced_under_us(self, seq: int, js: JetStreamContext) -> str | None:
        """Whether the server holds another message at the last one read (`seq`, the position, or before
        it for DECISIONS followed by our acks) than the one read, and if so which (None if not):
        back with an older copy of its store, published to past this position before the reconnect.
        Resumed after it, the new stream's messages up to it were skipped without a word; the start
        checks the same of a checkpointed position (`stream_identity.forget_positions_of_another_stream`)."""
        last = self._last_read
        # DECISIONS followed by our own publishes' acks is past the last message read: that one is
        # asked after (the one at the position was never read, and went unchecked while followed).
        if last is None or seq <= 0 or last[0] > seq:
            return None
        seq = last[0]
        try:
            # Through `js`, the re-creation's: unanswered, it raises and is asked again (`_retry`). Taken as the
            # same stream (`jsx.stored_us`, None when not known), ingest resumed after the position, and a new
            # stream's messages up to it were skipped without a word.
            msg = await js.get_msg(self.spec.name, seq)
        except NotFoundError:  # gone: reset_durable tells
            return None
        if msg.time is None or jsx.epoch_us(msg.time) == last[1]:  # the same message
            return None
        read_at = jsx.EPOCH + timedelta(microseconds=last[1])
        # Guessed "an older copy of its store" alone, the operator looked for a restored backup where the stream
        # had been deleted and made again: a copy keeps its creation time, a stream made again has a later one.
        try:
            created = (await js.stream_info(self.spec.name)).created
        except NotFoundError:  # gone again: the guess stands
            created = None
        made_again = jsx.made_again_after(self.spec.name, created, read_at, "the last message read was stored")
        cause = (f"{made_again}: deleted and created again (or its store lost, and the stream created anew), and "
                 "published to since" if made_again else "its store replaced by an older copy and published to since?")
        log.error("stream %s came back with another message at %d, the last one read (NATS stored it at another "
                  "time): %s. Reading %s from its first message: what was folded stays, and nothing is counted "
                  "twice.", self.spec.name, seq, cause, self.spec.name)
        return f"it came back with another message at {seq}, the last one read; {cause}"

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.reset_needed:
                self.reset_needed = False
                quick = self.nc.jetstream(timeout=RESET_CALL_TIMEOUT_S)
                lag = asyncio.ensure_future(self.lag_watch.while_recreating(quick))
                try:
                    await self._retry(functools.partial(self._restart_consumer, quick), "re-create the consumer",
                                      asking_again=True)
                finally:
                    lag.cancel()
                continue
            if not self.buffer:
                if self.puller and self.puller.idle:
                    self.catch_up.read(0, 0)  # a catch-up told (the start's, a stream read again whole) has ended
                    self.caught_up, self.replaying = True, None
                    if self.read is not None:
                        self.read.advance(0, True)
                    self.lag = 0
                    self._lag.set(0)
                continue
            messages = self._take_buffer()
            start = 0
            while start < len(messages) and not self.reset_needed:
                self._held = messages[start:]  # delivered, not acknowledged yet (`_keep_in_progress`)
                chunk = messages[start : start + CHUNK]
                if self.after is not None and not self.after.caught_up:
                    chunk = await self._readable_after(chunk)
                if self.room is not None and not self.caught_up:
                    chunk = await self._within_room(chunk)
                if self.reset_needed:
                    break
                if await self._skips_stored(chunk):
                    self.request_reset()  # read again from the position; what follows it here is dropped
                    break
                # A user's state loaded from the checkpoint on first use can fail (the database is
                # away): the chunk is folded again once it is back. Events folded before the
                # failure are ignored then as seen (ids), and the learner's credits are idempotent.
                await self._retry(functools.partial(self.process, chunk),
                                  "fold events (a user's state could not be loaded from the checkpoint)")
                start += len(chunk)
                await asyncio.sleep(0)
            self._held = []
            await self._hold_if_checkpoints_lag()
            if self.buffer:
                self.wake.set()

    async def _skips_stored(self, chunk: list[pull.RawMsg]) -> bool:
        """Whether `chunk` passes over a message the stream holds after the position. A consumer delivers in
        order, but on a NATS cluster one whose leader was lost with messages on their way to us goes on after
        them on its new leader, and the next acknowledgement (ack-all) takes them as read: lost to the fold, or
        for DECISIONS to the learner's join cache. Asked of the server once per hole (retention passed over some,
        a message was deleted), and only when the chunk is not the usual run of deliveries (`delivered_in_turn`)."""
        position = self.store.positions.get(self.spec.name, 0)
        first, last = ack_subject.sequences(chunk[0][1]), ack_subject.sequences(chunk[-1][1])
        if delivered_in_turn(position, first, last, len(chunk)):  # two parses a chunk
            return False
        for expected, seq in holes_after(position, [ack_subject.sequences(reply)[0] for _, reply, _ in chunk]):
            try:
                stored = await jsx.next_stored(self.js, self.spec, expected)
            except Exception:  # noqa: BLE001 - not known: read again from the position, which loses nothing
                stored = expected
            if stored is not None and stored < seq:
                log.warning("%s: message %d was not delivered, but %d was (a NATS node lost with it on its way?); "
                            "reading %s again from %d", self.spec.name, stored, seq, self.spec.name, position + 1)
                return True
        return False

    async def _wait_for_after(self, stored_ms: int) -> None:
        """Until the stream followed (`after`) has been read past `stored_ms`: minutes in all (a
        rebuild re-reads all of DECISIONS), chunk by chunk, with what is held kept in progress."""
        assert self.after is not None
        while True:
            try:
                async with asyncio.timeout(await self._keep_in_progress()):  # not wait_for: `periodic.woken`
                    await self.after.reached(stored_ms)
                return
            except TimeoutError:
                pass

    async def _readable_after(self, chunk: list[pull.RawMsg]) -> list[pull.RawMsg]:
        """The head of `chunk` stored before the stream followed (`after`) has been read to, waiting until there is
        one: each message is folded once that stream is read past when it was stored, as live. Waited for by the
        chunk's last message, a chunk of feedback asked DECISIONS for all the decisions stored until then, which the
        learner's join cache may not hold together (`_within_room`)."""
        assert self.after is not None
        while not self.after.caught_up:
            readable = stored_until(chunk, self.after.stored_ms - self.after_ahead_ms)
            if readable:
                return chunk[:readable]
            await self._wait_for_after(ack_subject.stored_ms(chunk[0][1]) + self.after_ahead_ms)
        return chunk

    async def _within_room(self, chunk: list[pull.RawMsg]) -> list[pull.RawMsg]:
        """The head of `chunk` there is `room` for, and at least what the stream that follows this one waits for
        (`ReadUpTo.wanted_ms`: the messages stored until then; the next one, stored after, is not folded for it but
        told as `read` past then), waiting until there is one: one of the two streams always reads on. What is held
        meanwhile is kept in progress."""
        assert self.room is not None and self.read is not None and self.followed_by is not None
        followed_by, read = self.followed_by, self.read
        while not self.reset_needed and not self.caught_up:
            followed_by.advanced.clear()
            read.asked.clear()
            fits = self.room([len(data) for _, _, data in chunk])
            wanted = 0
            if read.stored_ms < read.wanted_ms:
                wanted = stored_until(chunk, read.wanted_ms)
                if not wanted and self._next_in_turn(chunk):
                    # All stored until then is read: the next message was stored after. Folded to say so, it took
                    # the room of the oldest decision held, which left before its feedback (the one waiting) was
                    # read: live, that decision came after it. A rebuild counted `expired` what live had credited.
                    read.advance(ack_subject.stored_ms(chunk[0][1]) - 1, False)
                    continue
                wanted = max(wanted, 1)
            if max(fits, wanted):
                return chunk[: max(fits, wanted)]
            waits = [asyncio.ensure_future(followed_by.advanced.wait()), asyncio.ensure_future(read.asked.wait())]
            try:
                async with asyncio.timeout(await self._keep_in_progress()):  # not wait_for: `periodic.woken`
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                pass
            finally:
                for wait in waits:
                    wait.cancel()
        return chunk

    def _next_in_turn(self, chunk: list[pull.RawMsg]) -> bool:
        """Whether `chunk` begins with the message after the position: none passed over in between."""
        return ack_subject.sequences(chunk[0][1])[0] == self.store.positions.get(self.spec.name, 0) + 1

    async def _keep_in_progress(self) -> float:
        """Every `progress_every_s`, say that the messages delivered and not acknowledged yet (the
        batch being folded, and the buffer) are in progress: JetStream would deliver each again
        after every ack_wait that a wait (for `after`, for a retry, for checkpoints) outlasts, to
        be folded again, the bad ones dead-lettered again, and held twice. The seconds until the
        next time."""
        if time.monotonic() - self._progressed >= self.progress_every_s:
            self._progressed = time.monotonic()
            # Not while NATS is away: the reconnect re-creates the consumer, which delivers them anew.
            for _, reply, _ in (*self._held, *self.buffer) if self.nc.is_connected else ():
                try:
                    await self.nc.publish(reply.decode(), b"+WPI")
                except Exception:  # noqa: BLE001, S110 - advisory, as acks are
                    pass
        return max(self._progressed + self.progress_every_s - time.monotonic(), 0.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep, keeping what is held in progress and the lag told (`LagWatch.ask`)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await self.lag_watch.ask()
            await asyncio.sleep(min(left, await self._keep_in_progress(), self.lag_watch.held_every_s))

    async def process(self, chunk: list[pull.RawMsg]) -> None:
        self.between_chunks.clear()
        try:
            await self._process(chunk)
        finally:
            self.between_chunks.set()

    async def _process(self, chunk: list[pull.RawMsg]) -> None:
        store, rejected, live = self.store, [], self.current  # a replay's events are not live ones either
        taken = handed = 0  # the sink's answers: applied (True) or ignored, whatever the sink folds into
        limit, decode, sink, sink_reply, folds = self.max_event_bytes, self.decode, self.sink, self.sink_reply, self.folds
        before = self.before
        future_ms = None if self.max_future is None else int(self.max_future.total_seconds() * 1000)
        bound = None
        if future_ms is not None:
            # Ahead of when JetStream stored the event, not of this server's clock: a replay (a
            # restart, a rebuild from the log) then refuses exactly what the first pass refused.
            # Stored times grow with the sequence, so the chunk's first is a bound for them all.
            bound = store.max_ts_ms = ack_subject.stored_ms(chunk[0][1]) + future_ms
        for msg in chunk:
            subject, reply, data = msg
            if len(data) > limit:
                rejected.append((msg, Rejection("oversized", f"event is {len(data)} bytes; the limit is {limit} (TIPSTREAM_MAX_EVENT_BYTES)")))
                continue
            try:
                event = decode(subject, data)
            except Exception as error:  # noqa: BLE001 - as for a fold that fails, below: raised from
                # here, the chunk was retried for ever, and the stream held at this event for every user.
                event = processing_failed(self.spec.name, reply, error)
            if event.__class__ is Rejection:
                rejected.append((msg, event))
            else:
                if before is not None and (pending := before(reply)) is not None:
                    await pending
                    store.max_ts_ms = bound  # another stream's chunk may have set its own meanwhile
                try:
                    if folds and store.in_checkpoint_only(event.user_id):
                        await load_state(store, event.user_id)
                        # Reads add up (256 cold users after a start): past ack_wait, JetStream
                        # would deliver the chunk again.
                        await self._keep_in_progress()
                        store.max_ts_ms = bound  # another stream's chunk may have set its own meanwhile
                    taken += sink(event, reply) if sink_reply else sink(event)
                    handed += 1
                except FutureEvent:
                    assert future_ms is not None
                    own_limit = ack_subject.stored_ms(reply) + future_ms  # stored after the chunk's first
                    if own_limit > store.max_ts_ms:
                        bound = store.max_ts_ms = own_limit  # a bound for the rest of the chunk too
                        try:
                            taken += sink(event, reply) if sink_reply else sink(event)
                            handed += 1
                            continue
                        except FutureEvent:
                            pass
                    rejected.append((msg, Rejection(
                        "future_ts", f"ts {event.ts.isoformat()} is more than {self.max_future} ahead of when "
                        "JetStream stored it; fix the publisher's clock (or raise TIPSTREAM_MAX_FUTURE_S)")))
                except Refused as refused:
                    rejected.append((msg, refused.rejection))
                except StateUnavailable:
                    # The database is away: the chunk is folded again once it is back (`_retry`).
                    self._count(taken, handed)
                    self._counted_by_failed_try = max(handed, self._counted_by_failed_try)
                    raise
                except Exception as error:  # noqa: BLE001 - one event must not hold the stream for ever
                    # A bug of ours that this event brings out: retried, it held every later event
                    # of the stream, for every user. It is kept in the DLQ, as a bad event is.
                    rejected.append((msg, processing_failed(self.spec.name, reply, error)))
        if rejected:
            await self.dlq.publish(rejected, store.positions.get(self.spec.name, 0))
        last_reply = chunk[-1][1]
        seq, stored_ns, pending = ack_subject.ack_fields(last_reply)  # once a chunk: the ack subject parsed once
        self._last_read = (seq, stored_ns // 1000)  # µs, cut as `jsx.stored_us` reads it back
        store.advance(self.spec.name, seq)
        self.lag = pending
        self.catch_up.read(len(chunk), pending)  # nothing, unless a catch-up is told (`_restart_consumer`)
        if pending == 0:
            self.caught_up, self.replaying = True, None
        if self.read is not None:
            self.read.advance(stored_ns // 1_000_000, self.caught_up)
        try:
            await self.nc.publish(last_reply.decode(), b"+ACK")
        except Exception:  # noqa: BLE001, S110 - acks are advisory; the checkpoint decides
            pass
        self._count(taken, handed)
        self._counted_by_failed_try = 0
        if live:  # the chunk's first event waited longest; once per chunk, not a cost per event
            self._fold_delay.observe(max(time.time() - ack_subject.stored_ms(chunk[0][1]) / 1000, 0.0))
        self._lag.set(pending)
        self.checkpointer.nudge()

    def _count(self, taken: int, handed: int) -> None:
        """Count a try's answers, leaving out the events an earlier try of the chunk counted."""
        self._applied.inc(taken)  # those seen again were not taken: each was applied once
        self._ignored.inc(max(handed - self._counted_by_failed_try - taken, 0))

    async def _retry(self, action: Any, what: str, asking_again: bool = False) -> Any:
        """Transient failures (NATS away) are retried with backoff; nothing is skipped. `asking_again`: an
        action whose call went unanswered, having waited out its bound, is tried again at once."""
        delay, failed_at, tries = 0.2, 0.0, 0
        # A failure that lasts (a DLQ copy a full disk leaves unanswered: a line per 15 s for as long as it was full,
        # for each stream) is told at once, then once a minute with the retries since; a new kind of failure at once.
        lines = LogThrottle(clock=self.clock)
        while True:
            try:
                done = await action()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001
                if asking_again and isinstance(error, TimeoutError):
                    left_out = self._unanswered_lines.allow(None)
                    if left_out is not None:
                        # Told without a cause or a fix, the operator of a cluster that had lost a node could not
                        # tell an election of seconds from a fault to mend.
                        log.warning("could not %s for %s (%s: no answer); asking again%s%s", what, self.spec.name,
                                    error, since_last_line(left_out, "unanswered ask", "unanswered asks"),
                                    NO_ANSWER_FIX)
                    continue
                # A full JetStream refuses the DLQ's copy, and the stream waits at that event until it has room.
                fix = jsx.STORAGE_FULL_FIX if getattr(error, "err_code", None) in jsx.STORAGE_FULL else ""
                if isinstance(error, TimeoutError):  # nats-py's: told as "nats: timeout" alone, with no cause or fix
                    fix = PUBLISH_NO_ANSWER_FIX if what.startswith("publish") else NO_ANSWER_FIX
                left_out = lines.allow((type(error), getattr(error, "err_code", None)))
                if left_out is not None:
                    log.warning("could not %s for %s (%s); retrying in %.1fs%s%s", what, self.spec.name, error, delay,
                                since_last_line(left_out, "retry", "retries"), fix)
                failed_at, tries = failed_at if tries else self.clock(), tries + 1
                if isinstance(error, StateUnavailable):  # a user's state: retried once the database is back
                    await self.checkpointer.wait_to_retry(delay, self._pause)
                else:
                    await self._pause(delay)
                delay = min(delay * 2, 10.0)
                continue
            if tries:  # its warnings were the last word: the operator was left to guess whether the stream still waited
                log.info("%s for %s: done, %.0f s after the first try that failed (tried again %s)", what,
                         self.spec.name, self.clock() - failed_at, counted(tries, "time", "times"))
            return done

    def _lagging(self, share: int) -> bool:
        """Whether 1/`share` of a bound is reached: the events applied and not checkpointed, or this
        stream's own `backlog`. At least 1: a bound of 1 halved was 0, reached by nothing waiting, and the
        hold at it never ended."""
        return (self.checkpointer.uncheckpointed >= max(self.max_uncheckpointed // share, 1)
                or (self.backlog is not None and self.backlog() >= max(self.max_backlog // share, 1)))

    async def _hold_if_checkpoints_lag(self) -> None:
        """Back-pressure: stop pulling while too many applied events (or `backlog`) wait for a checkpoint."""
        if self.puller is None or not self._lagging(1):
            return
        left_out = self._hold_lines.allow(None)
        if left_out is not None:
            log.warning("%s not checkpointed yet%s: %s; pausing %s until a checkpoint commits%s",
                        counted(self.checkpointer.uncheckpointed, "event", "events"),
                        f", {counted(self.backlog(), 'row', 'rows')} waiting (at most {self.max_backlog:,})"
                        if self.backlog is not None else "",
                        self.checkpointer.behind_because(), self.spec.name,
                        since_last_line(left_out, "pause", "pauses"))
        self.puller.paused = True
        while self._lagging(2):
            self.checkpointer.wanted()  # not the next timed one: `Checkpointer.wanted`
            await self._pause(HOLD_RECHECK_S)
        if self.puller is not None:  # None: the DECISIONS tail stopped reading meanwhile (pause_reading)
            self.puller.resume()
