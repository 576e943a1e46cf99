"""rediss:// end to end: a TLS-only redis-server, producers that spill, a replayer that replays."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import jobs
import pytest
import redis
from helpers import replay_once
from servers import free_port

from spillover import Queue, redis_from_url, was_spilled


class TlsRedis:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.cert = workdir / "cert.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(workdir / "key.pem"),
                "-out",
                str(self.cert),
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.cert),
                "--tls-key-file",
                str(self.dir / "key.pem"),
                "--tls-ca-cert-file",
                str(self.cert),
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError("the TLS redis-server did not start (built without TLS?)")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    server = TlsRedis(tmp_path)
    yield server
    server.kill()


def test_rediss_direct_spill_and_replay(tls_redis, sqlite_url):
    queue = Queue("tls", connection=redis_from_url(tls_redis.url), outbox=sqlite_url)
    assert not was_spilled(queue.enqueue(jobs.noop, job_id="direct"))
    tls_redis.kill()
    assert was_spilled(queue.enqueue(jobs.noop, job_id="spilled"))
    tls_redis.start()
    replay_once(sqlite_url, tls_redis.url)
    client = redis.Redis.from_url(tls_redis.url)
    assert client.lrange("rq:queue:tls", 0, -1) == [b"direct", b"spilled"]
