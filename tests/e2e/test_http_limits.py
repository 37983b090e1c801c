"""`tipstream run` under a low limit on open files, against clients holding connections."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from tests.conftest import NatsServer, eventually
from tests.e2e.support import ServiceProcess


async def test_clients_holding_every_connection_leave_the_service_its_own_files(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """A soft limit of 200 open files, raised to the hard 300 at start (nats-server does so too; the
    service did not). Clients then hold more connections than that leaves: uvicorn accepted until
    the process had no file descriptor left, reset each new client without a word in the log, and
    the service's reconnect to NATS failed ("Too many open files") for as long as clients came."""
    service = ServiceProcess(tmp_path / "data", env={"NATS_URL": nats_server.url}, open_files=(200, 300)).start()
    assert service.process is not None
    limits = Path(f"/proc/{service.process.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [["300", "300"]]
    assert "limit on open files raised from 200 to 300" in service.log()
    assert "the service takes at most 172 HTTP connections at once" in service.log()
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(172):  # each one begun, so not idle: none is closed for another
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await writer.drain()
            held.append((reader, writer))
        answers = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            held.append((reader, writer))
            answers.append(await asyncio.wait_for(reader.read(), 10))
        assert any(a.startswith(b"HTTP/1.1 503") and b"limit on open files" in a for a in answers), answers
        await eventually(lambda: "none idle, the most that the limit on open files (ulimit -n 300)" in service.log())
        nats_server.stop()  # its connection's file descriptor comes back, then one is needed for the reconnect
        nats_server.start()
        await eventually(lambda: "reconnected to NATS" in service.log(), timeout=20)
        assert "Too many open files" not in service.log()
    finally:
        for _, writer in held:
            writer.close()
    await eventually(lambda: service.get("/healthz").status_code == 200)
    assert service.stop(), service.log()


async def test_clients_that_never_read_their_answers_are_dropped_without_a_traceback(tmp_path: Path) -> None:
    """/score pipelined by clients that read nothing: once an answer waited its time, the connection
    was dropped, and the answer being worked on went on to write to it (uvicorn told only the last
    request read, queued behind it, that its client was gone): "Exception in ASGI application" and a
    traceback for each such client."""
    service = ServiceProcess(tmp_path / "data", patches={"app.http_server.HTTP_WRITE_STALL_S": 1.0}).start()
    # Answers of ~1.5 KB (eight long tip ids): the sockets' buffers fill after fewer of them, each scored first
    # (two short ids: 15,000 answers, 10 s).
    body = json.dumps({"user_id": "u-1", "candidates": [{"tip_id": f"t-{i}-" + "x" * 120} for i in range(8)]}).encode()
    request = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    writers, probes = [], []
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", service.port)
        # The socket's state, once a write told of the reset has closed the writer's own descriptor of it.
        probes.append(socket.fromfd(writer.get_extra_info("socket").fileno(), socket.AF_INET, socket.SOCK_STREAM))
        writer.write(request * 20_000)  # answers past what the sockets' buffers hold, none read
        writers.append(writer)
    # Dropped (reset): each socket's TCP state is TCP_CLOSE (7), though the client reads nothing.
    await eventually(lambda: all(probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == b"\x07"
                                 for probe in probes), timeout=30)
    for writer, probe in zip(writers, probes, strict=True):
        writer.close()
        probe.close()
    assert "Exception in ASGI application" not in service.log()
    assert service.stop(), service.log()
