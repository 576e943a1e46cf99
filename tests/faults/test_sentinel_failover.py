"""Redis Sentinel: a failover is a short spill, not an outage (real master, replica and sentinel)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import jobs
import redis
from helpers import replay_once, wait_for
from servers import free_port

from spillover import Queue, redis_from_url, was_spilled


def start_sentinel(tmp_path: Path, master_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        # Not much shorter: on a busy machine Sentinel then marks a healthy master down for a moment.
        "sentinel down-after-milliseconds mymaster 1500\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    proc = subprocess.Popen(
        ["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, port


def test_failover_is_a_short_spill(make_redis, sqlite_url, tmp_path):
    primary = make_redis()
    replica = make_redis("--replicaof", "127.0.0.1", str(primary.port))
    wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up", timeout=10)
    sentinel, sentinel_port = start_sentinel(tmp_path, primary.port)
    try:
        sentinels = redis.Redis(port=sentinel_port)
        wait_for(lambda: _replicas_known(sentinels), timeout=15, interval=0.1)
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
        queue = Queue("failover", connection=redis_from_url(url), outbox=sqlite_url)

        ids, spilled = [], []

        def enqueue() -> None:
            job = queue.enqueue(jobs.noop, job_id=f"j{len(ids):05d}")
            ids.append(job.id)
            spilled.append(was_spilled(job))

        for _ in range(30):
            enqueue()
        assert not any(spilled)
        primary.client().execute_command("WAIT", 1, 2000)  # the replica has them before the master dies
        primary.kill()
        new_master = replica.client()
        deadline = time.monotonic() + 60
        while not _promoted(sentinels, replica.port):  # enqueue all through the failover
            assert time.monotonic() < deadline, "sentinel did not promote the replica"
            enqueue()
            time.sleep(0.02)
        assert new_master.info("replication")["role"] == "master"
        assert any(spilled[30:]), "enqueues during the failover spilled"
        replay_once(sqlite_url, url)
        wait_for(lambda: queue.health.is_up, timeout=10)  # the producer's prober has found the new master
        time.sleep(0.11)  # past the producer's resume-check interval (it asks the outbox at most every 0.1 s)
        for _ in range(10):
            enqueue()
        assert not any(spilled[-10:]), "after the replay, producers write to the new master directly"
        queued = [x.decode() for x in new_master.lrange("rq:queue:failover", 0, -1)]
        assert queued == ids, "every job once, in order, on the new master"
    finally:
        sentinel.kill()
        sentinel.wait()


def _replicas_known(sentinels: redis.Redis) -> bool:
    try:
        return bool(sentinels.execute_command("SENTINEL", "REPLICAS", "mymaster"))
    except redis.RedisError:
        return False


def _promoted(sentinels: redis.Redis, port: int) -> bool:
    """Sentinel hands out the replica as a usable master, as redis-py's discovery checks it.

    The replica's own role changes first, then Sentinel's address, then its flags: only
    then does a Sentinel client (the replayer's) find the new master.
    """
    from redis.sentinel import Sentinel

    kwargs = sentinels.connection_pool.connection_kwargs
    try:
        _, found = Sentinel([(kwargs["host"], kwargs["port"])], socket_timeout=1).discover_master("mymaster")
    except redis.RedisError:
        return False
    return int(found) == port
