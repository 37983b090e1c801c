"""A request's body read straight from its ASGI messages, up to a bound: Starlette's
`request.body()` reads it whole, however large, and raises through the endpoint (a traceback
logged as an error) when the client goes away before it ends."""

from __future__ import annotations

import codecs
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


# A refusal is answered after the rest of the body is read and dropped, up to this much: closed with
# bytes of it unread, the connection was reset by the kernel, and a client still sending (a 100 kB
# body to a 64 kB bound) read "Connection reset by peer", not the 413. Past it, the answer comes at once,
# and the HTTP server deals with the rest (app/http_server.py: read past on a connection kept, or
# dropped for a bounded linger before the close).
DRAIN_MAX_BYTES = 1 << 20


class ClientGone(Exception):
    """The client disconnected before its body was read: there is no one to answer."""


async def drain(receive: Receive, scope: MutableMapping[str, Any] | None = None, read: int = 0) -> None:
    """Read and drop what is left of the body (`read` bytes of it already read), up to DRAIN_MAX_BYTES
    in all; at once when `scope`'s headers declare more than that."""
    for name, value in (scope or {}).get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > DRAIN_MAX_BYTES:
            return
    while read <= DRAIN_MAX_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit` (the rest then dropped, as `drain` does)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body", False):
                await drain(receive, read=size)
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def path_is_utf8(scope: MutableMapping[str, Any]) -> bool:
    """Whether the request's path is UTF-8 once percent-decoded. The server decodes it with errors
    replaced, so a "\ufffd" in a path parameter is either that character, sent as UTF-8 (an event's
    user_id may hold it), or bytes that are not UTF-8 ("%FF"): this tells the two apart."""
    try:
        unquote_to_bytes(scope.get("raw_path", b"")).decode()
    except UnicodeDecodeError:
        return False
    return True


def not_utf8(body: bytes) -> str | None:
    """Why a body the JSON parser refused is not JSON text in UTF-8, when its bytes tell; else None.
    The parser said only 'expected value at line 1 column 1' of a body that its sender's editor shows
    as valid JSON: one saved with a byte order mark (Windows tools write one), or in UTF-16."""
    if body.startswith(b"\x1f\x8b"):  # gzip's magic: told as "byte 1 is 0x8B; Latin-1?", a text encoding to look at
        return ("is compressed with gzip (bytes 1F 8B), which the service does not decode, whatever a "
                "Content-Encoding header says: send the JSON uncompressed")
    if body.startswith(codecs.BOM_UTF8):
        return "starts with a UTF-8 byte order mark (bytes EF BB BF), which JSON text must not: send it without one"
    if body[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or b"\x00" in body[:2]:
        return "is not UTF-8 (it looks like UTF-16 or UTF-32): send the JSON encoded as UTF-8"
    try:
        body.decode()
    except UnicodeDecodeError as error:
        return (f"is not UTF-8 (byte {error.start} is 0x{body[error.start]:02X}; Latin-1 or Windows-1252?): send the "
                "JSON encoded as UTF-8")
    return None


def field_path(loc: tuple[Any, ...]) -> str:
    """A pydantic error's location as the dotted path a refusal names: `body` for the body itself. A key
    named "" is written `""`: a body `{"": 1}` was refused as "body: Extra inputs are not permitted", as if the
    body were the extra input. pydantic marks a bad dict key with a trailing "[key]"; the key names the field.

    >>> field_path(("candidates", 0, "tip_id")), field_path(()), field_path(("",)), field_path(("f", "a b", "[key]"))
    ('candidates.0.tip_id', 'body', '""', 'f.a b')
    """
    return ".".join('""' if part == "" else str(part) for part in loc if part != "[key]") or "body"
