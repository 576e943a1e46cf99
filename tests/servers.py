"""Real servers for tests: redis-server processes on free ports, and PostgreSQL.

Tests that kill, pause or fill Redis use their own server from here, never the
shared one on 6379.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis

#: Test servers listen on ports in 10000-19999 (their cluster bus ports, +10000, in 20000-29999): below
#: the kernel's ephemeral range, so a client socket's port never takes one before its server binds it
#: (or while it is down for a restart). Each pytest-xdist worker has a slice of its own.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_WORKERS = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), 1)
_PORTS = range(10000 + _WORKER * 10000 // _WORKERS, 10000 + (_WORKER + 1) * 10000 // _WORKERS)
_next_port = [random.randrange(len(_PORTS))]


def free_port() -> int:
    """A port nothing listens on, from this test process's own slice (see ``_PORTS``)."""
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port[0] % len(_PORTS)]
        _next_port[0] += 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


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

    def __init__(self, standby_of: PostgresCluster | None = None) -> None:
        """A new cluster; or, ``standby_of`` a running one, its streaming standby (``pg_basebackup -R``)."""
        initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
        if initdb is None or shutil.which("runuser") is None:
            raise RuntimeError("no initdb/runuser to start a PostgreSQL cluster")
        self.bindir = Path(initdb).resolve().parent  # initdb may be a link; pg_basebackup is beside the real one
        self.port = free_port()
        self.data = Path(f"/tmp/spillover-pg-{self.port}")
        if standby_of is None:
            self.data.mkdir()
            shutil.chown(self.data, "postgres")
            self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        else:
            source = ("-h", "127.0.0.1", "-p", str(standby_of.port), "-U", "postgres")
            self._pg("pg_basebackup", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast", *source)
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

    def promote(self) -> None:
        """A standby becomes a primary (returns once it takes writes)."""
        self._pg("pg_ctl", "-D", str(self.data), "-w", "promote")

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


class RedisCluster:
    """A real Redis Cluster: ``masters`` masters with one replica each, on free ports (bus ports +10000).

    Ready when every node says cluster_state:ok, the masters are known as such and every replica's
    link is up (``redis-cli --cluster create`` returns before replicas have synced).
    """

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.dir = workdir / f"cluster-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self.masters = masters
        self.ports = _free_cluster_ports(masters * 2)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for port in self.ports:
            self.procs[port] = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--appendonly",
                    "no",
                    "--save",
                    "",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    str(self.dir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for port in self.ports:
            _wait_pong(port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{port}" for port in self.ports],
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not become ready")
            time.sleep(0.05)

    def _ready(self) -> bool:
        for port in self.alive():
            client = redis.Redis(port=port, decode_responses=True)
            if client.cluster("info")["cluster_state"] != "ok":
                return False
            nodes = client.cluster("nodes")
            if sum("master" in node["flags"] for node in nodes.values()) != self.masters:
                return False
            replication = client.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return True

    def alive(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def slot_master(self, key: str) -> int | None:
        """The port of the online master serving ``key``'s slot, as the surviving nodes say."""
        for port in self.alive():
            try:
                client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
                slot = client.cluster("keyslot", key)
                for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end and master[1] in self.alive():
                        return int(master[1])
            except redis.RedisError:
                continue
        return None

    def replica_of(self, master: int) -> int:
        info = redis.Redis(port=master, decode_responses=True).info("replication")
        return int(info["slave0"]["port"])

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_cluster_ports(count: int) -> list[int]:
    """``count`` ports whose cluster bus ports (+10000) are free too."""
    found: list[int] = []
    while len(found) < count:
        port = free_port()
        if port in found:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        found.append(port)
    return found


def _wait_pong(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError):
            if redis.Redis(port=port, socket_timeout=0.5).ping():
                return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on {port} did not start")
