"""Earlier releases of spillover, built from git history, for tests that mix versions in one deploy."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest
from helpers import IN_CI, ROOT, TESTS
from sqlalchemy import create_engine, text

from spillover import migrate

#: Released versions and their commits; the schema revision each left its outbox at is in the README.
RELEASES = {"0.1.0": "18d8f1a", "0.2.0": "28fef6c", "0.3.0": "9da488e", "0.4.0": "7a8d2e5"}


def release_tree(version: str) -> Path:
    """That release's source tree (spillover/, migrations/, alembic.ini), extracted once per machine."""
    commit = RELEASES[version]
    dest = Path(tempfile.gettempdir()) / f"spillover-release-{version}-{commit}"
    if (dest / "spillover" / "__init__.py").exists():
        return dest
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True)
    if archive.returncode != 0:
        message = f"release {version} ({commit}) is not in this checkout's git history: {archive.stderr[-300:]!r}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(partial, filter="data")
    with contextlib.suppress(OSError):  # OSError: another test process got there first; use its copy
        partial.rename(dest)
    return dest


def env_for(tree: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a process running ``tree``'s spillover (None: this checkout's), tests' modules importable."""
    env = {**os.environ, **extra}
    paths = [str(TESTS / "faults"), str(TESTS)]
    if tree is not None:
        paths.insert(0, str(tree))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def alembic_upgrade(
    tree: Path | None, url: str, revision: str = "head", **env: str
) -> subprocess.CompletedProcess[str]:
    """``alembic upgrade`` as that release's deploy runs it, from its own checkout."""
    cwd = tree if tree is not None else ROOT
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", revision],
        cwd=cwd,
        env=env_for(tree, SPILLOVER_DATABASE_URL=url, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"alembic upgrade in {cwd} failed: {done.stderr[-3000:]}"
    return done


_FILL = {
    "sqlite": "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < :rows) "
    "INSERT INTO spillover_outbox (queue, job_id, job_hash, producer) "
    "SELECT 'backlog', 'b' || x, randomblob(600), 'old-host:1:abcd' FROM n",
    "postgresql": "INSERT INTO spillover_outbox (queue, job_id, job_hash, producer) "
    "SELECT 'backlog', 'b' || x, decode(repeat('ab', 600), 'hex'), 'old-host:1:abcd' "
    "FROM generate_series(1, :rows) AS x",
}


def populated_first_release_outbox(url: str, rows: int) -> None:
    """The first release's schema (0001) with ``rows`` pending rows of 600-byte jobs."""
    migrate.upgrade(url, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(_FILL[engine.dialect.name]), {"rows": rows})
    engine.dispose()


def insert_untargeted_row(url: str, queue: str) -> None:
    """A pending row as a 0.1 producer writes it: no target (its job hash is an empty MessagePack array)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO spillover_outbox (queue, job_id, job_hash, producer) "
                "VALUES (:queue, 'legacy-job', :hash, 'oldhost:1:abc')"
            ),
            {"queue": queue, "hash": b"\x90"},
        )
    engine.dispose()
