"""The demo's HTTP client beside the service's HTTP server."""

from app.demo import DEMO_HTTP_LIMITS
from app.http_server import HTTP_KEEP_ALIVE_S


def test_the_demo_lets_idle_connections_go_before_the_service_closes_them() -> None:
    # At equal times a request sent on a connection the server is closing reads an empty answer
    # (httpx.ReadError), which failed the demo's whole tick: its signals went unpublished.
    assert DEMO_HTTP_LIMITS.keepalive_expiry is not None
    assert DEMO_HTTP_LIMITS.keepalive_expiry <= HTTP_KEEP_ALIVE_S / 2


def test_failed_ticks_left_out_are_counted_as_the_other_throttled_lines_count_them(monkeypatch, caplog) -> None:
    """It read '(2 more failed since)', in words of its own."""
    import logging

    from app import demo
    from streams.log_throttle import LogThrottle

    now = [0.0]
    monkeypatch.setattr(demo, "_TICK_FAILED", LogThrottle(clock=lambda: now[0]))
    with caplog.at_level(logging.WARNING, logger="tipstream.demo"):
        for at in (0.0, 1.0, 2.0, 60.0):
            now[0] = at
            demo._tell_tick_failure(ConnectionRefusedError("the service is away"))
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream.demo"]
    line = "demo: a tick failed (ConnectionRefusedError('the service is away')); going on"
    assert told == [line, f"{line} (2 more failed ticks since the last line)"], told
