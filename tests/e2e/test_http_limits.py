"""`tipstream run` under a low limit on open files, against clients holding connections."""

from __future__ import annotations

import asyncio
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
