"""`spillover drill`, the README's first command, as a newcomer runs it."""

from __future__ import annotations

import subprocess
import sys


def test_drill_with_a_throwaway_redis_counts_every_job(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "spillover", "drill", "--jobs", "150"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = dict(
        line.rsplit(None, 1)
        for line in out.stdout.splitlines()
        if line and line[0].isalpha() and len(line.split()) >= 2 and not line.startswith(("drill:", "enqueueing"))
    )
    assert report["result"] == "PASS"
    assert report["executed twice"] == "0" and report["missing"] == "0" and report["order"] == "kept"
    assert "redis down" in out.stderr and "redis up again" in out.stderr


def test_drill_against_a_given_redis_leaves_it_running_and_as_it_was(redis_server, sqlite_url):
    client = redis_server.client()
    client.set("app:key", "mine")
    before = set(client.keys("*"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "spillover",
            "drill",
            "--jobs",
            "60",
            "--redis-url",
            redis_server.url,
            "--database-url",
            sqlite_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "PASS" in out.stdout
    assert client.ping()
    left = set(client.keys("*")) - before - {b"spillover:probe"}  # the probe key expires in a minute
    assert left == set(), f"the drill left {sorted(left)[:10]}"
    assert client.get("app:key") == b"mine"
