"""Spill lanes: one producer's jobs of one queue, bound for one Redis, through one outbox.

A lane is sticky: once a job of it has gone to the outbox, its later jobs follow it there
until this producer's rows of the lane are in Redis, so one producer's jobs reach RQ in the
order they were enqueued. The replayer moves the bulk of them; the last few the producer
pushes itself (``may_resume``), so a producer that keeps enqueueing is not left spilling
behind a replayer that polls. Both producer paths use lanes: plain enqueues
(queue.py) and enqueues within the application's transaction (transaction.py), each with
lanes of their own, so neither holds the other back.

Also here, shared per process: one bounded client, breaker, clock and settler per Redis
server, and one Outbox per database URL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import deadline, doubt, parents, settings
from .errors import OutboxTimeout, OutboxUnavailable
from .health import RedisHealth
from .markers import Settler
from .outbox import Outbox, OutboxRow
from .pusher import LATE, Pusher, PushResult, RedisClock
from .redis_side import bounded_client, server_key, target_of
from .rq_keys import KeyLayout
from .stored_job import SpilledJob

log = logging.getLogger("spillover.queue")

#: While a lane is spilling, how often (s) to ask the outbox whether its rows are replayed.
RESUME_CHECK_INTERVAL = 0.1
#: At most this many of its own pending rows a producer pushes itself to leave spill mode;
#: a longer backlog is the replayer's, and the producer keeps spilling behind it.
RESUME_PUSH_LIMIT = 500

OutboxLike = Outbox | Engine | str | None


class Server:
    """One Redis server as a producer process sees it: bounded client, breaker, clock, settler."""

    def __init__(self, client: redis.Redis, probe_interval: float, layout: KeyLayout) -> None:
        self.client = client
        # The probe writes under the key prefix of the first queue on this server (one cluster slot).
        self.health = RedisHealth(client, probe_interval, probe_key=layout.probe, name=target_of(client))
        self.clock = RedisClock(client)
        self.version: tuple[int, int, int] | None = None
        self._pushers: dict[tuple[int, KeyLayout], Pusher] = {}
        self._settlers: dict[KeyLayout, Settler] = {}

    def pusher(self, backstop: int, layout: KeyLayout) -> Pusher:
        """The pusher for markers with this backstop (seconds) and keys, on this server's client and clock."""
        found = self._pushers.get((backstop, layout))
        if found is None:
            found = Pusher(
                self.client, backstop=backstop, window=settings.delivery_window(), clock=self.clock, layout=layout
            )
            self._pushers[backstop, layout] = found
        return found

    def settler(self, layout: KeyLayout) -> Settler:
        """The settler of the markers under ``layout``'s prefix on this server (one thread each)."""
        with lock:
            found = self._settlers.get(layout)
            if found is None:
                found = self._settlers[layout] = Settler(self.pusher(settings.marker_ttl(), layout))
            return found


@dataclass
class SpillLane:
    """Per process, outbox database, Redis server, target and queue: spilling or not, and its push."""

    outbox: Outbox
    server: Server
    pusher: Pusher
    target: str
    queue: str
    spilling: bool = False
    checked_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def health(self) -> RedisHealth:
        return self.server.health

    def may_resume(self) -> bool:
        """Whether a job may go to Redis now: Redis is up and none of this lane's rows is still pending.

        The last few (up to RESUME_PUSH_LIMIT) the producer pushes itself: each push writes rows in
        id order and skips any delivery whose marker exists, so a replayer pushing the same rows at
        the same time cannot double or reorder them. Call with ``lock`` held.
        """
        if not self.spilling:
            return self.health.is_up
        if not self.health.is_up or time.monotonic() - self.checked_at < RESUME_CHECK_INTERVAL:
            return False
        self.checked_at = time.monotonic()
        try:
            read_at = self.pusher.clock.now_ms()  # before the read: the push's deadline counts from it
            mine = self.outbox.own_pending(self.target, self.queue, RESUME_PUSH_LIMIT + 1)
            backstop = self.pusher.backstop_ms / 1000.0
            too_old = any(row.ambiguous and row.age_seconds > backstop for row in mine)
            if len(mine) > RESUME_PUSH_LIMIT or too_old:
                return False  # a backlog, or a row only the replayer may judge: it moves them
            if mine and not self.push_own(mine, read_at):
                return False
        except SQLAlchemyError:
            return False  # cannot tell: keep spilling, order first
        except redis.RedisError as exc:
            self.server_failed(exc)
            return False
        self.spilling = False
        return True

    def push_own(self, rows: list[OutboxRow], read_at: float) -> bool:
        """Push this producer's remaining rows into RQ and remove them; False if any is left."""
        result = self.pusher.push(self.queue, rows, read_at=read_at)
        pushed = rows[: len(result.codes)]
        skipped = self.outbox.mark_skipped(self.queue, [(row.id, row.job_id) for row in pushed], result.codes)
        pushed = [row for row in pushed if row.id not in skipped]  # unique ones whose id Redis had: kept, skipped
        if pushed:
            self.outbox.mark_delivered([row.id for row in pushed], keep=False)
            parents.outbox_rows.pushed([(row.job_id, row.delivery) for row in pushed])  # in Redis by our hand
            settled = [(row.job_id, row.delivery) for row in pushed if not doubt.keeps_marker(row.options)]
            self.server.settler(self.pusher.layout).gone(settled)
        if not result.complete:
            self.push_failed(result, "this producer's spilled rows")
        return result.complete

    def push_failed(self, result: PushResult, what: str) -> None:
        """A push of this lane's rows did not complete; they stay for the replayer (or the next try)."""
        if result.refusal == LATE:
            self.pusher.clock.forget()  # Redis read it as late: its time is asked again before the next push
        elif result.outage:
            assert result.error is not None
            self.health.mark_down(result.error)
            self.pusher.clock.forget()  # the Redis that comes back may be another (a failover): ask its time
        elif result.error is not None:
            log.warning("pushing %s failed, leaving them to the replayer: %r", what, result.error)

    def server_failed(self, exc: redis.RedisError) -> None:
        """A call before the push (Redis's time) failed."""
        self.push_failed(PushResult(error=exc, sent=False), "this producer's rows")

    def acquire(self, redis_error: BaseException | None) -> None:
        """Take ``lock`` within the enqueue's time limit; OutboxUnavailable if another thread of this process
        holds it longer (waiting on the same stalled outbox)."""
        left = deadline.remaining()
        if self.lock.acquire(timeout=-1 if left is None else max(left, 0.0)):
            return
        raise OutboxUnavailable(
            "job not enqueued: Redis is unavailable and the outbox did not answer in time",
            redis_error=redis_error,
            outbox_error=OutboxTimeout(f"queue {self.queue!r}: another enqueue is still waiting on the outbox"),
        )

    def append(self, spilled: list[SpilledJob], redis_error: BaseException | None) -> None:
        """Write ``spilled`` to the outbox; OutboxUnavailable (with both errors) if that fails too."""
        try:
            self.outbox.append(spilled)
        except SQLAlchemyError as exc:
            if exc.__context__ is None:
                exc.__context__ = redis_error
            in_doubt = self.outbox.in_doubt(exc)
            if in_doubt:
                doubt.remember(spilled)
            raise OutboxUnavailable(
                "job may not be enqueued: Redis is unavailable and the outbox write did not answer"
                if in_doubt
                else "job not enqueued: Redis is unavailable and the outbox write failed",
                redis_error=redis_error,
                outbox_error=exc,
                in_doubt=in_doubt,
            ) from exc
        doubt.settled(spilled)


# -- shared per process -----------------------------------------------------------------

lock = threading.Lock()
_servers: dict[tuple[Any, ...], Server] = {}
_outboxes: dict[Any, Outbox] = {}
_lanes: dict[tuple[Any, ...], SpillLane] = {}


def _reset_after_fork() -> None:
    """A lock held by another thread at fork time would never be released in the child."""
    global lock
    lock = threading.Lock()
    for lane in _lanes.values():
        lane.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def server_for(connection: redis.Redis, timeout: float, probe_interval: float, layout: KeyLayout) -> Server:
    """One bounded client, breaker and clock per Redis server, shared by every Queue of the process."""
    key = (*server_key(connection), timeout)
    with lock:
        server = _servers.get(key)
        if server is None:
            server = _servers[key] = Server(bounded_client(connection, timeout), probe_interval, layout)
        return server


def resolve_outbox(outbox: OutboxLike) -> Outbox:
    """An Outbox object, shared per URL or Engine so the process keeps one connection pool."""
    if isinstance(outbox, Outbox):
        return outbox
    key: Any = outbox if outbox is not None else settings.database_url()
    with lock:
        found = _outboxes.get(key)
        if found is None:
            found = _outboxes[key] = Outbox(key)
        return found


def lane_for(kind: str, outbox: Outbox, server: Server, pusher: Pusher, target: str, queue: str) -> SpillLane:
    """The lane of ``kind`` ("plain" or "transaction") for this outbox's database, server, target and queue.

    Per database, not per Outbox object: two Outbox objects on one database share its rows.
    """
    key = (kind, outbox.engine.url, id(server), target, queue)
    with lock:
        found = _lanes.get(key)
        if found is None:
            found = _lanes[key] = SpillLane(outbox, server, pusher, target, queue)
        return found
