"""``spillover drill``: a full Redis outage, rehearsed end to end without harming Redis.

A fault proxy of ours sits in front of Redis (the given one, or a throwaway
``redis-server``); producers enqueue through it, the proxy is cut, enqueues
spill to the outbox, the proxy is restored, the replayer drains the outbox and
a burst RQ worker runs every job. The report counts each job: executed once,
in order.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rq import SimpleWorker, get_current_job

from . import migrate
from .errors import ConfigurationError
from .faultproxy import FaultProxy
from .outbox import Outbox
from .queue import Queue, was_spilled
from .redis_side import client_from_url, resolve_target
from .replayer import ReplayConfig, Replayer
from .rq_keys import KeyLayout, environment_prefix
from .stored_job import delivery_prefix


def record_execution(run: str, seq: int) -> None:
    """The drill's job: note that it ran, in the order it ran."""
    job = get_current_job()
    assert job is not None
    job.connection.rpush(f"spillover:drill:{run}:executed", seq)


@dataclass
class DrillReport:
    enqueued: int = 0
    direct: int = 0
    spilled: int = 0
    replayed: int = 0
    duplicates_suppressed: int = 0
    executed: int = 0
    executed_twice: int = 0
    missing: int = 0
    order_kept: bool = False
    direct_ms: list[float] = field(default_factory=list)
    spill_ms: list[float] = field(default_factory=list)
    first_spill_ms: float = 0.0
    recovery_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.executed == self.enqueued and not self.executed_twice and not self.missing and self.order_kept


@contextmanager
def throwaway_redis() -> Iterator[str]:
    """A redis-server on a free loopback port in a temporary directory, removed afterwards."""
    if shutil.which("redis-server") is None:
        raise ConfigurationError("no --redis-url given and no redis-server binary (apt-get install -y redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


def run_drill(
    redis_url: str,
    database_url: str,
    jobs: int = 300,
    progress: Callable[[str, int], None] = lambda stage, n: None,
) -> DrillReport:
    """Enqueue ``jobs`` jobs in three thirds (healthy, cut, restored), replay, execute, and count."""
    target = redis.Redis.from_url(redis_url)
    host = target.connection_pool.connection_kwargs.get("host", "127.0.0.1")
    port = int(target.connection_pool.connection_kwargs.get("port", 6379))
    target_name = resolve_target(None, target)  # producers go through the proxy, rows are for the real server
    migrate.upgrade(database_url)
    run = uuid.uuid4().hex[:8]
    queue_name = f"spillover-drill-{run}"
    outbox = Outbox(database_url, max_backlog=0)
    proxy = FaultProxy(host, port)
    report = DrillReport()
    try:
        through_proxy = redis.Redis(host="127.0.0.1", port=proxy.port)
        queue = Queue(queue_name, connection=through_proxy, outbox=outbox, target=target_name)
        third = max(jobs // 3, 1)

        def enqueue(seq: int) -> None:
            started = time.perf_counter()
            job = queue.enqueue(record_execution, run, seq, job_id=f"drill-{run}-{seq:06d}")
            elapsed = (time.perf_counter() - started) * 1000
            report.enqueued += 1
            if was_spilled(job):
                report.spilled += 1
                report.spill_ms.append(elapsed)
            else:
                report.direct += 1
                report.direct_ms.append(elapsed)
            progress("enqueue", 1)

        for seq in range(third):
            enqueue(seq)
        proxy.set_mode("refuse")
        for seq in range(third, 2 * third):
            enqueue(seq)
        report.first_spill_ms = report.spill_ms[0] if report.spill_ms else 0.0
        proxy.set_mode("pass")
        restored = time.monotonic()
        for seq in range(2 * third, jobs):
            enqueue(seq)
        config = ReplayConfig(queues=[queue_name], target=target_name)
        replayer = Replayer(outbox, client_from_url(redis_url, 5.0), config)
        stats = replayer.run_once()
        report.recovery_s = time.monotonic() - restored
        report.replayed, report.duplicates_suppressed = stats.replayed, stats.duplicates
        progress("replay", stats.replayed)

        worker_conn = redis.Redis.from_url(redis_url)
        # RQ 3's workers take a maintenance lock of their own (it expires); the drill leaves none it made
        made = [key for key in _maintenance_keys(queue.key_layout) if not worker_conn.exists(key)]
        worker = SimpleWorker([queue_name], name=queue_name, connection=worker_conn)
        worker.work(burst=True, logging_level="WARNING")
        executed = [int(x) for x in worker_conn.lrange(f"spillover:drill:{run}:executed", 0, -1)]
        progress("execute", len(executed))
        report.executed = len(executed)
        report.executed_twice = len(executed) - len(set(executed))
        report.missing = len(set(range(jobs)) - set(executed))
        report.order_kept = executed == sorted(executed)
        if made:
            worker_conn.delete(*made)
    finally:
        proxy.close()
        leave_nothing_behind(redis.Redis.from_url(redis_url), run, queue_name, KeyLayout(environment_prefix()))
    return report


def _maintenance_keys(layout: KeyLayout) -> list[str]:
    return [f"{layout.prefix}:clean_groups"]


def leave_nothing_behind(conn: redis.Redis, run: str, queue_name: str, layout: KeyLayout) -> None:
    """Remove every key the drill made (jobs, results, markers, registries, its worker, its queue)."""
    with contextlib.suppress(redis.RedisError):
        mine = delivery_prefix() + "*"  # the markers and push traces of this process's deliveries
        patterns = (f"*{queue_name}*", f"*drill-{run}-*", f"spillover:drill:{run}:*")
        for pattern in (*patterns, layout.marker_prefix + mine, layout.pushed_prefix + mine):
            keys = list(conn.scan_iter(match=pattern, count=1000))
            if keys:
                conn.delete(*keys)
        conn.srem(layout.queues, layout.queue(queue_name))
        conn.srem(f"{layout.prefix}:workers", f"{layout.prefix}:worker:{queue_name}")


def format_report(report: DrillReport) -> str:
    def pct(values: list[float], q: float) -> str:
        if not values:
            return "-"
        ordered = sorted(values)
        return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f} ms"

    lines = [
        f"jobs enqueued            {report.enqueued}",
        f"  straight to redis      {report.direct}   (median {pct(report.direct_ms, 0.5)})",
        f"  spilled to the outbox  {report.spilled}   (first {report.first_spill_ms:.1f} ms, "
        f"median {pct(report.spill_ms, 0.5)}, p99 {pct(report.spill_ms, 0.99)})",
        f"replayed into RQ         {report.replayed}   ({report.duplicates_suppressed} duplicates suppressed)",
        f"executed by a worker     {report.executed}",
        f"executed twice           {report.executed_twice}",
        f"missing                  {report.missing}",
        f"order                    {'kept' if report.order_kept else 'BROKEN'}",
        f"redis back -> drained    {report.recovery_s:.2f} s",
        f"result                   {'PASS' if report.ok else 'FAIL'}",
    ]
    if report.direct_ms and len(report.direct_ms) > 1:
        lines.insert(2, f"  direct stdev           {statistics.pstdev(report.direct_ms):.2f} ms")
    return "\n".join(lines)


def default_database_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'spillover-drill.db'}"
