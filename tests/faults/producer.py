"""A producer process for fault tests: enqueue up to COUNT jobs named NAME-000000.., report as JSON.

usage: producer.py OUTBOX_URL REDIS_PORT NAME COUNT [PACE_SECONDS] [PROGRESS_FILE]
With PROGRESS_FILE, the process writes "enqueued spilled" there after every job, so a
test can sequence its faults on what producers have done, and it stops early once
PROGRESS_FILE.stop exists. Any exception from enqueue ends the process non-zero: in
these tests the outbox is healthy, so every enqueue must succeed one way or the other.
"""

import json
import os
import sys
import time

import jobs
import redis

from spillover import Queue, was_spilled

url, port, name, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
progress = sys.argv[6] if len(sys.argv) > 6 else ""
queue = Queue("faults", connection=redis.Redis(host="127.0.0.1", port=port), outbox=url)
fd = os.open(progress, os.O_WRONLY | os.O_CREAT) if progress else None
latencies, spilled = [], 0
for i in range(count):
    started = time.perf_counter()
    job = queue.enqueue(jobs.noop, job_id=f"{name}-{i:06d}")
    latencies.append(time.perf_counter() - started)
    spilled += was_spilled(job)
    if fd is not None:
        os.pwrite(fd, f"{i + 1:>10} {spilled:>10}\n".encode(), 0)
        if os.path.exists(progress + ".stop"):
            break
    if pace:
        time.sleep(pace)
latencies.sort()
report = {"enqueued": len(latencies), "spilled": spilled, "max": latencies[-1]}
report["p99"] = latencies[int(0.99 * (len(latencies) - 1))]
print(json.dumps(report))
