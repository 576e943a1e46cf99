"""Hosts whose clocks are minutes off Redis's: direct enqueues still go direct, replays still land.

Deadlines are in Redis's time, learned from Redis; a producer or replayer whose wall and
monotonic clocks are shifted (libfaketime, `apt-get install faketime`) must not read its own
requests as late, nor send requests Redis reads as late.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import redis
from helpers import TESTS, env_with_tests
from test_queue_leases import assert_each_once_in_order, spill_queues

from spillover import Outbox

SKEWS = ["+2m", "-2m"]


def skewed(skew: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("faketime") is None:
        raise RuntimeError("faketime is not installed (apt-get install -y faketime)")
    done = subprocess.run(
        ["faketime", "-f", skew, *cmd], capture_output=True, text=True, env=env_with_tests(), timeout=120
    )
    assert done.returncode == 0, f"{cmd} under faketime {skew} exited {done.returncode}: {done.stderr[-3000:]}"
    return done


@pytest.mark.parametrize("skew", SKEWS)
def test_the_clock_really_is_off(skew):
    shown = float(skewed(skew, sys.executable, "-c", "import time; print(time.time())").stdout)
    assert abs(abs(shown - time.time()) - 120) < 10, "libfaketime shifts this Python's clock by two minutes"


@pytest.mark.parametrize("skew", SKEWS)
def test_a_producer_with_a_skewed_clock_still_enqueues_directly(skew, redis_server, sqlite_url):
    producer = str(TESTS / "faults" / "producer.py")
    done = skewed(skew, sys.executable, producer, sqlite_url, str(redis_server.port), "skewed", "300")
    report = json.loads(done.stdout)
    assert report["enqueued"] == 300 and report["spilled"] == 0, report
    landed = redis_server.client().lrange("rq:queue:faults", 0, -1)
    assert landed == [f"skewed-{i:06d}".encode() for i in range(300)]


@pytest.mark.parametrize("skew", SKEWS)
def test_a_replayer_with_a_skewed_clock_still_lands_every_row(skew, redis_server, outbox_url):
    made = spill_queues(outbox_url, ["skew"], 1500)
    cmd = ["-m", "spillover.cli_replay", "--once", "--database-url", outbox_url, "--redis-url", redis_server.url]
    done = skewed(skew, sys.executable, *cmd, "--batch-size", "100", "--delivery-window", "5", "--log-level", "INFO")
    assert "after its deadline" not in done.stderr, done.stderr[-3000:]
    assert_each_once_in_order(redis.Redis(port=redis_server.port), made)
    assert Outbox(outbox_url, max_backlog=0).pending_count() == 0
