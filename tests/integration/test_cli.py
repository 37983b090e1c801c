"""The operator's commands fail fast with a message that says what to do (app/cli.py, app/models_cli.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import migrate
from app.cli import main
from app.settings import get_settings
from tests.conftest import (
    account_url,
    free_port,
    limited_account_server,
    pre_lock_release_server,
    run_bound_by_file_permissions,
)

TIPSTREAM = str(Path(sys.executable).parent / "tipstream")


def test_simulate_against_no_server_says_so_at_once(tmp_path: Path) -> None:
    # Both runs at once: each waits out nats-py's connect attempts (~1.5 s), one after the other 4 s.
    env = {"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path)}
    # A nats.url left behind by a service that has stopped: nothing listens there.
    (tmp_path / "nats.url").write_text(f"nats://127.0.0.1:{free_port()}")
    left_behind = subprocess.Popen([TIPSTREAM, "simulate", "--count", "5", "--quiet"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Given with --nats-url, the URL is the caller's: it was told to "start `tipstream run`, or pass --nats-url".
    # Its password or token is not echoed, as `tipstream run` does not.
    given = subprocess.Popen([TIPSTREAM, "simulate", "--count", "5", "--quiet", "--nats-url",
                              f"nats://tipstream:hunter2@127.0.0.1:{free_port()}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = left_behind.communicate(timeout=60)
        assert left_behind.returncode == 1
        assert "No NATS server answers at nats://127.0.0.1:" in stderr and "--nats-url" in stderr
        assert "nats.url names it: start `tipstream run`" in stderr, stderr
        assert "Traceback" not in stderr
        _, stderr = given.communicate(timeout=60)
        assert given.returncode == 1 and "is a NATS server running there? check --nats-url." in stderr, stderr
        assert "hunter2" not in stderr and "nats://tipstream:***@127.0.0.1:" in stderr, stderr
    finally:
        left_behind.kill()
        given.kill()


@pytest.mark.parametrize(("command", "doing"), [(["simulate", "--count", "1"], "publish to"),
                                               (["users", "export", "u-42"], "read the user's events from")])
def test_a_command_without_a_nats_server_to_use_says_what_it_wanted_it_for(
        command: list[str], doing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export, which publishes nothing, said "No NATS server to publish to" (simulate's words)."""
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("NATS_URL", raising=False)
    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    with pytest.raises(SystemExit, match=f"^No NATS server to {doing}: set NATS_URL, pass --nats-url, or start "):
        main(command)


def test_an_export_with_the_nats_url_of_a_killed_service_fails_fast_without_showing_its_token(tmp_path: Path) -> None:
    """A service killed leaves its embedded server's nats.url, token and all. The export tried it for
    nats-py's 2 minutes, logging a traceback every 2 s, then printed the URL with the token."""
    import time

    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    (tmp_path / "nats.url").write_text(f"nats://s3cr3t-t0ken@127.0.0.1:{free_port()}")
    begun = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "tipstream"), "users", "export", "u-42"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path)})
    assert done.returncode == 1 and time.monotonic() - begun < 20, done.stderr[-2000:]
    assert done.stderr.startswith("No NATS server answering at nats://***@127.0.0.1:"), done.stderr[-2000:]
    assert "nats.url names it: start `tipstream run`" in done.stderr
    assert "s3cr3t-t0ken" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(("out", "problem"), [("missing/export.json", "there is no directory "),
                                              (".", "it is a directory")])
def test_an_export_to_an_out_that_cannot_be_written_is_refused_before_anything_is_read(
        out: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Found only once every stream had been read: a FileNotFoundError or IsADirectoryError traceback,
    and the export (minutes of reading, for a large stream) lost."""
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{free_port()}")  # nothing there: it must not be tried
    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    target = tmp_path / out
    assert main(["users", "export", "u-42", "--out", str(target)]) == 2
    assert capsys.readouterr().err.startswith(f"Cannot write the export to {target}: {problem}")


@pytest.mark.parametrize("user_id", ["", "x" * 129])
def test_an_export_of_an_id_no_user_can_have_is_refused_before_anything_is_read(
        user_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`forget` refuses such an id (422); `export` read every stream for it and answered "0" of everything,
    exit 0: a request to see their data answered that nothing is held, for a mistyped id."""
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{free_port()}")  # nothing there: it must not be tried
    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    assert main(["users", "export", user_id]) == 2
    assert "a user id is 1 to 128 characters without NUL" in capsys.readouterr().err


@pytest.mark.parametrize("mode", [0o444, 0o000])
def test_a_sqlite_file_this_user_may_not_write_is_told_with_the_fix(mode: int, tmp_path: Path) -> None:
    """SQLite's 'attempt to write a readonly database' or 'unable to open database file' was told as "set
    TIPSTREAM_DATA_DIR to a directory this user can write", which the data directory was."""
    database = tmp_path / "tipstream.db"
    database.touch(mode=mode)
    database.chmod(mode)
    done = run_bound_by_file_permissions([TIPSTREAM, "migrate"], tmp_path, {"TIPSTREAM_DATA_DIR": str(tmp_path)})
    told = done.stderr
    assert done.returncode == 1, told
    assert f"may not write tipstream.db (uid {os.getuid()}, mode {mode:o})" in told, told
    assert f"Make them writable (`chmod u+rw {database}*`)" in told and "a directory this user can write" not in told


def test_a_sqlite_file_another_user_made_is_told_with_the_chown(tmp_path: Path) -> None:
    """A file another user made, as `sudo tipstream migrate` does: chmod is not this user's to run, chown is."""
    if os.geteuid() != 0:
        pytest.skip("only root makes a file another user's")
    database = tmp_path / "tipstream.db"
    database.touch(mode=0o644)
    os.chown(database, 65534, 65534)
    done = run_bound_by_file_permissions([TIPSTREAM, "migrate"], tmp_path, {"TIPSTREAM_DATA_DIR": str(tmp_path)})
    told = done.stderr
    assert done.returncode == 1, told
    assert "may not write tipstream.db (uid 65534, mode 644)" in told, told
    assert f"Give them to it (`chown {os.getuid()} {database}*`), or run tipstream as the user that owns them" in told


def test_version_names_the_release_its_schema_and_commit(capsys: pytest.CaptureFixture[str]) -> None:
    """Releases are told apart by commit and date; nothing said which one ran."""
    import subprocess
    from importlib.metadata import version as package_version

    from app import migrate

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    head = subprocess.run(["git", "log", "-1", "--format=%h %cs"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip()
    schema = migrate.revisions()[-1]
    assert capsys.readouterr().out == f"tipstream {package_version('tipstream')}, database schema {schema} (commit {head})\n"


@pytest.mark.parametrize(("argv", "problem"), [
    (["--users", "0"], "--users: must be at least 1, got 0"),
    (["--rate", "-5"], "--rate: must be at least 0, got -5"),
    (["--count", "many"], "--count: 'many' is not a number"),
    (["--user-prefix", "my users"], "--user-prefix: must be 1 to 64 printable characters without spaces"),
    (["--rate", "nan"], "--rate: must be a finite number, got nan"),
    (["--duration", "inf"], "--duration: must be a finite number, got inf"),
    (["--nats-url", "http://127.0.0.1:4222"], "--nats-url: a NATS server's URL starts with nats://"),
])
def test_simulate_refuses_bad_arguments(argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["simulate", "--count", "5", *argv])
    assert exited.value.code == 2 and problem in capsys.readouterr().err


def test_migrate_says_where_the_database_is_and_does_not_pretend_to_go_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["migrate"]) == 0
    head = migrate.current(url)
    assert head is not None and capsys.readouterr().out == f"database at {head}: {url}\n"
    assert main(["migrate", "0001"]) == 1
    out, err = capsys.readouterr()
    assert out == f"database at {head}: {url}\n" and "stop the service, then `.venv/bin/alembic downgrade 0001`" in err
    assert migrate.current(url) == head
    assert main(["migrate", "nope"]) == 2
    assert "Unknown revision 'nope'; known: head, base, 0001" in capsys.readouterr().err


def test_migrate_logs_what_it_runs_and_not_how_alembic_opens_each_of_its_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`tipstream migrate` on a database at head printed eight lines of alembic's ("Context impl PostgresqlImpl.",
    "Will assume transactional DDL.", once for each read of the revision), and a `tipstream run` two at each start."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    caplog.set_level(logging.INFO, logger="alembic")
    assert main(["migrate"]) == 0
    said = [r.getMessage() for r in caplog.records if r.name.startswith("alembic")]
    assert any(line.startswith("Running upgrade  -> 0001") for line in said), said
    caplog.clear()
    assert main(["migrate"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []


def test_alembic_downgrade_says_what_it_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/operations.md's way back to an older release is `.venv/bin/alembic downgrade <revision>` from the
    repository root; it said nothing, whether it had downgraded or not."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["migrate"]) == 0
    *_, before, head = migrate.revisions()
    done = subprocess.run([str(Path(sys.executable).parent / "alembic"), "downgrade", before], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[2], env={**os.environ, "DATABASE_URL": url})
    assert done.returncode == 0, done.stderr
    assert f"Running downgrade {head} -> {before}" in done.stderr, done.stderr
    assert migrate.current(url) == before


def test_alembic_downgrade_refused_ends_with_what_to_do_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A downgrade below 0008 with a user forgotten twice is refused: through alembic's command line,
    as docs/operations.md has it, the message naming what to do came last under thirty lines of traceback."""


    url = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["migrate"]) == 0
    _forgotten_twice(url, "u-42")
    done = subprocess.run([str(Path(sys.executable).parent / "alembic"), "downgrade", "0007"], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[2], env={**os.environ, "DATABASE_URL": url})
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr  # alembic's own refusals exit 255
    assert done.stdout.startswith("FAILED: erasures_earlier holds 1 record(s) of users forgotten before they were "
                                  "asked for again ('u-42')") and "DELETE FROM erasures_earlier" in done.stdout
    assert migrate.current(url) == migrate.revisions()[-1]  # the downgrade rolled back whole


def test_alembic_downgrade_refuses_under_a_running_service(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/operations.md's way back a release is `alembic downgrade` with the service stopped; run beside one,
    it dropped the tables and columns the service writes (0008 -> 0007: every request to forget a user
    then got a 503 'the database is away'), as `tipstream migrate` refuses to."""
    from app.service_lock import ServiceLock

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 0
    *_, before, head = migrate.revisions()
    alembic = [str(Path(sys.executable).parent / "alembic")]
    env = {**os.environ, "DATABASE_URL": database_url}
    running = ServiceLock(database_url)
    running.acquire()
    try:
        done = subprocess.run([*alembic, "downgrade", before], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parents[2], env=env)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stdout.startswith("FAILED: A tipstream service runs against this database"), done.stdout
        assert f"pid {os.getpid()}" in done.stdout and "stop it before `alembic downgrade`" in done.stdout
        assert migrate.current(database_url) == head
        # Reading the revision changes nothing: not refused.
        current = subprocess.run([*alembic, "current"], capture_output=True, text=True, timeout=60,
                                 cwd=Path(__file__).parents[2], env=env)
        assert current.returncode == 0 and head in current.stdout, current.stderr
    finally:
        running.release()
    done = subprocess.run([*alembic, "downgrade", before], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2], env=env)
    assert done.returncode == 0, done.stderr
    assert migrate.current(database_url) == before


def test_reading_the_registry_where_there_is_no_database_creates_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    # Before any start: a new user trying the commands is told what creates the database, not only to go elsewhere.
    with pytest.raises(SystemExit, match=r"No tipstream database at sqlite:///.*: no service has run here yet \(the "
                       r"first `tipstream run`, or `tipstream migrate`, creates it\), or run this where the service "
                       r"runs"):
        main(["models", "list"])
    assert not (tmp_path / "data").exists()
    # The data directory of a service on PostgreSQL (DATABASE_URL), read without it: "run this where the
    # service runs" sent the operator, who was there, to look for another directory.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tipstream.lock").write_text("4242")
    get_settings.cache_clear()
    with pytest.raises(SystemExit, match=r"No tipstream database in .*data \(TIPSTREAM_DATA_DIR\), though a service "
                       r"has run from it: that service keeps its database at its DATABASE_URL"):
        main(["models", "list"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["tipstream.lock"]
    # Where DATABASE_URL names the database, the data directory has nothing to do with it.
    get_settings.cache_clear()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    with pytest.raises(SystemExit, match=r"No tipstream tables at sqlite:///.*elsewhere\.db \(DATABASE_URL\): no "
                       r"service has started on that database yet \(the first `tipstream run`, or `tipstream "
                       r"migrate`, makes them\)") as told:
        main(["models", "card", "v1"])
    assert "TIPSTREAM_DATA_DIR" not in str(told.value) and not (tmp_path / "elsewhere.db").exists()
    # The service's data directory after `tipstream migrate base` (docs/operations.md's rebuild): "run this where
    # the service runs" sent the operator away from the right place.
    get_settings.cache_clear()
    monkeypatch.delenv("DATABASE_URL")
    assert main(["migrate"]) == 0 and main(["migrate", "base"]) == 0
    for command in (["models", "list"], ["users", "export", "u-42"]):
        with pytest.raises(SystemExit, match=r"No tipstream tables in sqlite:///.* \(TIPSTREAM_DATA_DIR\): `tipstream "
                           r"migrate base` dropped them, or no start has got that far; start the service"):
            code = main(command)
            if code:  # the export says it and returns its code
                raise SystemExit(capsys.readouterr().err)



def test_a_sqlite_url_with_a_query_or_a_driver_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`migrate.current` cut the path from the URL's text: with a query (`?timeout=60`) it looked for a
    file named with it, found none, and said a database at head had no tables; with the driver named
    (`sqlite+pysqlite://`) it opened the file, creating a database where there was none."""
    url = f"sqlite:///{tmp_path / 'm.db'}?timeout=60"
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["migrate"]) == 0 and migrate.current(url) == migrate.revisions()[-1]
    assert main(["models", "list"]) == 0 and "No model versions yet" in capsys.readouterr().out
    missing = tmp_path / "missing.db"
    assert migrate.current(f"sqlite+pysqlite:///{missing}") is None and not missing.exists()


@pytest.mark.parametrize("command", [["models", "list"], ["models", "card", "v1"]])
def test_the_registry_readers_given_a_service_url_say_they_read_the_database(
        command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """As the changes take --url, `models list --url ...` was told only 'unrecognized arguments'."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--url", "http://127.0.0.1:8000"])
    assert exited.value.code == 2
    assert "read the database, not the service: set DATABASE_URL" in capsys.readouterr().err

def test_an_unknown_revision_creates_no_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate", "nope"]) == 2
    assert "Unknown revision 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "data" / "tipstream.db").exists()


@pytest.mark.parametrize(("command", "variable", "value", "problem"), [
    (["run"], "TIPSTREAM_POLICY_TEMPERATURE", "inf", "Input should be a finite number"),
    (["run"], "TIPSTREAM_PORT", "eighty", "valid integer"),
    (["models", "list"], "TIPSTREAM_POLICY", "ucb", "'epsilon_greedy', 'softmax', 'thompson' or 'greedy'"),
    (["simulate", "--count", "1"], "TIPSTREAM_POLICY", "ucb", "'epsilon_greedy', 'softmax', 'thompson' or 'greedy'"),
])
def test_a_bad_setting_is_one_message_naming_the_variable(
        tmp_path: Path, command: list[str], variable: str, value: str, problem: str) -> None:
    """Before: a pydantic traceback, or for an infinite temperature, a start-up that failed later on."""
    done = subprocess.run([TIPSTREAM, *command], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path), variable: value})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{variable}={value!r}: " in done.stderr and problem in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "tipstream.db").exists()


@pytest.mark.parametrize(("behaviour", "problem"), [
    ("html", "answered, but not as tipstream does (no JSON): is --url the service's address?"),
    ("404", "answered 404 (Not Found), but not as tipstream does (no JSON error): is --url the service's address?"),
    ("slow", "took more than 0 s to answer; the change may still land: see `tipstream models list`"),
])
def test_a_change_answered_oddly_is_a_message(behaviour: str, problem: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A register still training past the timeout, or a --url pointing at another web server:
    both were tracebacks. That server's 404 page read as tipstream's refusal ("refused (404): Not Found")."""
    import http.server
    import threading

    release = threading.Event()

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            if behaviour == "slow":
                release.wait(10)
            self.send_response(404 if behaviour == "404" else 200)  # 404: another web app where tipstream is not
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>not tipstream</html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "t" * 16)
    monkeypatch.setattr("app.models_cli.ANSWER_TIMEOUT_S", 0.3)
    try:
        assert main(["models", "promote", "v2", "--url", f"http://127.0.0.1:{server.server_port}"]) == 1
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize("behaviour", [
    "close",  # as Redis does on a request that starts with POST
    "amqp",  # as RabbitMQ does: its protocol's header, then a reset
    "nats",  # a NATS server's client port, which speaks first
])
def test_a_change_sent_to_a_server_that_does_not_speak_http_is_a_message(
        behaviour: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--url naming another kind of server's port was a RemoteDisconnected (or ConnectionResetError) traceback."""
    import socket
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            if behaviour == "nats":
                conn.sendall(b'INFO {"server_id":"x","version":"2.15.1"}\r\n')
            conn.recv(65536)
            if behaviour == "amqp":
                conn.sendall(b"AMQP\x00\x00\x09\x01")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "t" * 16)
    try:
        code = main(["models", "promote", "v2", "--url", f"http://127.0.0.1:{listener.getsockname()[1]}"])
    finally:
        thread.join(5)
        listener.close()
    err = capsys.readouterr().err
    assert code == 1 and "gave no HTTP answer" in err and "Traceback" not in err, err
    assert "is --url the service's address" in err and "the change may still land" in err


def test_run_help_lists_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Generated from app/settings.py: a setting added there is in the help without more ado."""
    from app.settings import Settings, env_name

    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    help_text = capsys.readouterr().out
    assert exited.value.code == 0
    for name in Settings.model_fields:
        assert f"\n  {env_name(name)}=" in help_text, name
    assert "\n  TIPSTREAM_PORT=8000\n      HTTP port." in help_text
    assert "\n  NATS_URL=unset\n      NATS server to use: nats-server 2.9 or newer" in help_text


def test_help_names_every_models_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`tipstream --help` summed `models` up as list, cards, shadow, promote and rollback: register,
    retire and evaluate, which the README names, were left out."""
    with pytest.raises(SystemExit):
        main(["--help"])
    summary = " ".join(capsys.readouterr().out.split()).partition("the model registry:")[2].partition("options:")[0]
    for command in ("list", "card", "register", "shadow", "promote", "rollback", "retire", "evaluate"):
        assert command in summary, command
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    assert "DATABASE_URL" in capsys.readouterr().out  # where list and card read


def test_a_parameter_given_twice_to_register_is_refused_before_anything_is_sent(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The last was taken without a word: two `--param interactions=...`, read as adding pairs, kept only the
    second's (h120). Refused before any request: no service runs here, no token is set."""
    code = main(["models", "register", "v9", "--param", 'interactions=[["tip_id", "hour_of_day"]]',
                 "--param", "learning_rate=0.1", "--param", 'interactions=[["category", "preferred_hour"]]',
                 "--url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("--param interactions given more than once: give each parameter once"), err


def test_help_names_every_users_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`tipstream --help` summed `users` up as forgetting a user: `export`, docs/operations.md's right of
    access, was not named where an operator looks for it first."""
    with pytest.raises(SystemExit):
        main(["--help"])
    summary = " ".join(capsys.readouterr().out.split()).partition(" users ")[2].partition("options:")[0]
    for command in ("forget", "forget-status", "export"):
        assert command in summary, command


def test_every_command_and_flag_the_docs_name_exists(capsys: pytest.CaptureFixture[str]) -> None:
    """Readers copy `tipstream ...` lines from the README and docs/: a command or flag renamed in the
    CLI and not there fails them with a usage error."""
    import re

    root = Path(__file__).resolve().parents[2]
    named: dict[tuple[str, ...], set[str]] = {}
    docs = root / "docs"
    for path in (root / "README.md", docs / "architecture.md", docs / "learning.md", docs / "measurements.md",
                 docs / "operations.md"):
        for line in re.findall(r"tipstream ((?:run|simulate|migrate|docs|models|users)\b[^`\n#]*)", path.read_text()):
            words = line.split()
            command = tuple(words[:2]) if words[0] in ("models", "users") and len(words) > 1 else tuple(words[:1])
            named.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", line))
    assert {("run",), ("simulate",), ("models", "register"), ("users", "export")} <= set(named)
    for command, flags in named.items():
        with pytest.raises(SystemExit) as ended:
            main([*command, "--help"])
        assert ended.value.code == 0, f"`tipstream {' '.join(command)}`, which the docs name, is no command"
        help_text = capsys.readouterr().out
        assert {flag for flag in flags if flag not in help_text} == set(), command


def test_an_export_a_stream_refuses_a_reader_is_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export reads each stream through a consumer of its own: an account whose `max_consumers`
    (per stream) the service's own takes up refused it, and the command ended in a traceback."""
    import asyncio

    import nats
    from nats.js.api import ConsumerConfig

    server = limited_account_server(tmp_path / "nats", "max_consumers: 1")
    server.start()
    try:
        async def a_read_stream() -> None:
            nc = await nats.connect(account_url(server))
            js = nc.jetstream()
            await js.add_stream(name="SIGNALS", subjects=["signals.>"])
            await js.publish("signals.app.opened", b'{"id": "e-1"}')
            await js.add_consumer("SIGNALS", ConsumerConfig(durable_name="the-service"))
            await nc.close()

        asyncio.run(a_read_stream())
        monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'export.db'}")
        assert main(["migrate"]) == 0
        with pytest.raises(SystemExit, match=r"^Nothing exported: stream SIGNALS refused a consumer to read it "
                                             r"\(maximum consumers limit reached\).* max_consumers must leave room"):
            main(["users", "export", "u-1", "--nats-url", account_url(server)])
    finally:
        server.stop()


@pytest.mark.parametrize("command", [["migrate"], ["models", "list"], ["models", "card", "v1"]])
@pytest.mark.parametrize(("database_url", "problem"), [
    ("mysql://tipstream:hunter2@127.0.0.1/tipstream", "its driver, MySQLdb, is not installed"),
    # The port is taken at run time: a test's id must not change between collections (pytest-xdist).
    ("postgresql+psycopg://tipstream:hunter2@127.0.0.1:{free_port}/tipstream", "Connection refused."),
    ("postgresql+psycopg://tipstream:hunter2@127.0.0.1:notaport/tipstream", "DATABASE_URL cannot be read"),
])
def test_a_database_the_commands_cannot_open_is_one_message_without_its_password(
        command: list[str], database_url: str, problem: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`tipstream run` said what to fix; migrate and the registry reads were tracebacks (the
    libpq hint line, not the failure, was the cause shown)."""
    monkeypatch.setenv("DATABASE_URL", database_url.format(free_port=free_port()))
    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith("tipstream: ") and err.count("\n") == 1 and "DATABASE_URL" in err
    assert problem in err and "hunter2" not in err


@pytest.mark.postgres
def test_migrate_shows_the_database_url_without_its_password(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from tests.conftest import reset_postgres

    # Not the repository's ./data: a `make run` there (the README's other command) made `migrate base` refuse.
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))

    reset_postgres(postgres_url)
    from sqlalchemy.engine import make_url

    # Trust auth takes any password: enough to see it is not printed.
    monkeypatch.setenv("DATABASE_URL", make_url(postgres_url).set(password="hunter2").render_as_string(False))
    try:
        assert main(["migrate"]) == 0 and main(["migrate", "base"]) == 0
    finally:
        reset_postgres(postgres_url)
    out = capsys.readouterr().out
    assert "hunter2" not in out and ":***@" in out, out


@pytest.mark.postgres
@pytest.mark.parametrize(("granted", "problem"), [
    ("GRANT USAGE ON SCHEMA public TO PUBLIC", "permission denied for schema public"),  # PostgreSQL 15's default
    ("", "no schema has been selected to create in"),  # a schema made by CREATE SCHEMA: nothing granted
])
def test_a_postgresql_user_that_may_not_create_tables_is_told_the_grant(
        granted: str, problem: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL 15 and later let only a database's owner create tables in `public`. The message
    showed the last line of psycopg's text, "LINE 2: CREATE TABLE alembic_version (", not the
    error, and told to check that the server runs and the database exists."""
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from tests.conftest import POSTGRES_ADMIN_URL, reset_postgres

    reset_postgres(postgres_url)
    if granted:
        owner = sa.create_engine(postgres_url)
        with owner.begin() as conn:
            conn.execute(sa.text(granted))
        owner.dispose()
    role = f"tipstream_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    monkeypatch.setenv("DATABASE_URL", make_url(postgres_url).set(username=role).render_as_string(False))
    try:
        assert main(["migrate"]) == 1
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()
    err = capsys.readouterr().err
    assert err.startswith("tipstream: ") and err.count("\n") == 1, err
    assert problem in err and f"GRANT USAGE, CREATE ON SCHEMA public TO {role}" in err
    assert "LINE" not in err and "createdb" not in err


@pytest.mark.postgres
@pytest.mark.parametrize(("schema", "told"), [
    ("tipstream", "GRANT USAGE, CREATE ON SCHEMA tipstream TO {role}"),  # made by the owner, USAGE granted only
    ("tipstream_missing", "CREATE SCHEMA tipstream_missing AUTHORIZATION {role}"),
])
def test_a_postgresql_user_whose_search_path_names_another_schema_is_told_that_schema(
        schema: str, told: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """DATABASE_URL's `options=-csearch_path=tipstream` puts the tables in that schema. A user that
    may not create there was told to GRANT on `public`, which changed nothing."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    with another_postgres_user(postgres_url) as (role, owner):
        with owner.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA tipstream"))
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA tipstream TO {role}"))
        url = make_url(postgres_url).set(username=role).update_query_dict({"options": f"-csearch_path={schema}"})
        monkeypatch.setenv("DATABASE_URL", url.render_as_string(False))
        try:
            assert main(["migrate"]) == 1
        finally:
            with owner.begin() as conn:
                conn.execute(sa.text("DROP SCHEMA tipstream CASCADE"))
    err = capsys.readouterr().err
    assert err.startswith("tipstream: ") and err.count("\n") == 1, err
    assert told.format(role=role) in err and "SCHEMA public" not in err, err


@contextlib.contextmanager
def another_postgres_user(postgres_url: str) -> Iterator[tuple[str, Any]]:
    """A login role of its own on the test database, and an engine of the tables' owner; after, what the
    owner granted the role is revoked and the role dropped."""
    import uuid

    import sqlalchemy as sa

    from tests.conftest import POSTGRES_ADMIN_URL

    role = f"tipstream_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    owner = sa.create_engine(postgres_url)
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    try:
        yield role, owner
    finally:
        with owner.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
        owner.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_a_postgresql_user_that_only_reads_and_writes_the_tables_runs_but_is_told_who_migrates(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A user with SELECT, INSERT, UPDATE and DELETE on the owner's tables (least privilege) was told, at
    `tipstream migrate base` or a new release's migration, to GRANT what it had: no grant lets a user drop
    or alter a table, only its owner may."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    assert main(["migrate"]) == 0
    with another_postgres_user(postgres_url) as (role, owner):
        with owner.begin() as conn:
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {role}"))
            conn.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"))
            conn.execute(sa.text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"))
        monkeypatch.setenv("DATABASE_URL", make_url(postgres_url).set(username=role).render_as_string(False))
        get_settings.cache_clear()
        capsys.readouterr()
        assert main(["migrate"]) == 0, capsys.readouterr().err  # at head: nothing to create
        assert main(["migrate", "base"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tipstream: ") and err.count("\n") == 1, err
    assert "must be owner of " in err and "for their owner, postgres" in err, err  # an index first, since 0009
    assert "DATABASE_URL naming postgres" in err and "GRANT" not in err, err


@pytest.mark.postgres
@pytest.mark.parametrize(("refusal", "told"), [
    ("connection limit", "`ALTER DATABASE {database} CONNECTION LIMIT <n>`"),
    ("no such role", "`CREATE ROLE {role} LOGIN PASSWORD '...'`"),
    ("ssl required", "take sslmode out of DATABASE_URL"),
])
def test_a_connection_postgresql_refuses_is_told_with_its_own_fix(
        refusal: str, told: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every refused connection was told to 'check that the server runs and the database exists (e.g.
    createdb)': a connection limit reached, a user that does not exist, SSL the server does not offer.
    (A wrong or missing password, which a trust-only server never asks for: app.start_errors._connection_fix's
    examples.)"""
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from tests.conftest import POSTGRES_ADMIN_URL

    database = make_url(postgres_url).database
    role = f"tipstream_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if refusal == "ssl required" and conn.execute(sa.text("SHOW ssl")).scalar() == "on":
            pytest.skip("this server offers SSL")
        if refusal == "connection limit":  # which binds users other than superusers
            conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
            conn.execute(sa.text(f"ALTER DATABASE {database} CONNECTION LIMIT 0"))
    url = make_url(postgres_url).set(username=role, password="hunter2")
    if refusal == "ssl required":
        url = make_url(postgres_url).set(password="hunter2").update_query_dict({"sslmode": "require"})
    monkeypatch.setenv("DATABASE_URL", url.render_as_string(False))
    try:
        assert main(["migrate"]) == 1
    finally:
        with admin.connect() as conn:
            if refusal == "connection limit":
                conn.execute(sa.text(f"ALTER DATABASE {database} CONNECTION LIMIT -1"))
                conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()
    err = capsys.readouterr().err
    assert err.startswith("tipstream: ") and err.count("\n") == 1, err
    assert told.format(database=database, role=role) in err and "createdb" not in err, err
    assert "hunter2" not in err


@pytest.mark.parametrize("password", ["s3cr@qx7z", "s3cr@qx:7z", "s3cr@q#x/7z?"])
def test_a_password_holding_an_unencoded_at_sign_is_told_to_be_encoded_without_showing_any_of_it(
        password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A URL ends its password at the first '@': the rest was read as the host (a port that is not a number,
    with ':'), and the messages showed it, 'Cannot open the database postgresql+psycopg://tipstream:***@qx7z@...:
    failed to resolve host 'qx7z@127.0.0.1'', with the wrong fix."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg://tipstream:{password}@127.0.0.1:5432/tipstream")
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tipstream: DATABASE_URL has an '@' in its user or password") and err.count("\n") == 1, err
    assert "@ %40" in err and "s3cr" not in err and "7z" not in err, err


@pytest.mark.parametrize("encoding", ["LATIN1", "SQL_ASCII"])
def test_a_postgresql_database_not_in_utf8_is_refused_before_anything_is_written(
        encoding: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A LATIN1 database took the migration, the start and every row until the first user id outside
    LATIN1: that checkpoint failed, and every one after it (the user's state is retried with the
    rest). A SQL_ASCII one failed the migration with a TypeError from SQLAlchemy's first query."""
    import psycopg
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from app.db import DatabaseEncodingError, make_engine
    from tests.conftest import POSTGRES_ADMIN_URL

    name = f"{make_url(postgres_url).database}_{encoding.lower()}"
    url = make_url(postgres_url).set(database=name).render_as_string(False)
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' TEMPLATE template0 "
                             "LC_COLLATE 'C' LC_CTYPE 'C'"))
    monkeypatch.setenv("DATABASE_URL", url)
    try:
        with pytest.raises(DatabaseEncodingError, match=f"encoded {encoding}, not UTF8"):
            migrate.upgrade(url)
        assert main(["migrate"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"tipstream: The PostgreSQL database {name} is encoded {encoding}, not UTF8"), err
        assert "createdb -E UTF8 -T template0" in err and err.count("\n") == 1
        with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False)) as conn:
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        if encoding == "LATIN1":
            # One a service already runs on, not failing yet: an upgrade does not stop it; it is told.
            with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False)) as conn:
                conn.execute("CREATE TABLE stream_positions (stream text)")
            caplog.set_level(logging.WARNING, logger="tipstream")
            engine = make_engine(url)
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            engine.dispose()
            assert f"The PostgreSQL database {name} is encoded LATIN1, not UTF8: the first user id" in caplog.text
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_docs_from_another_directory_regenerate_the_docs_beside_the_readme(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's table was updated where it is, but the other files went to ./docs, a new one."""
    from app import docs

    outs: list[Path] = []
    readmes: list[Path | None] = []
    monkeypatch.setattr(docs, "write_docs", lambda out, readme=docs.OWN_README: outs.append(out) or readmes.append(readme) or [])
    monkeypatch.chdir(tmp_path)
    assert main(["docs"]) == 0 and main(["docs", "--out", "elsewhere"]) == 0
    assert outs == [docs.OWN_README.parent / "docs", Path("elsewhere")]
    assert readmes == [docs.OWN_README, None]  # --out rewrote the repository's README too
    assert not (tmp_path / "docs").exists()
    monkeypatch.setattr(docs, "OWN_README", tmp_path / "site-packages" / "README.md")  # installed from a wheel
    assert main(["docs"]) == 0 and outs[-1] == Path("docs")


@pytest.mark.parametrize("variable", ["DATABASE_URL", "TIPSTREAM_DATA_DIR"])
def test_a_sqlite_file_whose_directory_cannot_be_made_is_one_message(
        variable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Its mkdir's OSError was a traceback, from `run` and `migrate` alike; then, for TIPSTREAM_DATA_DIR, the
    OS's "[Errno 20] Not a directory" and "a directory this user can write", not which file was in the way."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    if variable == "DATABASE_URL":
        monkeypatch.setenv(variable, f"sqlite:///{tmp_path / 'a-file' / 'data' / 'tipstream.db'}")
    else:
        monkeypatch.setenv(variable, str(tmp_path / "a-file" / "data"))
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"Set {variable} to a" in err
    if variable == "DATABASE_URL":
        assert err.startswith("tipstream: Cannot open the database sqlite:///") and "Not a directory" in err
    else:
        assert err.startswith(f"tipstream: Cannot use the data directory {tmp_path / 'a-file' / 'data'} ")
        assert f"{tmp_path / 'a-file'} is a file, not a directory" in err and "Errno" not in err, err


@pytest.mark.parametrize(("rate", "problem"), [
    ("-5", "must be at least 0, got -5"), ("nan", "must be a finite number"),
    ("1e9", "must be at most 100,000 events/s, got 1e9; for more load, publish with `tipstream simulate --rate 0`"),
])
def test_run_refuses_a_demo_rate_that_is_no_rate(rate: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    """-5 ran a demo at a rate of its own; nan was a traceback once the service had started; 1e9 made
    ticks of 1e8 events on the event loop, which then never let SIGTERM stop the service."""
    with pytest.raises(SystemExit) as exited:
        main(["run", "--demo", rate])
    assert exited.value.code == 2 and f"--demo: {problem}" in capsys.readouterr().err


@contextlib.contextmanager
def service_on_data_dir(data_dir: Path, release: str) -> Iterator[str]:
    """What a running service holds on its data directory; yields how `migrate base` names it."""
    from app.startup import hold_data_dir

    if release == "current":
        held = hold_data_dir(data_dir)  # as `tipstream run` does
        try:
            yield f"A tipstream (pid {os.getpid()}) runs on"
        finally:
            os.close(held)
    else:  # before 2026-12-04: no lock; told by its embedded nats-server
        server = pre_lock_release_server(data_dir.parent, f"{data_dir.name}/nats")
        try:
            yield (f"A tipstream (pid {os.getpid()}, its nats-server's pid {server.pid}; a release from before "
                   "2026-12-04) runs on")
        finally:
            server.terminate()
            server.wait(10)


def test_migrate_base_refuses_while_a_request_to_forget_a_user_is_not_done(
        database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The user's messages are still in the streams: the rebuild would bring them back, and the request
    was in the tables dropped."""
    import sqlalchemy as sa

    from app.erasure import Eraser

    monkeypatch.setenv("DATABASE_URL", database_url)
    assert main(["migrate"]) == 0
    engine = sa.create_engine(database_url)
    Eraser(engine, None, None, checkpoint=None, lock=None).request("u-42", "dpo")  # type: ignore[arg-type]
    assert main(["migrate", "base"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("1 request(s) to forget a user are not done ('u-42'): dropped now, a rebuild") and \
        "tipstream users forget-status <id>" in err
    # Nor does a downgrade to a release from before forgetting users existed (alembic downgrade 0006).
    with pytest.raises(RuntimeError, match=r"1 request\(s\) to forget a user are not done \('u-42'\)"):
        migrate.downgrade(database_url, "0006")
    assert migrate.current(database_url) == migrate.revisions()[-1]
    with engine.begin() as conn:
        conn.execute(sa.text("update erasures set status = 'done'"))
    # Asked for again: the request done is the record kept, which a release from before 0008 would drop.
    Eraser(engine, None, None, checkpoint=None, lock=None).request("u-42", "dpo")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"erasures_earlier holds 1 record\(s\) of users forgotten before"):
        migrate.downgrade(database_url, "0007")
    with engine.begin() as conn:
        conn.execute(sa.text("delete from erasures_earlier"))
        conn.execute(sa.text("update erasures set status = 'done'"))
    engine.dispose()
    migrate.downgrade(database_url, "0006")
    assert main(["migrate", "base"]) == 0 and migrate.current(database_url) is None


def _forgotten_twice(url: str, *user_ids: str) -> None:
    """Each user forgotten, then asked for again: the first request, done, is kept in erasures_earlier."""
    import sqlalchemy as sa

    from app.erasure import Eraser

    engine = sa.create_engine(url)
    eraser = Eraser(engine, None, None, checkpoint=None, lock=None)  # type: ignore[arg-type]
    for user_id in user_ids:
        eraser.request(user_id, "dpo")
        with engine.begin() as conn:
            conn.execute(sa.text("update erasures set status = 'done'"))
        eraser.request(user_id, "dpo")
    with engine.begin() as conn:
        conn.execute(sa.text("update erasures set status = 'done'"))
        assert conn.execute(sa.text("select count(*) from erasures_earlier")).scalar_one() == len(user_ids)
    engine.dispose()


def test_a_downgrade_below_0008_refused_for_erasures_earlier_goes_through_once_its_fix_is_done(
        database_url: str) -> None:
    """The refusal named DROP TABLE erasures_earlier, after which the downgrade failed on the table
    it counts (no such table): its fix is now the DELETE it names, and the table already dropped as
    the earlier message said is a downgrade too."""
    import re

    import sqlalchemy as sa


    migrate.upgrade(database_url)
    _forgotten_twice(database_url, "u-42", "u-7")
    engine = sa.create_engine(database_url)
    with pytest.raises(RuntimeError) as refused:
        migrate.downgrade(database_url, "0007")
    told = str(refused.value)
    assert told.startswith("erasures_earlier holds 2 record(s) of users forgotten before they were asked for "
                           "again ('u-42', 'u-7')"), told
    assert migrate.current(database_url) == migrate.revisions()[-1]
    with engine.begin() as conn:  # what the message says to do, as it says it
        conn.execute(sa.text(re.search(r"\((DELETE FROM \w+)\)", told).group(1)))
    migrate.downgrade(database_url, "0007")
    assert migrate.current(database_url) == "0007" and not sa.inspect(engine).has_table("erasures_earlier")

    migrate.upgrade(database_url)
    with engine.begin() as conn:  # as the refusal of the releases before this one said
        conn.execute(sa.text("DROP TABLE erasures_earlier"))
    engine.dispose()
    migrate.downgrade(database_url, "0007")
    assert migrate.current(database_url) == "0007"


def test_migrate_base_drops_the_records_of_users_forgotten_more_than_once(
        database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/operations.md's rebuild from the log starts with `tipstream migrate base`, which drops the records
    of erasures (it says to keep them first). With a user forgotten twice it ended in a traceback from
    0008's refusal to downgrade to 0007, telling to delete the records and 'downgrade again'."""


    monkeypatch.setenv("DATABASE_URL", database_url)
    assert main(["migrate"]) == 0
    _forgotten_twice(database_url, "u-42")
    capsys.readouterr()
    assert main(["migrate", "base"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("database at base: ")
    assert migrate.current(database_url) is None


@pytest.mark.parametrize("release", ["current", "before the lock"])
def test_migrate_base_refuses_to_drop_the_tables_of_a_running_service(
        release: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 0
    url = get_settings().sqlalchemy_url
    with service_on_data_dir(tmp_path / "data", release) as named:
        assert main(["migrate", "base"]) == 1
    assert named in capsys.readouterr().err and migrate.current(url) is not None
    assert main(["migrate", "base"]) == 0 and migrate.current(url) is None


@pytest.mark.parametrize("release", ["current", "before the lock"])
def test_migrate_refuses_to_upgrade_the_database_under_a_running_service(
        release: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/operations.md said not to run a new release's `tipstream migrate` while the old one serves the
    database (it would not start again on the newer revision), and nothing stopped it."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    url = get_settings().sqlalchemy_url
    older = migrate.revisions()[-2]
    assert main(["migrate", older]) == 0
    with service_on_data_dir(tmp_path / "data", release) as named:
        assert main(["migrate"]) == 1
        err = capsys.readouterr().err
        assert named in err and "stop it before `tipstream migrate`" in err, err
        assert migrate.current(url) == older
    assert main(["migrate"]) == 0 and migrate.current(url) == migrate.revisions()[-1]
    if release == "current":
        with service_on_data_dir(tmp_path / "data", release):  # at head: nothing to do, nothing refused
            assert main(["migrate"]) == 0


def test_migrate_base_refuses_to_drop_the_tables_a_service_elsewhere_uses(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A service on another host or data directory holds the PostgreSQL database's lock, or the
    lock beside a SQLite file outside the data directory."""
    from app.service_lock import ServiceLock

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))  # not the service's: no flock to find
    assert main(["migrate"]) == 0
    running = ServiceLock(database_url)
    running.acquire()
    try:
        assert main(["migrate", "base"]) == 1
    finally:
        running.release()
    err = capsys.readouterr().err
    assert "A tipstream service runs against" in err and f"pid {os.getpid()}" in err and "stop it before" in err
    assert migrate.current(database_url) is not None
    assert main(["migrate", "base"]) == 0 and migrate.current(database_url) is None


def test_migrate_refuses_to_upgrade_a_postgresql_database_a_service_elsewhere_serves(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An older release on another host holds the database's lock: upgraded under it, it would not
    start again. Only the data directory was looked at, and this one is not that service's."""
    from app.service_lock import ServiceLock
    from tests.conftest import reset_postgres

    reset_postgres(postgres_url)
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    older = migrate.revisions()[-2]
    migrate.upgrade(postgres_url, older)
    running = ServiceLock(postgres_url)
    running.acquire()
    try:
        assert main(["migrate"]) == 1
        err = capsys.readouterr().err
        assert "A tipstream service runs against" in err and f"pid {os.getpid()}" in err, err
        assert "stop it before `tipstream migrate`" in err and migrate.current(postgres_url) == older
    finally:
        running.release()
    assert main(["migrate"]) == 0 and migrate.current(postgres_url) == migrate.revisions()[-1]
    running.acquire()
    try:  # at head: nothing to do, nothing refused
        assert main(["migrate"]) == 0
    finally:
        running.release()


@pytest.mark.parametrize(("url", "port", "problem"), [
    ("http://x y", "8000", "--url 'http://x y' is not the service's address: write it as http://HOST:PORT"),
    ("http://", "8000", "--url 'http://' is not the service's address"),
    ("http://127.0.0.1:port", "8000", "is not the service's address"),
    (None, "0", "TIPSTREAM_PORT is 0, so the service picked its port: pass --url"),
    # It has a scheme, one the CLI does not speak: "needs its scheme, e.g. http://ftp://x" was nonsense.
    ("ftp://x", "8000", "--url 'ftp://x' is ftp://, which the service does not answer: give its http:// or https://"),
])
def test_a_change_sent_nowhere_usable_is_a_message(url: str | None, port: str, problem: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A URL http.client refuses was an InvalidURL traceback; TIPSTREAM_PORT=0 was "connection refused" on port 0."""
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "t" * 16)
    monkeypatch.setenv("TIPSTREAM_PORT", port)
    assert main(["models", "promote", "v2", *(["--url", url] if url is not None else [])]) == 2
    assert problem in capsys.readouterr().err


def test_a_url_s_scheme_in_capitals_is_its_scheme(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A scheme is case-insensitive (RFC 3986), and urllib reads it so: HTTP:// was refused as having none."""
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "t" * 16)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["models", "promote", "v2", "--url", f"HTTP://127.0.0.1:{port}"]) == 1
    assert f"No tipstream answering at HTTP://127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["models", "promote", "v2"], ["users", "forget", "u-1"],
                                     ["users", "forget-status", "u-1"]])
def test_nothing_answering_at_the_settings_address_names_the_settings(command: list[str],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A service started with its own TIPSTREAM_PORT, and the CLI run from a shell without it, was told only
    to start the service (it ran) or pass --url: the port the CLI tried came from settings it did not name."""
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "t" * 16)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("TIPSTREAM_PORT", str(closed.getsockname()[1]))
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "the address of TIPSTREAM_HOST and TIPSTREAM_PORT" in err
    assert "set them as the service has them, or pass --url" in err


def test_run_logs_alembic_s_migrations_but_not_its_plugins(tmp_path: Path) -> None:
    """In a process of its own, logging set before alembic is imported (as `run` does): alembic
    sets its plugins up once per process, as it is imported."""
    script = ("import sys; from app.cli import configure_logging; configure_logging('info'); "
              "from app import migrate; migrate.upgrade(sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Running upgrade" in done.stderr and "setup plugin" not in done.stderr


def test_migrate_tells_each_revision_it_runs(tmp_path: Path) -> None:
    """`tipstream migrate` said nothing until it had ended: an upgrade that reads a large table (0009) was minutes
    of silence. It tells alembic's line for each revision, as `run` does, without alembic's plugins."""
    done = subprocess.run([TIPSTREAM, "migrate"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TIPSTREAM_DATA_DIR": str(tmp_path), "TIPSTREAM_LOG_LEVEL": "info"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Running upgrade 0008 -> 0009" in done.stderr and "setup plugin" not in done.stderr, done.stderr
    assert done.stdout.startswith("database at ")


def test_reading_the_registry_leaves_an_older_release_s_database_at_its_revision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`models list` and `card` migrated it: the older release that still served it (the new release's
    CLI tried before the upgrade) failed its next start on a revision it does not know."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    url = get_settings().sqlalchemy_url
    older = migrate.revisions()[-2]
    migrate.upgrade(url, older)
    assert main(["models", "list"]) == 0
    assert main(["models", "card", "v1"]) == 1  # none registered yet: said, and nothing changed
    assert migrate.current(url) == older
    assert "No model versions yet" in capsys.readouterr().out
    # One from before the registry had tables: told to upgrade, not a traceback, and left as it is.
    migrate.downgrade(url, migrate.revisions()[0])
    with pytest.raises(SystemExit, match=f"is at revision {migrate.revisions()[0]}, of an older release"):
        main(["models", "list"])
    assert migrate.current(url) == migrate.revisions()[0]


def test_a_database_from_a_newer_release_is_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """alembic's "Can't locate revision" was a traceback from `run` and `models list`."""
    import sqlalchemy as sa

    from app.start_errors import explain

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    assert main(["migrate"]) == 0
    engine = sa.create_engine(get_settings().sqlalchemy_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(SystemExit, match=r"The database at sqlite:///.* \(TIPSTREAM_DATA_DIR\) is at revision '0099', "
                       r"which this release does not know: a newer tipstream wrote it. Read it with that release's"):
        main(["models", "list"])  # a read: nothing to migrate
    from alembic.util import CommandError

    told = explain(CommandError("Can't locate revision identified by '0099'"), get_settings())  # as from `run`
    assert told is not None and str(told).startswith("Cannot migrate the database sqlite:///")
    assert "'0099'" in str(told) and "(TIPSTREAM_DATA_DIR)" in str(told) and "run that release" in str(told)
    # A release rolled back: the way back is the newer release's downgrade to this one's schema, named.
    head = migrate.revisions()[-1]
    assert f"`.venv/bin/alembic downgrade {head}` in its directory" in str(told)
    capsys.readouterr()
    assert main(["migrate"]) == 1  # alembic's bare "Can't locate revision identified by '0099'", exit code 2
    err = capsys.readouterr().err
    assert err == f"tipstream: {told}\n", err


def test_a_change_answered_with_a_redirect_is_not_followed_with_the_token(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """urllib followed a 302 as a GET, Authorization included, to another host and port, and
    printed that answer as the change made."""
    import http.server
    import threading

    got: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            got.append(self.headers.get("Authorization"))
            body = (b'{"champion": "v2", "shadow": null, "history": [{"at": "now", "action": "promote", '
                    b'"version": "v2", "actor": "x", "note": ""}]}')
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    elsewhere = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirects(Elsewhere):
        def do_POST(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_port}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

    front = http.server.HTTPServer(("127.0.0.1", 0), Redirects)
    for server in (front, elsewhere):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "the-secret-of-the-test")
        assert main(["models", "promote", "v2", "--url", f"http://127.0.0.1:{front.server_port}"]) == 1
    finally:
        front.shutdown()
        elsewhere.shutdown()
    out = capsys.readouterr()
    assert got == [] and "the-secret-of-the-test" not in out.out + out.err
    assert "answered 302, a redirect to" in out.err and "nothing changed" in out.err and "champion" not in out.out


def test_a_database_password_given_as_a_query_parameter_is_not_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """libpq takes `?password=`; the messages hid only the password before the host."""
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg://bob@127.0.0.1:{free_port()}/x?password=hunter2&sslmode=disable")
    assert main(["migrate"]) == 1
    err = capsys.readouterr().err
    assert "hunter2" not in err and "?password=***&sslmode=disable (DATABASE_URL)" in err, err


def test_ctrl_c_while_a_change_waits_for_its_answer_says_it_may_still_land(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A register trains for seconds before it answers: Ctrl-C was a traceback, and the version landed anyway."""
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "t" * 16)
    monkeypatch.setattr("app.models_cli._DIRECT.open", interrupted)  # a service on loopback: no proxy
    assert main(["models", "register", "v9", "--url", "http://127.0.0.1:9"]) == 130
    assert "Interrupted before http://127.0.0.1:9 answered; the change may still land" in capsys.readouterr().err
    monkeypatch.setattr("app.cli._docs", lambda args: interrupted())
    assert main(["docs"]) == 130
    assert capsys.readouterr().err == "tipstream: interrupted\n"


def test_docs_out_naming_a_file_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--out docs/metrics.md` (a file where a directory goes) was a FileExistsError traceback."""
    taken = tmp_path / "metrics.md"
    taken.write_text("mine")
    assert main(["docs", "--out", str(taken)]) == 1
    assert f"Cannot write the docs to {taken}: File exists. --out names a directory" in capsys.readouterr().err
    assert taken.read_text() == "mine"


def test_a_version_registered_before_a_parameter_existed_shows_what_it_means(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Its stored params lack `user_ttl_days` and the rest: `card` showed them as stored, which hid
    that such a version forgets no user and bounds no values."""
    from app.db import make_engine
    from app.registry_store import RegistryStore
    from models.registry import ModelVersion, Registry

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    url = get_settings().sqlalchemy_url
    migrate.upgrade(url)
    registry = Registry()
    registry.register(ModelVersion("v1", "logreg", {"learning_rate": 0.1}, ["hour_of_day"]), actor="an older release")
    engine = make_engine(url)
    RegistryStore(engine).save(registry, known_entries=0, new_models={})
    engine.dispose()
    assert main(["models", "card", "v1", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params == {"learning_rate": 0.1, "optimizer": "sgd", "user_forgetting": 0.0,  # no "latents": an FM's
                      "user_ttl_days": 0.0, "max_values": 0}
    assert main(["models", "card", "v1"]) == 0
    assert "| user_ttl_days | 0 |" in capsys.readouterr().out


@pytest.mark.parametrize("out", ["--out /dev/full", "stdout", "--out file over RLIMIT_FSIZE"])
def test_an_export_that_cannot_be_written_whole_is_one_message_and_leaves_no_half_file(
        out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`tipstream users export u-1 > file` (or `--out file`) on a full disk ended in an OSError traceback, and
    --out left a cut export behind. /dev/full answers every write with ENOSPC, as a full disk does; the
    streams are not what is tested, so the export's reading is stood in for."""
    import resource
    import signal

    import app.export
    import app.nats_auth

    if out != "--out file over RLIMIT_FSIZE" and not os.access("/dev/full", os.W_OK):
        pytest.skip("/dev/full is not this user's to write here")

    class Closed:
        def jetstream(self, **_: object) -> None:
            return None

        async def close(self) -> None:
            pass

    async def connect(*_: object, **__: object) -> Closed:
        return Closed()

    async def export(_js: object, _engine: object, user_id: str, _progress: object) -> dict:
        return {"user_id": user_id, "streams": {"SIGNALS": [{"seq": 1, "message": "x" * 100_000}]},
                "tip_scores": [], "user_features": None, "model_weights": {}}

    monkeypatch.setattr(app.nats_auth, "connect_for_command", connect)
    monkeypatch.setattr(app.export, "export_user", export)
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{free_port()}")
    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    if out == "--out /dev/full":
        assert main(["users", "export", "u-1", "--out", "/dev/full"]) == 1
    elif out == "stdout":
        with open("/dev/full", "w") as full:
            monkeypatch.setattr("sys.stdout", full)
            assert main(["users", "export", "u-1"]) == 1
    else:  # a regular file cut short: EFBIG past the limit, where a full disk gives ENOSPC
        target = tmp_path / "export.json"
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limits[1]))
        try:
            assert main(["users", "export", "u-1", "--out", str(target)]) == 1
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, ignored)
        assert not target.exists()  # half an export reads as a user holding less than they do
    told = capsys.readouterr().err
    assert "Nothing exported: cannot write" in told and "Traceback" not in told, told
    assert ("Free space on its disk" in told) == (out != "--out file over RLIMIT_FSIZE"), told


def test_an_admin_call_to_a_service_on_loopback_does_not_go_through_the_environments_proxy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # With http_proxy set, urllib sent the admin token in plain text to the proxy, the service on 127.0.0.1.
    import http.server
    import importlib
    import socketserver
    import threading

    from app import models_cli

    seen: dict[str, list[str | None]] = {"service": [], "proxy": []}

    def handler(name: str) -> type[http.server.BaseHTTPRequestHandler]:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                seen[name].append(self.headers.get("Authorization"))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b'{"champion": "v1"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    servers = [socketserver.TCPServer(("127.0.0.1", 0), handler(name)) for name in ("service", "proxy")]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        service, proxy = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)
        for variable in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(variable, proxy)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "a-token-of-sixteen-or-more")
        importlib.reload(models_cli)  # urllib reads the proxies when its opener is built: at the CLI's import
        assert models_cli.admin_call(service, "/admin/rollback", {"actor": "t"}, "roll back", "tipstream models list") == {
            "champion": "v1"}
        assert seen == {"service": ["Bearer a-token-of-sixteen-or-more"], "proxy": []}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        monkeypatch.undo()
        importlib.reload(models_cli)


def test_output_to_a_reader_already_gone_ends_quietly(tmp_path: Path) -> None:
    """`tipstream models card v1 --json | head`: the reader closed the pipe, and the command ended in a
    BrokenPipeError traceback, or Python's "Exception ignored ... BrokenPipeError" at its exit."""
    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader gone before the first write: every write fails
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "tipstream"), "models", "list"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path)})
    finally:
        os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr[-2000:]


def test_an_export_to_a_reader_already_gone_ends_quietly(tmp_path: Path, nats_server) -> None:
    """`tipstream users export u-42 | head`: the export took the closed pipe for a file it could not write
    ("Nothing exported: cannot write to stdout: Broken pipe. --out names a file this user can write.",
    exit code 1), where the other commands end quietly, as a shell reports a writer the closed pipe ended."""
    migrate.upgrade(f"sqlite:///{tmp_path / 'tipstream.db'}")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader gone before the first write: every write fails
    try:
        done = subprocess.run([TIPSTREAM, "users", "export", "u-42", "--nats-url", nats_server.url], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "TIPSTREAM_DATA_DIR": str(tmp_path)})
    finally:
        os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE and "Nothing exported" not in done.stderr, done.stderr[-2000:]


def test_where_a_request_to_forget_stands_shows_who_asked_as_text_not_as_terminal_codes() -> None:
    """`requested_by` is what any admin request's `actor` was, as `models` history's actor is (which
    `models` writes escaped): `users forget-status` wrote it raw, so its ESC codes could clear the
    operator's terminal or a line break forge a line of the report."""
    from app.users_cli import _shown

    row = {"user_id": "u\n1", "status": "done", "requested_at": "2026-12-07T04:00:00+00:00",
           "requested_by": "eve\x1b[2J\ndone", "report": None,
           "earlier": [{"done_at": "x", "requested_at": "y", "requested_by": "mallory\x1b]0;owned\x07"}]}
    shown = _shown(row)
    assert "\x1b" not in shown and "\x07" not in shown, shown
    assert shown.splitlines()[0] == "u\\n1: done (asked 2026-12-07T04:00:00+00:00 by eve\\x1b[2J\\ndone)", shown
    assert "by mallory\\x1b]0;owned\\x07)" in shown, shown


def test_an_export_of_a_user_whose_state_row_is_damaged_names_them_and_the_fixes(
        nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The service stops on a `user_state` row it cannot decode, naming the user and the fixes
    (`UnreadableState`); `tipstream users export` read every stream first, then ended in a ValueError
    traceback. Now it says so, as the service does, before reading the streams."""
    from datetime import UTC, datetime

    from app import db
    from app.db import make_engine
    from streams.fold import UserState

    url = f"sqlite:///{tmp_path / 'export.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(db.user_state.insert().values(user_id="u-1", state=UserState().to_bytes()[:-1],
                                                   updated_at=datetime.now(UTC)))
    engine.dispose()
    assert main(["users", "export", "u-1", "--nats-url", nats_server.url]) == 1
    told = capsys.readouterr().err
    assert told.startswith("Nothing exported: The user_state row of user 'u-1' cannot be read (not a user state"), told
    assert "DELETE FROM user_state WHERE user_id = 'u-1'" in told and "Traceback" not in told, told


def test_an_export_when_a_versions_saved_model_is_damaged_names_the_version_and_the_fixes(
        nats_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`tipstream users export` reads every version's saved model for the user's own weights; one it cannot
    decode (cut short) ended in an UnpicklingError traceback, naming neither the version nor a fix. Now it
    exports nothing, with one line saying which version's model and how to mend it."""
    from datetime import UTC, datetime

    from app import db
    from app.db import make_engine
    from models.reward import TipModel

    url = f"sqlite:///{tmp_path / 'export.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    migrate.upgrade(url)
    engine = make_engine(url)
    model = TipModel()
    model.learn_one({"user_id": "u-1", "tip_id": "t1"}, 1.0)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(db.model_versions.insert().values(version="v2", kind="logreg", params={}, feature_names=[],
                                                       card={}, created_at=now, updated_at=now,
                                                       model=model.to_bytes()[:-40]))
    engine.dispose()
    assert main(["users", "export", "u-1", "--nats-url", nats_server.url]) == 1
    told = capsys.readouterr().err
    assert told.startswith("Nothing exported: The saved model of version 'v2' cannot be read (UnpicklingError: "), told
    assert "'Backups and restores'" in told and "Traceback" not in told and len(told.splitlines()) == 1, told
