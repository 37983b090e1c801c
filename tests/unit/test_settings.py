"""Settings that are resolved, not just read."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from app.settings import Settings
from tests.conftest import run_bound_by_file_permissions


@pytest.mark.parametrize(("cpus", "expected"), [(2, False), (4, True), (16, True)])
def test_checkpoint_writer_auto_takes_a_process_only_with_cores_to_spare(
        monkeypatch: pytest.MonkeyPatch, cpus: int, expected: bool) -> None:
    # raising=False: macOS has no os.sched_getaffinity (`auto` counts os.cpu_count() there); the patch adds it, so
    # the count is the test's on every platform
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert Settings().checkpoint_in_process is expected
    assert Settings(checkpoint_writer="thread").checkpoint_in_process is False
    assert Settings(checkpoint_writer="process").checkpoint_in_process is True


def test_an_unknown_checkpoint_writer_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'auto', 'thread' or 'process'"):
        Settings(checkpoint_writer="fork")


def test_by_default_a_nats_server_that_stops_answering_is_noticed_within_30_s() -> None:
    """tests/integration/test_nats_restart.py pings every second to see it noticed; this holds the default
    to what that test waited for with it (nats-py's own, every 120 s, took 330 s)."""
    from app.nats_connection import MAX_OUTSTANDING_PINGS

    assert Settings().nats_ping_interval_s * (MAX_OUTSTANDING_PINGS + 1) <= 30


@pytest.mark.parametrize("limit", [0, -5])
def test_a_stream_byte_limit_that_nats_would_read_as_none_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match=r"must be -1 \(no limit\) or a number of bytes above 0"):
        Settings(stream_max_bytes=limit)
    assert Settings(stream_max_bytes=-1).stream_max_bytes == -1
    assert Settings(stream_max_bytes=1024, max_event_bytes=1, score_max_body_bytes=1024).stream_max_bytes == 1024


@pytest.mark.parametrize("limit", ["100", "16383", "262143"])
def test_a_stream_byte_limit_under_the_largest_event_or_request_is_refused_naming_both(
        limit: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """JetStream dropped every message larger than the limit as it stored it: with 100, the service ran and
    applied no event, without a word; a decision of a large /score request is lost so too."""
    from app.settings import SettingsError, load_settings

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("TIPSTREAM_STREAM_MAX_BYTES", limit)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    told = str(refused.value).splitlines()
    events = (f"TIPSTREAM_MAX_EVENT_BYTES=16384 (its default): is more than a stream holds (TIPSTREAM_STREAM_MAX_BYTES="
              f"{limit}): JetStream drops an event larger than its stream's byte limit as it stores it, before it is "
              "read. Raise TIPSTREAM_STREAM_MAX_BYTES to 16384 or more (-1: no limit), or lower this")
    requests = (f"TIPSTREAM_SCORE_MAX_BODY_BYTES=262144 (its default): is more than a stream holds "
                f"(TIPSTREAM_STREAM_MAX_BYTES={limit}): JetStream drops a decision (as large as its /score request) "
                "larger than its stream's byte limit as it stores it, before it is read. Raise "
                "TIPSTREAM_STREAM_MAX_BYTES to 262144 or more (-1: no limit), or lower this")
    assert told[:-1] == ([events] if int(limit) < 16384 else []) + [requests], told
    monkeypatch.setenv("TIPSTREAM_STREAM_MAX_BYTES", "262144")
    assert load_settings().stream_max_bytes == 262144
    monkeypatch.setenv("TIPSTREAM_STREAM_MAX_BYTES", "2048")
    monkeypatch.setenv("TIPSTREAM_MAX_EVENT_BYTES", "2048")
    monkeypatch.setenv("TIPSTREAM_SCORE_MAX_BODY_BYTES", "2048")
    assert load_settings().stream_max_bytes == 2048


@pytest.mark.parametrize("replicas", [0, 6])
def test_stream_copies_are_those_jetstream_keeps(replicas: int) -> None:
    with pytest.raises(ValueError, match="TIPSTREAM_STREAM_REPLICAS|stream_replicas"):
        Settings(nats_url="nats://a:4222", stream_replicas=replicas)


def test_more_than_one_stream_copy_needs_a_nats_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded server is a single one, which keeps one copy: refused before anything starts."""
    from app.settings import SettingsError, load_settings

    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.setenv("TIPSTREAM_STREAM_REPLICAS", "3")
    with pytest.raises(SettingsError, match=r"TIPSTREAM_STREAM_REPLICAS='3': the embedded nats-server \(NATS_URL unset\) "
                                            r"is a single server.*a NATS cluster of at least 3 nodes"):
        load_settings()
    cluster = "nats://n1:4222,nats://n2:4222,nats://n3:4222"
    monkeypatch.setenv("NATS_URL", cluster)
    assert load_settings().stream_replicas == 3 and load_settings().nats_url == cluster


def test_a_nats_url_of_another_scheme_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("NATS_URL", "http://127.0.0.1:4222")
    with pytest.raises(SettingsError, match=r"NATS_URL='http://127.0.0.1:4222': a NATS server's URL starts with nats://"):
        load_settings()
    monkeypatch.setenv("NATS_URL", "http://tipstream:hunter2@127.0.0.1:4222")
    with pytest.raises(SettingsError, match=r"NATS_URL='http://tipstream:\*\*\*@127.0.0.1:4222': a NATS server's"):
        load_settings()
    for good in ("nats://127.0.0.1:4222", "tls://nats.internal:4222", "127.0.0.1:4222"):
        monkeypatch.setenv("NATS_URL", good)
        assert load_settings().nats_url == good


@pytest.mark.parametrize(("url", "told"), [
    ("nats://", "names a server without a host"), ("tls://:4222", "names a server without a host"),
    ("nats://a:4222,nats://:4222", "names a server without a host"),
    ("nats://u:hunter2@127.0.0.1:99999", "is not a NATS server's URL (Port out of range 0-65535)"),
    ("nats://127.0.0.1:abc", "is not a NATS server's URL (Port could not be cast to integer value as 'abc')"),
    ("nats://[::1", "is not a NATS server's URL (Invalid IPv6 URL)"),
])
def test_a_nats_url_nats_py_cannot_parse_is_refused_at_once(
        url: str, told: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py parsed them only as it connected: the start ended with its traceback ("invalid hostname in connect
    url", "invalid connect url option")."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("NATS_URL", url)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert refused.value.args[0].startswith(f"NATS_URL='{url.replace('hunter2', '***')}': {told}: write each as "
                                            "nats://host:4222 (or host:4222)"), refused.value.args[0]
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite+pysqlite://?timeout=3"])
def test_a_sqlite_database_in_memory_is_refused_naming_database_url(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tipstream run` ended with a traceback (SQLite objects used from another thread)."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(SettingsError, match=rf"^DATABASE_URL='{re.escape(url)}': is a SQLite database in memory, .* "
                                            "name a file .*, or unset it for SQLite under TIPSTREAM_DATA_DIR"):
        load_settings()
    for on_disk in ("sqlite:///tipstream.db", "sqlite:////srv/t.db", "postgresql+psycopg://db/tips"):
        monkeypatch.setenv("DATABASE_URL", on_disk)
        assert load_settings().database_url == on_disk


@pytest.mark.parametrize("blank", ["  ", ",", " , "])
def test_a_nats_url_naming_no_server_is_refused_at_once(blank: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py, given no server and told to retry for ever, spun without yielding: `tipstream run` hung
    at a full core, deaf to SIGTERM. Empty is unset (the embedded nats-server), as before."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("NATS_URL", blank)
    with pytest.raises(SettingsError, match=rf"^NATS_URL='{blank}': names no server \(spaces or commas only\): set it "
                                            "to a NATS server's URL, e.g. nats://127.0.0.1:4222, or unset it"):
        load_settings()
    monkeypatch.setenv("NATS_URL", "")
    assert not load_settings().nats_url
    monkeypatch.setenv("NATS_URL", "nats://a:4222, ")
    assert load_settings().nats_url == "nats://a:4222, "


@pytest.mark.parametrize(("value", "told"), [
    ('{"acted": 2}', """TIPSTREAM_REWARDS='{"acted": 2}': rewards must be between 0 and 1"""),
    ('{"acted": "x"}', """TIPSTREAM_REWARDS='{"acted": "x"}': acted: Input should be a valid number"""),
    ('{"foo": 1}', """TIPSTREAM_REWARDS='{"foo": 1}': names unknown reactions ['foo']; known: acted,"""),
])
def test_a_bad_json_setting_is_told_as_the_operator_wrote_it(value: str, told: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """It was the parsed value, as Python writes it ({'acted': 2}), and the variable's name twice."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_REWARDS", value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith(told), str(refused.value)


def test_tip_scores_kept_no_longer_than_the_join_window_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS", "2")
    with pytest.raises(SettingsError, match=r"TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS='2': must be longer than the join "
                                            r"window \(TIPSTREAM_LEARNER_JOIN_WINDOW_S=259200, 3 days\)"):
        load_settings()
    monkeypatch.setenv("TIPSTREAM_LEARNER_JOIN_WINDOW_S", "3600")
    assert load_settings().tip_scores_max_age_days == 2
    assert Settings(tip_scores_max_age_days=0).tip_scores_max_age_days == 0  # kept for ever


def test_a_default_refused_for_another_settings_value_is_told_as_the_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """It was told as `(in .env)` with no .env anywhere, and "unset it for its default": the default it was."""
    from app.settings import SettingsError, load_settings

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS", raising=False)
    monkeypatch.setenv("TIPSTREAM_LEARNER_JOIN_WINDOW_S", str(100 * 86_400))
    with pytest.raises(SettingsError) as refused:
        load_settings()
    told = str(refused.value)
    assert told.startswith("TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS=90.0 (its default): must be longer than the join"), told
    assert "(in .env)" not in told and "unset it for its default" not in told, told

    (tmp_path / ".env").write_text("TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS=1\n")
    monkeypatch.delenv("TIPSTREAM_LEARNER_JOIN_WINDOW_S")
    with pytest.raises(SettingsError, match=r"TIPSTREAM_TIP_SCORES_MAX_AGE_DAYS='1' \(in .env\): must be longer"):
        load_settings()


def test_a_variable_in_the_environment_wins_over_the_same_in_dotenv(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As the README's settings section says; the rest of .env is read all the same."""
    from app.settings import load_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TIPSTREAM_POLICY=greedy\nTIPSTREAM_PORT=8123\n")
    monkeypatch.setenv("TIPSTREAM_POLICY", "softmax")
    settings = load_settings()
    assert (settings.policy, settings.port) == ("softmax", 8123)


def test_a_misspelt_setting_is_named_with_the_one_it_was_likely_meant_for(tmp_path) -> None:
    """pydantic-settings ignores an unknown variable: TIPSTREAM_POLICY_EPSILLON=0.5 started a
    service with epsilon 0.1, and nothing said so."""
    from app.settings import unknown_variables

    env_file = tmp_path / ".env"
    env_file.write_text("TIPSTREAM_PROT=8001\nTIPSTREAM_LOG_LEVEL=debug\n")
    environ = {"TIPSTREAM_POLICY_EPSILLON": "0.5", "TIPSTREAM_PORT": "8000", "TIPSTREAM_NATS_URL": "nats://x",
               "TIPSTREAM_TEST_POSTGRES_URL": "postgresql://x", "TIPSTREAM_FOO": "1", "HOME": "/root"}
    assert unknown_variables(environ, env_file) == [
        "TIPSTREAM_FOO is not a tipstream setting and is ignored (the README's settings table lists them all)",
        "TIPSTREAM_POLICY_EPSILLON is not a tipstream setting and is ignored (did you mean TIPSTREAM_POLICY_EPSILON?)",
        "TIPSTREAM_PROT is not a tipstream setting and is ignored (did you mean TIPSTREAM_PORT?)",
    ]


def test_a_misspelt_database_or_nats_url_without_the_prefix_is_named_while_the_setting_is_unset(
        tmp_path: Path) -> None:
    """DATABSE_URL=postgresql://... in .env ran the service on SQLite, and nothing said so."""
    from app.settings import unknown_variables

    env_file = tmp_path / ".env"
    env_file.write_text("DATABSE_URL=postgresql+psycopg://db/tips\nDATABASE_USER=tips\n")
    environ = {"NATS_URI": "nats://n:4222", "REDIS_URL": "redis://r", "HOME": "/root"}
    assert unknown_variables(environ, env_file) == [
        "DATABSE_URL is not a tipstream setting and is ignored (did you mean DATABASE_URL?)",
        "NATS_URI is not a tipstream setting and is ignored (did you mean NATS_URL?)",
    ]
    # Beside the setting itself, it is another program's: not told.
    assert unknown_variables({**environ, "database_url": "sqlite://", "TIPSTREAM_NATS_URL": "nats://n"}, env_file) == []


@pytest.mark.parametrize(("variable", "meant"), [("TIPSTREAM_DATABASE_URI", "DATABASE_URL"),
                                                   ("TIPSTREAM_NATSURL", "NATS_URL")])
def test_a_misspelt_database_or_nats_url_is_named_with_the_setting(variable: str, meant: str) -> None:
    """They are read as TIPSTREAM_DATABASE_URL and TIPSTREAM_NATS_URL too, but were no candidates: the
    service ran on SQLite (or an embedded NATS), the line naming the variable suggesting nothing."""
    from app.settings import unknown_variables

    assert unknown_variables({variable: "x"}, Path("/nonexistent")) == [
        f"{variable} is not a tipstream setting and is ignored (did you mean {meant}?)"]


@pytest.mark.parametrize(("variables", "told"), [
    ({"TIPSTREAM_STREAM_MAX_AGE_DAYS": "0.001"},
     ("TIPSTREAM_DUPLICATE_WINDOW_S=120.0 (its default): JetStream's duplicate window must not outlast the streams' "
      "retention (TIPSTREAM_STREAM_MAX_AGE_DAYS=0.001, 86.4 s)")),
    ({"TIPSTREAM_DLQ_MAX_AGE_DAYS": "0.001"},
     ("TIPSTREAM_DLQ_MAX_AGE_DAYS='0.001': the DLQ's retention must be at least JetStream's duplicate window "
      "(TIPSTREAM_DUPLICATE_WINDOW_S=120 s, 0.00138889 days)")),
])
def test_a_duplicate_window_longer_than_a_retention_is_refused_naming_both(
        monkeypatch: pytest.MonkeyPatch, tmp_path, variables: dict, told: str) -> None:
    """JetStream refused the stream at the start: "duplicates window can not be larger then max
    age (error 10052)", exit 1, and no setting named."""
    from app.settings import SettingsError, load_settings

    monkeypatch.chdir(tmp_path)  # no .env here
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith(told), str(refused.value)


@pytest.mark.parametrize("token", ["hunter2", "  fifteen-chars!  ", "hunter2\n"])
def test_an_admin_token_short_enough_to_guess_is_refused_without_being_shown(
        token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", token)
    with pytest.raises(SettingsError, match=r"TIPSTREAM_ADMIN_TOKEN='\*+': is \d+ characters long.*at least 16"
                                            r".*secrets\.token_urlsafe") as refused:
        load_settings()
    assert token.strip() not in str(refused.value)


@pytest.mark.parametrize("token", ["pässwörd-pässwörd-pässwörd", "sixteen\tchars-ok-and-more"])
def test_an_admin_token_no_http_header_can_carry_is_refused_without_being_shown(
        token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server started with it, and refused every admin change as a wrong token, curl's included."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", token)
    with pytest.raises(SettingsError, match=r"^TIPSTREAM_ADMIN_TOKEN='\*+': holds a character an HTTP header cannot "
                                            "carry") as refused:
        load_settings()
    assert token not in str(refused.value)


@pytest.mark.parametrize("token", ["", "   ", "sixteen-chars-ok", "  sixteen-chars-ok\n"])
def test_an_admin_token_long_enough_or_blank_is_taken(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import load_settings

    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", token)
    assert load_settings().admin_token.get_secret_value() == token  # blank: admin changes refused, as before


@pytest.mark.parametrize("variable", ["TIPSTREAM_DATA_DIR", "TIPSTREAM_HOST"])
def test_a_blank_data_dir_or_host_is_refused_naming_it(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blank, the data directory was the working directory and the host every interface, without a word."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv(variable, " ")
    with pytest.raises(SettingsError, match=rf"{variable}=' ': must not be blank"):
        load_settings()
    monkeypatch.setenv(variable, "")
    with pytest.raises(SettingsError, match=rf"{variable}='': must not be blank"):
        load_settings()


@pytest.mark.parametrize("value", [" /srv/tipstream", "/srv/tipstream\n"])
def test_a_data_dir_with_spaces_around_it_is_refused_naming_it(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """' /srv/tipstream' was a directory of that name under the working directory: the database and the
    NATS store went there, without a word."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_DATA_DIR", value)
    told = f"TIPSTREAM_DATA_DIR={value!r}: has spaces or a line break around it: remove them (e.g. '/srv/tipstream')"
    with pytest.raises(SettingsError, match=f"^{re.escape(told)}"):
        load_settings()


def test_a_setting_written_in_lower_case_is_told_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are read whatever their case; an error for one told of a default, and to unset nothing."""
    from app.settings import FIX_IT, SettingsError, load_settings

    monkeypatch.setenv("tipstream_policy", "ucb")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith("tipstream_policy='ucb': Input should be"), str(refused.value)
    assert FIX_IT in str(refused.value) and "(its default)" not in str(refused.value)
    monkeypatch.delenv("tipstream_policy")
    monkeypatch.setenv("nats_url", "http://tipstream:hunter2@127.0.0.1:4222")
    with pytest.raises(SettingsError, match=r"nats_url='http://tipstream:\*\*\*@127.0.0.1:4222'"):
        load_settings()


def test_a_setting_written_twice_in_two_cases_is_named_as_the_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings reads the last of `TIPSTREAM_PORT` and `tipstream_port`: the error named the
    other, valid, one."""
    from app.settings import SettingsError, load_settings

    monkeypatch.delenv("TIPSTREAM_PORT", raising=False)
    monkeypatch.setenv("TIPSTREAM_PORT", "8080")
    monkeypatch.setenv("tipstream_port", "eighty")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith("tipstream_port='eighty': Input should be"), str(refused.value)


@pytest.mark.parametrize(("variable", "bound"), [
    ("TIPSTREAM_STREAM_MAX_AGE_DAYS", "106751"), ("TIPSTREAM_DLQ_MAX_AGE_DAYS", "106751"),
    ("TIPSTREAM_STREAM_MAX_BYTES", str(2**63 - 1)), ("TIPSTREAM_MAX_FUTURE_S", str(3_652_059 * 86_400)),
    # An OverflowError traceback at start (posix_fallocate's int64 size), and a 500 to every card's evaluation (SQL's
    # LIMIT, an int64).
    ("TIPSTREAM_SPOOL_RESERVE_MB", str((2**63 - 1) >> 20)), ("TIPSTREAM_CARD_EVAL_MAX_REWARDS", str(2**63 - 1)),
])
def test_a_bound_past_what_jetstream_sql_a_file_or_an_event_s_time_can_hold_is_refused_naming_it(
        variable: str, bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1e21 ended the start with JetStream's "invalid JSON" (a Go duration, an int64), or, for
    TIPSTREAM_MAX_FUTURE_S and TIPSTREAM_SPOOL_RESERVE_MB, with an OverflowError traceback."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv(variable, bound)
    assert str(getattr(load_settings(), variable.removeprefix("TIPSTREAM_").lower())) in (bound, f"{bound}.0")
    integer = variable in ("TIPSTREAM_STREAM_MAX_BYTES", "TIPSTREAM_CARD_EVAL_MAX_REWARDS")
    monkeypatch.setenv(variable, "999999999999999999999" if integer else "1e21")
    with pytest.raises(SettingsError, match=rf"^{variable}='[0-9e]+': Input should be less than or equal to {bound}"):
        load_settings()


LOAD_SETTINGS = """
from app.settings import SettingsError, load_settings

try:
    load_settings()
except SettingsError as error:
    print(error)
else:
    raise SystemExit("the settings loaded")
"""


@pytest.mark.parametrize("problem", ["UTF-16", "unreadable"])
def test_a_dotenv_file_that_cannot_be_read_is_one_message_naming_it(problem: str, tmp_path: Path) -> None:
    """An .env saved as UTF-16 (Windows editors do), or not readable by the service's user, was a
    UnicodeDecodeError or PermissionError traceback from pydantic-settings."""
    env_file = tmp_path / ".env"
    if problem == "UTF-16":
        env_file.write_text("TIPSTREAM_PORT=8001\n", encoding="utf-16")
    else:
        env_file.write_text("TIPSTREAM_PORT=8001\n")
        env_file.chmod(0)
    # In its directory, where .env is read from.
    done = run_bound_by_file_permissions([sys.executable, "-c", LOAD_SETTINGS], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Cannot read {env_file}, which tipstream reads settings from ("), done.stdout


@pytest.mark.parametrize("window", ["1e-10", "0.001"])
def test_a_duplicate_window_under_jetstream_s_least_is_refused_naming_it(
        window: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a nanosecond, JetStream read 0 and kept its default, 2 minutes, without a word; under
    100 ms it refused the streams (10052), naming no setting."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_DUPLICATE_WINDOW_S", window)
    with pytest.raises(SettingsError, match=rf"^TIPSTREAM_DUPLICATE_WINDOW_S='{window}': Input should be greater "
                                            r"than or equal to 0\.1"):
        load_settings()
    monkeypatch.setenv("TIPSTREAM_DUPLICATE_WINDOW_S", "0.1")
    assert load_settings().duplicate_window_s == 0.1


def test_a_duplicate_window_shorter_than_the_publisher_s_sends_again_is_warned_of_naming_the_bound() -> None:
    """The publisher sends a decision JetStream has not acknowledged again, 5-17 s after its send (measured): a
    window shorter than that stores one that was stored and acknowledged late twice, and a window of 0.1 s was
    taken without a word. Warned of at the start, not refused: tests set 1 s on purpose, and a decision stored
    twice is taken once by the learner."""
    from app.decision_publisher import ACK_TIMEOUT_S, RESENT_WITHIN_S, short_duplicate_window

    assert ACK_TIMEOUT_S < RESENT_WITHIN_S < Settings().duplicate_window_s
    told = short_duplicate_window(Settings(duplicate_window_s=1).duplicate_window_s)
    assert told is not None and told.startswith(
        f"TIPSTREAM_DUPLICATE_WINDOW_S=1 is shorter than the {RESENT_WITHIN_S:g} s within which the publisher sends "
        f"a decision JetStream has not acknowledged again (after {ACK_TIMEOUT_S:g} s without its acknowledgement): "
        "one stored and acknowledged late, a NATS server slow or stalled, is stored twice in DECISIONS."), told
    assert f"Set it to at least {RESENT_WITHIN_S:g} s" in told
    assert short_duplicate_window(RESENT_WITHIN_S) is None and short_duplicate_window(120) is None
    # The setting's description (the README's table) names the bound: settings.py does not import the publisher.
    assert f"{RESENT_WITHIN_S:g} s" in Settings.model_fields["duplicate_window_s"].description


@pytest.mark.parametrize(("variable", "content", "with_url", "told"), [
    ("TIPSTREAM_NATS_CREDS", None, True, "no such file"),
    ("TIPSTREAM_NATS_CREDS", "port: 4222\n", True, "is not a NATS credentials file: it has no user JWT"),
    ("TIPSTREAM_NATS_CREDS", "-----BEGIN NATS USER JWT-----\na.b.c\n", True, "it has no user NKEY seed"),
    ("TIPSTREAM_NATS_CREDS", "-----BEGIN NATS USER JWT-----\na.b.c\n", False, "NATS_URL is unset"),
    ("TIPSTREAM_NATS_TLS_CA", "", False, "NATS_URL is unset (the embedded nats-server takes a token of its own"),
    ("TIPSTREAM_NATS_TLS_KEY", "", True, "TIPSTREAM_NATS_TLS_CERT, the certificate, is unset"),
])
def test_nats_credentials_and_tls_files_are_checked_at_start_naming_the_setting(
        variable: str, content: str | None, with_url: bool, told: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A credentials file without its seed failed only as nats-py connected, with a TypeError traceback."""
    from app.settings import SettingsError, load_settings

    path = tmp_path / "file"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv(variable, str(path))
    if with_url:
        monkeypatch.setenv("NATS_URL", "nats://nats.example:4222")
    with pytest.raises(SettingsError, match=rf"^{variable}='{path}': .*{re.escape(told)}"):
        load_settings()


@pytest.mark.parametrize("given", ["https://tips.example.com", "tips.example.com:443", "a.example b.example"])
def test_allowed_hosts_that_no_host_header_could_match_are_refused(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL or a port there matched no request's Host: every request through the proxy got a 400."""
    from app.settings import SettingsError, load_settings

    monkeypatch.setenv("TIPSTREAM_ALLOWED_HOSTS", f"localhost,{given}")
    with pytest.raises(SettingsError, match=r"^TIPSTREAM_ALLOWED_HOSTS=.*is not a host name: give names only"):
        load_settings()
    monkeypatch.setenv("TIPSTREAM_ALLOWED_HOSTS", "tips.example.com, 10.0.0.5,[::1]")
    assert load_settings().allowed_hosts
