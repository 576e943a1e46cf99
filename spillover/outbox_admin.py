"""What operators ask of the outbox (``spillover status``, ``dead``, ``retarget``, the backlog gauges).

A mixin of ``Outbox``: the same engine and transactions, apart from the producer's and the
replayer's hot paths.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, update

from .errors import ConfigurationError
from .rq_keys import TARGET_PREFIX_SEPARATOR, display_target, server_part
from .schema import DEAD, PENDING, SKIPPED, outbox


class OperatorQueries:
    """Per-queue statistics, dead rows, and handing rows to another target."""

    engine: Engine

    def _transaction(self, read_only: bool = False) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def pending_by_target(self) -> dict[str | None, dict[str, int]]:
        """Pending rows per target and queue: {target: {queue: rows}} (target None: rows without one)."""
        query = (
            select(outbox.c.target, outbox.c.queue, func.count())
            .where(outbox.c.state == PENDING)
            .group_by(outbox.c.target, outbox.c.queue)
        )
        found: dict[str | None, dict[str, int]] = {}
        with self._transaction(read_only=True) as conn:
            for target, queue, count in conn.execute(query):
                queues = found.setdefault(display_target(target), {})
                queues[queue] = queues.get(queue, 0) + int(count)
        return found

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per target and queue: pending rows, age of the oldest pending row (s), dead rows, skipped unique rows."""
        age = func.max(_age_seconds(self.engine))
        query = select(outbox.c.target, outbox.c.queue, outbox.c.state, func.count(), age).group_by(
            outbox.c.target, outbox.c.queue, outbox.c.state
        )
        stats: dict[tuple[str | None, str], dict[str, Any]] = {}
        with self._transaction(read_only=True) as conn:
            for stored, queue, state, count, oldest in conn.execute(query):
                target = display_target(stored)  # rows of 0.4 ("tests") and of this release ("tests#rq") together
                empty = {"target": target, "queue": queue, "pending": 0, "oldest_age_s": None, "dead": 0, "skipped": 0}
                entry = stats.setdefault((target, queue), empty)
                if state == PENDING:
                    entry["pending"] += int(count)
                    seconds = round(float(oldest), 1)
                    entry["oldest_age_s"] = max(seconds, entry["oldest_age_s"] or 0.0)
                elif state == DEAD:
                    entry["dead"] += int(count)
                elif state == SKIPPED:
                    entry["skipped"] += int(count)
        return [stats[key] for key in sorted(stats, key=lambda key: (key[0] or "", key[1]))]

    def dead_rows(self, limit: int = 100) -> list[dict[str, Any]]:
        query = (
            select(
                outbox.c.id,
                outbox.c.target,
                outbox.c.queue,
                outbox.c.job_id,
                outbox.c.attempts,
                outbox.c.last_error,
                outbox.c.updated_at,
            )
            .where(outbox.c.state == DEAD)
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with self._transaction(read_only=True) as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def retry_dead(self, row_id: int | None) -> int:
        """Put dead rows (one, or all with None) back to pending with a fresh attempt count.

        The operator has checked the job is not in RQ, so it is no longer ambiguous.
        """
        query = update(outbox).where(outbox.c.state == DEAD)
        if row_id is not None:
            query = query.where(outbox.c.id == row_id)
        with self._transaction() as conn:
            result = conn.execute(query.values(state=PENDING, attempts=0, ambiguous=False, updated_at=func.now()))
            return result.rowcount or 0

    def retarget(self, old: str | None, new: str, host: str | None = None) -> int:
        """Name ``new`` as the Redis of the pending rows of ``old`` (None: rows with no target), from ``host`` only
        if given; how many. For rows no replayer can recognise: written on a host that is gone, or given a
        wrong target by an old migration."""
        pending = self.pending_by_target_as_stored()
        if TARGET_PREFIX_SEPARATOR in new or not new.strip():
            raise ConfigurationError(f"a target name cannot be empty or contain {TARGET_PREFIX_SEPARATOR!r}: {new!r}")
        renames: dict[str | None, str]
        if old is None:
            renames = {None: new}
        else:  # ``old`` names a Redis (or one stored name): its rows of every key prefix, each keeping its prefix
            renames = {}
            for stored in pending:
                if stored is not None and old in (stored, server_part(stored)):
                    _, separator, prefix = stored.rpartition(TARGET_PREFIX_SEPARATOR)
                    renames[stored] = f"{new}{separator}{prefix}" if separator else new
        moved = 0
        with self._transaction() as conn:
            for stored, renamed in renames.items():
                query = update(outbox).where(outbox.c.state == PENDING)
                query = query.where(outbox.c.target.is_(None) if stored is None else outbox.c.target == stored)
                if host is not None:
                    query = query.where(func.substr(outbox.c.producer, 1, len(host) + 1) == f"{host}:")
                moved += conn.execute(query.values(target=renamed, updated_at=func.now())).rowcount or 0
        return moved

    def pending_by_target_as_stored(self) -> set[str | None]:
        """The stored targets (with their key prefixes) that have pending rows."""
        query = select(outbox.c.target).where(outbox.c.state == PENDING).distinct()
        with self._transaction(read_only=True) as conn:
            return {target for (target,) in conn.execute(query)}

    def purge_dead(self, row_id: int | None) -> int:
        query = delete(outbox).where(outbox.c.state == DEAD)
        if row_id is not None:
            query = query.where(outbox.c.id == row_id)
        with self._transaction() as conn:
            return conn.execute(query).rowcount or 0


def _age_seconds(engine: Engine) -> Any:
    """SQL for the age of a row in seconds, by the database's own clock."""
    if engine.dialect.name == "sqlite":
        return (func.julianday("now") - func.julianday(outbox.c.created_at)) * 86400.0
    return func.extract("epoch", func.now() - outbox.c.created_at)
