"""A producer process for fault tests: enqueue COUNT jobs named NAME-000000.., report as JSON.

usage: producer.py OUTBOX_URL REDIS_PORT NAME COUNT [PACE_SECONDS]
Any exception from enqueue ends the process non-zero: in these tests the outbox is
healthy, so every enqueue must succeed one way or the other.
"""

import json
import sys
import time

import jobs
import redis

from spillover import Queue, was_spilled

url, port, name, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
queue = Queue("faults", connection=redis.Redis(host="127.0.0.1", port=port), outbox=url)
latencies, spilled = [], 0
for i in range(count):
    started = time.perf_counter()
    job = queue.enqueue(jobs.noop, job_id=f"{name}-{i:06d}")
    latencies.append(time.perf_counter() - started)
    spilled += was_spilled(job)
    if pace:
        time.sleep(pace)
latencies.sort()
print(json.dumps({"spilled": spilled, "max": latencies[-1], "p99": latencies[int(0.99 * (len(latencies) - 1))]}))
