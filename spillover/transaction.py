"""Enqueue inside the application's own transaction: ``queue.within(session_or_connection)``.

Each job is written as an outbox row through the caller's Session or Connection, in the
caller's transaction: rolled back, the row never existed; committed, it is as durable as
the application's own rows and the replayer delivers it. spillover begins that transaction
only as SQLAlchemy's autobegin would (a job may come before the application's own writes),
never commits or rolls it back, and writes nothing to Redis before the commit.

A Session does not wait for the replayer: its after-commit hook reads the rows back
(only committed rows are visible to another connection) and pushes them into RQ
(pusher.py), so the job is in RQ when ``commit()`` returns. A push writes a job and its
delivery marker at once and skips a delivery whose marker exists, so a replayer reading
the same rows at the same moment cannot double them; a sweeper then deletes the rows and
settles their markers (a replayer may still hold a row it read before the delete: the
marker outlives that replayer's request). Redis down costs the commit one bounded
attempt, then the breaker skips it.
One producer's transactional jobs of a queue keep their commit order by the same sticky
rule as spilling (lanes.py): once a push fails, later commits leave their rows to the
replayer until this producer's older rows are in RQ.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import redis
import rq
from rq.job import Job
from rq.queue import EnqueueData
from sqlalchemy import Connection, Engine, event, insert, inspect
from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from . import deadline, lanes, metrics, parents
from .errors import ConfigurationError, NotInTransaction, OutboxNotMigrated
from .lanes import SpillLane
from .markers import Settler
from .outbox import Outbox, is_missing_table, producer_id, refuse_unstorable
from .schema import outbox as outbox_table
from .stored_job import SpilledJob
from .sweeper import Sweeper
from .wakeup import notify_on_commit

if TYPE_CHECKING:
    from redis.client import Pipeline

log = logging.getLogger("spillover.transaction")

#: Test-only: called after a commit and before its push, so a test can stop or kill the producer there.
before_push: Callable[[], None] | None = None

_INFO_KEY = "spillover.written"  # session.info: rows written in the session's current transaction
_NOTIFIED_KEY = "spillover.notified"  # connection.info: the transaction that will wake the replayer
_INSERT_ONE = insert(outbox_table).returning(outbox_table.c.id)
_INSERT_MANY = insert(outbox_table).returning(outbox_table.c.id, sort_by_parameter_order=True)
# Added by later migrations: rows are written without them until then.
_OPTIONAL_COLUMNS = ("target", "delivery", "options")
_hooks_installed = False
_complete_schemas: weakref.WeakSet[Engine] = weakref.WeakSet()
_deleters: weakref.WeakKeyDictionary[Outbox, DeliveredRows] = weakref.WeakKeyDictionary()

#: A pushed row waiting for its delete: (row id, job id, delivery id, the settler of its Redis)
Pushed = tuple[int, str, "str | None", Settler]


class DeliveredRows(Sweeper[Pushed]):
    """Rows of one outbox the producer pushed into RQ itself, deleted in batches off the commit path.

    Once deleted, their markers are settled. A row deleted late is pushed again by a replayer
    at most, and its marker makes that a no-op.
    """

    interval = 0.1
    name = "spillover-delivered-rows"

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def delete(self, items: Sequence[Pushed]) -> None:
        self.outbox.mark_delivered([row_id for row_id, *_ in items], keep=False)
        by_settler: dict[int, tuple[Settler, list[tuple[str, str | None]]]] = {}
        for _, job_id, delivery, settler in items:
            by_settler.setdefault(id(settler), (settler, []))[1].append((job_id, delivery))
        for settler, gone in by_settler.values():
            settler.gone(gone)


class Producing(Protocol):
    """What a TransactionalQueue needs of the ``spillover.Queue`` it writes for."""

    name: str
    connection: Any  # its Redis client
    outbox_timeout: float

    def lane_within(self, engine: Engine) -> SpillLane: ...


@dataclass
class _Written:
    """One job row written in a caller's transaction, waiting for its commit."""

    lane: SpillLane
    row: SpilledJob
    row_id: int
    outbox_timeout: float  # the queue's: the commit's outbox calls for it are bounded by it


class TransactionalQueue:
    """What ``Queue.within(session_or_connection)`` returns: RQ's enqueue methods, in the caller's transaction.

    ``enqueue``, ``enqueue_call``, ``enqueue_at``, ``enqueue_in`` and ``enqueue_many`` take
    what ``spillover.Queue``'s take and return the same jobs, with their final ids.
    """

    def __init__(
        self,
        queue: Producing,
        session_or_connection: Session | Connection | scoped_session[Any],
        writer: Callable[[TransactionalQueue], rq.Queue],
    ) -> None:
        self.queue = queue
        self.bind = _session_or_connection(session_or_connection)
        engine_or_connection = self.bind.get_bind() if isinstance(self.bind, Session) else self.bind
        self._engine_or_connection: Engine | Connection = engine_or_connection
        self.lane = queue.lane_within(engine_or_connection.engine)
        self.outbox = self.lane.outbox
        self._writer: rq.Queue = writer(self)  # the queue's own enqueue paths, delivering through write()

    def __repr__(self) -> str:
        return f"<TransactionalQueue {self.queue.name!r} within {type(self.bind).__name__}>"

    @property
    def name(self) -> str:
        return self.queue.name

    def enqueue(self, f: Any, *args: Any, **kwargs: Any) -> Job:
        return self._writer.enqueue(f, *args, **kwargs)

    def enqueue_call(self, *args: Any, **kwargs: Any) -> Job:
        return self._writer.enqueue_call(*args, **kwargs)

    def enqueue_at(self, datetime: datetime, f: Any, *args: Any, **kwargs: Any) -> Job:
        return self._writer.enqueue_at(datetime, f, *args, **kwargs)  # type: ignore[no-any-return]

    def enqueue_in(self, time_delta: Any, func: Any, *args: Any, **kwargs: Any) -> Job:
        return self._writer.enqueue_in(time_delta, func, *args, **kwargs)

    def enqueue_many(
        self, job_datas: Iterable[EnqueueData], pipeline: Pipeline | None = None, group_id: str | None = None
    ) -> list[Job]:
        return self._writer.enqueue_many(job_datas, pipeline=pipeline, group_id=group_id)

    def enqueue_many_into(
        self, job_datas: Iterable[EnqueueData], group_id: str | None, *, join_group: bool
    ) -> list[Job]:
        """``Queue.enqueue_many_into`` in the transaction (spillover.Group uses it)."""
        writer: Any = self._writer  # a spillover Queue (queue._WithinWriter); typed as rq's to avoid the import
        return list(writer.enqueue_many_into(job_datas, group_id, join_group=join_group))

    @property
    def connection(self) -> Any:
        """The queue's Redis connection (RQ's Group.create takes it)."""
        return self.queue.connection

    prepare_data = staticmethod(rq.Queue.prepare_data)  # builds enqueue_many's items, as on a Queue

    # -- writing ---------------------------------------------------------------------

    def write(self, rows: list[SpilledJob]) -> None:
        """Insert ``rows`` through the caller's connection, in its transaction; remember them for the commit."""
        connection = self._connection()
        missing = _check_schema(connection)
        with deadline.budget(self.queue.outbox_timeout):  # spillover's own connection; the INSERT is the caller's
            self.outbox.reserve_backlog(len(rows))
        producer = producer_id()
        params = [
            {
                "target": row.target,
                "delivery": row.delivery,
                "options": row.options,
                "queue": row.queue,
                "job_id": row.job_id,
                "job_hash": row.job_hash,
                "at_front": row.at_front,
                "scheduled_at": row.scheduled_at,
                "producer": producer,
            }
            for row in rows
        ]
        if missing:
            refuse_unstorable("target" not in missing, "options" not in missing, [(r.target, r.options) for r in rows])
        for param in params if missing else ():
            for column in missing:
                del param[column]
        try:
            if len(params) == 1:
                ids = [connection.execute(_INSERT_ONE, params[0]).scalar_one()]
            else:
                ids = list(connection.execute(_INSERT_MANY, params).scalars())
        except DBAPIError as exc:
            if is_missing_table(exc):
                raise OutboxNotMigrated(outbox_table.name) from exc
            raise
        metrics.ENQUEUED.labels(self.queue.name, metrics.TRANSACTION).inc(len(rows))
        if not isinstance(self.bind, Session):
            # A bare Connection has no after-commit hook: the replayer delivers these, woken
            # by the commit on Postgres. Once per transaction: Postgres folds repeats anyway.
            transaction = connection.get_transaction()
            if connection.info.get(_NOTIFIED_KEY) is not transaction:
                notify_on_commit(connection)
                connection.info[_NOTIFIED_KEY] = transaction
            return
        if (
            "delivery" in missing
        ):  # the rows have no delivery id: pushed at commit by their job id, as the replayer will
            rows = [replace(row, delivery=None) for row in rows]
        written = self.bind.info.setdefault(_INFO_KEY, [])
        written.extend(
            _Written(self.lane, row, row_id, self.queue.outbox_timeout) for row, row_id in zip(rows, ids, strict=True)
        )

    def _connection(self) -> Connection:
        """The caller's connection, in its transaction: begun the way SQLAlchemy begins one on first use
        (autobegin), so a job may be enqueued before the application's own writes. NotInTransaction where
        SQLAlchemy would not begin one either (a Session made with ``autobegin=False``, a closed Connection)."""
        bind = self.bind
        if isinstance(bind, Session):
            try:
                return bind.connection(bind_arguments={"bind": self._engine_or_connection})
            except InvalidRequestError as exc:  # autobegin=False and no begin()
                raise NotInTransaction("Session") from exc
        if bind.closed or bind.invalidated:
            raise NotInTransaction("Connection")
        if not bind.in_transaction():
            bind.begin()  # what the Connection's next execute would do (autobegin); its commit() ends it
        return bind


def refuse_within(*, pipeline: Any, is_async: bool) -> None:
    if pipeline is not None:
        raise ConfigurationError("pipeline= cannot be used within a transaction: the job is written to the outbox")
    if not is_async:
        raise ConfigurationError("an is_async=False queue runs jobs at once; it cannot enqueue within a transaction")


# -- resolving what the caller gave ------------------------------------------------------


def _session_or_connection(given: Any) -> Session | Connection:
    if isinstance(given, scoped_session):
        given = given()  # Flask-SQLAlchemy's db.session: the Session of the current scope
    if isinstance(given, (Session, Connection)):
        _install_hooks()
        return given
    if type(given).__module__.startswith("sqlalchemy.ext.asyncio"):
        raise ConfigurationError(
            f"within() needs a synchronous SQLAlchemy Session or Connection; an {type(given).__name__} is not supported"
        )
    raise ConfigurationError(
        f"within() takes a SQLAlchemy Session or Connection with a transaction open, not {type(given).__name__}"
    )


def _check_schema(connection: Connection) -> tuple[str, ...]:
    """The outbox table, with every column this version needs, is in the caller's database; the columns
    of later migrations it lacks (``target``, ``delivery``: until the deploy's migration, rows are written
    in the shape the table has).

    Once per database once the schema is complete; on every call while it is not.
    """
    engine = connection.engine
    if engine in _complete_schemas:
        return ()
    inspector = inspect(connection)
    if not inspector.has_table(outbox_table.name):
        raise OutboxNotMigrated(outbox_table.name, f"the transaction's database has no {outbox_table.name!r} table")
    found = {column["name"] for column in inspector.get_columns(outbox_table.name)}
    if not {column.name for column in outbox_table.columns} - set(_OPTIONAL_COLUMNS) <= found:
        raise OutboxNotMigrated(outbox_table.name, "the outbox schema is older than this spillover")
    missing = tuple(column for column in _OPTIONAL_COLUMNS if column not in found)
    if not missing:
        _complete_schemas.add(engine)
    return missing


# -- after the commit --------------------------------------------------------------------


def _install_hooks() -> None:
    """Listen to every Session's commits, once per process; sessions that wrote no job pay a dict look-up."""
    global _hooks_installed
    if _hooks_installed:
        return
    with lanes.lock:
        if not _hooks_installed:
            event.listen(Session, "after_commit", _after_commit)
            event.listen(Session, "after_transaction_end", _after_transaction_end)
            _hooks_installed = True


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint was released: its rows wait for the outermost commit
    written: list[_Written] | None = session.info.pop(_INFO_KEY, None)
    if written:
        push_committed(written)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_INFO_KEY, None)  # rolled back or closed uncommitted: those rows never existed


def push_committed(written: list[_Written]) -> None:
    """Push a commit's rows into RQ, per lane in the order written. Never raises.

    It runs inside ``commit()``, after the database commit: an error here must not look
    to the caller like a failed commit. Whatever is not pushed stays for the replayer.
    Its outbox calls (the read-back, the resume checks) are bounded by the queues' outbox
    time limit: on a stalled outbox the commit returns, and the replayer delivers the rows.
    """
    with deadline.budget(max(item.outbox_timeout for item in written)):
        _push_committed(written)


def _push_committed(written: list[_Written]) -> None:
    # Redis's time before the rows are read back: each push's deadline counts from it (a replayer
    # may read, push and delete the same rows meanwhile; their markers outlive this deadline).
    lanes_written = {id(item.lane): item.lane for item in written}
    read_at = {lane_id: _redis_time(lane) for lane_id, lane in lanes_written.items()}
    try:
        committed = _committed(written)
    except Exception as exc:  # the outbox database cannot say which rows committed
        log.warning("could not read committed jobs back (%r); the replayer will deliver them", exc)
        for item in written:
            item.lane.spilling = True  # the next commits' jobs wait behind these (a bool: no lock to wait for)
        return
    by_lane: dict[int, list[_Written]] = {}
    for item in committed:
        by_lane.setdefault(id(item.lane), []).append(item)
    for lane_id, items in by_lane.items():
        try:
            _push(items, read_at[lane_id])
        except Exception:
            log.exception("pushing committed jobs failed; the replayer will deliver them")
            items[0].lane.spilling = True  # a bool: no lock to wait for


def _committed(written: list[_Written]) -> list[_Written]:
    """The rows that are committed, read back through spillover's own connection.

    The session's word is not enough: a savepoint rolled back (SQLAlchemy's or raw SQL)
    takes rows away, SQLite may even give their ids to later rows, and a session that
    joined an outer transaction "commits" while the database has not. A row another
    connection can read is committed: only those are pushed; the rest the replayer
    finds if and when they commit.
    """
    latest: dict[tuple[int, int], _Written] = {}
    for item in written:
        latest[(id(item.lane.outbox), item.row_id)] = item  # a reused id: only the later row can exist
    exists: set[tuple[int, int, str]] = set()
    for outbox in {id(item.lane.outbox): item.lane.outbox for item in written}.values():
        ids = [row_id for key, row_id in latest if key == id(outbox)]
        exists.update((id(outbox), row_id, job_id) for row_id, job_id in outbox.present(ids))
    return [item for item in latest.values() if (id(item.lane.outbox), item.row_id, item.row.job_id) in exists]


def _redis_time(lane: SpillLane) -> float | None:
    """Redis's time now, or None when Redis is down (no push at this commit: the replayer delivers)."""
    if not lane.health.is_up:
        return None
    try:
        return lane.pusher.clock.now_ms()
    except redis.RedisError as exc:
        lane.server_failed(exc)
        return None


def _push(items: list[_Written], read_at: float | None) -> None:
    """Push one lane's committed rows, unless older rows of this producer must go first."""
    lane = items[0].lane
    rows = [item.row for item in items]
    left = deadline.remaining()
    if not lane.lock.acquire(timeout=-1 if left is None else max(left, 0.0)):
        log.warning("another thread holds queue %s's outbox lane past the limit; the replayer delivers", lane.queue)
        lane.spilling = True  # these rows wait in the outbox, and the next commits' behind them (a bool: no lock)
        return
    try:
        if read_at is None or not lane.may_resume():
            lane.spilling = True  # these rows wait in the outbox, and so do the next commits' behind them
            return
        if before_push is not None:
            before_push()
        result = lane.pusher.push(lane.queue, rows, read_at=read_at)
        pushed = items[: len(result.codes)]
        pairs = [(item.row_id, item.row.job_id) for item in pushed]
        skipped = lane.outbox.mark_skipped(lane.queue, pairs, result.codes)  # unique, id in Redis: kept, skipped
        pushed = [item for item in pushed if item.row_id not in skipped]
        settler = lane.server.settler(lane.pusher.layout)
        _deleter(lane.outbox).add([(item.row_id, item.row.job_id, item.row.delivery, settler) for item in pushed])
        metrics.COMMITTED_PUSHED.labels(lane.queue).inc(len(pushed))
        parents.outbox_rows.pushed([(item.row.job_id, item.row.delivery) for item in pushed])
        if result.complete:
            return
        lane.spilling = True
        lane.push_failed(result, "committed jobs")
        if result.outage and result.ambiguous:
            _mark_ambiguous(lane.outbox, [item.row_id for item in items])
    finally:
        lane.lock.release()


def _mark_ambiguous(outbox: Outbox, ids: list[int]) -> None:
    try:
        outbox.mark_ambiguous(ids)
    except Exception as exc:  # the rows stay pending; only their age check is lost
        log.warning("could not flag rows %s as possibly delivered: %r", ids, exc)


def _deleter(outbox: Outbox) -> DeliveredRows:
    with lanes.lock:
        found = _deleters.get(outbox)
        if found is None:
            found = _deleters[outbox] = DeliveredRows(outbox)
        return found
