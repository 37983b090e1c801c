"""The demo's HTTP client beside the service's HTTP server."""

from app.demo import DEMO_HTTP_LIMITS
from app.http_server import HTTP_KEEP_ALIVE_S


def test_the_demo_lets_idle_connections_go_before_the_service_closes_them() -> None:
    # At equal times a request sent on a connection the server is closing reads an empty answer
    # (httpx.ReadError), which failed the demo's whole tick: its signals went unpublished.
    assert DEMO_HTTP_LIMITS.keepalive_expiry is not None
    assert DEMO_HTTP_LIMITS.keepalive_expiry <= HTTP_KEEP_ALIVE_S / 2
