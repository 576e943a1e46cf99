"""``spillover.Queue``: ``rq.Queue`` that spills to the outbox when Redis is unusable.

Healthy path: the job hash RQ would write (RQ's own ``Job.to_dict()``) goes to Redis
through the pusher (pusher.py), one call per enqueue or enqueue_many (one round trip; no
database access). Unhealthy path: the same row goes to the outbox instead, and the
queue's spill lane (lanes.py) stays spilling until this producer's rows are in Redis, so
one producer's jobs reach RQ in the order they were enqueued.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import redis
import rq
from redis.client import Pipeline
from rq.exceptions import DuplicateJobError
from rq.job import Dependency, Job, JobStatus
from rq.queue import EnqueueData
from rq.utils import now
from sqlalchemy import Engine

from . import deadline, doubt, metrics, settings
from .errors import BacklogFull, OutboxNotMigrated, OutboxUnavailable
from .health import RedisHealth
from .lanes import OutboxLike, SpillLane, lane_for, resolve_outbox, server_for
from .parents import OUTBOX_DELIVERY, OutboxParent, outbox_rows
from .pusher import DEFERRED, EXISTS, QUEUED, Pusher
from .redis_side import resolve_target
from .rq_keys import DEFAULT_PREFIX, KeyLayout, layout_of_queue, stored_target
from .stored_job import SpilledJob, encode_hash, new_delivery_id, schedule_timestamp
from .transaction import TransactionalQueue, refuse_within

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session, scoped_session

__all__ = ["OutboxLike", "Queue", "resolve_outbox", "was_spilled"]

#: The installed RQ's major version: some rules of plain RQ differ between 2 and 3, and plain RQ's
#: behaviour on the same call is the reference.
RQ_MAJOR = int(rq.__version__.split(".")[0])
#: RQ's job status of a job waiting for a slot of its rate limit (RQ 3).
RATE_LIMITED_STATUS = "rate_limited"


class _Failed(NamedTuple):
    """Why a direct write did not happen, and whether it may have happened all the same."""

    error: BaseException
    ambiguous: bool


def was_spilled(job: Job) -> bool:
    """Whether ``job`` went to the outbox (True) rather than straight to Redis."""
    return bool(getattr(job, "spilled", False))


def _outbox_parents(depends_on: Any) -> dict[str, OutboxParent]:
    """Of the parents given to ``create_job``, those given as Job objects whose row went to an outbox."""
    found: dict[str, OutboxParent] = {}
    for item in depends_on if isinstance(depends_on, (list, tuple)) else [depends_on]:
        parents: Any = item.dependencies if isinstance(item, Dependency) else item
        for parent in parents if isinstance(parents, (list, tuple)) else [parents]:
            delivery = getattr(parent, OUTBOX_DELIVERY, None)
            if isinstance(parent, Job) and delivery is not None:
                found[parent.id] = delivery
    return found


class Queue(rq.Queue):
    """Drop-in ``rq.Queue``; adds ``outbox=`` (URL, Engine or Outbox) and bounded Redis time.

    ``target=`` names the Redis the spilled rows are meant for (default: ``SPILLOVER_TARGET``,
    else ``host:port/db`` of ``connection``); a replayer drains only its own target's rows.

    Jobs carry their final id either way; ``was_spilled(job)`` tells which way they went.
    Each enqueue is a delivery of its own: enqueueing a job id again enqueues it again, as in RQ.
    Keys follow RQ's key prefix (``RQ_KEY_PREFIX``, RQ 3), which the spilled rows carry.

    ``unique=True``: with Redis healthy, RQ's rule and error (``DuplicateJobError``). A spilled
    unique job cannot be checked until it is replayed: the caller gets the job, and if its id is
    in Redis by then the replay writes nothing and records the row as ``skipped`` (logged,
    counted in ``spillover_unique_skipped_total``, shown by ``spillover status``).
    Calls that pass their own ``pipeline=``, and ``is_async=False`` queues, are RQ's own and
    are not spilled.

    ``depends_on``: RQ counts a parent it cannot find in Redis as done. A parent whose row went to an
    outbox (spilled, or enqueued ``within()`` a transaction) is not done until it is pushed: its child,
    on any queue and whichever way it goes, is deferred (RQ's deferred registry, the parent's dependents)
    until the parent is pushed and finishes, when RQ enqueues it. Known from the parent ``Job`` enqueue
    returned, or, for a parent given by id, from this process's last 10,000 such ids. A child of a
    transactional parent that rolls back stays deferred, visible in RQ's deferred registry, never run.
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
        outbox_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, connection, *args, **kwargs)
        #: RQ's key names for this queue and its job class (one prefix: ConfigurationError otherwise).
        self.key_layout: KeyLayout = layout_of_queue(
            self.redis_queue_namespace_prefix,
            self.job_class.redis_job_namespace_prefix,
            self.redis_queues_keys,
            getattr(rq.defaults, "RQ_KEY_PREFIX", DEFAULT_PREFIX),  # RQ 2: always "rq"
        )
        self.outbox = resolve_outbox(outbox)
        #: The Redis this queue's spilled rows are meant for; replayers drain only their own target.
        self.target = resolve_target(target, self.connection)
        self._stored_target = stored_target(self.target, self.key_layout)  # the prefix travels with the rows
        self.marker_ttl = settings.marker_ttl() if marker_ttl is None else marker_ttl
        #: Seconds an enqueue may spend on the outbox database before OutboxUnavailable.
        self.outbox_timeout = settings.outbox_timeout() if outbox_timeout is None else outbox_timeout
        timeout = settings.redis_timeout() if redis_timeout is None else redis_timeout
        self._server = server_for(self.connection, timeout, settings.probe_interval(), self.key_layout)
        self._client = self._server.client
        self._pusher: Pusher = self._server.pusher(self.marker_ttl, self.key_layout)
        self._settler = self._server.settler(self.key_layout)
        self._lane = lane_for("plain", self.outbox, self._server, self._pusher, self._stored_target, name)
        # within(): per database of a caller's transaction, the lane of its rows
        self._within_lanes: weakref.WeakKeyDictionary[Engine, SpillLane] = weakref.WeakKeyDictionary()
        self._metrics: dict[str, tuple[Any, Any]] = {}  # per path: this queue's enqueue counter and timer
        for reason in metrics.FAILURE_REASONS:  # at 0 from the start: the first failure is an increase
            metrics.ENQUEUE_FAILED.labels(name, reason)

    @classmethod
    def from_rq(cls, queue: rq.Queue, **options: Any) -> Queue:
        """A spillover Queue standing for ``queue``, an ``rq.Queue`` a framework built (Flask-RQ, say):
        the same name, Redis connection, job class, serializer, default timeout and ``is_async``;
        ``options`` are spillover's (``outbox=``, ``target=``, ...)."""
        return cls(
            queue.name,
            connection=queue.connection,
            default_timeout=queue._default_timeout,
            is_async=queue._is_async,
            job_class=queue.job_class,
            serializer=queue.serializer,
            death_penalty_class=queue.death_penalty_class,
            **options,
        )

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
        the commit. A Session or Connection with no transaction yet begins one, as SQLAlchemy's
        autobegin does; spillover never commits or rolls it back. A job enqueued outside the
        transaction that depends on it is deferred until it is pushed and finishes; if the
        transaction rolls back, that child stays deferred (never run).
        """
        return TransactionalQueue(self, session_or_connection, _WithinWriter)

    def lane_within(self, engine: Engine) -> SpillLane:
        """The lane of this queue's rows written in transactions on ``engine``'s database.

        Its Outbox is the queue's own when ``outbox=`` is that database, else one made from the
        engine's URL. Remembered per engine: within() runs once per request.
        """
        found = self._within_lanes.get(engine)
        if found is None:
            url = engine.url.render_as_string(hide_password=False)
            same = self.outbox.engine.url.render_as_string(hide_password=False) == url
            outbox = self.outbox if same else resolve_outbox(url)
            found = lane_for("transaction", outbox, self._server, self._pusher, self._stored_target, self.name)
            self._within_lanes[engine] = found
        return found

    # -- the three write paths of RQ ----------------------------------------------
    #
    # Each builds the outbox rows of its jobs once; the same rows go to Redis through the
    # pusher (one call, marker-guarded, dependencies decided inside it) or, when Redis is
    # unusable, to the outbox.

    def enqueue_job(
        self, job: Job, pipeline: Pipeline | None = None, at_front: bool = False, unique: bool = False
    ) -> Job:
        if pipeline is not None or not self._is_async:
            return super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        self._check_enqueue(job, unique)
        if _rate_limited(job):
            self._prepare_rate_limited(job, at_front)
        else:
            self._prepare_offline(job)
        self._deliver([job], [self._row(job, at_front=at_front, unique=unique)])
        return job

    def schedule_job(self, job: Job, datetime: datetime, pipeline: Pipeline | None = None, unique: bool = False) -> Job:
        if pipeline is not None:
            return super().schedule_job(job, datetime, pipeline=pipeline, unique=unique)
        check_prefix = getattr(self, "_check_rate_limit_namespace", None)  # RQ 3's checks, in its order
        if check_prefix is not None:
            check_prefix(job)
        if unique and not job._id:
            raise ValueError("unique=True requires an explicit job_id")
        job._status = JobStatus.SCHEDULED
        self._deliver([job], [self._row(job, scheduled_at=schedule_timestamp(datetime), unique=unique)])
        return job

    def enqueue_many(
        self, job_datas: Iterable[EnqueueData], pipeline: Pipeline | None = None, group_id: str | None = None
    ) -> list[Job]:
        if pipeline is not None or not self._is_async:
            return list(super().enqueue_many(job_datas, pipeline=pipeline, group_id=group_id))
        return self.enqueue_many_into(job_datas, group_id, join_group=False)

    def enqueue_many_into(
        self, job_datas: Iterable[EnqueueData], group_id: str | None, *, join_group: bool
    ) -> list[Job]:
        """``enqueue_many``; with ``join_group``, the jobs also join RQ Group ``group_id`` (its keys), as
        ``Group.enqueue_many`` adds them (spillover.Group)."""
        datas = list(job_datas)
        if RQ_MAJOR >= 3:  # RQ 3 refuses a job id twice in one call (one key would lose a job)
            given = [data.job_id for data in datas if data.job_id is not None]
            for job_id in given:
                if given.count(job_id) > 1:
                    raise ValueError(f"Job ID '{job_id}' appears more than once in enqueue_many()")
        # As RQ orders them: jobs without dependencies first, then those with.
        datas = [data for data in datas if not data.depends_on] + [data for data in datas if data.depends_on]
        jobs = [self._create_from(data, group_id) for data in datas]
        group = group_id if join_group else None
        rows = []
        for job, data in zip(jobs, datas, strict=True):
            self._prepare_offline(job)
            front = bool(data.at_front)
            if data.depends_on:  # RQ enqueues a dependent job whose parents are done with the Dependency's
                # enqueue_at_front (RQ 3: or the data's at_front)
                front = bool(job.enqueue_at_front) or (RQ_MAJOR >= 3 and front)
            rows.append(self._row(job, at_front=front, group=group, many=True))
        if rows:
            self._deliver(jobs, rows)
        return jobs

    def create_job(self, *args: Any, **kwargs: Any) -> Job:
        """RQ's ``create_job``; a parent given as a Job whose row went to an outbox is remembered with it."""
        job = super().create_job(*args, **kwargs)
        depends_on = kwargs.get("depends_on")
        if depends_on is not None:
            job._spillover_parents = _outbox_parents(depends_on)  # type: ignore[attr-defined]
        return job

    def _check_enqueue(self, job: Job, unique: bool) -> None:
        """The checks RQ's ``enqueue_job`` makes before writing anything, with its errors."""
        check_prefix = getattr(self, "_check_rate_limit_namespace", None)  # RQ 3
        if check_prefix is not None:
            check_prefix(job)
        if unique and not job._id:
            raise ValueError("unique=True requires an explicit job_id")
        if unique and job._dependency_ids:
            raise ValueError("unique=True is not supported with job dependencies")
        if unique and _rate_limited(job):
            raise ValueError("unique=True is not supported with rate-limited jobs")

    # -- choosing the path ---------------------------------------------------------

    def _deliver(self, jobs: Sequence[Job], rows: list[SpilledJob]) -> None:
        """Into Redis if it is healthy and this lane is not spilling, else into the outbox.

        The outbox side (the lane's lock, the resume checks, the INSERT) is bounded by
        ``outbox_timeout`` counted from the call: OutboxUnavailable when it runs out.
        """
        started = time.perf_counter()
        called = time.monotonic()
        rows = doubt.as_retries(rows)
        lane = self._lane
        failed: _Failed | None = None
        if not lane.spilling and self.health.is_up:
            failed = self._try_direct(jobs, rows)
            if failed is None:
                self._count(metrics.DIRECT, len(jobs), started)
                return
        with deadline.budget(self.outbox_timeout, since=called), _counting_failures(self.name, len(jobs)):
            lane.acquire(failed.error if failed else self.health.last_error)
            try:
                if failed is None and lane.may_resume():
                    failed = self._try_direct(jobs, rows)
                    if failed is None:
                        self._count(metrics.DIRECT, len(jobs), started)
                        return
                lane.spilling = True
                if failed is not None and failed.ambiguous:
                    rows = [replace(row, ambiguous=True) for row in rows]
                lane.append(rows, failed.error if failed else self.health.last_error)
            finally:
                lane.lock.release()
        outbox_rows.add(jobs, rows)
        for job in jobs:
            setattr(job, "spilled", True)  # noqa: B010 - Job has no such field
        self._count(metrics.SPILLED, len(jobs), started)

    def _count(self, path: str, jobs: int, started: float) -> None:
        found = self._metrics.get(path)
        if found is None:  # a label look-up per enqueue is measurable on the healthy path: once per queue
            found = self._metrics[path] = (
                metrics.ENQUEUED.labels(self.name, path),
                metrics.ENQUEUE_SECONDS.labels(path),
            )
        found[0].inc(jobs)
        found[1].observe(time.perf_counter() - started)

    def _try_direct(self, jobs: Sequence[Job], rows: list[SpilledJob]) -> _Failed | None:
        """Push to Redis; None on success, why not when Redis did not take the jobs and they must spill.

        Any other error is raised, as RQ raises it.
        """
        result = self._pusher.push(self.name, rows, from_outbox=False)
        done = [(row.job_id, row.delivery) for row in rows[: len(result.codes)]]
        if result.complete:
            # the reply came back: nobody will look for these markers (but a retried delivery's first copy may)
            self._settler.confirmed(doubt.settleable(done, rows))
            doubt.settled(rows)
            if outbox_rows:  # these ids are in Redis now, as RQ writes them: no longer outbox parents
                outbox_rows.forget(jobs)
            for job, code in zip(jobs, result.codes, strict=True):
                if code == EXISTS:  # unique=True (one job per call): RQ's error, nothing written
                    raise DuplicateJobError(f"Job with ID '{job.id}' already exists")
                if code == DEFERRED:
                    job._status, job.enqueued_at = JobStatus.DEFERRED, None
                elif code == QUEUED and job._status == RATE_LIMITED_STATUS:  # it had a free slot at once
                    job._status, job.enqueued_at = JobStatus.QUEUED, now()
                setattr(job, "spilled", False)  # noqa: B010
            return None
        if result.refusal is not None or result.outage:
            # Redis did not take them: the breaker and the clock as for any push of this lane. Rows written
            # before a failing one have their markers: spilled again, they are skipped on replay.
            self._lane.push_failed(result, "jobs")
            refused = redis.TimeoutError(f"redis refused the write as {str(result.refusal).lower()}")
            return _Failed(result.error or refused, result.ambiguous)
        assert result.error is not None
        # written before the failing job; they stay, as in RQ (a retried delivery's marker stays too)
        self._settler.confirmed(
            [item for item, row in zip(done, rows, strict=False) if not doubt.keeps_marker(row.options)]
        )
        raise result.error

    # -- building what the outbox stores -------------------------------------------

    def _prepare_offline(self, job: Job) -> None:
        """What RQ's ``_prepare_for_queue`` sets, without asking Redis for its version."""
        job.origin = self.name
        job.enqueued_at = now()
        if job.timeout is None:
            job.timeout = self._default_timeout
        job._status = JobStatus.QUEUED

    def _prepare_rate_limited(self, job: Job, at_front: bool) -> None:
        """What RQ 3's ``_enqueue_rate_limited_job`` sets: the job waits for a slot (no enqueued_at yet)."""
        job.origin = self.name
        if job.timeout is None:
            job.timeout = self._default_timeout
        job._status = JobStatus(RATE_LIMITED_STATUS)  # only RQ 3 jobs have a rate limit
        # at_front: the script sets enqueue_at_front once it knows the job is not deferred, as RQ does

    def _row(
        self,
        job: Job,
        *,
        at_front: bool = False,
        scheduled_at: int | None = None,
        unique: bool = False,
        group: str | None = None,
        many: bool = False,
    ) -> SpilledJob:
        """The job as the pusher and the outbox both take it, with the id of this delivery.

        ``many``: an enqueue_many job, whose dependencies RQ records even when met, deciding with
        ``Job.dependencies_are_met`` (a failed parent is done for a job that allows failures; for
        enqueue_job only from RQ 3 on).
        """
        options: dict[str, Any] = {}
        if unique:
            options["unique"] = True
        if group is not None:
            options["group"] = group
        if _rate_limited(job):
            options["rate_limit"] = True  # replayed right only by 0.5 and later: refused before 0005
        if job._dependency_ids:
            if many:
                options["register"] = True
            if job.allow_dependency_failures and (many or RQ_MAJOR >= 3):
                options["failed_ok"] = True
            # Parents whose rows went to an outbox (spilled, or written within a transaction), with their
            # delivery ids: until such a parent is pushed, its absence from Redis does not mean done.
            given: dict[str, OutboxParent] = getattr(job, "_spillover_parents", None) or {}
            in_outbox = {}
            for parent in job._dependency_ids:
                found = given.get(parent) or outbox_rows.get(parent)
                if found is not None and found.holds_for(self._stored_target):
                    in_outbox[parent] = found.delivery
            if in_outbox:
                options["outbox_parents"] = in_outbox
        return SpilledJob(
            target=self._stored_target,
            queue=self.name,
            job_id=job.id,
            job_hash=encode_hash(job.to_dict()),
            at_front=at_front,
            scheduled_at=scheduled_at,
            delivery=new_delivery_id(),
            options=json.dumps(options, separators=(",", ":")) if options else None,
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


@contextmanager
def _counting_failures(queue: str, jobs: int) -> Iterator[None]:
    """Count the jobs an enqueue raised for (not enqueued): producers' only trace of them besides the caller's."""
    try:
        yield
    except BacklogFull:
        metrics.ENQUEUE_FAILED.labels(queue, metrics.BACKLOG_FULL).inc(jobs)
        raise
    except OutboxUnavailable as exc:
        reason = metrics.OUTBOX_IN_DOUBT if exc.in_doubt else metrics.OUTBOX_UNAVAILABLE
        metrics.ENQUEUE_FAILED.labels(queue, reason).inc(jobs)
        raise
    except OutboxNotMigrated:
        metrics.ENQUEUE_FAILED.labels(queue, metrics.OUTBOX_NOT_MIGRATED).inc(jobs)
        raise


def _rate_limited(job: Job) -> bool:
    """Whether the job goes through an RQ 3 rate limit (RQ 2's jobs have none)."""
    return bool(getattr(job, "rate_limit_key", None))


class _WithinWriter(Queue):
    """A queue's own write paths (same jobs, same rows) with the rows handed to a TransactionalQueue."""

    def __init__(self, owner: TransactionalQueue) -> None:  # the queue's state is shared, not rebuilt
        self.__dict__.update(owner.queue.__dict__)
        self._owner = owner

    def enqueue_job(
        self, job: Job, pipeline: Pipeline | None = None, at_front: bool = False, unique: bool = False
    ) -> Job:
        refuse_within(pipeline=pipeline, is_async=self._is_async)
        return super().enqueue_job(job, at_front=at_front, unique=unique)  # unique: decided when pushed

    def schedule_job(self, job: Job, datetime: datetime, pipeline: Pipeline | None = None, unique: bool = False) -> Job:
        refuse_within(pipeline=pipeline, is_async=True)
        return super().schedule_job(job, datetime, unique=unique)

    def enqueue_many(
        self, job_datas: Iterable[EnqueueData], pipeline: Pipeline | None = None, group_id: str | None = None
    ) -> list[Job]:
        refuse_within(pipeline=pipeline, is_async=self._is_async)
        return super().enqueue_many(job_datas, group_id=group_id)

    def _deliver(self, jobs: Sequence[Job], rows: list[SpilledJob]) -> None:
        self._owner.write(rows)
        outbox_rows.add(jobs, rows)  # its dependents wait for its push: it may never come (a rollback)
        for job in jobs:
            setattr(job, "spilled", False)  # noqa: B010 - Job has no such field
