"""Fault 7: Postgres transactions committing out of order, and Postgres restarted mid-replay."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jobs
import pytest
import redis
from checks import QUEUE, assert_exactly_once_in_order, start_replayer, wait_drained
from helpers import IN_CI, replay_once, stop_replayer, wait_for
from servers import PostgresCluster, create_database, free_port
from sqlalchemy import create_engine, insert

from spillover import Outbox, Queue, migrate, was_spilled
from spillover.schema import outbox


@pytest.fixture
def pg_cluster() -> Iterator[PostgresCluster]:
    try:
        cluster = PostgresCluster()
    except Exception as exc:
        if IN_CI:
            raise
        pytest.skip(f"cannot start a PostgreSQL cluster here: {exc}")
    yield cluster
    cluster.destroy()


def test_row_with_lower_id_committing_last_is_not_skipped(redis_server, postgres_server):
    url = create_database(postgres_server)
    migrate.upgrade(url)
    queue = Queue(QUEUE, connection=redis.Redis(port=free_port()), outbox=url)
    template = queue.create_job(jobs.noop, job_id="template")
    queue._prepare_offline(template)

    def row(job_id: str) -> dict[str, object]:
        spilled = queue._row(template)
        return {
            "target": "tests",
            "queue": QUEUE,
            "job_id": job_id,
            "job_hash": spilled.job_hash.replace(b"template", job_id.encode()),
            "producer": job_id.split("-")[0],
        }

    engine = create_engine(url)
    slow = engine.connect()
    slow_tx = slow.begin()
    slow.execute(insert(outbox), row("a-000000"))  # takes the lower id, commits last
    with engine.begin() as fast:
        fast.execute(insert(outbox), row("b-000000"))
        fast.execute(insert(outbox), row("b-000001"))
    replay_once(url, redis_server.url)
    client = redis_server.client()
    assert client.lrange(f"rq:queue:{QUEUE}", 0, -1) == [b"b-000000", b"b-000001"]
    slow_tx.commit()
    slow.close()
    with engine.begin() as late:
        late.execute(insert(outbox), row("a-000001"))  # the same producer's next job
    replay_once(url, redis_server.url)
    assert_exactly_once_in_order(client, url, {"a": 2, "b": 2})
    engine.dispose()


def test_postgres_restarted_mid_replay(redis_server, pg_cluster):
    url = pg_cluster.url
    migrate.upgrade(url)
    queue = Queue(QUEUE, connection=redis.Redis(port=free_port()), outbox=Outbox(url, max_backlog=0))
    for start in range(0, 30000, 1000):
        queue.enqueue_many([queue.prepare_data(jobs.noop, job_id=f"p0-{i:06d}") for i in range(start, start + 1000)])
    client = redis_server.client()
    replayer = start_replayer(url, redis_server.url, "--batch-size", "100")
    wait_for(lambda: client.llen(f"rq:queue:{QUEUE}") > 2000, timeout=30, interval=0.005)
    pg_cluster.stop("immediate")
    time.sleep(1.0)
    pg_cluster.start()
    wait_drained(url, client, 30000, timeout=90)
    err = stop_replayer(replayer)
    assert "outbox unavailable" in err
    assert_exactly_once_in_order(client, url, {"p0": 30000})


def test_outbox_down_with_redis_down_raises_and_stores_nothing(pg_cluster):
    url = pg_cluster.url
    migrate.upgrade(url)
    queue = Queue(QUEUE, connection=redis.Redis(port=free_port()), outbox=Outbox(url, max_backlog=0))
    queue.enqueue(jobs.noop, job_id="stored")
    pg_cluster.stop("immediate")
    from spillover import OutboxUnavailable

    with pytest.raises(OutboxUnavailable) as caught:
        queue.enqueue(jobs.noop, job_id="lost")
    assert isinstance(caught.value.redis_error, redis.ConnectionError)
    pg_cluster.start()
    assert [r.job_id for r in Outbox(url).fetch_pending("tests#rq", QUEUE, 10)] == ["stored"]


def test_spills_go_on_after_postgres_restarts_under_a_warm_pool(pg_cluster):
    url = pg_cluster.url
    migrate.upgrade(url)
    queue = Queue(QUEUE, connection=redis.Redis(port=free_port()), outbox=Outbox(url, max_backlog=0))
    queue.enqueue(jobs.noop, job_id="before")  # the pool now holds a connection
    pg_cluster.stop("fast")
    pg_cluster.start()
    assert was_spilled(queue.enqueue(jobs.noop, job_id="after")), "a stale pooled connection is not an outage"
    assert [r.job_id for r in Outbox(url).fetch_pending("tests#rq", QUEUE, 10)] == ["before", "after"]
