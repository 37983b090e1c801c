"""JetStream adapter: stream set-up, the server's release and account limits, the consumers' checks
(another service reading, where a durable starts), stored times, and publishing with `Nats-Msg-Id`.
The batched pull path ingest reads by is `streams/pull.py`; what an ack subject says,
`streams/ack_subject.py`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError, TooManyStalledMsgsError

from streams.pull import PULL_EXPIRES_S

log = logging.getLogger("tipstream.jetstream")

DAY_S = 86_400
ACK_WAIT_S = 60  # a message delivered and not acknowledged this long is delivered again


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]


SIGNALS = StreamSpec("SIGNALS", ("signals.>",))
FEEDBACK = StreamSpec("FEEDBACK", ("feedback.>",))
DECISIONS = StreamSpec("DECISIONS", ("decisions.>",))
DLQ = StreamSpec("DLQ", ("dlq.>",))
ALL_STREAMS = (SIGNALS, FEEDBACK, DECISIONS, DLQ)
INGESTED_STREAMS = (SIGNALS, FEEDBACK)

DLQ_REASON = "Tipstream-Dlq-Reason"
DLQ_KIND = "Tipstream-Dlq-Kind"
DLQ_SUBJECT = "Tipstream-Original-Subject"
DLQ_STREAM = "Tipstream-Original-Stream"
DLQ_SEQ = "Tipstream-Original-Seq"
DLQ_TRUNCATED = "Tipstream-Dlq-Truncated"  # the original body's size, when the DLQ copy holds only its head
# Each header the event was published with (its Nats-Msg-Id, a trace id), renamed so that JetStream acts on none
# of them in the DLQ (a Nats-Msg-Id there would drop another stream's dead letter as a duplicate, a
# Nats-Expected-* refuse the copy for good), up to DLQ_ORIGINAL_HEADERS_MAX bytes of them.
DLQ_ORIGINAL_HEADER = "Tipstream-Original-Header-"
DLQ_ORIGINAL_HEADERS_MAX = 4096
_HEADER_NAME_UNSAFE = re.compile(r"[^!-9;-~]")  # a header name is visible ASCII without ':'


def original_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The DLQ copy's headers for the `headers` an event was published with: each renamed, on one line, in
    UTF-8, as many as fit in DLQ_ORIGINAL_HEADERS_MAX bytes.

    >>> original_headers({"Nats-Msg-Id": "evt-1", "traceparent": "00-ab  01", "X y": "z"})
    {'Tipstream-Original-Header-Nats-Msg-Id': 'evt-1', 'Tipstream-Original-Header-traceparent': '00-ab 01', \
'Tipstream-Original-Header-X_y': 'z'}
    """
    carried: dict[str, str] = {}
    size = 0
    for name, value in (headers or {}).items():
        key = DLQ_ORIGINAL_HEADER + _HEADER_NAME_UNSAFE.sub("_", str(name))
        text = " ".join(str(value).split()).encode("utf-8", "backslashreplace").decode()
        size += header_bytes({key: text}) - header_bytes({})
        if size > DLQ_ORIGINAL_HEADERS_MAX:
            break
        carried[key] = text
    return carried


def header_bytes(headers: dict[str, str]) -> int:
    """The size of `headers` on the wire, as nats-py encodes them (`NATS/1.0`, `key: value` lines)."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


# How long a start waits for a stream whose copies changed to have a leader again (an election, a few seconds)
LEADER_WAIT_S = 30.0
NOT_CLUSTERED = 10074  # nats-server's error code: "replicas > 1 not supported in non-clustered mode"
NO_LEADER = -1  # ours, not the server's: a stream left without a leader after its copies changed
# JetStream's storage limit reached before the disk is full. nats-server 2.15.1 refuses a publish past
# its own max_file_store with 10023 ("insufficient resources") and past the account's max_file with
# 10002 ("resource limits exceeded for account"); 10047 ("insufficient storage resources available") is
# its answer to a stream's creation.
STORAGE_FULL = (10023, 10002, 10047)
# What an operator does about it, said after JetStream's own words.
STORAGE_FULL_FIX = (". The account's or the server's JetStream file storage is full: `max_file` in the account's "
                    "`jetstream {}` limits, the server's `max_file_store` (unset: 75% of the disk's free space when "
                    "nats-server started; an embedded one's is in its nats-server.log, 'Max Storage'), or its disk. "
                    "Free or raise it (a restart of nats-server sizes it anew); TIPSTREAM_STREAM_MAX_BYTES bounds "
                    "each stream, its oldest events going first")


# nats-server's answer to a stream whose subjects another stream of the account takes.
SUBJECTS_OVERLAP = 10065


async def _taken_by(js: JetStreamContext, subjects: Iterable[str]) -> str:
    """Which streams take `subjects` ("APP takes signals.>"), or "" if the server does not say: the refusal named
    no stream, and on a server with many the operator was left to find it among them."""
    taken = []
    for subject in subjects:
        try:
            taken.append(f"{await js.find_stream_name_by_subject(subject)} takes {subject}")
        except Exception:  # noqa: BLE001, S112 - the refusal is told whether or not its cause is found
            continue
    return ", ".join(taken)


async def ensure_streams(
    js: JetStreamContext, *, max_age_days: float, max_bytes: int, duplicate_window_s: float, dlq_max_age_days: float,
    replicas: int = 1, lower_limits: bool = True,
) -> bool:
    """Create the four streams, or bring their limits and copies (`replicas`) in line with the settings. Idempotent.

    JetStream drops a stream's oldest messages as soon as its age or size limit is lowered. With `lower_limits`
    False (a start, before ingest has read what the streams hold), an existing stream keeps the looser of its
    limit and the setting's: True when one was kept so, for a call once read."""
    held = False
    for spec in ALL_STREAMS:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=(dlq_max_age_days if spec is DLQ else max_age_days) * DAY_S,
            max_bytes=max_bytes,
            duplicate_window=duplicate_window_s,
            # Always sent: an update without it sets the stream back to one copy.
            num_replicas=replicas,
        )
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except APIError as error:
                if error.err_code == SUBJECTS_OVERLAP and (taken := await _taken_by(js, spec.subjects)):
                    error.description = f"{error.description}: {taken}"
                raise
            log.info("created stream %s (%s)", spec.name, copies(replicas))
            continue
        if (unlike := unlike_ours(info.config, spec)) is not None:
            log.warning("stream %s %s. tipstream makes its streams with limits retention, file storage and "
                        "DiscardPolicy.OLD, and uses this one as it was made (by hand, or by another application?): "
                        "change it with `nats stream edit` where the server allows (subjects, discard; retention between "
                        "limits and interest, 2.10 on), or delete it while tipstream is stopped (`nats stream rm %s`; "
                        "its messages go with it, so keep a copy first if they are needed) and the next start "
                        "creates it as tipstream does", spec.name, unlike, spec.name)
        if not lower_limits:
            looser = replace(config, max_age=looser_limit(info.config.max_age, config.max_age),
                             max_bytes=looser_limit(info.config.max_bytes, config.max_bytes))
            if looser != config:
                held = True
                log.info("stream %s: %s once ingest has read what it holds (JetStream drops its oldest messages at "
                         "once, and some may not be read yet)", spec.name, "; ".join(stream_changes(looser, config)))
                config = looser
        changed = stream_changes(info.config, config)
        if not changed:
            continue
        was = replicas_of(info.config)
        # Only what the settings name changes: an update is the whole config, and one made from scratch
        # set back what an operator had set (compression, placement, a description) to the defaults.
        await js.update_stream(replace(info.config, max_age=config.max_age, max_bytes=config.max_bytes,
                                       duplicate_window=config.duplicate_window, num_replicas=replicas))
        # Scaling up copies the stream to the new nodes in the background; scaling down drops copies.
        # Either way the stream keeps its messages and its sequences.
        log.info("updated stream %s: %s", spec.name, "; ".join(changed))
        if replicas < was:  # TIPSTREAM_STREAM_REPLICAS left at its default on streams made with more, say
            log.warning("stream %s now keeps %s instead of %d: losing the node that holds it stops ingest until "
                        "it is back. Set TIPSTREAM_STREAM_REPLICAS=%d to keep them", spec.name, copies(replicas), was, was)
        if was != replicas:
            await _copies_in_place(js, spec.name, replicas, was)
    return held


def looser_limit(current: float | None, wanted: float) -> float:
    """The looser of a stream's age or size limit and the one wanted, 0 or less (or none) being no limit.

    >>> looser_limit(-1, 1000), looser_limit(None, 1000), looser_limit(2000, 1000), looser_limit(1000, -1)
    (-1, 0, 2000, -1)
    """
    current = current or 0
    if current <= 0 or wanted <= 0:
        return min(current, wanted)
    return max(current, wanted)


def unlike_ours(config: Any, spec: StreamSpec) -> str | None:
    """How an existing stream's config loses events tipstream counts on (a replay, a rebuild, `users export`), or None.

    >>> from types import SimpleNamespace as C
    >>> ours = dict(subjects=["signals.>"], retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
    ...             discard=DiscardPolicy.OLD)
    >>> unlike_ours(C(**ours), SIGNALS) is None
    True
    >>> print(unlike_ours(C(**{**ours, "retention": RetentionPolicy.INTEREST, "storage": StorageType.MEMORY}), SIGNALS))
    has interest retention: JetStream deletes each event once its consumers have acknowledged it, and a rebuild or \
a replay finds none of them; and memory storage: a restart of nats-server loses every event
    >>> print(unlike_ours(C(**{**ours, "subjects": ["signals.app.>"]}), SIGNALS))
    has subjects signals.app.>, not signals.>: an event published on another is stored in no stream
    """
    problems = []
    if not set(spec.subjects) <= set(config.subjects or ()):
        problems.append(f"subjects {', '.join(config.subjects or ())}, not {', '.join(spec.subjects)}: an event "
                        "published on another is stored in no stream")
    if config.retention == RetentionPolicy.INTEREST:
        problems.append("interest retention: JetStream deletes each event once its consumers have acknowledged it, "
                        "and a rebuild or a replay finds none of them")
    elif config.retention == RetentionPolicy.WORK_QUEUE:
        problems.append("work-queue retention: JetStream deletes each event once acknowledged, and refuses the "
                        "second consumer that forgetting a user and `users export` read it through")
    if config.storage == StorageType.MEMORY:
        problems.append("memory storage: a restart of nats-server loses every event")
    if config.discard == DiscardPolicy.NEW:
        problems.append("DiscardPolicy.NEW: at its limits JetStream refuses every new event instead of dropping "
                        "the oldest")
    return f"has {'; and '.join(problems)}" if problems else None


def copies(replicas: int) -> str:
    """
    >>> copies(1), copies(3)
    ('1 copy', '3 copies')
    """
    return f"{replicas} cop{'y' if replicas == 1 else 'ies'}"


def replicas_of(config: Any) -> int:
    """A stream's copies as its config says (a server leaves 0 or nothing for one)."""
    return config.num_replicas or 1


def knows_nothing_of_the_consumer(info: Any, server_info: Mapping[str, Any]) -> bool:
    """Whether a consumer_info answer (`info`) is a cluster node's that has the consumer assigned but not its copy yet
    (just after the consumer is made): nats-server answers with the config alone, no cluster part, every count 0 where
    the consumer's are not. On a cluster (its server's INFO, `server_info`, names one) every other answer has its
    cluster part; a single server's never has.

    >>> from types import SimpleNamespace as Info
    >>> config_only, led = Info(cluster=None, num_pending=0), Info(cluster=Info(leader="n2"), num_pending=300)
    >>> on_a_cluster, single = {"cluster": "tipstream"}, {"server_name": "NDSXYZ"}
    >>> knows_nothing_of_the_consumer(config_only, on_a_cluster), knows_nothing_of_the_consumer(led, on_a_cluster)
    (True, False)
    >>> knows_nothing_of_the_consumer(config_only, single)
    False
    """
    return bool(server_info.get("cluster")) and info.cluster is None


# A node without the consumer's copy yet makes it within moments (none seen in 1,200 looks right after 40 creations
# on an idle 3-node 2.15.1 cluster; 285 in an earlier session's looks after 40 on a loaded one): asked again this
# many times, this long apart.
CONFIG_ONLY_TRIES = 5
CONFIG_ONLY_PAUSE_S = 0.2


async def consumer_info_told(js: JetStreamContext, stream: str, consumer: str) -> Any | None:
    """The consumer's info, asked again while a cluster node without its copy answers for it (up to CONFIG_ONLY_TRIES,
    CONFIG_ONLY_PAUSE_S apart), or None if every answer was such a one (`knows_nothing_of_the_consumer`): its
    counts unknown. Raises what `consumer_info` raises (NotFoundError: no such consumer)."""
    for tried in range(1, CONFIG_ONLY_TRIES + 1):
        info = await js.consumer_info(stream, consumer)
        if not knows_nothing_of_the_consumer(info, js._nc._server_info):
            return info
        if tried < CONFIG_ONLY_TRIES:
            await asyncio.sleep(CONFIG_ONLY_PAUSE_S)
    return None


def stream_changes(current: Any, wanted: Any) -> list[str]:
    """What an update of `current` to `wanted` changes, for the log.

    >>> from types import SimpleNamespace as C
    >>> stream_changes(C(max_age=86400.0, max_bytes=-1, duplicate_window=120.0, num_replicas=1),
    ...                C(max_age=86400.0, max_bytes=1000, duplicate_window=120.0, num_replicas=3))
    ['max_bytes -1 -> 1000', 'replicas 1 -> 3']
    >>> stream_changes(C(max_age=1.0, max_bytes=-1, duplicate_window=1.0, num_replicas=None),
    ...                C(max_age=1.0, max_bytes=-1, duplicate_window=1.0, num_replicas=1))
    []
    """
    changes = [f"{name} {getattr(current, name):g} -> {getattr(wanted, name):g}"
               for name in ("max_age", "max_bytes", "duplicate_window") if getattr(current, name) != getattr(wanted, name)]
    if replicas_of(current) != replicas_of(wanted):
        changes.append(f"replicas {replicas_of(current)} -> {replicas_of(wanted)}")
    return changes


async def _copies_in_place(js: JetStreamContext, stream: str, replicas: int, was: int) -> None:
    """After its copies changed: refuse a single server that took more than one (2.9 accepts the update and
    keeps one), then wait for the stream's leader: the cluster elects one again, and until then every call on
    the stream (a consumer made, a publish) fails."""
    deadline = time.monotonic() + LEADER_WAIT_S
    while True:
        try:
            info = await js.stream_info(stream)
        except (TimeoutError, ServiceUnavailableError):  # no leader to answer yet
            info = None
        if info is not None:
            if replicas > 1 and not clustered(info):
                raise APIError(code=400, err_code=NOT_CLUSTERED, stream=stream,
                               description="replicas > 1 not supported in non-clustered mode")
            if not clustered(info) or info.cluster.leader:
                return
        if time.monotonic() > deadline:
            raise APIError(code=503, err_code=NO_LEADER, stream=stream, description=(
                f"stream {stream} has no leader {LEADER_WAIT_S:g} s after its copies went from {was} to {replicas}"))
        await asyncio.sleep(0.1)


def clustered(info: Any) -> bool:
    """Whether a stream's info comes from a NATS cluster (a single server names no cluster: 2.9 gives no
    cluster info at all, 2.10 on give one without a name)."""
    return info.cluster is not None and bool(info.cluster.name)


# The nats-server releases tipstream was run against end to end (ingest, the DLQ, the decision log,
# the learner's join, restarts, a rebuild): docs/operations.md, "Which NATS servers". It uses nothing newer than
# 2.9's JetStream API (no stream metadata, subject transforms, per-message TTLs, direct gets, batch
# publishing), so a newer server is fine; an older one was never run.
TESTED_SERVERS = ("2.9.10", "2.10.25", "2.15.1")
OLDEST_TESTED = (2, 9)
FIRST_WITH_JETSTREAM = (2, 2)


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a nats-server version string, None when it cannot be read.

    >>> release("2.9.10"), release("v2.11.0-RC.1"), release("2"), release("")
    ((2, 9), (2, 11), None, None)
    """
    match = re.match(r"v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def server_too_old(version: str, where: str) -> str | None:
    """What to tell the operator about a server older than tipstream was run against; None when it
    is not (or its version cannot be read: a fork or a proxy, given the benefit of the doubt).

    >>> server_too_old("2.9.10", "x") is None, server_too_old("2.15.1", "x") is None, server_too_old("?", "x")
    (True, True, None)
    >>> print(server_too_old("2.1.9", "nats://h:4222 (NATS_URL)"))
    nats-server 2.1.9 at nats://h:4222 (NATS_URL) has no JetStream (it came in 2.2), which tipstream's streams need: \
upgrade the server to 2.9 or newer, or leave NATS_URL unset to use the embedded one.
    """
    found = release(version)
    if found is None or found >= OLDEST_TESTED:
        return None
    oldest = ".".join(map(str, OLDEST_TESTED))
    fix = f"upgrade the server to {oldest} or newer, or leave NATS_URL unset to use the embedded one."
    if found < FIRST_WITH_JETSTREAM:
        return (f"nats-server {version} at {where} has no JetStream (it came in 2.2), which tipstream's streams "
                f"need: {fix}")
    return (f"nats-server {version} at {where} is older than any tipstream was run against "
            f"({', '.join(TESTED_SERVERS)}): if ingest, readiness or the decision log misbehave, {fix}")


async def account_limits(js: JetStreamContext) -> Any:
    """The account's JetStream limits (`max_storage`, `max_streams`, `max_ack_pending`...; -1: none).
    Raises nats-py's APIError 10039 when the account has no JetStream (`app.startup` says the fix)."""
    return (await js.account_info()).limits


def unbounded_in_bounded_account(limits: Any, max_bytes: int) -> str | None:
    """The warning for streams without a byte limit in an account with one: a full account refuses
    every new event, where a stream at its own limit drops its oldest ones (DiscardPolicy.OLD).

    >>> from types import SimpleNamespace as L
    >>> unbounded_in_bounded_account(L(max_storage=-1), -1) is None, unbounded_in_bounded_account(L(max_storage=8), 2)
    (True, None)
    >>> print(unbounded_in_bounded_account(L(max_storage=10_000_000_000), -1))
    This NATS account's JetStream storage is limited to 10,000,000,000 bytes (max_file), and tipstream's four \
streams are not (TIPSTREAM_STREAM_MAX_BYTES=-1): once they fill it, JetStream refuses every new event and \
decision instead of dropping the oldest. Set TIPSTREAM_STREAM_MAX_BYTES to at most 2,500,000,000 (a quarter, \
less what the account's other streams need), or lift the account's limit.
    """
    if max_bytes > 0 or limits.max_storage is None or limits.max_storage <= 0:
        return None
    return (f"This NATS account's JetStream storage is limited to {limits.max_storage:,} bytes (max_file), and "
            "tipstream's four streams are not (TIPSTREAM_STREAM_MAX_BYTES=-1): once they fill it, "
            "JetStream refuses every new event and decision instead of dropping the oldest. Set "
            f"TIPSTREAM_STREAM_MAX_BYTES to at most {limits.max_storage // len(ALL_STREAMS):,} (a quarter, less what "
            "the account's other streams need), or lift the account's limit.")


def durable_of(stream: str) -> str:
    """The durable consumer tipstream reads `stream` through: one per stream, so one service per NATS account."""
    return f"tipstream-{stream.lower()}"


async def read_by_another(js: JetStreamContext, streams: Iterable[str],
                          again_after_s: float = PULL_EXPIRES_S + 0.5, reading_s: float = 0.5) -> list[str]:
    """Those of `streams` whose tipstream consumer another service reads now: a pull request of its
    waits, or the messages it is handed move on. The server lets go of a client's requests as its
    connection ends, a crash included (nats-server 2.9 and 2.15 alike), so a waiting one is a running
    service's. One seen is looked for again once it has expired: a running service asks again at once,
    while the last request of a service gone this instant, or whose connection the server has not seen
    end (its host lost), is still there for up to PULL_EXPIRES_S, and refused the restart that replaced
    it. A service catching up a backlog has its requests answered as soon as made, and was seen
    waiting on none (the second service then started, and each read part of every stream): a consumer
    with messages left or unacknowledged is read by another if what it has delivered moves on within
    `reading_s`. Only where a request waited is that after the request has expired (a request of a
    host lost is still handed messages until then): a restart on a backlog, the old service stopped,
    waits `reading_s` alone. A consumer a cluster node answers for without its copy yet, asked again
    (`consumer_info_told`), is one just made, its counts unknown: read by another, not taken for idle (its
    counts of 0 let a start beside a service that had just made it take the consumer from under it)."""
    names, unknown = list(streams), set()

    async def looks(names: Iterable[str]) -> dict[str, Any]:
        found = {}
        for stream in names:
            try:
                info = await consumer_info_told(js, stream, durable_of(stream))
            except NotFoundError:
                continue
            if info is None:
                unknown.add(stream)
            else:
                found[stream] = info
        return found

    first = await looks(names)
    maybe = [name for name, info in first.items() if info.num_waiting or info.num_pending or info.num_ack_pending]
    if not maybe:
        return [name for name in names if name in unknown]
    base = {name: first[name] for name in maybe}
    if any(info.num_waiting for info in base.values()):
        await asyncio.sleep(again_after_s)
        base = await looks(maybe)
    busy = [name for name, info in base.items() if info.num_waiting]
    moving = [name for name in base if name not in busy]
    if moving:
        await asyncio.sleep(reading_s)
        later = await looks(moving)
        busy += [name for name, info in later.items()
                 if info.num_waiting or _delivered(info) > _delivered(base[name])]
    return [name for name in names if name in busy or name in unknown]


def _delivered(info: Any) -> int:
    return info.delivered.stream_seq if info.delivered is not None else 0


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_us(at: datetime) -> int:
    """Microseconds since the epoch, exactly (a float's timestamp() rounds where NATS's times are this fine)."""
    return (at - EPOCH) // timedelta(microseconds=1)


def made_again_after(stream: str, created: datetime | None, after: datetime, what: str,
                     slack: timedelta = timedelta(0)) -> str | None:
    """Said when the stream was created more than `slack` after `after` (when `what` happened, by the
    NATS server's clock where it can be), else None. Deleted and made again (by an operator, or by a
    service that found it gone) is then the likelier cause of another message at a position read than
    a store restored from an older copy, which keeps the old creation time."""
    if created is None or created <= after + slack:
        return None
    return (f"{stream} was made again at {created.isoformat(timespec='milliseconds')}, after {what} "
            f"({after.isoformat(timespec='milliseconds')})")


async def stored_us(js: JetStreamContext, stream: str, seq: int, timeout_s: float = 1.0) -> int | None:
    """When the stream's message `seq` was stored, in µs since the epoch by the NATS server's clock
    (None: gone, or the server did not answer). Which message a checkpointed position names: the
    same stream answers the same figure at every start, exactly, whatever this host's clock says."""
    try:
        # Not wait_for: on Python 3.11 it can drop a cancellation that comes as the answer does (the
        # checkpointer's, at a stop), and the loop asking went on (gh-86296).
        async with asyncio.timeout(timeout_s):
            msg = await js.get_msg(stream, seq)
    except Exception:  # noqa: BLE001 - deleted, aged out, or NATS away or slow: not known, and said so
        return None
    return None if msg.time is None else epoch_us(msg.time)


async def next_stored(js: JetStreamContext, spec: StreamSpec, seq: int) -> int | None:
    """The sequence of the stream's first message at or after `seq`; None when it holds none there."""
    try:
        return (await js.get_msg(spec.name, seq=seq, subject=spec.subjects[0], next=True)).seq
    except NotFoundError:
        return None


async def stored_after(js: JetStreamContext, stream: str, seq: int, when: datetime) -> bool:
    """Whether the stream's message `seq` was stored after `when` (a checkpoint that says it read that
    far: then it read another stream of that name, its store lost or restored from an older copy, whose
    sequences have since grown past the checkpoint's). One second is left for the clocks to differ."""
    try:
        msg = await js.get_msg(stream, seq)
    except NotFoundError:
        return False
    if when.tzinfo is None:  # SQLite hands back the UTC it was given without its zone
        when = when.replace(tzinfo=UTC)
    return msg.time is not None and msg.time > when + timedelta(seconds=1)


def event_headers(event_id: str) -> dict[str, str]:
    return {"Nats-Msg-Id": event_id}


# Acknowledgements come within milliseconds; none for this long means they were lost with a
# connection that dropped (nats-py never settles them then), and the events are published again.
PUBLISH_ACK_WAIT_S = 5.0


async def publish_events(
    js: JetStreamContext,
    events: Iterable[tuple[str, dict[str, Any]]],
    on_progress: Callable[[int], None] | None = None,
    ack_wait_s: float | None = None,
    again: bool = True,
    unacknowledged: Callable[[int, int], Awaitable[None]] | None = None,
) -> int:
    """Publish (subject, event) pairs with a bounded window of unacknowledged publishes.

    Every publish is acknowledged by JetStream before this returns; core NATS publish
    would lose events under load, so it is never used for events. What is not acknowledged
    within `ack_wait_s` (None: PUBLISH_ACK_WAIT_S, read at each call) is published again
    (`_publish_acknowledged`), or with `again` False raises TimeoutError: nats-py waits for an
    acknowledgement for ever (also when an account full refuses the event: the server's error goes to
    the connection's error callback). `unacknowledged(acknowledged, of)` is awaited at each such wait in place of
    its warning, to tell it as the caller will, or to give up by raising.
    """
    ack_wait_s = PUBLISH_ACK_WAIT_S if ack_wait_s is None else ack_wait_s
    count = 0
    batch: list[tuple[str, dict[str, Any]]] = []
    for pair in events:
        batch.append(pair)
        count += 1
        if len(batch) >= 1_000:
            await _publish_acknowledged(js, batch, ack_wait_s, again, unacknowledged)
            batch.clear()
            if on_progress:
                on_progress(count)
    await _publish_acknowledged(js, batch, ack_wait_s, again, unacknowledged)
    if on_progress:
        on_progress(count)
    return count


async def _publish_acknowledged(js: JetStreamContext, batch: list[tuple[str, dict[str, Any]]], ack_wait_s: float,
                                again: bool, unacknowledged: Callable[[int, int], Awaitable[None]] | None) -> None:
    """`batch` published until JetStream has acknowledged every event of it. After a reconnect (an
    embedded server started again on its port) the acknowledgements in flight never came, and the
    publisher waited for them for good; published again, each event is stored once, by its
    `Nats-Msg-Id` within the stream's duplicate window (after it, the fold recognises it)."""
    while batch:
        pending: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(ack_wait_s):
                for subject, event in batch:
                    pending.append(await js.publish_async(subject, orjson.dumps(event), headers=event_headers(event["id"])))
                await asyncio.gather(*pending)
            return
        except (TimeoutError, TooManyStalledMsgsError):  # nats-py says the latter when a wait for a place times out
            left = [pair for i, pair in enumerate(batch) if i >= len(pending) or not _acked(pending[i])]
            if not again:
                raise TimeoutError(f"JetStream acknowledged {len(batch) - len(left)} of {len(batch)} events within "
                                   f"{ack_wait_s:g} s") from None
            if len(left) == len(batch):
                await _raise_if_storage_full(js, left[0], ack_wait_s)
            if unacknowledged is not None:
                await unacknowledged(len(batch) - len(left), len(batch))
            else:
                log.warning("JetStream acknowledged %d of %d events within %g s; publishing the rest again",
                            len(batch) - len(left), len(batch), ack_wait_s)
            batch = left
        finally:
            for future in pending:  # each holds one of publish_async_max_pending's places until settled
                future.cancel()


async def _raise_if_storage_full(js: JetStreamContext, pair: tuple[str, dict[str, Any]], ack_wait_s: float) -> None:
    """Raise JetStream's refusal of `pair` for storage full (`STORAGE_FULL`), asked for with a publish that waits
    for its answer. nats-py's handler of `publish_async`'s answers raises a refusal into the connection's error
    callback instead of settling the future, which then times out like a server away: `tipstream simulate` against
    a full JetStream published the same events again for ever, saying "acknowledged 0 of 11". Published once more,
    the event is stored once (its `Nats-Msg-Id`); anything else (NATS away, another refusal) is tried again."""
    subject, event = pair
    try:
        await js.publish(subject, orjson.dumps(event), timeout=ack_wait_s, headers=event_headers(event["id"]))
    except APIError as error:
        if error.err_code in STORAGE_FULL:
            raise
    except Exception:  # noqa: BLE001, S110 - published again with the rest of the batch
        pass


def _acked(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def gone_before(stream: str, first: int, store_failed: Callable[[str], str | None] | None = None) -> str:
    """What a start with no checkpoint says of a stream whose sequences before `first` hold nothing. nats-server
    (2.15.1 checked) gives a write to an empty stream that fails (its store's disk full) the next sequence and stores
    nothing in it: the stream starts past it once it stores again, and the line blamed retention or a user forgotten,
    as if events were lost, where the event not acknowledged was published again. `store_failed(stream)`: what
    says its server failed to store (the embedded one's log, a publisher left unanswered), or None; with it, that
    is the likely cause, and the others, which are losses, stay named.

    >>> print(gone_before("SIGNALS", 2, lambda stream: "its log says so"))  # doctest: +NORMALIZE_WHITESPACE
    stream SIGNALS keeps sequences 2 on; those before were most likely never stored: nats-server gives a write to an
    empty stream that fails (its store's disk full) a sequence and stores nothing, and its log says so; the event not
    acknowledged is published again. Else they are gone (past its retention, erased with a user forgotten, or purged)
    >>> print(gone_before("FEEDBACK", 4, lambda stream: None))  # doctest: +NORMALIZE_WHITESPACE
    stream FEEDBACK keeps sequences 4 on; those before are gone (past its retention, erased with a user forgotten, or
    purged), or were never stored (a write to an empty stream that nats-server failed, its disk full, is given a
    sequence)
    """
    evidence = store_failed(stream) if store_failed is not None else None
    if evidence:
        return (f"stream {stream} keeps sequences {first} on; those before were most likely never stored: "
                "nats-server gives a write to an empty stream that fails (its store's disk full) a sequence and stores "
                f"nothing, and "
                f"{evidence}; the event not acknowledged is published again. Else they are gone (past its retention, "
                "erased with a user forgotten, or purged)")
    return (f"stream {stream} keeps sequences {first} on; those before are gone (past its retention, erased with a "
            "user forgotten, or purged), or were never stored (a write to an empty stream that nats-server failed, its "
            "disk full, is given a sequence)")


async def reset_durable(
    js: JetStreamContext, stream: str, durable: str, start_seq: int, max_ack_pending: int,
    store_failed: Callable[[str], str | None] | None = None,
) -> tuple[int, int]:
    """(Re)create the durable consumer so it delivers from `start_seq`: the checkpoint decides.

    Returns how many messages it has to deliver, and the sequence it delivers from (the stream's
    first when `start_seq` is past its end or before its first). `store_failed`: `gone_before`'s.
    """
    try:
        await js.delete_consumer(stream, durable)
    except NotFoundError:
        pass
    # An account may cap it (`max_ack_pending` in its JetStream limits), and refuses a consumer that
    # asks for more (10121): ingest acknowledges a chunk at a time, so a lower cap only slows it.
    limit = (await account_limits(js)).max_ack_pending
    if limit is not None and 0 < limit < max_ack_pending:
        max_ack_pending = limit
    info = await js.stream_info(stream)
    first = max(info.state.first_seq, 1)
    if start_seq > info.state.last_seq + 1:
        # Sequences only grow, so a checkpoint past the end was taken from another stream (its
        # store was lost or the stream re-created): starting there would skip every event until
        # the stream reaches it. Replaying the stream instead is safe: the fold, the learner's
        # credits and the decision cache each recognise what they already hold by its id. Told as "the checkpoint
        # wants", a running service's own position (past its last checkpoint) was taken for the database's, and a
        # store restored from an older copy (a server back with one, in a soak) was not among the causes named.
        log.error(
            "stream %s ends at %d, before %d, the position it is read from: it is not the stream read so far (its "
            "NATS store lost or restored from an older copy, the stream re-created, or NATS_URL naming another "
            "server?). Reading %s again from %d: what was folded stays, and nothing is counted twice.",
            stream, info.state.last_seq, start_seq, stream, first,
        )
        start_seq = first
    elif start_seq == 1 and first > 1:
        # No checkpoint (a first start on an old stream, a rebuild): nothing was missed. The stream
        # cannot tell an aged-out message from one erased for a forgotten user (both move its first
        # sequence), and a rebuild after a forget is docs/operations.md's own sequence: blaming retention
        # alone sent readers to TIPSTREAM_STREAM_MAX_AGE_DAYS for messages they had asked to delete.
        log.info("%s", gone_before(stream, first, store_failed))
    elif start_seq < first and info.state.messages:
        log.warning(
            "stream %s starts at %d but the checkpoint wants %d: events %d..%d expired by retention. "
            "Raise TIPSTREAM_STREAM_MAX_AGE_DAYS to keep more.", stream, first, start_seq, start_seq, first - 1,
        )
    created = await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(start_seq, 1),
            ack_policy=AckPolicy.ALL,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
        ),
    )
    return created.num_pending or 0, max(start_seq, first)
