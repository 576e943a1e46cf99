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
from releases import env_for

from spillover import Outbox

FAULTS = Path(__file__).parent
QUEUE = "faults"


def start_producer(
    url: str,
    port: int,
    name: str,
    count: int,
    pace: float = 0.0,
    progress: Path | None = None,
    script: str = "producer.py",
    tree: Path | None = None,
) -> subprocess.Popen[str]:
    """A producer process: ``producer.py`` enqueues plainly, ``tx_producer.py`` within transactions.

    ``tree``: the source of an earlier release to run instead of this checkout's (releases.py).
    """
    env = env_for(tree)
    args = [url, str(port), name, str(count), str(pace), str(progress or "")]
    return subprocess.Popen(
        [sys.executable, str(FAULTS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


class Producers:
    """Producer processes that say how far they are, so faults follow what they have done, not the clock."""

    def __init__(
        self,
        workdir: Path,
        outbox_url: str,
        port: int,
        names: list[str],
        pace: float,
        script: str = "producer.py",
        trees: dict[str, Path] | None = None,
    ) -> None:
        """``trees``: producers (by name) that run an earlier release's source."""
        self.files = {name: workdir / f"{name}.progress" for name in names}
        self.procs = [
            start_producer(outbox_url, port, name, 1_000_000, pace, progress, script, (trees or {}).get(name))
            for name, progress in self.files.items()
        ]

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per producer: (jobs enqueued, of which spilled) so far."""
        seen = {}
        for name, path in self.files.items():
            try:
                enqueued, spilled = (int(n) for n in path.read_text().split())
            except (OSError, ValueError):  # not started yet, or caught mid-write
                enqueued, spilled = 0, 0
            seen[name] = (enqueued, spilled)
        return seen

    def wait(self, *, enqueued: int = 0, spilled: int = 0, direct: int = 0, timeout: float = 120) -> None:
        """Until each producer has enqueued ``enqueued`` more jobs, ``spilled`` more spilled, ``direct`` more direct."""
        start = self.progress()

        def done() -> bool:
            now = self.progress()
            for name, (was_enqueued, was_spilled) in start.items():
                more, more_spilled = now[name][0] - was_enqueued, now[name][1] - was_spilled
                if more < enqueued or more_spilled < spilled or more - more_spilled < direct:
                    for proc in self.procs:
                        assert proc.poll() is None, f"a producer ended early: {proc.communicate()[1][-3000:]}"
                    return False
            return True

        wait_for(done, timeout=timeout, interval=0.01)

    def finish(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Stop them; the jobs each one enqueued, and their reports."""
        for path in self.files.values():
            path.with_name(path.name + ".stop").touch()
        reports = finish_producers(self.procs)
        return {name: report["enqueued"] for name, report in zip(self.files, reports, strict=True)}, reports


def finish_producers(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, Any]]:
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"a producer failed: {err[-3000:]}"
        assert "locked" not in err
        reports.append(json.loads(out))
    return reports


def start_replayer(
    database_url: str, redis_url: str, *extra: str, tree: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
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
    if env is None:
        env = env_with_tests() if tree is None else env_for(tree)
    # From the release's own directory: ``-m`` puts the working directory first on sys.path, and from
    # this checkout's root that would import this checkout's spillover instead of the release's.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)


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
