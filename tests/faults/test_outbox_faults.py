"""Fault 9: the outbox unwritable or its disk full while Redis is down."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jobs
import pytest
import redis
from helpers import IN_CI
from servers import free_port
from sqlalchemy import event, select

from spillover import Outbox, OutboxUnavailable, Queue, migrate, was_spilled
from spillover.outbox import create_outbox_engine
from spillover.schema import outbox


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a real 'No space left on device'."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs in CI: {result.stderr!r}")
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_until_unavailable(queue: Queue, limit: int = 100_000) -> tuple[list[str], OutboxUnavailable]:
    """Enqueue until the outbox refuses; the ids whose enqueue returned, and the error."""
    returned: list[str] = []
    for i in range(limit):
        try:
            job = queue.enqueue(jobs.noop, "x" * 2000, job_id=f"p0-{i:06d}")
        except OutboxUnavailable as exc:
            return returned, exc
        assert was_spilled(job)
        returned.append(job.id)
    raise AssertionError("the outbox never filled up")


def stored_ids(url: str) -> list[str]:
    engine = create_outbox_engine(url)
    with engine.connect() as conn:
        ids = list(conn.scalars(select(outbox.c.job_id).order_by(outbox.c.id)))
    engine.dispose()
    return ids


def test_disk_full_raises_outbox_unavailable_and_reports_only_what_was_stored(tiny_disk):
    url = f"sqlite:///{tiny_disk}/outbox.db"
    migrate.upgrade(url)
    queue = Queue("full", connection=redis.Redis(port=free_port()), outbox=Outbox(url, max_backlog=0))
    returned, error = fill_until_unavailable(queue)
    assert "full" in str(error.outbox_error).lower()
    assert isinstance(error.redis_error, redis.ConnectionError)
    assert returned and stored_ids(url) == returned, "every job reported enqueued is stored, and only those"
    with pytest.raises(OutboxUnavailable):
        queue.enqueue(jobs.noop, "x" * 2000, job_id="after")


def test_database_size_limit_is_the_same_as_a_full_disk(tmp_path):
    url = f"sqlite:///{tmp_path}/capped.db"
    migrate.upgrade(url)
    engine = create_outbox_engine(url)

    @event.listens_for(engine, "connect")
    def _cap(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA max_page_count = 40")

    queue = Queue("capped", connection=redis.Redis(port=free_port()), outbox=Outbox(engine, max_backlog=0))
    returned, error = fill_until_unavailable(queue)
    assert "full" in str(error.outbox_error).lower()
    assert stored_ids(url) == returned
