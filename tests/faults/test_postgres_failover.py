"""Issue 18: a real Postgres failover under spilling producers and a draining replayer.

A synchronous standby made with ``pg_basebackup -R``; clients reach the primary through a proxy
that plays the virtual IP. The failover: the VIP moves to the standby and the primary's open
connections fall silent (its host gone without a word: no RST, so only a client-side bound ends
them), the primary dies, the standby is promoted. Producers retry what raised with the same job
id; every acknowledged job reaches RQ once, each producer's in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from checks import FAULTS, QUEUE, start_replayer
from helpers import IN_CI, env_with_tests, stop_replayer, wait_for
from servers import PostgresCluster, free_port
from sqlalchemy import create_engine, text

from spillover import Outbox, migrate
from spillover.faultproxy import FaultProxy

LIMIT = 2  # SPILLOVER_OUTBOX_TIMEOUT for the producers and the replayer
PRODUCERS = ("p1", "p2")


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    try:
        primary = PostgresCluster()
    except Exception as exc:
        if IN_CI:
            raise
        pytest.skip(f"cannot start a PostgreSQL cluster here: {exc}")
    standby = None
    try:
        migrate.upgrade(primary.url)
        standby = PostgresCluster(standby_of=primary)
        engine = create_engine(primary.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("ALTER SYSTEM SET synchronous_standby_names = '*'"))
            conn.execute(text("SELECT pg_reload_conf()"))
            # an acknowledged commit is on the standby too: the failover loses none
            wait_for(
                lambda: conn.execute(text("SELECT sync_state FROM pg_stat_replication")).scalar() == "sync",
                timeout=30,
            )
        engine.dispose()
        yield primary, standby
    finally:
        for cluster in (primary, standby):
            if cluster is not None:
                cluster.destroy()


def acknowledged(progress: dict[str, Path]) -> dict[str, int]:
    seen = {}
    for name, path in progress.items():
        try:
            seen[name] = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            seen[name] = 0
    return seen


def test_producers_and_the_replayer_carry_on_through_a_postgres_failover(primary_and_standby, redis_server, tmp_path):
    primary, standby = primary_and_standby
    vip = FaultProxy("127.0.0.1", primary.port)
    through_vip = primary.url.replace(f":{primary.port}/", f":{vip.port}/")
    env = {**env_with_tests(), "SPILLOVER_OUTBOX_TIMEOUT": str(LIMIT)}
    progress = {name: tmp_path / f"{name}.progress" for name in PRODUCERS}
    dead_port = free_port()  # the producers' Redis is down: every job spills
    script = str(FAULTS / "retrying_producer.py")
    producers = [
        subprocess.Popen(
            [sys.executable, script, through_vip, str(dead_port), redis_server.url, name, "1000000", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, path in progress.items()
    ]
    replayer = start_replayer(through_vip, redis_server.url, "--target", redis_server.url, env=env)
    client = redis_server.client()
    try:
        wait_for(lambda: min(acknowledged(progress).values()) >= 300, timeout=60)
        wait_for(lambda: client.llen(f"rq:queue:{QUEUE}") >= 100, timeout=60)  # the replayer is draining too
        failed_over = time.monotonic()
        before = acknowledged(progress)
        vip.move_to("127.0.0.1", standby.port)  # the primary's connections go silent, new ones reach the standby
        primary.stop("immediate")
        standby.promote()
        promoted_after = time.monotonic() - failed_over
        wait_for(lambda: all(n >= before[name] + 300 for name, n in acknowledged(progress).items()), timeout=60)
        resumed_after = time.monotonic() - failed_over
    finally:
        for path in progress.values():
            path.with_name(path.name + ".stop").touch()
        reports = []
        for proc in producers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-3000:]
            reports.append(json.loads(out))
    # Each producer was stopped at most for the outbox limit (a silent INSERT cut), plus the promotion.
    for report in reports:
        assert report["longest_gap"] <= promoted_after + 2 * LIMIT + 2, (report, promoted_after)
    assert resumed_after < 60
    outbox = Outbox(standby.url, max_backlog=0)
    wait_for(lambda: outbox.pending_count() == 0, timeout=60)
    assert replayer.poll() is None, "the replayer carries on through the failover"
    err = stop_replayer(replayer)
    vip.close()
    ids = [job.decode() for job in client.lrange(f"rq:queue:{QUEUE}", 0, -1)]
    twice = [job for job, n in Counter(ids).items() if n > 1]
    assert not twice, f"{len(twice)} jobs twice, e.g. {twice[:5]} ({reports})"
    for name, report in zip(PRODUCERS, reports, strict=True):
        mine = [job for job in ids if job.startswith(f"{name}-")]
        assert mine == [f"{name}-{i:06d}" for i in range(report["enqueued"])], f"{name}: not once and in order"
    assert "Traceback" not in err
