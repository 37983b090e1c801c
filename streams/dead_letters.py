"""What of a stream is in the DLQ already, read back from the DLQ at a start.

Ingest publishes a chunk's dead letters up to `DLQ_IN_FLIGHT` at once (`DeadLettering.publish`, app/dead_lettering.py):
one at a time, each waited for, a flood of bad events was moved aside at ~3,000 a second, and half the
events bad cut ingest to 5,800 a second (at once: every event bad, ~10,000 a second; half, ~15,000: docs/architecture.md, "The ingest path"). Published at once, the DLQ may store a later one and not an
earlier (a reconnect between them), so each copy names its batch, `Tipstream-Dlq-Batch: <first>/<count>`
(the lowest sequence of the batch and how many it has): a batch is published and retried until the DLQ
holds all of it before the next begins, so every dead letter of the stream below a copy's `<first>` is
in the DLQ. Of the newest batch, a start finds which are in it (`DeadLettered.above`), by reading the
DLQ back from its newest copies until it has found `<count>` or met an older batch. So a crash loses no
dead letter and stores none twice. A copy without the header was published alone, before batches.

What a start sends of a batch found stored in part carries that batch on (`batches`): its first batch
names the same `<first>`, and counts what the DLQ holds of it too. Sent as a batch of its own, from
its lowest sequence, a copy of the old batch stored above that (past a hole) was taken as not
stored by the next start, and sent a second time. Its missing copies may come in more than one chunk
(how many messages a pull brings varies), so the batch is carried on until the DLQ holds its count
(`carried_on`), and each copy names at least that count: a copy sent in the first chunk, named with
only what had been found and sent by then, made the batch whole to the next start, which took the
rest, in a later chunk that a crash cut off, as stored.

Whoever may publish on `dlq.>` can write a copy too, so only a sequence ingest could have written is
taken: one the stream has reached, in digits int() reads, stored after the stream was created.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from streams.jetstream import DLQ, DLQ_SEQ, DLQ_STREAM, StreamSpec, epoch_us

log = logging.getLogger("tipstream.jetstream")

DLQ_BATCH = "Tipstream-Dlq-Batch"
DLQ_IN_FLIGHT = 256  # dead letters published at once: a crash leaves at most this many to look for
# Copies read back looking for the newest batch's: past it, the rest of the batch is published again,
# and JetStream's duplicate window drops those stored within it (the DLQ deleted in part, say).
SCAN_MAX = 4 * DLQ_IN_FLIGHT * 3


@dataclass(frozen=True)
class Copy:
    """A DLQ copy of one of the stream's dead letters: its sequence and its batch's first and count."""

    seq: int
    first: int
    count: int


@dataclass(frozen=True)
class DeadLettered:
    """The stream's dead letters in the DLQ: every one at or below `upto`, and those in `above`, of the
    newest batch, stored in part, which began at `first` (the next batch carries it on: `batches`).

    >>> done = DeadLettered(upto=9, above=frozenset({12}))
    >>> [seq in done for seq in (9, 10, 12)]
    [True, False, True]
    """

    upto: int = 0
    above: frozenset[int] = field(default_factory=frozenset)
    first: int = 0
    count: int = 0  # how many the newest batch has, when stored in part

    def __contains__(self, seq: int) -> bool:
        return seq <= self.upto or seq in self.above


def batch_header(seqs: list[int]) -> str:
    """The `DLQ_BATCH` value of the dead letters `seqs`, published at once.

    >>> batch_header([14, 12, 19])
    '12/3'
    """
    return f"{min(seqs)}/{len(seqs)}"


def batches(seqs: list[int], carried: DeadLettered | None = None) -> list[tuple[list[int], str]]:
    """`seqs` (none of them dead-lettered) cut into batches of up to `DLQ_IN_FLIGHT`, each with its
    `DLQ_BATCH` value; the first carries on `carried`'s batch stored in part, when a start found one.

    >>> batches([3, 5, 8])
    [([3, 5, 8], '3/3')]
    >>> batches([2, 6], DeadLettered(upto=0, above=frozenset({1, 3, 4}), first=1, count=5))
    [([2, 6], '1/5')]
    >>> batches([2], DeadLettered(upto=0, above=frozenset({1, 3, 4}), first=1, count=5))  # 6 in a later chunk
    [([2], '1/5')]
    """
    out: list[tuple[list[int], str]] = []
    if carried is not None and carried.above and carried.first:
        room = DLQ_IN_FLIGHT - len(carried.above)  # found fewer than its count, which is at most DLQ_IN_FLIGHT
        if seqs and room > 0:
            count = max(carried.count, len(carried.above) + len(seqs[:room]))
            out.append((seqs[:room], f"{carried.first}/{count}"))
            seqs = seqs[room:]
    for start in range(0, len(seqs), DLQ_IN_FLIGHT):
        batch = seqs[start:start + DLQ_IN_FLIGHT]
        out.append((batch, batch_header(batch)))
    return out


def carried_on(carried: DeadLettered | None, sent: list[int]) -> DeadLettered | None:
    """What is left to carry on of `carried`'s batch once `sent` (its first batch from `batches`) is stored:
    None once the DLQ holds its count.

    >>> part = DeadLettered(upto=0, above=frozenset({1, 3, 4}), first=1, count=5)
    >>> carried_on(part, [2]), carried_on(carried_on(part, [2]), [6])
    (DeadLettered(upto=0, above=frozenset({1, 2, 3, 4}), first=1, count=5), None)
    """
    if carried is None or not carried.above or not carried.first:
        return None
    above = carried.above | frozenset(sent)
    return None if len(above) >= carried.count else dataclasses.replace(carried, above=above)


def _digits(text: Any, most: int = 20) -> int | None:
    """An int from decimal digits, or None: int() also takes '+1', ' 1', '1_0' and other scripts' digits."""
    if isinstance(text, str) and 0 < len(text) <= most and text.isascii() and text.isdigit():
        return int(text)
    return None


def copy_of(headers: dict[str, str] | None, stream: str, last_seq: int) -> Copy | None:
    """The copy these DLQ headers describe, if ingest of `stream` (at `last_seq`) could have written it.

    >>> copy_of({DLQ_STREAM: "SIGNALS", DLQ_SEQ: "7", DLQ_BATCH: "5/3"}, "SIGNALS", last_seq=10)
    Copy(seq=7, first=5, count=3)
    >>> copy_of({DLQ_STREAM: "SIGNALS", DLQ_SEQ: "7"}, "SIGNALS", last_seq=10)  # published alone
    Copy(seq=7, first=7, count=1)
    >>> copy_of({DLQ_STREAM: "SIGNALS", DLQ_SEQ: "99"}, "SIGNALS", last_seq=10) is None  # past the stream's end
    True
    >>> copy_of({DLQ_STREAM: "SIGNALS", DLQ_SEQ: "7", DLQ_BATCH: "8/3"}, "SIGNALS", 10)  # a batch past its own
    Copy(seq=7, first=7, count=1)
    """
    headers = headers or {}
    seq = _digits(headers.get(DLQ_SEQ))
    if headers.get(DLQ_STREAM) != stream or seq is None or seq > last_seq:
        return None
    first, _, count = str(headers.get(DLQ_BATCH, "")).partition("/")
    first_seq, count_n = _digits(first), _digits(count, 6)
    if first_seq is None or count_n is None or not first_seq <= seq or not 1 <= count_n <= DLQ_IN_FLIGHT:
        return Copy(seq, seq, 1)
    return Copy(seq, first_seq, count_n)


def dead_lettered(newest: list[Copy], older: list[Copy]) -> DeadLettered:
    """What is in the DLQ, from the newest copy of each DLQ subject (`newest`) and the copies before
    them, newest first (`older`, read as far as needed: `missing`).

    >>> newest = [Copy(7, 5, 3), Copy(3, 3, 1)]
    >>> dead_lettered(newest, [])
    DeadLettered(upto=4, above=frozenset({7}), first=5, count=3)
    >>> dead_lettered(newest, [Copy(6, 5, 3), Copy(5, 5, 3)])  # the whole batch is there
    DeadLettered(upto=7, above=frozenset(), first=0, count=0)
    """
    if not newest:
        return DeadLettered()
    first, found, count = _newest_batch(newest, older)
    if len(found) >= count:
        return DeadLettered(upto=max(found))
    return DeadLettered(upto=first - 1, above=frozenset(found), first=first, count=count)


def missing(newest: list[Copy], older: list[Copy]) -> bool:
    """Whether copies before `older`'s last may still be of the newest batch: fewer of it found than its
    count, and no copy of an older batch met yet (the batches are published one after another)."""
    if not newest:
        return False
    first, found, count = _newest_batch(newest, older)
    return len(found) < count and not any(copy.first < first for copy in older)


def _newest_batch(newest: list[Copy], older: list[Copy]) -> tuple[int, set[int], int]:
    """The newest batch's first sequence, those of its copies found, and its count."""
    first = max(copy.first for copy in newest)
    found = {copy.seq for copy in [*newest, *older] if copy.first == first}
    return first, found, max(copy.count for copy in newest if copy.first == first)


async def last_dead_lettered(js: JetStreamContext, spec: StreamSpec) -> DeadLettered:
    """What of `spec` is in the DLQ already (module docstring). A copy stored before the stream was
    created came from an earlier stream of that name (re-created, its sequences started again) and
    says nothing of this one."""
    info = await js.stream_info(spec.name)
    created, last_seq = info.created, info.state.last_seq

    def ours(msg: Any) -> Copy | None:
        if created and msg.time and msg.time < created:
            return None
        return copy_of(msg.headers, spec.name, last_seq)

    newest: list[Copy] = []
    newest_at: dict[Copy, int] = {}  # each newest copy's DLQ sequence: the newest batch is read back from there
    for subject in spec.subjects:
        try:
            last = await js.get_last_msg(DLQ.name, f"dlq.{subject}")
        except NotFoundError:
            continue
        copy = ours(last)
        if copy is not None:
            newest.append(copy)
            newest_at[copy] = last.seq or 0
    first = max((copy.first for copy in newest), default=0)
    older: list[Copy] = []
    at, read = max((at for copy, at in newest_at.items() if copy.first == first), default=0) - 1, 0
    dlq_first = (await js.stream_info(DLQ.name)).state.first_seq if missing(newest, older) else at + 1
    while at >= max(dlq_first, 1) and missing(newest, older):
        if read >= SCAN_MAX:
            log.warning("read %d DLQ messages back without finding every dead letter of %s's last batch; the rest "
                        "are published again (JetStream's duplicate window drops those it stored within it)",
                        read, spec.name)
            break
        try:
            msg = await js.get_msg(DLQ.name, at)
        except NotFoundError:  # deleted
            msg = None
        at, read = at - 1, read + 1
        if msg is None:
            continue
        if created and msg.time and msg.time < created:
            break  # older than the stream: so is all before it
        copy = ours(msg)
        if copy is not None:
            older.append(copy)
    return dead_lettered(newest, older)


def dlq_msg_id_prefix(stream: str, created: datetime | None) -> str:
    """How the `Nats-Msg-Id` of a DLQ copy from `stream` begins; its sequence follows. With the stream's
    creation time: a stream re-created within the DLQ's duplicate window numbers its events from 1 again,
    and a copy named by stream and sequence alone was dropped as its predecessor's duplicate.

    >>> from datetime import UTC
    >>> dlq_msg_id_prefix("SIGNALS", datetime(2026, 12, 6, 21, 30, tzinfo=UTC))
    'dlq:SIGNALS:1796592600000000:'
    >>> dlq_msg_id_prefix("SIGNALS", None)
    'dlq:SIGNALS:'
    """
    if created is None:
        return f"dlq:{stream}:"
    return f"dlq:{stream}:{epoch_us(created)}:"
