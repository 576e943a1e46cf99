"""Who may drain the outbox: a lease row in the outbox database.

Any number of replayers may run; the one holding the lease drains, the others
wait. The lease expires ``ttl`` seconds after its last renewal (by the
database's clock, so hosts with skewed clocks agree), so a standby takes over
within ``ttl`` seconds of the holder dying.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from .schema import lease

REPLAY_LEASE = "replay"


def db_now(conn: Connection) -> float:
    """Unix time by the database's clock."""
    if conn.dialect.name == "sqlite":
        sql = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    else:
        sql = "SELECT extract(epoch from clock_timestamp())"
    return float(conn.execute(text(sql)).scalar_one())


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    expires_in: float


class Lease:
    def __init__(self, engine: Engine, holder: str, ttl: float, name: str = REPLAY_LEASE) -> None:
        self.engine = engine
        self.holder = holder
        self.ttl = ttl
        self.name = name
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
        with self.engine.begin() as conn:
            now = db_now(conn)
            taken = conn.execute(
                update(lease)
                .where(lease.c.name == self.name, or_(lease.c.holder == self.holder, lease.c.expires_at < now))
                .values(holder=self.holder, expires_at=now + self.ttl)
            ).rowcount
        if taken:
            return True
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(lease).values(name=self.name, holder=self.holder, expires_at=db_now(conn) + self.ttl)
                )
        except IntegrityError:
            return False
        return True

    def release(self) -> None:
        self._renewed_at = -1e9
        with self.engine.begin() as conn:
            conn.execute(delete(lease).where(lease.c.name == self.name, lease.c.holder == self.holder))

    def current(self) -> LeaseInfo | None:
        """The live holder, if any."""
        with self.engine.begin() as conn:
            row = conn.execute(select(lease.c.holder, lease.c.expires_at).where(lease.c.name == self.name)).first()
            if row is None:
                return None
            expires_in = float(row.expires_at) - db_now(conn)
        return LeaseInfo(row.holder, expires_in) if expires_in > 0 else None
