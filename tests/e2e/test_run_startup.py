"""`tipstream run`'s start, as an operator meets it: one service per data directory, a bounded
wait for NATS that a signal ends, and each failure they can fix told as one message (app/startup.py)."""

from __future__ import annotations

import datetime
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from app.embedded_nats import nats_server_binary
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    FullDiskNatsServer,
    NatsCluster,
    NatsServer,
    account_url,
    free_port,
    limited_account_server,
    require_postgres,
)
from tests.e2e.support import TIPSTREAM, ServiceProcess, wait_until

pytestmark = pytest.mark.slow


def environment(tmp_path: Path, **env: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path / "data"), "TIPSTREAM_PORT": "0", **env}


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TIPSTREAM, "run"], capture_output=True, text=True, timeout=60,
                          env=environment(tmp_path, **env))


def assert_one_message(done: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("tipstream: ")]
    assert len(message) == 1, done.stderr[-3000:]
    for part in parts:
        assert part in message[0], message[0]
    assert "Traceback" not in done.stderr and "tipstream on http" not in done.stdout


def test_a_second_service_on_the_data_directory_stops_at_once_and_the_first_runs_on(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServiceProcess(data, env={"TIPSTREAM_PORT": "0"})
    first._launch()
    assert first.process is not None
    found = wait_until(lambda: "tipstream on http://" in first.log() and first.log(), what="the line naming the port")
    # Printed once listening, after the start: the first request answers, no retrying.
    assert found.index("checkpoint restored") < found.index("tipstream on http://")
    # A first start has no learner state: said so, not "learning resumes at None".
    assert "no learner state saved yet" in found and "learning resumes at None" not in found
    port = int(found.split("tipstream on http://127.0.0.1:", 1)[1].split(" ", 1)[0])
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    url = (data / "nats.url").read_text()

    begun = time.monotonic()
    second = run(tmp_path)
    assert time.monotonic() - begun < 20, "before migrations, NATS or the port"
    assert second.stderr.strip() == (
        f"tipstream: The data directory {data.resolve()} is in use by another tipstream (pid {first.process.pid}): "
        "two would share its NATS store and database. Stop that one, or set TIPSTREAM_DATA_DIR to another directory.")
    assert_one_message(second)

    assert (data / "nats.url").read_text() == url, "the second's stop took the first's nats.url"
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    assert first.stop(), first.log()


def test_nats_away_at_start_is_a_message_after_the_bound(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    begun = time.monotonic()
    done = run(tmp_path, NATS_URL=url, TIPSTREAM_NATS_CONNECT_TIMEOUT_S="1")
    assert time.monotonic() - begun < 30
    assert_one_message(done, f"Cannot reach NATS at {url} (NATS_URL) within 1 s: ", "Connection refused",
                       "Start NATS there", "unset NATS_URL", "TIPSTREAM_NATS_CONNECT_TIMEOUT_S")


# The start's wait for NATS: past the 2 s a greeting is waited for, where none comes; a server that speaks first fails
# each try at once, and the start tries again for the whole wait, which need not be 3 s there.
@pytest.mark.parametrize(("greeting", "told", "wait_s"), [
    (None, "took the connection but sent no NATS greeting (INFO) within 2 s", 3),  # as Redis or RabbitMQ
    (b"J\x00\x00\x00\n5.5.5-10.11.6-MariaDB\x00", "expecting INFO message", 1.5),  # a server that speaks first
])
def test_nats_url_at_a_port_of_another_kind_of_server_is_a_message_saying_so(
        tmp_path: Path, greeting: bytes | None, told: str, wait_s: float) -> None:
    """The message said "within 20 s: . Start NATS there", with nothing between, though a server
    answered there: one of another kind."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            if greeting is not None:
                conn.sendall(greeting)

    threading.Thread(target=accept, daemon=True).start()
    url = f"nats://127.0.0.1:{listener.getsockname()[1]}"
    try:
        done = run(tmp_path, NATS_URL=url, TIPSTREAM_NATS_CONNECT_TIMEOUT_S=f"{wait_s:g}")
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert_one_message(done, f"Cannot reach NATS at {url} (NATS_URL) within {wait_s:g} s: ", told,
                       "so what listens there is not a NATS server's client port (NATS clients connect on 4222",
                       "Set NATS_URL to a NATS server's client port", "or unset NATS_URL")
    assert "()" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_nats_stops_at_once(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out.log"
    with out.open("wb") as log:
        process = subprocess.Popen([TIPSTREAM, "run"], stdout=log, stderr=subprocess.STDOUT, env=environment(
            tmp_path, NATS_URL=f"nats://127.0.0.1:{free_port()}", TIPSTREAM_NATS_CONNECT_TIMEOUT_S="300"))
    try:
        wait_until(lambda: "waiting for NATS at" in out.read_text(), timeout=60, what="the wait for NATS")
        sent = time.monotonic()
        process.send_signal(sig)
        assert process.wait(10) == 128 + sig
        assert time.monotonic() - sent < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in out.read_text()


def test_a_taken_port_is_a_message_naming_tipstream_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(tmp_path, TIPSTREAM_PORT=str(port))
    assert_one_message(done, f"Port {port} on 127.0.0.1 is already in use (TIPSTREAM_PORT={port})",
                       "set TIPSTREAM_PORT to a free port")


def test_a_missing_postgres_database_is_a_message_naming_database_url(tmp_path: Path) -> None:
    require_postgres()
    name = f"tipstream_missing_{uuid.uuid4().hex[:8]}"
    done = run(tmp_path, DATABASE_URL=POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    assert_one_message(done, "Cannot open the database postgresql+psycopg://", "(DATABASE_URL)",
                       f'database "{name}" does not exist', "unset DATABASE_URL")


def test_a_read_only_postgres_database_is_a_message_naming_the_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A database that takes no writes (default_transaction_read_only, or a standby: a failover's old
    primary) took the start, which then served and failed every checkpoint: nothing read or served was
    saved. A new database's migration said to check that the server runs and the database exists."""
    require_postgres()
    import sqlalchemy as sa

    from app import migrate
    from app.cli import main

    name = f"tipstream_read_only_{uuid.uuid4().hex[:8]}"
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
        conn.execute(sa.text(f"ALTER DATABASE {name} SET default_transaction_read_only = on"))
    try:
        told = (f"The PostgreSQL database {name} takes no writes from tipstream's user",
                f"`ALTER DATABASE {name} RESET default_transaction_read_only`")
        monkeypatch.setenv("DATABASE_URL", url)  # new: its migration refused (`tipstream migrate`, as a start)
        monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
        assert main(["migrate"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tipstream: ") and err.count("\n") == 1 and all(part in err for part in told), err
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER DATABASE {name} RESET default_transaction_read_only"))
        migrate.upgrade(url)
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER DATABASE {name} SET default_transaction_read_only = on"))
        assert_one_message(run(tmp_path, DATABASE_URL=url), *told)  # at head: nothing to migrate
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def test_a_database_url_of_no_known_kind_is_a_message_without_its_password(tmp_path: Path) -> None:
    done = run(tmp_path, DATABASE_URL="postgres://tipstream:hunter2@127.0.0.1/tipstream")
    assert_one_message(done, "DATABASE_URL is not a database URL tipstream can use",
                       "sqlalchemy.dialects:postgres", "postgresql+psycopg://")
    assert "hunter2" not in done.stderr


def test_a_database_url_with_a_space_around_it_is_a_message_saying_so(tmp_path: Path) -> None:
    done = run(tmp_path, DATABASE_URL=" postgresql+psycopg://tipstream:hunter2@127.0.0.1/tipstream")
    assert_one_message(done, "DATABASE_URL is not a database URL tipstream can use",
                       "It has spaces or a line break around it: remove them.")
    assert "hunter2" not in done.stderr


def test_a_database_url_with_a_port_that_is_not_a_number_is_a_message(tmp_path: Path) -> None:
    """SQLAlchemy's ValueError ended the start with a traceback."""
    done = run(tmp_path, DATABASE_URL="postgresql+psycopg://tipstream:hunter2@127.0.0.1:notaport/tipstream")
    assert_one_message(done, "DATABASE_URL cannot be read", "'notaport'", "host:5432")
    assert "hunter2" not in done.stderr


async def test_a_stream_taking_tipstream_s_subjects_is_a_message(tmp_path: Path, nats_server: NatsServer,
                                                                 nc: object) -> None:
    """The message named tipstream's subjects but not the stream that took them: on a server with many streams,
    the operator was left to find it among them."""
    await nc.jetstream().add_stream(name="SOMEONE_ELSES", subjects=["app.>", "signals.>"])  # type: ignore[attr-defined]
    done = run(tmp_path, NATS_URL=nats_server.url)
    assert_one_message(done, f"JetStream at {nats_server.url} (NATS_URL) refused",
                       "subjects overlap with an existing stream: SOMEONE_ELSES takes signals.> (error 10065)",
                       "SIGNALS (signals.>)", "`nats stream ls`")


def test_more_stream_copies_than_a_single_server_keeps_is_a_message_naming_the_setting(
        tmp_path: Path, nats_server: NatsServer) -> None:
    done = run(tmp_path, NATS_URL=nats_server.url, TIPSTREAM_STREAM_REPLICAS="3")
    assert_one_message(done, "replicas > 1 not supported in non-clustered mode (error 10074)",
                       "TIPSTREAM_STREAM_REPLICAS=3 asks for 3 copies", "set TIPSTREAM_STREAM_REPLICAS=1",
                       "a NATS cluster of at least 3 nodes")


def test_more_stream_copies_with_the_embedded_server_is_refused_before_the_start(tmp_path: Path) -> None:
    done = run(tmp_path, TIPSTREAM_STREAM_REPLICAS="3")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "TIPSTREAM_STREAM_REPLICAS='3': the embedded nats-server (NATS_URL unset) is a single server" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_nats_url_naming_no_server_is_refused_before_the_start(tmp_path: Path) -> None:
    """It hung the start at a full core (nats-py retrying an empty list of servers without yielding), deaf to
    SIGTERM: `run` timed out."""
    done = subprocess.run([TIPSTREAM, "run"], capture_output=True, text=True, timeout=30,
                          env=environment(tmp_path, NATS_URL="  "))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "NATS_URL='  ': names no server" in done.stderr and "Traceback" not in done.stderr


def test_a_nats_url_without_a_host_is_refused_before_the_start(tmp_path: Path) -> None:
    """nats-py's traceback ended the start ("invalid hostname in connect url")."""
    done = run(tmp_path, NATS_URL="nats://:4222")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "NATS_URL='nats://:4222': names a server without a host" in done.stderr and "Traceback" not in done.stderr


def test_an_embedded_nats_server_not_answering_within_the_bound_is_a_message_naming_the_setting(
        tmp_path: Path) -> None:
    done = run(tmp_path, TIPSTREAM_NATS_CONNECT_TIMEOUT_S="1e-9")
    assert_one_message(done, "The embedded nats-server at ", "did not answer within 1e-09 s",
                       "TIPSTREAM_NATS_CONNECT_TIMEOUT_S sets how long to wait")


def test_a_nats_server_without_jetstream_is_a_message_saying_so(tmp_path: Path) -> None:
    """nats-py answers "no responders" with an APIError of neither description nor code: the
    message read "refused tipstream's start: None (error None)"."""
    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_until(listening, timeout=10, what="nats-server without JetStream")
        done = run(tmp_path, NATS_URL=f"nats://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(10)
    assert_one_message(done, f"NATS at nats://127.0.0.1:{port} (NATS_URL) does not serve JetStream",
                       "nats-server -js", "unset NATS_URL")
    assert "None" not in done.stderr.splitlines()[-1]


def test_nats_credentials_stay_out_of_the_start_up_message_and_log(tmp_path: Path) -> None:
    """NATS_URL may carry a user's password or a token, as DATABASE_URL may: the database's was
    left out of every message, NATS's was written to stderr and the log."""
    port = free_port()
    done = run(tmp_path, NATS_URL=f"nats://tipstream:hunter2@127.0.0.1:{port}", TIPSTREAM_NATS_CONNECT_TIMEOUT_S="1")
    assert_one_message(done, f"Cannot reach NATS at nats://tipstream:***@127.0.0.1:{port} (NATS_URL)")
    assert "waiting for NATS at nats://tipstream:***@" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout and "within 600 s" not in done.stderr


def test_nats_credentials_the_server_refuses_are_a_message_saying_to_fix_them(tmp_path: Path) -> None:
    """It said "Start NATS there", to an operator whose server was there and refused the password; and
    then only once the whole timeout had passed (20 s by default), though no retry could be taken."""
    server = NatsServer(tmp_path / "nats", args=("--user", "tipstream", "--pass", "right-one"))
    server.start()
    try:
        url = f"nats://tipstream:wrong-one@127.0.0.1:{server.port}"
        # A timeout past run()'s own 60 s: the start ends at the first refusal it reads. A try can read
        # only the reset (the server closes right after refusing, its words lost with the socket's unread
        # bytes), so it may take a few.
        done = run(tmp_path, NATS_URL=url, TIPSTREAM_NATS_CONNECT_TIMEOUT_S="600")
    finally:
        server.stop()
    assert_one_message(done, "'Authorization Violation'", "Set NATS_URL with credentials that server takes")
    assert "Start NATS there" not in done.stderr and "wrong-one" not in done.stderr
    assert "within 600 s" not in done.stderr


def test_a_tls_nats_url_to_a_server_without_tls_is_a_message_saying_to_configure_it(tmp_path: Path) -> None:
    """nats-py went on in plain text, the URL's password in its CONNECT (tests/integration/test_nats_auth.py)."""
    server = NatsServer(tmp_path / "nats", args=("--user", "tipstream", "--pass", "hunter2"))
    server.start()
    try:
        # A timeout past run()'s own 60 s: the start ends without waiting it out, as no retry can help.
        done = run(tmp_path, NATS_URL=f"tls://tipstream:hunter2@127.0.0.1:{server.port}",
                   TIPSTREAM_NATS_CONNECT_TIMEOUT_S="600")
    finally:
        server.stop()
    assert_one_message(done, "the NATS URL asks for TLS (tls://), and the server at 127.0.0.1:",
                       "Configure TLS on that server", "set NATS_URL with nats:// and unset TIPSTREAM_NATS_TLS_*")
    assert "hunter2" not in done.stderr + done.stdout
    # No retry can help, and none is made: a warning of "trying for 600 s" before the message misled.
    assert "trying for" not in done.stderr, done.stderr[-3000:]


def test_a_nats_server_certificate_from_an_unknown_ca_is_a_message_naming_the_ca_setting(tmp_path: Path) -> None:
    """It said "Start NATS there" to an operator whose server was there, with a certificate of their own CA."""
    import trustme

    from tests.integration.test_nats_auth import start_tls_server

    server, _ = start_tls_server(tmp_path / "nats", trustme.CA(), required=True)
    try:
        done = run(tmp_path, NATS_URL=f"tls://127.0.0.1:{server.port}", TIPSTREAM_NATS_CONNECT_TIMEOUT_S="600")
    finally:
        server.stop()
    assert_one_message(done, "CERTIFICATE_VERIFY_FAILED", "Set TIPSTREAM_NATS_TLS_CA to the CA that signed")
    assert "Start NATS there" not in done.stderr and "within 600 s" not in done.stderr
    assert "trying for" not in done.stderr, done.stderr[-3000:]


def test_a_nats_server_certificate_for_another_name_is_a_message_naming_the_host(tmp_path: Path) -> None:
    """It said to set TIPSTREAM_NATS_TLS_CA, to an operator who had, to the CA that signed the certificate."""
    import trustme

    from tests.integration.test_nats_auth import start_tls_server

    ca = trustme.CA()
    server, _ = start_tls_server(tmp_path / "nats", ca, required=True)  # a certificate for 127.0.0.1 only
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    try:
        done = run(tmp_path, NATS_URL=f"tls://localhost:{server.port}", TIPSTREAM_NATS_TLS_CA=str(tmp_path / "ca.pem"),
                   TIPSTREAM_NATS_CONNECT_TIMEOUT_S="600")
    finally:
        server.stop()
    assert_one_message(done, "certificate is not valid for 'localhost'", "names another host than NATS_URL's",
                       "write the host in NATS_URL as the certificate names it")
    assert "Set TIPSTREAM_NATS_TLS_CA" not in done.stderr and "within 600 s" not in done.stderr


@pytest.mark.parametrize(("client", "told"), [
    (None, "verifies its clients' certificates and was given none: set TIPSTREAM_NATS_TLS_CERT"),
    ("another CA's", "refused the client certificate of TIPSTREAM_NATS_TLS_CERT"),
])
def test_a_client_certificate_the_server_refuses_ends_the_start_at_once_naming_it(
        tmp_path: Path, client: str | None, told: str) -> None:
    """A server that verifies clients refused the start's TLS (no client certificate, or one its CA did not
    sign): the start waited all of TIPSTREAM_NATS_CONNECT_TIMEOUT_S, then said to set TIPSTREAM_NATS_TLS_CA and
    TIPSTREAM_NATS_TLS_CERT, to an operator who may have set both."""
    import trustme

    from tests.integration.test_nats_auth import client_files, start_tls_server

    ca = trustme.CA()
    server, _ = start_tls_server(tmp_path / "nats", ca, required=True, verify_clients=True)
    files = client_files(ca, tmp_path / "ours")
    env = {"NATS_URL": f"tls://127.0.0.1:{server.port}", "TIPSTREAM_NATS_TLS_CA": str(files["ca"]),
           "TIPSTREAM_NATS_CONNECT_TIMEOUT_S": "50"}
    if client is not None:
        other = client_files(trustme.CA(), tmp_path / "other")
        env |= {"TIPSTREAM_NATS_TLS_CERT": str(other["cert"]), "TIPSTREAM_NATS_TLS_KEY": str(other["key"])}
    begun = time.monotonic()
    try:
        done = run(tmp_path, **env)
    finally:
        server.stop()
    assert_one_message(done, told)
    assert "within 50 s" not in done.stderr and time.monotonic() - begun < 30
    assert "Set TIPSTREAM_NATS_TLS_CA" not in done.stderr


def test_a_credentials_file_the_server_refuses_is_a_message_naming_its_setting(tmp_path: Path) -> None:
    """It said to set NATS_URL with a user and password or a token, when the JWT of TIPSTREAM_NATS_CREDS was
    what the server refused."""
    from tests.integration.test_nats_auth import operator_mode_server

    server, _ = operator_mode_server(tmp_path / "operator")
    _, another_operators = operator_mode_server(tmp_path / "another")
    server.start()
    try:
        done = run(tmp_path, NATS_URL=server.url, TIPSTREAM_NATS_CREDS=str(another_operators),
                   TIPSTREAM_NATS_CONNECT_TIMEOUT_S="600")
        without = run(tmp_path, NATS_URL=server.url, TIPSTREAM_NATS_CONNECT_TIMEOUT_S="600")
    finally:
        server.stop()
    assert_one_message(done, "'Authorization Violation'", f"refused the user of TIPSTREAM_NATS_CREDS={another_operators}",
                       "Set TIPSTREAM_NATS_CREDS to a credentials file")
    assert "Set NATS_URL with credentials" not in done.stderr
    assert_one_message(without, "Set NATS_URL with credentials that server takes",
                       "TIPSTREAM_NATS_CREDS to a user's credentials file")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_to_a_running_service_stops_it_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """uvicorn raises the signal it caught again once it has stopped; Python's default for SIGINT
    then ended Ctrl-C with a KeyboardInterrupt traceback (exit -2)."""
    service = ServiceProcess(tmp_path / "data", env={"TIPSTREAM_PORT": "0"}).start_on_printed_port()
    assert service.process is not None
    service.process.send_signal(sig)
    assert service.process.wait(30) == 128 + sig, service.log()
    assert "Traceback" not in service.log() and "KeyboardInterrupt" not in service.log()
    assert "embedded nats-server stopped" in service.log()


def test_a_second_ctrl_c_while_stopping_still_stops_the_service_without_a_traceback(tmp_path: Path) -> None:
    """uvicorn skips the application's shutdown on a second SIGINT: the service's stop ran only as the
    event loop closed, its tasks cancelled under it, and Starlette logged a CancelledError traceback."""
    service = ServiceProcess(tmp_path / "data", env={"TIPSTREAM_PORT": "0"}).start_on_printed_port()
    assert service.process is not None
    answer = httpx.post(f"{service.base_url}/score", json={"user_id": "u1", "candidates": [{"tip_id": "a"}]})
    assert answer.status_code == 200, answer.text
    service.process.send_signal(signal.SIGINT)

    def refused() -> bool:  # the first signal is being handled: uvicorn closed its socket first
        try:
            socket.create_connection(("127.0.0.1", service.port), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused, 10, "the listening socket closed")
    service.process.send_signal(signal.SIGINT)
    assert service.process.wait(30) == 128 + signal.SIGINT, service.log()
    assert "Traceback" not in service.log() and "CancelledError" not in service.log(), service.log()
    assert "embedded nats-server stopped" in service.log() and not (tmp_path / "data" / "nats.url").exists()


@pytest.mark.parametrize(("limits", "env", "parts"), [
    ("max_streams: 3", {}, ["maximum number of streams reached (error 10027)", "four streams of its own",
                            "raise `max_streams`"]),
    ("max_bytes_required: true", {}, ["(error 10113)", "set TIPSTREAM_STREAM_MAX_BYTES"]),
    ("max_file: 1M", {"TIPSTREAM_STREAM_MAX_BYTES": "1000000"},
     ["insufficient storage resources available (error 10047)", "TIPSTREAM_STREAM_MAX_BYTES=1000000",
      "(4,000,000 in all)", "lower TIPSTREAM_STREAM_MAX_BYTES"]),
    (None, {}, ["JetStream not enabled for account (error 10039)", "Enable JetStream for the account"]),
], ids=["max_streams", "max_bytes_required", "max_file", "no_jetstream"])
def test_an_account_whose_jetstream_limits_are_too_small_is_a_message_with_the_fix(
        tmp_path: Path, limits: str | None, env: dict[str, str], parts: list[str]) -> None:
    """The server's words alone ("maximum number of streams reached") named the limit, not what
    tipstream needs of it nor which setting or limit to change."""
    server = limited_account_server(tmp_path / "nats", limits)
    server.start()
    try:
        done = run(tmp_path, NATS_URL=account_url(server), **env)
    finally:
        server.stop()
    assert_one_message(done, f"JetStream at nats://t:***@127.0.0.1:{server.port} (NATS_URL) refused", *parts)


async def test_an_account_whose_consumers_are_taken_is_a_message_with_the_fix(tmp_path: Path) -> None:
    """nats-server counts `max_consumers` per stream: one on SIGNALS already, another's, leaves no room."""
    import nats
    from nats.js.api import ConsumerConfig

    server = limited_account_server(tmp_path / "nats", "max_consumers: 1")
    server.start()
    try:
        nc = await nats.connect(account_url(server))
        await nc.jetstream().add_stream(name="SIGNALS", subjects=["signals.>"])
        await nc.jetstream().add_consumer("SIGNALS", ConsumerConfig(durable_name="someone-else"))
        await nc.close()
        done = run(tmp_path, NATS_URL=account_url(server))
    finally:
        server.stop()
    assert_one_message(done, "maximum consumers limit reached (error 10026)", "one consumer of its own on each of",
                       "raise `max_consumers`", "`nats consumer ls`")


def test_a_nats_user_denied_the_jetstream_api_is_a_message_naming_the_permissions(tmp_path: Path) -> None:
    """A user whose permissions leave out $JS.API.>: the server refuses each request (a warning), which then goes
    unanswered, and the start ended 10 s later in a bare `nats.errors.TimeoutError: nats: timeout` traceback."""
    store = tmp_path / "nats"
    store.mkdir()
    (store / "users.conf").write_text(
        'authorization { users: [{user: t, password: t, permissions: {publish: {deny: ["$JS.API.>"]}}}] }\n')
    server = NatsServer(store, args=("-c", str(store / "users.conf")))
    server.start()
    try:
        # The refused call is told once it goes unanswered: after 2 s here, not the default's 10.
        done = run(tmp_path, NATS_URL=account_url(server), TIPSTREAM_NATS_JETSTREAM_TIMEOUT_S="2")
    finally:
        server.stop()
    assert_one_message(done, f"NATS at nats://t:***@127.0.0.1:{server.port} (NATS_URL) refused NATS_URL's user",
                       "permissions violation for publish to", "$JS.API.>, $JS.ACK.>, decisions.> and dlq.>",
                       "_INBOX.>", "permissions {}")


def test_a_cluster_node_whose_jetstream_does_not_answer_yet_is_a_message_saying_what_to_check(
        tmp_path: Path) -> None:
    """One node of a new 3-node cluster up, the others still starting: JetStream has no meta leader, and its
    calls go unanswered (not refused, as once a cluster had one), and the start ended in a bare traceback."""
    cluster = NatsCluster(tmp_path / "cluster")
    first = next(iter(cluster.nodes.values()))
    first.start()
    try:
        done = run(tmp_path, NATS_URL=first.url, TIPSTREAM_NATS_JETSTREAM_TIMEOUT_S="2")  # the default's 10 s waited
    finally:
        cluster.stop()
    assert_one_message(done, f"JetStream at {first.url} (NATS_URL) took tipstream's connection but did not answer "
                       "within 2 s (TIPSTREAM_NATS_JETSTREAM_TIMEOUT_S)", "without a JetStream meta leader",
                       "nats server check jetstream")


def test_a_port_taken_after_the_start_bound_it_is_the_same_message_and_the_service_stops(tmp_path: Path) -> None:
    """The port is bound before the service starts, and listened on once it has: another program may bind it
    meanwhile (both with SO_REUSEADDR, neither listening yet) and listen first. uvicorn's listen then raised,
    past the service's stop: a traceback, and no last checkpoint (the service's stop never ran)."""
    port = free_port()
    out = tmp_path / "out.log"
    with out.open("wb") as log:
        process = subprocess.Popen([TIPSTREAM, "run"], stdout=log, stderr=subprocess.PIPE, env={
            **environment(tmp_path, TIPSTREAM_PORT=str(port)), "TIPSTREAM_LOG_LEVEL": "info"})
    try:
        def bound_by_the_start() -> bool:  # a bind without SO_REUSEADDR is refused once any socket holds the port
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    return True
            return False

        wait_until(bound_by_the_start, timeout=30, what="the start to bind its port")
        with socket.socket() as taker:
            taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taker.bind(("127.0.0.1", port))
            taker.listen()
            _, stderr = process.communicate(timeout=30)  # it ran on, deaf, before
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    done = subprocess.CompletedProcess(process.args, process.returncode, out.read_text(), stderr.decode())
    assert_one_message(done, f"Port {port} on 127.0.0.1 is already in use (TIPSTREAM_PORT={port})",
                       "set TIPSTREAM_PORT to a free port")
    assert "checkpoint restored" in done.stderr, "taken before the service had started: not this case"
    assert "stopping: last checkpoint written" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "data" / "nats.url").exists(), "the embedded nats-server was not stopped"


@pytest.fixture(scope="module")
def first_started(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory as a first start and a clean stop leave it: the tests below each damage a copy (a start
    takes seconds, the copy milliseconds)."""
    data = tmp_path_factory.mktemp("first-start") / "data"
    first = ServiceProcess(data, env={"TIPSTREAM_PORT": "0"}).start_on_printed_port()
    assert first.stop(), first.log()
    return data


def damaged_after_a_first_start(tmp_path: Path, first_started: Path, damage: Callable[[sqlite3.Connection], None]
                                ) -> None:
    """A first start and a clean stop (`first_started`'s, copied), then the database damaged by `damage` (one
    transaction), as a disk fault or a hand's UPDATE would."""
    data = tmp_path / "data"
    shutil.copytree(first_started, data)
    database = sqlite3.connect(data / "tipstream.db")
    try:
        with database:
            damage(database)
    finally:
        database.close()


def test_a_damaged_saved_model_of_a_version_not_retired_is_a_message_naming_the_version_and_the_fixes(
        tmp_path: Path, first_started: Path) -> None:
    """The start decodes the saved model of every version not retired (`model_versions.model`): one cut short (a
    disk fault, a hand's UPDATE) ended the start in an UnpicklingError traceback, naming neither the version nor
    a fix. Now it is one message saying which version's model and how to mend it, as `tipstream users export`
    says it."""
    def damage(database: sqlite3.Connection) -> None:
        blob = database.execute("SELECT model FROM model_versions WHERE version = 'v1'").fetchone()[0]
        database.execute("UPDATE model_versions SET model = ? WHERE version = 'v1'", (blob[:-40],))

    damaged_after_a_first_start(tmp_path, first_started, damage)
    done = run(tmp_path)
    assert_one_message(done, "The saved model of version 'v1' cannot be read (UnpicklingError: ",
                       "the database holds it damaged", "(docs/operations.md, 'Backups and restores')",
                       "(docs/operations.md, 'Rebuilding from the log'; registry changes are lost",
                       "then start tipstream again", "v1 is not retired")


@pytest.mark.parametrize("damaged", ["prior", "learner", "credits"])
def test_a_damaged_learner_state_row_is_a_message_naming_the_row_and_the_fixes(tmp_path: Path, first_started: Path,
                                                                               damaged: str) -> None:
    """The start decodes the learner's rows (`learner_state`): the popularity prior, its positions and waiting
    feedback, a minute's credits. One cut short (a disk fault, a hand's UPDATE) ended the start in a ValueError or
    JSONDecodeError traceback naming neither the row nor a fix. Now it is one message saying which row and how to
    mend it, as a damaged saved model's."""
    from app.learner_checkpoint import state_bytes
    from models.prior import PopularityPrior

    minute = f"credits:{int(time.time() // 60)}"
    rows = {"prior": PopularityPrior().to_bytes(), "learner": state_bytes((0, 0), [], 0, 0, False),
            minute: orjson.dumps({"d-1": [{"t-1": 1.0}, 1]})}
    name = minute if damaged == "credits" else damaged
    rows[name] = rows[name][:-7]  # cut short
    damaged_after_a_first_start(tmp_path, first_started, lambda database: database.executemany(
        "INSERT INTO learner_state (name, state, updated_at) VALUES (?, ?, ?)",
        [(row, state, datetime.datetime.now()) for row, state in rows.items()]))
    done = run(tmp_path)
    assert_one_message(done, f"The learner_state row '{name}' (", ") cannot be read (",
                       "the database holds it damaged", "(docs/operations.md, 'Backups and restores')",
                       "(docs/operations.md, 'Rebuilding from the log'; registry changes are lost",
                       "then start tipstream again")


@pytest.mark.parametrize(("damage", "named"), [
    ("UPDATE model_versions SET card = substr(card, 1, 20) WHERE version = 'v1'",
     "the card of version 'v1' (model_versions.card) (JSONDecodeError: "),
    ("UPDATE model_rollouts SET cards = substr(cards, 1, 3) WHERE action = 'promote'",
     "the rollout history's entry 2 (promote v1; model_rollouts.cards) (JSONDecodeError: "),
], ids=["card", "rollout"])
def test_a_damaged_registry_row_is_a_message_naming_the_row_and_the_fixes(
        tmp_path: Path, first_started: Path, damage: str, named: str) -> None:
    """The start reads the registry's JSON (each version's params, feature names and card; each rollout's cards).
    One cut short ended the start, and `tipstream models list`, in a JSONDecodeError traceback naming neither the
    row nor a fix. Now each is one message saying which row and how to mend it, as a damaged saved model's."""
    def damaged_row(database: sqlite3.Connection) -> None:
        assert database.execute(damage).rowcount == 1

    damaged_after_a_first_start(tmp_path, first_started, damaged_row)
    parts = (f"The registry cannot be read: {named}", "the database holds it damaged",
             "(docs/operations.md, 'Backups and restores')",
             "(docs/operations.md, 'Rebuilding from the log'; registry changes are lost")
    assert_one_message(run(tmp_path), *parts, "then start tipstream again")
    listed = subprocess.run([TIPSTREAM, "models", "list"], capture_output=True, text=True, timeout=60,
                            env=environment(tmp_path))
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr[-3000:]
    assert all(part in listed.stderr for part in parts), listed.stderr


def test_a_nats_server_whose_store_s_disk_is_full_is_a_message_saying_to_free_it_and_restart(
        tmp_path: Path, full_disk_nats_server: FullDiskNatsServer) -> None:
    """NATS_URL's server with its store's disk full refused the streams' creation with its own words alone
    ("error creating store for stream (error 10049)"): nothing on what was wrong or what to do."""
    full_disk_nats_server.fill()
    done = run(tmp_path, NATS_URL=full_disk_nats_server.url)
    assert_one_message(done, f"JetStream at {full_disk_nats_server.url} (NATS_URL) refused tipstream's start: ",
                       "error creating store for stream (error 10049)", "is its store's disk full",
                       "Free space on that disk", "then restart nats-server")
