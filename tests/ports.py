"""Free TCP ports on loopback for the servers tests and benches start, picked below the ephemeral range.

A port picked by binding to port 0 comes from the range the kernel also gives outgoing connections
(`ip_local_port_range`): between the pick and the server's own bind, a connection made meanwhile
took it once (`bench/score_floor.py` in the suite, beside two soaks: "address already in use").
Below that range only a listener binds, so a port found free stays free for the moment it takes to
start one.

That moment can be seconds (a `tipstream migrate` between the pick and the start), and another
pytest-xdist worker picking meanwhile drew the same port once ("Port 26733 on 127.0.0.1 is already
in use"): each worker picks from a slice of its own, and a process never hands out a port twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

# Above the registered ports most servers listen on; below Linux's default ephemeral range.
LOWEST = 20_000

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default (macOS starts at 49,152)


def worker_slice(low: int, high: int, environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[int, int]:
    """The ports from `low` to `high` this pytest-xdist worker picks from (all of them outside xdist;
    the processes a test starts inherit its worker's variables, and with them its slice).

    >>> worker_slice(20_000, 32_767, {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"})
    (26384, 32767)
    >>> worker_slice(20_000, 32_767, {})
    (20000, 32767)
    """
    worker, count = environ.get("PYTEST_XDIST_WORKER", ""), environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if high <= low or not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(worker[2:]) < int(count)):
        return low, high
    width = (high - low + 1) // int(count)
    start = low + int(worker[2:]) * width
    return start, (high if int(worker[2:]) == int(count) - 1 else start + width - 1)


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports, each held until all are picked (ports picked one by one can repeat:
    a cluster node once got its own route port for its clients, and did not start), none handed out
    before by this process.

    >>> a, b = free_ports(2)
    >>> a != b and LOWEST <= min(a, b)
    True
    """
    low, high = worker_slice(LOWEST, _ephemeral_low() - 1)
    rng = random.SystemRandom()
    if len(_handed_out) > (high - low) // 2:
        _handed_out.clear()  # the oldest are long given back; picking among the rest would slow down
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            port = rng.randint(low, high) if high > low else 0  # no room below: the kernel's pick
            if port in _handed_out:
                continue
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # a server of someone else's
            ports.append(sock.getsockname()[1])
            _handed_out.add(ports[-1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]
