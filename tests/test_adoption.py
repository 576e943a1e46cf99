"""Issue 19: adopting spillover by configuration, in django-rq 4.2 and Flask-RQ 1.0 (real processes).

django-rq takes a queue class by setting: ``"spillover.Queue"`` (enqueues at once, as django-rq's
"auto" commit mode) or ``"spillover.django_rq.Queue"`` (keeps DjangoRQ's commit modes: a job enqueued
in a transaction is held until it commits, and dropped if it rolls back). Flask-RQ builds its queues
itself: ``spillover.Queue.from_rq`` replaces them after ``init_app``. Each way, with Redis up the job goes
straight in, with Redis down it spills, and the replayer delivers it to a real worker.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env_with_tests, replay_once, run_worker
from servers import free_port

TESTS = Path(__file__).parent


def run(script: str, *args: str, database_url: str) -> dict[str, object]:
    env = {**env_with_tests(), "SPILLOVER_DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, str(TESTS / script), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def executed(client) -> list[str]:  # type: ignore[no-untyped-def]
    return [tag.decode() for tag in client.lrange("executed", 0, -1)]


@pytest.mark.parametrize("queue_class", ["spillover.Queue", "spillover.django_rq.Queue"])
def test_django_rq_with_spillovers_queue_class(redis_server, sqlite_url, tmp_path, queue_class):
    if importlib.util.find_spec("django_rq") is None:  # not imported here: it reads Django's settings on import
        pytest.skip("django-rq not installed")
    client = redis_server.client()
    up = run("django_producer.py", redis_server.url, str(tmp_path / "app.db"), queue_class, database_url=sqlite_url)
    assert up["class"].startswith("spillover")
    assert up["plain_spilled"] is False, "Redis up: straight in"
    holds = queue_class == "spillover.django_rq.Queue"  # DjangoRQ's on_db_commit kept
    assert up["committed_in_redis_before_commit"] is not holds
    assert up["committed_in_redis_after_commit"] is True
    assert up["rolled_back_in_redis"] is not holds, "DjangoRQ drops a rolled-back transaction's job"
    run_worker(redis_server.url, "default")
    expected = ["plain", "committed"] + ([] if holds else ["rolled-back"])
    assert sorted(executed(client)) == sorted(expected)

    client.delete("executed")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = run("django_producer.py", dead, str(tmp_path / "app.db"), queue_class, database_url=sqlite_url)
    assert down["plain_spilled"] is True, "Redis down: into the outbox"
    replay_once(sqlite_url, redis_server.url)  # the tests' SPILLOVER_TARGET names the Redis for both sides
    run_worker(redis_server.url, "default")
    assert sorted(executed(client)) == sorted(expected), "replayed and run, once each"


def test_flask_rq_queues_made_spillovers(redis_server, sqlite_url):
    pytest.importorskip("flask_rq")
    client = redis_server.client()
    up = run("flask_rq_app.py", redis_server.url, database_url=sqlite_url)
    assert up == {"spilled": False, "class": "spillover.queue"}
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = run("flask_rq_app.py", dead, database_url=sqlite_url)
    assert down["spilled"] is True
    replay_once(sqlite_url, redis_server.url)
    run_worker(redis_server.url, "default")
    assert executed(client) == ["flask", "flask"], "the direct one and the replayed one, each once"
