"""Bad input and unusable services: one clear line on stderr, exit 1 (2 for usage), no traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import jobs
import pytest
import redis
from helpers import env_with_tests
from servers import free_port

from spillover import Queue

REPLAY = [sys.executable, "-m", "spillover.cli_replay"]
ADMIN = [sys.executable, "-m", "spillover"]


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env_with_tests(), timeout=timeout)


def assert_one_clear_line(done: subprocess.CompletedProcess[str], *words: str, status: int = 1) -> None:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), done.stderr
    for word in words:
        assert word in last, last


@pytest.fixture
def unmigrated(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/unmigrated.db"


@pytest.fixture
def live_redis(redis_server) -> str:
    return redis_server.url


def test_unknown_database_dialect(live_redis):
    done = run([*REPLAY, "--once", "--database-url", "nosuch://x", "--redis-url", live_redis])
    assert_one_clear_line(done, "cannot use database URL", "nosuch://x", "postgresql+psycopg://")


def test_malformed_database_url():
    done = run([*ADMIN, "status", "--database-url", "not a url"])
    assert_one_clear_line(done, "cannot use database URL")


def test_redis_url_of_another_scheme(sqlite_url):
    done = run([*REPLAY, "--once", "--database-url", sqlite_url, "--redis-url", "http://x"])
    assert_one_clear_line(done, "cannot use Redis URL", "redis://")


def test_sqlite_path_in_a_missing_directory(tmp_path, live_redis):
    url = f"sqlite:///{tmp_path}/missing/outbox.db"
    done = run([*REPLAY, "--once", "--database-url", url, "--redis-url", live_redis])
    assert_one_clear_line(done, "cannot open the SQLite outbox", "directory")
    assert_one_clear_line(run([*ADMIN, "db", "upgrade", "--database-url", url]), "cannot open the SQLite outbox")


def test_unmigrated_outbox_once_and_long_running(unmigrated, live_redis):
    assert_one_clear_line(
        run([*REPLAY, "--once", "--database-url", unmigrated, "--redis-url", live_redis]), "spillover db upgrade"
    )
    # The long-running replayer exits too, instead of retrying forever.
    done = run([*REPLAY, "--database-url", unmigrated, "--redis-url", live_redis], timeout=30)
    assert_one_clear_line(done, "does not exist", "spillover db upgrade")


def test_outbox_behind_this_version(tmp_path, live_redis):
    from spillover import migrate

    url = f"sqlite:///{tmp_path}/old.db"
    migrate.upgrade(url, "0001")
    done = run([*REPLAY, "--once", "--database-url", url, "--redis-url", live_redis])
    assert_one_clear_line(done, "older than this spillover", "spillover db upgrade")


def test_admin_commands_on_an_unmigrated_outbox(unmigrated):
    for args in (["dead", "retry", "999"], ["dead", "list"], ["dead", "purge", "--all"], ["status"]):
        assert_one_clear_line(run([*ADMIN, *args, "--database-url", unmigrated]), "spillover db upgrade")


def test_status_and_replayer_against_a_postgres_that_is_down(live_redis):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    assert_one_clear_line(run([*ADMIN, "status", "--database-url", url]), "outbox database", "not usable")
    done = run([*REPLAY, "--database-url", url, "--redis-url", live_redis], timeout=30)
    assert_one_clear_line(done, "outbox database", "is it running")


def test_replay_once_with_redis_unreachable(sqlite_url):
    done = run([*REPLAY, "--once", "--database-url", sqlite_url, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert_one_clear_line(done, "redis is unreachable")


def test_in_memory_outbox_is_refused_by_db_upgrade():
    done = run([*ADMIN, "db", "upgrade", "--database-url", "sqlite:///:memory:"])
    assert_one_clear_line(done, "in-memory", "not durable")


def test_usage_errors_exit_2(sqlite_url):
    done = run([*ADMIN, "dead", "retry", "--database-url", sqlite_url])
    assert done.returncode == 2 and "ROW_ID or --all" in done.stderr and "Traceback" not in done.stderr
    assert run([*REPLAY, "--batch-size", "0"]).returncode == 2


def test_debug_log_level_shows_the_traceback(unmigrated):
    done = run([*ADMIN, "--log-level", "DEBUG", "status", "--database-url", unmigrated])
    assert done.returncode == 1 and "Traceback" in done.stderr and "spillover db upgrade" in done.stderr


def test_sqlite_outbox_files_are_owner_only(tmp_path):
    url = f"sqlite:///{tmp_path}/private.db"
    assert run([*ADMIN, "db", "upgrade", "--database-url", url]).returncode == 0
    queue = Queue("private", connection=redis.Redis(port=free_port()), outbox=url)
    queue.enqueue(jobs.noop)  # spilled: the WAL and SHM files exist now
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["private.db", "private.db-shm", "private.db-wal"]
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
