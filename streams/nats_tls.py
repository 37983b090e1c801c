"""A `tls://` NATS URL kept to its word: TLS, or no connection.

nats-py upgrades a connection to TLS only when the server's greeting (INFO) says `tls_required`.
Against a server without TLS, `tls://` connected in plain text and sent the CONNECT, credentials
included, in the clear; against one that offers TLS without requiring it (`allow_non_tls`), it
stayed in plain text too. nats.go refuses the first (`checkForSecure`) and upgrades the second;
`TlsIntentClient` does the same, on every connection and reconnection, before CONNECT is written.
A TLS context given (`app.nats_auth`: a CA, a client certificate) asks for TLS as `tls://` does.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

URL_ASKS = "the NATS URL asks for TLS (tls://)"
FILES_ASK = "TLS is asked for by the CA or client certificate given"


class TlsNotOffered(NatsError):
    """A `tls://` server whose greeting offers no TLS: nothing was sent to it."""

    def __init__(self, host: str, port: int | None, asked_by: str = URL_ASKS) -> None:
        super().__init__(
            f"{asked_by}, and the server at {host}:{port} offers none "
            "(its greeting has neither tls_required nor tls_available), so nothing was sent to it")


def wants_tls(scheme: str) -> bool:
    """Whether a server's URL scheme asks for TLS after the greeting (`wss` is TLS from the first byte).

    >>> wants_tls("tls"), wants_tls("nats"), wants_tls("wss")
    (True, False, False)
    """
    return scheme == "tls"


def upgrade_or_refuse(info: dict[str, Any], host: str, port: int | None, asked_by: str = URL_ASKS) -> None:
    """Mark `info` as requiring TLS, so nats-py upgrades before its CONNECT; refuse a server without it.

    >>> info = {"tls_available": True}
    >>> upgrade_or_refuse(info, "nats.example", 4222); info["tls_required"]
    True
    >>> upgrade_or_refuse({"tls_required": False}, "nats.example", 4222)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streams.nats_tls.TlsNotOffered: the NATS URL asks for TLS (tls://), and the server at nats.example:4222 offers none ...
    """
    if not (info.get("tls_required") or info.get("tls_available")):
        raise TlsNotOffered(host, port, asked_by)
    info["tls_required"] = True


class _StartTlsEof(logging.Filter):
    """nats-py makes a plain stream TLS in place (`start_tls`), so asyncio's stream protocol still
    takes it for plain text and asks, at the server's end of the connection, to keep it half open,
    which TLS cannot: a harmless warning that came with every connection lost to a TLS server."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "returning true from eof_received() has no effect when using ssl"


logging.getLogger("asyncio").addFilter(_StartTlsEof())


class TlsIntentClient(NATS):
    """A nats-py client that keeps a `tls://` URL to TLS (see the module's docstring)."""

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # nats-py calls this with the greeting it has just stored as `_server_info` (the same dict),
        # before it decides on TLS from it and writes CONNECT; later calls are a cluster's updates.
        server = self._current_server
        if initial_connection and server is not None:
            if wants_tls(server.uri.scheme):
                upgrade_or_refuse(info, server.uri.hostname or "?", server.uri.port)
            elif self.options.get("tls") is not None:
                upgrade_or_refuse(info, server.uri.hostname or "?", server.uri.port, FILES_ASK)
        await super()._process_info(info, initial_connection)
