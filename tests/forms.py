"""Every enqueue form and option, with fixed job ids, to run on rq.Queue and spillover.Queue alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import jobs
import rq
from helpers import LAYOUT, snapshot
from rq import Callback, Queue, Repeat, Retry
from rq.exceptions import DuplicateJobError
from rq.group import Group
from rq.job import Dependency

import spillover

RQ_MAJOR = int(rq.__version__.split(".")[0])

AT = datetime(2031, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def plain(q: Any) -> None:
    q.enqueue(jobs.noop, 1, "two", key=3, job_id="plain")


def options(q: Any) -> None:
    q.enqueue(
        jobs.noop,
        {"a": [1, 2]},
        job_id="options",
        job_timeout=30,
        result_ttl=600,
        ttl=3600,
        failure_ttl=900,
        description="all the options",
        meta={"tenant": "acme", "n": 7},
        retry=Retry(max=3, interval=[1, 5]),
        on_success=Callback(jobs.on_success),
        on_failure=Callback(jobs.on_failure, timeout=12),
    )


def by_name(q: Any) -> None:
    q.enqueue("jobs.noop", "by dotted name", job_id="by-name")


def at_front(q: Any) -> None:
    q.enqueue(jobs.noop, job_id="back-1")
    q.enqueue(jobs.noop, job_id="front", at_front=True)


def enqueue_call(q: Any) -> None:
    q.enqueue_call(jobs.noop, args=(1,), kwargs={"k": 2}, timeout=45, job_id="call", meta={"m": 1})


def enqueue_at(q: Any) -> None:
    q.enqueue_at(AT, jobs.noop, "later", job_id="at", meta={"when": "later"})


def enqueue_in(q: Any) -> None:
    # enqueue_in is relative to now: compare the registry member, the score is checked separately
    q.enqueue_in(timedelta(days=3650), jobs.noop, job_id="in")


def enqueue_many(q: Any) -> None:
    q.enqueue_many(
        [q.prepare_data(jobs.noop, (i,), job_id=f"many-{i}", timeout=20 + i, meta={"i": i}) for i in range(5)]
    )


def depends_on_unfinished(q: Any) -> None:
    """The parent is queued (not finished) wherever the child lands: the child is deferred."""
    q.enqueue(jobs.noop, job_id="child", depends_on=Dependency(jobs=["parent"], enqueue_at_front=True), ttl=500)


def depends_on_missing(q: Any) -> None:
    """RQ treats a parent it cannot find as done: the child is queued at once."""
    q.enqueue(jobs.noop, job_id="orphan", depends_on="no-such-parent")


def repeat_and_retry(q: Any) -> None:
    q.enqueue(jobs.noop, job_id="repeat", repeat=Repeat(times=3, interval=[10, 20]))
    q.enqueue(jobs.noop, job_id="retry-front", retry=Retry(max=2, interval=5, enqueue_at_front=True))


def unique(q: Any) -> None:
    q.enqueue(jobs.noop, "once", job_id="unique", unique=True)
    q.enqueue_call(jobs.noop, args=("front",), job_id="unique-front", at_front=True, unique=True)


def unique_taken(q: Any) -> None:
    """RQ refuses it (DuplicateJobError); spilled, the replay skips it: Redis ends up the same."""
    with contextlib.suppress(DuplicateJobError):
        q.enqueue(jobs.noop, "second", job_id="taken", unique=True)


def enqueue_many_group_id(q: Any) -> None:
    """Queue.enqueue_many(group_id=...) writes the field only (Group keys come from Group.enqueue_many)."""
    q.enqueue_many([q.prepare_data(jobs.noop, (i,), job_id=f"gid-{i}") for i in range(3)], group_id="g-field")


def group(q: Any) -> None:
    """RQ's Group.enqueue_many: the jobs and the Group keys (spillover.Group through a spillover Queue)."""
    group_class = spillover.Group if isinstance(q, (spillover.Queue, spillover.TransactionalQueue)) else Group
    batch = group_class.create(connection=q.connection, name="batch-7")
    batch.enqueue_many(q, [q.prepare_data(jobs.noop, (i,), job_id=f"grouped-{i}") for i in range(3)])


def enqueue_many_dependencies(q: Any) -> None:
    q.enqueue_many(
        [
            q.prepare_data(jobs.noop, job_id="many-parent"),
            q.prepare_data(jobs.noop, job_id="many-child", depends_on="many-parent", at_front=True),
            q.prepare_data(jobs.noop, job_id="many-orphan", depends_on="no-such-parent", at_front=True),
        ]
    )


def depends_on_failed(q: Any) -> None:
    """A failed parent: RQ 3 enqueues a child that allows failures, RQ 2 defers it; the other is deferred."""
    q.enqueue(jobs.noop, job_id="tolerant", depends_on=Dependency(jobs=["failed-parent"], allow_failure=True))
    q.enqueue(jobs.noop, job_id="intolerant", depends_on="failed-parent")


def rate_limit(q: Any) -> None:
    """RQ 3: two of three get a slot at once, the third waits in the limit's set."""
    for i in range(3):
        q.enqueue(jobs.noop, i, job_id=f"limited-{i}", rate_limit=rq.RateLimit("api", concurrency=2))
    q.enqueue(jobs.noop, job_id="limited-front", at_front=True, rate_limit=rq.RateLimit("other", concurrency=1))
    # deferred first (its parent is queued): RQ marks it for the front only once it goes through the limit
    limit = rq.RateLimit("api", concurrency=2)
    q.enqueue(jobs.noop, job_id="limited-child", at_front=True, depends_on="rl-parent", rate_limit=limit)


ALL_FORMS: list[Callable[[Any], None]] = [
    plain,
    options,
    by_name,
    at_front,
    enqueue_call,
    enqueue_at,
    enqueue_in,
    enqueue_many,
    depends_on_unfinished,
    depends_on_missing,
    repeat_and_retry,
    unique,
    unique_taken,
    enqueue_many_group_id,
    group,
    enqueue_many_dependencies,
    depends_on_failed,
]
if RQ_MAJOR >= 3:
    ALL_FORMS.append(rate_limit)
FORMS: dict[str, Callable[[Any], None]] = {f.__name__: f for f in ALL_FORMS}


def prepare(form: Callable[[Any], None], client: Any) -> None:
    """What a form needs in Redis beforehand, written by plain RQ."""
    q = Queue("q", connection=client)
    if form is depends_on_unfinished:
        q.enqueue(jobs.noop, job_id="parent")
    elif form is unique_taken:
        q.enqueue(jobs.noop, "first", job_id="taken")
    elif form.__name__ == "rate_limit":
        q.enqueue(jobs.noop, job_id="rl-parent")
    elif form is depends_on_failed:
        q.enqueue(jobs.noop, job_id="failed-parent")
        client.hset(q.job_class.key_for("failed-parent"), "status", "failed")


def run_natively(form_name: str, native: Any, ours: Any) -> None:
    """Run the form on plain RQ into ``native``, after what it needs, in both."""
    form = FORMS[form_name]
    for client in (native, ours):
        prepare(form, client)
    form(Queue("q", connection=native))


def assert_same_as_native(form_name: str, ours: Any, native: Any) -> None:
    """Redis after our enqueue equals Redis after RQ's, key by key; ``enqueue_in`` scores a moment apart."""
    relative = form_name == "enqueue_in"
    assert snapshot(ours, relative_schedule=relative) == snapshot(native, relative_schedule=relative)
    if relative:  # scheduled 3650 days from two moments a little apart
        [(_, ours_at)] = ours.zrange(LAYOUT.scheduled("q"), 0, -1, withscores=True)
        [(_, native_at)] = native.zrange(LAYOUT.scheduled("q"), 0, -1, withscores=True)
        assert 0 <= ours_at - native_at <= 60
