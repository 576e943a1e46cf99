"""The Redis side: bounded clients, what counts as an outage, and which Redis a client names.

Knows nothing of SQL. The writes into RQ themselves are in pusher.py.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from . import settings
from .errors import ConfigurationError
from .rq_keys import DEFAULT_LAYOUT, TARGET_PREFIX_SEPARATOR
from .settings import redact
from .targets import qualified_host

# Replies that mean "this server cannot take writes right now", not "you asked wrong": loading its
# data, out of memory, a replica, cut off from its master, a failed RDB save with
# stop-writes-on-bgsave-error (MISCONF), too few replicas for min-replicas-to-write, a busy script.
_UNAVAILABLE_REPLIES = (
    "LOADING",
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "MISCONF",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "BUSY ",
)
_NOT_AN_OUTAGE = (AuthenticationError, AuthorizationError, MaxConnectionsError)
# A cluster node that no longer serves the slot (MOVED, ASK: a failover moved it), or a cluster that
# cannot serve it now. redis-py raises these as classes of their own, without the reply's first word.
_CLUSTER_UNAVAILABLE = (MovedError, AskError, ClusterDownError, TryAgainError)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means Redis is unavailable (spill), False for everything else (raise).

    Misconfiguration (bad password, missing permission, exhausted pool) is not an outage.
    """
    if isinstance(exc, _NOT_AN_OUTAGE):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, BusyLoadingError, OutOfMemoryError, ReadOnlyError)):
        return True
    if isinstance(exc, _CLUSTER_UNAVAILABLE):
        return True
    if isinstance(exc, ResponseError):
        return is_outage_reply(str(exc))
    return False


def is_outage_reply(text: str) -> bool:
    """An error reply (as text, e.g. from inside a script) that means Redis cannot take writes now."""
    return text.lstrip().upper().startswith(_UNAVAILABLE_REPLIES)


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
    if TARGET_PREFIX_SEPARATOR in name:  # stored targets carry RQ's key prefix after it (rq_keys.stored_target)
        raise ConfigurationError(f"a target name cannot contain {TARGET_PREFIX_SEPARATOR!r}: {name!r}")
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


def probe_write(client: redis.Redis, key: str = DEFAULT_LAYOUT.probe) -> None:
    """A write, because PING succeeds on a read-only replica and during OOM (``key``: under RQ's prefix)."""
    client.set(key, b"1", px=60_000)
