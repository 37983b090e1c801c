"""tip_scores: an index on when a row may go, so that a retention pass reads about the rows it deletes.

A pass walked `created_at`'s index, then the primary key's, from the oldest: rows made before the cut but
rewarded after it cannot go yet and sat at the front of both walks, read again by every pass (each minute)
before any row it deleted, ~1.8 million at 5,000 answers a second with a tenth rewarded an hour later. The
index is on the expression `app.db.tip_scores_goes_at` computes: the later of a row's last reward and the
earlier of when its decision was made and served (the time in its id). Spelled here as it was at this
revision: a query uses an expression's index only when it spells the expression the same.

The build reads the whole table, ~2-3 us a row (0.67 s for 300,000 rows on PostgreSQL, 0.91 s on SQLite), and
holds off writes to tip_scores (the checkpoint's) meanwhile; the start waits for it.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_SQLITE_MS = "printf('%012x', max(0, CAST(round((julianday({}) - 2440587.5) * 86400000) AS INTEGER)))"
_SQLITE_SERVED = ("CASE WHEN length(decision_id) = 30 AND substr(decision_id, 1, 2) = 'd-' AND "
                  "substr(decision_id, 3, 12) NOT GLOB '*[^0-9a-f]*' THEN substr(decision_id, 3, 12) ELSE 'g' END")
GOES_AT = {
    "sqlite": (f"max(min({_SQLITE_MS.format('created_at')}, {_SQLITE_SERVED}), "
               f"CASE WHEN rewarded_at IS NULL THEN '' ELSE {_SQLITE_MS.format('rewarded_at')} END)"),
    "postgresql": "GREATEST(LEAST(created_at, CASE WHEN length(decision_id) = 30 AND substr(decision_id, 1, 2) = 'd-' "
                  "AND ltrim(substr(decision_id, 3, 12), '0123456789abcdef') = '' THEN to_timestamp(CAST(CAST(CAST('x' || substr(decision_id, 3, 12) AS bit(48)) AS bigint) AS "
                  "double precision) / 1000) END), rewarded_at)",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    # Built beforehand (docs/operations.md, "Upgrading": CREATE INDEX CONCURRENTLY on a large PostgreSQL table): kept.
    op.create_index("ix_tip_scores_goes_at", "tip_scores", [sa.text(GOES_AT[dialect])], if_not_exists=True)
    if dialect == "postgresql":  # the expression's statistics, which the planner weighs the index by
        op.execute("ANALYZE tip_scores")


def downgrade() -> None:
    op.drop_index("ix_tip_scores_goes_at", "tip_scores")
