"""Redis refusing writes for reasons of its own is an outage: MISCONF (a failed RDB save with
stop-writes-on-bgsave-error, Redis's default) spills, and the replayer waits it out."""

from __future__ import annotations

import shutil

import jobs
from checks import start_replayer, wait_for
from helpers import redis_up_metric, stop_replayer
from servers import free_port

from spillover import Outbox, Queue, was_spilled


def test_a_failed_rdb_save_spills_and_the_replayer_waits_for_writes(make_redis, sqlite_url):
    server = make_redis("--save", "3600 1")  # saving on: a failed save then stops writes
    client = server.client()
    q = Queue("misconf", connection=server.client(), outbox=sqlite_url)
    assert not was_spilled(q.enqueue(jobs.noop, job_id="before"))
    shutil.rmtree(server.dir)  # the next save cannot write its file
    client.bgsave()
    wait_for(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err", timeout=10)

    spilled = [q.enqueue(jobs.noop, job_id=f"m-{i:02d}") for i in range(20)]
    assert all(was_spilled(job) for job in spilled), "MISCONF is an outage: the jobs went to the outbox"
    assert Outbox(sqlite_url).pending_count("misconf") == 20

    port = free_port()
    replayer = start_replayer(sqlite_url, server.url, "--metrics-port", str(port))
    wait_for(lambda: redis_up_metric(port) == 0, timeout=30)  # it sees MISCONF as Redis down, and waits
    assert replayer.poll() is None
    client.config_set("stop-writes-on-bgsave-error", "no")  # the operator's fix
    wait_for(lambda: Outbox(sqlite_url).pending_count() == 0, timeout=30)
    stop_replayer(replayer)
    expected = [b"before", *(f"m-{i:02d}".encode() for i in range(20))]
    assert client.lrange("rq:queue:misconf", 0, -1) == expected
