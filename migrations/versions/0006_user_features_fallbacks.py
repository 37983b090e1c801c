"""user_features.fallbacks: which of a row's features are fallbacks, not the user's data.

A feature the fold holds no events for (an app that publishes no task events), or whose window
reaches before what it holds, takes its fallback: `/users/{id}/features` flags it, and `/score`
takes the caller's value for it, but a row of `user_features` held the fallback as a value like
any other, and whoever trained or counted from the table took `preferred_hour` 9 for the user's.
Rows written before this have none (null) until a start hands them to its first pass
(`offline.users_behind`).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("user_features", sa.Column("fallbacks", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("user_features") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("fallbacks")
