"""tip_scores: `created_at`'s index holds the rewarded rows only, by (created_at, decision_id), its one reader's order.

Its one reader is evaluation's (`app.evaluation.rewarded_decisions`): the newest rewarded decisions, by
`created_at` then `decision_id`. About nine rows in ten are never rewarded, yet each paid the index as the
checkpoint wrote it; and walking it from the newest, the read went through every row still waiting for its
reward (up to the join window's) and the unrewarded rows among the older ones, before the sort by the id. Others
that order by `created_at` read by another index: one user's rows (`app.export`) by `ix_tip_scores_user_id`,
retention by `ix_tip_scores_goes_at` (0009).

A new name: a partial index built beforehand (docs/operations.md, "Upgrading": CREATE INDEX CONCURRENTLY on a large
PostgreSQL table) is kept, and it is never taken for the old full one. The build reads the whole table and
sorts the rewarded rows (the upgrade: 0.93 s for 1.1 million rows, a tenth rewarded, on SQLite, 0.20 s on
PostgreSQL); it holds off writes to tip_scores (the checkpoint's) meanwhile, and the start waits for it.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

REWARDED = "rewarded_at IS NOT NULL"


def upgrade() -> None:
    where = sa.text(REWARDED)
    op.create_index("ix_tip_scores_rewarded", "tip_scores", ["created_at", "decision_id"], if_not_exists=True,
                    sqlite_where=where, postgresql_where=where)
    # or dropped beforehand (docs/operations.md, "Upgrading")
    op.drop_index("ix_tip_scores_created_at", "tip_scores", if_exists=True)


def downgrade() -> None:
    op.create_index("ix_tip_scores_created_at", "tip_scores", ["created_at"])
    op.drop_index("ix_tip_scores_rewarded", "tip_scores")
