"""Who drains a queue: one lease row per target and queue in the outbox database.

Any number of replayers may run, each on any set of queues. A replayer drains a
queue only while it holds that queue's lease, so each queue is drained by one
replayer at a time (order), and different queues by different replayers at once.
A lease expires ``ttl`` seconds after its last renewal (by the database's clock, so
hosts with skewed clocks agree), so a standby takes a queue over within ``ttl``
seconds of its drainer dying or stalling. A stalled drainer that wakes up with a
batch in hand is harmless: each holding has an epoch (one above the last, kept when the
lease is given back), which the holder raises in Redis as the queue's fence before its
first batch; Redis refuses a raise below its fence and a batch carrying another epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, case, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from .pusher import Fence
from .schema import queue_lease


def db_now(conn: Connection) -> float:
    """Unix time by the database's clock."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    else:
        sql = "SELECT extract(epoch from clock_timestamp())"
    return float(conn.execute(text(sql)).scalar_one())


@dataclass(frozen=True)
class LeaseInfo:
    target: str
    queue: str
    holder: str
    expires_in: float


class QueueLease:
    """The lease on one target's queue, as seen by one would-be holder."""

    def __init__(self, engine: Engine, holder: str, ttl: float, target: str, queue: str) -> None:
        self.engine = engine
        self.holder = holder
        self.ttl = ttl
        self.target = target
        self.queue = queue
        self._renewed_at = -1e9
        self._mine = (queue_lease.c.target == target) & (queue_lease.c.queue == queue)
        #: This holder's epoch, from the outbox: raised with each new holder of the queue.
        self.epoch = 0
        #: The fence raised in Redis for this holding (None: raise it before the next batch).
        self.fence: Fence | None = None

    def epoch_above(self, fence: int) -> bool:
        """Take an epoch above ``fence`` (a fence Redis has that the outbox's epochs fell behind: a lease row
        deleted by an older release) if this holder still holds the lease; whether it does."""
        with self.engine.begin() as conn:
            now = db_now(conn)
            raised = conn.execute(
                update(queue_lease)
                .where(self._mine, queue_lease.c.holder == self.holder, queue_lease.c.expires_at >= now)
                .values(epoch=fence + 1)
            ).rowcount
        if raised:
            self.epoch, self.fence = fence + 1, None
        else:
            self._renewed_at = -1e9  # not ours any more: the next hold() asks the outbox
        return bool(raised)

    def fence_refused(self) -> None:
        """Redis refused our token: look at the lease in the outbox again, and raise the fence again if it is ours."""
        self.fence = None
        self._renewed_at = -1e9

    def hold(self) -> bool:
        """Still ours? Renews in the database only once a third of the TTL has passed.

        A holder that stalled past that (paused, swapped) renews before it goes on,
        and stops if a standby has taken over meanwhile.
        """
        if time.monotonic() - self._renewed_at < self.ttl / 3:
            return True
        return self.acquire()

    def acquire(self) -> bool:
        """Take or renew the lease; False while another live holder has it."""
        started = time.monotonic()
        if self._take():
            self._renewed_at = started
            return True
        self._renewed_at = -1e9
        return False

    def _take(self) -> bool:
        # A renewal keeps the epoch; a new holder (after expiry or release) raises it.
        epoch = case(
            (queue_lease.c.holder == self.holder, func.coalesce(queue_lease.c.epoch, 1)),
            else_=func.coalesce(queue_lease.c.epoch, 0) + 1,
        )
        with self.engine.begin() as conn:
            now = db_now(conn)
            taken = conn.execute(
                update(queue_lease)
                .where(self._mine, or_(queue_lease.c.holder == self.holder, queue_lease.c.expires_at < now))
                .values(holder=self.holder, expires_at=now + self.ttl, epoch=epoch)
                .returning(queue_lease.c.epoch)
            ).scalar()
        if taken is None:
            try:
                with self.engine.begin() as conn:
                    row = {"target": self.target, "queue": self.queue, "holder": self.holder, "epoch": 1}
                    conn.execute(insert(queue_lease).values(**row, expires_at=db_now(conn) + self.ttl))
            except IntegrityError:
                return False
            taken = 1
        if int(taken) != self.epoch:
            self.epoch, self.fence = int(taken), None  # a holding of its own: raise the fence again
        return True

    def release(self) -> None:
        """Give the lease back: it expires now. The row stays, with its epoch, so that epochs only grow."""
        self._renewed_at = -1e9
        with self.engine.begin() as conn:
            conn.execute(
                update(queue_lease).where(self._mine, queue_lease.c.holder == self.holder).values(expires_at=0)
            )


def live_leases(engine: Engine) -> list[LeaseInfo]:
    """Every unexpired lease: who drains which target's queue now."""
    with engine.begin() as conn:
        now = db_now(conn)
        query = select(queue_lease).where(queue_lease.c.expires_at >= now).order_by("target", "queue")
        return [LeaseInfo(r.target, r.queue, r.holder, float(r.expires_at) - now) for r in conn.execute(query)]
