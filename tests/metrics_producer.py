"""A producer process that serves its /metrics, for tests/test_observability.py.

usage: metrics_producer.py OUTBOX_URL REDIS_URL METRICS_PORT READY_FILE
Enqueues straight into Redis, within a transaction, spilled (to a Redis nobody listens on), and
fails twice (BacklogFull, OutboxUnavailable), so that every producer series exists; then writes
READY_FILE and serves until READY_FILE.stop exists.
"""

import contextlib
import os
import sys
import time

import jobs
import redis
from prometheus_client import start_http_server
from servers import free_port
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from spillover import BacklogFull, Outbox, OutboxUnavailable, Queue

url, redis_url, port, ready = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start_http_server(port, addr="127.0.0.1")
live = redis.Redis.from_url(redis_url)
dead = redis.Redis(host="127.0.0.1", port=free_port())
Queue("direct", connection=live, outbox=url).enqueue(jobs.noop)
engine = create_engine(url)
with Session(engine) as session:
    Queue("direct", connection=live, outbox=url).within(session).enqueue(jobs.noop)
    session.commit()
Queue("spilled", connection=dead, outbox=url, target=redis_url).enqueue(jobs.noop)
with contextlib.suppress(BacklogFull):
    Queue("full", connection=dead, outbox=Outbox(url, max_backlog=1), target=redis_url).enqueue(jobs.noop)
with contextlib.suppress(OutboxUnavailable):
    Queue("lost", connection=dead, outbox="sqlite:////nonexistent/dir/outbox.db").enqueue(jobs.noop)
open(ready, "w").close()
while not os.path.exists(ready + ".stop"):
    time.sleep(0.05)
