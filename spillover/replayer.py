"""The replayer: moves outbox rows into RQ, per queue in order, exactly once.

Exactly once rests on three things: a push (pusher.py) writes a job and its
delivery marker atomically and skips any delivery whose marker exists; a row
leaves the outbox only after Redis confirmed it (a crash between the two leaves a
pending row whose marker exists, which the next pass skips); and a push arrives in
time and from the queue's current lease holder or writes nothing at all (its
deadline counts from when its rows were read; its fencing token is the lease's
epoch, raised in Redis by each new holder). Once rows are deleted, their markers
are settled: they outlive every request that may carry them, and no longer.
Order rests on per-queue leases: one replayer drains a queue at a time, oldest
row first, and a row that fails stops its queue until it succeeds or is declared
dead. Different queues are drained by different replayers at once. A replayer
drains only the rows meant for its own Redis, under whatever spelling (targets.py),
and says so in the outbox (registry.py), so rows nobody drains are reported.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
from sqlalchemy.exc import SQLAlchemyError

from . import deadline, doubt, metrics, registry
from .endpoints import Heartbeat
from .errors import ReplayError
from .lease import QueueLease, live_leases
from .markers import Settler
from .outbox import Outbox, OutboxRow, PendingGroup
from .progress import Progress
from .pusher import DUPLICATE, EXISTS, FENCED, LATE, UNDECODABLE, Fence, Pusher
from .redis_side import is_outage, probe_write, resolve_target
from .rq_keys import DEFAULT_LAYOUT, KeyLayout, display_target, environment_prefix, split_target
from .schema import SKIPPED
from .targets import Group, TargetMatcher, setting_for
from .wakeup import CommitListener

log = logging.getLogger("spillover.replay")

#: Longest wait between write-probes while Redis is down: the drain starts this soon after it is back.
#: A probe of a server that refuses is a fraction of a millisecond, so probing often costs nothing.
REDIS_PROBE_CAP = 0.1
#: Seconds a skipped unique=True row is kept for ``status`` (at least; longer with --retention).
SKIPPED_KEEP = 7 * 86400.0


def within_bytes(rows: list[OutboxRow], limit: int) -> list[OutboxRow]:
    """The first rows whose job hashes add up to at most ``limit`` bytes (always the first row): one
    request stays well under Redis's limits (``proto-max-bulk-len``, the client query buffer), which
    it answers by closing the connection, as if it were down."""
    total = 0
    for n, row in enumerate(rows):
        total += len(row.job_hash)
        if total > limit and n > 0:
            return rows[:n]
    return rows


class RedisUnavailable(Exception):
    """Internal: stop draining and wait for Redis."""


@dataclass
class ReplayConfig:
    batch_size: int = 500
    batch_bytes: int = 8 * 1024 * 1024  # job-hash bytes per Redis call (a row larger than this goes alone)
    batch_time: float = 0.05  # seconds a batch's script should run at most: batches are sized by it
    poll_interval: float = 1.0
    marker_ttl: int = 7 * 24 * 3600  # the backstop: how long a marker lives while its row is in the outbox
    delivery_window: float = 30.0  # how long a push may take to arrive, and a settled marker lives
    retention: float = 0.0  # seconds to keep replayed rows; 0 deletes them at once
    max_attempts: int = 3
    lease_ttl: float = 10.0
    outbox_timeout: float = 5.0  # each outbox call's bound (at most half the lease): a stalled one is cut
    queues: list[str] = field(default_factory=list)  # empty: every queue in the outbox
    target: str | None = None  # None: SPILLOVER_TARGET, else derived from the Redis client
    adopt_untargeted: bool = True  # drain rows with no target (0.1 producers, 0.1 schema)
    redis_url: str = ""  # as shown to operators (password masked), in the registry


#: A request at least this big (job-hash bytes) that Redis answers by closing the connection, while it takes
#: a probe write at once, is taken as too large for Redis, not as an outage.
CLOSED_ON_REQUEST_MIN = 512 * 1024
#: Why a row Redis closes the connection on is failed (and dead after --max-attempts).
TOO_LARGE = (
    "redis closed the connection on this row's request while answering others: the job is larger than "
    "redis accepts in one request (proto-max-bulk-len, client-query-buffer-limit)"
)

#: Rows nobody drains for longer than this are warned about, at most once per this many seconds.
UNCLAIMED_WARN_AFTER = 60.0
#: Seconds between looks for rows that nobody drains (the gauge's freshness).
UNCLAIMED_CHECK_INTERVAL = 10.0


@dataclass
class ReplayStats:
    replayed: int = 0
    duplicates: int = 0
    skipped: int = 0  # unique=True rows whose job id was in Redis already
    dead: int = 0


class Replayer:
    def __init__(self, outbox: Outbox, client: redis.Redis, config: ReplayConfig | None = None) -> None:
        self.outbox = outbox
        self.client = client
        self.config = config or ReplayConfig()
        metrics.register_replayer()
        self.holder = f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.target = resolve_target(self.config.target, client)
        # Rows with no target are adopted only once the registry shows no replayer of another Redis.
        self.matcher = TargetMatcher(self.target, adopt_untargeted=False)
        metrics.REDIS_UP.labels(str(display_target(self.target))).set(float("nan"))  # not probed yet
        self._busy: list[Group] = []  # groups another replayer was draining at our last pass
        # Leases of the groups this replayer drains, kept from pass to pass while the group has rows:
        # a queue that producers keep filling is drained without taking its lease again each time.
        self._held: dict[Group, QueueLease] = {}
        self._batch_rows: dict[Group, int] = {}  # per queue: rows per batch, sized by the script's run time
        #: How a drain goes, for whoever watches (spillover-replay --once shows it; the service logs only).
        self.progress: Progress = Progress()
        self._untargeted_queues: set[str] = set()  # queues with rows that have no target
        self._claims: set[registry.Claim] = set()  # the targeted row groups it drained at its last look
        self._pending: tuple[float, list[PendingGroup]] = (-1e9, [])  # the last pass's look at the outbox
        self._registered_at = -1e9
        self._unclaimed_checked_at = -1e9
        self._unclaimed_warned_at = -1e9
        self._foreign_reported: set[str | None] = set()  # other targets whose rows we have logged once
        # Per RQ key prefix (the rows carry theirs): its pusher and settler, on one clock.
        self.pusher = Pusher(client, backstop=self.config.marker_ttl, window=self.config.delivery_window)
        self.settler = Settler(self.pusher)
        self._by_layout: dict[KeyLayout, tuple[Pusher, Settler]] = {DEFAULT_LAYOUT: (self.pusher, self.settler)}
        # The health probe writes under the prefix of this process's RQ_KEY_PREFIX (a cluster node owns its slot).
        self._probe_key = KeyLayout(environment_prefix()).probe
        self.stats = ReplayStats()
        self.stopping = threading.Event()
        self._redis_up: bool | None = None
        self._purged_at = 0.0
        self._retry_pending = False  # a row failed this pass and will be tried again
        self._commits = CommitListener(outbox.engine)  # idle waits end when rows are committed
        # /healthz: the loop beats at least every poll interval and every batch
        self.heartbeat = Heartbeat(limit=max(30.0, 3 * self.config.poll_interval))

    # -- entry points ---------------------------------------------------------------

    def _bounded_calls(self) -> contextlib.AbstractContextManager[None]:
        """Each outbox call cut after ``outbox_timeout`` (at most a third of the lease): a stalled database
        keeps this replayer less than its lease, a call and its one retry on a fresh connection included."""
        return deadline.per_checkout(min(self.config.outbox_timeout, self.config.lease_ttl / 3))

    def run(self) -> None:
        """Drain until ``stopping`` is set; wait out Redis and outbox outages with capped backoff."""
        with self._bounded_calls():
            self._run()

    def _run(self) -> None:
        self.outbox.check_schema()  # an outbox that never worked is a configuration error: say so, exit
        redis_wait = outbox_wait = 0.05
        try:
            while not self.stopping.is_set():
                self.heartbeat.beat()
                try:
                    self._keep_registered()
                    if not self._redis_healthy():
                        self.stopping.wait(redis_wait)
                        redis_wait = min(redis_wait * 2, REDIS_PROBE_CAP)
                        continue
                    redis_wait = 0.05
                    moved = self.drain()
                    self._purge_retained()
                    outbox_wait = 0.05
                except RedisUnavailable:
                    continue
                except SQLAlchemyError as exc:
                    # The outbox database restarted or is unreachable: what is in Redis is
                    # marked, what is not is still pending there; try again shortly.
                    log.warning("outbox unavailable (%s); retrying in %.1f s", _one_line(exc), outbox_wait)
                    self._give_up_leases()
                    self.stopping.wait(outbox_wait)
                    outbox_wait = min(outbox_wait * 2, 5.0)
                    continue
                if not moved:
                    self._idle()
        finally:
            self._commits.close()
            self.release_leases()
            self._unregister()
            self._flush_settlers()

    def _idle(self) -> None:
        """Wait ``poll_interval``, or until a commit wakes us; staying in the registry all the while."""
        until = time.monotonic() + self.config.poll_interval
        while not self.stopping.is_set():
            left = until - time.monotonic()
            if left <= 0 or self._commits.wait(min(left, registry.RENEW_INTERVAL), self.stopping):
                return
            self._keep_registered()

    def run_once(self, lease_wait: float | None = None) -> ReplayStats:
        """Drain everything pending and return; ReplayError if Redis or a queue's lease is not to be had."""
        with self._bounded_calls():
            return self._run_once(lease_wait)

    def _run_once(self, lease_wait: float | None) -> ReplayStats:
        self.outbox.check_schema()
        if not self._redis_healthy():
            raise ReplayError("redis is unreachable; nothing replayed")
        deadline = time.monotonic() + (2 * self.config.lease_ttl if lease_wait is None else lease_wait)
        try:
            self._keep_registered()
            while True:
                moved = self.drain()
                if self._retry_pending:
                    time.sleep(min(self.config.poll_interval, 1.0))  # do not hammer a failing row
                elif not moved and not self._busy:
                    break
                elif not moved:  # only queues another replayer drains are left: wait for it
                    if time.monotonic() > deadline:
                        holders = {
                            (lease.target, lease.queue): lease.holder for lease in live_leases(self.outbox.engine)
                        }
                        busy = [
                            f"{g.queue} by {holders.get((g.lease_name, g.queue), '?')}"
                            for g in sorted(self._busy, key=lambda g: (g.queue, g.lease_name))
                        ]
                        raise ReplayError(f"queues still being drained by another replayer: {', '.join(busy)}")
                    time.sleep(0.2)
        except RedisUnavailable as exc:
            raise ReplayError(f"redis became unavailable during replay: {exc}") from exc
        finally:
            self.release_leases()
            self._unregister()
            self._flush_settlers()
        self._purge_retained()
        return self.stats

    # -- draining -------------------------------------------------------------------

    def drain(self) -> int:
        """One pass over this replayer's row groups; rows moved (delivered or dead).

        A group is a target's queue (and, for a loopback or socket target, one host's rows).
        Groups are taken in random order, each under its own lease, so replayers
        started together spread over the queues instead of queueing for the same one.
        A lease is given back once its group has no rows left.
        """
        self._retry_pending = False
        self._busy = []
        groups = self._groups_with_rows()
        for idle in set(self._held) - set(groups):
            self._release(self._held.pop(idle))
        order = list(groups)
        random.shuffle(order)
        moved = 0
        for group in order:
            if self.stopping.is_set():
                break
            if group.target is not None and group.queue in self._untargeted_queues:
                # A producer of this release that started before the migration wrote its first rows
                # without a target: those go first, so that its rows keep their order.
                self._busy.append(group)
                continue
            lease = self._held.pop(group, None)
            if lease is None:
                lease = QueueLease(
                    self.outbox.engine, self.holder, self.config.lease_ttl, group.lease_name, group.queue
                )
                if not lease.acquire():
                    self._busy.append(group)
                    continue
            elif not lease.hold():
                continue  # stalled past the TTL, and another replayer has taken the queue over
            self._held[group] = lease
            self._export_leases()
            moved += self.drain_group(group, lease, groups[group])
        return moved

    def _export_leases(self) -> None:
        metrics.set_leases([(str(display_target(group.lease_name)), group.queue) for group in self._held])

    def _give_up_leases(self) -> None:
        """Forget the leases held (the outbox cannot be asked to release them: they expire): each queue
        is taken again, with a new fence if another replayer held it meanwhile."""
        self._held.clear()
        self._export_leases()

    def release_leases(self) -> None:
        """Give back every queue lease (on the way out; they would expire by themselves)."""
        while self._held:
            self._release(self._held.popitem()[1])

    def _groups_with_rows(self) -> dict[Group, int]:
        """This replayer's row groups with pending rows, and how many; other Redis servers' rows are logged once."""
        mine, foreign = self._see_pending()
        for target, queues in foreign.items():
            if target in self._foreign_reported:
                continue
            self._foreign_reported.add(target)
            if target is None:
                log.warning(
                    "%d pending row(s) in queue(s) %s have no target (0.1 producers) and a replayer of another Redis "
                    "runs on this outbox: left until one replayer is alone on it (or --adopt-untargeted elsewhere)",
                    sum(queues.values()),
                    ", ".join(sorted(queues)),
                )
            else:
                log.warning(
                    "%d pending row(s) in queue(s) %s are meant for redis %r, not this replayer's %r: "
                    "left for a replayer of that target (--target / SPILLOVER_TARGET)",
                    sum(queues.values()),
                    ", ".join(sorted(queues)),
                    display_target(target),
                    self.target,
                )
        return {group: count for group, count in mine.items() if self._drains(group)}

    def _drains(self, group: Group) -> bool:
        return not self.config.queues or group.queue in self.config.queues

    def _see_pending(self) -> tuple[dict[Group, int], dict[str | None, dict[str, int]]]:
        """Read the pending row groups; sort them into this replayer's and others'; note what it claims."""
        pending = self.outbox.pending_groups(by_host=self.matcher.host_local)
        self._pending = (time.monotonic(), pending)
        adopting = self.matcher.adopt_untargeted
        self._untargeted_queues = {queue for target, queue, *_ in pending if target is None} if adopting else set()
        mine, foreign = self._classify(pending)
        # Rows with no target are claimed by _own_claims, as adoption stands at each renewal.
        self._claims = {
            (group.target, group.host, group.queue if self.config.queues else None)
            for group in mine
            if self._drains(group) and group.target is not None
        }
        return mine, foreign

    def _own_claims(self) -> set[registry.Claim]:
        """This replayer's own target (on this host, if host-local), on its queues; rows with no target if adopting."""
        host = self.matcher.host if self.matcher.host_local(self.target) else None
        queues: list[str | None] = list(self.config.queues) or [None]
        claims: set[registry.Claim] = {(self.target, host, queue) for queue in queues}
        if self.matcher.adopt_untargeted:
            claims |= {(None, None, queue) for queue in queues}
        return claims

    def _classify(self, pending: list[PendingGroup]) -> tuple[dict[Group, int], dict[str | None, dict[str, int]]]:
        """Pending rows split into this replayer's groups (rows per group) and other targets' (rows per queue)."""
        mine: dict[Group, int] = {}
        foreign: dict[str | None, dict[str, int]] = {}
        for target, queue, host, count in pending:
            group = self.matcher.group(target, queue, host)
            if group is None:
                queues = foreign.setdefault(target, {})
                queues[queue] = queues.get(queue, 0) + count
            else:
                mine[group] = mine.get(group, 0) + count
        return mine, foreign

    def drain_group(self, group: Group, lease: QueueLease, left: int) -> int:
        """Replay ``group`` oldest row first while holding its ``lease``; rows moved (delivered or dead).

        While Redis runs the script for one batch, the replayer removes the
        previous batch from the outbox and reads the next one.
        """
        if not left:
            return 0
        queue = group.queue
        spelled = display_target(group.lease_name)
        spelled = "" if spelled == self.target else f" (rows of {spelled})"
        log.info("draining queue %s: %d left%s", queue, left, spelled)
        self.progress.started(queue, left)
        started, moved = time.monotonic(), 0
        confirmed: list[OutboxRow] = []  # in Redis, not yet removed from the outbox
        pusher, settler = self._keys_of(group)

        isolating = 0  # batches left to push a row at a time (after a batch the script could not decode)

        def fetch(exclude: list[int] | None = None) -> tuple[list[OutboxRow], float]:
            """The next rows, and Redis's time before they were read: their push's deadline counts from it."""
            read_at = self._redis_time()
            limit = 1 if isolating else self._batch_rows.get(group, self.config.batch_size)
            found = self.outbox.fetch_pending(group.target, queue, limit, exclude or (), group.host)
            return within_bytes(found, self.config.batch_bytes), read_at

        rows, read_at = fetch()
        try:
            while rows and not self.stopping.is_set():
                isolating = max(isolating - 1, 0)  # this batch (of one row, if isolating) is one of them
                self.heartbeat.beat()
                self.progress.advanced(queue, moved, max(left - moved, len(rows)))
                self._keep_registered()  # a long drain must not look like a replayer that is gone
                if group.target is None and not self.matcher.adopt_untargeted:
                    break  # a replayer of another Redis has appeared: rows with no target are no longer ours
                if not lease.hold():
                    log.warning("lost the lease of queue %s to another replayer; leaving it", queue)
                    break
                fence = self._fence(group, lease, pusher)
                if fence is None:
                    log.warning("queue %s: a newer holder has raised its fence; leaving it", queue)
                    break
                good = list(itertools.takewhile(lambda row: self._unreplayable(row) is None, rows))
                push = pusher.start(queue, good, read_at=read_at, fence=fence) if good else None
                try:
                    self._confirm(confirmed, settler)
                    upcoming = fetch(exclude=[row.id for row in rows])
                except BaseException:
                    if push is not None:
                        push.abandon()  # its outcome stays unknown: the markers settle it next pass
                    raise
                if push is not None:
                    result = push.result()
                    if result.ran_us is not None:
                        self._resize(group, len(good), result.ran_us)
                    if result.refusal is not None:
                        metrics.REFUSED.labels(result.refusal.lower()).inc()
                    if result.refusal == FENCED:
                        log.warning("queue %s: redis refused this replayer's fencing token; checking its lease", queue)
                        lease.fence_refused()
                        break
                    if result.refusal == LATE:
                        log.warning("queue %s: a batch reached redis after its deadline; reading it again", queue)
                        self.pusher.clock.forget()
                        rows, read_at = fetch()
                        continue
                    if result.refusal == UNDECODABLE:  # a corrupt row: find it, a row at a time, in order
                        self._confirm(confirmed, settler)
                        if len(good) == 1:
                            self._kill(good[0], "its stored job hash is not MessagePack: a corrupt outbox row")
                            moved += 1
                        else:
                            log.warning("queue %s: a row of this batch cannot be decoded; pushing it row by row", queue)
                            isolating = len(good)
                        rows, read_at = fetch()
                        continue
                    confirmed = self._skip_existing(queue, good, result.codes)
                    moved += len(result.codes)
                    self._count(queue, result.codes)
                    if result.error is not None:
                        if self._closed_on_request(result.error, good[len(result.codes) :]):
                            # not an outage: Redis dropped this request (over its limits) and answers others
                            self._confirm(confirmed, settler)
                            unsent = good[len(result.codes) :]
                            if len(unsent) > 1:
                                log.warning("queue %s: redis closed the connection on a batch; row by row", queue)
                                isolating = len(unsent)
                            elif not self._failed(unsent[0], TOO_LARGE):
                                break  # the queue waits for this row: order first
                            else:
                                moved += 1
                            rows, read_at = fetch()
                            continue
                        if result.outage or not result.row_error:
                            raise self._redis_failed(result.error)
                        self._confirm(confirmed, settler)
                        if not self._failed(good[len(result.codes)], str(result.error)):
                            break  # the queue waits for this row: order first
                        moved += 1
                        rows, read_at = fetch()
                        continue
                if len(good) < len(rows):
                    bad = rows[len(good)]
                    self._confirm(confirmed, settler)
                    self._kill(bad, str(self._unreplayable(bad)))
                    moved += 1
                    upcoming = fetch()  # the rows after it, excluded above
                rows, read_at = upcoming
        finally:
            self._confirm(confirmed, settler)
            self.progress.finished(queue, moved, complete=not rows)
        if not rows:
            log.info("drained queue %s: %d rows in %.2f s", queue, moved, time.monotonic() - started)
        return moved

    def _redis_time(self) -> float:
        try:
            return self.pusher.clock.now_ms()
        except redis.RedisError as exc:
            raise self._redis_failed(exc) from exc

    def _keys_of(self, group: Group) -> tuple[Pusher, Settler]:
        """The pusher and settler for the RQ key prefix ``group``'s rows carry in their target."""
        layout = DEFAULT_LAYOUT if group.target is None else split_target(group.target)[1]
        found = self._by_layout.get(layout)
        if found is None:
            config = self.config
            pusher = Pusher(
                self.client,
                backstop=config.marker_ttl,
                window=config.delivery_window,
                clock=self.pusher.clock,
                layout=layout,
            )
            found = self._by_layout[layout] = (pusher, Settler(pusher))
        return found

    def _flush_settlers(self) -> None:
        for _, settler in self._by_layout.values():
            settler.flush()

    def _skip_existing(self, queue: str, rows: list[OutboxRow], codes: list[int]) -> list[OutboxRow]:
        """The rows the push processed, less unique ones whose id Redis had (kept as skipped, counted)."""
        processed = rows[: len(codes)]
        skipped = self.outbox.mark_skipped(queue, [(row.id, row.job_id) for row in processed], codes)
        self.stats.skipped += len(skipped)
        return [row for row in processed if row.id not in skipped] if skipped else processed

    def _fence(self, group: Group, lease: QueueLease, pusher: Pusher) -> Fence | None:
        """The fence of this holding of ``group``'s lease, raised in Redis before its first batch; None if
        Redis has a newer one and the outbox says the lease is no longer ours."""
        try:
            while lease.fence is None:
                lease.fence, fence = pusher.raise_fence(group.lease_name, group.queue, lease.epoch)
                if lease.fence is None and not lease.epoch_above(fence):
                    return None
        except redis.RedisError as exc:
            raise self._redis_failed(exc) from exc
        return lease.fence

    def _resize(self, group: Group, sent: int, ran_us: int) -> None:
        """Size ``group``'s next batches so the script runs about ``batch_time``: Redis serves nobody else
        meanwhile, and past its busy threshold answers BUSY to every client (producers would spill)."""
        target_us = self.config.batch_time * 1_000_000
        size = self._batch_rows.get(group, self.config.batch_size)
        if ran_us > target_us and sent > 1:
            size = max(1, int(sent * target_us / ran_us))
            log.debug("queue %s: a batch of %d rows ran %.1f ms; %d rows next", group.queue, sent, ran_us / 1000, size)
        elif sent >= size and ran_us < target_us / 2:
            size = min(self.config.batch_size, size * 2)
        self._batch_rows[group] = size

    def _closed_on_request(self, exc: BaseException, rows: list[OutboxRow]) -> bool:
        """Whether Redis closed the connection on this request but takes a write at once on a new one: the
        request is what it refuses (larger than ``proto-max-bulk-len`` or ``client-query-buffer-limit``),
        not an outage. Only for requests bigger than any probe (a blip on a small batch stays an outage)."""
        refused = isinstance(exc, redis.ConnectionError) or (
            isinstance(exc, redis.ResponseError) and str(exc).startswith("Protocol error")  # then it closes
        )
        if not refused or sum(len(row.job_hash) for row in rows) < CLOSED_ON_REQUEST_MIN:
            return False
        try:
            probe_write(self.client, self._probe_key)
        except redis.RedisError:
            return False
        return True

    def _redis_failed(self, exc: BaseException) -> BaseException:
        if not is_outage(exc):
            return exc
        self._set_redis_up(False, exc)
        return RedisUnavailable(str(exc))

    def _confirm(self, rows: list[OutboxRow], settler: Settler) -> None:
        """Remove rows Redis has confirmed from the outbox (or keep them as done), then settle their markers."""
        if rows:
            self.outbox.mark_delivered([row.id for row in rows], keep=self.config.retention > 0)
            settler.gone([(row.job_id, row.delivery) for row in rows if not doubt.keeps_marker(row.options)])
            rows.clear()

    def _count(self, queue: str, codes: list[int]) -> None:
        duplicates, skipped = codes.count(DUPLICATE), codes.count(EXISTS)
        self.stats.duplicates += duplicates
        self.stats.replayed += len(codes) - duplicates - skipped
        metrics.DUPLICATES.labels(queue).inc(duplicates)
        metrics.REPLAYED.labels(queue).inc(len(codes) - duplicates - skipped)
        if duplicates:
            log.info("queue %s: %d job(s) already in redis, not pushed again", queue, duplicates)

    def _failed(self, row: OutboxRow, error: str) -> bool:
        """Count a non-transient failure of ``row``; True if it is now dead (the queue may go on)."""
        if self.outbox.record_failure(row.id, error, self.config.max_attempts):
            self.stats.dead += 1
            metrics.KILLED.labels(row.queue).inc()
            log.error("row %d (job %s) is dead after %d attempts: %s", row.id, row.job_id, row.attempts + 1, error)
            return True
        log.warning("row %d (job %s) failed (attempt %d): %s", row.id, row.job_id, row.attempts + 1, error)
        self._retry_pending = True
        return False

    def _kill(self, row: OutboxRow, problem: str) -> None:
        self.outbox.mark_dead(row.id, problem)
        self.stats.dead += 1
        metrics.KILLED.labels(row.queue).inc()
        log.error("row %d (job %s) is dead: %s", row.id, row.job_id, problem)

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
            probe_write(self.client, self._probe_key)
            if self._redis_up is not True:
                # A Redis that is new, restarted or failed over may lack the script: load it with a
                # small command of its own, not learn it from a batch call whose reply may be lost.
                self.pusher.load()
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            self._set_redis_up(False, exc)
            return False
        self._set_redis_up(True)
        return True

    def _set_redis_up(self, up: bool, reason: object = None) -> None:
        metrics.REDIS_UP.labels(str(display_target(self.target))).set(1 if up else 0)
        if up and self._redis_up is not True:
            log.info("redis healthy; replaying")
        elif not up and self._redis_up is not False:
            log.warning("redis unavailable (%s); waiting for it", reason)
            self.pusher.clock.forget()  # the Redis that comes back may be another (a failover): ask its time
        self._redis_up = up

    def _purge_retained(self) -> None:
        if time.monotonic() - self._purged_at > 60:
            self._purged_at = time.monotonic()
            if self.config.retention > 0:
                purged = self.outbox.purge_done(self.config.retention)
                if purged:
                    log.info("purged %d replayed rows older than %.0f s", purged, self.config.retention)
            keep = max(self.config.retention, SKIPPED_KEEP)
            purged = self.outbox.purge_done(keep, state=SKIPPED)
            if purged:
                log.info("purged %d skipped unique rows older than %.0f s", purged, keep)

    def _keep_registered(self) -> None:
        """Every few seconds: renew this replayer's registry row, decide whether to adopt rows with no
        target (only while no replayer of another Redis runs on this outbox), report rows nobody drains."""
        if time.monotonic() - self._registered_at < registry.RENEW_INTERVAL:
            return
        self._registered_at = time.monotonic()
        engine = self.outbox.engine
        others = [r for r in registry.live(engine) if r.holder != self.holder]
        self.matcher.adopt_untargeted = self.config.adopt_untargeted and all(self._same_redis(r) for r in others)
        if time.monotonic() - self._pending[0] > UNCLAIMED_CHECK_INTERVAL:  # no pass lately (Redis down): look
            self._see_pending()
        claims = self._claims | self._own_claims()
        mine = sorted(claims, key=str)
        registry.renew(engine, self.holder, self.target, self.matcher.host, self.config.redis_url, mine)
        if time.monotonic() - self._unclaimed_checked_at >= UNCLAIMED_CHECK_INTERVAL:
            self._unclaimed_checked_at = time.monotonic()
            self._report_unclaimed(set().union(claims, *(r.claims for r in others)))

    def _same_redis(self, other: registry.Replayer) -> bool:
        if not self.matcher.same_server(other.target):
            return False
        return other.host == self.matcher.host or not self.matcher.host_local(other.target)

    def _report_unclaimed(self, claims: set[registry.Claim]) -> None:
        """Rows that no running replayer drains: a gauge, and a warning a minute while they are over a minute old."""
        pending = self._pending[1]
        stranded = registry.unclaimed(pending, claims)
        by_name: dict[str, int] = {}
        for u in stranded:  # a Redis's rows of 0.4 ("tests") and of this release ("tests#rq") under one name
            name = str(display_target(u.group.lease_name))
            by_name[name] = by_name.get(name, 0) + u.rows
        metrics.set_unclaimed(self.outbox.identity, by_name)
        if not stranded or time.monotonic() - self._unclaimed_warned_at < UNCLAIMED_WARN_AFTER:
            return
        old = [
            u for u in registry.with_ages(stranded, self.outbox.oldest_age) if u.oldest_seconds > UNCLAIMED_WARN_AFTER
        ]
        if old:
            self._unclaimed_warned_at = time.monotonic()
        for u in old:
            log.warning(
                "%d pending row(s) of target %s (queues %s, oldest %.0f s) are drained by no running replayer: "
                "start %s",
                u.rows,
                display_target(u.group.lease_name),
                ", ".join(u.queues),
                u.oldest_seconds,
                setting_for(u.group),
            )

    def _unregister(self) -> None:
        try:
            registry.remove(self.outbox.engine, self.holder)
        except Exception as exc:  # the row goes stale by itself
            log.warning("could not remove this replayer from the registry: %r", exc)

    def ready(self) -> bool:
        """The outbox answers with the schema this replayer needs (for /readyz)."""
        self.outbox.check_schema()
        return True

    def _release(self, lease: QueueLease) -> None:
        self._export_leases()
        try:
            lease.release()
        except Exception as exc:  # the lease expires by itself; say why it was not released
            log.warning("could not release the lease of queue %s: %r", lease.queue, exc)


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
