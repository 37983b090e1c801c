"""Erase users' messages from a JetStream stream: the log part of forgetting a user.

Subjects do not carry the user (`signals.<type>`, `dlq.<subject>`, ...), so `scrub` reads the
stream from its first message through a given sequence and deletes each message whose body
belongs to one of the users. Deletion is the server's default (`STREAM.MSG.DELETE` without
`no_erase`), which overwrites the message in the store with random bytes, not only unlinks it.

Which user a body belongs to (`owners`):
- a body that parses as a JSON object: its top-level `user_id` (SIGNALS, FEEDBACK, DECISIONS, and
  DLQ copies of such events that were rejected for their content). With a key given twice, the
  last counts, as orjson (and the ingest's parser) read it. One orjson refuses and the ingest takes
  (half a surrogate pair, a number past a float's range, in a field the contract does not name) is
  parsed by Python's `json` instead;
- a body that does not parse (a DLQ copy of invalid JSON, invalid UTF-8, or one cut to fit,
  `Tipstream-Dlq-Truncated`): every `"user_id": "<JSON string>"` in its bytes, at any depth, the
  string decoded. Limits: a key itself spelt with escapes (`"user\\u005fid"`), or a body cut off
  before its id's closing quote, is not attributed to anyone by its bytes; a DLQ copy cut so
  (`Tipstream-Dlq-Truncated`) goes when its original, read from its stream (the message there
  whose head it is: `head_of`), is the user's (`cut_copy_of`), else it is kept; a nested `user_id`
  (a decision's `features`) is attributed too, but it names the same user there.

Scanning is close to the raw read rate because almost no body is parsed: one regular expression
over its bytes reads each `"user_id": "<value>"` spelt without escapes, and only a body whose value
is one of the ids, or that holds any backslash (every other spelling of an id, or of the key, needs
one), is parsed (`may_belong`).

Reading (bench/scrub.py, 50,000 300-byte events, this 2-core machine): the scrub's own AckNone pull consumer
with tipstream's `IngestClient` (raw inbox, no `Msg` objects) reads ~175k msg/s, the scan with matching ~140k
(0.78); the same pull through a plain nats-py client ~80k, nats-py's ordered push consumer ~70k; batched
direct gets (`$JS.API.DIRECT.GET` with a batch) ~160k, but need `allow_direct`, which tipstream's streams
are not created with, and only one request can be in flight (the next starts after the last sequence got).

Erasing: the server overwrites the message's record in its block file with random bytes and fsyncs, one
at a time per stream: ~150 messages/s here (no_erase: 23,000/s). It does not overwrite on a store encrypted
at rest (nats-server's filestore turns `secure` off there: the key protects it). On a cluster (replicas > 1)
the delete goes through the stream's RAFT group and each node erases its copy; each node's RAFT log holds the
original until it is compacted after the stream's next snapshot: 125-165 s later on a 3-node 2.15.1 cluster
(a byte search of every node's store, docs/operations.md, "Forgetting a user").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from streams.ack_subject import ack_position
from streams.jetstream import (
    CONFIG_ONLY_TRIES,
    DLQ_SEQ,
    DLQ_STREAM,
    DLQ_TRUNCATED,
    consumer_info_told,
)
from streams.pull import PENDING_HEADER, Detached

log = logging.getLogger("tipstream.scrub")

PROGRESS_EVERY = 10_000
BATCH = 1024  # messages per pull request; the next is asked for when half has arrived
PULL_EXPIRES_S = 1.0  # an unfilled request ends this long after the stream ran out: how the end is known
STALL_S = PULL_EXPIRES_S + 4.0  # nothing at all this long (a lost request, a reconnect): read again from where we are
# Passes in a row read again from the same sequence (none got past it) before the read gives up (`read_through`):
# ~25 s of stalls. A pass that gets anywhere starts the count again, so a long read over a flaky link still ends.
STUCK_PASSES = 5
# The server erases one message at a time per stream, each overwritten in its block file and fsynced (6-7 ms
# here, ~150/s, against 23,000/s with no_erase), so more in flight only queue: 8 keep it busy, and keep the
# last of them answered well within a request's timeout on a slower disk.
DELETES_IN_FLIGHT = 8
# nats-server (2.15) tells a message already gone by the description, not by one code: "sequence N not found"
# (10043) where its block recorded the delete, "no message found" or "stream store EOF" (past the end: the stream
# was re-created) with 10057, the code of every refused delete, "message delete not permitted" (deny_delete) too.
GONE = ("no message found", "stream store eof", "not found")


class ScrubError(RuntimeError):
    """The server refused what scrubbing needs; the message names what an operator must change."""


def no_answer(asked: str, subjects: str) -> str:
    """What to say of a request to JetStream nobody answered in time. A server that hangs does that too (a forget
    during a 25 s stall of the embedded server said only "check that this NATS user may publish to ...")."""
    return (f"{asked}: the NATS server hangs or is overloaded (stopped, a slow disk; on a cluster, no node leads the "
            "stream until the others elect one), which a later try outlasts; or this NATS user is not allowed: check "
            f"that it may publish to {subjects} (the server log then names a permissions violation)")


@dataclass(frozen=True)
class ScrubReport:
    stream: str
    through_seq: int  # the last sequence read: the asked-for bound, or the stream's last when lower; 0: nothing
    scanned: int  # messages read (sequences up to through_seq that were stored while the scan passed them)
    matched: int  # of those, the users' messages
    deleted: int  # of those, deleted (and erased) by this run
    already_gone: int  # matched, but gone before the delete came (aged out, or deleted by another scrub)
    elapsed_s: float


_USER_ID = re.compile(rb'"user_id"[ \t\r\n]*:[ \t\r\n]*"((?:[^"\\]|\\.)*)"', re.DOTALL)
_PLAIN_USER_ID = re.compile(rb'"user_id"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')


def spellings(user_ids: Iterable[str]) -> frozenset[bytes]:
    """Each id as a body spells it without an escape: orjson's spelling, its quotes off.

    >>> sorted(spellings(["u-1", "zoë", 'a"b']))
    [b'a\\\\"b', b'u-1', b'zo\\xc3\\xab']
    """
    return frozenset(orjson.dumps(user_id)[1:-1] for user_id in user_ids)


def may_belong(body: bytes, spelt: frozenset[bytes]) -> bool:
    """Whether `body` can belong to a user spelt in `spelt` (`spellings`). False is certain, True is to be
    checked (`owners`). Without a backslash in it, a body can spell neither the key nor an id but one way,
    and can hold no quote inside a string, so each `"user_id": "<value>"` in its bytes is a key and its value,
    read whole: "u-1" does not find "u-10". With one, anything goes ("u-\\u0031", "user\\u005fid"). One
    regular expression whatever the number of ids: testing each id's spelling in turn was 1.0 µs a 300-byte
    body for one id, 4.0 for 8, 34 for 100; this 1.1-1.3 for any.

    >>> spelt = spellings(["u-1"])
    >>> may_belong(b'{"user_id": "u-10", "note": "u-1"}', spelt), may_belong(b'{"user_id" :"u-1"}', spelt)
    (False, True)
    >>> may_belong(b'{"user_id": "u-\\\\u0031"}', spelt), may_belong(b'{"x": "user_id", "user_id": "u-2"}', spelt)
    (True, False)
    """
    return b"\\" in body or any(value in spelt for value in _PLAIN_USER_ID.findall(body))


def owners(body: bytes) -> frozenset[str]:
    """The users `body` belongs to (see the module's docstring); usually one, none when it names none.

    >>> sorted(owners(b'{"id": "e-1", "user_id": "u-\\\\u00e9", "data": {"user_id": "other"}}'))
    ['u-\\xe9']
    >>> sorted(owners(b'{"id": "broken", "user_id": "u-1", "data": {"user_id": "u-2"'))  # invalid JSON
    ['u-1', 'u-2']
    >>> sorted(owners(b'{"user_id": "u-1\\xff", "user_id": "u-\\\\"q"}')), sorted(owners(b'{"user_id": "u-10'))
    (['u-"q'], [])
    >>> sorted(owners(b'[1, 2]')), sorted(owners(b'{"user_id": 42}'))
    ([], [])
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = _python_loads(body)
        if parsed is None:
            return frozenset(found for found in map(_json_string, _USER_ID.findall(body)) if found is not None)
    user_id = parsed.get("user_id") if isinstance(parsed, dict) else None
    return frozenset((user_id,)) if isinstance(user_id, str) else frozenset()


def _python_loads(body: bytes) -> Any:
    """`body` read by Python's parser, which takes what the ingest's does and orjson refuses: half a surrogate
    pair (`"\\ud83d"`, read by the ingest's slow path) or a number past a float's range (`1e999`) in a field the
    contract does not name. None when it is not JSON even so. Without it such an event, its `user_id` key spelt
    with an escape, was folded for its user and kept in the stream by the scrub."""
    try:
        return json.loads(body.decode())
    except (ValueError, RecursionError):  # not UTF-8 (UnicodeDecodeError is one), not JSON, nested past the stack
        return None


def _json_string(inner: bytes) -> str | None:
    """The text of a JSON string's inside, None when it is not valid JSON (a bad escape, invalid UTF-8)."""
    try:
        return orjson.loads(b'"' + inner + b'"')
    except orjson.JSONDecodeError:
        return None


def belongs(body: bytes, user_ids: frozenset[str], spelt: frozenset[bytes]) -> bool:
    """
    >>> ids = frozenset({"u-1"}); spelt = spellings(ids)
    >>> belongs(b'{"user_id": "u-1"}', ids, spelt), belongs(b'{"user_id": "u-10", "note": "u-1"}', ids, spelt)
    (True, False)
    """
    return may_belong(body, spelt) and not owners(body).isdisjoint(user_ids)


async def scrub(
    js: JetStreamContext, stream: str, user_ids: frozenset[str], through_seq: int,
    progress: Callable[[int, int], None] | None = None,
) -> ScrubReport:
    """Delete (with the server's erase) every message of `stream` up to and including `through_seq` that
    belongs to one of `user_ids`. Messages stored later are kept: new data, for the caller to judge; take
    `through_seq` from the stream's `state.last_seq` when the request is accepted.

    A missing stream, a bound below its first sequence or no ids: nothing to do. Idempotent: a second run
    matches nothing. `progress(scanned, through_seq)` is called every PROGRESS_EVERY messages and at the
    end. Raises ScrubError when the server refuses (no JetStream, no permission, deletes denied).

    The erasures' task scrubs, and the stop cancels it: its requests keep that cancellation (`IngestClient.request`).
    """
    started = time.perf_counter()
    info = await info_or_none(js, stream)
    if info is None or not info.state.messages or not user_ids:
        return ScrubReport(stream, 0, 0, 0, 0, 0, time.perf_counter() - started)
    first, bound = max(info.state.first_seq, 1), min(through_seq, info.state.last_seq)
    if bound < first:
        return ScrubReport(stream, 0, 0, 0, 0, 0, time.perf_counter() - started)
    spelt = spellings(user_ids)
    found: list[int] = []
    cut: list[Cut] = []

    def on_body(seq: int, body: bytes, headers: Any = None) -> None:
        if belongs(body, user_ids, spelt):
            found.append(seq)
        elif (original := cut_copy_of(headers)) is not None:
            cut.append((seq, *original, head_of(body)))

    scanned = await read_through(js, stream, first, bound, on_body, progress, with_headers=True)
    found.extend(await theirs_by_original(js, cut, user_ids, spelt))
    found.sort()
    if len(found) > 1000:
        log.info("erasing %d messages of %s: each is overwritten and synced to disk, at ~150/s", len(found), stream)
    deleted, gone = await delete_all(js, stream, found)
    report = ScrubReport(stream, bound, scanned, len(found), deleted, gone, time.perf_counter() - started)
    log.info("scrubbed %s through %d: %d scanned, %d matched, %d deleted, %d already gone, %.1f s", stream, bound,
             report.scanned, report.matched, report.deleted, report.already_gone, report.elapsed_s)
    return report


_ORIGINAL_STREAM = re.compile(rb"\r\n" + DLQ_STREAM.encode() + rb":[ \t]*([^\r\n]+)", re.IGNORECASE)
_ORIGINAL_SEQ = re.compile(rb"\r\n" + DLQ_SEQ.encode() + rb":[ \t]*(\d+)", re.IGNORECASE)


def cut_copy_of(headers: bytes | dict[str, str] | None) -> tuple[str, int] | None:
    """Where the original of a DLQ copy cut to fit `max_payload` (`Tipstream-Dlq-Truncated`) is: (stream,
    sequence); None for any other message. `headers` as a raw header block or as nats-py's dict.

    >>> cut_copy_of(b"NATS/1.0\\r\\nTipstream-Original-Stream: SIGNALS\\r\\nTipstream-Original-Seq: 42\\r\\n"
    ...             b"Tipstream-Dlq-Truncated: 1048600\\r\\n\\r\\n")
    ('SIGNALS', 42)
    >>> cut_copy_of({"Tipstream-Original-Stream": "SIGNALS", "Tipstream-Original-Seq": "42"}), cut_copy_of(None)
    (None, None)
    """
    if not headers:
        return None
    if isinstance(headers, dict):
        stream, seq = headers.get(DLQ_STREAM), headers.get(DLQ_SEQ)
        if DLQ_TRUNCATED not in headers or not stream or not (seq or "").isdigit():
            return None
        return stream, int(seq or 0)
    if DLQ_TRUNCATED.encode().lower() not in headers.lower():
        return None
    stream_found, seq_found = _ORIGINAL_STREAM.search(headers), _ORIGINAL_SEQ.search(headers)
    if stream_found is None or seq_found is None:
        return None
    return stream_found.group(1).strip().decode(errors="replace"), int(seq_found.group(1))


# A DLQ copy cut before its user's id: (its seq, its original's stream and seq, `head_of` its body).
Cut = tuple[int, str, int, tuple[int, bytes]]


def head_of(body: bytes) -> tuple[int, bytes]:
    """A cut copy's body as its original's head must match it: its length and a digest (a copy is up to
    `max_payload`, and a scan may find thousands).

    >>> head_of(b'{"id": "e-1"') == head_of(b'{"id": "e-1", "user_id": "u-1"}'[:12]), head_of(b"")[0]
    (True, 0)
    """
    return len(body), hashlib.blake2b(body, digest_size=16).digest()


async def theirs_by_original(js: JetStreamContext, cut: list[Cut], user_ids: frozenset[str],
                              spelt: frozenset[bytes]) -> list[int]:
    """Of the DLQ copies cut before their user's id (`cut`), those whose original, still in its stream, belongs
    to one of `user_ids`. The cut keeps a body's head: an event whose `user_id` came last, near `max_payload`,
    left a copy of everything else it held that named no one, and was kept. The DLQ is scrubbed before the other
    streams, so the originals are still there to be read. The message at the original's sequence is its original
    only if the copy is its head: a stream deleted and made again counts from 1 again, and another user's copy
    went with the event now there (the original is gone then: the copy is kept, as one past its retention)."""
    theirs = []
    for seq, stream, original_seq, (length, digest) in cut:
        try:
            original = await js.get_msg(stream, original_seq)
        except NotFoundError:  # gone (retention, or erased by an earlier pass, which erased this copy too)
            continue
        except APIError as error:  # no such stream, or this user may not read it: the copy is kept, as before
            log.warning("could not read %s #%d, the original of DLQ #%d cut to fit (%s); the copy is kept",
                        stream, original_seq, seq, error)
            continue
        data = original.data or b""
        if head_of(data[:length]) == (length, digest) and belongs(data, user_ids, spelt):
            theirs.append(seq)
    return theirs


async def info_or_none(js: JetStreamContext, stream: str) -> Any:
    """The stream's info, None when it does not exist; ScrubError when JetStream does not answer."""
    try:
        return await js.stream_info(stream)
    except NotFoundError:
        return None
    except (NoRespondersError, ServiceUnavailableError) as e:
        raise ScrubError(f"JetStream did not answer for stream {stream} ({e}): enable JetStream for this account "
                         "(nats-server -js, or a jetstream block in the account's config)") from e
    except (TimeoutError, NatsTimeoutError) as e:
        raise ScrubError(no_answer(f"no answer from JetStream about stream {stream}",
                                   "$JS.API.> and subscribe to _INBOX.>")) from e


async def delete_all(js: JetStreamContext, stream: str, seqs: list[int]) -> tuple[int, int]:
    """(deleted, already gone) of the stream's messages `seqs`, a few deletes in flight at a time."""
    deleted = gone = 0
    for at in range(0, len(seqs), DELETES_IN_FLIGHT):
        for erased in await asyncio.gather(*(_delete(js, stream, seq) for seq in seqs[at : at + DELETES_IN_FLIGHT])):
            deleted += erased
            gone += not erased
    return deleted, gone


def is_gone(description: str | None) -> bool:
    """Whether a refused delete's description says the message is not there (see GONE).

    >>> is_gone("no message found"), is_gone("stream store EOF"), is_gone("message delete not permitted")
    (True, True, False)
    """
    return any(phrase in (description or "").lower() for phrase in GONE)


async def _delete(js: JetStreamContext, stream: str, seq: int) -> bool:
    """True when erased now, False when it was already gone."""
    try:
        # {"seq": n}: no `no_erase`, so the server overwrites it. nats-py waits 5 s for the answer whatever the
        # context's timeout (delete_msg passes none to its API request).
        return await js.delete_msg(stream, seq)
    except NotFoundError:
        return False  # the stream itself is gone (deleted meanwhile), and the message with it
    except APIError as e:
        if is_gone(e.description):
            return False
        if "not permitted" in (e.description or ""):
            raise ScrubError(f"stream {stream} refused to delete message {seq} ({e.description}): a stream created "
                             "with deny_delete keeps every message; allow deletes in its config "
                             f"(`nats stream edit {stream} --no-deny-delete`) and run the scrub again") from e
        raise ScrubError(f"deleting message {seq} of stream {stream} failed: {e}") from e
    except (TimeoutError, NatsTimeoutError) as e:
        raise ScrubError(no_answer(f"no answer to deleting message {seq} of stream {stream}",
                                   f"$JS.API.STREAM.MSG.DELETE.{stream}")) from e


async def read_through(
    js: JetStreamContext, stream: str, first: int, bound: int, on_body: Callable[..., None],
    progress: Callable[[int, int], None] | None = None, with_headers: bool = False,
) -> int:
    """Hand every stored message of `stream` from `first` through `bound` to `on_body(seq, body)` once, in
    order (`with_headers`: `on_body(seq, body, headers)`, a raw header block or nats-py's dict, None without);
    return how many. Reads through a consumer of its own (never tipstream's durables), removed after."""
    reader = _Reader(js, stream, bound, on_body, progress, with_headers)
    start, stuck = first, 0
    while True:
        resumed = await reader.run_from(start)
        if resumed is None:
            break
        # Read again from where it began: the pass handed nothing on. Read again so for good, a message the reader
        # never got past (a server that stalls on it, a link that drops every pull) hung the forget without end.
        stuck = stuck + 1 if resumed == start else 0
        if stuck >= STUCK_PASSES:
            raise ScrubError(
                f"reading stream {stream} for a scrub got no further than #{resumed} in {stuck} passes in a row (the "
                f"last: {reader.why}): check the NATS server's log and `nats stream info {stream}` (a server or "
                "node that hangs, a slow disk), and the link to it. A forget tries again by itself; run an export "
                "again")
        log.warning("reading stream %s for a scrub: %s; reading again from %d", stream, reader.why, resumed)
        start = resumed
    if progress:
        progress(reader.scanned, bound)
    return reader.scanned


class _Reader:
    """One pass over a stream through a consumer of its own: AckNone, so nothing is redelivered, and
    instead every delivery's consumer sequence is checked to follow the last. A message lost on the way
    (a slow consumer's buffer dropped, a reconnect) leaves a gap, and the pass is read again from the last
    message handed on: an erasure must not pass over a message unseen."""

    def __init__(self, js: JetStreamContext, stream: str, bound: int, on_body: Callable[..., None],
                 progress: Callable[[int, int], None] | None, with_headers: bool = False) -> None:
        self.js, self.nc, self.stream, self.bound = js, js._nc, stream, bound
        self.on_body, self.progress, self.with_headers = on_body, progress, with_headers
        self.scanned = 0
        self.last_seq = 0  # the last sequence handed on
        self.why = ""
        # A request that could not be sent ends the pass at once, rather than by the stall watch.
        self._sends = Detached(lambda error: self._finish(self._resume_at(), f"a pull request failed ({error!r})"))

    async def run_from(self, start: int) -> int | None:
        """Read from `start`: None once read through the bound; else where to read again from (`why` says why)."""
        self.start, self.cseq, self.requested, self.last_activity = start, 0, 0, time.monotonic()
        self.done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        name = f"tipstream-scrub-{uuid.uuid4().hex[:16]}"
        created = await self._create(name, start)
        if not created.num_pending:
            await self._remove(name, None)
            return None
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{name}"
        self.inbox = self.nc.new_inbox()
        sub = await self._subscribe()
        try:
            await self._request()
            while not self.done.done():
                await asyncio.wait([self.done], timeout=1.0)
                if not self.done.done() and time.monotonic() - self.last_activity > STALL_S:
                    self._finish(self._resume_at(), "nothing arrived for a while")
            return self.done.result()
        finally:
            await self._remove(name, sub)

    async def _create(self, name: str, start: int) -> Any:
        config = ConsumerConfig(
            name=name, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            ack_policy=AckPolicy.NONE, mem_storage=True, num_replicas=1,
            inactive_threshold=60.0,  # a crashed scrub's consumer goes by itself
        )
        try:
            return await self.js.add_consumer(self.stream, config)
        except APIError as e:
            raise ScrubError(f"stream {self.stream} refused a consumer to read it ({e.description}): forgetting or "
                             "exporting a user reads each stream through one of its own, so the account's or the "
                             "stream's max_consumers must leave room for one more") from e
        except (TimeoutError, NatsTimeoutError) as e:
            raise ScrubError(no_answer(f"no answer to creating a consumer on stream {self.stream}",
                                       f"$JS.API.CONSUMER.CREATE.{self.stream}.> and "
                                       f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.>")) from e

    async def _subscribe(self) -> Any:
        if hasattr(self.nc, "subscribe_raw"):  # tipstream's IngestClient: no Msg object per message
            return await self.nc.subscribe_raw(self.inbox, self._on_raw)

        async def on_msg(msg: Any) -> None:
            status = (msg.headers or {}).get("Status", "") if not msg.reply else ""
            pending = (msg.headers or {}).get("Nats-Pending-Messages") if status else None
            self._on_message(msg.reply.encode(), msg.data, status.encode(), pending, msg.headers)

        return await self.nc.subscribe(self.inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        status = headers[9:12] if headers and not reply else b""
        pending = PENDING_HEADER.search(headers) if status else None
        self._on_message(reply, data, status, pending.group(1) if pending else None, headers)

    def _on_message(self, reply: bytes, body: bytes, status: bytes, pending: Any, headers: Any = None) -> None:
        if self.done.done():
            return  # the old pass's deliveries still on their way
        self.last_activity = time.monotonic()
        if not reply:
            self._on_status(status, pending)
            return
        seq, cseq, after = ack_position(reply)
        if cseq != self.cseq + 1:
            self._finish(self._resume_at(), f"deliveries {self.cseq + 1}..{cseq - 1} were lost on the way")
            return
        self.cseq, self.requested = cseq, self.requested - 1
        if seq > self.bound:
            self._finish(None)
            return
        if self.with_headers:
            self.on_body(seq, body, headers)
        else:
            self.on_body(seq, body)
        self.last_seq = seq
        self.scanned += 1
        if self.progress and self.scanned % PROGRESS_EVERY == 0:
            self.progress(self.scanned, self.bound)
        if seq == self.bound or after == 0:
            self._finish(None)
        elif self.requested <= BATCH // 2:
            self._sends.start(self._request())

    def _on_status(self, status: bytes, pending: Any) -> None:
        if status == b"100":
            return
        if status in (b"404", b"408"):
            # A request ended unfilled: usually the stream ran out (its last messages deleted meanwhile), but a
            # busy server also lets a request expire half-filled. The consumer's own count tells which.
            self.requested = max(0, self.requested - int(pending)) if pending else 0
            self._sends.start(self._ended_or_more())
            return
        self._finish(self._resume_at(), f"the server ended a pull with status {status.decode(errors='replace')}")

    async def _ended_or_more(self) -> None:
        name = self.next_subject.rsplit(".", 1)[1]
        try:
            info = await consumer_info_told(self.js, self.stream, name)
        except Exception as e:  # noqa: BLE001 - whatever it was, reading again from where we are is safe
            self._finish(self._resume_at(), f"the consumer could not be looked up ({e!r})")
            return
        if info is None:
            # Its counts of 0 would end the pass as read through, the user's messages past here kept. The scrub's
            # consumer has one copy, which nats-server 2.15 answers from itself: never seen so far.
            self._fail(ScrubError(
                f"reading stream {self.stream} for a scrub: {CONFIG_ONLY_TRIES} answers about its consumer {name} came "
                "from a NATS cluster node without its copy (the config alone, every count 0), so where the stream "
                "ends could not be told: a node is slow to make consumers (overloaded, or catching up after a "
                "restart); check `nats server report jetstream` and the nodes' logs. A forget tries again by itself; run an export again"))
            return
        if self.done.done():
            return  # the stall watch read again meanwhile
        if info.num_pending:
            await self._request()
        elif info.delivered.consumer_seq <= self.cseq:
            self._finish(None)
        # else: the rest is on its way (sent before the server answered this), or lost: the stall watch catches that

    async def _request(self) -> None:
        want = BATCH - self.requested
        if want <= 0 or self.done.done():
            return
        self.requested += want
        body = orjson.dumps({"batch": want, "expires": int(PULL_EXPIRES_S * 1e9)})
        await self.nc.publish(self.next_subject, body, reply=self.inbox)

    def _resume_at(self) -> int:
        return max(self.last_seq + 1, self.start)

    def _finish(self, again_from: int | None, why: str = "") -> None:
        if not self.done.done():
            self.why = why
            self.done.set_result(again_from)

    def _fail(self, error: ScrubError) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    async def _remove(self, name: str, sub: Any) -> None:
        if sub is not None:
            getattr(self.nc, "_raw_handlers", {}).pop(sub._id, None)
            await sub.unsubscribe()
        try:
            await self.js.delete_consumer(self.stream, name)
        except Exception as e:  # noqa: BLE001 - it goes by itself after inactive_threshold
            log.debug("scrub consumer %s on %s not removed: %r", name, self.stream, e)
