"""erasures_earlier: a request to forget a user that was done, kept when the user is asked for again.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import context, op

from migrations import DowngradeRefused

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
    # Releases of 0008 told the operator to drop the table themselves: one who did is downgraded.
    if not sa.inspect(op.get_bind()).has_table("erasures_earlier"):
        return
    # Down to base is `tipstream migrate base` before a rebuild, which drops the records of erasures too, as the
    # docs/operations.md says (keep them first); a release before this one would lose only these, silently.
    if context.get_revision_argument() is None:  # alembic names base so
        op.drop_table("erasures_earlier")
        return
    # The record that each of those users was forgotten: the release before kept only the last one.
    users = op.get_bind().execute(sa.text("SELECT user_id FROM erasures_earlier ORDER BY user_id")).scalars().all()
    if users:
        named = list(dict.fromkeys(users))
        shown = ", ".join(repr(user_id) for user_id in named[:5]) + (", ..." if len(named) > 5 else "")
        raise DowngradeRefused(
            f"erasures_earlier holds {len(users)} record(s) of users forgotten before they were asked for again "
            f"({shown}), which the release before this one does not keep. Keep them first (`tipstream users "
            "export <id>` shows a user's; SELECT * FROM erasures_earlier), then delete them yourself "
            "(DELETE FROM erasures_earlier) and downgrade again.")
    op.drop_table("erasures_earlier")
