"""A producer on a Redis Cluster as RQ 3 runs there: RQ_KEY_PREFIX={app}, a plain client on the slot's master.

Args: master port, outbox URL, the file jobs append to, how many, progress file. Each acknowledged
enqueue appends "<d|s> <seq>" (direct or spilled) to the progress file before the next one.
"""

from __future__ import annotations

import sys
import time

import jobs
import redis

from spillover import Queue, was_spilled


def main(port: int, outbox_url: str, ran: str, count: int, progress: str) -> None:
    queue = Queue("cl", connection=redis.Redis(port=port), outbox=outbox_url, target="cluster-app")
    with open(progress, "a", encoding="utf-8") as out:
        for seq in range(count):
            job = queue.enqueue(jobs.append_line, ran, str(seq), job_id=f"cl-{seq:05d}")
            out.write(f"{'s' if was_spilled(job) else 'd'} {seq}\n")
            out.flush()
            time.sleep(0.005)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
