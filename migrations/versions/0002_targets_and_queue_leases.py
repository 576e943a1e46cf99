"""Rows know their Redis (``target``); one replay lease per target and queue; producers find their rows.

Expand only (see ``versions/__init__.py``): ``target`` is added nullable and left NULL on
existing rows. A row without a target was written by a producer that did not know targets
(0.1), and is adopted by the outbox's replayer (``spillover/targets.py``): the migration does
not guess a Redis from the environment it happens to run in. The global lease table of 0.1
is replaced by per-queue leases, so 0.1 replayers stop draining instead of racing the new ones.

The first form of this revision (0.2.0) made ``target`` NOT NULL with a backfill, which
broke 0.1 producers still spilling during the deploy; 0003 repairs databases upgraded by it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from spillover import ddl

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not ddl.has_table("spillover_queue_lease"):
        op.create_table(
            "spillover_queue_lease",
            sa.Column("target", sa.String(255), primary_key=True),
            sa.Column("queue", sa.String(255), primary_key=True),
            sa.Column("holder", sa.String(128), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
        )
    # The outbox's table lock last (catalog only, O(1)); the index builds below commit this transaction first.
    ddl.add_column("spillover_outbox", "target", "VARCHAR(255)")
    ddl.create_index(
        "ix_spillover_outbox_target_queue_state_id", "spillover_outbox", ["target", "queue", "state", "id"]
    )
    ddl.create_index("ix_spillover_outbox_producer_state_id", "spillover_outbox", ["producer", "state", "id"])
    ddl.drop_index("ix_spillover_outbox_queue_state_id")
    ddl.drop_table("spillover_lease")  # last: 0.1 replayers drain until the new indexes are there


def downgrade() -> None:
    ddl.create_index("ix_spillover_outbox_queue_state_id", "spillover_outbox", ["queue", "state", "id"])
    ddl.drop_index("ix_spillover_outbox_target_queue_state_id")
    ddl.drop_index("ix_spillover_outbox_producer_state_id")
    op.drop_table("spillover_queue_lease")
    op.create_table(
        "spillover_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    # SQLite >= 3.35 drops a column in place (no rebuild); the rows keep their ids.
    op.get_bind().exec_driver_sql("ALTER TABLE spillover_outbox DROP COLUMN target")
