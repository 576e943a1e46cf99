"""The Redis side: bounded clients, what counts as an outage, and the replay script.

Knows nothing of SQL. Every write spillover makes into RQ, direct or replayed,
is one call of the replay script: it checks the job's delivery marker
(``spillover:delivered:<job id>``) first and writes the job and its marker only
if there is none, so a second delivery of a job, in whatever order, writes nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    MaxConnectionsError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from . import settings
from .errors import ConfigurationError
from .settings import MARKER_PREFIX, PROBE_KEY, redact
from .stored_job import msgpack_array_header, msgpack_str
from .targets import qualified_host

# RQ's key names (rq 2.x; tests/test_redis_side.py checks them against rq). Spelled out here
# so the replayer does not import rq at all: it never needs RQ's code, only its key layout.
RQ_QUEUE_PREFIX = "rq:queue:"
RQ_QUEUES_KEY = "rq:queues"
RQ_JOB_PREFIX = "rq:job:"
RQ_SCHEDULED_KEY = "rq:scheduled:{0}"
RQ_DEFERRED_KEY = "rq:deferred:{0}"

# Replies that mean "this server cannot take writes right now", not "you asked wrong".
_UNAVAILABLE_REPLIES = ("LOADING", "OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY ")
_NOT_AN_OUTAGE = (AuthenticationError, AuthorizationError, MaxConnectionsError)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means Redis is unavailable (spill), False for everything else (raise).

    Misconfiguration (bad password, missing permission, exhausted pool) is not an outage.
    """
    if isinstance(exc, _NOT_AN_OUTAGE):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, BusyLoadingError, OutOfMemoryError, ReadOnlyError)):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).upper().startswith(_UNAVAILABLE_REPLIES)
    return False


def is_ambiguous(exc: BaseException) -> bool:
    """True when a write may have been applied although it raised (lost or late reply)."""
    return isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(exc, BusyLoadingError)


def bounded_client(connection: redis.Redis, timeout: float) -> redis.Redis:
    """A client for the same server as ``connection`` that never retries and never waits long.

    A default redis-py client retries writes (re-sending them on timeouts: duplicates)
    and waits up to 5 s per attempt; spillover must not inherit either.
    """
    pool = connection.connection_pool
    bounds: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "retry_on_error": [],
    }
    if isinstance(pool, SentinelConnectionPool):
        # Same service through the same sentinels: follows the master across a failover.
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in ("connection_pool", "is_master")}
        return pool.sentinel_manager.master_for(pool.service_name, **{**kwargs, **bounds})  # type: ignore[no-any-return]
    kwargs = {**pool.connection_kwargs, **bounds}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


def server_key(connection: redis.Redis) -> tuple[Any, ...]:
    """What identifies the Redis a client talks to (a Sentinel service counts as one server)."""
    pool = connection.connection_pool
    kwargs = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        sentinels = tuple(
            (s.connection_pool.connection_kwargs.get("host"), s.connection_pool.connection_kwargs.get("port"))
            for s in pool.sentinel_manager.sentinels
        )
        return ("sentinel", pool.service_name, sentinels, kwargs.get("db", 0), kwargs.get("username"))
    return (
        pool.connection_class,
        kwargs.get("host"),
        kwargs.get("port"),
        kwargs.get("path"),
        kwargs.get("db", 0),
        kwargs.get("username"),
    )


#: Longest target name the outbox column takes.
TARGET_MAX_LENGTH = 255


def target_of(connection: redis.Redis) -> str:
    """The Redis a client writes to, as outbox rows record it.

    ``host:port/db`` (the host as written, lower-cased, a short name with this host's
    DNS search domain), ``unix:/absolute/path/db``, or ``sentinel:service/db``. Other
    spellings of the same server are matched by the replayer (targets.py).
    """
    pool = connection.connection_pool
    kwargs = pool.connection_kwargs
    db = kwargs.get("db") or 0
    if isinstance(pool, SentinelConnectionPool):
        return f"sentinel:{pool.service_name}/{db}"
    if kwargs.get("path"):
        return f"unix:{os.path.abspath(kwargs['path'])}/{db}"
    host = qualified_host(str(kwargs.get("host") or "localhost").lower())
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{kwargs.get('port') or 6379}/{db}"


def resolve_target(explicit: str | None, connection: redis.Redis) -> str:
    """The target name to use: given, else ``SPILLOVER_TARGET``, else derived from the connection."""
    name = explicit or settings.target() or target_of(connection)
    if not name.strip() or len(name) > TARGET_MAX_LENGTH:
        raise ConfigurationError(f"a target name must be 1 to {TARGET_MAX_LENGTH} characters: {name!r}")
    return name


def default_target() -> str:
    """The target a replayer with default settings uses (SPILLOVER_TARGET, else SPILLOVER_REDIS_URL's)."""
    return resolve_target(None, redis_from_url(settings.redis_url()))


def redis_from_url(url: str, **kwargs: Any) -> redis.Redis:
    """``redis.Redis.from_url``, plus ``redis+sentinel://[[user]:password@]host:port[,host:port]/service[/db]``."""
    parsed = urlsplit(url)
    if not parsed.scheme.endswith("+sentinel"):
        try:
            return redis.Redis.from_url(url, **kwargs)
        except ValueError as exc:
            raise ConfigurationError(
                f"cannot use Redis URL {redact(url)!r} ({exc}); "
                "give redis://, rediss://, unix:// or redis+sentinel://host:port/service"
            ) from None
    hosts = []
    for item in parsed.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host or item, int(port) if host else 26379))
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ConfigurationError(f"sentinel URL needs a service name: {redact(url)}")
    auth = {
        "username": unquote(parsed.username) if parsed.username else None,
        "password": unquote(parsed.password) if parsed.password else None,
    }
    if parsed.scheme.startswith("rediss"):
        kwargs["ssl"] = True
    sentinel = Sentinel(hosts, sentinel_kwargs={k: v for k, v in auth.items() if v}, **auth, **kwargs)  # type: ignore[no-untyped-call]
    master: redis.Redis = sentinel.master_for(parts[0], db=int(parts[1]) if len(parts) > 1 else 0)  # type: ignore[no-untyped-call]
    return master


def client_from_url(url: str, timeout: float) -> redis.Redis:
    return bounded_client(redis_from_url(url), timeout)


def probe_write(client: redis.Redis) -> None:
    """A write, because PING succeeds on a read-only replica and during OOM."""
    client.set(PROBE_KEY, b"1", px=60_000)


@functools.cache
def load_script(name: str) -> str:
    return resources.files("spillover").joinpath("lua", name).read_text(encoding="utf-8")


# What the replay script says it did with each row.
DUPLICATE, QUEUED, DEFERRED, SCHEDULED = 0, 1, 2, 3


class ReplayScript:
    """The replay Lua script on one client: one call pushes a whole batch.

    ``start`` sends the call and returns at once, so the caller can do its
    database work while Redis runs the script; ``PendingPush.result`` reads the reply.
    """

    def __init__(self, client: redis.Redis, marker_ttl: int) -> None:
        self.client = client
        self.marker_ttl = marker_ttl
        self.source = load_script("replay.lua")
        # Known without asking Redis, so a new Queue object costs no round trip; a server that
        # does not have the script yet answers NOSCRIPT, runs nothing, and gets it loaded.
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def load(self) -> None:
        """Make sure the server has the script (SCRIPT LOAD)."""
        self.client.script_load(self.source)

    def start(self, queue_name: str, rows: Sequence[ReplayItem]) -> PendingPush:
        args: list[Any] = [
            RQ_QUEUE_PREFIX + queue_name,
            RQ_QUEUES_KEY,
            RQ_JOB_PREFIX,
            RQ_SCHEDULED_KEY.format(queue_name),
            RQ_DEFERRED_KEY.format(queue_name),
            MARKER_PREFIX,
            self.marker_ttl,
            pack_rows(rows),
        ]
        return self._send(args)

    def _send(self, args: list[Any]) -> PendingPush:
        pool = self.client.connection_pool
        conn: Any = pool.get_connection()
        try:
            conn.send_command("EVALSHA", self.sha, 0, *args)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return PendingPush(self, conn, args)


class PendingPush:
    """A replay call in flight on one connection."""

    def __init__(self, script: ReplayScript, conn: Any, args: list[Any]) -> None:
        self.script, self.conn, self.args = script, conn, args

    def abandon(self) -> None:
        """Drop the call without reading its reply (the connection cannot be reused)."""
        self.conn.disconnect()
        self.script.client.connection_pool.release(self.conn)

    def result(self) -> tuple[list[int], str | None]:
        """Codes per processed row (see replay.lua) and the error that stopped the batch, if any."""
        pool = self.script.client.connection_pool
        try:
            reply = self.conn.read_response()
        except NoScriptError:  # a new or restarted Redis without the script: it ran nothing; load, resend
            pool.release(self.conn)
            self.script.load()
            return self.script._send(self.args).result()
        except BaseException:
            self.conn.disconnect()
            pool.release(self.conn)
            raise
        pool.release(self.conn)
        codes = [int(code) for code in reply[0].decode()]
        error = reply[1].decode("utf-8", "replace") if len(reply) > 1 else None
        return codes, error


def pack_rows(rows: Sequence[ReplayItem]) -> bytes:
    """One MessagePack array of {job_id, at_front, scheduled_at, stored job hash} arrays."""
    parts = [msgpack_array_header(len(rows))]
    for row in rows:
        scheduled = b"" if row.scheduled_at is None else str(row.scheduled_at).encode()
        parts += [_ROW_HEADER, msgpack_str(row.job_id.encode()), _FRONT if row.at_front else _BACK]
        parts += [msgpack_str(scheduled), row.job_hash]  # the stored hash is a MessagePack array already
    return b"".join(parts)


_ROW_HEADER = msgpack_array_header(4)
_FRONT, _BACK = msgpack_str(b"1"), msgpack_str(b"0")


class ReplayItem(Protocol):
    """What the replay script needs of a stored job (an outbox row has it all)."""

    @property
    def job_id(self) -> str: ...
    @property
    def job_hash(self) -> bytes: ...
    @property
    def at_front(self) -> bool: ...
    @property
    def scheduled_at(self) -> int | None: ...
