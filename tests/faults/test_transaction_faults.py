"""Enqueue within a transaction under faults: a producer killed after its commit, Redis killed under
many committing processes. Every committed order has its job in RQ exactly once, in each producer's
commit order; no job exists without its order."""

from __future__ import annotations

import subprocess
import sys

from checks import FAULTS, QUEUE, Producers, assert_exactly_once_in_order, start_replayer, wait_drained
from helpers import env_with_tests, replay_once, run_worker, stop_replayer, wait_for
from orders import Base, items
from sqlalchemy import create_engine

from spillover import Outbox


def test_producer_sigkilled_between_its_commit_and_the_push(redis_server, outbox_url, tmp_path):
    engine = create_engine(outbox_url)
    Base.metadata.create_all(engine)
    flag = tmp_path / "committed"
    producer = subprocess.Popen(
        [sys.executable, str(FAULTS / "tx_stop_before_push.py"), outbox_url, str(redis_server.port), str(flag)],
        stderr=subprocess.PIPE,
        text=True,
        env=env_with_tests(),
    )
    wait_for(lambda: flag.exists() or producer.poll() is not None, timeout=60)
    assert flag.exists(), producer.communicate()[1][-3000:]
    client = redis_server.client()
    assert not client.keys("rq:*"), "committed, and not pushed yet"
    assert Outbox(outbox_url).pending_count(QUEUE) == 1 and items(engine) == ["paid"]
    producer.kill()
    producer.wait()

    replay_once(outbox_url, redis_server.url)
    run_worker(redis_server.url, QUEUE)
    assert client.lrange("executed", 0, -1) == [b"paid"], "delivered once, and the job found its order"
    replay_once(outbox_url, redis_server.url)
    assert Outbox(outbox_url).pending_count() == 0 and client.llen(f"rq:queue:{QUEUE}") == 0
    engine.dispose()


def test_eight_processes_commit_at_once_while_redis_is_killed(make_redis, outbox_url, tmp_path):
    engine = create_engine(outbox_url)
    Base.metadata.create_all(engine)
    server = make_redis(aof=True)
    replayer = start_replayer(outbox_url, server.url)
    producers = Producers(
        tmp_path, outbox_url, server.port, [f"p{n}" for n in range(8)], pace=0.002, script="tx_producer.py"
    )
    producers.wait(direct=20)  # each has committed jobs pushed at commit
    server.kill()
    producers.wait(spilled=10)  # each has committed jobs left in the outbox
    server.start()
    producers.wait(direct=20)  # and pushes at commit again
    enqueued, _ = producers.finish()
    wait_drained(outbox_url, server.client(), sum(enqueued.values()))
    stop_replayer(replayer)
    assert_exactly_once_in_order(server.client(), outbox_url, enqueued)
    jobs = {f"{name}-{i:06d}" for name, count in enqueued.items() for i in range(count)}
    assert sorted(items(engine)) == sorted(jobs), "a job for every committed order, and for nothing else"
    engine.dispose()
