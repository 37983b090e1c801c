"""tip_scores.decision holds the decision event only once a reward is credited to it.

Every decision still gets its row (what was served, to whom, by which model, with which
propensity); the full event, which only the evaluation of rewarded decisions reads, is in the
DECISIONS stream. Writing its ~2 KB for every decision was most of a checkpoint's SQL work.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tip_scores") as batch:  # SQLite alters a column by copying the table
        batch.alter_column("decision", existing_type=sa.Text, nullable=True)


def downgrade() -> None:
    # The older schema needs text in every row; the event is in the DECISIONS stream.
    op.execute("UPDATE tip_scores SET decision = 'null' WHERE decision IS NULL")
    with op.batch_alter_table("tip_scores") as batch:
        batch.alter_column("decision", existing_type=sa.Text, nullable=False)
