"""A producer process for fault tests: enqueue up to COUNT jobs named NAME-000000.., report as JSON.

The report: jobs enqueued and spilled, the slowest enqueue, and the p99 of enqueues while
spilling (the first spill of each outage, which found Redis down, aside).

usage: producer.py OUTBOX_URL REDIS_PORT NAME COUNT [PACE_SECONDS] [PROGRESS_FILE]
With PROGRESS_FILE, the process writes "enqueued spilled" there after every job, so a
test can sequence its faults on what producers have done, and it stops early once
PROGRESS_FILE.stop exists. Any exception from enqueue ends the process non-zero: in
these tests the outbox is healthy, so every enqueue must succeed one way or the other.
"""

import json
import sys
import time

import jobs
import redis
from progress import Progress

from spillover import Queue, was_spilled

url, port, name, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
progress = sys.argv[6] if len(sys.argv) > 6 else ""
queue = Queue("faults", connection=redis.Redis(host="127.0.0.1", port=port), outbox=url)
progress_file = Progress(progress)
latencies, spilled, while_down, was_direct = [], 0, [], True
for i in range(count):
    started = time.perf_counter()
    job = queue.enqueue(jobs.noop, job_id=f"{name}-{i:06d}")
    latencies.append(time.perf_counter() - started)
    if was_spilled(job) and not was_direct:  # spilling, past the first spill that found Redis down
        while_down.append(latencies[-1])
    was_direct = not was_spilled(job)
    spilled += was_spilled(job)
    if not progress_file.report(i + 1, spilled):
        break
    if pace:
        time.sleep(pace)
latencies.sort()
while_down.sort()
report = {"enqueued": len(latencies), "spilled": spilled, "max": latencies[-1]}
report["p99_while_down"] = while_down[int(0.99 * (len(while_down) - 1))] if while_down else None
print(json.dumps(report))
