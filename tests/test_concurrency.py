"""Many producer processes on one SQLite outbox at full speed."""

from __future__ import annotations

import subprocess
import sys

from helpers import env_with_tests
from servers import free_port
from sqlalchemy import select

from spillover import Outbox
from spillover.schema import outbox

PRODUCER = """
import sys, redis, jobs
from spillover import Queue
q = Queue("crowd", connection=redis.Redis(port=int(sys.argv[2])), outbox=sys.argv[1])
for i in range(int(sys.argv[4])):
    q.enqueue(jobs.noop, job_id=f"{sys.argv[3]}-{i:05d}")
"""


def test_eight_producer_processes_on_one_sqlite_file(sqlite_url):
    per_producer, port = 300, free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, sqlite_url, str(port), f"p{n}", str(per_producer)],
            stderr=subprocess.PIPE,
            text=True,
            env=env_with_tests(),
        )
        for n in range(8)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "locked" not in err
    ob = Outbox(sqlite_url)
    with ob.engine.connect() as conn:
        job_ids = list(conn.scalars(select(outbox.c.job_id).order_by(outbox.c.id)))
    assert len(job_ids) == len(set(job_ids)) == 8 * per_producer
    for n in range(8):
        mine = [j for j in job_ids if j.startswith(f"p{n}-")]
        assert mine == [f"p{n}-{i:05d}" for i in range(per_producer)]
