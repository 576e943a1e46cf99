"""Real servers for tests: redis-server processes on free ports, and PostgreSQL.

Tests that kill, pause or fill Redis use their own server from here, never the
shared one on 6379.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process that a test may kill, pause, fill and restart (same port, same data dir)."""

    def __init__(self, workdir: Path, *extra: str, aof: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir)]
        if aof:
            self.args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            self.args += ["--appendonly", "no"]
        self.args += list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self, wait: bool = True) -> None:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(["redis-server", *self.args], stdout=log, stderr=log)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client(socket_timeout=0.5).ping():
                    return
            except (redis.AuthenticationError, redis.ResponseError):
                return  # it answers, if only to refuse us
            except (redis.BusyLoadingError, redis.ConnectionError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.kill()


def postgres_url() -> str | None:
    """A server to create throwaway databases on: env, then the local one, then our own cluster."""
    url = os.environ.get("SPILLOVER_TEST_POSTGRES_URL")
    if url:
        return url
    if _reachable("127.0.0.1", 5432):
        return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    return _start_cluster()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl as the postgres user) that a test may restart."""

    def __init__(self) -> None:
        initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
        if initdb is None or shutil.which("runuser") is None:
            raise RuntimeError("no initdb/runuser to start a PostgreSQL cluster")
        self.bindir = Path(initdb).parent
        self.port = free_port()
        self.data = Path(f"/tmp/spillover-pg-{self.port}")
        self.data.mkdir()
        shutil.chown(self.data, "postgres")
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.data / "log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.data, ignore_errors=True)


def _start_cluster() -> str | None:
    try:
        return PostgresCluster().url
    except (OSError, RuntimeError, subprocess.CalledProcessError, LookupError):
        return None


def create_database(server_url: str) -> str:
    """A fresh, empty database on ``server_url``; its URL."""
    from sqlalchemy import create_engine, text

    name = f"spillover_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name
