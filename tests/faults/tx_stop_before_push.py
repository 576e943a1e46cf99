"""Commit one order and its job, then stop between the commit and the push (for a SIGKILL there).

usage: tx_stop_before_push.py DATABASE_URL REDIS_PORT FLAG_FILE
The commit's after-commit hook writes FLAG_FILE when it is about to push the committed
job, and stops there, waiting to be killed.
"""

import sys
import time
from pathlib import Path

import jobs
import redis
from orders import Order
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from spillover import Queue, transaction

url, port, flag = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])


def stop_here() -> None:
    flag.write_text("committed")
    time.sleep(3600)


transaction.before_push = stop_here
queue = Queue("faults", connection=redis.Redis(host="127.0.0.1", port=port), outbox=url)
with Session(create_engine(url)) as session:
    order = Order(item="paid")
    session.add(order)
    session.flush()
    queue.within(session).enqueue(jobs.read_order, url, order.id, job_id="receipt")
    session.commit()
raise SystemExit("the hook should have stopped this process before its push")
