"""erasures: requests to forget a user, and the record that each was done.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from migrations import DowngradeRefused

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("dropped_at", sa.DateTime(timezone=True)),
        sa.Column("bounds", sa.JSON),
        sa.Column("report", sa.JSON),
        sa.Column("done_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    # A request not done: its user's messages are still in the streams, and the table is its only record.
    pending = op.get_bind().execute(sa.text("SELECT user_id FROM erasures WHERE status != 'done'")).scalars().all()
    if pending:
        shown = ", ".join(repr(user_id) for user_id in pending[:5]) + (", ..." if len(pending) > 5 else "")
        raise DowngradeRefused(
            f"{len(pending)} request(s) to forget a user are not done ({shown}): dropping the erasures table loses "
            "them, and a rebuild from the log would bring those users back. Start the service until "
            "`tipstream users forget-status <id>` says done (tipstream_erasures_unfinished 0), then downgrade.")
    op.drop_table("erasures")
