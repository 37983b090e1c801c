"""The names a request's Host header may give, against DNS rebinding.

A web page an operator opens can point its own domain at 127.0.0.1 once loaded; the browser then
takes the service on loopback for that page's origin, so the page could read any user's
`/users/{id}/features` and `/metrics`, and post to `/score`, with no cross-origin check in the way.
Its requests still name the page's domain in Host, which a service on loopback never answers to
(Jupyter and Vite refuse them the same way). The admin routes need the token either way.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.request_body import drain

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
JUDGED_MAX = 1_024


def is_loopback(host: str) -> bool:
    """Whether binding to `host` answers this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_names(bind_host: str, extra: Iterable[str]) -> frozenset[str] | None:
    """The host names a request may give (None: any), for a service bound to `bind_host`, with
    TIPSTREAM_ALLOWED_HOSTS' `extra` names: loopback names always, and by default no others on
    loopback, where nothing else reaches the service but a rebound name; bound elsewhere, any by
    default, the service being reached by whatever names the network gives it.

    >>> sorted(allowed_names("127.0.0.1", []))
    ['127.0.0.1', '[::1]', 'localhost']
    >>> sorted(allowed_names("127.0.0.1", ["Tips.Example."]))
    ['127.0.0.1', '[::1]', 'localhost', 'tips.example']
    >>> allowed_names("0.0.0.0", []), allowed_names("127.0.0.1", ["*"])
    (None, None)
    """
    names = {name.strip().lower().rstrip(".") for name in extra if name.strip()}
    if "*" in names or (not names and not is_loopback(bind_host)):
        return None
    return LOOPBACK_NAMES | names


_BRACKETED = re.compile(r"(\[[^\]]*\])(?::[0-9]*)?")  # an IPv6 address, then its port if any


def host_name(header: bytes) -> str:
    """The name a Host header gives, without its port, lowercased.

    >>> host_name(b"LocalHost:8000"), host_name(b"[::1]:8000"), host_name(b"tips.example."), host_name(b"[::1]")
    ('localhost', '[::1]', 'tips.example', '[::1]')
    >>> host_name(b"[::1]rebound.example"), host_name(b"[::1]:80:80"), host_name(b"[::1]:")
    ('[::1]rebound.example', '[::1]:80:80', '[::1]')

    A port is digits, and a name ends in one dot at most (RFC 9112 3.2 refuses an invalid Host): "localhost:abc"
    and "localhost.." were read as "localhost", and answered. Such a value is kept whole, and names no host.

    >>> host_name(b"localhost:abc"), host_name(b"localhost:80a"), host_name(b"localhost.."), host_name(b"localhost:")
    ('localhost:abc', 'localhost:80a', 'localhost..', 'localhost')
    """
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        # Only a port may follow the bracket: "[::1]rebound.example" was read as "[::1]", and allowed.
        bracketed = _BRACKETED.fullmatch(text)
        return bracketed.group(1) if bracketed is not None else text
    named = _NAMED.fullmatch(text)
    return named.group(1) if named is not None else text


_NAMED = re.compile(r"([^:]*[^:.]|)\.?(?::[0-9]*)?")  # a name, one trailing dot at most, then its port if any


class HostCheck:
    """Refuses, with a 400 naming the setting, an HTTP request whose Host is not an allowed name; and,
    whatever the names allowed, one with two Host headers or an HTTP/1.1 one with none (RFC 9112 3.2
    asks a server to refuse both). An HTTP/1.0 request without Host passes: no browser sends one."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None) -> None:
        self.app, self.allowed = app, allowed
        # Each Host header as sent, judged once: clients send the same few, and /score's every µs counts.
        self._judged: dict[bytes, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hosts = [value for name, value in scope["headers"] if name == b"host"]
            if len(hosts) != 1:
                # Two: which one was judged depended on who read them, and a proxy in front may route
                # by the other. None over HTTP/1.1: a client that broke the protocol, told so.
                if hosts or scope.get("http_version") != "1.0":
                    return await self._refuse_count(hosts, scope, receive, send)
            elif self.allowed is not None:
                value = hosts[0]
                allowed = self._judged.get(value)
                if allowed is None:
                    allowed = host_name(value) in self.allowed
                    if len(self._judged) < JUDGED_MAX:  # bounded: a client may send any name
                        self._judged[value] = allowed
                if not allowed:
                    return await self._refuse(value, scope, receive, send)
        await self.app(scope, receive, send)

    async def _refuse_count(self, hosts: list[bytes], scope: Scope, receive: Receive, send: Send) -> None:
        await drain(receive, scope)
        if hosts:
            given = ", ".join(repr(value.decode("latin-1")) for value in hosts[:4])
            error = (f"Host: sent {len(hosts)} times ({given}); a request names the one host it is for: send one "
                     "Host header (a proxy in front may have added a second)")
        else:
            error = ("Host: an HTTP/1.1 request must name the host it is for in a Host header (RFC 9112 3.2): "
                     "send e.g. `Host: 127.0.0.1`")
        await JSONResponse({"field": "Host", "error": error}, status_code=400)(scope, receive, send)

    async def _refuse(self, value: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        await drain(receive, scope)  # a body still being sent gets the answer, not a reset
        given = value.decode("latin-1")
        answer = JSONResponse({"field": "Host", "error": (
            f"Host {given!r} is not a name this service answers to (it refuses other names, against DNS "
            "rebinding): add it to TIPSTREAM_ALLOWED_HOSTS, e.g. the name a proxy in front forwards, "
            f"or call it by one of {', '.join(sorted(self.allowed or ()))}")}, status_code=400)
        await answer(scope, receive, send)
