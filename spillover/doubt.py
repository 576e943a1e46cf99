"""Deliveries whose outbox write is in doubt, so that retrying the same job id enqueues it once.

An INSERT sent to a database that then stalls or fails over may or may not have been applied;
the caller gets OutboxUnavailable with ``in_doubt`` and cannot tell. If it enqueues the same job
id again (on the same target and queue, from this process), the retry carries the delivery id
of the attempt in doubt: the push script writes a delivery once, so whichever copies were stored
(the first, the retry, both), RQ gets the job once. Such a delivery's marker is never shortened
when one copy is pushed (it lives its backstop, ``SPILLOVER_MARKER_TTL``): the other copy may
turn up late, when the database comes back.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from .stored_job import SpilledJob

#: Deliveries in doubt remembered per process (the oldest are forgotten first).
KEPT = 10_000
#: The option a retried delivery's rows carry: keep its marker for the backstop.
OPTION = "in_doubt"

_Key = tuple[str, str, str]  # stored target, queue, job id
_lock = threading.Lock()
_deliveries: OrderedDict[_Key, str] = OrderedDict()


def remember(rows: Sequence[SpilledJob]) -> None:
    """These rows' write is in doubt: a retry of their job ids reuses their deliveries."""
    with _lock:
        for row in rows:
            if row.delivery is not None:
                _deliveries[row.target, row.queue, row.job_id] = row.delivery
                _deliveries.move_to_end((row.target, row.queue, row.job_id))
        while len(_deliveries) > KEPT:
            _deliveries.popitem(last=False)


def as_retries(rows: list[SpilledJob]) -> list[SpilledJob]:
    """``rows``, each retrying a delivery in doubt taking that delivery (and the option that keeps its marker)."""
    if not _deliveries:  # the usual case: nothing in doubt, nothing to look up
        return rows
    with _lock:
        found = [_deliveries.get((row.target, row.queue, row.job_id)) for row in rows]
    if not any(found):
        return rows
    return [row if delivery is None else _retry(row, delivery) for row, delivery in zip(rows, found, strict=True)]


def settled(rows: Sequence[SpilledJob]) -> None:
    """These rows are stored or in Redis: their job ids' next enqueues are new deliveries again."""
    if not _deliveries:
        return
    with _lock:
        for row in rows:
            if _deliveries.get((row.target, row.queue, row.job_id)) == row.delivery:
                del _deliveries[row.target, row.queue, row.job_id]


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def keeps_marker(options: str | None) -> bool:
    """Whether a row's delivery was in doubt once: its marker must not be shortened when it is pushed."""
    return options is not None and f'"{OPTION}"' in options


def _retry(row: SpilledJob, delivery: str) -> SpilledJob:
    options = json.loads(row.options) if row.options else {}
    options[OPTION] = True
    return replace(row, delivery=delivery, options=json.dumps(options, separators=(",", ":")))
