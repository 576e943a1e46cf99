"""Is Redis usable right now? A circuit breaker with a background write-probe.

While Redis is marked down, producers do not touch it at all (an enqueue costs
only the outbox write); a daemon thread probes it with a write every
``probe_interval`` seconds and marks it up again on the first success.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref

import redis

from . import metrics
from .redis_side import is_outage, probe_write
from .rq_keys import DEFAULT_LAYOUT

log = logging.getLogger("spillover.health")


class RedisHealth:
    """The up/down state of one Redis server, shared by the queues that use it."""

    def __init__(
        self, client: redis.Redis, probe_interval: float, probe_key: str = DEFAULT_LAYOUT.probe, name: str = ""
    ) -> None:
        """``name``: the server as the ``spillover_producer_redis_up`` gauge labels it (none: no gauge)."""
        self.client = client
        self._gauge = metrics.PRODUCER_REDIS_UP.labels(name) if name else None
        if self._gauge is not None:
            self._gauge.set(1)
        self.probe_key = probe_key
        self.probe_interval = probe_interval
        self._down_since: float | None = None
        self._last_error: BaseException | None = None
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None
        self._pid = os.getpid()
        _instances.add(self)

    @property
    def is_up(self) -> bool:
        return self._down_since is None

    @property
    def last_error(self) -> BaseException | None:
        return self._last_error

    def mark_down(self, error: BaseException) -> None:
        """Record an outage and make sure a prober is watching for the recovery."""
        self._fork_check()
        with self._lock:
            self._last_error = error
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("redis down (%s): spilling to the outbox", error.__class__.__name__)
                if self._gauge is not None:
                    self._gauge.set(0)
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(target=self._probe_until_up, name="spillover-probe", daemon=True)
                self._prober.start()

    def _probe_until_up(self) -> None:
        while True:
            time.sleep(self.probe_interval)
            try:
                probe_write(self.client, self.probe_key)
            except redis.RedisError as exc:
                if not is_outage(exc):
                    log.error("redis probe failed with a non-outage error: %r", exc)
                self._last_error = exc
                continue
            with self._lock:
                if self._down_since is not None:
                    log.warning("redis up again after %.1f s", time.monotonic() - self._down_since)
                self._down_since = None
                if self._gauge is not None:
                    self._gauge.set(1)
                self._prober = None
            return

    def _fork_check(self) -> None:
        # After fork the prober thread does not exist in the child; locks may be held.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._prober = None

    def after_fork(self) -> None:
        """In a child forked while Redis was marked down: nothing would ever probe it (the parent's prober
        thread is not in the child), and the child would spill for ever. Probe again, in the child."""
        self._fork_check()
        if self._down_since is not None and self._last_error is not None:
            self.mark_down(self._last_error)


_instances: weakref.WeakSet[RedisHealth] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for health in list(_instances):
        health.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
