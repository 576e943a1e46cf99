"""Clean-up work done in batches off the caller's path, and once more when the process exits.

A producer learns, one enqueue at a time, of things that may now be deleted (a delivery
marker nobody will look for, an outbox row already in RQ). Deleting each at once would
cost the caller a round trip per job; a sweeper collects them and deletes them in one
command every ``interval`` seconds on a thread of its own. Deleting late is always
safe here: what waits is only garbage, never something a reader depends on.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Generic, TypeVar

from . import deadline, settings

log = logging.getLogger("spillover.sweeper")

T = TypeVar("T")

_sweepers: weakref.WeakSet[Sweeper[object]] = weakref.WeakSet()


class Sweeper(Generic[T]):
    """Collects items and hands them to ``delete`` in batches; a failed batch is kept for the next try."""

    #: Seconds between batches: at most this long does an item wait.
    interval = 0.5
    #: Items kept while deleting fails (what they stand for expires or is found again by itself).
    backlog_limit = 100_000
    name = "spillover-sweeper"

    def __init__(self) -> None:
        self._items: list[T] = []
        self._lock = threading.Lock()
        # Held while a batch is being deleted: a flush at exit waits for the sweeper thread's batch in
        # flight (a daemon thread is stopped mid-call when the interpreter exits, and its batch lost).
        self._deleting = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        _sweepers.add(self)  # type: ignore[arg-type]

    def delete(self, items: Sequence[T]) -> None:
        """Delete one batch; raise to keep the items for the next try."""
        raise NotImplementedError

    def add(self, items: Sequence[T]) -> None:
        if not items:
            return
        self._fork_check()
        with self._lock:
            self._items.extend(items)
            if _exiting or (self._thread is not None and self._thread.is_alive()):
                return  # at exit, _flush_all takes them
            self._thread = threading.Thread(target=self._sweep, name=self.name, daemon=True)
            self._thread.start()

    def flush(self) -> None:
        """Delete what is collected now; on an error keep it for the next try."""
        self._fork_check()
        with self._deleting:
            with self._lock:
                taken, self._items = self._items, []
            if not taken:
                return
            try:
                self.delete(taken)
            except Exception as exc:
                log.debug("%s: could not delete %d item(s) yet: %r", self.name, len(taken), exc)
                with self._lock:
                    self._items[:0] = taken[-self.backlog_limit :]

    def pending(self) -> int:
        with self._lock:
            return len(self._items)

    def _sweep(self) -> None:
        idle = 0
        while idle < 10:  # the thread ends after 10 idle intervals; add() starts another
            time.sleep(self.interval)
            if self.pending():
                with deadline.per_checkout(settings.outbox_timeout()):  # a stalled outbox: retried next time
                    self.flush()
                idle = 0
            else:
                idle += 1

    def _fork_check(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's items, lock and thread are not ours
            self._pid, self._items, self._lock, self._thread = os.getpid(), [], threading.Lock(), None
            self._deleting = threading.Lock()


_exiting = False
_held_at_fork: list[threading.Lock] = []


def _before_fork() -> None:
    """No batch is half-deleted when the process forks: SQLite keeps the locks of a process's connections
    in process-wide state, so a child forked while a sweeper thread held the outbox's write lock would
    inherit a lock nobody releases, and its own writes would wait for it until "database is locked"."""
    mine = sorted((s for s in list(_sweepers) if s._pid == os.getpid()), key=id)
    for sweeper in mine:
        sweeper._deleting.acquire()
        _held_at_fork.append(sweeper._deleting)


def _after_fork_in_parent() -> None:
    while _held_at_fork:
        _held_at_fork.pop().release()


def _after_fork_in_child() -> None:
    _held_at_fork.clear()  # the child's sweepers renew their locks (_fork_check)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


@atexit.register
def _flush_all() -> None:
    """An exiting process leaves nothing it could have deleted behind.

    A few passes: deleting one sweeper's items may hand items to another (deleted outbox rows
    hand their markers to be settled).
    """
    global _exiting
    _exiting = True
    for _ in range(3):
        mine = [sweeper for sweeper in list(_sweepers) if sweeper._pid == os.getpid()]
        if not any(sweeper.pending() for sweeper in mine):
            return
        for sweeper in mine:
            sweeper.flush()
