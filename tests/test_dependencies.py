"""Dependencies across queues (#18): a child is never made runnable before a parent whose row went to
an outbox, whichever queues and replayers carry them.

RQ counts a parent it cannot find in Redis as done. A child's row records which of its parents went to an
outbox (spilled, or written within a transaction) with their delivery ids; until such a parent is pushed
the child is deferred as RQ defers the dependent of an unfinished parent, and RQ's own dependents handling
enqueues it once the parent, pushed at last, finishes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jobs
import pytest
import redis
import rq
from helpers import LAYOUT, env_with_tests, replay_once, run_worker, snapshot, wait_for
from orders import Base, Order
from rq.job import Dependency, Job
from servers import free_port
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from spillover import Outbox, Queue, was_spilled

pytestmark = pytest.mark.rq_facing  # CI runs it under both RQ majors

ROUNDS = 10  # before the fix, the child ran first in 2 of 6 rounds


def dead_redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=free_port())


def replayer(database_url: str, redis_url: str, *queues: str) -> subprocess.Popen[str]:
    """A real `spillover-replay --once` limited to ``queues``, started and left running."""
    limits = [arg for queue in queues for arg in ("--queue", queue)]
    cmd = [sys.executable, "-m", "spillover.cli_replay", "--once", "--database-url", database_url]
    cmd += ["--redis-url", redis_url, "--log-level", "WARNING", *limits]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_tests())


def finish(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]


def lines(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def deferred(client: redis.Redis, queue: str) -> list[str]:
    return sorted(member.decode() for member in client.zrange(LAYOUT.deferred(queue), 0, -1))


@pytest.fixture
def two_queues(redis_server, sqlite_url, tmp_path) -> Iterator[tuple[redis.Redis, Path, Engine, Queue, Queue]]:
    """Queues a and b on one Redis and one SQLite outbox that also holds the application's orders, and a log
    file the jobs append to."""
    client = redis_server.client()
    engine = create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    a = Queue("a", connection=client, outbox=sqlite_url)
    b = Queue("b", connection=client, outbox=sqlite_url)
    yield client, tmp_path / "ran.txt", engine, a, b
    engine.dispose()


def test_spilled_parent_and_child_on_two_queues_by_two_replayers_run_parent_first(redis_server, sqlite_url, tmp_path):
    """Parent on queue a, child on queue b, both spilled; a replayer on a and one on b run at once; a worker
    that looks at b first: every round, each parent runs before its child, and every job runs once."""
    client = redis_server.client()
    a = Queue("a", connection=dead_redis(), outbox=sqlite_url)
    b = Queue("b", connection=dead_redis(), outbox=sqlite_url)
    for n in range(ROUNDS):
        log = tmp_path / f"ran-{n}.txt"
        by_job = a.enqueue(jobs.append_line, str(log), "p-job", job_id=f"p-job-{n}")
        by_id = a.enqueue(jobs.append_line, str(log), "p-id", job_id=f"p-id-{n}")
        by_dep = a.enqueue(jobs.append_line, str(log), "p-dep", job_id=f"p-dep-{n}")
        b.enqueue(jobs.append_line, str(log), "c-job", job_id=f"c-job-{n}", depends_on=by_job)
        b.enqueue(jobs.append_line, str(log), "c-id", job_id=f"c-id-{n}", depends_on=by_id.id)
        b.enqueue(jobs.append_line, str(log), "c-dep", job_id=f"c-dep-{n}", depends_on=Dependency(jobs=[by_dep.id]))
        assert all(was_spilled(job) for job in (by_job, by_id, by_dep))
        finish(replayer(sqlite_url, redis_server.url, "b"), replayer(sqlite_url, redis_server.url, "a"))
        assert client.llen(LAYOUT.queue("b")) == 0, "no child runnable before its parent ran"
        assert deferred(client, "b") == [f"c-dep-{n}", f"c-id-{n}", f"c-job-{n}"]
        run_worker(redis_server.url, "b", "a")  # children first, were any of them queued
        ran = lines(log)
        assert sorted(ran) == ["c-dep", "c-id", "c-job", "p-dep", "p-id", "p-job"], f"round {n}: {ran}"
        for kind in ("job", "id", "dep"):
            assert ran.index(f"p-{kind}") < ran.index(f"c-{kind}"), f"round {n}: {ran}"
    assert Outbox(sqlite_url).pending_count() == 0


def test_a_child_replayed_before_its_parent_leaves_redis_as_rq_does(redis_server, sqlite_url):
    """Child's queue replayed first, then the parent's: key by key what plain RQ writes for a parent on a
    and its child on b (deferred, registered as the parent's dependent); pushing the parent clears nothing."""
    native, ours = redis_server.client(db=1), redis_server.client(db=0)
    parent = rq.Queue("a", connection=native).enqueue(jobs.noop, job_id="parent", ttl=900)
    rq.Queue("b", connection=native).enqueue(jobs.noop, job_id="child", depends_on=parent, ttl=600)
    spilled_parent = Queue("a", connection=dead_redis(), outbox=sqlite_url).enqueue(jobs.noop, job_id="parent", ttl=900)
    Queue("b", connection=dead_redis(), outbox=sqlite_url).enqueue(
        jobs.noop, job_id="child", depends_on=spilled_parent, ttl=600
    )
    replay_once(sqlite_url, redis_server.url, "--queue", "b")
    assert deferred(ours, "b") == ["child"] and ours.smembers(LAYOUT.job_prefix + "parent:dependents") == {b"child"}
    replay_once(sqlite_url, redis_server.url, "--queue", "a")
    assert snapshot(ours) == snapshot(native)


def test_a_parent_pushed_finished_and_expired_long_before_its_child_counts_as_done(redis_server, sqlite_url, tmp_path):
    """The parent replayed, run (result_ttl=0: its hash is gone at once) and its marker settled; the child
    replayed only then: RQ's rule (an absent parent is done) applies, it is queued and runs."""
    client = redis_server.client()
    log = tmp_path / "ran.txt"
    parent = Queue("a", connection=dead_redis(), outbox=sqlite_url).enqueue(
        jobs.append_line, str(log), "parent", result_ttl=0
    )
    Queue("b", connection=dead_redis(), outbox=sqlite_url).enqueue(
        jobs.append_line, str(log), "child", depends_on=parent
    )
    replay_once(sqlite_url, redis_server.url, "--queue", "a", "--delivery-window", "1")
    run_worker(redis_server.url, "a")
    assert lines(log) == ["parent"] and not client.exists(LAYOUT.job_prefix + parent.id)
    wait_for(lambda: not client.keys(LAYOUT.marker_prefix + "*"), timeout=10)  # settled, then expired
    replay_once(sqlite_url, redis_server.url, "--queue", "b")
    assert deferred(client, "b") == []
    run_worker(redis_server.url, "b")
    assert lines(log) == ["parent", "child"]


def run_failing_parent_and_children(a: rq.Queue, b: rq.Queue, log: Path) -> None:
    bad = a.enqueue(jobs.fail, str(log), "failing", job_id="bad-parent")
    b.enqueue(
        jobs.append_line, str(log), "tolerant", job_id="tolerant", depends_on=Dependency([bad], allow_failure=True)
    )
    b.enqueue(jobs.append_line, str(log), "strict", job_id="strict", depends_on=bad.id)


def test_a_failing_spilled_parent_lets_a_child_that_allows_failures_run_after_it_as_rq_does(
    redis_server, sqlite_url, tmp_path
):
    native, ours = redis_server.client(db=1), redis_server.client(db=0)
    native_log, log = tmp_path / "native.txt", tmp_path / "ran.txt"
    run_failing_parent_and_children(rq.Queue("a", connection=native), rq.Queue("b", connection=native), native_log)
    run_worker(redis_server.url.replace("/0", "/1"), "b", "a")

    spilled_a = Queue("a", connection=dead_redis(), outbox=sqlite_url)
    run_failing_parent_and_children(spilled_a, Queue("b", connection=dead_redis(), outbox=sqlite_url), log)
    replay_once(sqlite_url, redis_server.url, "--queue", "b")  # the children first: parent not pushed yet
    assert deferred(ours, "b") == ["strict", "tolerant"] and ours.llen(LAYOUT.queue("b")) == 0
    replay_once(sqlite_url, redis_server.url, "--queue", "a")
    run_worker(redis_server.url, "b", "a")
    assert lines(log) == lines(native_log) == ["failing", "tolerant"]
    for client in (native, ours):
        assert Job.fetch("strict", connection=client).get_status() == "deferred"
        assert Job.fetch("tolerant", connection=client).get_status() == "finished"


def test_a_child_of_a_rolled_back_transactional_parent_stays_deferred_and_visible(two_queues, redis_server, sqlite_url):
    client, log, engine, a, b = two_queues
    with Session(engine) as session:
        session.add(Order(item="never"))
        parent = a.within(session).enqueue(jobs.append_line, str(log), "parent", job_id="tx-parent")
        by_job = b.enqueue(jobs.append_line, str(log), "by-job", job_id="by-job", depends_on=parent)
        by_id = b.enqueue(jobs.append_line, str(log), "by-id", job_id="by-id", depends_on="tx-parent")
        session.rollback()
    assert not was_spilled(by_job) and not was_spilled(by_id), "written straight into Redis"
    assert by_job.get_status() == by_id.get_status() == "deferred"
    run_worker(redis_server.url, "b", "a")
    assert lines(log) == [], "neither child ran: its parent never existed"
    assert deferred(client, "b") == ["by-id", "by-job"], "both visible in RQ's deferred registry"
    # what stands for the parent that never came: a placeholder, so RQ never takes it for done
    assert client.hgetall(LAYOUT.job_prefix + "tx-parent") == {b"status": b"deferred", b"spillover_placeholder": b"1"}
    assert Outbox(sqlite_url).pending_count() == 0


def test_a_child_with_a_parent_in_redis_and_one_in_an_outbox_waits_for_both(two_queues, redis_server):
    """RQ, deciding when the parent in Redis finishes whether the child's other parents are done, counts one
    it cannot find as done: the outbox parent's placeholder keeps the child deferred until it is pushed."""
    client, log, engine, a, b = two_queues
    with Session(engine) as session:
        session.add(Order(item="later"))
        in_outbox = a.within(session).enqueue(jobs.append_line, str(log), "in-outbox", job_id="in-outbox")
        in_redis = a.enqueue(jobs.append_line, str(log), "in-redis", job_id="in-redis")
        child = b.enqueue(jobs.append_line, str(log), "child", job_id="child", depends_on=[in_redis, in_outbox])
        run_worker(redis_server.url, "a", "b")  # the parent in Redis runs, and RQ looks at the child's parents
        assert lines(log) == ["in-redis"], "the child waits for the parent still in the transaction"
        assert child.get_status() == "deferred"
        session.commit()  # the other parent is pushed at commit
    run_worker(redis_server.url, "a", "b")
    assert lines(log) == ["in-redis", "in-outbox", "child"]
    assert not client.hexists(LAYOUT.job_prefix + "in-outbox", "spillover_placeholder")


def test_a_child_replayed_after_its_committed_parent_finished_and_expired_runs(two_queues, redis_server, sqlite_url):
    """The parent pushed at its commit, run, finished and gone (result_ttl=0), its marker settled; the child,
    written in the same transaction on a queue that spills, replayed later: the parent's push left a trace,
    so the child is RQ's (its parent done) and runs, instead of waiting for ever."""
    client, log, engine, a, b = two_queues
    b.lane_within(engine).spilling = True  # queue b's transactional lane has rows waiting: its jobs wait too
    with Session(engine) as session:
        session.add(Order(item="now"))
        parent = a.within(session).enqueue(jobs.append_line, str(log), "parent", job_id="p", result_ttl=0)
        b.within(session).enqueue(jobs.append_line, str(log), "child", job_id="c", depends_on=parent)
        session.commit()
    assert client.exists(LAYOUT.job_prefix + "p") and Outbox(sqlite_url).pending_count() == 1
    run_worker(redis_server.url, "a")
    assert lines(log) == ["parent"] and not client.exists(LAYOUT.job_prefix + "p"), "finished and expired"
    client.delete(*client.keys("spillover:delivery:*"))  # its marker settled and expired (the window passed)
    replay_once(sqlite_url, redis_server.url, "--queue", "b")
    run_worker(redis_server.url, "b")
    assert lines(log) == ["parent", "child"]


def test_a_child_of_a_committed_transactional_parent_runs_after_it(two_queues, redis_server):
    _, log, engine, a, b = two_queues
    with Session(engine) as session, session.begin():
        session.add(Order(item="kept"))
        parent = a.within(session).enqueue(jobs.append_line, str(log), "parent")
        child = b.enqueue(jobs.append_line, str(log), "child", depends_on=parent)
        assert child.get_status() == "deferred", "before the commit, the parent is not in Redis"
    run_worker(redis_server.url, "b", "a")
    assert lines(log) == ["parent", "child"]


def test_a_child_enqueued_directly_while_its_parents_queue_spills_waits_for_it(redis_server, sqlite_url, tmp_path):
    """Redis healthy for queue b, queue a's lane spilling: the child goes straight into Redis, deferred, with
    no database access (its queue's outbox cannot even be opened), and runs after the replayed parent."""
    client = redis_server.client()
    log = tmp_path / "ran.txt"
    a = Queue("a", connection=dead_redis(), outbox=sqlite_url)
    b = Queue("b", connection=client, outbox=f"sqlite:///{tmp_path / 'no-such-dir' / 'outbox.db'}")
    parent = a.enqueue(jobs.append_line, str(log), "parent")
    named = a.enqueue(jobs.append_line, str(log), "named", job_id="named-parent")
    child = b.enqueue(jobs.append_line, str(log), "child", depends_on=parent)
    by_id = b.enqueue(jobs.append_line, str(log), "by-id", depends_on="named-parent")
    assert was_spilled(parent) and was_spilled(named)
    assert not was_spilled(child) and not was_spilled(by_id)
    assert child.get_status() == by_id.get_status() == "deferred"
    run_worker(redis_server.url, "b")
    assert lines(log) == []
    replay_once(sqlite_url, redis_server.url)
    run_worker(redis_server.url, "b", "a")
    ran = lines(log)
    assert sorted(ran) == ["by-id", "child", "named", "parent"]
    assert ran.index("parent") < ran.index("child") and ran.index("named") < ran.index("by-id"), ran


def test_a_parent_enqueued_again_straight_into_redis_is_rqs_again(redis_server, sqlite_url):
    """A job id spilled, then enqueued again while Redis is healthy (and run, and gone): its child follows
    RQ's rule for that id again, not the spilled row's."""
    client = redis_server.client()
    Queue("a", connection=dead_redis(), outbox=sqlite_url).enqueue(jobs.noop, job_id="again", result_ttl=0)
    Queue("a", connection=client, outbox=sqlite_url).enqueue(jobs.noop, job_id="again", result_ttl=0)
    child = Queue("b", connection=client, outbox=sqlite_url).enqueue(jobs.noop, depends_on="again")
    assert child.get_status() == "deferred", "the id is queued: RQ defers its child"
    run_worker(redis_server.url, "a")
    assert not client.exists(LAYOUT.job_prefix + "again")
    late = Queue("b", connection=client, outbox=sqlite_url).enqueue(jobs.noop, depends_on="again")
    assert late.get_status() == "queued", "finished and gone: done, as in RQ"
