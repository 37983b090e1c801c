"""Typed settings, read once from the environment (and a `.env` file if present).

Every field here is listed in the README's settings table (`tests/unit/test_events.py` fails
when the two drift apart) and in `tipstream run --help`, both generated from the fields.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

# Kept here rather than imported from models/ (River takes seconds to import and every CLI
# command reads settings); tests/unit/test_scoring.py checks they match models/.
DEFAULT_REWARDS = {"acted": 1.0, "liked": 0.8, "snoozed": 0.3, "dismissed": 0.0, "disliked": 0.0}
DEFAULT_USER_FORGETTING = 0.3
DEFAULT_USER_TTL_DAYS = 90.0
MAX_USER_TTL_DAYS = 3_652_059
# JetStream takes a stream's age as a Go duration, int64 nanoseconds (~292 years), and its byte limit as an
# int64: past them, the server refused the streams' config as "invalid JSON", naming no setting.
MAX_STREAM_AGE_DAYS = 106_751
MAX_STREAM_BYTES = 2**63 - 1
# An event's ts lies within years 1-9999: a bound as long as that span bounds nothing; a longer one
# overflowed Python's timedelta (a traceback at start).
MAX_FUTURE_S = MAX_USER_TTL_DAYS * 86_400
DEFAULT_MAX_VALUES = 100_000
MAX_MAX_VALUES = 2**63 - 1
# SQL's largest integer (SQLite's and PostgreSQL's bigint): a LIMIT past it was an OverflowError, a 500 to
# every model card's evaluation.
MAX_SQL_INT = 2**63 - 1
# A file's size is an off_t (int64): past it, the reserve's posix_fallocate was an OverflowError traceback at start.
MAX_SPOOL_RESERVE_MB = (2**63 - 1) >> 20
# An admin token answers to anyone who reaches the port, at thousands of guesses a second: fewer
# characters than this fall to guessing (16 URL-safe characters are 96 bits).
MIN_ADMIN_TOKEN_CHARS = 16
POLICY_PARAMS = {
    "epsilon_greedy": ("epsilon",), "softmax": ("temperature",), "thompson": ("cells", "concentration"), "greedy": (),
}


def nats_scheme_problem(url: str | None) -> str | None:
    """What is wrong with `url`'s scheme for a NATS server, or None. nats-py read http://host:4222 as
    a host name it could not find, and said so only after the connect timeout.

    >>> nats_scheme_problem("nats://127.0.0.1:4222") is None, nats_scheme_problem("127.0.0.1:4222") is None
    (True, True)
    >>> nats_scheme_problem("http://127.0.0.1:4222")
    "a NATS server's URL starts with nats:// (or tls://, ws://, wss://), not http://"
    >>> nats_scheme_problem("nats://a:4222,nats://b:4222") is None, nats_scheme_problem("nats://a:4222,http://b:4222")
    (True, "a NATS server's URL starts with nats:// (or tls://, ws://, wss://), not http://")
    """
    for part in (url or "").split(","):  # a cluster's nodes, comma-separated
        scheme = part.strip().partition("://")[0] if "://" in part else None
        if scheme is not None and scheme.lower() not in ("nats", "tls", "ws", "wss"):
            return f"a NATS server's URL starts with nats:// (or tls://, ws://, wss://), not {scheme}://"
    return None


# SQLAlchemy's URLs of a SQLite database in memory: no path, an empty one, or `:memory:` (sqlite:///:memory:).
_SQLITE_IN_MEMORY = re.compile(r"sqlite(\+\w+)?://(/(:memory:)?)?(\?.*)?", re.IGNORECASE)


def nats_url_problem(url: str | None) -> str | None:
    """What is wrong with `url` as NATS servers' URLs (comma-separated), or None; never its text, which may hold
    a password. nats-py read a URL without a host, or with a port that is no port, only as it connected: a
    traceback at start; and one naming no server at all hung it (retrying an empty list without yielding).

    >>> nats_url_problem("nats://u:p@127.0.0.1:4222,tls://[::1]:4222, n3") is None, nats_url_problem("") is None
    (True, True)
    >>> nats_url_problem("nats://:4222")
    'names a server without a host: write each as nats://host:4222 (or host:4222)'
    >>> nats_url_problem("nats://a:4222,nats://b:99999")
    "is not a NATS server's URL (Port out of range 0-65535): write each as nats://host:4222 (or host:4222)"
    """
    if url and not any(part.strip() for part in url.split(",")):
        return ("names no server (spaces or commas only): set it to a NATS server's URL, e.g. nats://127.0.0.1:4222, "
                "or unset it for an embedded nats-server")
    problem = nats_scheme_problem(url)
    if problem is not None:
        return problem
    for part in (part.strip() for part in (url or "").split(",")):
        if not part:
            continue
        # As nats-py reads it (Client._parse_server_uri): no scheme is nats://, no port 4222.
        text = part if "://" in part else f"nats://{part}" if ":" in part else f"nats://{part}:4222"
        try:
            parsed = urlparse(text)
            host = parsed.hostname
            parsed.port  # noqa: B018 - reading it raises for a port that is no number from 0 to 65535
        except ValueError as error:
            return f"is not a NATS server's URL ({error}): write each as nats://host:4222 (or host:4222)"
        if not host or host == "none":
            return "names a server without a host: write each as nats://host:4222 (or host:4222)"
    return None


def unreadable_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file by this user, or None."""
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "is not a file"
    if not os.access(path, os.R_OK):
        return f"is a file this user (uid {os.getuid()}) may not read"
    return None


def creds_problem(content: bytes) -> str | None:
    """What a NATS credentials file lacks, or None: nats-py reads it only as it connects, and one without
    its seed failed there with a TypeError traceback.

    >>> creds_problem(b"-----BEGIN NATS USER JWT-----\\neyJ0.e30.c2ln\\n------END NATS USER JWT------\\n"
    ...               b"-----BEGIN USER NKEY SEED-----\\nSUAB\\n------END USER NKEY SEED------\\n") is None
    True
    >>> creds_problem(b"-----BEGIN NATS USER JWT-----\\neyJ0.e30.c2ln\\n")
    'is not a NATS credentials file: it has no user NKEY seed (a line starting SU after BEGIN USER NKEY SEED)'
    """
    jwt, seed = creds_user(content)
    if jwt.count(b".") != 2:
        return "is not a NATS credentials file: it has no user JWT (a line after BEGIN NATS USER JWT)"
    if not seed.startswith(b"SU"):
        return ("is not a NATS credentials file: it has no user NKEY seed (a line starting SU after "
                "BEGIN USER NKEY SEED)")
    return None


def creds_user(content: bytes) -> tuple[bytes, bytes]:
    """The user JWT and NKEY seed of a NATS credentials file, each b"" when it has none (`creds_problem`).

    >>> creds_user(b"-----BEGIN NATS USER JWT-----\\neyJ0.e30.c2ln\\n------END NATS USER JWT------\\n")
    (b'eyJ0.e30.c2ln', b'')
    """
    lines = content.splitlines()

    def after(marker: bytes) -> bytes:
        for i, line in enumerate(lines[:-1]):
            if marker in line:
                return lines[i + 1].strip()
        return b""

    return after(b"BEGIN NATS USER JWT"), after(b"BEGIN USER NKEY SEED")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TIPSTREAM_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True,
        allow_inf_nan=False,  # TIPSTREAM_POLICY_TEMPERATURE=inf passed here and failed deep in the start-up
    )

    data_dir: Path = Field(
        Path("data"), description="Where the SQLite file and the embedded NATS store live, and the decisions "
        "JetStream had not acknowledged at a stop (published first at the next start): keep it across restarts."
    )
    nats_url: str | None = Field(
        None,
        validation_alias=AliasChoices("NATS_URL", "TIPSTREAM_NATS_URL"),
        description="NATS server to use: nats-server 2.9 or newer, with JetStream (docs/operations.md, "
        "\"Which NATS servers\"); a cluster's nodes comma-separated (`nats://n1:4222,nats://n2:4222,nats://n3:4222`); "
        "`tls://` for TLS (docs/operations.md, \"Credentials and TLS for NATS\"). Unset: start an embedded "
        "`nats-server` under the data directory.",
    )
    nats_connect_timeout_s: float = Field(
        20.0, gt=0,
        description="How long `tipstream run` keeps trying to reach NATS at start before it exits with a message. "
                    "A single server whose TLS will not do (none for a `tls://` URL, a certificate not trusted), or "
                    "that refuses the credentials, ends it at once. Once connected, a lost connection is retried for as long as it takes.",
    )
    # nats-py's defaults (every 120 s, 2 unanswered) took 330 s to notice a hung server (app/nats_connection.py).
    nats_ping_interval_s: float = Field(
        10.0, gt=0,
        description="How often the connection to NATS is pinged: a server that hangs without closing it (or a network "
                    "dropping packets) is noticed after two pings unanswered, 20-30 s at 10, and the reconnect moves on. "
                    "Not much shorter: a pong waits behind what the server is still sending (a catch-up's messages, "
                    "megabytes over a slow link), and too short a bound takes that for a lost server.",
    )
    nats_jetstream_timeout_s: float = Field(
        10.0, gt=0,
        description="How long each of the service's JetStream API calls (creating and checking its streams and "
                    "consumers, reading a stream's state) waits for its answer. One unanswered at a start (a NATS "
                    "cluster without a meta leader, a server too loaded) ends `tipstream run` with a message saying "
                    "what to check.",
    )
    nats_creds: Path | None = Field(
        None, description="NATS credentials file (`.creds`: a user JWT and its NKEY seed, as `nsc` and Synadia Cloud "
        "hand out) to connect to NATS_URL with; read again at each reconnect, so a rotated file is taken up. "
        "Unset: the URL's own user and password or token, if any.",
    )
    nats_tls_ca: Path | None = Field(
        None, description="PEM file of the CA certificates the NATS server's certificate is checked against, instead "
        "of the system's (docs/operations.md, \"Credentials and TLS for NATS\"). Set, the connection is TLS, as with "
        "`tls://`.",
    )
    nats_tls_cert: Path | None = Field(
        None, description="PEM file of a client certificate, for a NATS server that verifies its clients (mutual "
        "TLS): its key in the same file, or in TIPSTREAM_NATS_TLS_KEY. Set, the connection is TLS, as with `tls://`.",
    )
    nats_tls_key: Path | None = Field(
        None, description="PEM file of TIPSTREAM_NATS_TLS_CERT's private key, when that file does not hold it.",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "TIPSTREAM_DATABASE_URL"),
        description="SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db`. Unset: SQLite at `<data_dir>/tipstream.db`.",
    )
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    allowed_hosts: str = Field(
        "", description="Host names, comma-separated, that requests may give in their Host header besides "
        "localhost, 127.0.0.1 and [::1] (a proxy's, e.g. `tips.example.com`); others get a 400, against DNS "
        "rebinding. Empty: those three only with TIPSTREAM_HOST on loopback, any name otherwise. `*`: any name.",
    )
    port: int = Field(
        8000, ge=0, le=65535,
        description="HTTP port. 0 picks a free one: `tipstream run` prints which (`tipstream on http://...`), "
                    "and `tipstream models` then needs `--url`.",
    )
    log_level: str = Field("info", description="Python log level of the root logger: tipstream's lines (the "
                                               "service's, and those of the checkpoint writer and evaluation "
                                               "processes it starts), and its libraries' (alembic's migrations at "
                                               "info).")

    stream_max_age_days: float = Field(
        90.0, gt=0, le=MAX_STREAM_AGE_DAYS, description="Retention of SIGNALS, FEEDBACK and DECISIONS; replay reaches back this far."
    )
    stream_max_bytes: int = Field(
        -1, le=MAX_STREAM_BYTES,
        description="Byte limit per stream (-1: none). Oldest events go first when reached. At least "
                    "TIPSTREAM_MAX_EVENT_BYTES and TIPSTREAM_SCORE_MAX_BODY_BYTES: JetStream drops a larger message "
                    "as it stores it.",
    )
    stream_replicas: int = Field(
        1, ge=1, le=5,
        description="Copies JetStream keeps of each of tipstream's streams, each on another node of a NATS cluster "
                    "(1-5; 3 on a 3-node cluster survives the loss of any one node). A stream with another count "
                    "is scaled to it at start. More than 1 needs NATS_URL to name a cluster with at least that many "
                    "nodes (docs/operations.md, \"On a NATS cluster\").",
    )
    # JetStream's least (10052, "needs to be >= 100ms"); under a nanosecond it read 0 and took its default, 2 minutes.
    # The streams' retention is held to at least this window below, so to JetStream's least too.
    # The 21 s is decision_publisher.RESENT_WITHIN_S (tests/unit/test_settings.py holds them together): imported, the
    # publisher's module would add 0.2 s to every CLI command, which reads settings.
    duplicate_window_s: float = Field(
        120.0, ge=0.1, description="JetStream's `Nats-Msg-Id` duplicate window: a re-sent id is dropped within it, "
        "whatever its content. After it, the fold recognises the same event (same id, type, user, time "
        "and kept fields) for as long as it can matter; the same id with other content counts again. "
        "Under 21 s, the start warns: tipstream sends a decision JetStream has not acknowledged again within "
        "21 s, and one stored whose acknowledgement came late is then stored twice in DECISIONS "
        "(docs/operations.md, \"Which NATS servers\")."
    )
    dlq_max_age_days: float = Field(30.0, gt=0, le=MAX_STREAM_AGE_DAYS, description="Retention of the DLQ stream.")
    max_event_bytes: int = Field(
        16_384, gt=0, description="Larger events go to the DLQ as `oversized`."
    )

    max_future_s: float = Field(
        86_400.0, gt=0, le=MAX_FUTURE_S, description="Events stamped further ahead of when JetStream stored them go to the DLQ as `future_ts` "
                               "(the same on every replay), as do decisions whose ids say they were served so far ahead."
    )
    ingest_batch: int = Field(1024, ge=1, le=10_000, description="Messages per JetStream pull request.")
    checkpoint_every_events: int = Field(
        50_000, ge=1, description="Checkpoint after this many applied events..."
    )
    checkpoint_every_s: float = Field(
        5.0, gt=0, description="...or after this many seconds, whichever first (a crash replays what followed the last "
                              "checkpoint committed: this much, plus the time a checkpoint takes, seconds in a catch-up; "
                              "docs/operations.md, \"Rebuilding from the log\")."
    )
    checkpoint_writer: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="Where checkpoint transactions run: `thread` (in the service; they share its GIL, so under load "
                    "they take longer) or `process` (a writer process: faster checkpoints, but it needs a core of its "
                    "own; on two cores it slows ingest by about a quarter). `auto`: `process` with 4 or more CPUs.",
    )
    max_uncheckpointed_events: int = Field(
        1_000_000,
        ge=1,
        description="Ingest pauses when this many events are applied but not checkpointed (the database away, or a "
                    "checkpoint of very many users slower than a catch-up; the log says which), asks for a checkpoint "
                    "at once, and reads on once fewer than half that many wait: under "
                    "TIPSTREAM_CHECKPOINT_EVERY_EVENTS, it sets how often checkpoints are written.",
    )

    offline_features_every_s: float = Field(
        30.0, ge=0, description="How often changed users' rows in `user_features` are refreshed (0: never)."
    )
    gc_freeze_every_users: int = Field(
        50_000, ge=0,
        description="Each time this many more users have come into memory (loaded, new or returning), their "
                    "state is frozen out of the cycle collector's full passes (a pass over 1M users stalls the "
                    "event loop ~0.7 s). 0: never.",
    )

    # -- scoring, decisions, learning (issue 4; docs/learning.md) ---------------------------
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for admin requests: registry changes (register, shadow, promote, retire, evaluate, "
                    "rollback) and forgetting users (`tipstream users forget`, `forget-status`); at least "
                    "16 characters of printable ASCII (`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`). "
                    "Unset: they are refused.",
    )
    model_kind: Literal["logreg", "fm"] = Field(
        "logreg", description="Kind of the first champion (`v1`), created on the first start."
    )
    model_optimizer: Literal["adagrad", "sgd"] = Field(
        "adagrad", description="How the first models' weights learn: adagrad (a step per feature) or sgd (one for all)."
    )
    model_learning_rate: float | None = Field(
        None, gt=0, description="The first models' optimizer step. Unset: 0.5 for adagrad, 0.1 for sgd."
    )
    model_user_forgetting: float = Field(
        DEFAULT_USER_FORGETTING, ge=0, lt=1,
        description="adagrad: share of a user's own features' step history forgotten at each of their reactions "
                    "(re-learns a changed taste; 0: never forget).",
    )
    model_user_ttl_days: float = Field(
        DEFAULT_USER_TTL_DAYS, ge=0, le=MAX_USER_TTL_DAYS,
        description="The first models forget a user's own weights this many days (log time) after the user's last "
                    "reaction (bounds their size; 0: keep every user for good).",
    )
    model_max_values: int = Field(
        DEFAULT_MAX_VALUES, ge=0, le=MAX_MAX_VALUES,
        description="The first models learn weights for at most this many tip ids, categories and candidates' text "
                    "values (bounds what callers can make them hold; new ones past it are left out of learning, "
                    "counted in tipstream_inputs_refused_total; 0: no bound).",
    )
    bootstrap_shadow_kind: Literal["logreg", "fm"] | None = Field(
        None, description="Also register `v2` of this kind as the shadow on the first start. Unset: no shadow."
    )
    policy: Literal["epsilon_greedy", "softmax", "thompson", "greedy"] = Field(
        "epsilon_greedy", description="Exploration policy of `/score`: epsilon_greedy, softmax, thompson or greedy."
    )
    policy_epsilon: float = Field(0.1, ge=0, le=1, description="epsilon_greedy: share of answers that explore.")
    policy_temperature: float = Field(0.1, gt=0, description="softmax: temperature over scores in [0, 1].")
    policy_thompson_cells: int = Field(
        256, ge=16, le=65_536, description="thompson: cells of [0, 1] over which each candidate's chance of coming first "
                                           "(its logged propensity) is integrated.")
    policy_thompson_concentration: float = Field(
        10.0, gt=0, description="thompson: Beta concentration around a score when no posteriors are given. Not used by "
                                "`/score`, which always draws from the popularity prior's posteriors (every tip has one)."
    )
    policy_seed: int | None = Field(
        None, description="Seed of the exploration policy's random numbers, with the number of decisions in DECISIONS "
                          "at the start: a restart does not draw the last start's numbers again. Unset: random.")
    rewards: dict[str, float] = Field(
        DEFAULT_REWARDS,
        description="Reward per reaction, JSON, e.g. `{\"acted\": 1, \"liked\": 0.8}`; reactions left out keep their default.",
    )
    score_max_body_bytes: int = Field(262_144, ge=1024, description="Larger `/score` bodies get 413.")
    feature_cache_users: int = Field(
        200_000, ge=0,
        description="Users whose profile feature snapshot `/score` keeps (~1.3 KB each); a snapshot is reused while no "
                    "event for the user arrives and no window edge passes, so values stay exact. 0: evaluate every request.",
    )
    decision_queue_max: int = Field(
        20_000, ge=1, description="Decisions waiting for JetStream; when full, `/score` waits, then answers 503."
    )
    decision_queue_mb: float = Field(
        256.0, gt=0, description="Memory for the decisions waiting for JetStream (their bytes); when full, `/score` "
                                 "waits, then answers 503, as for `TIPSTREAM_DECISION_QUEUE_MAX` (a caller's large "
                                 "requests make large decisions: up to ~230 KB each)."
    )
    spool_reserve_mb: float = Field(
        8.0, ge=0, le=MAX_SPOOL_RESERVE_MB,
        description="Disk held in TIPSTREAM_DATA_DIR (`spool-reserve`) for the decisions JetStream has not "
                    "stored at a stop, should the disk be full then: 8 MB keeps ~3,600. 0: none held."
    )
    decision_enqueue_timeout_s: float = Field(
        2.0, ge=0, description="How long `/score` waits for room in a full decision queue before its 503."
    )
    idle_user_days: float = Field(
        32, ge=0,
        description="A user with no event for this many days (of the log's time) is kept in the database only, "
                    "loaded back by their next event or request; while the database is away such an event holds up "
                    "its stream. 0: every user stays in memory.",
    )
    max_unwritten_decisions: int = Field(
        500_000, ge=1,
        description="`/score` answers 503 while this many decisions' `tip_scores` rows wait for a checkpoint (the "
                    "database is away; ~1 KB each), instead of holding ever more of them in memory, and asks for "
                    "that checkpoint at once.",
    )
    decision_batch: int = Field(512, ge=1, le=10_000, description="Decisions written to NATS in one buffer.")
    decision_window: int = Field(4_000, ge=1, description="Decisions published but not yet acknowledged by JetStream, at most.")
    learner_join_cache_mb: float = Field(
        256.0, gt=0, description="Memory for decisions awaiting feedback; the oldest leave first."
    )
    learner_join_window_s: float = Field(
        3 * 86_400.0, gt=0, description="Feedback later than this after its decision is counted as expired."
    )
    tip_scores_max_age_days: float = Field(
        90.0, ge=0,
        description="`tip_scores` rows (the decision log in SQL) older than this are deleted, oldest first, every "
                    "minute (0: kept for ever). Longer than the join window. Model cards read back this far.",
    )
    learner_pending_max: int = Field(
        100_000, ge=1, description="Feedback waiting for its decision to arrive (bounded; the oldest give up first)."
    )
    learner_pending_max_age_s: float = Field(
        600.0, gt=0, description="Feedback whose decision has not arrived after this long is counted as unknown."
    )
    silence_reward: float | None = Field(
        None, ge=0, le=1,
        description="Reward learned for a decision nobody reacted to within `TIPSTREAM_SILENCE_AFTER_S`, credited to "
                    "its first tip (Azure Personalizer's default reward), e.g. 0. Unset: only reactions teach the "
                    "models; set it when your app publishes the reactions it sees (clicks) and not the ignored tips.",
    )
    silence_after_s: float = Field(
        600.0, gt=0,
        description="How long a decision waits for a reaction before `TIPSTREAM_SILENCE_REWARD` is learned for it, in "
                    "the time JetStream stores feedback; a reaction to that tip stored later is counted `late` and not "
                    "learned. Shorter than the join window.",
    )
    model_snapshot_every_s: float = Field(
        5.0, ge=0,
        description="Models are saved with the checkpoint at most this often (further apart when copying and "
                    "serialising them would take over 1% of the time); a restart replays the feedback since.",
    )
    card_eval_max_rewards: int = Field(
        50_000, ge=1, le=MAX_SQL_INT,
        description="Rewards from the decision log used for a model card's progressive validation."
    )

    @field_validator("admin_token")
    @classmethod
    def _hard_to_guess(cls, value: SecretStr | None) -> SecretStr | None:
        secret = value.get_secret_value().strip() if value is not None else ""
        if not all(" " <= c <= "~" for c in secret):
            # No HTTP header carries it as it is (Starlette reads headers as Latin-1): the server started, and
            # every admin change was refused as a wrong token, whatever the client sent.
            raise ValueError(
                "holds a character an HTTP header cannot carry (a control character, or one outside ASCII), so no "
                "client could ever send it: use printable ASCII, e.g. from "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if secret and len(secret) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"is {len(secret)} characters long, short enough to guess; an admin token needs at least "
                f"{MIN_ADMIN_TOKEN_CHARS}: make one with `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return value

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(DEFAULT_REWARDS))
        if unknown:
            raise ValueError(
                f"names unknown reactions {unknown}; known: {', '.join(DEFAULT_REWARDS)}.")
        bad = {k: v for k, v in value.items() if not 0.0 <= float(v) <= 1.0}
        if bad:
            raise ValueError(f"rewards must be between 0 and 1; got {bad}.")
        return {**DEFAULT_REWARDS, **{k: float(v) for k, v in value.items()}}

    def model_params(self) -> dict[str, Any]:
        """`TipModel` parameters of the models registered on the first start."""
        return {"optimizer": self.model_optimizer, "learning_rate": self.model_learning_rate,
                "user_forgetting": self.model_user_forgetting, "user_ttl_days": self.model_user_ttl_days,
                "max_values": self.model_max_values}

    def policy_params(self) -> dict[str, Any]:
        """The settings the chosen policy takes, by its parameter names."""
        given = {"epsilon": self.policy_epsilon, "temperature": self.policy_temperature,
                 "cells": self.policy_thompson_cells, "concentration": self.policy_thompson_concentration}
        return {name: given[name] for name in POLICY_PARAMS[self.policy]}

    @field_validator("tip_scores_max_age_days")
    @classmethod
    def _outlives_join_window(cls, value: float, info: ValidationInfo) -> float:
        # Rows still inside the join window may earn a reward: deleted, readers of tip_scores miss them until it comes.
        window_s = info.data.get("learner_join_window_s")
        if value and window_s is not None and value * 86_400 <= window_s:
            raise ValueError(
                f"must be longer than the join window (TIPSTREAM_LEARNER_JOIN_WINDOW_S={window_s:g}, "
                f"{window_s / 86_400:g} days), in which a reward may still come for a decision; or 0 to keep every row")
        return value

    @field_validator("silence_after_s")
    @classmethod
    def _within_join_window(cls, value: float, info: ValidationInfo) -> float:
        window_s = info.data.get("learner_join_window_s")
        # Only with silence learned: off (the default), the wait is unused, and a join window under
        # the default wait (10 minutes) must still start, as it did before silence was learned.
        if info.data.get("silence_reward") is not None and window_s is not None and value >= window_s:
            raise ValueError(
                f"must be shorter than the join window (TIPSTREAM_LEARNER_JOIN_WINDOW_S={window_s:g}), which holds "
                "the decision until its silence is learned")
        return value

    @field_validator("duplicate_window_s", "dlq_max_age_days")
    @classmethod
    def _window_within_retention(cls, value: float, info: ValidationInfo) -> float:
        # JetStream refuses a stream whose duplicate window outlasts its retention, and the start
        # ended with its words only ("duplicates window can not be larger then max age"), no setting named.
        if info.field_name == "duplicate_window_s":
            days = info.data.get("stream_max_age_days")
            if days is not None and value > days * 86_400:
                raise ValueError(f"JetStream's duplicate window must not outlast the streams' retention "
                                 f"(TIPSTREAM_STREAM_MAX_AGE_DAYS={days:g}, {days * 86_400:g} s)")
        else:
            window_s = info.data.get("duplicate_window_s")
            if window_s is not None and value * 86_400 < window_s:
                raise ValueError(f"the DLQ's retention must be at least JetStream's duplicate window "
                                 f"(TIPSTREAM_DUPLICATE_WINDOW_S={window_s:g} s, {window_s / 86_400:g} days)")
        return value

    @field_validator("data_dir", "host", mode="before")
    @classmethod
    def _not_blank(cls, value: Any, info: ValidationInfo) -> Any:
        # Blank (`TIPSTREAM_DATA_DIR=$DIR` with DIR unset) read as the working directory, which then held the
        # database and the NATS store; a blank host bound every interface and printed `http://:8000`.
        if isinstance(value, str) and not value.strip():
            example = "data" if info.field_name == "data_dir" else "127.0.0.1, or 0.0.0.0 for every interface"
            raise ValueError(f"must not be blank (e.g. {example})")
        # ' /srv/tipstream' was a directory of that name under the working directory, which then held the
        # database and the NATS store, without a word.
        if info.field_name == "data_dir" and isinstance(value, str) and value != value.strip():
            raise ValueError(f"has spaces or a line break around it: remove them (e.g. {value.strip()!r})")
        return value

    @field_validator("database_url")
    @classmethod
    def _on_disk(cls, value: str | None) -> str | None:
        # A SQLite database in memory (SQLAlchemy's `sqlite://`) is each connection's own: the start ended with
        # a traceback (its objects used from another thread), and a start that got further would lose it at the stop.
        if value and _SQLITE_IN_MEMORY.fullmatch(value.strip()):
            raise ValueError("is a SQLite database in memory, which the service cannot share between its threads "
                             "and would lose at each stop: name a file (sqlite:////srv/tipstream/tipstream.db), or "
                             "unset it for SQLite under TIPSTREAM_DATA_DIR")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for name in (part.strip() for part in value.split(",")):
            # A URL or a port there matched no Host header ever: every request through the proxy was refused.
            if "/" in name or (":" in name and not name.startswith("[")) or " " in name:
                raise ValueError(f"{name!r} is not a host name: give names only, without scheme or port "
                                 "(e.g. tips.example.com,10.0.0.5)")
        return value

    @field_validator("nats_url")
    @classmethod
    def _nats_scheme(cls, value: str | None) -> str | None:
        # Empty reads as unset (the embedded nats-server). Spaces or commas only named no server, and nats-py,
        # told to retry for ever, spun on its empty list without yielding: the start hung at a full core, and
        # not even SIGTERM stopped it.
        problem = nats_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key")
    @classmethod
    def _nats_files(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return value
        if "nats_url" in info.data and not info.data["nats_url"]:
            raise ValueError("is for a NATS server of your own, and NATS_URL is unset (the embedded nats-server "
                             "takes a token of its own, without TLS): set NATS_URL, or unset this")
        if info.field_name == "nats_tls_key" and info.data.get("nats_tls_cert") is None:
            raise ValueError("is a client certificate's key, and TIPSTREAM_NATS_TLS_CERT, the certificate, is unset")
        problem = unreadable_file(value)
        if problem is None and info.field_name == "nats_creds":
            problem = creds_problem(value.read_bytes())
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("stream_replicas")
    @classmethod
    def _replicas_need_a_cluster(cls, value: int, info: ValidationInfo) -> int:
        # The embedded server is a single one, which refuses a stream of more copies (its words only).
        if value > 1 and "nats_url" in info.data and not info.data["nats_url"]:
            raise ValueError(f"the embedded nats-server (NATS_URL unset) is a single server, which keeps one copy of a "
                             f"stream: set NATS_URL to a NATS cluster of at least {value} nodes, or "
                             "TIPSTREAM_STREAM_REPLICAS to 1")
        return value

    @field_validator("stream_max_bytes")
    @classmethod
    def _byte_limit(cls, value: int) -> int:
        # NATS reads 0 and any negative as no limit: TIPSTREAM_STREAM_MAX_BYTES=0 started a service
        # whose streams grew without bound, and not as "0: never" reads elsewhere in this table.
        if value == 0 or value < -1:
            raise ValueError("must be -1 (no limit) or a number of bytes above 0")
        return value

    @field_validator("max_event_bytes", "score_max_body_bytes")
    @classmethod
    def _message_fits_a_stream(cls, value: int, info: ValidationInfo) -> int:
        # JetStream drops a message larger than a stream's byte limit as it stores it, acknowledged all the same:
        # TIPSTREAM_STREAM_MAX_BYTES=100 (bytes read as kilobytes, say) started a service that lost every event
        # before ingest read it, without a word. A decision is about as large as the /score request it answers.
        limit = info.data.get("stream_max_bytes")
        if limit is not None and 0 < limit < value:
            what = "an event" if info.field_name == "max_event_bytes" else "a decision (as large as its /score request)"
            raise ValueError(f"is more than a stream holds (TIPSTREAM_STREAM_MAX_BYTES={limit}): JetStream drops "
                             f"{what} larger than its stream's byte limit as it stores it, before it is read. Raise "
                             f"TIPSTREAM_STREAM_MAX_BYTES to {value} or more (-1: no limit), or lower this")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(
                "not a log level; use debug, info, warning, error or critical."
            )
        return level

    @property
    def checkpoint_in_process(self) -> bool:
        """Whether checkpoints run in a writer process (`checkpoint_writer`, with `auto` resolved)."""
        if self.checkpoint_writer == "auto":
            return len(os.sched_getaffinity(0)) >= 4 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) >= 4
        return self.checkpoint_writer == "process"

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tipstream.db').resolve()}"


def env_name(field_name: str) -> str:
    """The environment variable that sets a field (its first alias, else the prefixed name).

    >>> env_name("nats_url"), env_name("port")
    ('NATS_URL', 'TIPSTREAM_PORT')
    """
    alias = Settings.model_fields[field_name].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"TIPSTREAM_{field_name.upper()}"


def default_text(field_name: str) -> str:
    """A field's default as the README's table shows it: `value`, or unset; a JSON setting's as
    JSON, so that it can be copied into the variable (Python's repr has single quotes).

    >>> default_text("port"), default_text("nats_url"), default_text("rewards")[:16]
    ('`8000`', 'unset', '`{"acted": 1.0, ')
    """
    default = Settings.model_fields[field_name].default
    if default is None:
        return "unset"
    return f"`{json.dumps(default)}`" if isinstance(default, dict) else f"`{default}`"


def settings_help() -> str:
    """Each setting for `tipstream run --help`: variable, default, and its description's first
    sentence, with what unset means where it says (the README's table has the rest).

    >>> lines = settings_help().splitlines()
    >>> print(lines[lines.index("  DATABASE_URL=unset") + 1].strip())
    SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db`. Unset: SQLite at `<data_dir>/tipstream.db`.
    """
    lines = []
    for name, field in Settings.model_fields.items():
        sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", field.description or "")
        meaning = " ".join(sentences[:1] + [s for s in sentences[1:] if s.startswith("Unset:")])
        lines.append(f"  {env_name(name)}={default_text(name).strip('`')}\n      {meaning}")
    return "\n".join(lines)


SECRET_FIELDS = {name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)}


def _in_environ(variable: str) -> tuple[str, str] | None:
    """(name, value) of `variable` in the environment, in any case: settings are read regardless of
    it, and an error for `tipstream_policy=ucb` told of a default and said to unset nothing. Of two
    spellings the last one is read (pydantic-settings folds the environment to lower case in order),
    so it is the one named: the first named `TIPSTREAM_PORT=8080`, valid, for `tipstream_port=eighty`."""
    upper = variable.upper()
    found = None
    for name, value in os.environ.items():
        if name.upper() == upper:
            found = name, value
    return found


class SettingsError(ValueError):
    """A setting's value is wrong: the message names each variable and what it needs."""


FIX_IT = "Fix it, or unset it for its default (the README's settings table lists them all)."
FIX_DEFAULT = ("A default refused is refused for another setting's value: set this one, or change that one (the "
               "README's settings table lists them all).")


def load_settings() -> Settings:
    """Settings from the environment (and `.env`), or a SettingsError naming each bad variable.

    >>> import os
    >>> os.environ["TIPSTREAM_PORT"] = "eighty"
    >>> try:
    ...     load_settings()
    ... except SettingsError as error:
    ...     print(error)
    TIPSTREAM_PORT='eighty': Input should be a valid integer, unable to parse string as an integer
    Fix it, or unset it for its default (the README's settings table lists them all).
    >>> del os.environ["TIPSTREAM_PORT"]
    >>> os.environ["TIPSTREAM_REWARDS"] = "acted=1"
    >>> try:
    ...     load_settings()
    ... except SettingsError as error:
    ...     print(error)
    TIPSTREAM_REWARDS='acted=1': not valid JSON; Reward per reaction, JSON, e.g. `{"acted": 1, "liked": 0.8}`; reactions left out keep their default.
    Fix it, or unset it for its default (the README's settings table lists them all).
    >>> del os.environ["TIPSTREAM_REWARDS"]
    """
    env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    try:  # pydantic-settings' own read of it was a PermissionError or UnicodeDecodeError traceback
        if env_file.is_file():
            env_file.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        raise SettingsError(
            f"Cannot read {env_file.resolve()}, which tipstream reads settings from ({error}): it is read from the "
            "working directory as UTF-8 lines of NAME=value (an editor may have saved it as UTF-16). Make it "
            "readable by this user and UTF-8, or remove it and set the variables in the environment.") from None
    try:
        return Settings()
    except SourceError as error:  # a JSON-valued setting that is not JSON: pydantic-settings says only which
        found = re.search(r'field "(\w+)"', str(error))
        if found is None or found.group(1) not in Settings.model_fields:
            raise
        variable = env_name(found.group(1))
        written = _in_environ(variable)
        if written is not None:
            variable = written[0]
        given = f"={written[1]!r}" if written is not None else " (in .env)"
        raise SettingsError(f"{variable}{given}: not valid JSON; {Settings.model_fields[found.group(1)].description}\n"
                            f"{FIX_IT}") from None
    except ValidationError as error:
        lines, fixes = [], []
        env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
        in_dotenv = {k.lower() for k in dotenv_values(env_file)} if env_file.is_file() else set()
        for problem in error.errors(include_url=False):
            name = str(problem["loc"][0]) if problem["loc"] else "?"
            variable = name if name.isupper() else f"TIPSTREAM_{name.upper()}"
            written = _in_environ(variable)
            if written is not None:  # named as the operator wrote it: `tipstream_policy` is read too
                variable = written[0]
            # As the operator wrote it: a JSON setting's input is the parsed value, shown as Python wrote it.
            value = written[1] if written is not None else problem["input"]
            if variable.upper() == "NATS_URL":  # it may carry a password or token
                from app.start_errors import shown_url

                value = shown_url(str(value))
            elif name in SECRET_FIELDS:  # an error must not print it into logs
                value = "**********"
            if written is not None:
                given, fix = repr(value), FIX_IT
            elif variable.lower() in in_dotenv:
                given, fix = f"{value!r} (in .env)", FIX_IT
            else:  # refused for another setting's value (a cross-check): "unset it" cannot fix it
                given, fix = f"{value!r} (its default)", FIX_DEFAULT
            if fix not in fixes:
                fixes.append(fix)
            inside = "".join(f"{part}: " for part in problem["loc"][1:])  # which entry of a JSON setting
            lines.append(f"{variable}={given}: {inside}{problem['msg'].removeprefix('Value error, ')}")
        lines.extend(fixes)
        raise SettingsError("\n".join(lines)) from None


# The settings read without the TIPSTREAM_ prefix.
UNPREFIXED_SETTINGS = ("NATS_URL", "DATABASE_URL")
# The test harness's own variables (tests/conftest.py, .ci/run), not the service's.
NOT_SETTINGS_PREFIXES = ("TIPSTREAM_TEST_", "TIPSTREAM_REQUIRE_POSTGRES")


def is_setting_variable(variable: str) -> bool:
    """Whether an environment variable is one the service reads its settings from (or a misspelt one):
    what the test suite and the benches keep from the services they start.

    >>> [is_setting_variable(v) for v in ("TIPSTREAM_POLICY", "database_url", "TIPSTREAM_TEST_NATS_SERVER", "PATH")]
    [True, True, False, False]
    """
    upper = variable.upper()  # pydantic-settings matches names whatever their case
    return (upper in UNPREFIXED_SETTINGS or upper.startswith("TIPSTREAM_")) and not upper.startswith(
        NOT_SETTINGS_PREFIXES)


def unknown_variables(environ: dict[str, str] | None = None, env_file: Path = Path(".env")) -> list[str]:
    """A line for each `TIPSTREAM_*` variable (environment or `.env`) that is no setting, naming
    the setting it was likely meant for: pydantic-settings ignores it, so a misspelt setting
    kept its default without a word. So too for a URL's name close to NATS_URL or DATABASE_URL,
    while that one is unset.

    >>> unknown_variables({"TIPSTREAM_POLICY_EPSILLON": "0.5", "TIPSTREAM_PORT": "8000"}, Path("/nonexistent"))
    ['TIPSTREAM_POLICY_EPSILLON is not a tipstream setting and is ignored (did you mean TIPSTREAM_POLICY_EPSILON?)']
    """
    known = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        known.update(alias.choices if isinstance(alias, AliasChoices) else [f"TIPSTREAM_{name.upper()}"])
    given = set(os.environ if environ is None else environ)
    if env_file.is_file():
        given.update(k for k in dotenv_values(env_file) if k)
    lines = []
    given_upper = {variable.upper() for variable in given}
    for variable in sorted(given):
        upper = variable.upper()  # pydantic-settings matches names whatever their case
        if not upper.startswith("TIPSTREAM_"):
            # The two settings without the prefix: DATABSE_URL=postgresql://... ran the service on SQLite, without
            # a word. Only a URL's name, and only while the setting it is close to is unset: a DATABASE_USER, or
            # another program's URL beside the right one, is no typo.
            close = (difflib.get_close_matches(upper, UNPREFIXED_SETTINGS, n=1, cutoff=0.85)
                     if upper.endswith(("URL", "URI")) and upper not in known else [])
            if close and not given_upper & {close[0], f"TIPSTREAM_{close[0]}"}:
                lines.append(f"{variable} is not a tipstream setting and is ignored (did you mean {close[0]}?)")
            continue
        if upper in known or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        # Matched without the prefix they share, which made every name look close. NATS_URL and DATABASE_URL
        # are read as TIPSTREAM_NATS_URL and TIPSTREAM_DATABASE_URL too: left out, TIPSTREAM_DATABASE_URI was
        # named with no suggestion, and the service ran on SQLite.
        meant = {n.upper(): env_name(n) for n in Settings.model_fields}
        close = difflib.get_close_matches(upper[len("TIPSTREAM_"):], sorted(meant), n=1, cutoff=0.75)
        hint = (f" (did you mean {meant[close[0]]}?)" if close
                else " (the README's settings table lists them all)")
        lines.append(f"{variable} is not a tipstream setting and is ignored{hint}")
    return lines


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return load_settings()
