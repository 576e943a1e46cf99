"""Parents whose rows went to an outbox: what a child's row must record so it never runs before them.

RQ counts a parent it cannot find in Redis as done. A parent spilled or written within a
transaction is not in Redis until it is pushed: its dependents' rows carry its delivery id
(option ``outbox_parents``), and the push script defers them until it is pushed (push.lua).
This process remembers its own such parents, per Job object and by id (bounded, no database
read), until they are in Redis by its own hand (a direct write, a transactional push).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from rq.job import Job

from . import settings
from .stored_job import SpilledJob

#: The attribute of a Job whose row went to an outbox (spilled, or written within a transaction): an
#: OutboxParent, which its dependents' rows record (push.lua defers them until it is pushed).
OUTBOX_DELIVERY = "spillover_delivery"
#: Job ids recently written to an outbox by this process, most recent last: parents given by id.
RECENT_OUTBOX_ROWS = 10_000


class OutboxParent(NamedTuple):
    delivery: str
    target: str  # the stored target of its row: a parent on another Redis is RQ's (absent: done)
    since: float  # time.monotonic() of its write

    def holds_for(self, target: str) -> bool:
        """Whether a child of ``target`` must still treat it as an outbox parent. Only on its own Redis, and
        only while the trace of its push lives, counted from its write (its push came later): past that,
        a pushed parent would look never pushed, and its child would wait for ever."""
        return target == self.target and time.monotonic() - self.since < settings.push_trace_ttl()


class OutboxRows:
    """Job id -> OutboxParent of this process's last outbox row of that id (bounded, no database read).

    A child given its parent as an id string learns here that the parent's row went to an outbox.
    An id enqueued again straight into Redis, or pushed by this process, is forgotten (its children
    then follow RQ's rules).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._rows: OrderedDict[str, OutboxParent] = OrderedDict()
        self._jobs: weakref.WeakValueDictionary[str, Job] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._rows)

    def add(self, jobs: Sequence[Job], rows: Sequence[SpilledJob]) -> None:
        now = time.monotonic()
        with self._lock:
            for job, row in zip(jobs, rows, strict=True):
                if row.delivery is None:
                    continue
                parent = OutboxParent(row.delivery, row.target, now)
                setattr(job, OUTBOX_DELIVERY, parent)
                self._rows.pop(job.id, None)
                self._rows[job.id] = parent
                self._jobs[row.delivery] = job
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def forget(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            for job in jobs:
                self._rows.pop(job.id, None)
                if getattr(job, OUTBOX_DELIVERY, None) is not None:
                    setattr(job, OUTBOX_DELIVERY, None)

    def pushed(self, deliveries: Sequence[tuple[str, str | None]]) -> None:
        """These (job id, delivery) rows are in Redis now, pushed by this process: no longer outbox parents."""
        with self._lock:
            for job_id, delivery in deliveries:
                if delivery is None:
                    continue
                found = self._rows.get(job_id)
                if found is not None and found.delivery == delivery:
                    del self._rows[job_id]
                job = self._jobs.pop(delivery, None)
                held = getattr(job, OUTBOX_DELIVERY, None)
                if job is not None and held is not None and held.delivery == delivery:
                    setattr(job, OUTBOX_DELIVERY, None)

    def get(self, job_id: str) -> OutboxParent | None:
        return self._rows.get(job_id)


outbox_rows = OutboxRows(RECENT_OUTBOX_ROWS)
