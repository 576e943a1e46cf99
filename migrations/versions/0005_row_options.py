"""RQ options on outbox rows: what the push script applies beyond the job hash.

- ``spillover_outbox.options``: JSON of the RQ options a row carries that the job hash does
  not (``unique``: written only if the job id is not in Redis, decided at replay; ``group``:
  the RQ Group the job joins; ``failed_ok``: RQ 3's allow_dependency_failures rule). NULL: none
  (every row of a previous release, and most rows).

Nullable and added without a default: catalog-only on Postgres and SQLite, and writers of
the previous release (which do not name it) go on as before. A row of this release with
options written before this migration ran is refused with OutboxNotMigrated, never stored
without them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

from spillover import ddl

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ddl.add_column("spillover_outbox", "options", "TEXT")


def downgrade() -> None:
    # DROP COLUMN in place (SQLite 3.35+): a batch rebuild would lose the outbox's AUTOINCREMENT.
    op.execute("ALTER TABLE spillover_outbox DROP COLUMN options")
