"""What an operator relies on: metrics, health endpoints, JSON logs, no passwords anywhere."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import jobs
import redis
from helpers import http_get as get
from helpers import stop_replayer, wait_for
from prometheus_client import REGISTRY
from servers import free_port
from test_replayer import replayer, spill

from spillover import Outbox, Queue


def metric(text: str, name: str) -> float | None:
    """A sample's value; labels as in ``name`` (the outbox label, one per table, aside)."""
    text = re.sub(r'outbox="[^"]*",', "", text)
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_replayer_metrics_health_and_json_logs_without_passwords(make_redis, sqlite_url):
    server = make_redis("--requirepass", "s3cr3t-pw")
    url = f"redis://:s3cr3t-pw@127.0.0.1:{server.port}/0"
    spill(sqlite_url, "ops", 40)
    port, standby_port = free_port(), free_port()
    main = replayer(sqlite_url, url, "--metrics-port", str(port), "--log-format", "json", "--poll-interval", "0.1")
    outbox = Outbox(sqlite_url)
    wait_for(lambda: outbox.pending_count() == 0, timeout=20)
    wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=10)
    standby = replayer(sqlite_url, url, "--metrics-port", str(standby_port), "--poll-interval", "0.1")
    wait_for(lambda: get(standby_port, "/healthz")[0] == 200, timeout=10)

    status, text = get(port, "/metrics")
    assert status == 200
    assert metric(text, 'spillover_replayed_total{queue="ops"}') == 40
    assert metric(text, "spillover_redis_up") == 1
    assert get(port, "/readyz")[0] == 200
    # the queue is drained: its lease is given back at the next pass
    wait_for(lambda: metric(get(port, "/metrics")[1], "spillover_lease_held") == 0, timeout=10)
    assert get(standby_port, "/readyz")[0] == 200, "a standby is ready: it takes any queue whose drainer dies"
    assert metric(get(standby_port, "/metrics")[1], "spillover_lease_held") == 0

    server.pause()  # Redis stops answering: the backlog shows in the metrics
    try:
        spill(sqlite_url, "ops", 3, prefix="late")
        wait_for(
            lambda: metric(get(port, "/metrics")[1], 'spillover_backlog_rows{queue="ops",target="tests"}') == 3,
            timeout=15,
        )
        wait_for(lambda: metric(get(port, "/metrics")[1], "spillover_redis_up") == 0, timeout=15)
    finally:
        server.resume()
    wait_for(lambda: outbox.pending_count() == 0, timeout=20)

    for proc in (main, standby):
        proc.terminate()
    _, err = main.communicate(timeout=20)
    _, standby_err = standby.communicate(timeout=20)
    assert main.returncode == 0 and standby.returncode == 0
    lines = [json.loads(line) for line in err.strip().splitlines()]
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    assert any("drained queue ops" in line["message"] for line in lines)
    assert "s3cr3t-pw" not in err and "s3cr3t-pw" not in standby_err and "***" in err


def test_producer_metrics_in_the_default_registry(sqlite_url):
    before = REGISTRY.get_sample_value("spillover_enqueued_total", {"queue": "prod-metrics", "path": "spilled"}) or 0
    queue = Queue("prod-metrics", connection=redis.Redis(port=free_port()), outbox=sqlite_url)
    for _ in range(3):
        queue.enqueue(jobs.noop)
    after = REGISTRY.get_sample_value("spillover_enqueued_total", {"queue": "prod-metrics", "path": "spilled"})
    assert after == before + 3
    assert REGISTRY.get_sample_value("spillover_enqueue_seconds_count", {"path": "spilled"}) >= 3


def test_sigusr1_prints_what_every_thread_of_a_running_replayer_is_doing(redis_server, sqlite_url):
    """A replayer that seems stuck can be asked, without stopping it: kill -USR1 prints each thread's stack."""
    port = free_port()
    proc = replayer(sqlite_url, redis_server.url, "--metrics-port", str(port))
    wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=30)
    proc.send_signal(signal.SIGUSR1)
    spill(sqlite_url, "after-usr1", 3)  # and it goes on working
    wait_for(lambda: redis_server.client().llen("rq:queue:after-usr1") == 3, timeout=30)
    err = stop_replayer(proc)
    assert "most recent call first" in err and "spillover/replayer.py" in err, err[-3000:]


_STOP_WHILE_WAITING = """
import logging, os, signal, threading
from spillover.stop_signals import stop_on_signals
stopping = threading.Event()
stop_on_signals(stopping, logging.getLogger("test"))
with stopping._cond:  # where the main thread is inside stopping.wait(): the Event's lock held
    os.kill(os.getpid(), signal.SIGTERM)
    total = sum(i for i in range(100_000))  # the Python-level handler runs here, the lock still held
print("stopping" if stopping.wait(10) else "not stopped", flush=True)
"""


def test_sigterm_while_the_main_thread_holds_the_stop_events_lock_still_stops():
    """A handler setting the Event itself would wait for ever on the lock its own thread holds."""
    out = subprocess.run([sys.executable, "-c", _STOP_WHILE_WAITING], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "stopping", out.stderr[-2000:]
