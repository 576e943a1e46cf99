"""Which replayers are running, and which row groups each drains.

Each replayer renews its row every few seconds with the groups (target, and host for
host-local targets) it counts as its own. Pending rows that no live replayer claims
are stranded: a producer spelled its Redis in a way no replayer recognises, or no
replayer runs for that Redis or on that host. Those are reported (``spillover status``,
``spillover_unclaimed_rows``, a warning every minute) with the setting that would drain them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select, update

from .lease import db_now
from .outbox import PendingGroup
from .schema import replayer_registry
from .targets import Group, is_host_local_name

#: Seconds between a replayer's renewals of its row.
RENEW_INTERVAL = 5.0
#: A row not renewed for this long is a replayer that is gone.
STALE_AFTER = 30.0

Claim = tuple[str | None, str | None]  # (target, host or None for every host)


@dataclass(frozen=True)
class Unclaimed:
    group: Group  # its queue is the first of its queues, for naming
    rows: int
    oldest_seconds: float
    queues: tuple[str, ...]


def claims_of(groups: list[Group]) -> list[Claim]:
    return sorted({(g.target, g.host) for g in groups}, key=lambda c: (c[0] or "", c[1] or ""))


def renew(engine: Engine, holder: str, target: str, host: str, redis_url: str, claims: list[Claim]) -> None:
    values = {"target": target, "host": host, "redis_url": redis_url[:255], "claims": json.dumps(claims)}
    with engine.begin() as conn:
        now = db_now(conn)
        updated = conn.execute(
            update(replayer_registry).where(replayer_registry.c.holder == holder).values(**values, seen_at=now)
        ).rowcount
        if not updated:
            conn.execute(insert(replayer_registry).values(holder=holder, **values, seen_at=now))


def remove(engine: Engine, holder: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(replayer_registry).where(replayer_registry.c.holder == holder))


def live_claims(engine: Engine) -> list[tuple[str, str, set[Claim]]]:
    """(holder, target, claims) of every replayer renewed within STALE_AFTER seconds."""
    with engine.begin() as conn:
        since = db_now(conn) - STALE_AFTER
        rows = conn.execute(
            select(replayer_registry.c.holder, replayer_registry.c.target, replayer_registry.c.claims).where(
                replayer_registry.c.seen_at >= since
            )
        ).all()
    return [(holder, target, {(c[0], c[1]) for c in json.loads(claims)}) for holder, target, claims in rows]


def unclaimed(pending: list[PendingGroup], claimed: set[Claim]) -> list[Unclaimed]:
    """Pending rows per (target, host-local host) that no claim covers, oldest first."""
    found: dict[tuple[str | None, str | None], list[tuple[str, int, float]]] = {}
    for target, queue, host, rows, oldest in pending:
        if (target, None) in claimed or (target, host) in claimed:
            continue
        local = target is not None and is_host_local_name(target)
        found.setdefault((target, host if local else None), []).append((queue, rows, oldest))
    report = []
    for (target, only_host), entries in found.items():
        queues = tuple(sorted(q for q, _, _ in entries))
        group = Group(target, queues[0], only_host)
        report.append(Unclaimed(group, sum(n for _, n, _ in entries), max(a for _, _, a in entries), queues))
    return sorted(report, key=lambda u: -u.oldest_seconds)
