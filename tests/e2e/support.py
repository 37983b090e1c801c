"""Run `tipstream run` as a real subprocess, the way an operator does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

TIPSTREAM = str(Path(sys.executable).parent / "tipstream")
# Every service launched, for tests/e2e/conftest.py to kill those a failing test left running:
# they held their port and data directory, and a nats-server each, for the rest of the suite.
LAUNCHED: list[subprocess.Popen[bytes]] = []
# The requests to the services: `httpx.get` made a client, and its SSL context, each call (30 ms of CPU), and a wait
# polls several a turn, taking a core from the service under test. Each on a connection of its own, as before.
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


# `tipstream run` with module constants set first (`ServiceProcess`'s `patches`), as in-process tests monkeypatch them.
PATCHED_RUN = """import importlib, sys
for name, value in {patches!r}.items():
    module, attribute = name.rsplit(".", 1)
    setattr(importlib.import_module(module), attribute, value)
from app.cli import main
sys.exit(main())
"""

# A command (argv[1:]) run with limits on open files, as `ulimit -n` sets them.
LIMITED_RUN = """import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, {limits!r})
os.execv(sys.argv[1], sys.argv[1:])
"""


class ServiceProcess:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 patches: dict[str, Any] | None = None, open_files: tuple[int, int] | None = None,
                 launcher: tuple[str, ...] = ()) -> None:
        """`patches`: module constants ("app.silence_learning.SILENCE_READ_ALLOWANCE_MS") set to these values before
        `tipstream run` starts, where a test's wait is one of them (what it guards is not). `open_files`:
        its limits on open files (soft, hard), as `ulimit -n` sets them. `launcher`: what runs it (`FullDisk`'s)."""
        self.open_files, self.launcher = open_files, launcher
        self.port = free_port()
        self.args = args
        self.patches = patches or {}
        self.data_dir = data_dir
        self.env = {**os.environ, "TIPSTREAM_DATA_DIR": str(data_dir), "TIPSTREAM_PORT": str(self.port),
                    "TIPSTREAM_LOG_LEVEL": "info", **(env or {})}
        for name in ("NATS_URL", "DATABASE_URL"):
            if name not in (env or {}):
                self.env.pop(name, None)
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ServiceProcess:
        self._launch()
        return self._answering(time.monotonic() + timeout)

    def start_on_printed_port(self, timeout: float = 30) -> ServiceProcess:
        """Start, and take the port from the line `tipstream run` prints (with TIPSTREAM_PORT=0)."""
        self._launch()
        deadline = time.monotonic() + timeout
        found = wait_until(lambda: re.search(r"tipstream on http://[^:]+:(\d+) ", self.log()), timeout,
                           "the line naming the port")
        self.port = int(found.group(1))
        self.base_url = f"http://127.0.0.1:{self.port}"
        return self._answering(deadline)

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "service.log", "ab")
        command = [sys.executable, "-c", PATCHED_RUN.format(patches=self.patches)] if self.patches else [TIPSTREAM]
        if self.open_files:  # set in the process, which then becomes the service (the same pid)
            command = [sys.executable, "-c", LIMITED_RUN.format(limits=self.open_files), *command]
        self.process = subprocess.Popen([*self.launcher, *command, "run", *self.args], env=self.env, stdout=log,
                                        stderr=log)
        LAUNCHED.append(self.process)

    def _answering(self, deadline: float) -> ServiceProcess:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"tipstream exited with {self.process.returncode}:\n{self.log()}")
            try:
                if HTTP.get(f"{self.base_url}/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"tipstream did not answer in time:\n{self.log()}")

    def get(self, path: str, **params: Any) -> Any:
        return HTTP.get(f"{self.base_url}{path}", params=params, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no last checkpoint."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> bool:
        """SIGTERM and wait; True when it shut down cleanly: exit code 128 + SIGTERM, as a shell
        reports a process the signal ended, and no traceback."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        return self.process.returncode == 128 + signal.SIGTERM and "Traceback" not in self.log()

    def log(self) -> str:
        path = self.data_dir / "service.log"
        return path.read_text()[-4000:] if path.exists() else ""


def wait_until(check: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")
