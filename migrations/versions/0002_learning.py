"""Learning: the decision log (tip_scores), the model registry and the learner's state.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tip_scores",
        sa.Column("decision_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("shadow_version", sa.String(64)),
        sa.Column("prompt_version", sa.String(64)),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("tip_id", sa.String(128), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("propensity", sa.Float, nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("rewards", sa.JSON),
        sa.Column("reward", sa.Float),
        sa.Column("rewarded_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_tip_scores_created_at", "tip_scores", ["created_at"])
    op.create_index("ix_tip_scores_user_id", "tip_scores", ["user_id"])
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("feature_names", sa.JSON, nullable=False),
        sa.Column("card", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.LargeBinary),
        sa.Column("n_learned", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_roles",
        sa.Column("role", sa.String(16), primary_key=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_rollouts",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("cards", sa.JSON, nullable=False),
    )
    op.create_table(
        "learner_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("learner_state")
    op.drop_table("model_rollouts")
    op.drop_table("model_roles")
    op.drop_table("model_versions")
    op.drop_index("ix_tip_scores_user_id", table_name="tip_scores")
    op.drop_index("ix_tip_scores_created_at", table_name="tip_scores")
    op.drop_table("tip_scores")
