"""How a failed checkpoint is told: which kind of failure it is, the operator's line, and its short form.

Functions of the error alone (and the database's URL, for a full disk's fix): the checkpoint task
(`app/checkpoints.py`) decides when to retry and how often a line is logged, by the kind said here. A
database away is told as an outage that ends by itself; a setting, a full disk or a refusal by a database
that answers are told with their fix, as a retry meets the same failure until it is made.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app import db

log = logging.getLogger("tipstream.checkpoints")


def kind(error: Exception, setting: str | None) -> object:
    """What the failure lines are throttled by: one kind's told once a minute, another's at once."""
    return ("setting" if setting is not None else "disk full" if db.disk_full(error)
            else "refused" if refused(error) else type(error))


def tell(error: Exception, setting: str | None, backoff: float, more: str, url: Any) -> None:
    """Log the failure: `setting`, what `db.refused_by_setting` named; `more`, the lines left out since."""
    if setting is not None:  # the driver's line, not SQLAlchemy's statement and rows: the fix stays in view
        renewed = (" Connections opened from now on read the setting as it is then, so mending it needs no "
                   "restart." if db.refused_by_session_setting(error) else "")
        log.warning("checkpoint failed (%s): %s.%s Retrying in %.1fs; events are safe in the streams.%s",
                    db.one_line(error), setting, renewed, backoff, more)
    elif db.disk_full(error):
        log.error("checkpoint failed: %s. Checkpoints go on by "
                  "themselves once it has room, from where the last one left off, so nothing is lost or "
                  "counted twice; until then a restart replays more, and /score answers 503 once "
                  "TIPSTREAM_MAX_UNWRITTEN_DECISIONS decisions wait. Retrying in %.1fs.%s",
                  db.one_line(error, url), backoff, more)
    elif refused(error):
        # An IntegrityError (a trigger or constraint the operator added to tipstream's tables) was
        # told as an outage, 'once the database answers again': it answers, with the same refusal.
        log.error("checkpoint failed: %s; retrying in %.1fs, and events are safe in the streams. %s.%s",
                  db.refusal(error), backoff, db.NOT_AN_OUTAGE, more)
    else:
        log.warning("checkpoint failed (%s); retrying in %.1fs, or once the database answers again. "
                    "Events are safe in the streams.%s", db.briefly(error), backoff, more)


def summary(error: Exception, url: Any) -> str:
    """The failure in a line, for /readyz's `last_error` and ingest's line while it holds for checkpoints."""
    return (db.one_line(error, url) if db.disk_full(error)
            else db.refusal(error) if refused(error)
            else f"{type(error).__name__}: {error}".splitlines()[0])


def refused(error: Exception) -> bool:
    """A refusal by a database that answered, told as such (`db.refusal`): not an outage, nor a setting's or a full
    disk's, which are told with their fix."""
    return (isinstance(error, SQLAlchemyError) and not db.away(error) and not db.disk_full(error)
            and db.refused_by_setting(error) is None)

