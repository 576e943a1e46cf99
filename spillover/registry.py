"""Which replayers are running, and which row groups each drains.

Each replayer renews its row every few seconds with the groups (target, and host for
host-local targets) it counts as its own. Pending rows that no live replayer claims
are stranded: a producer spelled its Redis in a way no replayer recognises, or no
replayer runs for that Redis or on that host. Those are reported (``spillover status``,
``spillover_unclaimed_rows``, a warning every minute) with the setting that would drain them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select, update

from .lease import db_now
from .outbox import PendingGroup
from .rq_keys import server_part
from .schema import replayer_registry
from .targets import Group

#: Seconds between a replayer's renewals of its row.
RENEW_INTERVAL = 5.0
#: A row not renewed for this long is a replayer that is gone.
STALE_AFTER = 30.0

#: (target, host or None for every host, queue or None for every queue); target None: rows with no target.
Claim = tuple[str | None, str | None, str | None]


@dataclass(frozen=True)
class Unclaimed:
    group: Group  # its target and host; its queue is the first of ``queues``
    rows: int
    oldest_seconds: float
    queues: tuple[str, ...]


def covers(claims: set[Claim], target: str | None, queue: str, host: str) -> bool:
    """Whether a claim covers pending rows of ``target``'s ``queue`` from ``host`` ("": rows not split by host).

    A replayer claims its Redis: the rows of every key prefix stored with that name (``tests#rq``) too.
    """
    server = None if target is None else server_part(target)
    return any(
        t in (target, server) and (h is None or h == host or not host) and (q is None or q == queue)
        for t, h, q in claims
    )


def renew(engine: Engine, holder: str, target: str, host: str, redis_url: str, claims: list[Claim]) -> None:
    values = {"target": target, "host": host, "redis_url": redis_url[:255], "claims": json.dumps(claims)}
    with engine.begin() as conn:
        now = db_now(conn)
        updated = conn.execute(
            update(replayer_registry).where(replayer_registry.c.holder == holder).values(**values, seen_at=now)
        ).rowcount
        if not updated:
            conn.execute(insert(replayer_registry).values(holder=holder, **values, seen_at=now))
        # Rows of replayers gone for a day (killed, never removed): nobody reads them any more.
        conn.execute(delete(replayer_registry).where(replayer_registry.c.seen_at < now - 86400))


def remove(engine: Engine, holder: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(replayer_registry).where(replayer_registry.c.holder == holder))


@dataclass(frozen=True)
class Replayer:
    holder: str
    target: str
    host: str
    redis_url: str
    claims: frozenset[Claim]


def live(engine: Engine) -> list[Replayer]:
    """Every replayer renewed within STALE_AFTER seconds."""
    table = replayer_registry
    with engine.begin() as conn:
        now = db_now(conn)
        rows = conn.execute(
            select(table.c.holder, table.c.target, table.c.host, table.c.redis_url, table.c.claims)
            .where(table.c.seen_at >= now - STALE_AFTER)
            .order_by(table.c.holder)
        ).all()
    return [
        Replayer(holder, target, host, url, frozenset((c[0], c[1], c[2]) for c in json.loads(claims)))
        for holder, target, host, url, claims in rows
    ]


def unclaimed(pending: list[PendingGroup], claims: set[Claim]) -> list[Unclaimed]:
    """Pending rows per target (and host, for rows split by host) that no claim covers, most rows first.

    ``oldest_seconds`` is left 0: the caller asks the outbox for the ages it reports (one indexed read each).
    """
    found: dict[tuple[str | None, str | None], list[tuple[str, int]]] = {}
    for target, queue, host, rows in pending:
        if not covers(claims, target, queue, host):
            found.setdefault((target, host or None), []).append((queue, rows))
    report = []
    for (target, only_host), entries in found.items():
        queues = tuple(sorted(q for q, _ in entries))
        report.append(Unclaimed(Group(target, queues[0], only_host), sum(n for _, n in entries), 0.0, queues))
    return sorted(report, key=lambda u: -u.rows)


def with_ages(stranded: list[Unclaimed], oldest_age: Callable[[str | None, str, str | None], float]) -> list[Unclaimed]:
    """The same, with the age of each one's oldest row (over its queues)."""
    return [
        Unclaimed(u.group, u.rows, max(oldest_age(u.group.target, q, u.group.host) for q in u.queues), u.queues)
        for u in stranded
    ]
