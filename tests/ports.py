"""Free TCP ports on loopback for the servers tests and benches start, picked below the ephemeral range.

A port picked by binding to port 0 comes from the range the kernel also gives outgoing connections
(`ip_local_port_range`): between the pick and the server's own bind, a connection made meanwhile
took it once (`bench/score_floor.py` in the suite, beside two soaks: "address already in use").
Below that range only a listener binds, so a port found free stays free for the moment it takes to
start one.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

# Above the registered ports most servers listen on; below Linux's default ephemeral range.
LOWEST = 20_000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default (macOS starts at 49,152)


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, each held until all are picked (ports picked one by one can repeat:
    a cluster node once got its own route port for its clients, and did not start).

    >>> a, b = free_ports(2)
    >>> a != b and LOWEST <= min(a, b)
    True
    """
    high = _ephemeral_low() - 1
    rng = random.SystemRandom()
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            port = rng.randint(LOWEST, high) if high > LOWEST else 0  # no room below: the kernel's pick
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # a server of someone else's
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]
