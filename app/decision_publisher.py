"""Publishing the decision log to JetStream: every /score answer reaches `decisions.>` once.

`/score` queues its decision and answers; the publisher writes the queue to JetStream in
batches and keeps each decision until JetStream has acknowledged it, so that none is dropped
while NATS is away or slow (the queue is bounded: past it, /score refuses with a 503). The
decision event itself, its checks and its `tip_scores` row are in `decisions.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from typing import Any

import orjson

from app.decision_ids import ID_LENGTH
from app.learning_metrics import DECISION_QUEUE, DECISIONS
from app.periodic import woken
from streams.jetstream import STORAGE_FULL, STORAGE_FULL_FIX
from streams.log_throttle import LogThrottle, counted, since_last_line

log = logging.getLogger("tipstream.decisions")
# Each outcome exposed at 0 from the start: a series that first appears at 40 refusals (one burst, NATS away
# for a few seconds) has no increase() in Prometheus, and the operator's guide's alert on refusals never fired for it.
_PUBLISHED, _RETRIED, _REFUSED = (DECISIONS.labels(outcome) for outcome in ("published", "retried", "refused"))


def _stored_seq(ack: bytes) -> int | None:
    """The stream sequence in a JetStream publish acknowledgement.

    >>> _stored_seq(b'{"stream":"DECISIONS","seq":42,"duplicate":true}'), _stored_seq(b'{"stream":"X"}')
    (42, None)
    """
    start = ack.find(b'"seq":')
    if start < 0:
        return None
    start += 6
    end = start
    while end < len(ack) and 48 <= ack[end] <= 57:
        end += 1
    return int(ack[start:end]) if end > start else None


AWAY_POLL_S = 0.1  # how often the publisher looks for the connection while NATS is away
# How long a decision waits for JetStream's acknowledgement before it is back in the queue, to be sent again.
ACK_TIMEOUT_S = 5.0
LOOK_S = 1.0  # the publishing loop's longest wait for work: how late it may find a send unacknowledged
UNANSWERED_WAIT_MAX_S = 5.0  # its longest wait after a round that found sends unacknowledged (doubling from 0.1 s)
# How long after its send a decision JetStream has not acknowledged, NATS connected, is sent again at the latest: found
# up to LOOK_S after its ACK_TIMEOUT_S, it waits while the rounds take back the others in flight (all late within
# another ACK_TIMEOUT_S; waits of up to UNANSWERED_WAIT_MAX_S between rounds, and one more after the last). Measured,
# the server's answers held back: 5.1-6.0 s for 10 decisions sent 0.2 s apart, 5.1-16.8 s for 100 to 1,000 sent over
# 4.5 to 10 s. A stored one whose acknowledgement came late (a server slow or stalled) is stored twice unless
# JetStream's duplicate window (TIPSTREAM_DUPLICATE_WINDOW_S) outlasts this (`short_duplicate_window`).
RESENT_WITHIN_S = 2 * ACK_TIMEOUT_S + LOOK_S + 2 * UNANSWERED_WAIT_MAX_S
# The longest wait before a refused decision is sent again. A NATS cluster refuses DECISIONS while it elects the
# stream's leader (4-9 s after a node is lost): at 5 s, decisions reached the log up to 5 s after it could take
# them, and their reactions waited as long to be learned. Each round's refusal is a line, at most so many a minute.
REFUSAL_WAIT_MAX_S = 1.0
REFUSAL_LINES_PER_MINUTE = 10
# How often decisions held for DECISIONS' max_msg_size are sent again, and the server's max_payload is read again
# while some are held for it (or a 413 asked to raise it): the operator raises them while tipstream runs (`nats
# stream edit`, a reload of the server's configuration, as the log lines say), and tried only at a reconnect or the
# next start, they stayed held, counted against TIPSTREAM_DECISION_QUEUE_MAX (/score answered 503 once it was full
# of them).
HELD_RETRY_S = 30.0


# STORAGE_FULL in a refusal's raw answer (10047 alone was matched, and no refusal of a decision ever
# named the fix).
STORAGE_FULL_CODES = tuple(b'"err_code":%d' % code for code in STORAGE_FULL)
# JetStream's words for a stream at its limits that refuses new messages (discard policy 'new', which tipstream
# never sets: an operator's `nats stream edit`), and what to do. Told with its words only, /score turned 503 with
# nothing naming the setting that made it, for as long as the stream's oldest messages stayed.
DISCARD_NEW_ANSWERS = (b'"maximum messages exceeded"', b'"maximum bytes exceeded"',
                       b'"maximum messages per subject exceeded"')
DISCARD_NEW_FIX = (". DECISIONS is at its limits and refuses new messages (its discard policy is 'new', set outside "
                   "tipstream): decisions wait, and /score answers 503 once TIPSTREAM_DECISION_QUEUE_MAX wait. `nats "
                   "stream edit DECISIONS --discard old` lets its oldest messages go instead, as tipstream creates it, or "
                   "raise its limits")
# No node takes DECISIONS' messages (a 503 status, or nats-py's "no responders"): told with the bytes alone, the many
# lines of a cluster electing a leader for DECISIONS after a node was lost said neither why nor what to do.
NO_RESPONDERS = (b"NATS/1.0 503", b'"no responders"')
NO_RESPONDERS_FIX = (". No NATS node takes DECISIONS' messages now (503 no responders): on a NATS cluster the stream "
                     "has no leader until the other nodes elect one (seconds after a node was lost), or the stream is "
                     "gone (deleted: ingest makes it again), or no longer takes `decisions.>` (its subjects edited "
                     "outside tipstream: nothing puts them back while it runs; `nats stream edit DECISIONS --subjects "
                     "'decisions.>'` does). If this goes on, see `nats stream info DECISIONS`, and start the cluster's "
                     "missing nodes (`nats server report jetstream` shows which streams have no leader)")
# An earlier try of the same decision still being stored (a leader slow to answer, the decision sent again once its
# acknowledgement was late): no fault of its own, and the next try is acknowledged as a duplicate once it is stored.
IN_PROCESS = b'"err_code":10158'
IN_PROCESS_FIX = (". JetStream is still storing an earlier try of it (sent again when its acknowledgement came late, "
                  "a NATS server slow or hung meanwhile): it is stored once, the next try acknowledged as a duplicate")
# JetStream's refusals that no wait mends, and what to do: err_code 10054, a message larger than the stream's
# max_msg_size (set outside tipstream: it creates DECISIONS without one). Sent again at the front of the queue,
# such a decision was refused at every round for good, and each refusal added a wait to the rounds of every
# decision behind it (up to `REFUSAL_WAIT_MAX_S`): held aside instead (`_hold`), as one too large for the server.
MESSAGE_TOO_LARGE = b'"err_code":10054'
MESSAGE_TOO_LARGE_FIX = ("larger than DECISIONS takes in a message (its max_msg_size, set outside tipstream): kept "
                         "aside and sent again every %gs (a stop spools it). Raise the limit (`nats "
                         "stream edit DECISIONS --max-msg-size=-1` takes any size): it is published at the next try")
# What a decision's HPUB adds to its bytes and its id, which the server's max_payload counts too (`_send`).
HEADER_BYTES = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")


def short_duplicate_window(window_s: float) -> str | None:
    """The start's warning for a duplicate window (TIPSTREAM_DUPLICATE_WINDOW_S) shorter than the publisher's own
    sends of a decision again (`RESENT_WITHIN_S`), or None. A warning, not a refusal: a test sets a window of 1 s to
    see what a copy stored twice does, an operator of a busy cluster may trade copies for the memory JetStream
    keeps each id of the window in, and the learner and `tip_scores` take a decision stored twice once.

    >>> short_duplicate_window(RESENT_WITHIN_S) is None, short_duplicate_window(120) is None
    (True, True)
    >>> short_duplicate_window(1)[:82]
    'TIPSTREAM_DUPLICATE_WINDOW_S=1 is shorter than the 21 s within which the publisher'
    """
    if window_s >= RESENT_WITHIN_S:
        return None
    return (f"TIPSTREAM_DUPLICATE_WINDOW_S={window_s:g} is shorter than the {RESENT_WITHIN_S:g} s within which the "
            f"publisher sends a decision JetStream has not acknowledged again (after {ACK_TIMEOUT_S:g} s without "
            "its acknowledgement): one stored and acknowledged late, a NATS server slow or stalled, is stored twice "
            "in DECISIONS. The learner and tip_scores take it once (by its id); other readers of decisions.> see "
            f"both. Set it to at least {RESENT_WITHIN_S:g} s; the default, 120 s, also covers a quick restart (the "
            "decisions a stop kept are sent again by the next start) and a lost connection's re-sends")


def _fix_for(refusal: bytes) -> str:
    """What to do about a refusal of a decision, when its answer says.

    >>> _fix_for(b'{"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}}')[:38]
    '. DECISIONS is at its limits and refus'
    >>> _fix_for(b'NATS/1.0 503')[:49]
    ". No NATS node takes DECISIONS' messages now (503"
    >>> _fix_for(b'{"error":{"code":500}}')
    ''
    """
    if any(code in refusal for code in STORAGE_FULL_CODES):
        return STORAGE_FULL_FIX
    if any(words in refusal for words in DISCARD_NEW_ANSWERS):
        return DISCARD_NEW_FIX
    if any(words in refusal for words in NO_RESPONDERS):
        return NO_RESPONDERS_FIX
    if IN_PROCESS in refusal:
        return IN_PROCESS_FIX
    return ""


def _refusal_words(answer: bytes) -> str:
    """A refusal's own words: JetStream's description, or a status line.

    >>> _refusal_words(b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"seq":0}')
    'maximum messages exceeded'
    >>> _refusal_words(b'NATS/1.0 503\\r\\nNats-Subject: decisions.score\\r\\n\\r\\n')
    'NATS/1.0 503'
    """
    try:
        description = orjson.loads(answer)["error"]["description"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        description = None
    if description.__class__ is str:
        return description[:200]
    return answer.split(b"\r\n", 1)[0][:200].decode(errors="replace")


class DecisionLogFull(Exception):
    """The queue stayed full: JetStream is away or slower than /score."""


class DecisionTooLarge(DecisionLogFull):
    """Larger than the NATS server takes in a message: never queued (`/score` answers 413: no wait mends it)."""


class DecisionWithdrawn(Exception):
    """While a decision waited for room, what it was made from went (its user was forgotten): not queued."""


class DecisionPublisher:
    """Publishes decisions to JetStream without holding /score up, and never drops one.

    `offer` queues a decision (or says the queue is full: the caller waits with `put`, and
    refuses the request if room does not come). Steps of the publishing loop:
    1. Wait for decisions and for room in the window of unacknowledged publishes.
    2. Write up to `batch` of them as one buffer of HPUB commands, each with `Nats-Msg-Id` =
       the decision id and a reply subject in our ack inbox (JetStream answers every one).
    3. Each acknowledgement (read on the raw inbox path) releases its decision and calls
       `on_published` with its id and bytes; an error answer (after a wait that doubles while
       refusals go on), or no answer within `ack_timeout_s`, puts
       the decision back at the front of the queue. JetStream's duplicate window drops a copy
       of one that had landed after all; a late acknowledgement of it (a hung server resumed) takes
       it out of the queue as published (`_settle_late`).

    Why not nats-py's `publish_async`: it builds a future, a `Msg` and a parsed ack per
    decision, which cost ~150 us of the event loop per decision here; this path ~10 us.
    """

    def __init__(self, nc: Callable[[], Any], *, queue_max: int, batch: int, window: int,
                 queue_max_bytes: float = math.inf, ack_timeout_s: float = ACK_TIMEOUT_S,
                 on_published: Callable[[str, bytes], None] | None = None,
                 on_stored: Callable[[int], None] | None = None, held_retry_s: float = HELD_RETRY_S) -> None:
        self._nc, self.queue_max, self.batch, self.window = nc, queue_max, batch, window
        # The bytes of the decisions waiting or in flight, and how many may wait: a decision is the
        # caller's to size (a /score body of 256 KB made one of 228 KB), so `queue_max` of them held
        # 4.5 GB while NATS was away, where 2 KB decisions hold 40 MB.
        self.queue_max_bytes, self.bytes = queue_max_bytes, 0
        self.ack_timeout_s, self.on_published, self.on_stored = ack_timeout_s, on_published, on_stored
        self.queue: deque[tuple[str, str, bytes]] = deque()  # (subject, decision id, payload)
        # token -> (sent at, item), oldest first; acks remove from the front, which an OrderedDict
        # absorbs in O(1) (a dict's `next(iter())` would scan the removed slots).
        self.inflight: OrderedDict[int, tuple[float, tuple[str, str, bytes]]] = OrderedDict()
        self.published = 0
        self.retried = 0
        self._refusal_wait = 0.0  # > 0 while JetStream refuses: each send waits this long first
        self._refused_at = -math.inf  # when it last doubled: refusals of decisions sent before are that round's
        self._refused_ahead = 0  # refused since the last send, back at the front of the queue in order
        self._refusal_lines = LogThrottle(per_window=REFUSAL_LINES_PER_MINUTE)
        self._unanswered_lines = LogThrottle()
        # When a line said JetStream acknowledged none, or refused a decision, and which (`_tell_answered`), until one
        # is acknowledged (`_on_ack`).
        self._wrong_told: tuple[float, str] | None = None
        # Why the decisions wait with NATS connected, as JetStream last answered (a refusal and its fix, or none
        # acknowledged), until one is acknowledged: the 503 of a full queue says it. It asked "is NATS reachable?",
        # NATS being there, while DECISIONS refused every decision at its limits (discard 'new'), or a hung server
        # answered none, and only the log named the cause and the fix.
        self._stuck: str | None = None
        # When JetStream last acknowledged none with NATS connected, as a server whose store's disk is full does.
        self._unanswered_at: float | None = None
        self._put_back: set[str] = set()  # decisions from before this start not acknowledged yet
        # Sends given up on (no acknowledgement within `ack_timeout_s`, or in flight at a reconnect): token -> decision
        # id, the newest `queue_max` or so. A hung server acknowledges them once it resumes, and those decisions,
        # back in the queue, are stored: dropped as answers to no send, a stop spooled them all the same, and the next
        # start, after the duplicate window, stored them twice. `_late`: decision id -> such an acknowledgement (its
        # bytes), until `_settle_late` takes the decision out of the queue as published.
        self._given_up: OrderedDict[int, str] = OrderedDict()
        self._late: dict[str, bytes] = {}
        # The server's max_payload (its INFO): a larger HPUB makes it close the connection ('Maximum Payload
        # Violation'), and sent again after each reconnect, one such decision held the whole log up for good.
        self.max_payload: float = math.inf
        self._largest_payload: float = math.inf  # a decision's bytes within it, with an id of ours (`offer`)
        # Queued before, now too large for the server, or refused by DECISIONS' max_msg_size: not sent (`_hold`).
        self.held: list[tuple[str, str, bytes]] = []
        self._held_lines = LogThrottle()
        # The ids of those held for a refusal (max_msg_size), sent again every `held_retry_s`, until one is published
        # (a 503 for a full queue names the setting while they are being sent again too). For the others (the
        # server's max_payload), the server's greeting is read again as often (`_look_at_max_payload`).
        self._held_refused: set[str] = set()
        self.held_retry_s, self._held_retry_at = held_retry_s, math.inf
        self._payload_wanted = False  # a decision larger than max_payload refused (413) since the last look
        # A look failing for as long as the server refused new connections said so every `held_retry_s` (30 s): told
        # at once, then once a minute with the looks left out, another kind of failure at once.
        self.clock = time.monotonic  # of `_look_at_max_payload`'s lines, a minute apart
        self._look_lines, self._looks_failed = LogThrottle(clock=lambda: self.clock()), 0
        self._looking: asyncio.Task[None] | None = None
        self._waiting_for_room: dict[str, bytes] = {}  # decision id -> payload, of each `put` waiting
        self._withdrawn: set[str] = set()
        self._on_all_put_back: Callable[[], None] | None = None
        self._token = 0
        self._inbox = b""
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        DECISION_QUEUE.set_function(lambda: self.waiting)  # read at scrape time, not set on every send

    @property
    def waiting(self) -> int:
        return len(self.queue) + len(self.inflight) + len(self.held)

    async def start(self) -> None:
        nc = self._nc()
        self._set_max_payload(nc.max_payload)
        inbox = nc.new_inbox() + ".d"
        self._inbox = inbox.encode() + b"."
        await nc.subscribe_raw(inbox + ".*", self._on_ack)

    def offer(self, subject: str, decision_id: str, payload: bytes) -> bool:
        """Queue a decision; False when the queue is full, or the decision too large for NATS (nothing was queued)."""
        if len(payload) > self._largest_payload:
            return False
        # The held count too: they wait in memory as the others do, and left out, a DECISIONS that refused every
        # decision (its max_msg_size) took them past the bound for as long as TIPSTREAM_DECISION_QUEUE_MB allowed.
        if len(self.queue) + len(self.inflight) + len(self.held) >= self.queue_max or self.bytes >= self.queue_max_bytes:
            self._room.clear()
            return False
        self.queue.append((subject, decision_id, payload))
        self.bytes += len(payload)
        self._idle.clear()
        self._work.set()
        return True

    async def put(self, subject: str, decision_id: str, payload: bytes, timeout_s: float) -> None:
        """`offer`, waiting up to `timeout_s` for room; raises DecisionLogFull after that, and
        DecisionWithdrawn once `withdraw` names it."""
        if len(payload) > self._largest_payload:  # no room will ever come for it
            _REFUSED.inc()
            self._payload_wanted = True  # the 413 says to raise max_payload: a reload of the server's is looked for
            self._held_retry_at = min(self._held_retry_at, time.monotonic() + self.held_retry_s)
            raise DecisionTooLarge(
                f"this answer's decision is {len(payload) + ID_LENGTH + HEADER_BYTES:,} bytes, more than the NATS server takes in a message (its "
                f"max_payload, {self.max_payload:,.0f} bytes), so it cannot be logged: send fewer or smaller candidates, "
                "or raise max_payload in the server's configuration (a reload is taken within "
                f"{self.held_retry_s:g}s of the next such request; TIPSTREAM_SCORE_MAX_BODY_BYTES bounds a request)")
        deadline = time.monotonic() + timeout_s
        self._waiting_for_room[decision_id] = payload
        try:
            while not self.offer(subject, decision_id, payload):
                left = deadline - time.monotonic()
                if left <= 0:
                    _REFUSED.inc()
                    raise DecisionLogFull(self._why_full())
                await woken(self._room, left)
                if decision_id in self._withdrawn:
                    raise DecisionWithdrawn(decision_id)
        finally:
            del self._waiting_for_room[decision_id]
            self._withdrawn.discard(decision_id)

    def _why_full(self) -> str:
        """Why `put` found no room: what waits, and for what. Those held aside wait for a setting, not for NATS:
        told "is NATS reachable?" only, an operator whose DECISIONS refused every decision (its max_msg_size) looked
        for an outage, while the fix was the setting the hold's error line names."""
        waiting = counted(self.waiting, "decision", "decisions")
        told = (f"{waiting} ({self.bytes / 1048576:.1f} MB) {'is' if self.waiting == 1 else 'are'} waiting for JetStream "
                f"(TIPSTREAM_DECISION_QUEUE_MAX={self.queue_max}, TIPSTREAM_DECISION_QUEUE_MB="
                f"{self.queue_max_bytes / 1048576:g})")
        refused = len(self._held_refused)  # held for max_msg_size, or being sent again (`_retry_held`)
        too_large = sum(1 for item in self.held if item[1] not in self._held_refused)  # for the server's max_payload
        why = self.why_waiting()
        if not refused and not too_large:
            return f"{told}; {why} Retry shortly."
        aside = []
        if refused:
            aside.append(f"{refused:,} larger than DECISIONS takes in a message (its max_msg_size, set outside "
                         "tipstream: `nats stream edit DECISIONS --max-msg-size=-1` takes any size, and "
                         f"{'it is' if refused == 1 else 'they are'} published within {self.held_retry_s:g}s)")
        if too_large:
            aside.append(f"{too_large:,} larger than the NATS server takes in a message (its max_payload, "
                         f"{self.max_payload:,.0f} bytes: raise it in the server's configuration, a reload is taken "
                         f"within {self.held_retry_s:g}s)")
        others = self.waiting - refused - too_large
        rest = (f" {counted(others, 'other decision waits', 'other decisions wait')} for JetStream: {why}"
                if others > 0 else "")
        return f"{told}; held aside until a limit is raised: {'; '.join(aside)}.{rest} Retry after that."

    def why_waiting(self) -> str:
        """What JetStream last said of the decisions waiting, NATS connected; else the question of an outage. A
        sentence, its stop included."""
        nc = self._nc()
        if self._stuck is not None and nc is not None and nc.is_connected:
            return f"{self._stuck}."
        return "is NATS reachable?"

    def withdraw(self, made_from: Callable[[bytes], bool]) -> int:
        """Not to be queued: the decisions waiting for room (`put`) whose payload `made_from` picks; how many.

        A forget looks for its user's decisions held and on their way to JetStream (`Eraser`, step 2):
        one still waiting for room was neither, and queued after it, it went past what the forget deletes."""
        picked = {decision_id for decision_id, payload in self._waiting_for_room.items() if made_from(payload)}
        self._withdrawn |= picked
        if picked:
            self._room.set()  # each waiting put looks again: a full queue clears it once more
        return len(picked)

    def let_go_held(self, decision_ids: Collection[str]) -> list[str]:
        """Those of `decision_ids` held aside (`_hold`) let go, for good: their user is forgotten (`Eraser`, step 4,
        waits for their decisions on their way to JetStream). Held, one was not stored (the server does not take
        it, or JetStream refused it), so there is nothing of it to delete; and held until a limit is raised,
        maybe never, it kept the forget waiting as long. (One stored on an earlier try whose acknowledgement was
        lost is deleted by its id all the same.) The ids let go."""
        gone = [item for item in self.held if item[1] in decision_ids]
        if not gone:
            return []
        self.held = [item for item in self.held if item[1] not in decision_ids]
        for _, decision_id, payload in gone:
            self.bytes -= len(payload)
            self._held_refused.discard(decision_id)
            if self._put_back:  # its spool need not wait for it: the next start leaves it out (`without_forgotten`)
                self._put_back_published(decision_id)
        self._released()
        return [decision_id for _, decision_id, _ in gone]

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued decision is acknowledged; False on timeout."""
        return await woken(self._idle, timeout_s)

    def unpublished(self) -> list[tuple[str, str, bytes]]:
        """What JetStream has not acknowledged, oldest first: in flight (in the order sent), then queued, then
        those too large to send (`held`). Those a late acknowledgement says are stored are published first: at a stop,
        spooled, they were sent again by the next start."""
        if self._late:
            self._settle_late()
        return [item for _, item in self.inflight.values()] + list(self.queue) + self.held

    def hand_over(self) -> list[tuple[str, str, bytes]]:
        """At a stop: `unpublished`, for the caller to spool. The put-back decisions' spool is the caller's from
        here on: acknowledged later in the stop (the subscription lives until the connection is drained), the
        last of them removed the spool just written, and with it the decisions served since this start."""
        self._on_all_put_back = None
        # Nothing is queued after (`offer` finds no room): a /score still answering once the stop has gone this far
        # (a second Ctrl-C does not wait for them) queued a decision neither published nor spooled, and served it.
        self.queue_max = 0
        return self.unpublished()

    def put_back(self, items: list[tuple[str, str, bytes]], on_all_published: Callable[[], None] | None = None) -> None:
        """Decisions served before this start (`decision_spool`): first in line, whatever the queue's
        bound. `on_all_published` is called once JetStream has acknowledged every one of them: until
        then their spool must stay, or a crash of this run would lose them."""
        self.queue.extendleft(reversed(items))
        self.bytes += sum(len(payload) for _, _, payload in items)
        self._put_back.update(decision_id for _, decision_id, _ in items)
        self._on_all_put_back = on_all_published
        self._idle.clear()
        self._released()

    def _put_back_published(self, decision_id: str) -> None:
        self._put_back.discard(decision_id)
        if not self._put_back and self._on_all_put_back is not None:
            done, self._on_all_put_back = self._on_all_put_back, None
            done()

    def _on_ack(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        try:
            token = int(subject.rsplit(b".", 1)[1])
        except ValueError:
            return
        sent = self.inflight.pop(token, None)
        if sent is None:  # answered after we gave up on it: it was re-queued already
            decision_id = self._given_up.pop(token, None)
            if decision_id is not None and data.startswith(b'{"stream"') and b'"error"' not in data:
                self._late.setdefault(decision_id, data)
                self._work.set()
            return
        sent_at, item = sent
        if data.startswith(b'{"stream"') and b'"error"' not in data:
            self.published += 1
            self.bytes -= len(item[2])
            self._refusal_wait = 0.0
            _PUBLISHED.inc()
            if self._stuck is not None:  # set whenever `_wrong_told` is
                self._stuck = None
                if self._wrong_told is not None:
                    self._tell_answered()
            if self.on_published is not None:
                self.on_published(item[1], item[2])
            if self._put_back:
                self._put_back_published(item[1])
            if self._held_refused:
                self._held_refused.discard(item[1])
            if self.on_stored is not None:
                seq = _stored_seq(data)
                if seq is not None:
                    self.on_stored(seq)
        elif MESSAGE_TOO_LARGE in data:
            self._hold(item, MESSAGE_TOO_LARGE_FIX % self.held_retry_s)
            return
        else:  # an error answer, or a status such as 503 no responders
            # Retried after a wait that doubles while refusals go on: a refusal that lasts (the
            # stream gone) was retried thousands of times a second, each with a warning. Doubled
            # once per round of sends, not per decision refused: one refused batch took it to
            # the ceiling at once.
            if sent_at >= self._refused_at:
                self._refused_at = time.monotonic()
                answer = data or headers or b""
                self._stuck = (f"JetStream refuses them ({_refusal_words(answer)})"
                               f"{_fix_for(answer) or '; the warning in the log says more'}")
                self._refusal_wait = min(max(self._refusal_wait * 2, 0.1), REFUSAL_WAIT_MAX_S)
                left_out = self._refusal_lines.allow(None)
                if left_out is not None:
                    if self._wrong_told is None:
                        self._wrong_told = (time.monotonic(), "refused one")
                    log.warning("JetStream refused decision %s (%s); retrying in %.1fs%s%s", item[1],
                                (data or headers or b"")[:200], self._refusal_wait,
                                since_last_line(left_out, "refused round", "refused rounds"),
                                _fix_for(data or headers or b""))
            # Behind those refused before it, not in front: one at a time at the front reversed them.
            self._requeue([item], at=self._refused_ahead)
            self._refused_ahead += 1
        self._released()

    def _give_up(self, sent: list[tuple[int, str]]) -> None:
        """(token, decision id) of sends whose acknowledgement is no longer waited for, kept for a late one."""
        given_up = self._given_up
        given_up.update(sent)
        while len(given_up) > max(self.queue_max, self.window) * 2:
            given_up.popitem(last=False)

    def _settle_late(self) -> None:
        """The decisions a late acknowledgement says are stored (`_late`), out of the queue (or of the sends in flight
        again, or of those held) as published. One no longer there was published meanwhile (its copy acknowledged as
        a duplicate) or let go: nothing more to do."""
        late, self._late = self._late, {}
        landed = [item for item in self.queue if item[1] in late]
        if landed:
            self.queue = deque(item for item in self.queue if item[1] not in late)
        for token in [token for token, (_, item) in self.inflight.items() if item[1] in late]:
            landed.append(self.inflight.pop(token)[1])
        if self.held and any(item[1] in late for item in self.held):
            landed += [item for item in self.held if item[1] in late]
            self.held = [item for item in self.held if item[1] not in late]
        for item in landed:
            if item[1] in late:  # once, should a decision wait twice
                # Answered as a send of its own, through `_on_ack`: its success path, inline there, is every
                # decision's (a method of its own for both cost each acknowledgement ~80 ns more, 6%).
                self._token += 1
                self.inflight[self._token] = (0.0, item)
                self._on_ack(b"late.%d" % self._token, b"", late.pop(item[1]), None)
        if landed:
            self._released()

    def reconnected(self) -> None:
        """NATS is back on a new connection. What was sent on the old one and not acknowledged never
        will be (the acknowledgement went to a dead socket): send it again now rather than after
        `ack_timeout_s`, so that it is not held in memory, exposed to a crash, for seconds. The server may take
        larger messages than the last (its max_payload): the decisions held for that are tried again."""
        nc = self._nc()
        if nc is not None:
            self._set_max_payload(nc.max_payload)
        if self.inflight:
            self._give_up([(token, item[1]) for token, (_, item) in self.inflight.items()])
            self._requeue([item for _, item in self.inflight.values()])
            self.inflight.clear()
        self._payload_wanted = False  # its greeting told the new connection's
        if self.held:
            self.queue.extend(self.held)
            self.held = []
            self._held_refused.clear()
            self._held_retry_at = math.inf
        self._released()
        self._work.set()

    def _retry_held(self) -> None:
        """The decisions held for DECISIONS' max_msg_size, back at the front of the queue: refused again, they are
        held again (`_on_ack`), and tried again `held_retry_s` later. For those held for the server's max_payload,
        or a 413 since the last look, its greeting is read again (`_look_at_max_payload`)."""
        self._held_retry_at = math.inf
        if (self._payload_wanted or self._held_for_payload()) and (self._looking is None or self._looking.done()):
            self._payload_wanted = False
            self._looking = asyncio.create_task(self._look_at_max_payload())
        items = [item for item in self.held if item[1] in self._held_refused]
        if items:
            self._send_again(items)

    def _send_again(self, items: list[tuple[str, str, bytes]]) -> None:
        """`items`, taken out of `held`, back at the front of the queue."""
        again = {item[1] for item in items}
        self.held = [item for item in self.held if item[1] not in again]
        self._requeue(items)
        self._idle.clear()
        self._released()

    def _held_for_payload(self) -> bool:
        return any(item[1] not in self._held_refused for item in self.held)

    async def _look_at_max_payload(self) -> None:
        """The server's max_payload, read again from its greeting to a new connection (`max_payload_now`): raised by
        a configuration reload (`nats-server --signal reload`, as the hold's error line and the 413 ask), it is told
        to no connection, and the decisions held for it waited for a reconnect, maybe never, /score refusing those
        as large (a 413) meanwhile. Those held for it go back to the front of the queue: still too large, they are
        held again (`_send`), and looked for again `held_retry_s` later."""
        nc = self._nc()
        look = getattr(nc, "max_payload_now", None)
        try:
            max_payload = await look() if look is not None and nc.is_connected else None
        except Exception as error:  # noqa: BLE001 - the look is asked again while decisions wait for it
            self._looks_failed += 1
            left_out = self._look_lines.allow(type(error))
            if left_out is not None:
                log.warning("could not read the NATS server's max_payload again (%s); looking again in %gs while a "
                            "decision waits for it%s", error, self.held_retry_s,
                            since_last_line(left_out, "failed look", "failed looks"))
            max_payload = None
        if max_payload is not None and self._looks_failed:
            log.info("the NATS server's max_payload is read again, after %s that failed",
                     counted(self._looks_failed, "look", "looks"))
            self._look_lines.clear()  # the next failure is told at once
            self._looks_failed = 0
        if max_payload is not None and max_payload != self.max_payload:
            items = [item for item in self.held if item[1] not in self._held_refused]
            log.info("the NATS server takes messages of up to %s bytes now (its max_payload, %s before; a "
                     "configuration reload)%s", f"{max_payload:,}", f"{self.max_payload:,.0f}",
                     f": {counted(len(items), 'decision held for it is', 'decisions held for it are')} sent"
                     if items else "")
            self._set_max_payload(max_payload)
            if items:
                self._send_again(items)
                self._work.set()
        if self._held_for_payload():
            self._held_retry_at = min(self._held_retry_at, time.monotonic() + self.held_retry_s)

    def _released(self) -> None:
        queued, inflight = len(self.queue), len(self.inflight)
        if queued + inflight + len(self.held) < self.queue_max and self.bytes < self.queue_max_bytes and not self._room.is_set():
            self._room.set()
        if not queued and not inflight:
            self._idle.set()
        elif queued and inflight < self.window and not self._work.is_set():
            self._work.set()

    def _requeue(self, items: list[tuple[str, str, bytes]], at: int = 0) -> None:
        """Back in the queue, in their order, `at` places from its front."""
        at = min(at, len(self.queue))
        self.queue.rotate(-at)
        self.queue.extendleft(reversed(items))
        self.queue.rotate(at)
        self.retried += len(items)
        _RETRIED.inc(len(items))

    def _expire(self, now: float) -> bool:
        """Re-queue decisions whose ack did not come in time; True if any. Tokens are sent in
        order, so the oldest is first: only the front of `inflight` needs looking at."""
        inflight, late, tokens = self.inflight, [], []
        while inflight:
            sent_at, item = next(iter(inflight.values()))
            if sent_at >= now - self.ack_timeout_s:
                break
            token, _ = inflight.popitem(last=False)
            late.append(item)
            tokens.append((token, item[1]))
        if late:
            self._give_up(tokens)
            self._requeue(late)
            self._released()
        return bool(late)

    def _set_max_payload(self, max_payload: int) -> None:
        self.max_payload = max_payload
        # One subtraction for /score's ids, all of ID_LENGTH: the whole sum on every offer cost ~100 ns more.
        self._largest_payload = max_payload - HEADER_BYTES - ID_LENGTH

    def _hold(self, item: tuple[str, str, bytes], why: str | None = None) -> None:
        """Queued before (a start's spool), and larger than this server takes, or refused by JetStream for a
        reason no wait mends (`why`): kept, not sent, until a reconnect (`reconnected`) or the server's max_payload
        raised (`_look_at_max_payload`), or for a refusal the next try (`_retry_held`), and spooled at the stop."""
        self.held.append(item)
        if why is None:
            self._held_refused.discard(item[1])  # sent again and now too large for the server (`_send`)
        else:
            self._held_refused.add(item[1])
        self._held_retry_at = min(self._held_retry_at, time.monotonic() + self.held_retry_s)
        self._released()
        left_out = self._held_lines.allow(None)
        if left_out is None:
            return
        size = len(item[2]) + len(item[1]) + HEADER_BYTES
        more = since_last_line(left_out)
        if why is not None:
            log.error("JetStream refused decision %s (%s bytes) for good: %s%s", item[1], f"{size:,}", why, more)
            return
        log.error("decision %s is %s bytes, more than the NATS server takes in a message (its max_payload, %s "
                  "bytes): not sent (the server would close the connection for it), kept for a server that takes "
                  "it (raise max_payload in its configuration: a reload does, the server's limit is looked at again "
                  "every %gs)%s", item[1], f"{size:,}", f"{self.max_payload:,.0f}", self.held_retry_s, more)

    def _tell_unanswered(self) -> None:
        """A server that takes publishes and answers none: nats-server with its store's disk full answered
        nothing, on the connection or in the log of this service, whose decisions went round for good. One that
        hangs (stopped) answers none either, and the line named only a full store."""
        nc = self._nc()
        if nc is None or not nc.is_connected:
            return  # away: told by the connection's own lines
        self._unanswered_at = time.time()
        self._stuck = (f"JetStream acknowledged none of those sent {self.ack_timeout_s:g}s ago, NATS connected: does "
                       "the NATS server hang (stopped, or overloaded), or is its store full (its log says 'no space left "
                       "on device')? The warning in this service's log says more")
        left_out = self._unanswered_lines.allow(None)
        if left_out is None:
            return
        if self._wrong_told is None:  # the first line: `_tell_answered` says how long since (as for refusals)
            self._wrong_told = (time.monotonic(), "acknowledged none")
        log.warning("JetStream acknowledged none of the decisions sent %gs ago, NATS connected; %s, sent again "
                    "(/score answers 503 once TIPSTREAM_DECISION_QUEUE_MAX wait). Does the NATS server hang (stopped, "
                    "or overloaded)? Then the connection is dropped after two pings unanswered "
                    "(TIPSTREAM_NATS_PING_INTERVAL_S) and made again. Or is its store full? Its log says 'no space "
                    "left on device' then: free space there; nats-server stores nothing after a failed write until it "
                    "is restarted (tipstream restarts its embedded one itself).%s",
                    self.ack_timeout_s, counted(self.waiting, "decision waits", "decisions wait"),
                    since_last_line(left_out, "such round", "such rounds"))

    def store_failed_told(self) -> str | None:
        """Whether JetStream acknowledged no decision with NATS connected since this service started, said as a
        cause of sequences a stream never stored (`jsx.gone_before`); a server that hangs does so too."""
        if self._unanswered_at is None:
            return None
        at = time.strftime("%H:%M:%S UTC", time.gmtime(self._unanswered_at))
        return f"JetStream acknowledged no decision with NATS connected (last at {at}), as such a server does"

    def _tell_answered(self) -> None:
        """The warnings of `_tell_unanswered` and of refusals were the last word once the server took decisions again
        (a hung server resumed, a cluster's DECISIONS led again): the operator was left to guess whether it still held."""
        since, what = self._wrong_told
        log.info("JetStream acknowledges decisions again, %.0f s after the first line saying it %s; %s",
                 time.monotonic() - since, what, counted(self.waiting, "decision waits", "decisions wait"))
        self._wrong_told = None

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._looking is not None:
                self._looking.cancel()

    async def _run(self) -> None:
        backoff = 0.1
        # nats-py's flush swallows a cancellation where it waits (`except CancelledError: pass`): for its flusher's
        # queue, or, past its pending_size (2 MB) unwritten, for the server to read, which a stalled one never does.
        # The stop's was lost there, and the stop, which waits for this task, waited for ever. Task.cancelling() still
        # counts it (taken once: `asyncio.current_task()` is ~0.2 µs, a send ~1.5).
        running = asyncio.current_task()
        assert running is not None
        while True:
            await woken(self._work, min(LOOK_S, self.ack_timeout_s, max(self._held_retry_at - time.monotonic(), 0.0)))
            self._work.clear()
            if self._late:
                self._settle_late()
            if time.monotonic() >= self._held_retry_at:
                self._retry_held()
            if self.inflight and self._expire(time.monotonic()):
                self._tell_unanswered()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, UNANSWERED_WAIT_MAX_S)
                continue
            if self._refusal_wait:
                await asyncio.sleep(self._refusal_wait)
            nc = self._nc()
            room = self.window - len(self.inflight)
            if not self.queue or room <= 0:
                continue
            if nc is None or not nc.is_connected:
                # Nothing is sent while away; the queue holds them. Looked at often, not after waits
                # that double: those reached 5 s, and the decisions served during an outage stayed
                # here that long after NATS was back.
                await asyncio.sleep(AWAY_POLL_S)
                self._work.set()
                continue
            backoff = 0.1
            await self._send(nc, min(self.batch, room, len(self.queue)))
            if running.cancelling():
                raise asyncio.CancelledError
            if self.queue and len(self.inflight) < self.window:
                self._work.set()

    async def _send(self, nc: Any, count: int) -> None:
        """One buffer of `count` HPUB commands, handed to the client's writer."""
        now = time.monotonic()
        self._refused_ahead = 0
        parts = []
        inbox, inflight, max_payload = self._inbox, self.inflight, self.max_payload
        for _ in range(count):
            item = self.queue.popleft()
            subject, decision_id, payload = item
            if len(payload) + len(decision_id) + HEADER_BYTES > max_payload:
                self._hold(item)
                continue
            self._token += 1
            inflight[self._token] = (now, item)
            header = b"NATS/1.0\r\nNats-Msg-Id: " + decision_id.encode() + b"\r\n\r\n"
            parts.append(b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                subject.encode(), inbox, self._token, len(header), len(header) + len(payload), header, payload))
        if not parts:
            return
        try:
            await nc._send_command(b"".join(parts))
            await nc._flush_pending()
        except Exception as error:  # noqa: BLE001 - the connection went away: acks will time out, then retry
            log.warning("could not write %s to NATS (%s); %s will be retried",
                        counted(len(parts), "decision", "decisions"), error, "it" if len(parts) == 1 else "they")
