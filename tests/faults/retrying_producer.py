"""A producer process for the failover test: enqueue COUNT jobs NAME-000000.., retrying what raised.

On OutboxUnavailable it enqueues the same job id again (what the docs say is safe, in doubt or not)
until it is acknowledged. Reports as JSON: jobs acknowledged, retries, how many failures were in
doubt, and the longest time between two acknowledgements (how long the failover stopped it).

usage: retrying_producer.py OUTBOX_URL REDIS_PORT TARGET NAME COUNT PROGRESS_FILE
"""

import json
import sys
import time

import jobs
import redis
from progress import Progress

from spillover import OutboxUnavailable, Queue

url, port, target, name, count, progress = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
    int(sys.argv[5]),
    sys.argv[6],
)
queue = Queue("faults", connection=redis.Redis(host="127.0.0.1", port=port), outbox=url, target=target)
progress_file = Progress(progress)
acknowledged, retries, in_doubt, longest_gap = 0, 0, 0, 0.0
last_ack = time.monotonic()
for i in range(count):
    while True:
        try:
            queue.enqueue(jobs.noop, job_id=f"{name}-{i:06d}")
            break
        except OutboxUnavailable as exc:
            retries += 1
            in_doubt += exc.in_doubt
            time.sleep(0.05)
    now = time.monotonic()
    longest_gap, last_ack = max(longest_gap, now - last_ack), now
    acknowledged += 1
    if not progress_file.report(acknowledged, acknowledged):
        break
print(json.dumps({"enqueued": acknowledged, "retries": retries, "in_doubt": in_doubt, "longest_gap": longest_gap}))
