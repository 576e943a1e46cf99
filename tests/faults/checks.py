"""Counting every job after a fault: present exactly once, per-producer order kept, nothing pending."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from helpers import env_with_tests, wait_for

from spillover import Outbox

FAULTS = Path(__file__).parent
QUEUE = "faults"


def start_producer(url: str, port: int, name: str, count: int, pace: float = 0.0) -> subprocess.Popen[str]:
    env = env_with_tests()
    env["PYTHONPATH"] = f"{FAULTS}:{env['PYTHONPATH']}"
    return subprocess.Popen(
        [sys.executable, str(FAULTS / "producer.py"), url, str(port), name, str(count), str(pace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish_producers(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, Any]]:
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"a producer failed: {err[-3000:]}"
        assert "locked" not in err
        reports.append(json.loads(out))
    return reports


def start_replayer(database_url: str, redis_url: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "spillover.cli_replay",
        "--database-url",
        database_url,
        "--redis-url",
        redis_url,
        "--poll-interval",
        "0.1",
        "--lease-ttl",
        "2",
        "--redis-timeout",
        "1",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_tests())


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-3000:]
    return err


def wait_drained(outbox_url: str, client: redis.Redis, expected: int, timeout: float = 60) -> None:
    outbox = Outbox(outbox_url, max_backlog=0)
    wait_for(
        lambda: outbox.pending_count() == 0 and client.llen(f"rq:queue:{QUEUE}") >= expected,
        timeout=timeout,
        interval=0.1,
    )


def assert_exactly_once_in_order(client: redis.Redis, outbox_url: str, producers: dict[str, int]) -> None:
    """Every job of every producer in RQ's queue exactly once, each producer's in order, none pending."""
    ids = [x.decode() for x in client.lrange(f"rq:queue:{QUEUE}", 0, -1)]
    counts = Counter(ids)
    twice = [job for job, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} jobs twice, e.g. {twice[:5]}"
    expected = {f"{name}-{i:06d}" for name, count in producers.items() for i in range(count)}
    missing = expected - set(ids)
    assert not missing, f"{len(missing)} jobs missing, e.g. {sorted(missing)[:5]}"
    assert set(ids) == expected, f"unexpected jobs: {sorted(set(ids) - expected)[:5]}"
    for name in producers:
        mine = [job for job in ids if job.startswith(f"{name}-")]
        assert mine == sorted(mine), f"producer {name} out of order"
    assert Outbox(outbox_url, max_backlog=0).pending_count() == 0
    for job in list(expected)[:50]:
        assert client.exists(f"rq:job:{job}"), f"job hash of {job} missing"
