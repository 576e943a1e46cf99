"""Delivery ids on rows and epochs on queue leases: exactly once without week-long markers.

- ``spillover_outbox.delivery``: the id of the one enqueue the row stands for. The delivery
  marker in Redis is keyed by it, not by the job id, so an application may enqueue the same
  job id again (as RQ allows) and a marker lives only while that delivery is in doubt.
  NULL: written by an older release; its marker is keyed by the job id, as that release set it.
- ``spillover_queue_lease.epoch``: the fencing token of the queue's current holder, raised in
  Redis before its first batch so that a batch of an older holder writes nothing. Kept when
  a lease is given back, so that it only grows.

Both columns are nullable and added without a default: catalog-only on Postgres and SQLite,
and writers of the previous release (which do not name them) go on as before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

from spillover import ddl

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ddl.add_column("spillover_outbox", "delivery", "VARCHAR(40)")
    ddl.add_column("spillover_queue_lease", "epoch", "BIGINT")


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35+): a batch rebuild would lose the outbox's AUTOINCREMENT.
    op.execute("ALTER TABLE spillover_queue_lease DROP COLUMN epoch")
    op.execute("ALTER TABLE spillover_outbox DROP COLUMN delivery")
