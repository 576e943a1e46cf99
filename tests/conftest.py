from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import IN_CI
from servers import RedisServer, create_database, postgres_url

from spillover import migrate

RQ_MAJOR = int(version("rq").split(".")[0])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Earlier releases of spillover pin rq<3: their tests run in the RQ 2 environment only."""
    if RQ_MAJOR < 3:
        return
    skip = pytest.mark.skip(reason="runs earlier releases (rq<3): .ci/run runs it in .venv-rq2 under RQ 2")
    for item in items:
        if item.get_closest_marker("previous_release"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every producer and replayer of a test, subprocesses included, names its Redis "tests".

    Tests spill through dead ports and fault proxies and replay into the real server,
    addresses that differ although they stand for one Redis. tests/test_targets.py
    removes the variable to test targets derived from connections.
    """
    monkeypatch.setenv("SPILLOVER_TARGET", "tests")


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    """Each test starts with no remembered Redis health or spill state.

    spillover keeps them per Redis address for the life of the process, which is right
    in production (an address is one server) but not across tests, where a later test
    may get an earlier test's port for a different server.
    """
    yield
    from spillover import lanes

    lanes._servers.clear()
    lanes._outboxes.clear()
    lanes._lanes.clear()
    _kill_leftover_children()


def _kill_leftover_children() -> None:
    """A test that failed half-way may leave replayers or producers running: end them."""
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # fields: state, ppid, ...
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[type]:
    """Factory for extra servers (replicas, AOF-backed, maxmemory): make_redis(*args, aof=False)."""
    servers: list[RedisServer] = []

    def make(*args: str, aof: bool = False) -> RedisServer:
        server = RedisServer(tmp_path, *args, aof=aof)
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> str:
    url = postgres_url()
    if url is None:
        if IN_CI:
            pytest.fail("CI must test PostgreSQL, and none could be found or started")
        pytest.skip("no PostgreSQL available on this machine")
    return url


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = _sqlite_url(tmp_path)
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def outbox_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty outbox on each supported database."""
    if request.param == "sqlite":
        url = _sqlite_url(tmp_path)
    else:
        url = create_database(request.getfixturevalue("postgres_server"))
    migrate.upgrade(url)
    return url
