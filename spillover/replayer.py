"""The replayer: moves outbox rows into RQ, per queue in order, exactly once.

Exactly once rests on two things: the replay script writes a job and its
delivery marker atomically and skips any job whose marker exists; and a row
leaves the outbox only after Redis confirmed it. A crash between the two
leaves a pending row whose marker exists, which the next pass skips.
Order rests on the lease: one replayer drains at a time, oldest row first, and
a row that fails stops its queue until it succeeds or is declared dead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis

from .errors import ReplayError
from .lease import Lease
from .outbox import Outbox, OutboxRow
from .redis_side import ReplayItem, ReplayScript, is_outage, probe_write

log = logging.getLogger("spillover.replay")

_TRANSIENT_SCRIPT_ERRORS = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY")


class RedisUnavailable(Exception):
    """Internal: stop draining and wait for Redis."""


@dataclass
class ReplayConfig:
    batch_size: int = 500
    poll_interval: float = 1.0
    marker_ttl: int = 7 * 24 * 3600
    retention: float = 0.0  # seconds to keep replayed rows; 0 deletes them at once
    max_attempts: int = 3
    lease_ttl: float = 10.0
    queues: list[str] = field(default_factory=list)  # empty: every queue in the outbox


@dataclass
class ReplayStats:
    replayed: int = 0
    duplicates: int = 0
    dead: int = 0


class Replayer:
    def __init__(self, outbox: Outbox, client: redis.Redis, config: ReplayConfig | None = None) -> None:
        self.outbox = outbox
        self.client = client
        self.config = config or ReplayConfig()
        self.holder = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(outbox.engine, self.holder, self.config.lease_ttl)
        self.script = ReplayScript(client, self.config.marker_ttl)
        self.stats = ReplayStats()
        self.stopping = threading.Event()
        self._redis_up: bool | None = None
        self._purged_at = 0.0
        self._retry_pending = False  # a row failed this pass and will be tried again

    # -- entry points ---------------------------------------------------------------

    def run(self) -> None:
        """Drain until ``stopping`` is set; wait out Redis outages with capped backoff."""
        backoff = 0.05
        try:
            while not self.stopping.is_set():
                if not self._redis_healthy():
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 0.5)
                    continue
                backoff = 0.05
                if not self.lease.acquire():
                    self.stopping.wait(min(self.config.poll_interval, self.config.lease_ttl / 3))
                    continue
                try:
                    moved = self.drain()
                except RedisUnavailable:
                    continue
                self._purge_retained()
                if not moved:
                    self.stopping.wait(self.config.poll_interval)
        finally:
            self._release()

    def run_once(self, lease_wait: float | None = None) -> ReplayStats:
        """Drain everything pending and return; ReplayError if Redis or the lease is not to be had."""
        if not self._redis_healthy():
            raise ReplayError("redis is unreachable; nothing replayed")
        deadline = time.monotonic() + (2 * self.config.lease_ttl if lease_wait is None else lease_wait)
        while not self.lease.acquire():
            current = self.lease.current()
            if time.monotonic() > deadline:
                raise ReplayError(f"replay lease held by {current.holder if current else 'another replayer'}")
            time.sleep(0.2)
        try:
            while self.drain() or self._retry_pending:
                if self._retry_pending:
                    time.sleep(min(self.config.poll_interval, 1.0))  # do not hammer a failing row
        except RedisUnavailable as exc:
            raise ReplayError(f"redis became unavailable during replay: {exc}") from exc
        finally:
            self._release()
        self._purge_retained()
        return self.stats

    # -- draining -------------------------------------------------------------------

    def drain(self) -> int:
        """One pass over every queue with pending rows; rows moved (delivered or dead)."""
        self._retry_pending = False
        queues = self.config.queues or self.outbox.pending_queues()
        return sum(self.drain_queue(queue) for queue in queues if not self.stopping.is_set())

    def drain_queue(self, queue: str) -> int:
        left = self.outbox.pending_count(queue)
        if not left:
            return 0
        log.info("draining queue %s: %d left", queue, left)
        started, moved = time.monotonic(), 0
        while not self.stopping.is_set():
            if not self.lease.hold():
                log.warning("lost the replay lease; stopping the drain of %s", queue)
                break
            rows = self.outbox.fetch_pending(queue, self.config.batch_size)
            if not rows:
                log.info("drained queue %s: %d rows in %.2f s", queue, moved, time.monotonic() - started)
                break
            done, blocked = self._replay_batch(queue, rows)
            moved += done
            if blocked:
                break
        return moved

    def _replay_batch(self, queue: str, rows: list[OutboxRow]) -> tuple[int, bool]:
        """Push a batch; (rows moved, whether the queue is blocked by a failing row)."""
        items: list[ReplayItem] = []
        for row in rows:
            problem = self._unreplayable(row)
            if problem is None:
                items.append(row)
                continue
            # Rows before the bad one go first, then the bad one is set aside (order kept).
            moved = self._push(queue, rows[: len(items)], items)[0] if items else 0
            if moved < len(items):
                return moved, True
            self.outbox.mark_dead(row.id, problem)
            self.stats.dead += 1
            log.error("row %d (job %s) is dead: %s", row.id, row.job_id, problem)
            return moved + 1, False
        moved, blocked = self._push(queue, rows, items)
        return moved, blocked

    def _push(self, queue: str, rows: list[OutboxRow], items: list[ReplayItem]) -> tuple[int, bool]:
        try:
            codes, error = self.script.push(queue, items)
        except redis.RedisError as exc:
            if is_outage(exc):
                self._set_redis_up(False, exc)
                raise RedisUnavailable(str(exc)) from exc
            raise
        delivered = rows[: len(codes)]
        self.outbox.mark_delivered([row.id for row in delivered], keep=self.config.retention > 0)
        duplicates = codes.count(0)
        self.stats.duplicates += duplicates
        self.stats.replayed += len(codes) - duplicates
        if duplicates:
            log.info("queue %s: %d job(s) already in redis, not pushed again", queue, duplicates)
        if error is None:
            return len(codes), False
        failed = rows[len(codes)]
        if error.upper().startswith(_TRANSIENT_SCRIPT_ERRORS):
            self._set_redis_up(False, error)
            raise RedisUnavailable(error)
        dead = self.outbox.record_failure(failed.id, error, self.config.max_attempts)
        if dead:
            self.stats.dead += 1
            log.error(
                "row %d (job %s) is dead after %d attempts: %s", failed.id, failed.job_id, failed.attempts + 1, error
            )
            return len(codes) + 1, False
        log.warning("row %d (job %s) failed (attempt %d): %s", failed.id, failed.job_id, failed.attempts + 1, error)
        self._retry_pending = True
        return len(codes), True

    def _unreplayable(self, row: OutboxRow) -> str | None:
        if row.ambiguous and row.age_seconds > self.config.marker_ttl:
            return (
                "its direct write may have reached redis and the delivery marker has expired "
                "(older than the marker TTL): check RQ for the job, then `spillover dead retry` or `purge`"
            )
        return None

    # -- housekeeping ---------------------------------------------------------------

    def _redis_healthy(self) -> bool:
        try:
            probe_write(self.client)
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            self._set_redis_up(False, exc)
            return False
        self._set_redis_up(True)
        return True

    def _set_redis_up(self, up: bool, reason: object = None) -> None:
        if up and self._redis_up is not True:
            log.info("redis healthy; replaying")
        elif not up and self._redis_up is not False:
            log.warning("redis unavailable (%s); waiting for it", reason)
        self._redis_up = up

    def _purge_retained(self) -> None:
        if self.config.retention > 0 and time.monotonic() - self._purged_at > 60:
            self._purged_at = time.monotonic()
            purged = self.outbox.purge_done(self.config.retention)
            if purged:
                log.info("purged %d replayed rows older than %.0f s", purged, self.config.retention)

    def _release(self) -> None:
        try:
            self.lease.release()
        except Exception as exc:  # the lease expires by itself; say why it was not released
            log.warning("could not release the replay lease: %r", exc)
