"""Shared by the benches that start the service: the service in a subprocess, a lean HTTP/1.1 client.

The service runs as `tipstream run` does (uvicorn with uvloop and httptools, its own embedded
nats-server, SQLite in a temporary data directory), so the figures are the product's. The
client speaks HTTP/1.1 with keep-alive over asyncio protocols (no parsing beyond the status
and Content-Length): on two cores, the load generator's own CPU is part of the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.settings import UNPREFIXED_SETTINGS, Settings, is_setting_variable  # noqa: E402
from tests.ports import free_port  # noqa: E402 (the benches import it from here)


def service_environment(**settings: Any) -> dict[str, str]:
    """The environment a bench's service runs in: this one without its settings (a shell's
    DATABASE_URL would have the bench write into that database, and a forgotten TIPSTREAM_*
    change its figures), then `settings` (`data_dir=...`: TIPSTREAM_DATA_DIR). The settings left out
    are named once on stderr, with the flag that sets them (`--set`)."""
    global _told_left_out
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("TIPSTREAM_")
           and name.upper() not in UNPREFIXED_SETTINGS}  # the harness's own TIPSTREAM_TEST_* too
    left_out = [name for name in os.environ if is_setting_variable(name)]
    if left_out and not _told_left_out:
        _told_left_out = True
        shown = min(sorted(left_out), key=lambda name: not name.upper().startswith("TIPSTREAM_"))
        print(f"bench: the service does not take {', '.join(sorted(left_out))} from this environment (it runs "
              f"on the defaults and the bench's flags); give a setting as --set NAME=VALUE, e.g. "
              f"--set {shown.upper().removeprefix('TIPSTREAM_').lower()}=...", file=sys.stderr)
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(ROOT)})
    env.update({f"TIPSTREAM_{k.upper()}": str(v) for k, v in settings.items()})
    return env


_told_left_out = False


def add_settings_option(parser: argparse.ArgumentParser) -> None:
    """`--set NAME=VALUE`, repeatable: a service setting for the run (`settings_given` reads them)."""
    parser.add_argument("--set", "--env", dest="set", action="append", default=[], metavar="NAME=VALUE",
                        help="a service setting for this run, e.g. --set learner_join_cache_mb=48 (repeatable; "
                             "TIPSTREAM_* variables of the environment are not passed to the service)")


def settings_given(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    """The `--set` pairs as settings, each name checked as the service checks its environment's.

    >>> settings_given(argparse.ArgumentParser(), ["policy=thompson", "TIPSTREAM_FEATURE_CACHE_USERS=0"])
    {'policy': 'thompson', 'feature_cache_users': '0'}
    """
    settings = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        name = name.strip().lower().removeprefix("tipstream_")
        if not equals or not name:
            parser.error(f"--set {pair!r}: give NAME=VALUE, e.g. --set learner_join_cache_mb=48")
        if name not in Settings.model_fields:
            close = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.75)
            parser.error(f"--set {name}: not a tipstream setting "
                         + (f"(did you mean {close[0]}?)" if close else "(the README's settings table lists them)"))
        settings[name] = value
    return settings


REACTIONS = ("acted", "liked", "snoozed", "dismissed", "disliked")


async def react(js: Any, user: str, answer: dict[str, Any], reaction: str) -> None:
    """Publish `user`'s reaction to the first tip of a /score `answer`, as an app does."""
    event = {"id": f"bench-{uuid.uuid4().hex}", "type": "tip.reacted", "user_id": user,
             "ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "v": 1,
             "data": {"tip_id": answer["ranked"][0]["tip_id"], "decision_id": answer["decision_id"],
                      "reaction": reaction}}
    await js.publish("feedback.tip.reacted", json.dumps(event).encode(), headers={"Nats-Msg-Id": event["id"]})


class ServiceProcess:
    """`python -m app.cli run` with the given settings, in `data_dir` (default: a temporary one);
    `cli_args` follow `run` (`--demo 200`); `launcher` replaces `-m app.cli` (a script that runs it)."""

    def __init__(self, data_dir: Path | None = None, cli_args: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = ("-m", "app.cli"), **settings: Any) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="tipstream-bench-") if data_dir is None else None
        self.data_dir = data_dir or Path(self.tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        env = service_environment(**{"data_dir": self.data_dir, "port": self.port, "log_level": "warning", **settings})
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
