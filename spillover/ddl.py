"""Schema changes that are safe while producers write: what the migrations are made of.

A migration runs during a deploy, with the previous release still spilling into the
outbox (see ``migrations/versions/__init__.py`` for the rule). So every step here:

- is **idempotent**: a migration cut short (a killed pod) runs again from the start;
- holds the outbox's table lock for milliseconds: catalog-only DDL, committed before the
  revision builds its indexes outside the transaction;
- holds locks **briefly**: on Postgres a DDL statement that needs the table's lock gives up
  after ``lock_timeout`` and is retried (a DDL waiting behind a long transaction would
  otherwise queue every producer's INSERT behind itself), and indexes are built
  ``CONCURRENTLY``, outside any transaction, with an INVALID leftover of a failed build
  dropped first; on SQLite nothing rebuilds the table (a rebuild holds the write lock, and
  so every spill, for as long as it copies the rows).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.exc import DBAPIError

from . import settings

log = logging.getLogger("spillover.migrate")

#: How long one DDL statement may wait for its table lock on Postgres before it is retried.
LOCK_TIMEOUT = "2s"
_LOCK_NOT_AVAILABLE = "55P03"
#: Seconds an SQLite migration leaves the write lock free after an index build (> the busy handler's longest sleep).
SQLITE_WRITERS_TURN = 0.25
#: An SQLite index build shorter than this (s) is followed by neither the checkpoint nor the pause.
SQLITE_LONG_BUILD = 0.05


def _is_postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def columns(table: str) -> dict[str, bool]:
    """The columns ``table`` has now, with whether each is NOT NULL."""
    found = sa.inspect(op.get_bind()).get_columns(table)
    return {column["name"]: not column["nullable"] for column in found}


def has_table(table: str) -> bool:
    return bool(sa.inspect(op.get_bind()).has_table(table))


def run_briefly(sql: str) -> None:
    """Run one DDL statement that takes a table lock; on Postgres, never wait for it long.

    Each try is a savepoint with ``lock_timeout``: a try that times out rolls back alone and
    is retried after a pause, in which the producers' INSERTs queued behind it go through.
    """
    bind = op.get_bind()
    if not _is_postgres():
        bind.exec_driver_sql(sql)
        return
    deadline = time.monotonic() + settings.upgrade_lock_wait()
    pause = 0.1
    while True:
        try:
            with bind.begin_nested():
                bind.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                bind.exec_driver_sql(sql)
                bind.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")  # outlives the savepoint otherwise
            return
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)  # psycopg 3, psycopg2
            if code != _LOCK_NOT_AVAILABLE or time.monotonic() > deadline:
                raise
            log.warning("waiting for a lock on the outbox (%s); retrying in %.1f s", sql.split("(")[0], pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def drop_table(table: str) -> None:
    """DROP TABLE IF EXISTS, briefly (a 0.1 replayer may hold its lease table in a transaction)."""
    if has_table(table):
        run_briefly(f"DROP TABLE IF EXISTS {table}")


def add_column(table: str, name: str, ddl_type: str) -> None:
    """ADD COLUMN, nullable with no default: O(1) on both databases, old writers unaffected."""
    if name not in columns(table):
        run_briefly(f"ALTER TABLE {table} ADD COLUMN {name} {ddl_type}")


def drop_not_null(table: str, column: str) -> None:
    """Let ``column`` take NULL again, without copying the table.

    Postgres: ALTER COLUMN DROP NOT NULL (catalog only). SQLite cannot alter a constraint,
    and a table rebuild is what must be avoided: its documented procedure for changes that
    leave the stored format alone ("Making Other Kinds Of Table Schema Changes") edits the
    CREATE TABLE text under ``writable_schema`` and bumps ``schema_version``.
    """
    if not columns(table).get(column):
        return
    if _is_postgres():
        run_briefly(f"ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL")
        return
    bind = op.get_bind()
    sql = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).scalar()
    pattern = re.compile(rf'(\n\s*"?{column}"?\s+[A-Z]+(?:\(\d+\))?)\s+NOT NULL', re.IGNORECASE)
    edited, count = pattern.subn(r"\1", str(sql))
    if count != 1:
        raise RuntimeError(f"cannot find the NOT NULL constraint of {table}.{column} in {sql!r}")
    version = int(bind.exec_driver_sql("PRAGMA schema_version").scalar_one())
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        bind.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (edited, table))
        bind.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = OFF")
    if columns(table).get(column):
        raise RuntimeError(f"{table}.{column} is still NOT NULL after the schema edit")


def _invalid_index(name: str) -> bool:
    query = sa.text(
        "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :name AND pg_catalog.pg_table_is_visible(c.oid)"
    )
    return bool(op.get_bind().execute(query, {"name": name}).scalar())


def create_index(name: str, table: str, index_columns: Sequence[str]) -> None:
    """CREATE INDEX, each in a transaction of its own; concurrently on Postgres.

    Postgres: producers keep writing while it builds. CONCURRENTLY cannot run in a transaction,
    so the migration's transaction is committed first (Alembic's ``autocommit_block``). A build
    that failed half-way leaves an INVALID index of that name, which ``IF NOT EXISTS`` would keep
    for ever: it is dropped and built again. SQLite: the build holds the write lock (every spill
    waits for it), for one index at a time rather than for all of a revision's.
    """
    listed = ", ".join(index_columns)
    with op.get_context().autocommit_block():
        if not _is_postgres():
            bind = op.get_bind()
            started = time.monotonic()
            bind.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({listed})")
            if time.monotonic() - started < SQLITE_LONG_BUILD:
                return  # a small table: nobody had time to queue behind it
            if bind.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal":
                # The new index's pages sit in the WAL: copy them into the database here, or the next
                # producer to commit runs that checkpoint (tens of MB, fsynced) inside its enqueue.
                if bind.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
                    bind.exec_driver_sql("COMMIT")  # the outbox engine's BEGIN IMMEDIATE opened one
                bind.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            # Writers queued behind the build poll for the lock (SQLite's busy handler sleeps up to
            # 100 ms at a time): let them have it before the next statement takes it again.
            time.sleep(SQLITE_WRITERS_TURN)
            return
        if _invalid_index(name):
            log.warning("index %s was left INVALID by an interrupted build: dropping it and building it again", name)
            op.get_bind().exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        op.get_bind().exec_driver_sql(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({listed})")


def drop_index(name: str) -> None:
    if not _is_postgres():
        op.get_bind().exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        return
    with op.get_context().autocommit_block():
        op.get_bind().exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
