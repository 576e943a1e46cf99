"""Issue 18: a stalled, refused or locked outbox costs an enqueue at most its time limit, never a hang.

Postgres sits behind the fault proxy: ``refuse`` (connections refused), ``stall`` (accepted, never
answered), ``hold`` (the bytes of a pooled connection kept, as a partition does: TCP-level timeouts
do not fire, the bound must hold on the client side). Redis is down throughout, so every job spills.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator

import jobs
import pytest
import redis
from checks import start_replayer
from helpers import replay_once, run_worker, stop_replayer, wait_for
from servers import create_database, free_port
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from spillover import Outbox, OutboxUnavailable, Queue, deadline, migrate
from spillover.faultproxy import FaultProxy

QUEUE = "deadline"
LIMIT = 2.0  # the queues' outbox_timeout here (libpq's connect_timeout cannot go below 2 s)
SLACK = 0.75  # scheduling, and the Redis attempt before the spill


@pytest.fixture
def pg(postgres_server: str) -> Iterator[tuple[str, FaultProxy, str]]:
    """(database URL, the proxy in front of its server, the same database's URL through the proxy)."""
    url = create_database(postgres_server)
    migrate.upgrade(url)
    host, port = url.split("@", 1)[1].split("/", 1)[0].split(":")
    proxy = FaultProxy(host, int(port))
    yield url, proxy, url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    proxy.close()


def dead_redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=free_port())


def timed_enqueue(queue: Queue, job_id: str) -> tuple[float, OutboxUnavailable | None]:
    started = time.monotonic()
    try:
        queue.enqueue(jobs.record, job_id, job_id=job_id)
    except OutboxUnavailable as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def timed_enqueues_at_once(queue: Queue, count: int) -> list[tuple[float, OutboxUnavailable | None]]:
    """``timed_enqueue`` on ``count`` threads of this process at once (job ids t0, t1, ...)."""
    results: list[tuple[float, OutboxUnavailable | None]] = []
    threads = [threading.Thread(target=lambda n=n: results.append(timed_enqueue(queue, f"t{n}"))) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == count, "an enqueue still blocked after 30 s"
    return results


def stored(url: str) -> list[tuple[str, str, str | None]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT job_id, delivery, options FROM spillover_outbox ORDER BY id")).all()
    engine.dispose()
    return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mode", "warm"), [("refuse", False), ("refuse", True), ("stall", False), ("stall", True), ("hold", True)]
)
def test_a_refused_stalled_or_silent_postgres_costs_an_enqueue_at_most_its_time_limit(pg, mode, warm):
    """``warm``: the producer has a pooled connection, which the fault cuts (stall) or silences (hold)."""
    url, proxy, through_proxy = pg
    queue = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy), outbox_timeout=LIMIT)
    if warm:
        queue.enqueue(jobs.record, "warm", job_id="warm")
    proxy.set_mode(mode)
    took, error = timed_enqueue(queue, f"during-{mode}")
    assert error is not None, "the enqueue claimed success while the outbox could not answer"
    assert took <= LIMIT + SLACK, f"{mode}: raised after {took:.2f} s, the limit is {LIMIT} s"
    # In doubt only where the INSERT went out on a connection that then failed or fell silent.
    assert error.in_doubt is warm, error
    assert "time limit" in str(error) or mode == "refuse", error
    took_again, again = timed_enqueue(queue, f"again-{mode}")  # the lane's lock and pool were not left stuck
    assert again is not None and took_again <= LIMIT + SLACK
    proxy.set_mode("pass")
    took, error = timed_enqueue(queue, f"after-{mode}")
    assert error is None and took < 1.0, f"{error!r} {took:.2f} s: the outbox answers again, so must the enqueue"
    assert [row[0] for row in stored(url)] == ["warm"] * warm + [f"after-{mode}"]


def test_the_default_time_limit_is_five_seconds(pg):
    _, proxy, through_proxy = pg
    queue = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy))
    queue.enqueue(jobs.record, "warm", job_id="warm")
    proxy.set_mode("hold")
    took, error = timed_enqueue(queue, "held")
    assert error is not None and 4.5 <= took <= 5.0 + SLACK, f"{took:.2f} s"


def test_a_locked_sqlite_outbox_at_the_default_limit_raises_within_five_seconds(sqlite_url):
    """SQLite's own lock wait (interrupts do not end it) must end inside the enqueue's budget, which began
    before Redis refused: never at the budget's end plus the time Redis took."""
    queue = Queue(QUEUE, connection=dead_redis(), outbox=sqlite_url)
    queue.enqueue(jobs.record, "warm", job_id="warm")
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing for ever
    took, error = timed_enqueue(queue, "locked")
    holder.rollback()
    assert error is not None and 4.5 <= took < 5.0, f"{took:.3f} s {error!r}"


def test_concurrent_enqueues_on_a_stalled_outbox_each_keep_the_bound(pg):
    """Threads of one process queue for the lane's lock behind the stalled INSERT: each within its limit."""
    _, proxy, through_proxy = pg
    queue = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy), outbox_timeout=LIMIT)
    queue.enqueue(jobs.record, "warm", job_id="warm")
    proxy.set_mode("hold")
    for took, error in timed_enqueues_at_once(queue, 4):
        assert error is not None and took <= LIMIT + SLACK, f"{took:.2f} s {error!r}"


@pytest.mark.parametrize("first_copy", ["landed", "lost"])
def test_a_job_in_doubt_retried_with_its_id_runs_once(pg, redis_server, first_copy):
    """The INSERT is held unanswered: OutboxUnavailable(in_doubt). The held bytes then reach the server
    (the copy landed) or never do (lost); the caller retries with the same job id: RQ runs it once."""
    url, proxy, through_proxy = pg
    target = redis_server.url
    queue = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy), outbox_timeout=LIMIT, target=target)
    queue.enqueue(jobs.record, "warm", job_id="warm")
    proxy.set_mode("hold")
    wait_for(lambda: True)
    _, error = timed_enqueue(queue, "charge-42")
    assert error is not None and error.in_doubt
    if first_copy == "landed":
        assert proxy.deliver_held() > 0
    proxy.set_mode("pass")  # "lost": the held request is dropped with its connection
    _, error = timed_enqueue(queue, "charge-42")  # the caller's retry
    assert error is None
    copies = [row for row in stored(url) if row[0] == "charge-42"]
    assert len(copies) == (2 if first_copy == "landed" else 1)
    assert len({delivery for _, delivery, _ in copies}) == 1, "the retry must carry the delivery in doubt"
    queue.enqueue(jobs.record, "after", job_id="after")
    replay_once(url, redis_server.url, "--target", target)
    run_worker(redis_server.url, QUEUE)
    executed = [tag.decode() for tag in redis_server.client().lrange("executed", 0, -1)]
    assert executed == ["warm", "charge-42", "after"]


def test_a_job_in_doubt_retried_straight_into_redis_runs_once(pg, redis_server):
    """Redis is back for the retry: it goes straight in; the copy in doubt lands later and is replayed: once."""
    url, proxy, through_proxy = pg
    target = redis_server.url
    spilling = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy), outbox_timeout=LIMIT, target=target)
    spilling.enqueue(jobs.record, "warm", job_id="warm")
    proxy.set_mode("hold")
    _, error = timed_enqueue(spilling, "charge-7")
    assert error is not None and error.in_doubt
    healthy = Queue(QUEUE, connection=redis_server.client(), outbox=url, target=target)
    _, error = timed_enqueue(healthy, "charge-7")
    assert error is None
    assert proxy.deliver_held() > 0  # the partition heals: the first copy reaches the database after all
    proxy.set_mode("pass")
    assert [row[0] for row in stored(url)] == ["warm", "charge-7"]
    replay_once(url, redis_server.url, "--target", target)
    run_worker(redis_server.url, QUEUE)
    executed = sorted(tag.decode() for tag in redis_server.client().lrange("executed", 0, -1))
    assert executed == ["charge-7", "warm"]


def test_a_locked_sqlite_outbox_costs_an_enqueue_at_most_its_time_limit(sqlite_url):
    path = sqlite_url.removeprefix("sqlite:///")
    queue = Queue(QUEUE, connection=dead_redis(), outbox=sqlite_url, outbox_timeout=1.0)
    queue.enqueue(jobs.record, "warm", job_id="warm")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing for ever
    for took, error in timed_enqueues_at_once(queue, 3):
        assert error is not None and not error.in_doubt and took <= 1.0 + SLACK, f"{took:.2f} s {error!r}"
    holder.rollback()
    took, error = timed_enqueue(queue, "after")
    assert error is None and took < 1.0
    assert [row[0] for row in stored(sqlite_url)] == ["warm", "after"]


def test_a_commit_returns_within_the_limit_when_the_outbox_stalls_after_it(pg, redis_server):
    """within(): the caller's transaction commits on its own connection; spillover's read-back of the rows
    (through the stalled outbox) gives up within the limit, and the replayer delivers them."""
    url, proxy, through_proxy = pg
    app = create_engine(url)
    queue = Queue(
        QUEUE, connection=redis_server.client(), outbox=Outbox(through_proxy, max_backlog=0), outbox_timeout=LIMIT
    )
    with Session(app) as session:  # warm: the read-back works while the outbox answers
        queue.within(session).enqueue(jobs.record, "first", job_id="first")
        session.commit()
    assert redis_server.client().llen(f"rq:queue:{QUEUE}") == 1
    proxy.set_mode("hold")
    with Session(app) as session:
        queue.within(session).enqueue(jobs.record, "second", job_id="second")
        started = time.monotonic()
        session.commit()
        took = time.monotonic() - started
    assert took <= LIMIT + SLACK, f"commit() took {took:.2f} s"
    # "first" may still be there too: pushed at its commit, its row's removal waits on the stalled outbox
    assert "second" in [row[0] for row in stored(url)], "committed, waiting for the replayer"
    proxy.set_mode("pass")
    replay_once(url, redis_server.url)
    run_worker(redis_server.url, QUEUE)
    assert [tag.decode() for tag in redis_server.client().lrange("executed", 0, -1)] == ["first", "second"]
    app.dispose()


def test_a_replayer_on_a_stalled_outbox_gives_up_its_lease(pg, redis_server):
    """A replayer whose outbox connection goes silent mid-drain is cut within its bound, keeps running,
    and lets its lease lapse: another replayer finishes the queue; every job once, in order."""
    url, proxy, through_proxy = pg
    producer = Queue(QUEUE, connection=dead_redis(), outbox=url, target=redis_server.url)
    total = 3000
    producer.enqueue_many([Queue.prepare_data(jobs.noop, job_id=f"job-{n:05d}") for n in range(total)])
    client = redis_server.client()
    by_target = ("--target", redis_server.url)
    stalled = start_replayer(
        through_proxy, redis_server.url, "--batch-size", "50", *by_target, env=_env(SPILLOVER_OUTBOX_TIMEOUT="1")
    )
    try:
        wait_for(lambda: client.llen(f"rq:queue:{QUEUE}") >= 200, timeout=30)
        proxy.set_mode("hold")  # mid-drain, holding the queue's lease
        other = start_replayer(url, redis_server.url, "--batch-size", "50", *by_target)
        try:
            wait_for(lambda: Outbox(url, max_backlog=0).pending_count() == 0, timeout=60)
        finally:
            stop_replayer(other)
        assert stalled.poll() is None, "the stalled replayer must wait the outage out, not exit"
        proxy.set_mode("pass")
    finally:
        err = stop_replayer(stalled)
    assert "outbox unavailable" in err
    ids = [job.decode() for job in client.lrange(f"rq:queue:{QUEUE}", 0, -1)]
    assert ids == [f"job-{n:05d}" for n in range(total)], "every job once, in order"


def _env(**extra: str) -> dict[str, str]:
    from helpers import env_with_tests

    return {**env_with_tests(), **extra}


def test_a_limit_under_libpqs_least_connect_timeout_still_spills(pg):
    """libpq waits at least 2 s to connect: a shorter limit still lets a healthy database be reached
    (the connect may take libpq's 2 s), for plain enqueues and within() alike."""
    url, _, through_proxy = pg
    queue = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy), outbox_timeout=1.0)
    took, error = timed_enqueue(queue, "short-limit")
    assert error is None and took < 1.0
    app = create_engine(url)
    cold = Outbox(through_proxy + "?application_name=cold")  # a new engine: no pooled connection yet
    within = Queue(QUEUE, connection=dead_redis(), outbox=cold, outbox_timeout=1.0)
    with Session(app) as session:
        within.within(session).enqueue(jobs.record, "within", job_id="within")
        session.commit()
    app.dispose()
    assert [row[0] for row in stored(url)] == ["short-limit", "within"]


def test_a_connection_cut_as_its_call_ended_never_goes_back_into_the_pool(pg):
    """The watchdog fires just as a call returns: the connection it cut is invalidated at checkin, and the
    next caller gets a working one (not a shut-down socket from the pool)."""
    _, _, through_proxy = pg
    outbox = Outbox(through_proxy)
    with deadline.budget(0.2):
        raw = outbox.engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("SELECT 1")
        record = raw._connection_record
        wait_for(lambda: id(record) in deadline._watchdog._fired, timeout=5)  # cut while idle, still checked out
        raw.close()
    assert outbox.pending_count() == 0  # a fresh connection: the cut one was not handed out again


def test_an_enqueue_of_an_id_in_doubt_after_the_window_is_a_new_delivery(pg, monkeypatch):
    url, proxy, through_proxy = pg
    monkeypatch.setenv("SPILLOVER_DELIVERY_WINDOW", "1")
    queue = Queue(QUEUE, connection=dead_redis(), outbox=Outbox(through_proxy), outbox_timeout=LIMIT)
    queue.enqueue(jobs.record, "warm", job_id="warm")
    proxy.set_mode("hold")
    _, error = timed_enqueue(queue, "nightly")
    assert error is not None and error.in_doubt
    assert proxy.deliver_held() > 0  # the copy in doubt lands
    proxy.set_mode("pass")
    time.sleep(1.2)  # the window passes: what is under test is time itself
    assert timed_enqueue(queue, "nightly")[1] is None  # not a retry any more: enqueued again, as in RQ
    deliveries = [delivery for job_id, delivery, _ in stored(url) if job_id == "nightly"]
    assert len(deliveries) == 2 and len(set(deliveries)) == 2, "a new delivery, not the one in doubt"
