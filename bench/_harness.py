"""Shared by bench/score.py and bench/learn.py: the service in a subprocess, a lean HTTP/1.1 client.

The service runs as `tipstream run` does (uvicorn with uvloop and httptools, its own embedded
nats-server, SQLite in a temporary data directory), so the figures are the product's. The
client speaks HTTP/1.1 with keep-alive over asyncio protocols (no parsing beyond the status
and Content-Length): on two cores, the load generator's own CPU is part of the measurement.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`python -m app.cli run` with the given settings, in `data_dir` (default: a temporary one);
    `cli_args` follow `run` (`--demo 200`); `launcher` replaces `-m app.cli` (a script that runs it)."""

    def __init__(self, data_dir: Path | None = None, cli_args: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = ("-m", "app.cli"), **settings: Any) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="tipstream-bench-") if data_dir is None else None
        self.data_dir = data_dir or Path(self.tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")
               and not k.startswith("TIPSTREAM_")}
        env.update({"TIPSTREAM_DATA_DIR": str(self.data_dir), "TIPSTREAM_PORT": str(self.port),
                    "TIPSTREAM_LOG_LEVEL": "warning", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    "PYTHONPATH": str(ROOT)})
        env.update({f"TIPSTREAM_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = open(self.data_dir / "service.log", "ab")
        self.process = subprocess.Popen([sys.executable, *launcher, "run", *cli_args], cwd=ROOT,
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def nats_url(self) -> str:
        return (self.data_dir / "nats.url").read_text().strip()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited; see {self.data_dir / 'service.log'}:\n"
                                   + (self.data_dir / "service.log").read_text()[-2000:])
            try:
                status, _ = await request_once(self.port, "GET", "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("the service did not get ready in time")

    def shutdown(self) -> None:
        """Stop the process as Ctrl-C does (a last checkpoint is written); keep the data directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def stop(self) -> None:
        self.shutdown()
        if self.tmp is not None:
            self.tmp.cleanup()


def encode_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a name the service answers to on loopback
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


class HttpClient(asyncio.Protocol):
    """One keep-alive connection; `send` returns (status, body) once the whole response is in."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        start = head.find(b"content-length:")
        if start >= 0:
            stop = head.find(b"\r\n", start)
            length = int(head[start + 15 : stop if stop > 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def send(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter


async def connect(port: int) -> HttpClient:
    _, client = await asyncio.get_running_loop().create_connection(HttpClient, "127.0.0.1", port)
    return client


async def request_once(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    client = await connect(port)
    try:
        return await asyncio.wait_for(client.send(encode_request(method, path, body)), 10)
    finally:
        assert client.transport is not None
        client.transport.close()


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
