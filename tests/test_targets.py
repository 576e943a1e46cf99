"""Rows know their Redis: a replayer drains its own target's rows and leaves the others, saying so."""

from __future__ import annotations

import json
import subprocess
import sys

import jobs
import pytest
import redis
from helpers import env_with_tests, replay_once, wait_for
from test_replayer import queued, replayer

from spillover import ConfigurationError, Outbox, Queue, redis_from_url, was_spilled
from spillover.redis_side import client_from_url, target_of
from spillover.replayer import Replayer


@pytest.fixture(autouse=True)
def derived_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPILLOVER_TARGET")


def test_target_names_from_connections():
    assert target_of(redis.Redis(host="Cache.Internal", port=6380, db=2)) == "cache.internal:6380/2"
    assert target_of(redis.Redis()) == "localhost:6379/0"
    assert target_of(redis.Redis.from_url("rediss://:pw@cache:6390/1")) == "cache:6390/1"
    assert target_of(redis.Redis.from_url("unix:///run/redis.sock?db=3")) == "unix:/run/redis.sock/3"
    assert target_of(redis.Redis(host="::1", port=7000)) == "[::1]:7000/0"
    assert target_of(redis_from_url("redis+sentinel://10.0.0.1:26379,10.0.0.2/mymaster/4")) == "sentinel:mymaster/4"


def test_producer_and_replayer_derive_the_same_target(sqlite_url, monkeypatch):
    producer = Queue("q", connection=redis.Redis(host="127.0.0.1", port=6399, db=1), outbox=sqlite_url)
    replay = Replayer(Outbox(sqlite_url), client_from_url("redis://127.0.0.1:6399/1", 1.0))
    assert producer.target == replay.target == "127.0.0.1:6399/1"
    assert Queue("q", connection=redis.Redis(port=6399), outbox=sqlite_url, target="cache-a").target == "cache-a"
    monkeypatch.setenv("SPILLOVER_TARGET", "cache-b")
    assert Queue("q", connection=redis.Redis(port=6399), outbox=sqlite_url).target == "cache-b"
    with pytest.raises(ConfigurationError, match="target name"):
        Queue("q", connection=redis.Redis(port=6399), outbox=sqlite_url, target="x" * 256)


def _spill_to_both(sqlite_url: str, a, b) -> tuple[list[str], list[str]]:
    """The same queue name on two Redis servers, one outbox, both servers down: interleaved rows."""
    a.kill()
    b.kill()
    qa = Queue("mail", connection=a.client(), outbox=sqlite_url)
    qb = Queue("mail", connection=b.client(), outbox=sqlite_url)
    for i in range(5):
        assert was_spilled(qa.enqueue(jobs.noop, job_id=f"a{i}"))
        assert was_spilled(qb.enqueue(jobs.noop, job_id=f"b{i}"))
    a.start()
    b.start()
    return [f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]


def _status(sqlite_url: str, redis_url: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "spillover", "status", "--json", "--database-url", sqlite_url, "--redis-url", redis_url],
        capture_output=True,
        text=True,
        check=True,
        env=env_with_tests(),
    )
    return json.loads(out.stdout)


def test_two_redis_servers_one_outbox_each_replayer_drains_its_own(make_redis, sqlite_url):
    a, b = make_redis(), make_redis()
    a_ids, b_ids = _spill_to_both(sqlite_url, a, b)
    a_target, b_target = f"127.0.0.1:{a.port}/0", f"127.0.0.1:{b.port}/0"

    report = _status(sqlite_url, a.url)
    assert report["target"] == a_target
    assert {t["target"]: (t["pending"], t["this"]) for t in report["targets"]} == {
        a_target: (5, True),
        b_target: (5, False),
    }

    out = replay_once(sqlite_url, a.url, "--log-level", "INFO")
    assert queued(a.client(), "mail") == a_ids
    assert queued(b.client(), "mail") == [], "b's jobs are not pushed into a"
    assert out.stderr.count(f"meant for redis {b_target!r}") == 1, out.stderr
    assert Outbox(sqlite_url).pending_count(target=b_target) == 5

    replay_once(sqlite_url, b.url)
    assert queued(b.client(), "mail") == b_ids
    assert Outbox(sqlite_url).pending_count() == 0


def test_a_running_replayer_logs_other_targets_once(make_redis, sqlite_url):
    a, b = make_redis(), make_redis()
    a_ids, _ = _spill_to_both(sqlite_url, a, b)
    b_target = f"127.0.0.1:{b.port}/0"
    proc = replayer(sqlite_url, a.url, "--poll-interval", "0.05")
    wait_for(lambda: queued(a.client(), "mail") == a_ids, timeout=30)
    late = Queue(
        "mail", connection=redis.Redis(host="127.0.0.1", port=1), outbox=sqlite_url, target=f"127.0.0.1:{a.port}/0"
    )
    late.enqueue(jobs.noop, job_id="a-late")  # one more row of a's: proves passes went on after the first
    wait_for(lambda: queued(a.client(), "mail") == [*a_ids, "a-late"], timeout=30)
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert err.count(f"meant for redis {b_target!r}") == 1, err
    assert Outbox(sqlite_url).pending_count(target=b_target) == 5


def test_a_named_target_is_drained_by_the_replayer_given_that_name(redis_server, sqlite_url):
    q = Queue("named", connection=redis.Redis(host="127.0.0.1", port=1), outbox=sqlite_url, target="cache-main")
    ids = [q.enqueue(jobs.noop, job_id=f"n{i}").id for i in range(3)]
    replay_once(sqlite_url, redis_server.url)  # derives 127.0.0.1:port/0: not its rows
    assert queued(redis_server.client(), "named") == []
    replay_once(sqlite_url, redis_server.url, "--target", "cache-main")
    assert queued(redis_server.client(), "named") == ids
