"""How tipstream logs: `tipstream run` (and `migrate`), and every process the service spawns."""

from __future__ import annotations

import logging

from app.embedded_nats import die_with_service

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """The root logger at `level` (`Settings.log_level`), its lines in FORMAT on stderr."""
    logging.basicConfig(level=level.upper(), format=FORMAT)
    if level != "debug":  # alembic (1.20 here) logs setting up each of its plugins at info: seven lines of noise per start
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        # And how it opens the database at each read of its revision: `tipstream migrate` on a database at head said
        # "Context impl PostgresqlImpl." and "Will assume transactional DDL." four times, and nothing else of its own.
        logging.getLogger("alembic.runtime.migration").addFilter(_not_context_lines)


def _not_context_lines(record: logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith(("Context impl ", "Will assume ")))


def start_spawned(service_pid: int, level: str) -> None:
    """First in a process the service spawns (a pool's initializer): it dies with the service, and logs as the
    service does. A spawned process starts with no logging set up: a line it logged reached the service's
    stderr as the bare message (logging's last resort, warnings and worse only), without time, level or logger."""
    die_with_service(service_pid)
    configure_logging(level)
