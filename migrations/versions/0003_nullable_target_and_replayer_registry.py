"""Old producers write again after 0002's first form; running replayers say what they drain.

- ``target`` takes NULL again where the first form of 0002 (0.2.0) made it NOT NULL: 0.1
  producers spilling during a deploy failed on it, and lost their jobs. On SQLite this edits
  the table's definition in place; no rows are copied.
- ``spillover_replayer``: one row per running replayer and the targets it drains, so that rows
  nobody drains are reported (``spillover status``, a gauge, a warning).

Rows that the first form of 0002 backfilled with the migration's own default target keep it;
``spillover status`` names them if no running replayer drains them, and the replayer setting
that would.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from spillover import ddl

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ddl.drop_not_null("spillover_outbox", "target")
    if not ddl.has_table("spillover_replayer"):
        op.create_table(
            "spillover_replayer",
            sa.Column("holder", sa.String(128), primary_key=True),
            sa.Column("target", sa.String(255), nullable=False),
            sa.Column("host", sa.String(64), nullable=False),
            sa.Column("redis_url", sa.String(255), nullable=False),
            sa.Column("claims", sa.Text(), nullable=False, server_default="[]"),
            sa.Column("seen_at", sa.Float(), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("spillover_replayer")  # target stays nullable: 0002 is nullable too
