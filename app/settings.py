"""Typed settings, read once from the environment (and a `.env` file if present).

Every field here is listed in the README's settings table; `tests/test_docs.py`
fails when the two drift apart.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TIPSTREAM_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    data_dir: Path = Field(
        Path("data"), description="Where the SQLite file and the embedded NATS store live."
    )
    nats_url: str | None = Field(
        None,
        validation_alias=AliasChoices("NATS_URL", "TIPSTREAM_NATS_URL"),
        description="NATS server to use. Unset: start an embedded `nats-server` under the data directory.",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "TIPSTREAM_DATABASE_URL"),
        description="SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db`. Unset: SQLite at `<data_dir>/tipstream.db`.",
    )
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    log_level: str = Field("info", description="Python log level for tipstream's loggers.")

    stream_max_age_days: float = Field(
        90.0, gt=0, description="Retention of SIGNALS, FEEDBACK and DECISIONS; replay reaches back this far."
    )
    stream_max_bytes: int = Field(
        -1, description="Byte limit per stream (-1: none). Oldest events go first when reached."
    )
    duplicate_window_s: float = Field(
        120.0, gt=0, description="JetStream's `Nats-Msg-Id` duplicate window; tipstream's own id memory covers the rest."
    )
    dlq_max_age_days: float = Field(30.0, gt=0, description="Retention of the DLQ stream.")
    max_event_bytes: int = Field(
        16_384, gt=0, description="Larger events go to the DLQ as `oversized`."
    )

    ingest_batch: int = Field(1024, ge=1, le=10_000, description="Messages per JetStream pull request.")
    checkpoint_every_events: int = Field(
        50_000, ge=1, description="Checkpoint after this many applied events..."
    )
    checkpoint_every_s: float = Field(2.0, gt=0, description="...or after this many seconds, whichever first.")
    max_uncheckpointed_events: int = Field(
        1_000_000,
        ge=1,
        description="Ingest pauses when this many events are applied but not checkpointed (the database is away).",
    )

    offline_features_every_s: float = Field(
        30.0, ge=0, description="How often changed users' rows in `user_features` are refreshed (0: never)."
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(
                f"TIPSTREAM_LOG_LEVEL={value!r} is not a log level; use debug, info, warning, error or critical."
            )
        return level

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tipstream.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
