"""Upgrades during a deploy: one at a time, bounded waits, no long stall of producers, no INVALID index kept."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest
from helpers import env_with_tests
from releases import populated_first_release_outbox
from servers import create_database
from sqlalchemy import create_engine, inspect, text

from spillover import migrate
from spillover.schema import VERSION_TABLE
from spillover.upgrade_lock import ADVISORY_KEY

HEAD = "0005"


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    return create_database(request.getfixturevalue("postgres_server"))


def _upgrade_processes(url: str, count: int, **env: str) -> list[subprocess.Popen[str]]:
    command = [sys.executable, "-m", "spillover", "db", "upgrade", "--database-url", url]
    return [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env_with_tests(), **env}
        )
        for _ in range(count)
    ]


def test_four_concurrent_upgrades_of_a_fresh_database_all_succeed(fresh_url):
    procs = _upgrade_processes(fresh_url, 4)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    engine = create_engine(fresh_url)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]
    assert {"spillover_outbox", "spillover_queue_lease", "spillover_replayer"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def _hold_upgrade_lock(url: str):
    """Hold the lock another upgrade would hold; returns what releases it."""
    if url.startswith("sqlite"):
        fd = os.open(os.path.dirname(url.removeprefix("sqlite:///")), os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return lambda: os.close(fd)
    engine = create_engine(url)
    conn = engine.connect()
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_KEY})
    conn.commit()
    return lambda: (conn.close(), engine.dispose())


def test_an_upgrade_waits_a_bounded_time_for_another_and_says_so(fresh_url):
    release = _hold_upgrade_lock(fresh_url)
    try:
        started = time.monotonic()
        (proc,) = _upgrade_processes(fresh_url, 1, SPILLOVER_UPGRADE_LOCK_WAIT="1")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "another upgrade of" in err and "SPILLOVER_UPGRADE_LOCK_WAIT" in err, err
        assert err.count("\n") <= 2, f"one line, no traceback: {err}"
        assert time.monotonic() - started < 20
        (waiting,) = _upgrade_processes(fresh_url, 1)
        time.sleep(0.5)
        assert waiting.poll() is None, "it waits for the lock"
    finally:
        release()
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err


def test_an_invalid_index_left_by_an_interrupted_build_is_built_again(postgres_server):
    url = create_database(postgres_server)
    populated_first_release_outbox(url, 1000)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn, pytest.raises(Exception, match="could not create unique index"):
        # A concurrent build that fails half-way leaves an INVALID index under the name 0002 builds.
        conn.execute(
            text(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_spillover_outbox_producer_state_id ON spillover_outbox (producer)"
            )
        )
    valid = text(
        "SELECT i.indisvalid, i.indisunique FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = 'ix_spillover_outbox_producer_state_id'"
    )
    with engine.connect() as conn:
        assert conn.execute(valid).one() == (False, True)
    migrate.upgrade(url)
    with engine.connect() as conn:
        assert conn.execute(valid).one() == (True, False), "dropped and built again, as the migration defines it"
    engine.dispose()
