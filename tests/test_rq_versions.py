"""What RQ 2.8-3.0 added, through spillover: key prefixes, unique=True, rate limits, groups.

The per-form fidelity (native == direct == replayed) is in test_producer.py over forms.py; here
the behaviours around it: the prefix travelling with the rows, a unique job decided at replay,
RQ's own checks and errors, a real worker under a prefix.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jobs
import pytest
import redis
import rq
from forms import RQ_MAJOR
from helpers import env_with_tests, replay_once, run_worker, status_report, wait_for
from rq.exceptions import DuplicateJobError
from servers import free_port

from spillover import ConfigurationError, Group, Outbox, Queue, was_spilled
from spillover.faultproxy import FaultProxy
from spillover.rq_keys import KeyLayout, split_target, stored_target

pytestmark = pytest.mark.rq_facing
needs_rq3 = pytest.mark.skipif(RQ_MAJOR < 3, reason="RQ_KEY_PREFIX and rate limits are RQ 3's")


def dead_redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=free_port())


@needs_rq3
def test_prefixed_keys_direct_and_replayed_equal_native_and_the_prefix_travels_with_the_rows(redis_server, sqlite_url):
    env = {**env_with_tests(), "RQ_KEY_PREFIX": "{app}"}
    done = subprocess.run(
        [sys.executable, "-m", "prefixed_forms", redis_server.url, sqlite_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["keys"] > 80  # compared, summed over the forms
    assert found["differ"] == [], "native == direct == replayed, key by key, for every form"
    assert found["unprefixed"] == [], "RQ's keys, spillover's markers and fences: all under {app}"
    assert set(found["stored_targets"]) == {"prefixed#{app}"}
    assert found["left"] == 0, "the replayer, without RQ_KEY_PREFIX, drained them by the rows' prefix"


@needs_rq3
def test_a_worker_under_the_prefix_runs_replayed_jobs_in_order(redis_server, sqlite_url, tmp_path):
    log = tmp_path / "ran.txt"
    script = (
        "import sys, jobs, redis\n"
        "from spillover import Queue\n"
        "q = Queue('pf', connection=redis.Redis(port=1), outbox=sys.argv[1], target='pf')\n"
        "for i in range(20): q.enqueue(jobs.append_line, sys.argv[2], str(i))\n"
    )
    env = {**env_with_tests(), "RQ_KEY_PREFIX": "{app}"}
    subprocess.run([sys.executable, "-c", script, sqlite_url, str(log)], check=True, env=env, timeout=60)
    replay_once(sqlite_url, redis_server.url, "--target", "pf", without=("RQ_KEY_PREFIX",))
    client = redis_server.client()
    assert client.llen("{app}:queue:pf") == 20 and not client.exists("rq:queue:pf")
    subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", redis_server.url, "-w", "rq.SimpleWorker", "pf"],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert log.read_text().split() == [str(i) for i in range(20)]


def test_the_prefix_is_checked_as_rq_checks_it():
    assert split_target(stored_target("redis:6379/0", KeyLayout("{app}"))) == ("redis:6379/0", KeyLayout("{app}"))
    assert stored_target("redis:6379/0", KeyLayout()) == "redis:6379/0#rq", "the default prefix too"
    with pytest.raises(ConfigurationError, match="only letters, digits"):
        split_target("redis:6379/0#bad prefix")
    with pytest.raises(ConfigurationError, match="cannot contain '#'"):
        Queue("q", connection=dead_redis(), target="eu#primary")


def test_a_replayer_with_an_invalid_rq_key_prefix_exits_naming_it(redis_server, sqlite_url):
    done = replay_once(
        sqlite_url, redis_server.url, check=False, env={**env_with_tests(), "RQ_KEY_PREFIX": "no spaces"}
    )
    assert done.returncode != 0 and "RQ_KEY_PREFIX" in done.stderr and "Traceback" not in done.stderr


def test_a_queue_class_with_its_own_key_namespace_is_refused(redis_server, sqlite_url):
    class Odd(Queue):
        redis_queue_namespace_prefix = "custom:queue:"

    with pytest.raises(ConfigurationError, match="one prefix"):
        Odd("q", connection=redis_server.client(), outbox=sqlite_url)


def test_unique_when_healthy_is_rqs_rule_and_error(redis_server, sqlite_url):
    q = Queue("u", connection=redis_server.client(), outbox=sqlite_url)
    q.enqueue(jobs.noop, job_id="u1", unique=True)
    with pytest.raises(DuplicateJobError, match="Job with ID 'u1' already exists"):
        q.enqueue(jobs.noop, job_id="u1", unique=True)
    with pytest.raises(ValueError, match="unique=True requires an explicit job_id"):
        q.enqueue(jobs.noop, unique=True)
    with pytest.raises(ValueError, match="not supported with job dependencies"):
        q.enqueue(jobs.noop, job_id="u2", unique=True, depends_on="u1")
    assert redis_server.client().lrange("rq:queue:u", 0, -1) == [b"u1"]


def test_spilled_unique_is_decided_at_replay_skipped_counted_and_shown(redis_server, sqlite_url):
    client = redis_server.client()
    rq.Queue("u", connection=client).enqueue(jobs.noop, "already", job_id="taken")
    spilling = Queue("u", connection=dead_redis(), outbox=sqlite_url)
    first = spilling.enqueue(jobs.noop, "spilled", job_id="taken", unique=True)
    second = spilling.enqueue(jobs.noop, "new", job_id="fresh", unique=True)
    assert was_spilled(first) and was_spilled(second), "the caller gets the job: Redis cannot be asked"

    done = replay_once(sqlite_url, redis_server.url, "--log-level", "WARNING")
    assert "1 unique job(s) already in redis" in done.stderr and "taken" in done.stderr
    assert client.lrange("rq:queue:u", 0, -1) == [b"taken", b"fresh"]
    assert rq.job.Job.fetch("taken", connection=client).args == ("already",), "the first one kept, as RQ keeps it"

    report = status_report(sqlite_url, redis_server.url)
    [entry] = [e for e in report["queues"] if e["queue"] == "u"]
    assert (entry["pending"], entry["skipped"]) == (0, 1)
    assert Outbox(sqlite_url).pending_count() == 0


def test_spilled_unique_pushed_by_the_producer_itself_is_skipped_too(redis_server, sqlite_url):
    """A lane leaving spill mode pushes its own rows: a taken unique id is skipped there as at replay."""
    client = redis_server.client()
    proxy = FaultProxy("127.0.0.1", redis_server.port)
    try:
        q = Queue("own", connection=redis.Redis(port=proxy.port), outbox=sqlite_url)
        proxy.set_mode("refuse")
        assert was_spilled(q.enqueue(jobs.noop, job_id="mine", unique=True))
        proxy.set_mode("pass")
        rq.Queue("own", connection=client).enqueue(jobs.noop, job_id="mine")  # someone else got there first

        def resumed() -> bool:
            return not was_spilled(q.enqueue(jobs.noop))

        wait_for(resumed, timeout=10, interval=0.1)
    finally:
        proxy.close()
    assert client.lrange("rq:queue:own", 0, -1)[0] == b"mine" and client.llen("rq:queue:own") >= 2
    assert client.lrange("rq:queue:own", 0, -1).count(b"mine") == 1
    [entry] = [e for e in Outbox(sqlite_url).queue_stats() if e["queue"] == "own"]
    assert (entry["pending"], entry["skipped"]) == (0, 1)


def test_group_through_an_outage_has_its_keys_after_replay_and_runs(redis_server, sqlite_url, tmp_path):
    log = tmp_path / "ran.txt"
    batch = Group.create(connection=dead_redis(), name="nightly")
    q = Queue("g", connection=dead_redis(), outbox=sqlite_url)
    spilled = batch.enqueue_many(q, [q.prepare_data(jobs.append_line, (str(log), str(i))) for i in range(3)])
    assert all(was_spilled(job) for job in spilled)
    replay_once(sqlite_url, redis_server.url)
    client = redis_server.client()
    assert sorted(client.smembers("rq:group:nightly")) == sorted(job.id.encode() for job in spilled)
    assert client.smembers("rq:groups") == {b"nightly"}
    fetched = rq.group.Group.fetch("nightly", connection=client)
    assert sorted(job.id for job in fetched.get_jobs()) == sorted(job.id for job in spilled)
    run_worker(redis_server.url, "g")
    assert log.read_text().split() == ["0", "1", "2"]


@needs_rq3
def test_rate_limited_jobs_replayed_wait_for_their_slots_and_all_run(redis_server, sqlite_url, tmp_path):
    log = tmp_path / "ran.txt"
    q = Queue("rl", connection=dead_redis(), outbox=sqlite_url)
    for i in range(6):
        q.enqueue(jobs.append_line, str(log), str(i), rate_limit=rq.RateLimit("api", concurrency=2))
    replay_once(sqlite_url, redis_server.url)
    client = redis_server.client()
    assert client.llen("rq:queue:rl") == 2 and client.zcard("rq:rl:api:rate_limited") == 4
    run_worker(redis_server.url, "rl")  # each finished job frees its slot for the next, oldest first
    assert log.read_text().split() == [str(i) for i in range(6)], "in the order they were enqueued"


@needs_rq3
def test_rq3_checks_are_kept(redis_server, sqlite_url):
    q = Queue("c", connection=redis_server.client(), outbox=sqlite_url)
    with pytest.raises(ValueError, match="unique=True is not supported with rate-limited jobs"):
        q.enqueue(jobs.noop, job_id="x", unique=True, rate_limit=rq.RateLimit("k", concurrency=1))
    with pytest.raises(ValueError, match="appears more than once"):
        q.enqueue_many([q.prepare_data(jobs.noop, job_id="same"), q.prepare_data(jobs.noop, job_id="same")])
    assert not redis_server.client().exists("rq:job:x", "rq:job:same")


def test_unique_within_a_transaction_is_decided_when_pushed_at_commit(redis_server, sqlite_url):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    client = redis_server.client()
    rq.Queue("tx", connection=client).enqueue(jobs.noop, "first", job_id="taken")
    q = Queue("tx", connection=client, outbox=sqlite_url)
    engine = create_engine(sqlite_url)
    with Session(engine) as session, session.begin():
        session.connection()
        taken = q.within(session).enqueue(jobs.noop, "second", job_id="taken", unique=True)
        fresh = q.within(session).enqueue(jobs.noop, job_id="fresh-u", unique=True)
        assert not client.exists("rq:job:fresh-u"), "nothing in Redis before the commit"
    assert (taken.id, fresh.id) == ("taken", "fresh-u")
    assert client.lrange("rq:queue:tx", 0, -1) == [b"taken", b"fresh-u"]
    assert rq.job.Job.fetch("taken", connection=client).args == ("first",)
    # the pushed row is deleted off the commit's path, the skipped one kept
    wait_for(lambda: Outbox(sqlite_url).pending_count() == 0, timeout=5)
    [entry] = [e for e in Outbox(sqlite_url).queue_stats() if e["queue"] == "tx"]
    assert (entry["pending"], entry["skipped"]) == (0, 1)


def test_a_row_failing_half_way_is_written_again_without_a_second_push(redis_server, sqlite_url):
    """Everything that may fail is written before the job is made runnable: here the Group's set of
    groups is of the wrong type, the row fails before its RPUSH, goes dead, and once retried runs once."""
    client = redis_server.client()
    client.set("rq:groups", "not a set")
    q = Queue("half", connection=dead_redis(), outbox=sqlite_url)
    [job] = Group.create(connection=dead_redis(), name="g").enqueue_many(q, [q.prepare_data(jobs.noop)])
    for _ in range(3):
        replay_once(sqlite_url, redis_server.url, "--max-attempts", "3", check=False)
    assert client.llen("rq:queue:half") == 0, "never pushed while its group write fails"
    assert Outbox(sqlite_url).dead_rows()[0]["job_id"] == job.id
    client.delete("rq:groups")
    subprocess.run(
        [sys.executable, "-m", "spillover", "dead", "retry", "--all", "--database-url", sqlite_url], check=True
    )
    replay_once(sqlite_url, redis_server.url)
    assert client.lrange("rq:queue:half", 0, -1) == [job.id.encode()]
    assert client.smembers("rq:group:g") == {job.id.encode()}


def test_rows_with_options_are_refused_by_an_outbox_without_the_column(redis_server, tmp_path):
    """A producer of this release before the deploy's migration 0005: plain jobs spill as before; a job
    whose options the table cannot keep raises OutboxNotMigrated, and nothing is stored."""
    from spillover import OutboxNotMigrated, migrate

    url = f"sqlite:///{tmp_path / 'at-0004.db'}"
    migrate.upgrade(url, "0004")
    q = Queue("old", connection=dead_redis(), outbox=url)
    assert was_spilled(q.enqueue(jobs.noop, job_id="plain"))
    with pytest.raises(OutboxNotMigrated, match="options column"):
        q.enqueue(jobs.noop, job_id="needs-0005", unique=True)
    assert Outbox(url).pending_count() == 1
    migrate.upgrade(url)
    assert was_spilled(q.enqueue(jobs.noop, job_id="needs-0005", unique=True))
    replay_once(url, redis_server.url)
    assert redis_server.client().lrange("rq:queue:old", 0, -1) == [b"plain", b"needs-0005"]


def test_cluster_replies_are_outages():
    from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

    from spillover.redis_side import is_outage

    for error in (
        MovedError("3999 127.0.0.1:6381"),
        AskError("3999 127.0.0.1:6381"),
        ClusterDownError("down"),
        TryAgainError("again"),
    ):
        assert is_outage(error), error


def test_replayed_dependents_follow_rqs_dependency_flow_on_a_real_worker(redis_server, sqlite_url, tmp_path):
    """Parents and children spilled together, replayed, run by a worker: a child runs after its parent
    finishes (RQ 3: through READY_TO_ENQUEUE and the ready registry), a child that allows failures after
    its parent fails, and one that does not stays deferred."""
    from rq.job import Dependency, Job

    log = tmp_path / "ran.txt"
    q = Queue("deps", connection=dead_redis(), outbox=sqlite_url)
    ok = q.enqueue(jobs.append_line, str(log), "parent", job_id="ok-parent")
    bad = q.enqueue(jobs.fail, str(log), "failing", job_id="bad-parent")
    q.enqueue(jobs.append_line, str(log), "child", job_id="child", depends_on=ok)
    q.enqueue(
        jobs.append_line, str(log), "tolerant", job_id="tolerant", depends_on=Dependency(jobs=[bad], allow_failure=True)
    )
    q.enqueue(jobs.append_line, str(log), "strict", job_id="strict", depends_on=bad)
    replay_once(sqlite_url, redis_server.url)
    client = redis_server.client()
    assert sorted(client.zrange("rq:deferred:deps", 0, -1)) == [b"child", b"strict", b"tolerant"]
    run_worker(redis_server.url, "deps")
    assert log.read_text().split() == ["parent", "failing", "child", "tolerant"]
    assert Job.fetch("strict", connection=client).get_status() == "deferred"
    if RQ_MAJOR >= 3:  # the ready registry was the way through, and is empty again
        assert client.zcard("rq:ready:deps") == 0 and Job.fetch("child", connection=client).get_status() == "finished"


def test_retarget_moves_a_redis_rows_of_every_prefix_each_keeping_its_own(sqlite_url):
    from spillover.registry import covers
    from spillover.stored_job import SpilledJob, encode_hash

    outbox = Outbox(sqlite_url)
    job = encode_hash({"status": "queued"})
    outbox.append([SpilledJob(stored, "q", f"j{n}", job) for n, stored in enumerate(["gone", "gone#rq", "gone#{app}"])])
    assert outbox.retarget("gone", "here") == 3
    assert outbox.pending_by_target_as_stored() == {"here", "here#rq", "here#{app}"}
    with pytest.raises(ConfigurationError, match="cannot be empty or contain '#'"):
        outbox.retarget("here", "there#rq")
    # and a replayer of "here" claims them all at once (status shows none of them unclaimed)
    assert all(covers({("here", None, None)}, stored, "q", "") for stored in ("here", "here#rq", "here#{app}"))
    assert not covers({("here", None, None)}, "elsewhere#rq", "q", "")
