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

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # strftime reads the ISO time with its offset and gives UTC; '000' pads to SQLAlchemy's microseconds.
    op.execute("UPDATE tip_scores SET created_at = strftime('%Y-%m-%d %H:%M:%f', json_extract(decision, '$.ts')) || '000' "
               "WHERE decision IS NOT NULL AND json_valid(decision) AND json_extract(decision, '$.ts') IS NOT NULL")


def downgrade() -> None:
    pass  # UTC instants read back as well as wall-clock times did under 0003
