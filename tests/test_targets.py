"""Rows know their Redis: a replayer drains its own target's rows and leaves the others, saying so."""

from __future__ import annotations

import re
import subprocess
import sys

import jobs
import pytest
import redis
from helpers import env_with_tests, http_get, replay_once, status_report, status_text, stop_replayer, wait_for
from releases import insert_untargeted_row
from sqlalchemy import create_engine, text
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


def test_two_redis_servers_one_outbox_each_replayer_drains_its_own(make_redis, sqlite_url):
    a, b = make_redis(), make_redis()
    a_ids, b_ids = _spill_to_both(sqlite_url, a, b)
    a_target, b_target = f"127.0.0.1:{a.port}/0", f"127.0.0.1:{b.port}/0"

    report = status_report(sqlite_url, a.url)
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
    err = stop_replayer(proc)
    assert err.count(f"meant for redis {b_target!r}") == 1, err
    assert Outbox(sqlite_url).pending_count(target=b_target) == 5


def test_a_named_target_is_drained_by_the_replayer_given_that_name(redis_server, sqlite_url):
    q = Queue("named", connection=redis.Redis(host="127.0.0.1", port=1), outbox=sqlite_url, target="cache-main")
    ids = [q.enqueue(jobs.noop, job_id=f"n{i}").id for i in range(3)]
    replay_once(sqlite_url, redis_server.url)  # derives 127.0.0.1:port/0: not its rows
    assert queued(redis_server.client(), "named") == []
    replay_once(sqlite_url, redis_server.url, "--target", "cache-main")
    assert queued(redis_server.client(), "named") == ids


# -- one Redis, several spellings ---------------------------------------------------------------


def _spill_through(connection: redis.Redis, url: str, queue: str, count: int) -> list[str]:
    q = Queue(queue, connection=connection, outbox=url)
    ids = [f"{queue}-{i:03d}" for i in range(count)]
    assert all(was_spilled(q.enqueue(jobs.noop, job_id=job_id)) for job_id in ids)
    return ids


def test_localhost_producer_and_127_0_0_1_replayer_are_one_target(redis_server, sqlite_url):
    redis_server.kill()
    ids = _spill_through(redis.Redis(host="localhost", port=redis_server.port), sqlite_url, "spelled", 20)
    redis_server.start()
    replay_once(sqlite_url, f"redis://127.0.0.1:{redis_server.port}/0")
    assert queued(redis_server.client(), "spelled") == ids
    assert Outbox(sqlite_url).pending_count() == 0


def test_relative_and_absolute_socket_paths_are_one_target(make_redis, sqlite_url, tmp_path, monkeypatch):
    socket_path = tmp_path / "redis.sock"
    server = make_redis("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    server.kill()
    monkeypatch.chdir(tmp_path)
    ids = _spill_through(redis.Redis(unix_socket_path="redis.sock"), sqlite_url, "sock", 10)
    assert Outbox(sqlite_url).pending_by_target() == {f"unix:{socket_path}/0": {"sock": 10}}
    server.start()
    replay_once(sqlite_url, f"unix://{socket_path}")
    assert queued(server.client(), "sock") == ids


def test_a_short_and_a_qualified_service_name_are_one_target(monkeypatch):
    """Names are compared by what they resolve to, where the replayer runs (the resolver is the only stand-in)."""
    from spillover import targets

    monkeypatch.setattr(targets, "search_domain", lambda: "shop.svc.cluster.local")
    assert target_of(redis.Redis(host="redis", port=6379)) == "redis.shop.svc.cluster.local:6379/0"
    assert target_of(redis.Redis(host="redis.other", port=6379)) == "redis.other:6379/0"
    assert target_of(redis.Redis(host="localhost", port=6379)) == "localhost:6379/0"
    addresses = {"redis": {"10.0.0.7"}, "redis.shop.svc.cluster.local": {"10.0.0.7"}, "cache": {"10.0.0.9"}}
    matcher = targets.TargetMatcher("redis.shop.svc.cluster.local:6379/0", host="web-1")
    monkeypatch.setattr(matcher._resolver, "addresses", lambda host: frozenset(addresses.get(host, ())))
    assert matcher.group("redis:6379/0", "q", "web-2") == targets.Group("redis:6379/0", "q")
    assert matcher.group("redis:6379/1", "q", "web-2") is None, "another db"
    assert matcher.group("redis:6380/0", "q", "web-2") is None, "another port"
    assert matcher.group("cache:6379/0", "q", "web-2") is None, "another server"
    assert matcher.group("unknown:6379/0", "q", "web-2") is None, "unresolvable: only its exact name"
    assert matcher.group("sentinel:redis/0", "q", "web-2") is None


def test_loopback_rows_belong_to_their_hosts_replayer(redis_server, sqlite_url):
    """localhost on host A and on host B, in one shared outbox, are two servers: B's rows stay, and are reported."""
    redis_server.kill()
    ids = _spill_through(redis.Redis(host="localhost", port=redis_server.port), sqlite_url, "local", 5)
    with create_engine(sqlite_url).begin() as conn:  # the same rows, as a producer on host "web-b" wrote them
        conn.execute(
            text(
                "INSERT INTO spillover_outbox (target, queue, job_id, job_hash, producer) "
                "SELECT target, queue, 'b-' || job_id, job_hash, 'web-b:77:feedbeef' FROM spillover_outbox"
            )
        )
    redis_server.start()
    replay_once(sqlite_url, f"redis://127.0.0.1:{redis_server.port}/0")
    assert queued(redis_server.client(), "local") == ids, "only this host's rows"
    assert Outbox(sqlite_url).pending_count() == 5
    report = status_report(sqlite_url, redis_server.url)
    (stranded,) = report["unclaimed"]
    assert stranded["host"] == "web-b" and stranded["pending"] == 5
    assert f"--redis-url redis://localhost:{redis_server.port}/0 on host web-b" in stranded["would_drain"]


def test_rows_nobody_drains_are_a_gauge_a_warning_and_a_status_line(redis_server, sqlite_url):
    from servers import free_port

    q = Queue("orphans", connection=redis.Redis(host="127.0.0.1", port=1), outbox=sqlite_url, target="cache-x")
    q.enqueue(jobs.noop)
    q.enqueue(jobs.noop)
    with create_engine(sqlite_url).begin() as conn:  # written two minutes ago
        conn.execute(text("UPDATE spillover_outbox SET created_at = datetime('now', '-120 seconds')"))
    port = free_port()
    proc = replayer(sqlite_url, redis_server.url, "--metrics-port", str(port), "--poll-interval", "0.1")
    try:
        wait_for(
            lambda: 'spillover_unclaimed_rows{target="cache-x"} 2.0' in without_outbox(http_get(port, "/metrics")[1]),
            30,
        )
        report = status_report(sqlite_url, redis_server.url)
        assert len(report["replayers"]) == 1
        (stranded,) = report["unclaimed"]
        assert stranded["target"] == "cache-x" and stranded["queues"] == ["orphans"]
        assert stranded["would_drain"] == "a replayer with --target 'cache-x'"
        text_report = status_text(sqlite_url, redis_server.url)
        assert "UNCLAIMED: 2 pending row(s) of target cache-x" in text_report
    finally:
        err = stop_replayer(proc)
    assert "are drained by no running replayer: start a replayer with --target 'cache-x'" in err
    assert status_report(sqlite_url, redis_server.url)["replayers"] == [], "a stopped replayer leaves the registry"


def test_once_a_replayer_of_that_target_runs_its_rows_are_claimed(redis_server, sqlite_url):
    q = Queue("named", connection=redis.Redis(host="127.0.0.1", port=1), outbox=sqlite_url, target="cache-y")
    q.enqueue(jobs.noop)
    mine = replayer(sqlite_url, redis_server.url, "--poll-interval", "0.1", "--target", "cache-z")
    other = replayer(sqlite_url, "redis://127.0.0.1:1/0", "--target", "cache-y")  # its Redis is down: it waits
    try:
        wait_for(lambda: len(status_report(sqlite_url, redis_server.url)["replayers"]) == 2, 30)
        wait_for(lambda: status_report(sqlite_url, redis_server.url)["unclaimed"] == [], 30)
    finally:
        for proc in (mine, other):
            stop_replayer(proc)


def test_rows_with_no_target_are_not_adopted_while_a_replayer_of_another_redis_runs(make_redis, sqlite_url):
    """0.1 had one Redis per outbox; with two, nobody can tell whose such a row is: it waits, and is reported."""
    a, b = make_redis(), make_redis()
    insert_untargeted_row(sqlite_url, "legacy")
    b.kill()  # b's replayer runs (and says so in the registry) but cannot drain: its Redis is down
    other = replayer(sqlite_url, b.url, "--poll-interval", "0.1", "--target", "b")
    try:
        wait_for(lambda: len(status_report(sqlite_url, a.url)["replayers"]) == 1, 30)
        replay_once(sqlite_url, a.url, "--target", "a")
        assert Outbox(sqlite_url).pending_by_target() == {None: {"legacy": 1}}, "a saw b running: not a's to take"
        assert status_report(sqlite_url, a.url)["unclaimed"] == [], "b, alone again, claims it (and drains it once up)"
    finally:
        stop_replayer(other)
    wait_for(lambda: status_report(sqlite_url, a.url)["replayers"] == [], 30)
    replay_once(sqlite_url, a.url, "--target", "a")  # alone now: it adopts the row
    assert Outbox(sqlite_url).pending_count() == 0


def test_status_and_metrics_with_rows_with_and_without_a_target(redis_server, sqlite_url):
    """After a deploy from 0.1 the outbox holds both kinds; neither report may break on it."""
    from servers import free_port

    insert_untargeted_row(sqlite_url, "legacy")
    Queue("mixed", connection=redis.Redis(host="127.0.0.1", port=1), outbox=sqlite_url, target="cache-q").enqueue(
        jobs.noop
    )
    report = status_report(sqlite_url, redis_server.url)
    assert {(t["target"], t["pending"]) for t in report["targets"]} == {(None, 1), ("cache-q", 1)}
    text_report = status_text(sqlite_url, redis_server.url)
    assert "rows with no target (0.1 producers): 1 pending" in text_report
    port = free_port()
    proc = replayer(sqlite_url, "redis://127.0.0.1:1/0", "--metrics-port", str(port), "--target", "cache-z")
    try:
        wait_for(lambda: http_get(port, "/metrics")[0] == 200, 30)
        body = without_outbox(http_get(port, "/metrics")[1])
        assert 'spillover_backlog_rows{queue="legacy",target="(untargeted)"} 1.0' in body, body[-2000:]
        assert 'spillover_backlog_rows{queue="mixed",target="cache-q"} 1.0' in body
    finally:
        stop_replayer(proc)


def test_retarget_hands_stranded_rows_to_a_running_replayer(redis_server, sqlite_url):
    """Rows written on a host that is gone (a loopback name), handed to this host's Redis, then replayed."""
    redis_server.kill()
    ids = _spill_through(redis.Redis(host="localhost", port=redis_server.port), sqlite_url, "gone", 4)
    name = f"localhost:{redis_server.port}/0"
    with create_engine(sqlite_url).begin() as conn:  # as if a pod now gone had written them
        conn.execute(text("UPDATE spillover_outbox SET producer = 'old-pod:1:abcd'"))
    redis_server.start()
    replay_once(sqlite_url, redis_server.url)
    assert queued(redis_server.client(), "gone") == [], "another host's loopback rows: not ours"
    command = [sys.executable, "-m", "spillover", "retarget", "--database-url", sqlite_url, name, "cache-main"]
    out = subprocess.run([*command, "--host", "old-pod"], capture_output=True, text=True, env=env_with_tests())
    assert out.returncode == 0 and "4 pending row(s) now meant for cache-main" in out.stdout, out.stderr
    replay_once(sqlite_url, redis_server.url, "--target", "cache-main")
    assert queued(redis_server.client(), "gone") == ids


def without_outbox(metrics_text: str) -> str:
    """/metrics with the outbox label (one value per table) left out, as the assertions spell samples."""
    return re.sub(r'outbox="[^"]*",', "", metrics_text)
