"""``spillover.Queue``: ``rq.Queue`` that spills to the outbox when Redis is unusable.

Healthy path: the job hash RQ would write (RQ's own ``Job.to_dict()``) goes to
the marker-guarded replay script, one call per enqueue or enqueue_many (one round
trip; no database access). Unhealthy path: the same row goes to the outbox
instead, and the queue stays in "spill mode" until this producer's rows are in
Redis, so one producer's jobs reach RQ in the order they were enqueued. The
replayer moves the bulk of them; the last few the producer pushes itself, through
the replayer's own marker-guarded script, so a producer that keeps enqueueing is
not left spilling behind a replayer that polls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
import rq
from redis.client import Pipeline
from rq.job import Job, JobStatus
from rq.queue import EnqueueData
from rq.utils import now
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import metrics, settings
from .errors import OutboxUnavailable
from .health import RedisHealth
from .markers import ConfirmedMarkers
from .outbox import Outbox, OutboxRow
from .redis_side import (
    DEFERRED,
    DUPLICATE,
    ReplayScript,
    bounded_client,
    is_ambiguous,
    is_outage,
    resolve_target,
    server_key,
)
from .stored_job import SpilledJob, encode_hash, schedule_timestamp

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session, scoped_session

    from .transaction import TransactionalQueue

log = logging.getLogger("spillover.queue")

#: While a queue is in spill mode, how often (s) to ask the outbox whether its rows are replayed.
RESUME_CHECK_INTERVAL = 0.1
#: At most this many of its own pending rows a producer pushes itself to leave spill mode;
#: a longer backlog is the replayer's, and the producer keeps spilling behind it.
RESUME_PUSH_LIMIT = 500

OutboxLike = Outbox | Engine | str | None


@dataclass
class _SpillState:
    """Per process, outbox, Redis server and queue: are we spilling, and our newest row."""

    spilling: bool = False
    last_row_id: int = 0
    checked_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Server:
    health: RedisHealth
    markers: ConfirmedMarkers
    version: tuple[int, int, int] | None = None


_lock = threading.Lock()
_servers: dict[tuple[Any, ...], _Server] = {}
_outboxes: dict[Any, Outbox] = {}
_spill_states: dict[tuple[Any, ...], _SpillState] = {}


def _reset_after_fork() -> None:
    """A lock held by another thread at fork time would never be released in the child."""
    global _lock
    _lock = threading.Lock()
    for state in _spill_states.values():
        state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _server_for(connection: redis.Redis, timeout: float, probe_interval: float) -> _Server:
    """One bounded client and breaker per Redis server, shared by every Queue of the process."""
    key = (*server_key(connection), timeout)
    with _lock:
        server = _servers.get(key)
        if server is None:
            client = bounded_client(connection, timeout)
            server = _Server(RedisHealth(client, probe_interval), ConfirmedMarkers(client))
            _servers[key] = server
        return server


def resolve_outbox(outbox: OutboxLike) -> Outbox:
    """An Outbox object, shared per URL or Engine so the process keeps one connection pool."""
    if isinstance(outbox, Outbox):
        return outbox
    key: Any = outbox if outbox is not None else settings.database_url()
    with _lock:
        found = _outboxes.get(key)
        if found is None:
            found = Outbox(key)
            _outboxes[key] = found
        return found


def was_spilled(job: Job) -> bool:
    """Whether ``job`` went to the outbox (True) rather than straight to Redis."""
    return bool(getattr(job, "spilled", False))


class Queue(rq.Queue):
    """Drop-in ``rq.Queue``; adds ``outbox=`` (URL, Engine or Outbox) and bounded Redis time.

    ``target=`` names the Redis the spilled rows are meant for (default: ``SPILLOVER_TARGET``,
    else ``host:port/db`` of ``connection``); a replayer drains only its own target's rows.

    Jobs carry their final id either way; ``was_spilled(job)`` tells which way they went.
    Calls that pass their own ``pipeline=`` or ``unique=True``, and ``is_async=False``
    queues, are RQ's own and are not spilled.
    """

    def __init__(
        self,
        name: str = "default",
        connection: redis.Redis | None = None,
        *args: Any,
        outbox: OutboxLike = None,
        redis_timeout: float | None = None,
        marker_ttl: int | None = None,
        target: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, connection, *args, **kwargs)
        self.outbox = resolve_outbox(outbox)
        #: The Redis this queue's spilled rows are meant for; replayers drain only their own target.
        self.target = resolve_target(target, self.connection)
        self.marker_ttl = settings.marker_ttl() if marker_ttl is None else marker_ttl
        timeout = settings.redis_timeout() if redis_timeout is None else redis_timeout
        self._server = _server_for(self.connection, timeout, settings.probe_interval())
        self._client = self._server.health.client
        self._script = ReplayScript(self._client, self.marker_ttl)
        # within(): per database of a caller's transaction, its Outbox and the sticky state of its rows
        self._within_destinations: weakref.WeakKeyDictionary[Engine, tuple[Outbox, _SpillState]] = (
            weakref.WeakKeyDictionary()
        )
        # Per database, not per Outbox object: two Outbox objects on one database share its rows.
        state_key = (self.outbox.engine.url, server_key(self.connection), self.target, name)
        with _lock:
            self._spill_state = _spill_states.setdefault(state_key, _SpillState())

    @property
    def health(self) -> RedisHealth:
        return self._server.health

    def get_redis_server_version(self) -> tuple[int, int, int]:
        """Cached per server (not per Queue object) and asked through the bounded client."""
        if self._server.version is None:
            version = str(self._client.info("server")["redis_version"])
            major, minor, patch = (int(part) for part in version.split(".")[:3])
            self._server.version = (major, minor, patch)
        self.redis_server_version = self._server.version
        return self._server.version

    def within(self, session_or_connection: Session | Connection | scoped_session[Any]) -> TransactionalQueue:
        """This queue's enqueue methods, writing each job into the caller's open transaction.

        The job exists if and only if that transaction commits: it is an outbox row in
        the caller's database (migrated with ``spillover db upgrade``), and after a
        Session's commit the producer pushes it into RQ at once; otherwise, and whenever
        that push cannot happen, the replayer delivers it. Nothing reaches Redis before
        the commit, and spillover never begins, commits or rolls back the transaction.
        """
        from .transaction import TransactionalQueue

        return TransactionalQueue(self, session_or_connection)

    # -- the three write paths of RQ ----------------------------------------------
    #
    # Each builds the outbox rows of its jobs once; the same rows go to Redis through the
    # replay script (one call, marker-guarded, dependencies decided inside it) or, when
    # Redis is unusable, to the outbox.

    def enqueue_job(
        self, job: Job, pipeline: Pipeline | None = None, at_front: bool = False, unique: bool = False
    ) -> Job:
        if pipeline is not None or unique or not self._is_async:
            return super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        self._prepare_offline(job)
        self._deliver([job], [self._row(job, at_front=at_front)])
        return job

    def schedule_job(self, job: Job, datetime: datetime, pipeline: Pipeline | None = None, unique: bool = False) -> Job:
        if pipeline is not None or unique:
            return super().schedule_job(job, datetime, pipeline=pipeline, unique=unique)
        job._status = JobStatus.SCHEDULED
        self._deliver([job], [self._row(job, scheduled_at=schedule_timestamp(datetime))])
        return job

    def enqueue_many(
        self, job_datas: Iterable[EnqueueData], pipeline: Pipeline | None = None, group_id: str | None = None
    ) -> list[Job]:
        if pipeline is not None or not self._is_async:
            return list(super().enqueue_many(job_datas, pipeline=pipeline, group_id=group_id))
        datas = list(job_datas)
        # As RQ orders them: jobs without dependencies first, then those with.
        datas = [data for data in datas if not data.depends_on] + [data for data in datas if data.depends_on]
        jobs = [self._create_from(data, group_id) for data in datas]
        rows = []
        for job, data in zip(jobs, datas, strict=True):
            self._prepare_offline(job)
            rows.append(self._row(job, at_front=bool(data.at_front)))
        if rows:
            self._deliver(jobs, rows)
        return jobs

    # -- choosing the path ---------------------------------------------------------

    def _deliver(self, jobs: Sequence[Job], rows: list[SpilledJob]) -> None:
        started = time.perf_counter()
        state = self._spill_state
        error: BaseException | None = None
        if not state.spilling and self.health.is_up:
            error = self._try_direct(jobs, rows)
            if error is None:
                self._count(metrics.DIRECT, len(jobs), started)
                return
        with state.lock:
            if error is None and self._may_resume(state, self.outbox):
                error = self._try_direct(jobs, rows)
                if error is None:
                    self._count(metrics.DIRECT, len(jobs), started)
                    return
            state.spilling = True
            if error is not None and is_ambiguous(error):
                rows = [replace(row, ambiguous=True) for row in rows]
            self._append(state, rows, error or self.health.last_error)
        for job in jobs:
            setattr(job, "spilled", True)  # noqa: B010 - Job has no such field
        self._count(metrics.SPILLED, len(jobs), started)

    def _count(self, path: str, jobs: int, started: float) -> None:
        metrics.ENQUEUED.labels(self.name, path).inc(jobs)
        metrics.ENQUEUE_SECONDS.labels(path).observe(time.perf_counter() - started)

    def _try_direct(self, jobs: Sequence[Job], rows: list[SpilledJob]) -> BaseException | None:
        """Write to Redis with the replay script; None on success, the error when Redis is unavailable.

        Any other error is raised, as RQ raises it.
        """
        try:
            codes, failure = self._script.start(self.name, rows).result()
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            self.health.mark_down(exc)
            return exc
        if failure is not None:
            # The rows before the failing one are written, with their markers: spilled
            # again, they are skipped on replay.
            error = redis.ResponseError(failure)
            if not is_outage(error):
                raise error
            self.health.mark_down(error)
            return error
        for job, code in zip(jobs, codes, strict=True):
            if code == DEFERRED:
                job._status, job.enqueued_at = JobStatus.DEFERRED, None
            setattr(job, "spilled", False)  # noqa: B010
        # The replies came back: nobody will ever look for these markers.
        self._server.markers.confirmed([job.id for job, code in zip(jobs, codes, strict=True) if code != DUPLICATE])
        return None

    def _may_resume(self, state: _SpillState, outbox: Outbox) -> bool:
        """Leave spill mode once Redis is up and none of this producer's rows in ``outbox`` is still pending.

        The last few (up to RESUME_PUSH_LIMIT) it pushes itself with the replay script:
        each push writes rows in id order and skips any job whose marker exists, so a
        replayer pushing the same rows at the same time cannot double or reorder them.
        """
        if not state.spilling:
            return self.health.is_up
        if not self.health.is_up or time.monotonic() - state.checked_at < RESUME_CHECK_INTERVAL:
            return False
        state.checked_at = time.monotonic()
        try:
            mine = outbox.own_pending(self.target, self.name, RESUME_PUSH_LIMIT + 1)
            too_old = any(row.ambiguous and row.age_seconds > self.marker_ttl for row in mine)
            if len(mine) > RESUME_PUSH_LIMIT or too_old:
                return False  # a backlog, or a row only the replayer may judge: it moves them
            if mine and not self._push_own(mine, outbox):
                return False
        except SQLAlchemyError:
            return False  # cannot tell: keep spilling, order first
        state.spilling = False
        return True

    def _push_own(self, rows: list[OutboxRow], outbox: Outbox) -> bool:
        """Push this producer's remaining rows into RQ and remove them; False if any is left."""
        try:
            codes, error = self._script.start(self.name, rows).result()
        except redis.RedisError as exc:
            if is_outage(exc):
                self.health.mark_down(exc)
            else:
                log.warning("pushing this producer's spilled rows failed, leaving them to the replayer: %r", exc)
            return False
        outbox.mark_delivered([row.id for row in rows[: len(codes)]], keep=False)
        return error is None

    def _append(self, state: _SpillState, spilled: list[SpilledJob], redis_error: BaseException | None) -> None:
        try:
            ids = self.outbox.append(spilled)
        except SQLAlchemyError as exc:
            if exc.__context__ is None:
                exc.__context__ = redis_error
            raise OutboxUnavailable(
                "job not enqueued: Redis is unavailable and the outbox write failed",
                redis_error=redis_error,
                outbox_error=exc,
            ) from exc
        state.last_row_id = max(state.last_row_id, *ids)

    # -- building what the outbox stores -------------------------------------------

    def _prepare_offline(self, job: Job) -> None:
        """What RQ's ``_prepare_for_queue`` sets, without asking Redis for its version."""
        job.origin = self.name
        job.enqueued_at = now()
        if job.timeout is None:
            job.timeout = self._default_timeout
        job._status = JobStatus.QUEUED

    def _row(self, job: Job, *, at_front: bool = False, scheduled_at: int | None = None) -> SpilledJob:
        """The job as the replay script and the outbox both take it."""
        return SpilledJob(
            target=self.target,
            queue=self.name,
            job_id=job.id,
            job_hash=encode_hash(job.to_dict()),
            at_front=at_front,
            scheduled_at=scheduled_at,
        )

    def _create_from(self, data: EnqueueData, group_id: str | None) -> Job:
        return self.create_job(
            func=data.func,
            args=data.args,
            kwargs=data.kwargs,
            timeout=data.timeout,
            result_ttl=data.result_ttl,
            ttl=data.ttl,
            failure_ttl=data.failure_ttl,
            description=data.description,
            depends_on=data.depends_on,
            job_id=data.job_id,
            meta=data.meta,
            retry=data.retry,
            repeat=data.repeat,
            on_success=data.on_success,
            on_failure=data.on_failure,
            on_stopped=data.on_stopped,
            webhooks=data.webhooks,
            group_id=group_id,
        )
