"""Enqueue inside the application's own transaction: ``queue.within(session_or_connection)``.

Each job is written as an outbox row through the caller's Session or Connection, in the
caller's transaction: rolled back, the row never existed; committed, it is as durable as
the application's own rows and the replayer delivers it. spillover never begins,
commits or rolls back that transaction, and writes nothing to Redis before the commit.

A Session does not wait for the replayer: its after-commit hook reads the rows back
(only committed rows are visible to another connection) and pushes them into RQ with
the replay script, so the job is in RQ when ``commit()`` returns. That script writes a
job and its delivery marker at once and skips a job whose marker exists, so a replayer
reading the same rows at the same moment cannot double them; a sweeper then deletes
the rows. Redis down costs the commit one bounded attempt, then the breaker skips it.
The markers stay for their TTL, as a replayed job's do: a replayer may still hold a
row it read before the delete.
One producer's transactional jobs of a queue keep their commit order by the same sticky
rule as spilling: once a push fails, later commits leave their rows to the replayer
until this producer's older rows are in RQ.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
from rq.job import Job
from rq.queue import EnqueueData
from sqlalchemy import Connection, Engine, event, insert, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from . import metrics
from . import queue as queue_module
from .errors import ConfigurationError, NotInTransaction, OutboxNotMigrated
from .outbox import Outbox, is_missing_table, producer_id
from .queue import Queue, _SpillState, resolve_outbox
from .redis_side import is_ambiguous, is_outage, server_key
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
_hooks_installed = False
_checked_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_deleters: weakref.WeakKeyDictionary[Outbox, DeliveredRows] = weakref.WeakKeyDictionary()


class DeliveredRows(Sweeper[int]):
    """Rows of one outbox the producer pushed into RQ itself, deleted in batches off the commit path.

    A row deleted late is pushed again by a replayer at most, and its marker makes that a no-op.
    """

    interval = 0.1
    name = "spillover-delivered-rows"

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def delete(self, ids: Sequence[int]) -> None:
        self.outbox.mark_delivered(ids, keep=False)


@dataclass
class _Written:
    """One job row written in a caller's transaction, waiting for its commit."""

    queue: Queue
    outbox: Outbox
    state: _SpillState
    row: SpilledJob
    row_id: int


class TransactionalQueue:
    """What ``Queue.within(session_or_connection)`` returns: RQ's enqueue methods, in the caller's transaction.

    ``enqueue``, ``enqueue_call``, ``enqueue_at``, ``enqueue_in`` and ``enqueue_many`` take
    what ``spillover.Queue``'s take and return the same jobs, with their final ids.
    """

    def __init__(self, queue: Queue, session_or_connection: Session | Connection | scoped_session[Any]) -> None:
        self.queue = queue
        self.bind = _session_or_connection(session_or_connection)
        engine_or_connection = self.bind.get_bind() if isinstance(self.bind, Session) else self.bind
        self._engine_or_connection: Engine | Connection = engine_or_connection
        self.outbox, self.state = _destination(queue, engine_or_connection.engine)
        self._writer = _Writer(self)

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

    prepare_data = staticmethod(Queue.prepare_data)  # builds enqueue_many's items, as on a Queue

    # -- writing ---------------------------------------------------------------------

    def write(self, rows: list[SpilledJob]) -> None:
        """Insert ``rows`` through the caller's connection, in its transaction; remember them for the commit."""
        connection = self._connection()
        with_target = _check_schema(connection)
        self.outbox.reserve_backlog(len(rows))
        producer = producer_id()
        params = [
            {
                "target": row.target,
                "queue": row.queue,
                "job_id": row.job_id,
                "job_hash": row.job_hash,
                "at_front": row.at_front,
                "scheduled_at": row.scheduled_at,
                "producer": producer,
            }
            for row in rows
        ]
        if not with_target:
            for param in params:
                del param["target"]
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
        written = self.bind.info.setdefault(_INFO_KEY, [])
        written.extend(
            _Written(self.queue, self.outbox, self.state, row, row_id) for row, row_id in zip(rows, ids, strict=True)
        )

    def _connection(self) -> Connection:
        """The caller's connection; NotInTransaction if no transaction is open on it."""
        bind = self.bind
        if isinstance(bind, Session):
            if not bind.in_transaction():
                raise NotInTransaction("Session")
            return bind.connection(bind_arguments={"bind": self._engine_or_connection})
        if bind.closed or not bind.in_transaction():
            raise NotInTransaction("Connection")
        return bind


class _Writer(Queue):
    """The queue's own write paths (same jobs, same rows) with the rows handed to a TransactionalQueue."""

    def __init__(self, owner: TransactionalQueue) -> None:  # the queue's state is shared, not rebuilt
        self.__dict__.update(owner.queue.__dict__)
        self._owner = owner

    def enqueue_job(
        self, job: Job, pipeline: Pipeline | None = None, at_front: bool = False, unique: bool = False
    ) -> Job:
        _refuse(pipeline=pipeline, unique=unique, is_async=self._is_async)
        return super().enqueue_job(job, at_front=at_front)

    def schedule_job(self, job: Job, datetime: datetime, pipeline: Pipeline | None = None, unique: bool = False) -> Job:
        _refuse(pipeline=pipeline, unique=unique, is_async=True)
        return super().schedule_job(job, datetime)

    def enqueue_many(
        self, job_datas: Iterable[EnqueueData], pipeline: Pipeline | None = None, group_id: str | None = None
    ) -> list[Job]:
        _refuse(pipeline=pipeline, unique=False, is_async=self._is_async)
        return super().enqueue_many(job_datas, group_id=group_id)

    def _deliver(self, jobs: Sequence[Job], rows: list[SpilledJob]) -> None:
        self._owner.write(rows)
        for job in jobs:
            setattr(job, "spilled", False)  # noqa: B010 - Job has no such field


def _refuse(*, pipeline: Any, unique: bool, is_async: bool) -> None:
    if pipeline is not None:
        raise ConfigurationError("pipeline= cannot be used within a transaction: the job is written to the outbox")
    if unique:
        raise ConfigurationError("unique=True cannot be used within a transaction: it is decided in Redis at once")
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


def _destination(queue: Queue, engine: Engine) -> tuple[Outbox, _SpillState]:
    """spillover's own Outbox on the caller's database, and the sticky state of ``queue``'s rows in it.

    The Outbox is the queue's own when ``outbox=`` is that database, else one made from
    the engine's URL. Remembered per queue and engine: within() runs once per request.
    """
    found = queue._within_destinations.get(engine)
    if found is not None:
        return found
    url = engine.url.render_as_string(hide_password=False)
    same = queue.outbox.engine.url.render_as_string(hide_password=False) == url
    outbox = queue.outbox if same else resolve_outbox(url)
    # Beside the plain path's states (renewed with them after a fork), apart from them: plain
    # enqueues are not held back by transactional rows, nor these by spills.
    state_key = ("transaction", outbox.engine.url, server_key(queue.connection), queue.target, queue.name)
    with queue_module._lock:
        found = (outbox, queue_module._spill_states.setdefault(state_key, _SpillState()))
    queue._within_destinations[engine] = found
    return found


def _check_schema(connection: Connection) -> bool:
    """The outbox table, with every column this version writes, is in the caller's database; whether it has
    ``target`` (0002 and later: until the deploy's migration, rows are written in the 0001 shape).

    Once per database once the schema is complete; on every call while it is not.
    """
    engine = connection.engine
    if engine in _checked_engines:
        return True
    inspector = inspect(connection)
    if not inspector.has_table(outbox_table.name):
        raise OutboxNotMigrated(outbox_table.name, f"the transaction's database has no {outbox_table.name!r} table")
    found = {column["name"] for column in inspector.get_columns(outbox_table.name)}
    if not {column.name for column in outbox_table.columns} - {"target"} <= found:
        raise OutboxNotMigrated(outbox_table.name, "the outbox schema is older than this spillover")
    if "target" not in found:
        return False
    _checked_engines.add(engine)
    return True


# -- after the commit --------------------------------------------------------------------


def _install_hooks() -> None:
    """Listen to every Session's commits, once per process; sessions that wrote no job pay a dict look-up."""
    global _hooks_installed
    if _hooks_installed:
        return
    with queue_module._lock:
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
    """Push a commit's rows into RQ, per queue in the order written. Never raises.

    It runs inside ``commit()``, after the database commit: an error here must not look
    to the caller like a failed commit. Whatever is not pushed stays for the replayer.
    """
    try:
        committed = _committed(written)
    except Exception as exc:  # the outbox database cannot say which rows committed
        log.warning("could not read committed jobs back (%r); the replayer will deliver them", exc)
        for item in written:
            with item.state.lock:
                item.state.spilling = True  # the next commits' jobs wait behind these
        return
    by_state: dict[int, list[_Written]] = {}
    for item in committed:
        by_state.setdefault(id(item.state), []).append(item)
    for items in by_state.values():
        try:
            _push(items)
        except Exception:
            log.exception("pushing committed jobs failed; the replayer will deliver them")
            with items[0].state.lock:
                items[0].state.spilling = True


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
        latest[(id(item.outbox), item.row_id)] = item  # a reused id: only the later row can exist
    exists: set[tuple[int, int, str]] = set()
    for outbox in {id(item.outbox): item.outbox for item in written}.values():
        ids = [row_id for key, row_id in latest if key == id(outbox)]
        exists.update((id(outbox), row_id, job_id) for row_id, job_id in outbox.present(ids))
    return [item for item in latest.values() if (id(item.outbox), item.row_id, item.row.job_id) in exists]


def _push(items: list[_Written]) -> None:
    """Push one queue's committed rows, unless older rows of this producer must go first."""
    queue, outbox, state = items[0].queue, items[0].outbox, items[0].state
    rows, ids = [item.row for item in items], [item.row_id for item in items]
    with state.lock:
        if not queue._may_resume(state, outbox):
            state.spilling = True  # these rows wait in the outbox, and so do the next commits' behind them
            return
        if before_push is not None:
            before_push()
        try:
            codes, failure = queue._script.start(queue.name, rows).result()
        except redis.RedisError as exc:
            state.spilling = True
            if not is_outage(exc):
                log.warning("pushing committed jobs failed, leaving them to the replayer: %r", exc)
                return
            queue.health.mark_down(exc)
            if is_ambiguous(exc):
                _mark_ambiguous(outbox, ids)
            return
        _deleter(outbox).add(ids[: len(codes)])
        metrics.COMMITTED_PUSHED.labels(queue.name).inc(len(codes))
        if failure is not None:
            state.spilling = True
            error = redis.ResponseError(failure)
            if is_outage(error):
                queue.health.mark_down(error)
            else:
                log.warning("pushing a committed job failed, leaving it to the replayer: %s", failure)


def _mark_ambiguous(outbox: Outbox, ids: list[int]) -> None:
    try:
        outbox.mark_ambiguous(ids)
    except Exception as exc:  # the rows stay pending; only their age check is lost
        log.warning("could not flag rows %s as possibly delivered: %r", ids, exc)


def _deleter(outbox: Outbox) -> DeliveredRows:
    with queue_module._lock:
        found = _deleters.get(outbox)
        if found is None:
            found = _deleters[outbox] = DeliveredRows(outbox)
        return found
