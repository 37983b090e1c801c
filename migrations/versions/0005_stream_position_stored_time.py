"""stream_positions.stored_us: when NATS stored the message at each checkpointed position.

A start checks that a stream is the one its position was read from (not one re-created, or its
store lost or restored from an older copy). It compared the message's stored time, by the NATS
server's clock, with the checkpoint's, by this host's: a server clock running a second ahead made
every start replay every stream. The stored time of the message itself, read back at the start,
needs no clock to agree. Rows written before this have none, and are checked as before.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("stream_positions", sa.Column("stored_us", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stream_positions") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("stored_us")
