"""erasures_earlier: a request to forget a user that was done, kept when the user is asked for again.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures_earlier",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("dropped_at", sa.DateTime(timezone=True)),
        sa.Column("bounds", sa.JSON),
        sa.Column("report", sa.JSON),
        sa.Column("done_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    # The record that each of those users was forgotten: the release before kept only the last one.
    kept = op.get_bind().execute(sa.text("SELECT count(*) FROM erasures_earlier")).scalar_one()
    if kept:
        raise RuntimeError(
            f"erasures_earlier holds {kept} record(s) of users forgotten before they were asked for again, which "
            "the release before this one does not keep. Export them first (`tipstream users export <id>` shows a "
            "user's), then drop the table yourself (DROP TABLE erasures_earlier) and downgrade.")
    op.drop_table("erasures_earlier")
