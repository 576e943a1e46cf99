"""spillover-replay as operators run it: the real command in subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import jobs
import pytest
import redis
from helpers import env_with_tests, http_get, redis_up_metric, replay_once, status_text, wait_for
from servers import free_port

import spillover
from spillover import Outbox, Queue, ReplayError
from spillover.schema import DONE, outbox


def spill(url: str, queue: str, count: int, prefix: str = "j") -> list[str]:
    q = Queue(queue, connection=redis.Redis(port=free_port()), outbox=url)
    q.enqueue_many([q.prepare_data(jobs.noop, (i,), job_id=f"{prefix}{i:05d}") for i in range(count)])
    return [f"{prefix}{i:05d}" for i in range(count)]


def queued(client: redis.Redis, queue: str) -> list[str]:
    return [x.decode() for x in client.lrange(f"rq:queue:{queue}", 0, -1)]


def replayer(database_url: str, redis_url: str, *extra: str, script: str | None = None) -> subprocess.Popen[str]:
    target = [script] if script else ["-m", "spillover.cli_replay"]
    cmd = [sys.executable, *target, "--database-url", database_url, "--redis-url", redis_url, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_tests())


def test_once_drains_in_order_and_exits_zero(redis_server, outbox_url):
    ids = spill(outbox_url, "a", 1200) + spill(outbox_url, "b", 10, prefix="b")
    out = replay_once(outbox_url, redis_server.url, "--batch-size", "500", "--log-level", "INFO")
    assert "draining queue a: 1200 left" in out.stderr and "drained queue a" in out.stderr
    client = redis_server.client()
    assert queued(client, "a") == ids[:1200]
    assert queued(client, "b") == ids[1200:]
    assert Outbox(outbox_url).pending_count() == 0


def test_once_with_redis_down_exits_non_zero_with_a_reason(sqlite_url):
    spill(sqlite_url, "a", 3)
    started = time.monotonic()
    out = replay_once(sqlite_url, f"redis://127.0.0.1:{free_port()}/0", check=False)
    assert out.returncode != 0 and time.monotonic() - started < 15
    assert "Error: redis is unreachable" in out.stderr.strip().splitlines()[-1]
    assert Outbox(sqlite_url).pending_count() == 3


def test_killed_between_redis_write_and_outbox_commit_never_doubles(redis_server, outbox_url, tmp_path):
    ids = spill(outbox_url, "crash", 1000)
    from helpers import TESTS

    crashed = replayer(
        outbox_url,
        redis_server.url,
        "--once",
        "--batch-size",
        "300",
        "--batch-time",
        "4",  # batches of 300, however long Redis takes to run them on a busy machine
        "--lease-ttl",
        "1",
        script=str(TESTS / "crashing_replayer.py"),
    )
    assert crashed.wait(60) == -signal.SIGKILL
    client = redis_server.client()
    # The first outbox commit comes after the second batch was sent: 300 or 600 jobs reach Redis.
    # A batch sent just before the kill may still be in Redis's input: Redis runs what it has
    # read before it drops a closed connection, so wait until the killed replayer's are gone.
    wait_for(lambda: len(client.client_list()) == 1, timeout=10)
    landed = queued(client, "crash")
    assert landed in (ids[:300], ids[:600]), "whole batches reached Redis"
    assert Outbox(outbox_url).pending_count() == 1000, "but no outbox commit did"
    out = replay_once(outbox_url, redis_server.url, "--log-level", "INFO", "--batch-size", "300", "--lease-ttl", "1")
    skipped = sum(int(n) for n in re.findall(r"(\d+) job\(s\) already in redis", out.stderr))
    assert skipped == len(landed)
    assert queued(client, "crash") == ids
    assert Outbox(outbox_url).pending_count() == 0


def test_three_replayers_at_once_deliver_each_job_once_in_order(redis_server, outbox_url):
    ids = spill(outbox_url, "multi", 3000)
    ports = [free_port() for _ in range(3)]
    procs = [
        replayer(
            outbox_url,
            redis_server.url,
            "--poll-interval",
            "0.1",
            "--batch-size",
            "100",
            "--lease-ttl",
            "2",
            "--metrics-port",
            str(port),
        )
        for port in ports
    ]
    outbox_ = Outbox(outbox_url)
    wait_for(lambda: outbox_.pending_count() == 0, timeout=60)
    for port in ports:  # all three are up and running, not just the one that drained
        wait_for(lambda p=port: http_get(p, "/healthz")[0] == 200, timeout=20)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(10) == 0
    assert queued(redis_server.client(), "multi") == ids


def test_sigterm_finishes_and_exits_zero_quickly(redis_server, sqlite_url):
    proc = replayer(sqlite_url, redis_server.url, "--poll-interval", "0.2")
    spill(sqlite_url, "live", 50)
    wait_for(lambda: len(queued(redis_server.client(), "live")) == 50, timeout=20)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 5


def test_replays_within_a_second_of_redis_coming_back(redis_server, sqlite_url):
    redis_server.kill()
    spill(sqlite_url, "back", 20)
    port = free_port()
    proc = replayer(sqlite_url, redis_server.url, "--poll-interval", "0.2", "--metrics-port", str(port))
    wait_for(lambda: redis_up_metric(port) == 0, timeout=30)  # running, and has seen Redis down
    redis_server.start()
    back_at = time.monotonic()
    wait_for(lambda: len(queued(redis_server.client(), "back")) == 20, timeout=10, interval=0.01)
    assert time.monotonic() - back_at < 1.5
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert "waiting for it" in err and proc.returncode == 0


def test_poison_row_goes_dead_and_the_rest_goes_on(redis_server, sqlite_url):
    ids = spill(sqlite_url, "poison", 5)
    client = redis_server.client()
    client.set(f"rq:job:{ids[2]}", "not a hash")  # HSET on it fails with WRONGTYPE
    out = replay_once(sqlite_url, redis_server.url, "--max-attempts", "2", "--poll-interval", "0.05")
    assert "dead" in out.stderr
    assert queued(client, "poison") == ids[:2] + ids[3:]
    dead = Outbox(sqlite_url).dead_rows()
    assert [row["job_id"] for row in dead] == [ids[2]] and "WRONGTYPE" in dead[0]["last_error"]

    cli = [sys.executable, "-m", "spillover"]
    listed = subprocess.run([*cli, "dead", "list", "--database-url", sqlite_url], capture_output=True, text=True)
    assert ids[2] in listed.stdout
    client.delete(f"rq:job:{ids[2]}")
    retried = subprocess.run(
        [*cli, "dead", "retry", str(dead[0]["id"]), "--database-url", sqlite_url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 row(s) back to pending" in retried.stdout
    replay_once(sqlite_url, redis_server.url)
    assert queued(client, "poison") == ids[:2] + ids[3:] + [ids[2]]


def test_retention_keeps_replayed_rows_as_done(redis_server, sqlite_url):
    spill(sqlite_url, "kept", 10)
    replay_once(sqlite_url, redis_server.url, "--retention", "3600")
    ob = Outbox(sqlite_url)
    assert ob.pending_count() == 0
    with ob.engine.connect() as conn:
        states = [row.state for row in conn.execute(outbox.select())]
    assert states == [DONE] * 10


def test_status_reports_queues_redis_and_lease(redis_server, sqlite_url):
    spill(sqlite_url, "s1", 4)
    text = status_text(sqlite_url, redis_server.url.replace("127.0.0.1", "user:secret@127.0.0.1"), "--json")
    report = json.loads(text)
    assert report["queues"][0]["queue"] == "s1" and report["queues"][0]["pending"] == 4
    assert report["queues"][0]["oldest_age_s"] >= 0
    assert report["queues"][0]["target"] == report["target"] == "tests"
    assert report["queues"][0]["drainer"] is None, "nobody drains it"
    assert report["targets"] == [{"target": "tests", "pending": 4, "dead": 0, "this": True}]
    assert "secret" not in text and "***" in report["redis"]["url"]


def test_dead_purge_deletes_for_good(redis_server, sqlite_url):
    ids = spill(sqlite_url, "purge", 2)
    redis_server.client().set(f"rq:job:{ids[0]}", "not a hash")
    replay_once(sqlite_url, redis_server.url, "--max-attempts", "1")
    cli = [sys.executable, "-m", "spillover"]
    purged = subprocess.run(
        [*cli, "dead", "purge", "--all", "--database-url", sqlite_url], capture_output=True, text=True, check=True
    )
    assert "1 row(s) deleted" in purged.stdout
    assert Outbox(sqlite_url).dead_rows() == [] and Outbox(sqlite_url).pending_count() == 0
    refused = subprocess.run([*cli, "dead", "purge", "--database-url", sqlite_url], capture_output=True, text=True)
    assert refused.returncode != 0 and "ROW_ID or --all" in refused.stderr


def test_ambiguous_row_older_than_the_marker_ttl_is_not_replayed_blindly(redis_server, sqlite_url):
    from spillover.redis_side import client_from_url
    from spillover.replayer import ReplayConfig, Replayer
    from spillover.stored_job import SpilledJob

    outbox_ = Outbox(sqlite_url)
    queue = Queue("amb-old", connection=redis.Redis(port=free_port()), outbox=outbox_)
    job = queue.create_job(jobs.noop, job_id="maybe-delivered")
    queue._prepare_offline(job)
    stored = replace(queue._row(job), ambiguous=True)
    outbox_.append(
        [stored, SpilledJob("tests", "amb-old", "fine", stored.job_hash.replace(b"maybe-delivered", b"fine"))]
    )
    time.sleep(1.1)
    config = ReplayConfig(marker_ttl=1, queues=["amb-old"])
    stats = Replayer(outbox_, client_from_url(redis_server.url, 5.0), config).run_once()
    assert stats.dead == 1 and stats.replayed == 1
    dead = outbox_.dead_rows()
    assert [row["job_id"] for row in dead] == ["maybe-delivered"] and "marker" in dead[0]["last_error"]
    assert queued(redis_server.client(), "amb-old") == ["fine"]


def test_once_waits_for_a_queue_another_replayer_drains_then_names_it(redis_server, sqlite_url):
    from spillover.lease import QueueLease
    from spillover.redis_side import client_from_url
    from spillover.replayer import Replayer

    spill(sqlite_url, "busy", 3)
    spill(sqlite_url, "free", 2)
    outbox_ = Outbox(sqlite_url)
    assert QueueLease(outbox_.engine, "other-host:1:x", 30, "tests#rq", "busy").acquire()  # rows' lease name
    replay = Replayer(outbox_, client_from_url(redis_server.url, 5.0))
    with pytest.raises(ReplayError, match="busy by other-host:1:x"):
        replay.run_once(lease_wait=0.5)
    assert queued(redis_server.client(), "free") == ["j00000", "j00001"], "the free queue was drained meanwhile"
    assert outbox_.pending_count("busy") == 3


def test_a_corrupt_job_hash_goes_dead_with_its_reason_and_the_batch_goes_on(redis_server, sqlite_url):
    """Bytes the script cannot decode (a damaged row): the replayer used to exit and crash-loop on them."""
    from sqlalchemy import create_engine, text

    ids = spill(sqlite_url, "corrupt", 6)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:  # the third row's hash cut short: a MessagePack array that ends too soon
        conn.execute(
            text("UPDATE spillover_outbox SET job_hash = :bad WHERE job_id = :id"),
            {"bad": b"\xdd\x00\x00\x00\x08\xdb\x00\x00\x00\x06sta", "id": ids[2]},
        )
    engine.dispose()
    out = replay_once(sqlite_url, redis_server.url, "--batch-size", "4")
    assert "not MessagePack" in out.stderr
    assert queued(redis_server.client(), "corrupt") == ids[:2] + ids[3:], "the others, in order, once"
    [dead] = Outbox(sqlite_url).dead_rows()
    assert dead["job_id"] == ids[2] and "corrupt outbox row" in dead["last_error"]
    assert Outbox(sqlite_url).pending_count() == 0


def test_batches_are_bounded_by_bytes_not_only_rows(make_redis, sqlite_url):
    """Big jobs: a batch of rows over Redis's request limit is answered by a closed connection, which looks
    like an outage, for ever. Here Redis takes at most 1 MiB per argument, the rows are 200 KB each."""
    server = make_redis("--proto-max-bulk-len", "1mb")
    q = Queue("big", connection=redis.Redis(port=free_port()), outbox=sqlite_url)
    ids = [q.enqueue(jobs.noop, os.urandom(200_000)).id for _ in range(12)]  # incompressible: RQ zlibs job data
    replay_once(sqlite_url, server.url, "--batch-bytes", "700000")
    assert queued(server.client(), "big") == ids, "every row, in order, three to a call"
    more = [q.enqueue(jobs.noop, os.urandom(200_000)).id for _ in range(3)]
    replay_once(sqlite_url, server.url, "--batch-bytes", "1024")  # each row over the bound: it goes alone
    assert queued(server.client(), "big") == ids + more
    # Bounds set too high for this Redis: it closes the connection on the batch, yet takes a probe at once.
    # Not an outage: the batch goes row by row (before: retried as an outage for ever).
    later = [q.enqueue(jobs.noop, os.urandom(200_000)).id for _ in range(8)]
    done = replay_once(sqlite_url, server.url, "--batch-bytes", str(64 * 1024 * 1024), "--log-level", "INFO")
    assert "closed the connection on a batch; row by row" in done.stderr
    assert queued(server.client(), "big") == ids + more + later


def test_a_row_larger_than_redis_accepts_goes_dead_with_the_reason(make_redis, sqlite_url):
    server = make_redis("--proto-max-bulk-len", "1mb")
    q = Queue("big", connection=redis.Redis(port=free_port()), outbox=sqlite_url)
    before = q.enqueue(jobs.noop, "small").id
    huge = q.enqueue(jobs.noop, os.urandom(1_500_000)).id  # over the 1 MiB Redis takes in one argument
    after = q.enqueue(jobs.noop, "small").id
    done = replay_once(sqlite_url, server.url, "--max-attempts", "1")
    assert queued(server.client(), "big") == [before, after], "the queue goes on past it"
    dead = Outbox(sqlite_url).dead_rows()
    assert [row["job_id"] for row in dead] == [huge]
    assert "larger than redis accepts in one request" in dead[0]["last_error"]
    assert "is dead" in done.stderr


def test_batches_are_sized_by_how_long_the_script_runs(make_redis, sqlite_url):
    """Redis serves no one else while a batch's script runs (past its busy threshold it answers BUSY to every
    client, and producers would spill): the replayer sizes batches by the run time the script reports."""
    server = make_redis()
    client = server.client()
    q = Queue("long", connection=redis.Redis(port=free_port()), outbox=sqlite_url)
    total = 6000
    for start in range(0, total, 1000):
        q.enqueue_many([Queue.prepare_data(jobs.noop, job_id=f"j{n:05d}") for n in range(start, start + 1000)])
    push_sha = hashlib.sha1((Path(spillover.__file__).parent / "lua" / "push.lua").read_bytes()).hexdigest()

    def push_run_times(*options: str) -> list[int]:
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 100_000)
        client.slowlog_reset()
        replay_once(sqlite_url, server.url, *options)
        entries = client.slowlog_get(100_000)
        client.config_set("slowlog-log-slower-than", 10_000)
        return sorted(e["duration"] for e in entries if push_sha.encode() in e["command"])  # µs, Redis's own

    unbounded = push_run_times("--batch-size", "5000", "--batch-time", "4")
    assert queued(client, "long") == [f"j{n:05d}" for n in range(total)]
    assert unbounded[-1] > 8_000, f"batches of 5,000 rows must run long for this test to mean anything: {unbounded}"
    client.delete("rq:queue:long")
    q.enqueue_many([Queue.prepare_data(jobs.noop, job_id=f"k{n:05d}") for n in range(total)])
    bounded = push_run_times("--batch-size", "1000", "--batch-time", "0.002")  # the first two batches run long
    assert queued(client, "long") == [f"k{n:05d}" for n in range(total)], "every row, in order"
    median = bounded[len(bounded) // 2]
    assert median <= 4_000, f"batches were to run about 2 ms; the median ran {median} µs ({len(bounded)} calls)"
    assert len(bounded) > 3 * len(unbounded)
