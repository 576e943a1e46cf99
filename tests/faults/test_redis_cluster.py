"""Redis Cluster, as far as RQ 3 goes: a plain client on the master of the prefix's slot.

RQ 3 has no cluster mode: its enqueue uses pipeline() + watch(), which redis-py's cluster
client refuses, and its worker needs a plain client's connection pool. What works (and what
spillover supports) is RQ_KEY_PREFIX with a hash tag, so every RQ key and every spillover key
shares one slot, and plain clients on that slot's master. Here, on a real cluster of three
masters with a replica each: producers enqueue, the slot's master is killed, its replica is
promoted, the producer spills meanwhile, the replayer drains into the new master and a real
worker runs every acknowledged job once, in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import redis
from checks import start_replayer
from forms import RQ_MAJOR
from helpers import env_with_tests, stop_replayer, wait_for
from servers import RedisCluster

from spillover import Outbox

pytestmark = [
    pytest.mark.rq_facing,
    pytest.mark.skipif(RQ_MAJOR < 3, reason="RQ_KEY_PREFIX (hash-tagged keys for one cluster slot) is RQ 3's"),
]
FAULTS = os.path.dirname(__file__)
PREFIX = "{app}"


def progress(path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(kind, int(seq)) for kind, seq in (line.split() for line in path.read_text().splitlines())]


def replicated(master: int, replica: int) -> bool:
    """The replica has everything the master has written (acknowledged writes after this can be lost)."""
    offset = redis.Redis(port=master, decode_responses=True).info("replication")["master_repl_offset"]
    return redis.Redis(port=replica, decode_responses=True).info("replication")["slave_repl_offset"] >= offset


def test_master_killed_replica_promoted_every_acknowledged_job_runs_once_in_order(tmp_path, sqlite_url):
    cluster = RedisCluster(tmp_path)
    env = {**env_with_tests(), "RQ_KEY_PREFIX": PREFIX}
    producer = None
    try:
        master = cluster.slot_master(PREFIX)
        assert master is not None
        replica = cluster.replica_of(master)
        ran, acks = tmp_path / "ran.txt", tmp_path / "acks.txt"
        producer = subprocess.Popen(
            [
                sys.executable,
                os.path.join(FAULTS, "cluster_producer.py"),
                str(master),
                sqlite_url,
                str(ran),
                "400",
                str(acks),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: len(progress(acks)) >= 60, timeout=60)
        # Hold the producer, let the replica catch up, then kill the master: the acknowledged
        # writes are all on the replica (one in flight, if any, is on both or neither).
        producer.send_signal(signal.SIGSTOP)
        wait_for(lambda: replicated(master, replica), timeout=10)
        cluster.kill(master)
        producer.send_signal(signal.SIGCONT)
        wait_for(lambda: sum(kind == "s" for kind, _ in progress(acks)) >= 60, timeout=60)
        wait_for(lambda: cluster.slot_master(PREFIX) == replica, timeout=30)  # promoted (about 4 s)

        # The replayer, pointed at the new master, drains the outbox while the producer (its client
        # pinned to the dead master) spills on.
        replayer = start_replayer(sqlite_url, f"redis://127.0.0.1:{replica}/0", "--target", "cluster-app", env=env)
        assert producer.wait(timeout=120) == 0, producer.stderr.read()[-2000:]
        wait_for(lambda: Outbox(sqlite_url).pending_count() == 0, timeout=60)
        stop_replayer(replayer)

        acked = progress(acks)
        assert len(acked) == 400 and {kind for kind, _ in acked} == {"d", "s"}
        new_master = redis.Redis(port=replica)
        assert new_master.llen(f"{PREFIX}:queue:cl") == 400
        assert all(key.startswith(PREFIX.encode() + b":") for key in new_master.keys("*"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rq.cli",
                "worker",
                "--burst",
                "--url",
                f"redis://127.0.0.1:{replica}/0",
                "-w",
                "rq.SimpleWorker",
                "cl",
            ],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
        )
        assert ran.read_text().split() == [str(seq) for _, seq in acked], "every acknowledged job once, in order"
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
        cluster.stop()
