"""Every enqueue form and option, with fixed job ids, to run on rq.Queue and spillover.Queue alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import jobs
from helpers import snapshot
from rq import Callback, Queue, Retry
from rq.job import Dependency

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


FORMS: dict[str, Callable[[Any], None]] = {
    f.__name__: f
    for f in (
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
    )
}


def run_natively(form_name: str, native: Any, ours: Any) -> None:
    """Run the form on plain RQ into ``native``; a queued parent job in both where the form needs one."""
    form = FORMS[form_name]
    if form is depends_on_unfinished:
        for client in (native, ours):
            Queue("q", connection=client).enqueue(jobs.noop, job_id="parent")
    form(Queue("q", connection=native))


def assert_same_as_native(form_name: str, ours: Any, native: Any) -> None:
    """Redis after our enqueue equals Redis after RQ's, key by key; ``enqueue_in`` scores a moment apart."""
    relative = form_name == "enqueue_in"
    assert snapshot(ours, relative_schedule=relative) == snapshot(native, relative_schedule=relative)
    if relative:  # scheduled 3650 days from two moments a little apart
        [(_, ours_at)] = ours.zrange("rq:scheduled:q", 0, -1, withscores=True)
        [(_, native_at)] = native.zrange("rq:scheduled:q", 0, -1, withscores=True)
        assert 0 <= ours_at - native_at <= 60
