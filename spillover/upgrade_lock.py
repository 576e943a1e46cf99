"""One schema upgrade of an outbox at a time.

Alembic does not serialize concurrent upgrades (alembic #633): four pods running
``spillover db upgrade`` on a fresh database race on CREATE TABLE and all but one fail.
Like ActiveRecord, golang-migrate, sqlx and Prisma, we take a lock first: on Postgres a
session-level advisory lock on a connection of its own (the migration's own transactions
come and go beneath it); on SQLite an exclusive ``flock`` on the directory that holds the
database (not on the file: closing any descriptor of the database file would drop this
process's POSIX locks on it, SQLite's own). The
next upgrade waits for it, a bounded time, then finds the schema at head and does nothing.

A session-level lock needs a session: through a transaction-pooling PgBouncer each statement
may land on another server connection, so the lock is checked to be held by our own backend
and the upgrade refused with a clear error if not (run migrations on a direct connection).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from . import settings
from .errors import ConfigurationError, UpgradeLocked

#: The advisory lock key: "spillovr" as a 64-bit integer, one per database.
ADVISORY_KEY = int.from_bytes(b"spillovr", "big") & 0x7FFF_FFFF_FFFF_FFFF
_HELD_BY_ME = text(
    "SELECT count(*), pg_backend_pid() FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND pid = pg_backend_pid() AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
)
_HOLDER = text(
    "SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local') "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.classid::bigint = :high AND l.objid::bigint = :low AND l.objsubid = 1"
)


@contextlib.contextmanager
def upgrade_lock(engine: Engine, wait: float | None = None) -> Iterator[Callable[[], None]]:
    """Hold the outbox's upgrade lock; UpgradeLocked after ``wait`` seconds of another holding it.

    Yields a check to call between steps: it raises if the lock was lost (its connection died).
    """
    wait = settings.upgrade_lock_wait() if wait is None else wait
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, wait) as check:
            yield check
    elif engine.dialect.name == "sqlite" and engine.url.database and not engine.url.query.get("uri"):
        with _directory_lock(os.path.dirname(os.path.abspath(engine.url.database)), wait):
            yield lambda: None
    else:
        yield lambda: None


@contextlib.contextmanager
def _advisory_lock(engine: Engine, wait: float) -> Iterator[Callable[[], None]]:
    key = {"high": ADVISORY_KEY >> 32, "low": ADVISORY_KEY & 0xFFFF_FFFF}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        deadline = time.monotonic() + wait
        take = text("SELECT pg_try_advisory_lock(:k), pg_backend_pid()")
        while True:
            taken, locking_pid = conn.execute(take, {"k": ADVISORY_KEY}).one()
            if taken:
                break
            if time.monotonic() > deadline:
                holders = ", ".join(
                    f"pid {p} ({app or 'no name'}, {addr})" for p, app, addr in conn.execute(_HOLDER, key)
                )
                raise UpgradeLocked(
                    f"another upgrade of this outbox has held its lock for over {wait:.0f} s "
                    f"({holders or 'gone now'}); let it finish, or raise SPILLOVER_UPGRADE_LOCK_WAIT"
                )
            time.sleep(0.2)

        def check() -> None:
            try:
                held, pid = conn.execute(_HELD_BY_ME, key).one()
            except DBAPIError as exc:
                raise UpgradeLocked(
                    f"the connection holding the upgrade lock was lost ({exc.orig}); run it again"
                ) from exc
            if not held or pid != locking_pid:
                raise ConfigurationError(
                    "the upgrade lock (a session-level advisory lock) was taken but is not held by this connection's "
                    "server session: is the database URL a transaction-pooling PgBouncer? Run upgrades on a direct "
                    "connection to PostgreSQL"
                )

        try:
            check()
            yield check
        finally:
            with contextlib.suppress(Exception):  # the session ending releases it anyway
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})


@contextlib.contextmanager
def _directory_lock(path: str, wait: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UpgradeLocked(
                        f"another upgrade of an outbox in {path} has held its lock for over {wait:.0f} s; "
                        "let it finish, or raise SPILLOVER_UPGRADE_LOCK_WAIT"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
