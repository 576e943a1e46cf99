"""Issue 19: progress on long work, seen through a real pseudo-terminal.

`spillover-replay --once` draws a bar per queue on a terminal (rows left, rate, ETA), and writes
plain log lines when its output is not a terminal (JSON logs stay one object per line);
`spillover status --watch` redraws its table until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time

import jobs
import redis
from helpers import env_with_tests, replay_once
from servers import free_port

from spillover import Queue


def spill(url: str, queue: str, rows: int) -> None:
    q = Queue(queue, connection=redis.Redis(port=free_port()), outbox=url)
    for start in range(0, rows, 2000):
        q.enqueue_many([Queue.prepare_data(jobs.noop, job_id=f"{queue}-{n:06d}") for n in range(start, start + 2000)])


def on_a_terminal(args: list[str], until: object = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as stdin/stdout/stderr; its exit code and all it wrote.

    ``until(output)``: when it holds, the process gets SIGINT (a Ctrl-C), and we read on to its end.
    """
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env_with_tests(), close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    interrupted = False
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child's side is closed, it has exited
            break
        if not chunk:
            break
        out += chunk
        if until is not None and not interrupted and until(out.decode(errors="replace")):  # type: ignore[operator]
            proc.send_signal(signal.SIGINT)
            interrupted = True
    os.close(master)
    return proc.wait(30), out.decode(errors="replace")


def test_replay_once_on_a_terminal_draws_a_bar_per_queue(redis_server, sqlite_url):
    spill(sqlite_url, "bars", 20_000)
    cmd = [sys.executable, "-m", "spillover.cli_replay", "--once", "--database-url", sqlite_url]
    code, out = on_a_terminal([*cmd, "--redis-url", redis_server.url, "--batch-size", "100"])
    assert code == 0, out[-2000:]
    frames = [frame for frame in out.split("\r") if frame.startswith("bars [")]
    assert len(frames) >= 3, f"redrawn in place as it goes: {out[-1500:]!r}"
    assert all("left," in frame and "rows/s" in frame and "ETA" in frame for frame in frames)
    assert "20,000 left" in frames[0] and "[" + "#" * 30 + "] 0 left" in out, "from all to none"
    assert redis_server.client().llen("rq:queue:bars") == 20_000


def test_replay_once_not_on_a_terminal_writes_log_lines_and_json_stays_json(redis_server, sqlite_url):
    often = {**env_with_tests(), "SPILLOVER_PROGRESS_INTERVAL": "0.05"}  # a line per 50 ms, not per 5 s
    spill(sqlite_url, "lines", 20_000)
    text = replay_once(sqlite_url, redis_server.url, "--log-level", "INFO", "--batch-size", "100", env=often)
    assert "\r" not in text.stderr and "[#" not in text.stderr and "\x1b" not in text.stderr
    progress = re.findall(r"queue lines: ([\d]+) left, [\d]+ rows/s, ETA [\d:?]+", text.stderr)
    assert len(progress) >= 2, text.stderr[-2000:]
    assert int(progress[0]) > int(progress[-1]), "fewer left as it goes"
    assert "drained queue lines: 20000 rows" in text.stderr
    spill(sqlite_url, "lines", 20_000)
    as_json = replay_once(
        sqlite_url, redis_server.url, "--log-level", "INFO", "--batch-size", "100", "--log-format", "json", env=often
    )
    records = [json.loads(line) for line in as_json.stderr.splitlines() if line.strip()]  # every line one object
    assert any(" left, " in record["message"] for record in records)
    assert any("drained queue lines" in record["message"] for record in records)


def test_status_watch_redraws_until_ctrl_c(redis_server, sqlite_url):
    spill(sqlite_url, "watched", 10)
    cmd = [sys.executable, "-m", "spillover", "status", "--database-url", sqlite_url, "--redis-url", redis_server.url]
    code, out = on_a_terminal([*cmd, "--watch", "0.2"], until=lambda seen: seen.count("\x1b[H\x1b[2J") >= 4)
    assert code == 0, out[-2000:]
    screens = out.split("\x1b[H\x1b[2J")[1:-1]  # whole screens: the last may be cut short by the Ctrl-C
    assert len(screens) >= 3
    for screen in screens[:3]:
        assert "every 0.2 s (Ctrl-C stops)" in screen and "watched" in screen, screen
