"""Faults 2 and 8: replayers SIGKILLed at random moments, several at once, the lease holder killed."""

from __future__ import annotations

import os
import random
import signal
import time

import jobs
import redis
from checks import QUEUE, assert_exactly_once_in_order, start_replayer, wait_drained
from helpers import replay_once, wait_for
from servers import free_port

from spillover import Outbox, Queue
from spillover.lease import live_leases


def spill_backlog(url: str, producers: dict[str, int]) -> None:
    """A large backlog, fast: producers' jobs spilled in interleaved chunks of 1,000 (one transaction each)."""
    queue = Queue(QUEUE, connection=redis.Redis(port=free_port()), outbox=url)
    for start in range(0, max(producers.values()), 1000):
        for name, count in producers.items():
            ids = [f"{name}-{i:06d}" for i in range(start, min(count, start + 1000))]
            queue.enqueue_many([queue.prepare_data(jobs.noop, job_id=job_id) for job_id in ids])


def test_replayer_sigkilled_ten_times_over_one_backlog(redis_server, outbox_url):
    producers = {"p0": 20000, "p1": 20000}
    spill_backlog(outbox_url, producers)
    client, outbox = redis_server.client(), Outbox(outbox_url, max_backlog=0)
    rng = random.Random(20261125)
    kills = 0
    while kills < 10 and outbox.pending_count():
        replayer = start_replayer(outbox_url, redis_server.url, "--batch-size", "200", "--lease-ttl", "1")
        before = client.llen(f"rq:queue:{QUEUE}")
        # let it get going (lease, first batches), then kill it at a random moment
        wait_for(lambda b=before: client.llen(f"rq:queue:{QUEUE}") > b, timeout=20, interval=0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        replayer.send_signal(signal.SIGKILL)
        replayer.wait()
        kills += 1
    assert kills == 10, "the backlog drained before ten kills: make it larger"
    assert outbox.pending_count() > 0
    replay_once(outbox_url, redis_server.url, "--lease-ttl", "1")
    assert_exactly_once_in_order(client, outbox_url, producers)


def test_three_replayers_lease_holder_killed_standby_finishes_in_order(redis_server, outbox_url):
    producers = {"p0": 8000, "p1": 8000}
    spill_backlog(outbox_url, producers)
    client = redis_server.client()
    replayers = [start_replayer(outbox_url, redis_server.url, "--batch-size", "100") for _ in range(3)]
    engine = Outbox(outbox_url, max_backlog=0).engine
    wait_for(lambda: client.llen(f"rq:queue:{QUEUE}") > 1000, timeout=30, interval=0.005)
    [holder] = live_leases(engine)
    holder_pid = int(holder.holder.split(":")[1])
    victim = next(p for p in replayers if p.pid == holder_pid)
    os.kill(holder_pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    left = client.llen(f"rq:queue:{QUEUE}")
    wait_for(lambda: client.llen(f"rq:queue:{QUEUE}") > left + 100, timeout=15, interval=0.01)
    assert time.monotonic() - killed_at < 6, "a standby takes over within the lease TTL (2 s) and a poll"
    wait_drained(outbox_url, client, 16000)
    survivors = [p for p in replayers if p is not victim]
    for proc in survivors:
        proc.terminate()
    for proc in survivors:
        assert proc.wait(20) == 0
    assert_exactly_once_in_order(client, outbox_url, producers)
