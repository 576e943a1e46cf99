"""Prometheus metrics, producer and replayer side, in the default registry.

Applications that already serve ``/metrics`` get the producer counters for free;
``spillover-replay --metrics-port`` serves the replayer's (see ``endpoints.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from .targets import UNTARGETED

# -- producers -------------------------------------------------------------------------

ENQUEUED = Counter("spillover_enqueued", "Jobs enqueued, by the way they went.", ["queue", "path"])
ENQUEUE_SECONDS = Histogram(
    "spillover_enqueue_seconds",
    "Time an enqueue took, by the way it went (deciding, and writing to Redis or the outbox).",
    ["path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DIRECT, SPILLED, TRANSACTION = "direct", "spilled", "transaction"
COMMITTED_PUSHED = Counter(
    "spillover_committed_pushed",
    "Jobs enqueued within a transaction that the producer pushed into RQ at commit (the rest the replayer moves).",
    ["queue"],
)
ENQUEUE_FAILED = Counter(
    "spillover_enqueue_failed",
    "Jobs NOT enqueued: the enqueue raised (Redis unusable and the outbox full, unavailable or not migrated).",
    ["queue", "reason"],
)
BACKLOG_FULL, OUTBOX_UNAVAILABLE, OUTBOX_NOT_MIGRATED = "backlog_full", "outbox_unavailable", "outbox_not_migrated"
#: OutboxUnavailable with in_doubt: the row may be stored (and then delivered); counted apart.
OUTBOX_IN_DOUBT = "outbox_in_doubt"
FAILURE_REASONS = (BACKLOG_FULL, OUTBOX_UNAVAILABLE, OUTBOX_IN_DOUBT, OUTBOX_NOT_MIGRATED)
PRODUCER_REDIS_UP = Gauge(
    "spillover_producer_redis_up",
    "1 while this producer process takes its Redis server for healthy, 0 while its breaker is open (Redis down).",
    ["server"],
    multiprocess_mode="livemin",  # prometheus_client's multiprocess mode (gunicorn): live workers only
)

# -- replayer --------------------------------------------------------------------------

REPLAYED = Counter("spillover_replayed", "Outbox rows pushed into RQ.", ["queue"])
DUPLICATES = Counter(
    "spillover_duplicates_suppressed", "Outbox rows found already in Redis by their marker.", ["queue"]
)
KILLED = Counter("spillover_dead_marked", "Outbox rows the replayer gave up on.", ["queue"])
UNIQUE_SKIPPED = Counter(
    "spillover_unique_skipped",
    "unique=True outbox rows not enqueued because their job id was in Redis at replay (kept as skipped rows).",
    ["queue"],
)
REFUSED = Counter(
    "spillover_pushes_refused",
    "Pushes Redis refused whole: after their deadline, or from an older lease holder.",
    ["reason"],
)
# Gauges only a replayer exports (a producer importing this module must not: "no replayer running"
# is told by their absence); registered by register_replayer().
REDIS_UP = Gauge(
    "spillover_redis_up",
    "1 when the replayer's write-probe to its Redis (target) succeeds, 0 when it fails (NaN before the first).",
    ["target"],
    registry=None,
)
LEASE_HELD = Gauge(
    "spillover_lease_held", "Queue leases this replayer holds now (the queues it is draining).", registry=None
)
LEASE_HOLDER = Gauge(
    "spillover_lease_holder",
    "1 for each queue whose lease this replayer holds now (which replayer drains which queue).",
    ["target", "queue"],
    registry=None,
)
UNCLAIMED = Gauge(
    "spillover_unclaimed_rows",
    "Pending rows that no running replayer drains (a target no replayer recognises, or no replayer on its host).",
    ["outbox", "target"],
    registry=None,
)
_REPLAYER_ONLY = (REDIS_UP, LEASE_HELD, LEASE_HOLDER, UNCLAIMED)


def register_replayer() -> None:
    """Export the replayer's own gauges from this process (idempotent)."""
    for gauge in _REPLAYER_ONLY:
        with contextlib.suppress(ValueError):  # registered already
            REGISTRY.register(gauge)


def set_leases(held: list[tuple[str, str]]) -> None:
    """The (target, queue) leases this replayer holds now."""
    LEASE_HELD.set(len(held))
    LEASE_HOLDER.clear()
    for target, queue in held:
        LEASE_HOLDER.labels(target, queue).set(1)


def set_unclaimed(outbox: str, rows_by_target: dict[str, int]) -> None:
    UNCLAIMED.clear()
    for target, rows in rows_by_target.items():
        UNCLAIMED.labels(outbox, target).set(rows)


#: ``outbox`` names the table the figures come from: every replayer of one outbox exports the same
#: figures (take max per outbox), and per-host outboxes of one Redis add up (then sum over outboxes).
LABELS = ["outbox", "target", "queue"]


class BacklogCollector(Collector):
    """Backlog rows, age of the oldest row and dead rows per target and queue, read from the outbox at scrape time.

    Cached for ``max_age`` seconds so frequent scrapes do not load the database.
    """

    def __init__(self, stats: Callable[[], list[dict[str, Any]]], outbox: str, max_age: float = 5.0) -> None:
        self._stats = stats
        self._outbox = outbox
        self._max_age = max_age
        self._cached: list[dict[str, Any]] = []
        self._read_at = -1e9

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if time.monotonic() - self._read_at > self._max_age:
            self._cached = self._stats()
            self._read_at = time.monotonic()
        rows = GaugeMetricFamily("spillover_backlog_rows", "Pending outbox rows.", labels=LABELS)
        oldest = GaugeMetricFamily("spillover_backlog_oldest_seconds", "Age of the oldest pending row.", labels=LABELS)
        dead = GaugeMetricFamily("spillover_dead_rows", "Outbox rows marked dead.", labels=LABELS)
        for entry in self._cached:
            labels = [self._outbox, entry["target"] or UNTARGETED, entry["queue"]]
            rows.add_metric(labels, entry["pending"])
            oldest.add_metric(labels, entry["oldest_age_s"] or 0.0)
            dead.add_metric(labels, entry["dead"])
        yield from (rows, oldest, dead)


def register_backlog(stats: Callable[[], list[dict[str, Any]]], outbox: str) -> BacklogCollector:
    collector = BacklogCollector(stats, outbox)
    REGISTRY.register(collector)
    return collector
