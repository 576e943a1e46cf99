"""Rows know their Redis (``target``); one replay lease per target and queue; producers find their rows.

Existing rows get the target a replayer with default settings derives
(``SPILLOVER_TARGET``, else ``SPILLOVER_REDIS_URL``, else redis://localhost:6379/0,
read where the migration runs), so an upgrade in the middle of an outage loses
nothing: that replayer drains them. The global lease row is replaced by a table
of per-queue leases; replayers of the previous version then find no lease table
and stop draining instead of racing the new ones.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

from spillover.redis_side import default_target

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


# SQLite rebuilds the table for these changes: keep AUTOINCREMENT, and the sequence with it.
REBUILD = {"table_kwargs": {"sqlite_autoincrement": True}}


def upgrade() -> None:
    with op.batch_alter_table("spillover_outbox") as batch:
        batch.add_column(sa.Column("target", sa.String(255), nullable=True))
    op.execute(sa.text("UPDATE spillover_outbox SET target = :target").bindparams(target=default_target()))
    with keep_sqlite_sequence(), op.batch_alter_table("spillover_outbox", **REBUILD) as batch:
        batch.alter_column("target", existing_type=sa.String(255), nullable=False)
        batch.drop_index("ix_spillover_outbox_queue_state_id")
        batch.create_index("ix_spillover_outbox_target_queue_state_id", ["target", "queue", "state", "id"])
        batch.create_index("ix_spillover_outbox_producer_state_id", ["producer", "state", "id"])
    op.drop_table("spillover_lease")
    op.create_table(
        "spillover_queue_lease",
        sa.Column("target", sa.String(255), primary_key=True),
        sa.Column("queue", sa.String(255), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("spillover_queue_lease")
    op.create_table(
        "spillover_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    with keep_sqlite_sequence(), op.batch_alter_table("spillover_outbox", **REBUILD) as batch:
        batch.drop_index("ix_spillover_outbox_target_queue_state_id")
        batch.drop_index("ix_spillover_outbox_producer_state_id")
        batch.create_index("ix_spillover_outbox_queue_state_id", ["queue", "state", "id"])
        batch.drop_column("target")


@contextmanager
def keep_sqlite_sequence() -> Iterator[None]:
    """Row ids must never be reused, also after SQLite copies the table into a new one."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    query = sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'spillover_outbox'")
    before = bind.execute(query).scalar()
    yield
    if before is not None:
        after = bind.execute(query).scalar()
        if after is None:
            op.execute(sa.text(f"INSERT INTO sqlite_sequence (name, seq) VALUES ('spillover_outbox', {int(before)})"))
        elif after < before:
            op.execute(sa.text(f"UPDATE sqlite_sequence SET seq = {int(before)} WHERE name = 'spillover_outbox'"))
