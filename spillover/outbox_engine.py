"""The outbox's database connection: an Engine set up for it, and who is writing.

SQLite is set up for many producer processes at once: WAL journal,
``synchronous=FULL`` (a returned enqueue survives power loss), a busy timeout, and
``BEGIN IMMEDIATE`` for writes so a transaction never has to upgrade a read lock
(the upgrade is what fails with "database is locked" regardless of the timeout).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import uuid
import weakref
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import StatementError

from . import deadline, settings
from .errors import ConfigurationError
from .schema import outbox


def create_outbox_engine(url: str, *, busy_timeout: float | None = None) -> Engine:
    """An Engine tuned for the outbox: durable SQLite, or a Postgres pool.

    No pre-ping on Postgres (a round trip per spill): the spill and replay paths retry
    once on a connection the server closed, and the replayer retries everything else.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, connect_args=_network_bounds(parsed), pool_timeout=settings.outbox_timeout())
        deadline.watch(engine)
        return engine
    if parsed.database in (None, "", ":memory:"):
        raise ConfigurationError("an in-memory SQLite outbox is not durable; give it a file path")
    path = None if parsed.query.get("uri") else parsed.database
    timeout = settings.busy_timeout() if busy_timeout is None else busy_timeout
    # isolation_level=None: pysqlite stops issuing BEGIN itself; we issue our own below.
    engine = create_engine(url, connect_args={"timeout": timeout, "isolation_level": None})

    @event.listens_for(engine, "do_connect")
    def _owner_only(*_args: Any) -> None:
        if path is not None:
            _create_owner_only(path)

    @event.listens_for(engine, "connect")
    def _tune(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('spillover_begin', 'IMMEDIATE')}")

    deadline.watch(engine)
    return engine


def _network_bounds(url: URL) -> dict[str, Any]:
    """libpq's own bounds, where the URL does not set them: connect_timeout, keepalives, TCP user timeout.

    They end a connection the network lost (no answer, no RST); a server or proxy that accepts
    the bytes and never answers is cut by the client-side deadline (deadline.py) instead.
    """
    driver = url.get_driver_name()
    if driver not in ("psycopg", "psycopg2"):
        return {}
    bound = settings.outbox_timeout()
    wanted = {
        "connect_timeout": max(2, math.ceil(bound)),
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(bound)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": int(bound * 1000),
    }
    if _libpq_version(driver) < 120000:
        del wanted["tcp_user_timeout"]  # libpq before 12 refuses the option it does not know
    return {name: value for name, value in wanted.items() if name not in url.query}


def _libpq_version(driver: str) -> int:
    try:
        if driver == "psycopg":
            import psycopg

            return int(psycopg.pq.version())
        import psycopg2  # type: ignore[import-untyped,import-not-found,unused-ignore]

        return int(psycopg2.__libpq_version__)
    except Exception:  # not importable here: the engine will say so itself
        return 0


def _create_owner_only(path: str) -> None:
    """Create the SQLite file 0600 before SQLite does: its -wal and -shm files take its mode.

    Rows hold pickled calls: whoever can write them runs code on the workers, and
    whoever can read them sees every argument.
    """
    # FileExistsError: an existing outbox keeps the mode its owner gave it. Any other
    # OSError (no directory, no permission): SQLite's own error says so a moment later.
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


#: SQLite pools a forked child inherited, kept unused for the child's lifetime (see dispose_in_child).
_inherited_sqlite_pools: list[object] = []


def dispose_in_child(engine_ref: weakref.ref[Engine]) -> None:
    engine = engine_ref()
    if engine is not None:
        # The parent's pooled connections must not be used (or closed) by the child. sqlite3 closes a
        # connection when it is collected, and closing one in a child is what SQLite's own rule forbids
        # (its locks and WAL are the parent's; a close may checkpoint): keep them referenced, never used.
        # psycopg does not close a connection collected in a process other than its own.
        if engine.dialect.name == "sqlite":
            _inherited_sqlite_pools.append(engine.pool)
        engine.dispose(close=False)


def is_missing_table(exc: StatementError, table: str = outbox.name) -> bool:
    """``table``, or a column a newer migration adds, is missing: the schema is absent or behind."""
    text = str(exc.orig).lower()
    if "no such column" in text or "has no column named" in text:
        return True  # SQLite names the column, not always the table
    return table in text and ("no such table" in text or "does not exist" in text)


_producer: tuple[int, str] | None = None


def producer_id() -> str:
    """host:pid:random, fresh after a fork; recorded on each row for diagnosis."""
    global _producer
    pid = os.getpid()
    if _producer is None or _producer[0] != pid:
        _producer = (pid, f"{socket.gethostname()[:40]}:{pid}:{uuid.uuid4().hex[:8]}")
    return _producer[1]
