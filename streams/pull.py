"""The pull path ingest reads JetStream by: a nats-py client whose parser hands a pull inbox's messages
over raw, and the puller that keeps a batch requested.

The consumer asks for a batch of messages, and asks for more when half has arrived, so the server always
has a request in hand. nats-py's high-level `fetch` waits per call and tops out near 45k msg/s here; this
path runs several times faster. Stream set-up, publishing and the consumers' checks are in
`streams/jetstream.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from nats.errors import Error as NatsError
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from streams.answers import answered
from streams.log_throttle import LogThrottle, since_last_line
from streams.nats_tls import TlsIntentClient

log = logging.getLogger("tipstream.jetstream")
# A pull request left unfilled expires after this long, and the server then says the stream has
# nothing more (408): how soon an idle stream is known to be read to its end (`BatchPuller.idle`),
# which a silence learned by the clock waits for. At 5 s, a quiet service learned silences up to
# 5 s late after each reaction and after each start; at 1 s an idle stream costs one request a second.
PULL_EXPIRES_S = 1.0
# What one pull request may bring, in bytes (at least two of the server's largest messages, so that one always
# fits): by count alone, a batch of 1,024 events near NATS's 1 MB max_payload was a gigabyte on its way at once.
PULL_MAX_BYTES = 8 << 20
# How long past its expiry a pull request may go without any answer, a message or a status, before its puller tells
# its owner (`BatchPuller.on_unanswered`): the server ends every request within `expires_s`, with a 408 if nothing
# came. A NATS node that leads the consumer and hangs answers nothing, and no 503 says so either: its interest in the
# requests' subject stays with the cluster until its routes time out, minutes later, so each goes to it and is lost.
# The margin is for the way there and back and the server's own timer (nats-server's consumer loop sends the 408 when
# a timer set for the earliest expiry, counted from the request's arrival, fires: 2.9.10 and 2.15 alike): here the
# 408 came 1-4 ms after the expiry, also with the server's core shared with two busy processes. A server a second late
# on its own timers is stalled, which is what the owner is told.
UNANSWERED_PAST_EXPIRY_S = 1.0
GREETING_S = 2.0  # how long `IngestClient.max_payload_now` waits for a server's greeting (nats-py's connect_timeout)


RawMsg = tuple[str, bytes, bytes]  # (subject, reply, body): all ingest needs of a message

_MSG = re.compile(rb"MSG\s+(\S+)\s+(\S+)\s+((\S+)[^\S\r\n]+)?(\d+)\r\n")
_HMSG = re.compile(rb"HMSG\s+(\S+)\s+(\S+)\s+((\S+)[^\S\r\n]+)?(\d+)\s+(\d+)\r\n")


# A raw message handler that raised: a bug in tipstream, told with its traceback once a minute (the rest
# counted, and told with the next). Raised through the parser, it ended nats-py's read loop, which logs it
# under its own name and tells nobody: the connection still counted as connected, so nothing more was read
# from it (events, acknowledgements, JetStream's answers), and nothing reconnected, until its pings went
# unanswered (20-30 s later, app/nats_connection.py; minutes, at nats-py's own ping interval).
_HANDLER_FAILURES = LogThrottle()


def _tell_handler_failure(subject: bytes, error: Exception) -> None:
    left_out = _HANDLER_FAILURES.allow(None)
    if left_out is None:
        return
    log.error("a message on %s could not be handled (%s: %s); the connection reads on. This is a bug in "
              "tipstream: please report it with this traceback%s", subject.decode(errors="replace"),
              type(error).__name__, error, since_last_line(left_out, "failure", "failures"), exc_info=error)


class FastParser(Parser):
    """nats-py's protocol parser, with messages read at an offset instead of cut off the buffer's front.

    The stock parser deletes each message from the front of its buffer, a copy of the
    whole remaining buffer per message. Anything but MSG/HMSG goes to the stock parser.
    """

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        pos, end = 0, len(buf)
        raw_handlers = getattr(self.nc, "_raw_handlers", {})
        try:
            while pos < end:
                if self.state == AWAITING_MSG_PAYLOAD:  # a payload that straddled two reads
                    if end - pos < self.needed + 2:
                        break
                    arg = self.msg_arg
                    pos = self._deliver_raw(raw_handlers, arg["sid"], arg["subject"], arg["reply"],
                                            self.header_needed, self.needed, buf, pos) \
                        or await self._deliver(arg["sid"], arg["subject"], arg["reply"],
                                               self.header_needed, self.needed, buf, pos)
                    self.header_needed = 0
                    self.state = AWAITING_CONTROL_LINE
                    continue
                first = buf[pos]
                match = _HMSG if first == 72 else _MSG if first == 77 else None
                found = match.match(buf, pos) if match else None
                if found is None:
                    if match is not None and buf.find(b"\r\n", pos) < 0:
                        break  # a control line split across reads
                    del buf[:pos]
                    pos, end = 0, 0
                    await super().parse()
                    return
                groups = found.groups()
                if match is _HMSG:
                    header_size, needed = int(groups[4]), int(groups[5])
                else:
                    header_size, needed = 0, int(groups[4])
                subject, sid, reply = groups[0], int(groups[1]), groups[3] or b""
                start = found.end()
                if end - start >= needed + 2:  # the common case: the whole message is here
                    pos = self._deliver_raw(raw_handlers, sid, subject, reply, header_size, needed, buf, start) \
                        or await self._deliver(sid, subject, reply, header_size, needed, buf, start)
                else:
                    self.msg_arg["subject"], self.msg_arg["sid"], self.msg_arg["reply"] = subject, sid, reply
                    self.header_needed, self.needed = header_size, needed
                    self.state = AWAITING_MSG_PAYLOAD
                    pos = start
        finally:
            if pos:
                del buf[:pos]

    @staticmethod
    def _deliver_raw(raw_handlers: dict[int, Any], sid: int, subject: bytes, reply: bytes,
                     header_size: int, needed: int, buf: bytearray, pos: int) -> int:
        """Hand the message to its raw handler (no coroutine per message); 0 when it has none."""
        handler = raw_handlers.get(sid)
        if handler is None:
            return 0
        # Only status messages (no reply) and DLQ copies (where their original is: the scrub's
        # `cut_copy_of`) need their headers; events carry none we read, and ingest reads no DLQ.
        header = bytes(buf[pos : pos + header_size]) if header_size and (
            not reply or subject.startswith(b"dlq.")) else None
        try:  # free in 3.11 when nothing is raised
            handler(subject, reply, bytes(buf[pos + header_size : pos + needed]), header)
        except Exception as error:  # noqa: BLE001 - told; the connection must read on
            _tell_handler_failure(subject, error)
        return pos + needed + 2

    async def _deliver(self, sid: int, subject: bytes, reply: bytes,
                       header_size: int, needed: int, buf: bytearray, pos: int) -> int:
        payload = bytes(buf[pos + header_size : pos + needed])
        header = bytes(buf[pos : pos + header_size]) if header_size else None
        await self.nc._process_msg(sid, subject, reply, payload, header)
        return pos + needed + 2


class IngestClient(TlsIntentClient):
    """A nats-py client with a raw path for pull inboxes.

    nats-py parses every message's headers and builds a `Msg` object before a
    callback sees it; with `Nats-Msg-Id` on every event that caps a pull consumer
    near 45k msg/s on this machine. Ingest needs only subject, reply and body, so
    inboxes registered with `subscribe_raw` skip that work. Everything else (requests,
    JetStream API, publishing) goes through nats-py unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ps = FastParser(self)
        self._raw_handlers: dict[int, Callable[[bytes, bytes, bytes, bytes | None], None]] = {}
        self._greeted_max_payload: Any = None  # the server's max_payload as this connection's greeting told it

    async def connect(self, *args: Any, **options: Any) -> None:
        # nats-py sends a user JWT (`user_jwt_cb`) only once it counts itself as given credentials: its own
        # reading of a credentials file (`user_credentials`) does, callbacks given instead do not, and the JWT
        # then went only to a server whose greeting asks for one (auth_required).
        if options.get("user_jwt_cb") is not None:
            self._auth_configured = True
        await super().connect(*args, **options)

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        await super()._process_info(info, initial_connection)
        share_credentials(self._server_pool, self._current_server)
        if initial_connection:
            self._greeted_max_payload = info.get("max_payload")
        elif isinstance(info.get("max_payload"), int):
            # An INFO again on the same connection (the server's after CONNECT, a cluster's change) tells this
            # connection's own limit, an account's or user's below the server's included: nats-py takes
            # `max_payload` only from a connection's greeting, the server's.
            self._max_payload = info["max_payload"]

    async def max_payload_now(self, timeout_s: float = GREETING_S) -> int | None:
        """The largest message this connection may send now (`max_payload`). A server tells its max_payload in a
        connection's greeting, and a configuration reload (`nats-server --signal reload`) sets it for every
        connection it has, an account's limit or not, without a word to them: nats-py went on with the old one
        until a reconnect. So the server's greeting to a new connection is read: another max_payload than this
        connection's greeting told is a reload's, taken as this connection's; the same, this connection keeps what
        it was told (an account's or user's limit below the server's, in the INFO after CONNECT). Read on a
        connection of its own, closed after the greeting (completing TLS first, which a server requiring it would
        otherwise log as a failed handshake): no credentials are sent, the greeting coming before them. None: not
        connected, the greeting not had within `timeout_s`, or from another server (behind a load balancer)."""
        server = self._current_server
        if server is None or not self.is_connected or server.uri.scheme not in ("nats", "tls"):
            return None
        info: dict[str, Any] = {}
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(server.uri.hostname, server.uri.port or 4222), timeout_s)
        except (OSError, TimeoutError):
            return None
        try:
            line = await asyncio.wait_for(reader.readline(), timeout_s)
            greeting = orjson.loads(line[5:]) if line.startswith(b"INFO ") else None
            info = greeting if isinstance(greeting, dict) else {}
            if info.get("tls_required"):
                await asyncio.wait_for(writer.start_tls(
                    self.ssl_context, server_hostname=self.options.get("tls_hostname") or server.tls_name
                    or server.uri.hostname), timeout_s)
        except (OSError, TimeoutError, ValueError, NatsError):
            pass  # the greeting is what was asked for; a TLS refused here is the server's to log
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout_s)
        # The server this client is on once the greeting is had: a reconnect meanwhile may have moved it.
        known, max_payload = self._server_info.get("server_id"), info.get("max_payload")
        if not isinstance(max_payload, int) or known is None or info.get("server_id") != known or not self.is_connected:
            return None
        if max_payload != self._greeted_max_payload:
            self._greeted_max_payload = self._max_payload = max_payload
        return self._max_payload

    async def subscribe_raw(self, subject: str, handler: Callable[[bytes, bytes, bytes, bytes | None], None]) -> Any:
        sub = await self.subscribe(subject)
        self._raw_handlers[sub._id] = handler
        return sub

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handler = self._raw_handlers.get(sid)
        if handler is None:
            return await super()._process_msg(sid, subject, reply, data, headers)
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        # nats-py's own parser delivers here what follows a control line in the same read (`FastParser.parse`):
        # raised, it ended nats-py's read loop, as `_deliver_raw` guards against.
        try:
            handler(subject, reply, data, headers)
        except Exception as error:  # noqa: BLE001 - told; the connection must read on
            _tell_handler_failure(subject, error)

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        """nats-py's request, its caller's cancellation kept: nats-py waits for the answer with Python 3.11's
        `asyncio.wait_for`, which drops a cancellation that comes with it (`streams.answers`), and a loop of the
        service went on after the stop cancelled it. Every JetStream API call (stream_info, get_msg, add_consumer,
        a JetStream publish, ...) asks through here."""
        return await answered(super().request(*args, **kwargs))


def share_credentials(pool: list[Any], told_by: Any) -> None:
    """Give the servers a cluster's node announced (INFO's `connect_urls`, `discovered` in nats-py's `pool`) the
    user and password or token of the URL of `told_by`, the node that announced them, as the nodes NATS_URL names
    have theirs; one NATS_URL names already is dropped. nats-py adds them bare (host:port), and tells them from
    the nodes named by their whole netloc, credentials included, so each node named came twice, once without:
    a reconnect to that one was refused ('Authorization Violation'), and with NATS_URL naming one node of a
    cluster, the loss of that node left the client without NATS until it came back.

    >>> from urllib.parse import urlparse
    >>> from nats.aio.client import Srv
    >>> pool = [Srv(urlparse("nats://u:p@a:4222")), Srv(urlparse("nats://a:4222"), discovered=True),
    ...         Srv(urlparse("nats://b:4222"), discovered=True)]
    >>> share_credentials(pool, pool[0]); [srv.uri.geturl() for srv in pool]
    ['nats://u:p@a:4222', 'nats://u:p@b:4222']
    >>> pool.append(Srv(urlparse("nats://b:4222"), discovered=True))  # announced again, at a reconnect
    >>> share_credentials(pool, pool[1]); [srv.uri.geturl() for srv in pool]
    ['nats://u:p@a:4222', 'nats://u:p@b:4222']
    """
    if told_by is None:
        return
    userinfo, _, _ = told_by.uri.netloc.rpartition("@")
    held = {srv.uri.netloc.rpartition("@")[2] for srv in pool if "@" in srv.uri.netloc or not srv.discovered}
    for i in reversed(range(len(pool))):
        srv = pool[i]
        if not srv.discovered or "@" in srv.uri.netloc:
            continue
        # nats-py adds a node announced again at each connection's greeting, once given credentials here: kept,
        # every reconnect added it anew, and the pool grew with each try.
        if srv.uri.netloc in held:
            del pool[i]
        elif userinfo:
            srv.uri = srv.uri._replace(netloc=f"{userinfo}@{srv.uri.netloc}")
            held.add(srv.uri.netloc.rpartition("@")[2])


def server_urls(url: str) -> list[str]:
    """The servers of a NATS URL that names several, comma-separated (a cluster's nodes), as nats-py takes
    them: it reads a string as one server, and "nats://a:4222,nats://b:4222" as a port it cannot parse.

    >>> server_urls("nats://a:4222, nats://b:4222,"), server_urls("nats://a:4222")
    (['nats://a:4222', 'nats://b:4222'], ['nats://a:4222'])
    """
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(url: str, **options: Any) -> IngestClient:
    """A connection to `url`, one server or several comma-separated: nats-py moves to another of them
    when the one it is on goes away.

    Cancelled (a wait for NATS given up), it ends. nats-py's connect loop can lose a cancellation (Python 3.11's
    `wait_for` around its reads, its `_close` catching CancelledError) and, with `max_reconnect_attempts=-1`,
    tries on for ever: awaited directly, the cancelled wait then waited for it without end. It is cancelled
    again until it ends."""
    client = IngestClient()
    connecting = asyncio.ensure_future(client.connect(server_urls(url), **options))
    try:
        await asyncio.wait({connecting})  # a cancellation of this wait is this one's, whatever nats-py does
    except asyncio.CancelledError:
        while not connecting.done():
            connecting.cancel()
            await asyncio.wait({connecting}, timeout=0.1)
        if not connecting.cancelled():
            connecting.exception()  # retrieved: what it ended with is the wait's to tell (the error callback's)
        raise
    connecting.result()
    return client


# What a pull request that ended (404, 408, 409) had still to deliver.
PENDING_HEADER = re.compile(rb"Nats-Pending-Messages:\s*(\d+)", re.IGNORECASE)


# Why a pull request's consumer answers no more (`consumer_gone`).
DELETED, NO_RESPONDERS = "deleted", "no responders"


def consumer_gone(headers: bytes | None) -> str | None:
    """Why a pull request's status says its consumer takes no request (None: it does not say so). DELETED: deleted
    under a request that waited (409 Consumer Deleted), by an operator or with its stream. NO_RESPONDERS: nothing
    took the request (503): no node leads the consumer now (a NATS cluster electing one after a node was lost,
    or without a quorum), or it is deleted; the status cannot tell which.

    >>> consumer_gone(b"NATS/1.0 503\\r\\n\\r\\n"), consumer_gone(b"NATS/1.0 409 Consumer Deleted\\r\\n\\r\\n")
    ('no responders', 'deleted')
    >>> consumer_gone(b"NATS/1.0 408 Request Timeout\\r\\n\\r\\n"), consumer_gone(b"NATS/1.0 409 Leadership Change\\r\\n")
    (None, None)
    """
    status = headers[9:12] if headers else b""
    if status == b"503":
        return NO_RESPONDERS
    if status == b"409" and b"consumer deleted" in (headers or b"")[:64].lower():
        return DELETED
    return None


class Detached:
    """Work a message handler starts and cannot await (a pull request): each a task, held until it ends,
    as the event loop holds a task weakly only, and what one raised handed to `on_error`. Left alone,
    asyncio printed that as 'Task exception was never retrieved' when the task was collected, and the
    work that failed (a request never sent) waited for the next watchdog or stall to be noticed."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self.on_error = on_error
        self._held: set[asyncio.Task[Any]] = set()

    def start(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._held.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._held.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.on_error(error)


class BatchPuller:
    """Keeps up to `batch` messages requested; hands each arrival to `on_message` (synchronous, cheap)."""

    def __init__(self, nc: IngestClient, stream: str, durable: str, batch: int,
                 on_message: Callable[[RawMsg], None], expires_s: float = PULL_EXPIRES_S,
                 on_gone: Callable[[str], None] | None = None, max_bytes: int = PULL_MAX_BYTES,
                 on_unanswered: Callable[[], None] | None = None) -> None:
        self.nc, self.batch, self.on_message, self.expires_s = nc, batch, on_message, expires_s
        self.max_bytes = max(max_bytes, 2 * (nc.max_payload or 0))
        # Told why when the server says the consumer takes no request (`consumer_gone`): its owner makes it again.
        self.on_gone = on_gone
        # Told, every watch, while the requests go unanswered past their expiry (`unanswered`).
        self.on_unanswered = on_unanswered
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.requested = 0
        self.idle = False  # the server said: nothing more for now
        self.paused = False
        self.stopped = False
        self.last_activity = time.monotonic()
        # When the first request since the server's last answer (a status, or a request's worth of messages) was sent,
        # and on which connection (nats-py's count of reconnects); None: none since (`unanswered`). Counted from the
        # last answer, a request sent late (the loop held by a fold past the expiry) and one lost with a connection
        # (asked again once back) were told as unanswered by a server that answers. The watchdog's asking again is no
        # answer: the first request's time stays.
        self.asked_at: float | None = None
        self._asked_on = 0
        # A message came since the last watch: an answer too, mid-request (a batch of large messages over a slow link
        # takes seconds). A flag for the watch, not a clock read per message.
        self._heard = False
        self._sub: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._sends = Detached(self._send_failed)
        self._subjects: dict[bytes, str] = {}

    async def start(self) -> None:
        self._sub = await self.nc.subscribe_raw(self.inbox, self._on_raw)
        self._watchdog = asyncio.create_task(self._watch(), name=f"watch {self.next_subject}")
        await self._request()

    async def stop(self) -> None:
        # Messages of this puller's requests may still be in flight. The consumer that replaces
        # it replays from the position, so a late one handed on would be folded twice and, being
        # ahead of the replay, move the position past events not yet folded: its handler goes, and
        # it asks for nothing more.
        self.stopped = True
        if self._watchdog:
            self._watchdog.cancel()
        if self._sub is not None:
            self.nc._raw_handlers.pop(self._sub._id, None)
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001, S110 - the connection may already be closed
                pass

    async def _request(self) -> None:
        want = self._claim()
        if want:
            await self._send(want)

    def _claim(self) -> int:
        """Count what we are about to ask for before asking, so arrivals in between don't ask again."""
        want = self.batch - self.requested
        if want <= 0 or self.paused or self.stopped or not self.nc.is_connected:
            return 0
        self.requested += want
        return want

    async def _send(self, want: int) -> None:
        # A message past what is left of max_bytes ends the request (409 Message Size Exceeds MaxBytes, its pending
        # count told as for an expiry): asked for in the next.
        body = orjson.dumps({"batch": want, "max_bytes": self.max_bytes, "expires": int(self.expires_s * 1e9)})
        await self.nc.publish(self.next_subject, body, reply=self.inbox)
        if self.asked_at is None or self._asked_on != self.nc.stats["reconnects"]:
            self._asking()

    def _asking(self) -> None:
        """From now, a silence of the server counts (`asked_at`)."""
        self.asked_at, self._asked_on = time.monotonic(), self.nc.stats["reconnects"]

    def _request_soon(self) -> None:
        want = self._claim()
        if want:
            self._sends.start(self._send(want))

    def _send_failed(self, error: BaseException) -> None:
        # Not asked again here: a publish that keeps failing would be tried again at once, for ever.
        log.info("could not ask %s for more messages (%s); the watchdog asks again within %g s", self.next_subject,
                 error, self.expires_s + 3)

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if not reply:
            self.last_activity, self.asked_at = time.monotonic(), None
            # A status: 100 heartbeat; 404 no messages, 408 request expired, 409 conflict end a request.
            status = headers[9:12] if headers else b""
            if status == b"100":
                return
            left = PENDING_HEADER.search(headers or b"")
            self.requested = max(0, self.requested - int(left.group(1))) if left else 0
            if (gone := consumer_gone(headers)) is not None:
                # Asked again at once, a request to a consumer that is gone was answered at once, for ever: ~15,000
                # requests a second, and nothing read, until a restart. Asked again by the watchdog meanwhile.
                self.idle = False
                if self.on_gone is not None:
                    self.on_gone(gone)
                return
            self.idle = status in (b"404", b"408")
            self._request_soon()
            return
        self.requested -= 1
        self.idle = False  # more may follow: known to have nothing more only at the next status
        self._heard = True
        name = self._subjects.get(subject)
        if name is None:
            # A NATS subject is bytes, and another client's (Go's, C's) may not be UTF-8: raised here,
            # the message was never handed on, and the stream was read again from it for ever. Escaped,
            # it cannot be the subject of any event type, so the event goes to the DLQ (on a subject
            # nats-py can read back) and the stream moves on.
            name = subject.decode(errors="backslashreplace")
            if len(self._subjects) < 1024:  # a few event types, so a few subjects: decode each once
                self._subjects[subject] = name
        self.on_message((name, reply, data))
        if self.requested <= self.batch // 2:
            # Per request, not per message: the watchdog needs no more.
            self.last_activity, self.asked_at = time.monotonic(), None
            self._request_soon()

    @property
    def unanswered(self) -> bool:
        """Whether the requests have had no answer, a message or a status, for `UNANSWERED_PAST_EXPIRY_S` past the
        expiry of the first sent on this connection: the consumer's node hangs, and its cluster has not elected another
        leader yet."""
        asked = self.asked_at
        return (asked is not None and not self.paused and not self.stopped and self.nc.is_connected
                and self._asked_on == self.nc.stats["reconnects"]
                and time.monotonic() - asked > self.expires_s + UNANSWERED_PAST_EXPIRY_S)

    def go_on(self) -> None:
        """Ask again after a pause whose requests were left to end on their own (`requested` still counts them)."""
        self.paused = False
        self.last_activity = time.monotonic()
        self.asked_at = None  # a pause's quiet is not requests unanswered: those still out count from now
        if self.requested:
            self._asking()
        self._request_soon()

    def resume(self) -> None:
        """Ask again after a pause."""
        self.paused = False
        self.requested = 0
        self.idle = False  # what was stored while paused is still to come
        self.last_activity, self.asked_at = time.monotonic(), None
        self._request_soon()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._heard:  # neither unanswered nor lost: the messages of a request are on their way
                self._heard = False
                self.last_activity = time.monotonic()
                if self.asked_at is not None:
                    self.asked_at = self.last_activity
            if self.unanswered:
                # Not known to be read to its end any more: the stream may store what cannot be delivered now.
                self.idle = False
                if self.on_unanswered is not None:
                    self.on_unanswered()
            if time.monotonic() - self.last_activity > self.expires_s + 2 and not self.paused:
                # A request was lost (server restart, dropped connection): start over.
                self.requested = 0
                self.last_activity = time.monotonic()
                try:
                    await self._request()
                except Exception as error:  # noqa: BLE001 - ended by it, nothing would ask for messages again
                    self._send_failed(error)
