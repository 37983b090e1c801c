"""A stream's rejected messages moved aside to the DLQ (`dlq.<subject>`), each with its reason, once: what the DLQ
held of the stream at the start, or since the stream was created again, is not published again; what of it
is already there is read back by `streams/dead_letters.py`, which also says how each copy names its batch.

Pure parts (`names_no_event`, `dlq_subject`, `processing_failed`'s rejection) beside the publisher (`DeadLettering`) that ingest
(`app/ingest.py`) hands a chunk's rejections to; it retries through ingest's own `_retry`, which keeps what
is held in progress meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from nats.js.errors import NoStreamResponseError, NotFoundError

from app.metrics import METRICS
from streams import ack_subject, dead_letters, pull
from streams import jetstream as jsx
from streams.events import Rejection, lenient_loads
from streams.log_throttle import LogThrottle, counted

# Ingest's: what an operator filters on, and what its lines have always been told under.
log = logging.getLogger("tipstream.ingest")


def names_no_event(data: bytes, kind: str) -> bool:
    """Whether a dead letter's body leaves its event unnamed: not JSON, or without a string `id`. An
    oversized body is taken as named (not read whole again to find out).

    >>> names_no_event(b'{"id": "evt-1", "type": "nope"}', "unknown_type"), names_no_event(b'{"id": ', "invalid_json")
    (False, True)
    >>> names_no_event(b'{"type": "task.created"}', "missing_field"), names_no_event(b"[1]", "invalid_field")
    (True, True)
    """
    if kind == "oversized":
        return False
    payload = lenient_loads(data)
    return not (isinstance(payload, dict) and isinstance(payload.get("id"), str) and payload["id"])


# A subject, as the DLQ's own, at most this long: a publisher may use one near the server's control
# line limit (4 KiB), and `dlq.` with a reply inbox took the DLQ publish past it. The server then
# closed tipstream's connection, for good, at every start, while the event stayed in the stream.
DLQ_SUBJECT_MAX = 1024
# Dead-lettered events logged one by one per stream and minute; the rest are counted and told in
# one line (tipstream_dlq_total counts each): a publisher sending bad events wrote a line apiece.
DLQ_LOG_PER_MINUTE = 10


def dlq_subject(subject: str) -> str:
    """`dlq.<subject>`, or `dlq.<family>.subject_too_long` for a subject over DLQ_SUBJECT_MAX bytes (the
    header Tipstream-Original-Subject holds it whole).

    >>> dlq_subject("signals.task.created"), dlq_subject("signals." + "a" * 2000)
    ('dlq.signals.task.created', 'dlq.signals.subject_too_long')
    """
    if len(subject.encode()) <= DLQ_SUBJECT_MAX:
        return f"dlq.{subject}"
    return f"dlq.{subject.split('.', 1)[0]}.subject_too_long"


def processing_failed(stream: str, reply: bytes, error: Exception) -> Rejection:
    """The rejection of an event whose decoding or folding raised (a bug of ours), logged with its traceback."""
    log.error("%s #%d could not be processed; it goes to the DLQ and the stream moves on. This is a bug in "
              "tipstream: please report it with the DLQ message", stream, ack_subject.stream_sequence(reply)[0],
              exc_info=error)
    return Rejection("processing_failed", f"processing failed: {type(error).__name__}: {error} (a bug in "
                                          "tipstream; once fixed, publish the event again)")


class DeadLettering:
    """Publishes a stream's rejected messages to the DLQ, up to `dead_letters.DLQ_IN_FLIGHT` at once, and waits
    for JetStream to store them all, retried (`retry`: ingest's) until it has; counted and logged as stored."""

    def __init__(self, nc: pull.IngestClient, js: JetStreamContext, spec: jsx.StreamSpec, *,
                 retry: Callable[[Callable[[], Awaitable[Any]], str], Awaitable[Any]], upto: int = 0,
                 ensure_streams: Callable[[], Awaitable[None]] | None = None) -> None:
        self.nc, self.js, self.spec, self.retry, self.ensure_streams = nc, js, spec, retry, ensure_streams
        # Messages up to here were read before this start, and the bad ones dead-lettered then: a
        # stream re-read from further back (DECISIONS, to rebuild the learner's join cache; FEEDBACK,
        # from the learner's last snapshot) must not put them in the DLQ again on every restart.
        self.dead_lettered = dead_letters.DeadLettered(upto=upto)
        # The newest batch, found stored in part at the start: the next batch carries it on (`dead_letters.batches`).
        self.carried: dead_letters.DeadLettered | None = None
        self.msg_id_prefix = dead_letters.dlq_msg_id_prefix(spec.name, None)  # the stream's creation time, at the start
        self.lines = LogThrottle(per_window=DLQ_LOG_PER_MINUTE)

    async def start(self, info: StreamInfo) -> None:
        """What the DLQ holds of the stream (`info`, as the start found it) already."""
        self.msg_id_prefix = dead_letters.dlq_msg_id_prefix(self.spec.name, info.created)
        checkpointed = self.dead_lettered.upto if self.dead_lettered.upto <= info.state.last_seq else 0
        # Dead-lettered past the last checkpoint, before a crash: read again now, but not dead-lettered
        # again (JetStream's duplicate window covers only a quick restart).
        found = await dead_letters.last_dead_lettered(self.js, self.spec)
        self.dead_lettered = self.carried = dataclasses.replace(found, upto=max(checkpointed, found.upto))

    async def renew(self, js: JetStreamContext) -> None:
        """The stream created again (asked through `js`): what the DLQ holds of the new one, and its ids."""
        # Set first: asking failed (NATS away again), the retry saw no re-created stream, and the
        # old stream's watermark stayed, the new stream's bad events below it in the DLQ nowhere.
        self.dead_lettered = self.carried = dead_letters.DeadLettered()
        self.dead_lettered = self.carried = await dead_letters.last_dead_lettered(js, self.spec)
        created = (await js.stream_info(self.spec.name)).created
        self.msg_id_prefix = dead_letters.dlq_msg_id_prefix(self.spec.name, created)

    async def publish(self, rejected: list[tuple[pull.RawMsg, Rejection]], position: int) -> None:
        """Steps:
        1. Leave out what was dead-lettered before this start (`dead_lettered`), or is at or below the position.
        2. Publish up to `DLQ_IN_FLIGHT` at once, each naming its batch (`dead_letters.batch_header`).
        3. Retry those the DLQ did not store until it holds the whole batch (the next batch waits: a start
           takes every dead letter below a batch's first as stored). The first after a start that found
           the newest batch stored in part carries that batch on (`dead_letters.batches`), chunk after
           chunk until the DLQ holds its count (`dead_letters.carried_on`).
        """
        # At or below the position, a message is one delivered again (its acknowledgement lost, or ack_wait
        # passed): its chunk was done, its dead letter in the DLQ, as a start takes the checkpoint's (`start`).
        done = self.dead_lettered
        todo = {seq: (msg, rejection, seq) for msg, rejection in rejected
                if (seq := ack_subject.stream_sequence(msg[1])[0]) > position and seq not in done}
        for seqs, batch in dead_letters.batches(sorted(todo), self.carried):
            left = [todo[seq] for seq in seqs]
            await self.retry(functools.partial(self._publish_batch, left, batch, []), "publish to the DLQ")
            self.carried = dead_letters.carried_on(self.carried, seqs)

    async def _publish_batch(self, left: list[tuple[pull.RawMsg, Rejection, int]], batch: str,
                             tried: list[bool]) -> None:
        """Publish `left` at once; each the DLQ stored leaves it, and the first failure is raised (`retry`).
        Tried before (`tried`), what of the batch the DLQ holds leaves it first."""
        if tried:
            # Stored, its acknowledgement lost (NATS stopped just after, say): published again after an outage
            # longer than JetStream's duplicate window, the copy was stored twice. Read back as a start reads
            # the newest batch: this one, the batches before it whole.
            stored = await dead_letters.last_dead_lettered(self.js, self.spec)
            for _, rejection, seq in left:
                if seq in stored:  # its publish raised, so it was not counted (nor logged) then
                    self._stored(seq, rejection)
            left[:] = [item for item in left if item[2] not in stored]
        tried.append(True)
        for again in (False, True):
            results = await asyncio.gather(*(self._publish_one(msg, rejection, seq, batch) for msg, rejection, seq in left),
                                           return_exceptions=True)
            failed = [(item, result) for item, result in zip(left, results, strict=True) if result is not None]
            left[:] = [item for item, _ in failed]
            if not failed:
                return
            error = failed[0][1]
            if again or self.ensure_streams is None or not any(
                    isinstance(result, NoStreamResponseError) for _, result in failed):
                raise error
            # No stream takes `dlq.>` (the DLQ deleted, to empty it, say): retried as it was, the stream stopped
            # at this event until a restart made the DLQ again. Made again now; also asked when a cluster's
            # DLQ has no leader for a moment, which changes nothing. Then retried as any failed publish.
            log.warning("no stream takes %s (was the DLQ deleted?); creating the streams again",
                        dlq_subject(left[0][0][0]))
            await self.ensure_streams()

    async def _publish_one(self, msg: pull.RawMsg, rejection: Rejection, seq: int, batch: str) -> None:
        subject, _, data = msg
        # On one line, in UTF-8: a line break in a header value (an exception's words, say) breaks the
        # message's headers, and a lone surrogate cannot be encoded; either failed the publish for good.
        reason = " ".join(rejection.reason.split()).encode("utf-8", "backslashreplace").decode()
        headers = {
            jsx.DLQ_REASON: reason[:1024],
            jsx.DLQ_KIND: rejection.kind,
            jsx.DLQ_SUBJECT: subject,
            jsx.DLQ_STREAM: self.spec.name,
            jsx.DLQ_SEQ: str(seq),
            dead_letters.DLQ_BATCH: batch,
            "Nats-Msg-Id": f"{self.msg_id_prefix}{seq}",
        }
        if names_no_event(data, rejection.kind):
            # What it was published with (its Nats-Msg-Id, a trace id): ingest reads bodies only, and the copy of a
            # body that names no event (not JSON, say) could not be traced back. Asked of the stream, a round trip:
            # for every dead letter, it halved how many a second a publisher's bad deploy could be moved aside
            # (bench/ingest.py --invalid-every), and the others name themselves (and their original is at
            # DLQ_STREAM / DLQ_SEQ while the stream keeps it). An event erased meanwhile has none.
            headers.update(jsx.original_headers(await self._published_headers(seq)))
        # The server refuses a message whose headers and body together exceed its max_payload, and
        # drops the connection (nats-py checks the body alone): an event near that size would never
        # be stored, and each retry would cut every stream off again. Its head is kept instead; the
        # original stream and sequence above lead to the whole event.
        room = self.nc.max_payload - jsx.header_bytes({**headers, jsx.DLQ_TRUNCATED: str(len(data))})
        if len(data) > room:
            headers[jsx.DLQ_TRUNCATED] = str(len(data))
            data = data[: max(room, 0)]
        await self.js.publish(dlq_subject(subject), data, headers=headers)
        self._stored(seq, rejection)

    async def _published_headers(self, seq: int) -> dict[str, str] | None:
        try:
            return (await self.js.get_msg(self.spec.name, seq)).headers
        except NotFoundError:  # gone (erased, aged out): the copy is still made
            return None

    def _stored(self, seq: int, rejection: Rejection) -> None:
        """Counted (`tipstream_dlq_total`) and logged, once the DLQ holds it."""
        METRICS.dlq.labels(self.spec.name, rejection.kind).inc()
        left_out = self.lines.allow(None)
        if left_out:
            log.info("DLQ %s: %s dead-lettered after the last %d logged, not logged one by one "
                     "(tipstream_dlq_total counts each; their reasons are in the DLQ's headers)",
                     self.spec.name, counted(left_out, "more event", "more events"), DLQ_LOG_PER_MINUTE)
        if left_out is not None:
            log.info("DLQ %s #%d: %s", self.spec.name, seq, rejection.reason)
