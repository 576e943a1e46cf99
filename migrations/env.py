"""Alembic environment for the spillover outbox.

The database comes from, in order: a connection handed over in
``config.attributes["connection"]`` (``spillover db upgrade``, tests), the
``sqlalchemy.url`` option, then ``SPILLOVER_DATABASE_URL``. Our own version
table keeps us out of the host application's ``alembic_version``.

Upgrades are serialized (``spillover/upgrade_lock.py``), and each revision commits on
its own (``transaction_per_migration``): a table lock taken by one revision's DDL is
not held while the next revision builds its indexes.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from spillover import settings
from spillover.outbox import create_outbox_engine
from spillover.schema import VERSION_TABLE, metadata
from spillover.upgrade_lock import upgrade_lock

config = context.config


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Only our tables: the outbox may share a database with the application."""
    if type_ == "table":
        return bool(name in metadata.tables)
    return True


def run_with(connection: Connection) -> None:
    with upgrade_lock(connection.engine) as still_held:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=VERSION_TABLE,
            include_object=include_object,
            render_as_batch=connection.dialect.name == "sqlite",
            transaction_per_migration=True,
            on_version_apply=lambda **_: still_held(),  # a lost lock stops the upgrade between revisions
        )
        with context.begin_transaction():
            context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or settings.database_url()
    engine = create_outbox_engine(url)  # an SQLite file is created owner-only
    with engine.connect() as connection:
        run_with(connection)
    engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or settings.database_url(),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
