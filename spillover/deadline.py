"""Bounded time for outbox database calls: a per-thread deadline, and a watchdog that enforces it.

Timeouts the server or the kernel enforce (statement_timeout, TCP user timeout, keepalives)
do not fire when the bytes are accepted and never answered: a proxy or pooler in the way,
a partition behind a moved virtual IP. So the bound is kept on the client side: a connection
still in use when its thread's deadline passes is cut (its socket shut down; SQLite's query
interrupted), the call in it fails at once, and the failure is reported as OutboxTimeout.

Two kinds of deadline, both per thread:

- ``budget(seconds)``: everything inside shares ``seconds`` (an enqueue: the backlog count,
  the INSERT, the stale-connection retry, the resume checks, the commit's read-back);
- ``per_checkout(seconds)``: each use of a pooled connection gets ``seconds`` (the
  replayer and background sweepers, which run for ever but must never hang in one call).

Engines get the hooks from ``watch(engine)``; outside both contexts nothing is bounded
(operators' commands may run long on purpose).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event

from .errors import OutboxTimeout

_local = threading.local()

#: libpq's connect_timeout is whole seconds, and at least 2.
LIBPQ_LEAST_CONNECT_TIMEOUT = 2
#: Seconds a connect begun late in an enqueue's budget may overrun it (or a tenth of the budget, if more).
CONNECT_OVERRUN = 0.5


def _until() -> float | None:
    return getattr(_local, "until", None)


def _per_checkout() -> float | None:
    return getattr(_local, "per_checkout", None)


@contextmanager
def budget(seconds: float, since: float | None = None) -> Iterator[None]:
    """Bound every outbox call inside to ``seconds`` in all, counted from ``since`` (``time.monotonic()``,
    default now); nested budgets keep the earliest end."""
    outer, outer_seconds = _until(), limit()
    until = (time.monotonic() if since is None else since) + seconds
    _local.until = until if outer is None else min(outer, until)
    _local.seconds = seconds if outer_seconds is None else min(outer_seconds, seconds)
    armed_before = set(_armed_here())
    try:
        yield
    finally:
        _local.until, _local.seconds = outer, outer_seconds
        if outer is None:
            for key in _armed_here() - armed_before:
                _watchdog.disarm(key)  # a connection the caller keeps (its Session's) is its own again
                _armed_here().discard(key)


@contextmanager
def per_checkout(seconds: float) -> Iterator[None]:
    """Bound each use of a pooled connection by this thread to ``seconds``."""
    outer = _per_checkout()
    _local.per_checkout = seconds  # also what limit() reports
    try:
        yield
    finally:
        _local.per_checkout = outer


def limit() -> float | None:
    """The time limit in force for this thread's calls, in seconds (for messages); None: none."""
    seconds: float | None = getattr(_local, "seconds", None)
    return seconds if seconds is not None else _per_checkout()


def started() -> float | None:
    """When this thread's budget began (``time.monotonic()``); None: no budget."""
    until, seconds = _until(), getattr(_local, "seconds", None)
    return None if until is None or seconds is None else until - seconds


def remaining() -> float | None:
    """Seconds left of this thread's budget (None: no budget)."""
    until = _until()
    return None if until is None else until - time.monotonic()


def check(what: str = "the outbox database") -> None:
    """Raise OutboxTimeout if this thread's budget is spent (before starting another call)."""
    left = remaining()
    if left is not None and left <= 0:
        raise OutboxTimeout(f"no time left to reach {what}: the outbox time limit ({limit():g} s) was spent")


def overran() -> bool:
    """Whether this thread is past its budget: an error now is the watchdog's cut, or as good as."""
    left = remaining()
    return left is not None and left <= 0


def _checkout_deadline() -> float | None:
    until, each = _until(), _per_checkout()
    if each is not None:
        mine = time.monotonic() + each
        until = mine if until is None else min(until, mine)
    return until


def _armed_here() -> set[int]:
    armed: set[int] | None = getattr(_local, "armed", None)
    if armed is None:
        armed = _local.armed = set()
    return armed


# -- engine hooks ------------------------------------------------------------------------


def watch(engine: Engine) -> None:
    """Bound ``engine``'s connections by their thread's deadline (idempotent).

    Armed per pool record (a slot of the pool, which outlives its DBAPI connections), disarmed when
    the connection goes back; a connection the watchdog cut is invalidated on its way back, never
    handed to another caller.
    """
    if getattr(engine.pool, "_spillover_watched", False):
        return
    engine.pool._spillover_watched = True  # type: ignore[attr-defined]
    sqlite = engine.dialect.name == "sqlite"

    @event.listens_for(engine, "do_connect")
    def _connect_timeout(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        until = _checkout_deadline()
        if until is None or sqlite:
            return
        left = until - time.monotonic()
        # A connect cannot be cut from outside, and libpq waits whole seconds, at least 2: rather than
        # overrun an enqueue's budget by more than CONNECT_OVERRUN (or a tenth of it), give up now.
        seconds = limit()
        budgeted = _until() is not None and seconds is not None and seconds >= LIBPQ_LEAST_CONNECT_TIMEOUT
        if budgeted and LIBPQ_LEAST_CONNECT_TIMEOUT - left > max(CONNECT_OVERRUN, seconds / 10):  # type: ignore[operator]
            raise OutboxTimeout(f"too little of the outbox time limit ({seconds:g} s) left to connect")
        cparams["connect_timeout"] = max(LIBPQ_LEAST_CONNECT_TIMEOUT, math.ceil(left))

    @event.listens_for(engine, "connect", insert=True)
    def _arm_new(dbapi_connection: Any, record: Any) -> None:
        _arm(record, dbapi_connection)  # the dialect's first queries on a new connection run before checkout

    @event.listens_for(engine, "checkout")
    def _arm_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        until = _arm(record, dbapi_connection)
        if sqlite and until is not None:  # SQLite's wait for a lock ignores interrupts: shorten it
            left_ms = max(int((until - time.monotonic()) * 1000), 1)
            busy_ms = record.info.get("spillover_busy_default")
            if busy_ms is None:
                busy_ms = record.info["spillover_busy_default"] = int(
                    dbapi_connection.execute("PRAGMA busy_timeout").fetchone()[0]
                )
            if left_ms < busy_ms:  # not at an enqueue's usual checkout: its default is set below the limit
                dbapi_connection.execute(f"PRAGMA busy_timeout={left_ms}")
                record.info["spillover_busy_shortened"] = True

    @event.listens_for(engine, "checkin")
    def _disarm_checkin(dbapi_connection: Any, record: Any) -> None:
        fired = _disarm(record)
        if dbapi_connection is None:
            return
        if fired:  # cut as its call ended: a dead socket must not go back into the pool
            record.invalidate(OutboxTimeout("cut by the outbox time limit"))
            return
        if record.info.pop("spillover_busy_shortened", False):
            try:
                dbapi_connection.execute(f"PRAGMA busy_timeout={record.info['spillover_busy_default']}")
            except Exception:  # not usable as it should be: drop it
                record.invalidate()

    @event.listens_for(engine, "detach")
    def _disarm_detach(_dbapi_connection: Any, record: Any) -> None:
        _disarm(record)

    @event.listens_for(engine, "invalidate")
    def _disarm_invalidated(_dbapi_connection: Any, record: Any, _exception: Any) -> None:
        _disarm(record)


def _arm(record: Any, dbapi_connection: Any) -> float | None:
    until = _checkout_deadline()
    if until is not None:
        _watchdog.arm(id(record), until, _cutter(dbapi_connection))
        if _until() is not None:
            _armed_here().add(id(record))
    return until


def _disarm(record: Any) -> bool:
    """Disarm ``record``'s connection; whether the watchdog had already cut it."""
    _armed_here().discard(id(record))
    return _watchdog.disarm(id(record))


def _cutter(dbapi_connection: Any) -> Callable[[], None]:
    """What stops a call in progress on this connection at once, from another thread."""
    interrupt = getattr(dbapi_connection, "interrupt", None)
    if interrupt is not None:
        return interrupt  # type: ignore[no-any-return]  # sqlite3: the running statement fails "interrupted"

    def shut_socket() -> None:
        # The call blocked in recv/poll sees the connection end and fails as a disconnect; the
        # descriptor stays open (closed by its owner) so it cannot be reused under it meanwhile.
        try:
            fd = os.dup(dbapi_connection.fileno())
        except Exception:  # closed already: nothing to cut
            return
        try:
            with socket.socket(fileno=fd) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    return shut_socket


class _Watchdog:
    """One thread per process: fires each armed connection's cut once its deadline has passed.

    A cut runs under the lock ``disarm`` takes, so a connection is either disarmed before its cut
    (none happens) or cut before it is disarmed (``disarm`` says so, and it is invalidated).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._fired: set[int] = set()
        self._pid = -1
        self._waking_at = 0.0  # when the thread wakes next: an earlier deadline must wake it (notify)

    def arm(self, key: int, until: float, cut: Callable[[], None]) -> None:
        with self._cond:
            self._armed[key] = (until, cut)
            self._fired.discard(key)
            if self._pid != os.getpid():  # first use, or a forked child (the thread stayed behind)
                threading.Thread(
                    target=self._run, args=(os.getpid(),), name="spillover-db-watchdog", daemon=True
                ).start()
                self._pid = os.getpid()  # only once it runs: a failed start is tried again by the next call
            if until < self._waking_at:  # the usual arm is later than a wake already planned: no switch
                self._cond.notify()

    def disarm(self, key: int) -> bool:
        with self._cond:
            self._armed.pop(key, None)
            if key in self._fired:
                self._fired.discard(key)
                return True
            return False

    def _run(self, pid: int) -> None:
        while True:
            with self._cond:
                if self._pid != pid:
                    return
                now = time.monotonic()
                due = [key for key, (until, _) in self._armed.items() if until <= now]
                for key in due:
                    with contextlib.suppress(Exception):  # a connection closed meanwhile: nothing to cut
                        self._armed.pop(key)[1]()
                    self._fired.add(key)
                if not due:
                    self._waking_at = min((until for until, _ in self._armed.values()), default=now + 60)
                    self._cond.wait(self._waking_at - now)
                    self._waking_at = 0.0


_watchdog = _Watchdog()


def _after_fork_in_child() -> None:
    global _watchdog
    _watchdog = _Watchdog()  # the parent's lock may be held by a thread the child does not have


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
