"""Outbox storage: the durable table spilled jobs wait in, as producers and the replayer use it.

Knows nothing of Redis. The engine's set-up is in outbox_engine.py, what operators ask of
the table in outbox_admin.py.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from . import deadline, metrics, settings
from .errors import BacklogFull, OutboxNotMigrated, OutboxTimeout
from .outbox_admin import OperatorQueries
from .outbox_engine import create_outbox_engine, dispose_in_child, is_missing_table, producer_id
from .pusher import EXISTS
from .rq_keys import DEFAULT_LAYOUT, split_target, stored_target
from .schema import DEAD, DONE, PENDING, SKIPPED, outbox, queue_lease, replayer_registry
from .stored_job import SpilledJob

__all__ = ["Outbox", "OutboxRow", "create_outbox_engine", "is_missing_table", "producer_id"]

_READ = {"spillover_begin": "DEFERRED"}
T = TypeVar("T")


#: Pending rows of one target and queue, and producer host where asked: (target, queue, host or "", rows).
PendingGroup = tuple[str | None, str, str, int]


log = logging.getLogger("spillover.outbox")

#: Why a skipped row was not enqueued (its last_error).
UNIQUE_SKIPPED_REASON = "unique=True: a job with this id was already in redis when it was pushed; not enqueued"


class OutboxRow(NamedTuple):
    """A pending row as the replayer reads it (a tuple: thousands are built per second)."""

    id: int
    queue: str
    job_id: str
    delivery: str | None
    job_hash: bytes
    at_front: bool
    scheduled_at: int | None
    ambiguous: bool
    attempts: int
    options: str | None
    age_seconds: float


class Outbox(OperatorQueries):
    """The outbox table behind one database URL or Engine; share one per process.

    Give a URL and spillover tunes the engine (WAL, ``synchronous=FULL``, busy timeout for
    SQLite); an Engine you pass is used as it is, so make it with ``create_outbox_engine``.
    """

    def __init__(
        self,
        url_or_engine: str | Engine | None = None,
        *,
        max_backlog: int | None = None,
        busy_timeout: float | None = None,
    ) -> None:
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
            deadline.watch(self.engine)
        else:
            self.engine = create_outbox_engine(url_or_engine or settings.database_url(), busy_timeout=busy_timeout)
        self.max_backlog = settings.max_backlog() if max_backlog is None else max_backlog
        self.url = settings.redact(self.engine.url.render_as_string(hide_password=False))
        self._pending_estimate = 0
        self._estimated_at = -1e9
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        self._dbapi_error: type[Exception] = self.engine.dialect.dbapi.Error  # type: ignore[union-attr]
        # The row shape the table has (0.1's has no target, 0.3's no delivery): read on first use, see shape().
        self._shape: RowShape | None = None
        self._shape_read_at = -1e9
        if hasattr(os, "register_at_fork"):
            engine_ref = weakref.ref(self.engine)
            os.register_at_fork(after_in_child=lambda: dispose_in_child(engine_ref))

    def __repr__(self) -> str:
        return f"Outbox({self.url!r})"

    @property
    def identity(self) -> str:
        """Which table this is, as metrics label it: the URL (password masked), and for a SQLite file the
        host too (per-host outboxes share a path, not a table)."""
        return f"{socket.gethostname()}:{self.url}" if self._is_sqlite else self.url

    @contextmanager
    def _transaction(self, read_only: bool = False) -> Iterator[Connection]:
        deadline.check()
        try:
            conn = self.engine.connect()
            if read_only:
                conn = conn.execution_options(**_READ)
            with conn, conn.begin():
                yield conn
        except DBAPIError as exc:
            if is_missing_table(exc):
                raise OutboxNotMigrated(outbox.name) from exc
            if deadline.overran():
                raise self._timed_out(not read_only) from exc
            raise

    def in_doubt(self, exc: BaseException) -> bool:
        """Whether a failed write may have been applied all the same: the connection was lost (or cut at
        the time limit) after the write was sent. Never on SQLite: an interrupted transaction rolls back."""
        if self._is_sqlite:
            return False
        lost = bool(getattr(exc, "spillover_in_doubt", False))  # an earlier try's write, see _raw
        return lost or (isinstance(exc, OutboxTimeout) and exc.in_doubt)

    def _timed_out(self, in_doubt: bool) -> OutboxTimeout:
        return OutboxTimeout(
            f"the outbox database did not answer within the time limit ({deadline.limit() or 0:g} s, "
            "SPILLOVER_OUTBOX_TIMEOUT or outbox_timeout=)",
            in_doubt=in_doubt and not self._is_sqlite,
        )

    def check_schema(self) -> None:
        """Raise OutboxNotMigrated unless the tables and columns this version uses are there.

        Run once at start-up by the replayer and the admin commands, so an outbox that
        was never migrated (or is behind) is named as such instead of failing later.
        """
        checks = {
            outbox.name: select(outbox.c.target, outbox.c.delivery, outbox.c.options).limit(0),
            queue_lease.name: select(queue_lease.c.holder, queue_lease.c.epoch).limit(0),
            replayer_registry.name: select(replayer_registry.c.claims).limit(0),
        }
        for table, query in checks.items():
            try:
                with self.engine.connect().execution_options(**_READ) as conn, conn.begin():
                    conn.execute(query)
            except DBAPIError as exc:
                if not is_missing_table(exc, table):
                    raise
                behind = "column" in str(exc.orig).lower()
                raise OutboxNotMigrated(
                    table, "the outbox schema is older than this spillover" if behind else None
                ) from exc

    # -- producer side -------------------------------------------------------------

    def append(self, jobs: Sequence[SpilledJob]) -> list[int]:
        """Store jobs durably in one transaction; their row ids.

        Raises BacklogFull past ``max_backlog``; database errors propagate as SQLAlchemy's.
        This is the spill hot path: it runs on the pool's DBAPI connection, which halves
        SQLAlchemy's per-call overhead (profiled). On Postgres it is one multi-row INSERT
        in autocommit, its own transaction: one round trip where BEGIN, INSERT, COMMIT
        take three.
        """
        self.reserve_backlog(len(jobs))
        producer = producer_id()
        rows = [
            (
                job.target,
                job.delivery,
                job.options,
                job.queue,
                job.job_id,
                job.job_hash,
                job.at_front,
                job.scheduled_at,
                job.ambiguous,
                producer,
            )
            for job in jobs
        ]
        try:
            return self._insert(rows)
        except OutboxNotMigrated:
            if self._shape is None or self._shape == RowShape():
                raise
            self._shape = None  # the table lost a column we write (a downgrade): look again
            return self._insert(rows)

    def _insert(self, rows: list[tuple[Any, ...]]) -> list[int]:
        shape = self.shape()
        if shape != FULL_SHAPE:
            refuse_unstorable(shape.target, shape.options, [(row[0], row[2]) for row in rows])
            rows = [shape.pick(row) for row in rows]
        sql = _insert_sql(1 if self._is_sqlite else len(rows), self._is_sqlite, shape)

        def insert_each(cursor: Any) -> list[int]:
            ids = []
            for row in rows:
                cursor.execute(sql, row)
                ids.append(int(cursor.fetchone()[0]))
            return ids

        def insert_at_once(cursor: Any) -> list[int]:
            cursor.execute(sql, [value for row in rows for value in row])
            return [int(found[0]) for found in cursor.fetchall()]

        if self._is_sqlite:
            return self._raw(insert_each, sql)
        return self._raw(insert_at_once, sql, single_statement=True)

    def shape(self) -> RowShape:
        """Which of the columns later migrations added the table has: ``target`` (0002), ``delivery`` (0004),
        ``options`` (0005).

        A producer of this release may start before the deploy's migration has run: until then
        it writes the row shape the table has, and the outbox's replayer drains those rows as
        the previous release's. Read from the table on first use, and again every few seconds
        while a column is missing.
        """
        stale = self._shape != FULL_SHAPE and time.monotonic() - self._shape_read_at > SHAPE_RECHECK_INTERVAL
        if self._shape is None or stale:
            self._shape = RowShape(*(self._has_column(name) for name in RowShape._fields))
            self._shape_read_at = time.monotonic()
        return self._shape

    def _has_column(self, column: str) -> bool:
        # The column by name, not SELECT *: Postgres refuses a prepared SELECT * whose columns
        # changed ("cached plan must not change result type"), and psycopg prepares repeated queries.
        sql = f"SELECT {column} FROM spillover_outbox WHERE 1 = 0"
        try:
            self._raw(lambda cursor: cursor.execute(sql), sql, write=False, single_statement=True)
        except OutboxNotMigrated:
            return False  # no such column (or no table: the INSERT will say so)
        return True

    def _raw(self, work: Callable[[Any], T], sql: str, write: bool = True, single_statement: bool = False) -> T:
        """Run ``work(cursor)`` in one transaction on the pool's DBAPI connection.

        The hot statements (spill insert, replay fetch and delete) go this way: it skips
        SQLAlchemy's per-statement work, which profiling showed costing as much as the
        statements themselves. Errors come out as SQLAlchemy's, like everywhere else.
        ``single_statement``: ``work`` runs one statement, which on Postgres runs in
        autocommit as its own transaction (one round trip instead of three).
        """
        deadline.check()
        # A write sent on a connection that was then lost may have been applied ("before or while
        # processing the request", as libpq says): whatever happens next, it stays in doubt.
        lost = False
        try:
            try:
                return self._run_raw(work, write, single_statement)
            except _StaleConnection as stale:
                lost = write and not self._is_sqlite
                if deadline.overran():  # cut at the time limit: no time for another try
                    raise self._timed_out(lost) from stale.error
                return self._run_raw(work, write, single_statement)  # the server restarted since it was pooled
        except _StaleConnection as stale:
            error: Exception = stale.error
            lost = write and not self._is_sqlite
        except self._dbapi_error as exc:
            error = exc
        except SQLAlchemyError as exc:  # no connection to be had (refused, or connect_timeout)
            if deadline.overran():
                raise self._timed_out(lost) from exc
            exc.spillover_in_doubt = lost  # type: ignore[attr-defined]
            raise
        if deadline.overran():
            raise self._timed_out(lost) from error
        wrapped = DBAPIError.instance(sql, None, error, self._dbapi_error, connection_invalidated=lost)
        if is_missing_table(wrapped):
            raise OutboxNotMigrated(outbox.name) from wrapped
        wrapped.spillover_in_doubt = lost  # type: ignore[attr-defined]
        raise wrapped from error

    def _run_raw(self, work: Callable[[Any], T], write: bool, single_statement: bool) -> T:
        # Postgres: one statement runs in autocommit. SQLite (its connections are in autocommit
        # already): one read statement is its own transaction; writes BEGIN IMMEDIATE (see above).
        autocommit = single_statement and not self._is_sqlite
        raw = self.engine.raw_connection()
        try:
            if autocommit:
                raw.dbapi_connection.autocommit = True  # type: ignore[union-attr]
            cursor = raw.cursor()
            if self._is_sqlite and (write or not single_statement):
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
            result = work(cursor)
            raw.commit()
        except self._dbapi_error as exc:
            if not self._is_sqlite and self.engine.dialect.is_disconnect(exc, raw.dbapi_connection, None):  # type: ignore[arg-type]
                raw.invalidate(exc)  # the server closed it: never hand it out again
                raise _StaleConnection(exc) from exc
            raw.rollback()
            raise
        except BaseException:
            raw.rollback()
            raise
        finally:
            if autocommit and raw.dbapi_connection is not None and not raw.dbapi_connection.closed:
                raw.dbapi_connection.autocommit = False  # the pool's other users expect transactions
            raw.close()  # back to the pool (a no-op once invalidated)
        return result

    def reserve_backlog(self, adding: int) -> None:
        """Count ``adding`` rows in, or raise BacklogFull; a COUNT once a second or near the limit, not per spill."""
        if self.max_backlog <= 0:
            return
        now = time.monotonic()
        near = self._pending_estimate + adding > self.max_backlog * 0.9
        if near or now - self._estimated_at > 1.0:
            self._pending_estimate = self.pending_count()
            self._estimated_at = now
        if self._pending_estimate + adding > self.max_backlog:
            raise BacklogFull(self._pending_estimate, self.max_backlog)
        self._pending_estimate += adding

    def pending_count(self, queue: str | None = None, target: str | None = None) -> int:
        query = select(func.count()).select_from(outbox).where(outbox.c.state == PENDING)
        if queue is not None:
            query = query.where(outbox.c.queue == queue)
        if target is not None:  # as people name it: its rows of 0.4 and of this release (``target#rq``)
            query = query.where(outbox.c.target.in_((target, stored_target(target, DEFAULT_LAYOUT))))
        with self._transaction(read_only=True) as conn:
            return int(conn.scalar(query) or 0)

    def own_pending(self, target: str, queue: str, limit: int) -> list[OutboxRow]:
        """This producer process's oldest ``limit`` pending rows of ``target``'s ``queue``, in order.

        Its rows without a target (written before the migration that added it) are its target's too.
        """
        shape = self.shape()
        sql = _own_sql(self._is_sqlite, shape)
        params = (producer_id(), target, queue, limit) if shape.target else (producer_id(), queue, limit)
        return self._raw(lambda cursor: _fetch(cursor, sql, params), sql, write=False, single_statement=True)

    def present(self, ids: Sequence[int]) -> set[tuple[int, str]]:
        """(id, job_id) of the rows among ``ids`` this connection can read (committed ones), still pending."""
        sql = _PRESENT_SQL[self._is_sqlite]
        params = (_id_list(ids, self._is_sqlite),)

        def read(cursor: Any) -> set[tuple[int, str]]:
            cursor.execute(sql, params)
            return {(int(row_id), job_id) for row_id, job_id in cursor.fetchall()}

        return self._raw(read, sql, write=False, single_statement=True)

    # -- replayer side -------------------------------------------------------------

    def pending_groups(self, by_host: Callable[[str], bool] = lambda target: False) -> list[PendingGroup]:
        """Pending rows per target and queue; for targets ``by_host`` picks, per producer host too.

        The first count reads the (target, queue, state, id) index only; the per-host one reads
        the rows of those targets (their producer column): loopback and socket targets.
        """
        sql = _GROUPS_SQL[self._is_sqlite]

        def read(cursor: Any) -> list[tuple[str | None, str, int]]:
            cursor.execute(sql)
            return [(target, queue, int(count)) for target, queue, count in cursor.fetchall()]

        found: list[PendingGroup] = []
        split: set[str] = set()
        for target, queue, count in self._raw(read, sql, write=False, single_statement=True):
            if target is not None and by_host(target):
                split.add(target)
            else:
                found.append((target, queue, "", count))
        by_host_sql = _HOSTS_SQL[self._is_sqlite]
        for target in sorted(split):

            def read_hosts(cursor: Any, target: str = target) -> list[PendingGroup]:
                cursor.execute(by_host_sql, (target,))
                return [(target, queue, host or "", int(count)) for queue, host, count in cursor.fetchall()]

            found += self._raw(read_hosts, by_host_sql, write=False, single_statement=True)
        return found

    def oldest_age(self, target: str | None, queue: str, host: str | None = None) -> float:
        """Age in seconds of the oldest pending row of ``target``'s ``queue`` (from ``host``); 0 if none."""
        rows = self.fetch_pending(target, queue, 1, host=host or None)
        return rows[0].age_seconds if rows else 0.0

    def fetch_pending(
        self,
        target: str | None,
        queue: str,
        limit: int,
        exclude: Sequence[int] = (),
        host: str | None = None,
    ) -> list[OutboxRow]:
        """The oldest ``limit`` pending rows of ``target``'s ``queue``, in replay order, except ``exclude``.

        ``target`` None: the rows without a target; ``host``: only rows whose producer ran there.
        Not "rows past the last id seen": on Postgres a row with a lower id may commit
        after a higher one, and must still go before that producer's later rows.
        """
        sql = _fetch_sql(self._is_sqlite, target is None, host is not None)
        params: list[Any] = [] if target is None else [target]
        params.append(queue)
        if host is not None:
            params += [len(host) + 1, f"{host}:"]
        params += [_id_list(exclude, self._is_sqlite), limit]
        return self._raw(lambda cursor: _fetch(cursor, sql, tuple(params)), sql, write=False, single_statement=True)

    def mark_delivered(self, ids: Sequence[int], keep: bool) -> None:
        """Rows now in Redis: delete them, or keep them as ``done`` for retention."""
        if not ids:
            return
        if keep:
            with self._transaction() as conn:
                conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_(ids))
                    .values(state=DONE, updated_at=func.now(), last_error=None)
                )
            return
        sql = _DELETE_SQL[self._is_sqlite]
        self._raw(lambda cursor: cursor.execute(sql, (_id_list(ids, self._is_sqlite),)), sql, single_statement=True)

    def mark_ambiguous(self, ids: Sequence[int]) -> None:
        """These rows may be in Redis already (a push whose reply was lost): past the marker TTL
        the replayer must not push them blindly."""
        with self._transaction() as conn:
            conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(ambiguous=True))

    def record_failure(self, row_id: int, error: str, max_attempts: int) -> bool:
        """Count a failed replay of one row; mark it dead after ``max_attempts``. True if dead."""
        with self._transaction() as conn:
            attempts = conn.scalar(
                update(outbox)
                .where(outbox.c.id == row_id)
                .values(attempts=outbox.c.attempts + 1, last_error=error[:2000], updated_at=func.now())
                .returning(outbox.c.attempts)
            )
            dead = attempts is not None and attempts >= max_attempts
            if dead:
                conn.execute(update(outbox).where(outbox.c.id == row_id).values(state=DEAD))
        return dead

    def mark_skipped(self, queue: str, pushed: Sequence[tuple[int, str]], codes: Sequence[int]) -> set[int]:
        """Of pushed (row id, job id) pairs, with the push's ``codes``, keep the unique=True ones whose job id
        Redis had as ``skipped`` (with why: ``status`` shows them, purged after a while); their row ids."""
        skipped = [(row_id, job_id) for (row_id, job_id), code in zip(pushed, codes, strict=False) if code == EXISTS]
        if not skipped:
            return set()
        with self._transaction() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id.in_([row_id for row_id, _ in skipped]))
                .values(state=SKIPPED, last_error=UNIQUE_SKIPPED_REASON, updated_at=func.now())
            )
        metrics.UNIQUE_SKIPPED.labels(queue).inc(len(skipped))
        log.warning(
            "queue %s: %d unique job(s) already in redis, not enqueued (kept as skipped rows): %s",
            queue,
            len(skipped),
            ", ".join(job_id for _, job_id in skipped[:10]),
        )
        return {row_id for row_id, _ in skipped}

    def mark_dead(self, row_id: int, error: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id == row_id)
                .values(state=DEAD, last_error=error[:2000], updated_at=func.now())
            )

    def purge_done(self, older_than_seconds: float, state: str = DONE) -> int:
        """Delete rows kept as ``state`` (done: replayed; skipped: unique, id in Redis) for longer than that."""
        cutoff = _seconds_ago(self.engine, older_than_seconds)
        with self._transaction() as conn:
            result = conn.execute(delete(outbox).where(outbox.c.state == state, outbox.c.updated_at < cutoff))
            return result.rowcount or 0


def refuse_unstorable(has_target: bool, has_options: bool, rows: Sequence[tuple[str | None, str | None]]) -> None:
    """OutboxNotMigrated if a row (stored target, options) needs a column the outbox lacks yet.

    Rows of a table without ``target`` (0001) are replayed by whichever replayer adopts them, under
    ``rq:``; without ``options`` (before 0005) a row would lose them. Such rows are refused, never
    stored without what they need: the caller gets the exception and nothing is written.
    """
    for target, options in rows:
        if options is not None and not has_options:
            raise OutboxNotMigrated(
                "spillover_outbox", "the outbox has no options column for this job's RQ options (unique, group, ...)"
            )
        if target is not None and not has_target and split_target(target)[1] != DEFAULT_LAYOUT:
            raise OutboxNotMigrated(
                "spillover_outbox", f"the outbox has no target column to keep this job's RQ key prefix ({target!r})"
            )


def _seconds_ago(engine: Engine, seconds: float) -> Any:
    if engine.dialect.name == "sqlite":
        return func.datetime("now", f"-{float(seconds)} seconds")
    return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, float(seconds))


# The replay hot path in each dialect's own SQL: an id list is one parameter (a JSON
# array for SQLite, an array for Postgres) instead of one bound parameter per id.
_COLUMNS = "id, queue, job_id, {delivery}, job_hash, at_front, scheduled_at, ambiguous, attempts, {options}"
_AGE = {
    True: "(julianday('now') - julianday(created_at)) * 86400.0",
    False: "extract(epoch from now() - created_at)::float8",
}


def _select_rows(sqlite: bool, delivery: bool = True, options: bool = True) -> str:
    """Pending rows as OutboxRow reads them: its columns and the row's age, by the database's clock."""
    columns = _COLUMNS.format(
        delivery="delivery" if delivery else "NULL AS delivery", options="options" if options else "NULL AS options"
    )
    return f"SELECT {columns}, {_AGE[sqlite]} FROM spillover_outbox "


class RowShape(NamedTuple):
    """Which optional columns the outbox table has (see ``Outbox.shape``)."""

    target: bool = False
    delivery: bool = False
    options: bool = False

    def pick(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """An insert row (target, delivery, options, the rest ...) without the columns the table lacks."""
        keep = (self.target, self.delivery, self.options)
        return tuple(value for n, value in enumerate(row) if n > 2 or keep[n])

    def insert_columns(self) -> tuple[str, ...]:
        return self.pick(_INSERT_COLUMNS)


FULL_SHAPE = RowShape(target=True, delivery=True, options=True)


@functools.lru_cache(maxsize=8)
def _fetch_sql(sqlite: bool, untargeted: bool, by_host: bool) -> str:
    mark = "?" if sqlite else "%s"
    where = "target IS NULL" if untargeted else f"target = {mark}"
    where += f" AND queue = {mark} AND state = 'pending'"
    if by_host:  # the producer column starts with its host name and a colon
        where += f" AND substr(producer, 1, {mark}) = {mark}"
    exclude = f"id NOT IN (SELECT value FROM json_each({mark}))" if sqlite else f"id <> ALL({mark})"
    return _select_rows(sqlite) + f"WHERE {where} AND {exclude} ORDER BY id LIMIT {mark}"


_GROUPS_SQL = {
    sqlite: "SELECT target, queue, count(*) FROM spillover_outbox WHERE state = 'pending' GROUP BY target, queue"
    for sqlite in (True, False)
}
# The host part of ``producer`` (host:pid:random).
_HOSTS_SQL = {
    True: "SELECT queue, substr(producer, 1, instr(producer, ':') - 1) AS host, count(*) FROM spillover_outbox "
    "WHERE target = ? AND state = 'pending' GROUP BY queue, host",
    False: "SELECT queue, split_part(producer, ':', 1) AS host, count(*) FROM spillover_outbox "
    "WHERE target = %s AND state = 'pending' GROUP BY queue, host",
}


@functools.lru_cache(maxsize=8)
def _own_sql(sqlite: bool, shape: RowShape) -> str:
    """A producer's own pending rows of a queue (its rows without a target too), in order."""
    mark = "?" if sqlite else "%s"
    target = f"AND (target = {mark} OR target IS NULL) " if shape.target else ""
    where = f"WHERE producer = {mark} AND state = 'pending' {target}AND queue = {mark} ORDER BY id LIMIT {mark}"
    return _select_rows(sqlite, shape.delivery, shape.options) + where


_INSERT_COLUMNS = (
    "target",
    "delivery",
    "options",
    "queue",
    "job_id",
    "job_hash",
    "at_front",
    "scheduled_at",
    "ambiguous",
    "producer",
)
#: While the outbox lacks a column this release writes, how often (s) to look whether it has come.
SHAPE_RECHECK_INTERVAL = 5.0


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int, sqlite: bool, shape: RowShape) -> str:
    """INSERT of ``rows`` rows (one at a time on SQLite), returning their ids, in the table's row shape."""
    names = shape.insert_columns()
    mark = "?" if sqlite else "%s"
    one = "(" + ", ".join([mark] * len(names)) + ")"
    values = one if sqlite else ", ".join([one] * rows)
    return f"INSERT INTO spillover_outbox ({', '.join(names)}) VALUES {values} RETURNING id"


_PRESENT_SQL = {
    True: "SELECT id, job_id FROM spillover_outbox WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'",
    False: "SELECT id, job_id FROM spillover_outbox WHERE id = ANY(%s) AND state = 'pending'",
}
_DELETE_SQL = {
    True: "DELETE FROM spillover_outbox WHERE id IN (SELECT value FROM json_each(?))",
    False: "DELETE FROM spillover_outbox WHERE id = ANY(%s)",
}


class _StaleConnection(Exception):
    """Internal: a pooled connection the server had closed (a retry on a fresh one is safe)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _id_list(ids: Sequence[int], sqlite: bool) -> Any:
    return json.dumps(list(ids)) if sqlite else list(ids)


def _fetch(cursor: Any, sql: str, params: tuple[Any, ...]) -> list[OutboxRow]:
    cursor.execute(sql, params)
    return [OutboxRow._make(row) for row in cursor.fetchall()]
