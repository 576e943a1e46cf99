"""What tests compare and count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from spillover.rq_keys import KeyLayout, environment_prefix

#: RQ's keys (and spillover's) in this process: RQ_KEY_PREFIX, as RQ 3 reads it.
LAYOUT = KeyLayout(environment_prefix())
MARKER_PREFIX, LEGACY_MARKER_PREFIX = LAYOUT.marker_prefix, LAYOUT.legacy_marker_prefix
FENCE_PREFIX, PROBE_KEY = LAYOUT.fence_prefix, LAYOUT.probe

TESTS = Path(__file__).parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ROOT = TESTS.parent
# Fields whose value is a time, so they differ between two runs of the same enqueue.
TIME_FIELDS = {"created_at", "enqueued_at", "last_heartbeat"}
#: spillover's own keys: delivery markers (this release's, by delivery id, and the job-id keys it keeps
#: for older replayers), the queues' fences and the traces of outbox rows' pushes.
MARKER_KEYS = (MARKER_PREFIX, LEGACY_MARKER_PREFIX, FENCE_PREFIX, LAYOUT.pushed_prefix)


def snapshot(client: redis.Redis, keep_markers: bool = False, relative_schedule: bool = False) -> dict[str, Any]:
    """Every key with its type and value, timestamps blanked, TTL as 'expires'/'persistent'.

    ``relative_schedule``: scheduled registries by member only, for jobs scheduled relative to
    "now" (``enqueue_in``), whose scores two enqueues a moment apart cannot share.
    """
    state: dict[str, Any] = {}
    for raw in sorted(client.keys("*")):
        key = raw.decode()
        if key.endswith("spillover:probe") or (key.startswith(MARKER_KEYS) and not keep_markers):
            continue
        kind = client.type(raw).decode()
        value: Any
        if kind == "hash":
            value = {
                k.decode(): (b"<time>" if k.decode() in TIME_FIELDS else v) for k, v in client.hgetall(raw).items()
            }
        elif kind == "list":
            value = client.lrange(raw, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(raw))
        elif kind == "zset":
            # Deferred registries and RQ 3's rate limit sets score by "now" in whole seconds: the
            # members alone, sorted, since a second boundary between two enqueues reorders ties.
            pairs = client.zrange(raw, 0, -1, withscores=True)
            by_member = ":deferred:" in key or key.endswith((":allowed", ":rate_limited"))
            by_member = by_member or (relative_schedule and ":scheduled:" in key)
            value = sorted(m for m, _ in pairs) if by_member else pairs
        else:
            value = client.get(raw)
        state[key] = (kind, value, "expires" if client.ttl(raw) > 0 else "persistent")
    return state


def env_with_tests() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def replay_once(
    database_url: str,
    redis_url: str,
    *extra: str,
    check: bool = True,
    without: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real `spillover-replay --once` command (in ``env``, less ``without`` these variables; from ``cwd``)."""
    cmd = [
        sys.executable,
        "-m",
        "spillover.cli_replay",
        "--once",
        "--database-url",
        database_url,
        "--redis-url",
        redis_url,
        "--log-level",
        "WARNING",
        *extra,
    ]
    env = {name: value for name, value in (env or env_with_tests()).items() if name not in without}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    if check:
        assert done.returncode == 0, f"spillover-replay --once exited {done.returncode}: {done.stderr[-3000:]}"
    return done


def run_worker(redis_url: str, *queues: str) -> None:
    """A real RQ worker in burst mode: runs what is queued, then exits."""
    subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", redis_url, "-w", "rq.SimpleWorker", *queues],
        check=True,
        capture_output=True,
        env=env_with_tests(),
        timeout=120,
    )


def stop_replayer(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """SIGTERM a long-running replayer and wait for it to exit 0; its stderr. One that has not exited in
    ``timeout`` seconds is asked for its threads' stacks (SIGUSR1) before the test fails with them."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the replayer did not stop within {timeout:g} s of SIGTERM:\n{err[-6000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    return err


def start_forked(target: Any, *args: Any) -> Any:
    """A forked child running ``target(*args)``; SIGUSR1 prints the stacks of all its threads.

    The fork happens with the garbage collector off (collected just before): earlier tests leave engines
    behind, and a collection on another thread (a settler's) closes their SQLite connections with the GIL
    released; a fork at that moment gives the child SQLite's global mutexes locked, and it hangs in its
    next SQLite call (reproduced: 7 of 320 children). An application forks from a quiet process; the
    suite's process is not one.
    """
    import gc
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_dumpable, args=(target, args))
    gc.collect()
    gc.disable()
    try:
        child.start()
    finally:
        gc.enable()
    return child


def join_forked(children: list[Any], timeout: float = 60.0) -> None:
    """Check each child exits 0. One still running after ``timeout`` has its threads' stacks printed
    (to its stderr, which pytest shows) before the test fails: a hang is then a report, not a mystery."""
    ends = time.monotonic() + timeout
    for child in children:
        child.join(max(ends - time.monotonic(), 0.1))
    hung = [child for child in children if child.exitcode is None]
    for child in hung:
        os.kill(child.pid, signal.SIGUSR1)
    time.sleep(1 if hung else 0)  # the dumps are written
    for child in hung:
        child.kill()
    assert [child.exitcode for child in children] == [0] * len(children), "a child failed or hung: see stderr"


def run_forked(target: Any, args_per_child: list[tuple[Any, ...]], timeout: float = 60.0) -> None:
    """Run ``target`` in forked children at once; each must exit 0."""
    join_forked([start_forked(target, *args) for args in args_per_child], timeout)


def _dumpable(target: Any, args: tuple[Any, ...]) -> None:
    import faulthandler
    import gc

    gc.enable()  # forked while the parent had it off
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    target(*args)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET to a replayer's metrics port; (0, ...) while nothing listens."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, "not listening"


def post_json(port: int, path: str, payload: dict[str, Any], status: int) -> dict[str, Any]:
    """POST ``payload`` as JSON to an example app; its JSON reply, after checking its status."""
    import json
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == status
        return json.loads(response.read())  # type: ignore[no-any-return]


def redis_up_metric(port: int) -> float | None:
    """A running replayer's spillover_redis_up (None until it serves metrics)."""
    for line in http_get(port, "/metrics")[1].splitlines():
        if line.startswith(("spillover_redis_up ", "spillover_redis_up{")):
            return float(line.split()[-1])
    return None


def status_text(database_url: str, redis_url: str, *extra: str) -> str:
    """What `spillover status` prints."""
    command = [sys.executable, "-m", "spillover", "status", *extra, "--database-url", database_url]
    out = subprocess.run(
        [*command, "--redis-url", redis_url], capture_output=True, text=True, check=True, env=env_with_tests()
    )
    return out.stdout


def status_report(database_url: str, redis_url: str) -> dict[str, Any]:
    """`spillover status --json`, read."""
    found: dict[str, Any] = json.loads(status_text(database_url, redis_url, "--json"))
    return found
