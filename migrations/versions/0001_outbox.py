"""Create the outbox and the replay lease.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

row_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "spillover_outbox",
        sa.Column("id", row_id, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column("job_hash", sa.LargeBinary(), nullable=False),
        sa.Column("at_front", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("scheduled_at", sa.BigInteger(), nullable=True),
        sa.Column("ambiguous", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("producer", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sqlite_autoincrement=True,  # ids never reused: replay order and resume checks rely on them
    )
    op.create_index("ix_spillover_outbox_queue_state_id", "spillover_outbox", ["queue", "state", "id"])
    op.create_index("ix_spillover_outbox_state_updated", "spillover_outbox", ["state", "updated_at"])
    op.create_table(
        "spillover_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("spillover_lease")
    op.drop_index("ix_spillover_outbox_state_updated", table_name="spillover_outbox")
    op.drop_index("ix_spillover_outbox_queue_state_id", table_name="spillover_outbox")
    op.drop_table("spillover_outbox")
