"""The service's connection to NATS: the first connection, tried for a bounded time and told apart
when it fails (nothing there, not a NATS server, TLS or credentials refused), the server's release and
account limits checked before anything is created, and what nats-py calls back with once connected.

Apart from `bootstrap.Service` because none of it is about the service's parts: the service is told
of a reconnect (each ingest resumes from its own position), and of a connection closed for good (it
stops, exit code 1).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any

from app.embedded_nats import STORE_DIR, EmbeddedNats
from app.ingest import ACK_PENDING_BATCHES
from app.nats_auth import (
    CredentialsUnusable,
    NatsAuthError,
    client_certificate_refused,
    connected_unless,
    nats_options,
    tls_refusal_fix,
)
from app.settings import Settings
from app.start_errors import StartupError, shown_url
from streams import jetstream as jsx
from streams import pull
from streams.log_throttle import LogThrottle, counted, since_last_line
from streams.nats_tls import TlsNotOffered

log = logging.getLogger("tipstream")
# nats-py's connect_timeout (its default): how long it waits for a connection, then for the server's INFO.
NATS_GREETING_S = 2.0
# A server that stops answering without closing the connection (hung, or a network dropping packets) is
# noticed only by pings: nats-py's defaults (every 120 s, 2 unanswered) took 330 s, while /readyz said
# ready and a service on a cluster stayed on the lost node. Every TIPSTREAM_NATS_PING_INTERVAL_S (10 s) and
# 2: noticed 20-30 s after it hangs (29 s by /readyz), then the reconnect moves on. A stalled event loop
# delays the pings as well as their answers, so it cannot pass for a lost server; not shorter, as a PONG waits
# behind the messages the server is still sending (a catch-up's pull requests, megabytes over a slow link).
MAX_OUTSTANDING_PINGS = 2
NATS_PORTS = " (NATS clients connect on 4222 by default; 8222 is its HTTP monitoring port, 6222 its cluster port)"


def _credentials_refused(error: object) -> bool:
    # Not by case: nats-server 2.15 ends a connection whose user JWT expired with "user authentication expired".
    text = str(error or "").lower()
    return "authorization violation" in text or "authentication" in text


class NatsConnection:
    def __init__(self, settings: Settings, *, on_reconnected: Callable[[], None], stopping: Callable[[], bool],
                 fail: Callable[[str], None]) -> None:
        self.settings = settings
        self.url = ""  # given to `connect`: NATS_URL's, or the embedded nats-server's
        self.client: pull.IngestClient | None = None  # once the first connection is made
        self._resume = on_reconnected
        self._stopping = stopping
        self._fail = fail  # the service stops with this message (once: not while stopping, nor after a failure)
        self._connect_error: Exception | None = None  # the first connection's last failure
        self._refused = asyncio.Event()  # the first connection's one server: its TLS or credentials will not do
        self._errors = LogThrottle()  # the same NATS error: once a minute
        # The server's last refusal of a subject to this user ("permissions violation for publish to ..."): a
        # request it refused goes unanswered, and the start ended in a bare TimeoutError traceback.
        self.permission_denied: str | None = None
        # What NATS said last while the connection is down, for /readyz: its 503 otherwise showed every stream
        # caught up and the checkpoint ok, and nothing of why. Cleared once reconnected.
        self.last_error: str | None = None

    async def connect(self, url: str, embedded: EmbeddedNats | None) -> pull.IngestClient:
        """The first connection, tried for `nats_connect_timeout_s`: a server that is not there
        is the operator's to start, and retrying for ever hid that. Once connected, a lost
        connection is retried for as long as it takes (-1), as the server comes back. A single
        server whose TLS will not do (none offered for tls://, its certificate not trusted) ends the
        wait at once, as does one that refuses the credentials: no retry changes its configuration or
        what it takes, and the start waited the whole timeout (20 s) to say so."""
        self.url = url
        timeout = self.settings.nats_connect_timeout_s
        try:
            options = nats_options(self.settings)
        except NatsAuthError as error:
            raise StartupError(f"{error}.") from None
        connecting = await connected_unless(asyncio.wait_for(pull.connect(
            self.url, **options, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            ping_interval=self.settings.nats_ping_interval_s, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            reconnected_cb=self._on_reconnected, disconnected_cb=self._on_disconnected,
            error_cb=self._on_error, closed_cb=self._on_closed, name="tipstream",
        ), timeout), self._refused)
        try:
            self.client = connecting.result()
            return self.client
        except (TimeoutError, asyncio.CancelledError):
            waited = "" if self._refused.is_set() else f" within {timeout:g} s"
            cause = await self._why_unanswered(self._connect_error)
            if embedded is None:
                if NATS_PORTS in cause and self._tls_asked():
                    # nats-server's `handshake_first` waits for the client's TLS before its greeting: a NATS
                    # client port all the same, and "not a NATS server's" sent the operator to the wrong one.
                    fix = ("Set NATS_URL to a NATS server's client port; if it is one, its `tls {}` block has "
                           "`handshake_first: true` (TLS before the greeting), which tipstream does not do: set "
                           "it false there")
                elif NATS_PORTS in cause:
                    fix = "Set NATS_URL to a NATS server's client port"
                elif isinstance(self._connect_error, TlsNotOffered):
                    fix = ("Configure TLS on that server (a `tls {}` block in its configuration), or, where plain "
                           "text on the network is acceptable, set NATS_URL with nats:// and unset TIPSTREAM_NATS_TLS_*")
                elif (tls_fix := tls_refusal_fix(self._connect_error)) is not None:
                    fix = tls_fix
                elif isinstance(self._connect_error, CredentialsUnusable):  # changed since the settings read it
                    fix = "Put a user's whole credentials file at TIPSTREAM_NATS_CREDS"
                elif _credentials_refused(cause) and self.settings.nats_creds is not None:
                    # The URL's user and password are not what the server refused: the file's JWT was.
                    fix = (f"The server refused the user of TIPSTREAM_NATS_CREDS={self.settings.nats_creds}: its "
                           "JWT is not one this server takes (issued by an account or operator it does not know, "
                           "expired, or revoked). Set TIPSTREAM_NATS_CREDS to a credentials file of a user of this "
                           "server's operator (`nsc generate creds -a <account> -n <user>`, or Synadia Cloud's)")
                elif _credentials_refused(cause):  # a server there, not "start" one
                    fix = ("Set NATS_URL with credentials that server takes: a user and password "
                           "(nats://user:password@host:4222) or a token (nats://token@host:4222), or, for a server "
                           "in operator mode (JWTs), TIPSTREAM_NATS_CREDS to a user's credentials file")
                else:
                    fix = "Start NATS there (with JetStream: `nats-server -js`)"
                raise StartupError(
                    f"Cannot reach NATS at {shown_url(self.url)} (NATS_URL){waited}: {cause}. {fix}, "
                    "or unset NATS_URL to run an embedded one; TIPSTREAM_NATS_CONNECT_TIMEOUT_S sets how long to "
                    "wait.") from None
            raise StartupError(
                f"The embedded nats-server at {shown_url(self.url)} did not answer within {timeout:g} s: {cause}. "
                f"See {embedded.store_dir / 'nats-server.log'}; TIPSTREAM_NATS_CONNECT_TIMEOUT_S sets how long to "
                "wait.") from None

    def _tls_asked(self) -> bool:
        """Whether the connection asks for TLS: a tls:// URL, or TLS files set (`streams.nats_tls`)."""
        s = self.settings
        return (any(url.startswith("tls://") for url in pull.server_urls(self.url))
                or s.nats_tls_ca is not None or s.nats_tls_cert is not None)

    async def _why_unanswered(self, error: Exception | None) -> str:
        """Why the first connection failed, for the start's message. nats-py says nothing for a server
        that takes the connection and never greets (Redis, RabbitMQ, an HTTP port): the message read
        "within 20 s: . Start NATS there", though something else was there."""
        text = str(error or "")
        if "expecting INFO" in text or "info message" in text:  # it spoke first, and not NATS
            return f"{text}, so what listens there is not a NATS server's client port{NATS_PORTS}"
        if error is not None and (not isinstance(error, TimeoutError) or text):  # None: none within the wait
            return text or "no answer"
        listening = []
        for url in pull.server_urls(self.url):
            parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port or 4222), 1)
            except (OSError, TimeoutError, ValueError):
                continue
            writer.close()
            listening.append(f"{parts.hostname}:{parts.port or 4222}")
        if listening:
            return (f"{', '.join(listening)} took the connection but sent no NATS greeting (INFO) within "
                    f"{NATS_GREETING_S:g} s, so what listens there is not a NATS server's client port{NATS_PORTS}")
        return f"no connection within {NATS_GREETING_S:g} s (a host that does not answer, or a firewall dropping it)"

    async def check_server(self, js: Any) -> None:
        """The server's release and the account's JetStream limits, told before anything is created:
        a limit the streams or consumers would break ended the start with the server's bare words
        (`app.startup` gives them a fix), or, for storage, let the service run until it filled."""
        assert self.client is not None
        s, version = self.settings, str(self.client._server_info.get("version", "?"))
        where = f"{shown_url(self.url)} (NATS_URL)" if s.nats_url else "the embedded nats-server"
        if (too_old := jsx.server_too_old(version, where)) is not None:
            if (found := jsx.release(version)) is not None and found < jsx.FIRST_WITH_JETSTREAM:
                raise StartupError(too_old)
            log.warning("%s", too_old)
        limits = await jsx.account_limits(js)  # an account without JetStream: APIError 10039, told by app.startup
        log.info("NATS: nats-server %s at %s", version, where)
        if (unbounded := jsx.unbounded_in_bounded_account(limits, s.stream_max_bytes)) is not None:
            log.warning("%s", unbounded)
        wanted = s.ingest_batch * ACK_PENDING_BATCHES
        if limits.max_ack_pending is not None and 0 < limits.max_ack_pending < wanted:
            log.warning("This NATS account lets a consumer hold %d unacknowledged messages (max_ack_pending), fewer "
                        "than the %d ingest asks for (TIPSTREAM_INGEST_BATCH=%d x %d): ingest runs with %d, which "
                        "can slow it. Raise the account's max_ack_pending to %d or more to read at full speed.",
                        limits.max_ack_pending, wanted, s.ingest_batch, ACK_PENDING_BATCHES,
                        limits.max_ack_pending, wanted)

    def unanswered(self) -> StartupError:
        """The start's message for a JetStream call that went unanswered (nats-py's TimeoutError)."""
        s = self.settings
        where = f"{shown_url(self.url)} (NATS_URL)" if s.nats_url else "the embedded nats-server"
        if self.permission_denied is not None:
            user = (f"the user of TIPSTREAM_NATS_CREDS={s.nats_creds}" if s.nats_creds is not None
                    else "NATS_URL's user")
            return StartupError(
                f"NATS at {where} refused {user} a subject tipstream needs ({self.permission_denied}), and the "
                f"JetStream call went unanswered. tipstream publishes to $JS.API.>, $JS.ACK.>, decisions.> and "
                "dlq.>, and subscribes to _INBOX.>: allow those in that user's permissions (`permissions {}` in "
                "the server's config, or the user's JWT: `nsc edit user --allow-pub ... --allow-sub ...`).")
        if not s.nats_url:
            return StartupError(f"JetStream at {where} did not answer within {s.nats_jetstream_timeout_s:g} s: see "
                                f"{s.data_dir / STORE_DIR / 'nats-server.log'}, then start tipstream again.")
        return StartupError(
            f"JetStream at {where} took tipstream's connection but did not answer within "
            f"{s.nats_jetstream_timeout_s:g} s (TIPSTREAM_NATS_JETSTREAM_TIMEOUT_S): a NATS cluster without a "
            "JetStream meta leader (its nodes still starting, or most of them down), or a server too loaded to answer. "
            "Check it (`nats server check jetstream`, or a node's monitoring page /jsz), then start tipstream again.")

    def health(self) -> dict[str, Any]:
        """For /readyz: whether the connection is up and, while it is not, what NATS said last."""
        connected = self.client is not None and self.client.is_connected
        return {"connected": connected, "last_error": None if connected else self.last_error}

    async def _on_reconnected(self) -> None:
        self.last_error = None
        # Kept, an outage's errors left out were counted on the next outage's first line, as if its own, and one
        # within the minute had its first line left out: each outage's lines start afresh.
        left_out = self._errors.clear()
        more = (f" (the errors above came {counted(left_out, 'more time', 'more times')} since their last line)"
                if left_out else "")
        log.info("reconnected to NATS%s; resuming each stream from its own position", more)
        self._resume()

    async def _on_disconnected(self) -> None:
        if not self._stopping():
            log.warning("disconnected from NATS; reconnecting")

    async def _on_error(self, error: Exception) -> None:
        if "permissions violation" in str(error).lower():
            self.permission_denied = str(error)
        if self.client is None:  # the first connection: one line, and the last error for connect's message
            refused_for_good = (isinstance(error, (TlsNotOffered, ssl.SSLCertVerificationError))
                                or client_certificate_refused(error) or _credentials_refused(error))
            ends_the_start = refused_for_good and len(pull.server_urls(self.url)) == 1
            # A refusal that ends the start at once is told by its message: "trying for 20 s" before it
            # promised a wait that never came.
            if self._connect_error is None and not ends_the_start:  # nats-py's TimeoutError says nothing: "()"
                log.warning("waiting for NATS at %s (%s); trying for %g s", shown_url(self.url),
                            str(error) or f"no NATS greeting within {NATS_GREETING_S:g} s",
                            self.settings.nats_connect_timeout_s)
            # The server closes the connection after refusing the credentials: the reset that follows
            # ("Connection reset by peer") must not hide the refusal, which names the fix.
            if not (_credentials_refused(self._connect_error) or client_certificate_refused(self._connect_error)):
                self._connect_error = error
            if ends_the_start:
                self._refused.set()
            return
        # The same error again within a minute is counted, not logged: a server that refuses the
        # credentials once it is back (a reload that changed them) answers every reconnect, twice
        # a second, with "Authorization Violation".
        # nats-py's TimeoutError of a reconnect to a server that takes the connection and never greets (one
        # hung, SIGSTOPped) has no text: the warning read "NATS: " and nothing more.
        said = str(error) or (f"no NATS greeting within {NATS_GREETING_S:g} s of reconnecting (a server that hangs, "
                              "or a network dropping packets); trying again" if isinstance(error, TimeoutError)
                              else type(error).__name__)
        if _credentials_refused(error):  # as a start names the fix, a reconnect refused the same way does
            said += self._credentials_changed_fix()
        self.last_error = said
        left_out = self._errors.allow(said)
        if left_out is not None:
            log.warning("NATS: %s%s", said, since_last_line(left_out, "time", "times"))

    def _credentials_changed_fix(self) -> str:
        if self.settings.nats_creds is not None:
            return (f": the server no longer takes the user of TIPSTREAM_NATS_CREDS={self.settings.nats_creds} (revoked, "
                    "expired, or the server's operator changed). Replace that file with a user's the server takes: "
                    "it is read again at each try, and the service reconnects then, without a restart")
        return (": the server no longer takes NATS_URL's user and password or token (changed by a reload). Give the "
                "server back the old ones, or restart tipstream with NATS_URL's new ones; /readyz is 503 until then")

    async def _on_closed(self) -> None:
        """nats-py closes the connection for good, without reconnecting, on an error the server
        sends on a live connection (but a stale connection's): an expired user JWT, a protocol limit
        passed. Ingest and the decision log then retried on the closed client for ever while
        /healthz answered ok. A new start makes a new connection (or says why it cannot)."""
        cause = (self.client.last_error if self.client is not None else None) or "no error given"
        if self.settings.nats_creds is not None and _credentials_refused(cause):  # the file's, not NATS_URL's
            fix = (f"the server no longer takes the user of TIPSTREAM_NATS_CREDS={self.settings.nats_creds} (its JWT "
                   "expired, or revoked): put a credentials file of a user it takes there first (`nsc generate creds "
                   "-a <account> -n <user>`, or Synadia Cloud's)")
        elif "maximum payload" in str(cause).lower():
            fix = ("the server's max_payload is lower than a message tipstream sent within the limit its greeting "
                   "told: lowered by a reload of its configuration, which tells no connection. The next start reads "
                   "the new limit: a /score whose decision is larger is answered 413, and decisions served before "
                   "that are larger are kept aside (spooled at a stop) until the limit is raised again")
        else:
            fix = "if the server refused its credentials, fix NATS_URL first"
        self._fail(f"NATS closed tipstream's connection to {shown_url(self.url)} for good "
                   f"({cause}), and nats-py does not reconnect after that. "
                   f"tipstream stops (exit code 1) so that its supervisor starts it again with a new connection; {fix}.")
