"""Leases per queue: replayers spread over queues, one per queue at a time, and a stalled one is harmless."""

from __future__ import annotations

import threading
from pathlib import Path

import jobs
import redis
from checks import start_replayer, wait_for
from helpers import TESTS, env_with_tests, redis_up_metric, stop_replayer
from servers import free_port

from spillover import Outbox, Queue
from spillover.lease import live_leases


def spill_queues(url: str, queues: list[str], per_queue: int, producers: int = 2) -> dict[str, list[str]]:
    """Jobs of several producers, interleaved, in several queues; per queue the ids in enqueue order."""
    made: dict[str, list[str]] = {queue: [] for queue in queues}
    for queue_name in queues:
        queue = Queue(queue_name, connection=redis.Redis(port=free_port()), outbox=url)
        for start in range(0, per_queue, 500):
            for p in range(producers):
                ids = [f"{queue_name}-p{p}-{i:06d}" for i in range(start, min(start + 500, per_queue))]
                queue.enqueue_many([queue.prepare_data(jobs.noop, job_id=job_id) for job_id in ids])
                made[queue_name] += ids
    return made


def assert_each_once_in_order(client: redis.Redis, made: dict[str, list[str]], producers: int = 2) -> None:
    for queue, ids in made.items():
        landed = [x.decode() for x in client.lrange(f"rq:queue:{queue}", 0, -1)]
        assert len(landed) == len(set(landed)), f"{queue}: a job twice"
        assert sorted(landed) == sorted(ids), f"{queue}: jobs missing or foreign"
        for p in range(producers):
            mine = [job for job in landed if f"-p{p}-" in job]
            assert mine == sorted(mine), f"{queue}: producer {p} out of order"


class LeaseWatcher:
    """Samples the lease table: how many different replayers drained at one moment, and who drained what."""

    def __init__(self, url: str) -> None:
        self.engine = Outbox(url, max_backlog=0).engine
        self.most_at_once = 0
        self.drainers: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            leases = live_leases(self.engine)
            self.most_at_once = max(self.most_at_once, len({lease.holder for lease in leases}))
            for lease in leases:
                self.drainers.setdefault(lease.queue, set()).add(lease.holder)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def drained(url: str, client: redis.Redis, made: dict[str, list[str]]) -> bool:
    total = sum(len(ids) for ids in made.values())
    landed = sum(client.llen(f"rq:queue:{queue}") for queue in made)
    return landed >= total and Outbox(url, max_backlog=0).pending_count() == 0


def test_replayers_with_disjoint_queue_sets_both_drain(redis_server, outbox_url):
    made = spill_queues(outbox_url, ["qa", "qb"], 2000)
    client = redis_server.client()
    watcher = LeaseWatcher(outbox_url)
    replayers = [
        start_replayer(outbox_url, redis_server.url, "--queue", queue, "--batch-size", "50") for queue in ("qa", "qb")
    ]
    wait_for(lambda: drained(outbox_url, client, made), timeout=60, interval=0.05)
    watcher.stop()
    for proc in replayers:
        stop_replayer(proc)
    assert_each_once_in_order(client, made)
    assert all(len(holders) == 1 for holders in watcher.drainers.values()), "each queue had its one drainer"
    assert watcher.drainers["qa"] != watcher.drainers["qb"]


def test_three_replayers_drain_six_queues_in_parallel(redis_server, outbox_url):
    redis_server.kill()  # Redis comes back with a backlog in six queues and three replayers waiting
    made = spill_queues(outbox_url, [f"q{n}" for n in range(6)], 1500)
    ports = [free_port() for _ in range(3)]
    replayers = [
        start_replayer(outbox_url, redis_server.url, "--batch-size", "50", "--metrics-port", str(port))
        for port in ports
    ]
    for port in ports:  # all three running, and they have seen Redis down
        wait_for(lambda p=port: redis_up_metric(p) == 0, timeout=30)
    watcher = LeaseWatcher(outbox_url)
    redis_server.start()
    client = redis_server.client()
    wait_for(lambda: drained(outbox_url, client, made), timeout=120, interval=0.05)
    watcher.stop()
    for proc in replayers:
        stop_replayer(proc)
    assert_each_once_in_order(client, made)
    assert watcher.most_at_once >= 2, "different queues were drained by different replayers at the same time"
    assert len(set().union(*watcher.drainers.values())) >= 2


def start_stalling_replayer(url: str, redis_url: str, *extra: str):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        str(TESTS / "stalling_replayer.py"),
        "--database-url",
        url,
        "--redis-url",
        redis_url,
        "--batch-size",
        "100",
        "--lease-ttl",
        "1",
        "--poll-interval",
        "0.1",
        "--log-level",
        "INFO",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_tests())


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
