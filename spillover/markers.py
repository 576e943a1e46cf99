"""Delivery markers that nobody will look for: deleted soon after the write they guard.

Every write into RQ sets ``spillover:delivered:<job id>`` so that a second delivery of
the same job (a late request, a replay, a second replayer) writes nothing. A marker is
needed only while a delivery may still come: for replayed rows and for direct writes
whose reply was lost. A direct write whose reply came back needs none, so producers
collect those job ids and delete their markers in one command every half second (and
when the process exits), instead of leaving ~100 bytes per job in Redis for a week.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref

import redis

from .settings import MARKER_PREFIX

log = logging.getLogger("spillover.markers")

#: Seconds between deletions; at most this long does a confirmed write's marker live.
SWEEP_INTERVAL = 0.5
#: Keys per DEL command.
CHUNK = 1000
#: Ids kept while Redis is unreachable (the markers expire by themselves anyway).
BACKLOG_LIMIT = 100_000

_sweepers: weakref.WeakSet[ConfirmedMarkers] = weakref.WeakSet()


class ConfirmedMarkers:
    """Markers of one Redis server's confirmed direct writes, waiting to be deleted."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._ids: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        _sweepers.add(self)

    def confirmed(self, job_ids: list[str]) -> None:
        """These jobs' direct writes were acknowledged by Redis: their markers may go."""
        if not job_ids:
            return
        self._fork_check()
        with self._lock:
            self._ids.extend(job_ids)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._sweep, name="spillover-markers", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Delete the collected markers now; on a Redis error keep them for the next try."""
        self._fork_check()
        with self._lock:
            taken, self._ids = self._ids, []
        done = 0
        try:
            for done in range(0, len(taken), CHUNK):
                self.client.delete(*(MARKER_PREFIX + job_id for job_id in taken[done : done + CHUNK]))
        except redis.RedisError as exc:
            log.debug("could not delete delivery markers yet: %r", exc)
            with self._lock:
                self._ids[:0] = taken[done:][-BACKLOG_LIMIT:]

    def pending(self) -> int:
        with self._lock:
            return len(self._ids)

    def _sweep(self) -> None:
        idle = 0
        while idle < 10:  # the thread ends after 5 s without work; confirmed() starts another
            time.sleep(SWEEP_INTERVAL)
            if self.pending():
                self.flush()
                idle = 0
            else:
                idle += 1

    def _fork_check(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's ids, lock and thread are not ours
            self._pid, self._ids, self._lock, self._thread = os.getpid(), [], threading.Lock(), None


@atexit.register
def _flush_all() -> None:
    """An exiting producer leaves no marker of a confirmed write behind."""
    for sweeper in list(_sweepers):
        if sweeper._pid == os.getpid():
            sweeper.flush()
