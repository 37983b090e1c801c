"""SQLite: a rewarded decision's `tip_scores.created_at` as the UTC instant of its `ts`.

Before, SQLite kept a decision's wall-clock time in the user's own offset, without the offset,
so rows of users in different zones sorted out of order (evaluation reads the newest rewarded
decisions by `created_at`). Rows are now written in UTC (`db.upsert`). Rewarded rows carry the
decision event, whose `ts` has the offset: those are rewritten here. An unrewarded row has no
event to read the offset from; it is rewritten when a reward reaches it. PostgreSQL stored
the instants all along: nothing to do there.

Revision ID: 0004
Revises: 0003
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# strftime reads the ISO time with its offset and gives UTC; '000' pads to SQLAlchemy's microseconds.
IN_UTC = "strftime('%Y-%m-%d %H:%M:%f', json_extract(decision, '$.ts'))"
WITH_TS = "decision IS NOT NULL AND json_valid(decision) AND json_extract(decision, '$.ts') IS NOT NULL"


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(f"UPDATE tip_scores SET created_at = {IN_UTC} || '000' WHERE {WITH_TS} AND {IN_UTC} IS NOT NULL")
    # SQLite reads offsets only up to 14:59, and `context.now` may carry one up to 23:59: its
    # strftime gives NULL, which the NOT NULL column refused, failing the whole upgrade.
    unread = op.get_bind().execute(sa.text(
        f"SELECT decision_id, json_extract(decision, '$.ts') FROM tip_scores WHERE {WITH_TS} AND {IN_UTC} IS NULL"))
    for decision_id, ts in unread.all():
        created = _in_utc(ts)
        if created is not None:  # else, as an unrewarded row: left as it was
            op.execute(sa.text("UPDATE tip_scores SET created_at = :created WHERE decision_id = :id")
                       .bindparams(created=created, id=decision_id))


def _in_utc(ts: object) -> str | None:
    """`ts` as the SQL above writes it (milliseconds, UTC; "...+23:59" gives 23:59 earlier), or
    None when it is no ISO time with an offset."""
    try:
        at = datetime.fromisoformat(ts) if isinstance(ts, str) else None
    except ValueError:
        return None
    if at is None or at.tzinfo is None:
        return None
    at = at.astimezone(UTC)
    return f"{at:%Y-%m-%d %H:%M:%S}.{at.microsecond // 1000:03d}000"


def downgrade() -> None:
    pass  # UTC instants read back as well as wall-clock times did under 0003
