"""A producer process that commits one order and its job per transaction, like a request handler.

usage: tx_producer.py DATABASE_URL REDIS_PORT NAME COUNT [PACE_SECONDS] [PROGRESS_FILE]
Job NAME-000000.. is enqueued within the transaction that inserts order NAME-000000..
PROGRESS_FILE and the report work as in producer.py, with "spilled" counting the commits
made while this producer leaves its jobs in the outbox (its last push failed) rather than
pushing them at commit.
"""

import json
import sys
import time

import jobs
import redis
from orders import Order
from progress import Progress
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from spillover import Queue

url, port, name, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
progress = sys.argv[6] if len(sys.argv) > 6 else ""
engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
queue = Queue("faults", connection=redis.Redis(host="127.0.0.1", port=port), outbox=url, redis_timeout=0.5)
progress_file = Progress(progress)
latencies, left = [], 0
for i in range(count):
    job_id = f"{name}-{i:06d}"
    started = time.perf_counter()
    with Session(engine) as session:
        session.add(Order(item=job_id))
        within = queue.within(session)
        within.enqueue(jobs.noop, job_id=job_id)
        session.commit()
    latencies.append(time.perf_counter() - started)
    left += within.lane.spilling
    if not progress_file.report(i + 1, left):
        break
    if pace:
        time.sleep(pace)
latencies.sort()
print(json.dumps({"enqueued": len(latencies), "spilled": left, "max": latencies[-1]}))
