"""Deliveries whose outbox write is in doubt, so that retrying the same job id enqueues it once.

An INSERT sent to a database that then stalls or fails over may or may not have been applied;
the caller gets OutboxUnavailable with ``in_doubt`` and cannot tell. If it enqueues the same job
id again (on the same target and queue, from this process) within one delivery window of that
failure, the retry carries the delivery id of the attempt in doubt: the push script writes a
delivery once, so whichever copies were stored (the first, the retry, both), RQ gets the job once.
The retry's marker is not shortened when it is pushed (it lives its backstop,
``SPILLOVER_MARKER_TTL``): the first copy may turn up late, when the database comes back. The
first copy's own row cannot say so: if it is pushed first, its marker is settled as any row's
(one window after its row is gone), which covers a retry made within the window of the failure.
Later, an enqueue of that id is a new delivery, as any re-enqueue is.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from . import deadline, settings
from .stored_job import SpilledJob

#: Deliveries in doubt remembered per process (the oldest are forgotten first).
KEPT = 10_000
#: The option a retried delivery's rows carry: keep its marker for the backstop.
OPTION = "in_doubt"

_Key = tuple[str, str, str]  # stored target, queue, job id
_lock = threading.Lock()
_deliveries: OrderedDict[_Key, tuple[str, float]] = OrderedDict()  # delivery, when it failed (monotonic)


def remember(rows: Sequence[SpilledJob]) -> None:
    """These rows' write is in doubt: a retry of their job ids reuses their deliveries.

    The window counts from when the enqueue began (its write may have landed then, its row been
    replayed and settled at once), not from when the error came back.
    """
    failed_at = deadline.started() or time.monotonic()
    with _lock:
        for row in rows:
            if row.delivery is not None:
                _deliveries[row.target, row.queue, row.job_id] = (row.delivery, failed_at)
                _deliveries.move_to_end((row.target, row.queue, row.job_id))
        while len(_deliveries) > KEPT:
            _deliveries.popitem(last=False)


def as_retries(rows: list[SpilledJob]) -> list[SpilledJob]:
    """``rows``, each retrying a delivery in doubt taking that delivery (and the option that keeps its marker)."""
    if not _deliveries:  # the usual case: nothing in doubt, nothing to look up
        return rows
    oldest = time.monotonic() - settings.delivery_window()
    with _lock:
        while _deliveries and next(iter(_deliveries.values()))[1] < oldest:
            _deliveries.popitem(last=False)  # past the window: an enqueue of that id is a new delivery
        kept = [_deliveries.get((row.target, row.queue, row.job_id)) for row in rows]
    found = [entry[0] if entry is not None else None for entry in kept]
    if not any(found):
        return rows
    return [row if delivery is None else _retry(row, delivery) for row, delivery in zip(rows, found, strict=True)]


def settled(rows: Sequence[SpilledJob]) -> None:
    """These rows are stored or in Redis: their job ids' next enqueues are new deliveries again."""
    if not _deliveries:
        return
    with _lock:
        for row in rows:
            entry = _deliveries.get((row.target, row.queue, row.job_id))
            if entry is not None and entry[0] == row.delivery:
                del _deliveries[row.target, row.queue, row.job_id]


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    _deliveries.clear()  # the parent's failures; a child's enqueue of those ids is its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def settleable(done: list[tuple[str, str | None]], rows: Sequence[SpilledJob]) -> list[tuple[str, str | None]]:
    """Of ``done`` (job id, delivery) pairs of ``rows``, those whose markers may be settled: not a retry's."""
    if not any(row.options for row in rows):  # the usual case: a retry's row always carries the option
        return done
    return [item for item, row in zip(done, rows, strict=False) if not keeps_marker(row.options)]


def keeps_marker(options: str | None) -> bool:
    """Whether a row's delivery was in doubt once: its marker must not be shortened when it is pushed."""
    return options is not None and f'"{OPTION}"' in options


def _retry(row: SpilledJob, delivery: str) -> SpilledJob:
    options = json.loads(row.options) if row.options else {}
    options[OPTION] = True
    return replace(row, delivery=delivery, options=json.dumps(options, separators=(",", ":")))
