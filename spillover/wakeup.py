"""Wake the replayer when rows are committed, instead of waiting out its poll interval.

On Postgres, a transaction that enqueues within a bare Connection also runs
``NOTIFY spillover_outbox``; Postgres delivers a notification only when (and if) that
transaction commits, so the replayer, LISTENing, starts draining within milliseconds of
the commit. Nothing depends on a notification arriving: the replayer still polls, so a
lost or missed one costs at most one poll interval. SQLite has no such channel: polling.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

from sqlalchemy import Connection, Engine

log = logging.getLogger("spillover.wakeup")

CHANNEL = "spillover_outbox"
_NOTIFY_SQL = f"NOTIFY {CHANNEL}"
#: Seconds a LISTEN connection is kept before it is made again: one the network silenced would
#: otherwise never wake the replayer again (it still polls), and never fail either.
RELISTEN_INTERVAL = 60.0


def notify_on_commit(connection: Connection) -> None:
    """Ask Postgres to wake listening replayers when ``connection``'s transaction commits."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(_NOTIFY_SQL)


class CommitListener:
    """A LISTEN connection of its own; ``wait`` returns early when a notifying transaction commits."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.supported = engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        self._connection: Any = None
        self._listening_since = 0.0

    def wait(self, timeout: float, stopping: threading.Event) -> bool:
        """Up to ``timeout`` seconds, or until a commit notifies or ``stopping`` is set; True if notified."""
        if not self.supported:
            stopping.wait(timeout)
            return False
        deadline = time.monotonic() + timeout
        try:
            connection = self._listening()
            while not stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # short slices, so that stopping is seen promptly
                ready, _, _ = select.select([connection.fileno()], [], [], min(remaining, 0.1))
                if ready and list(connection.notifies(timeout=0)):  # every one pending: one wake-up
                    return True
            return False
        except Exception as exc:  # the database went away: poll until it is back
            log.debug("commit listener unavailable: %r", exc)
            self.close()
            stopping.wait(timeout)
            return False

    def _listening(self) -> Any:
        if self._connection is not None and time.monotonic() - self._listening_since > RELISTEN_INTERVAL:
            self.close()  # a listener the network silenced (a moved virtual IP) hears nothing, and says nothing
        if self._connection is None:
            raw = self.engine.raw_connection()
            connection = raw.dbapi_connection
            try:
                connection.autocommit = True  # type: ignore[union-attr]
                connection.execute(f"LISTEN {CHANNEL}")  # type: ignore[union-attr]  # bounded while checked out
            except BaseException:
                raw.invalidate()  # half set up: never pooled
                raw.close()
                raise
            raw.detach()  # a connection of its own, never returned to the pool
            self._connection = connection
            self._listening_since = time.monotonic()
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception as exc:
                log.debug("closing the commit listener: %r", exc)
            self._connection = None
