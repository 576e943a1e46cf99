"""Every write spillover makes into RQ: ``Pusher.push(queue, rows) -> PushResult``.

A push is one call of ``lua/push.lua``. It carries, per row, the row's delivery id (one per
enqueue: the direct write, the spilled row and every replay of it share it), and for the
call a deadline in Redis's own time and, from a replayer, the fencing token of its queue
lease. Redis refuses the whole call, writing nothing, when it arrives after the deadline or
with a token older than the queue's fence; otherwise it skips every row whose delivery
marker exists and writes the others with their markers. A marker lives for the backstop
(``SPILLOVER_MARKER_TTL``) while its row may still be sent again, and once the row is gone
it is settled: kept only until every request that may carry it is past its deadline.

Deadlines come from Redis ``TIME`` (``RedisClock``), never from this host's clock alone, and
count from when the rows were read: a request is created at most one window after its rows
were read, and settling happens after the row is deleted, so a marker always outlives every
request that carries it.

The callers (the direct path, a producer pushing its own rows, the transactional push, the
replayer) read one ``PushResult`` with one outage classification (redis_side.is_outage).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Protocol

import redis
from redis.exceptions import NoScriptError, ResponseError

from . import settings
from .redis_side import is_ambiguous, is_outage
from .rq_keys import DEFAULT_LAYOUT, KeyLayout
from .stored_job import msgpack_array_header, msgpack_str

# What the push script says it did with each row: DUPLICATE, its delivery is in Redis already;
# EXISTS, a unique=True job whose id Redis has (nothing written); RATE_LIMITED, waiting for a
# slot of its rate limit (RQ 3).
DUPLICATE, QUEUED, DEFERRED, SCHEDULED, EXISTS, RATE_LIMITED = 0, 1, 2, 3, 4, 5
# Why it wrote nothing at all: past its deadline, an older lease holder's, a row's bytes not MessagePack.
LATE, FENCED, UNDECODABLE = "LATE", "FENCED", "UNDECODABLE"

#: Seconds after which the clock asks Redis again even if no push told it the time meanwhile.
CLOCK_RELEARN = 300.0


@functools.cache
def load_script(name: str) -> str:
    return resources.files("spillover").joinpath("lua", name).read_text(encoding="utf-8")


class PushItem(Protocol):
    """What a push needs of a stored job (an outbox row has it all)."""

    @property
    def job_id(self) -> str: ...
    @property
    def delivery(self) -> str | None: ...
    @property
    def job_hash(self) -> bytes: ...
    @property
    def at_front(self) -> bool: ...
    @property
    def scheduled_at(self) -> int | None: ...
    @property
    def options(self) -> str | None: ...


@dataclass(frozen=True)
class Fence:
    """A lease holder's fencing token for one target's queue, as raised in Redis."""

    key: str
    token: int


@dataclass
class PushResult:
    """What one push did: a code per row it processed, and what stopped it, if anything.

    ``refusal`` (LATE, FENCED): Redis wrote nothing, and nothing is wrong with the rows.
    ``error``: a reply error of the first row not processed (the rows before it are written),
    or the error of the call itself (then ``codes`` is empty and, if ``ambiguous``, the call
    may have been applied all the same).
    """

    codes: list[int] = field(default_factory=list)
    error: BaseException | None = None
    refusal: str | None = None
    row_error: bool = False  # ``error`` is the reply of row ``len(codes)``, not of the call
    sent: bool = True  # False: it failed before the call was sent (no connection, Redis's time not known)
    ran_us: int | None = None  # how long the script ran, by Redis's clock (None: it did not run its rows)

    @property
    def complete(self) -> bool:
        return self.error is None and self.refusal is None

    @property
    def outage(self) -> bool:
        """Redis cannot take writes now: spill, or wait for it."""
        return self.error is not None and is_outage(self.error)

    @property
    def ambiguous(self) -> bool:
        """The call may have been applied although no reply says so (a lost or late reply)."""
        return self.error is not None and self.sent and not self.row_error and is_ambiguous(self.error)


class RedisClock:
    """Redis's time in ms, as this process can bound it from below.

    Learned from Redis (``TIME``, and the time each push reply carries) against the local
    monotonic clock: a host whose wall clock is minutes off still computes deadlines Redis
    agrees with. An estimate is never later than Redis's real time (the reply arrives after
    Redis read its clock), so a deadline counted from it is never later than it should be.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._offset: float | None = None
        self._learned_at = -1e9

    def learn(self, redis_ms: float) -> None:
        """Redis's time (ms) when it ran a command whose reply has just arrived."""
        now = time.monotonic()
        self._offset, self._learned_at = redis_ms - now * 1000.0, now

    def forget(self) -> None:
        """Ask Redis again before the next estimate (a push was refused as late: Redis's clock may have jumped)."""
        self._offset = None

    def now_ms(self) -> float:
        """Redis's time now (ms), at most the round trip of the last look behind it; asks Redis if it must."""
        if self._offset is None or time.monotonic() - self._learned_at > CLOCK_RELEARN:
            seconds, micros = self.client.time()
            self.learn(seconds * 1000.0 + micros // 1000)
        assert self._offset is not None
        return time.monotonic() * 1000.0 + self._offset


class _Script:
    """One Lua script on one client, run by its SHA (computed here: no round trip to learn it)."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.source = load_script(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def load(self) -> None:
        self.client.script_load(self.source)

    def __call__(self, key: str, *args: Any) -> Any:
        """Run with ``key`` declared (a cluster client routes the call to its slot's node)."""
        try:
            return self.client.evalsha(self.sha, 1, key, *args)
        except NoScriptError:  # a new or restarted Redis: it ran nothing; load, run again
            self.load()
            return self.client.evalsha(self.sha, 1, key, *args)


class Pusher:
    """The push, settle and fence scripts on one (bounded) client of one Redis server."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        backstop: float,
        window: float,
        clock: RedisClock | None = None,
        layout: KeyLayout = DEFAULT_LAYOUT,
    ) -> None:
        self.client = client
        self.layout = layout
        self._rate_us = 0
        self.clock = clock or RedisClock(client)
        self.backstop_ms = max(1, int(backstop * 1000))
        self.window_ms = max(1, int(window * 1000))
        self.trace_ms = max(1, settings.push_trace_ttl() * 1000)
        self._push = _Script(client, "push.lua")
        self._settle = _Script(client, "settle.lua")
        self._fence = _Script(client, "fence.lua")

    def load(self) -> None:
        """Make sure the server has the push script (a Redis that is new, restarted or failed over may lack it)."""
        self._push.load()

    def push(
        self,
        queue: str,
        rows: Sequence[PushItem],
        *,
        read_at: float | None = None,
        fence: Fence | None = None,
        from_outbox: bool = True,
    ) -> PushResult:
        return self.start(queue, rows, read_at=read_at, fence=fence, from_outbox=from_outbox).result()

    def start(
        self,
        queue: str,
        rows: Sequence[PushItem],
        *,
        read_at: float | None = None,
        fence: Fence | None = None,
        from_outbox: bool = True,
    ) -> PendingPush:
        """Send a push and return at once (``result()`` reads the reply), so the caller can work meanwhile.

        ``read_at``: ``clock.now_ms()`` taken before ``rows`` were read from the outbox (default: now);
        the deadline counts from it. ``from_outbox``: the rows are outbox rows (a direct write's are not),
        whose pushes leave a trace for their dependents (``KeyLayout.pushed_prefix``).
        """
        try:
            deadline = (self.clock.now_ms() if read_at is None else read_at) + self.window_ms
        except redis.RedisError as exc:
            return PendingPush(self, None, [], PushResult(error=exc, sent=False))
        keys = self.layout
        wall = time.time()  # what RQ stamps from the client's clock: rate-limit scores and enqueued_at
        # Rate-limited rows wait in order of their scores (µs): this process's pushes never go back in
        # time (the script adds 1 µs per such row to the score it is given).
        score = self._rate_us = max(int(wall * 1_000_000), self._rate_us + len(rows))
        args: list[Any] = [
            keys.queue(queue),
            keys.queues,
            keys.job_prefix,
            keys.scheduled(queue),
            keys.deferred(queue),
            keys.marker_prefix,
            keys.legacy_marker_prefix,
            self.backstop_ms,
            int(deadline),
            fence.key if fence else "",
            fence.token if fence else "",
            self.window_ms,
            keys.rate_limit_prefix,
            keys.rate_limit_keys,
            keys.group_prefix,
            keys.groups,
            score,
            rq_timestamp(wall),
            pack_rows(rows),
            keys.pushed_prefix,
            str(self.trace_ms) if from_outbox else "0",
        ]
        return self._send(args)

    def _send(self, args: list[Any]) -> PendingPush:
        pool = self.client.connection_pool
        try:
            conn: Any = pool.get_connection()
        except redis.RedisError as exc:
            return PendingPush(self, None, args, PushResult(error=exc, sent=False))
        try:
            # The queue key declared too (a cluster client routes by it)
            conn.send_packed_command([resp_command(b"EVALSHA", self._push.sha, 1, args[0], *args)])
        except redis.RedisError as exc:
            conn.disconnect()
            pool.release(conn)
            return PendingPush(self, None, args, PushResult(error=exc))
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return PendingPush(self, conn, args)

    def settle(self, items: Sequence[tuple[str, str | None]], *, at_once: bool = False) -> int:
        """Markers of (job id, delivery id) whose rows are gone: kept one window more, or (``at_once``,
        a direct write whose reply came back: no other request carries it) deleted now. How many were found."""
        keys = self.layout
        args: list[Any] = [keys.marker_prefix, keys.legacy_marker_prefix, 0 if at_once else self.window_ms]
        for job_id, delivery in items:
            args += [job_id, delivery or ""]
        return int(self._settle(keys.queues, *args))  # any key of the prefix's slot routes it

    def raise_fence(self, name: str, queue: str, epoch: int) -> tuple[Fence | None, int]:
        """Make ``epoch`` the only token whose pushes ``name``'s ``queue`` takes from now on.

        Returns (the fence, epoch), or (None, the fence Redis has) when that is not below ``epoch``:
        an older holding's raise, refused.
        """
        key = f"{self.layout.fence_prefix}{name}:{queue}"
        raised, token = self._fence(key, key, epoch, self.backstop_ms)
        return (Fence(key, int(token)) if raised else None), int(token)


class PendingPush:
    """A push in flight on one connection (or one that failed before it was sent)."""

    def __init__(self, pusher: Pusher, conn: Any, args: list[Any], failed: PushResult | None = None) -> None:
        self.pusher, self.conn, self.args, self.failed = pusher, conn, args, failed

    def abandon(self) -> None:
        """Drop the call without reading its reply (the connection cannot be reused)."""
        if self.conn is not None:
            self.conn.disconnect()
            self.pusher.client.connection_pool.release(self.conn)
            self.conn = None

    def result(self) -> PushResult:
        """Read the reply. Redis errors are returned in the result, never raised."""
        if self.failed is not None or self.conn is None:
            return self.failed or PushResult(error=redis.ConnectionError("push abandoned"))
        pool = self.pusher.client.connection_pool
        conn, self.conn = self.conn, None
        try:
            reply = conn.read_response()
        except NoScriptError:  # a new or restarted Redis without the script: it ran nothing; load, resend
            pool.release(conn)
            try:
                self.pusher.load()
            except redis.RedisError as exc:
                return PushResult(error=exc, sent=False)  # NOSCRIPT: nothing ran
            return self.pusher._send(self.args).result()
        except redis.RedisError as exc:
            conn.disconnect()
            pool.release(conn)
            return PushResult(error=exc)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        pool.release(conn)
        self.pusher.clock.learn(float(reply[3]))
        if reply[2]:
            return PushResult(refusal=reply[2].decode())
        codes = [int(code) for code in reply[0].decode()]
        failure = reply[1].decode("utf-8", "replace") if reply[1] else None
        ran_us = int(reply[5]) if len(reply) > 5 else None
        if failure is None:
            return PushResult(codes, ran_us=ran_us)
        return PushResult(codes, ResponseError(failure), row_error=reply[4] != b"1", ran_us=ran_us)


def rq_timestamp(wall: float) -> str:
    """``wall`` as RQ's ``utcformat`` writes timestamps (enqueued_at of a job promoted by its rate limit)."""
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def resp_command(*args: bytes | str | int) -> bytes:
    """A command as the Redis protocol sends it: what redis-py's packer makes of these arguments, built
    directly (its general packer is a tenth of a healthy enqueue's time, measured)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else (b"%d" % arg if isinstance(arg, int) else arg)
        parts += [b"$%d\r\n" % len(raw), raw, b"\r\n"]
    return b"".join(parts)


def pack_rows(rows: Sequence[PushItem]) -> bytes:
    """One MessagePack array of {job_id, delivery, at_front, scheduled_at, stored job hash, options} arrays."""
    parts = [msgpack_array_header(len(rows))]
    for row in rows:
        scheduled = b"" if row.scheduled_at is None else str(row.scheduled_at).encode()
        delivery = (row.delivery or "").encode()
        parts += [_ROW_HEADER, msgpack_str(row.job_id.encode()), msgpack_str(delivery)]
        parts += [_FRONT if row.at_front else _BACK, msgpack_str(scheduled), row.job_hash]
        parts.append(msgpack_str(row.options.encode()) if row.options else _NO_OPTIONS)
    return b"".join(parts)


_ROW_HEADER = msgpack_array_header(6)
_NO_OPTIONS = msgpack_str(b"")
_FRONT, _BACK = msgpack_str(b"1"), msgpack_str(b"0")
