"""A direct enqueue whose request is held in the network and reaches Redis late: still exactly once.

The fault proxy keeps what the producer sends ("hold": a partition), the producer times out and
spills the job as ambiguous; then the held request and the replay reach Redis in either order.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import jobs
import pytest
import redis
from helpers import replay_once
from rq.job import Dependency, Job

from spillover import Outbox, Queue, was_spilled
from spillover.faultproxy import FaultProxy


def plain(q: Queue) -> list[Job]:
    return [q.enqueue(jobs.noop, job_id="held")]


def many(q: Queue) -> list[Job]:
    return q.enqueue_many([q.prepare_data(jobs.noop, job_id=f"held-{i}") for i in range(3)])


def scheduled(q: Queue) -> list[Job]:
    return [q.enqueue_in(timedelta(hours=1), jobs.noop, job_id="held")]


def child(q: Queue) -> list[Job]:
    return [q.enqueue(jobs.noop, job_id="held", depends_on=Dependency(jobs=["parent"]))]


FORMS: dict[str, Callable[[Queue], list[Job]]] = {"enqueue": plain, "enqueue_many": many}
FORMS |= {"enqueue_in": scheduled, "depends_on": child}


@pytest.mark.parametrize("held_lands_first", [False, True], ids=["replay-first", "held-first"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_held_request_lands_once(form, held_lands_first, redis_server, sqlite_url):
    client = redis_server.client()
    rq_parent = Queue("late", connection=client, outbox=sqlite_url)
    rq_parent.enqueue(jobs.noop, job_id="parent")  # queued, not finished: children are deferred
    proxy = FaultProxy("127.0.0.1", redis_server.port)
    q = Queue("late", connection=redis.Redis(port=proxy.port), outbox=sqlite_url)
    before = [q.enqueue(jobs.noop, job_id=f"a{i}") for i in range(2)]
    assert not any(was_spilled(job) for job in before)

    proxy.set_mode("hold")
    held = FORMS[form](q)  # the request is held: the producer times out and spills it, ambiguous
    assert all(was_spilled(job) for job in held)
    spilled = Outbox(sqlite_url).fetch_pending("tests#rq", "late", 10)
    assert len(spilled) == len(held) and all(row.ambiguous for row in spilled)
    after = [q.enqueue(jobs.noop, job_id=f"b{i}") for i in range(2)]  # spilled behind it
    assert all(was_spilled(job) for job in after)
    before_ids, held_ids, after_ids = ([job.id for job in part] for part in (before, held, after))

    if held_lands_first:
        assert proxy.deliver_held() > 0
    proxy.set_mode("pass")
    replay_once(sqlite_url, redis_server.url)
    if not held_lands_first:
        assert proxy.deliver_held() > 0  # the late request reaches Redis after the replay
    proxy.close()

    queued = [x.decode() for x in client.lrange("rq:queue:late", 0, -1)]
    assert len(queued) == len(set(queued)), f"a job twice: {queued}"
    if form in ("enqueue", "enqueue_many"):
        assert queued == ["parent", *before_ids, *held_ids, *after_ids]
    else:
        assert queued == ["parent", *before_ids, *after_ids]
    if form == "enqueue_in":
        assert client.zrange("rq:scheduled:late", 0, -1) == [b"held"]
    if form == "depends_on":
        assert client.zrange("rq:deferred:late", 0, -1) == [b"held"]
        assert client.hget("rq:job:held", "status") == b"deferred"
    assert Outbox(sqlite_url).pending_count() == 0
