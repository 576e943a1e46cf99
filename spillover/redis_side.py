"""The Redis side: bounded clients, what counts as an outage, and the replay script.

Knows nothing of SQL. Every write spillover makes to Redis leaves a delivery
marker (``spillover:delivered:<job id>``) in the same MULTI or Lua call, so a
write whose reply was lost can be recognised later and never pushed twice.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    MaxConnectionsError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.retry import Retry

from .settings import MARKER_PREFIX

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
    kwargs: dict[str, Any] = dict(pool.connection_kwargs)
    kwargs.update(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        retry_on_error=[],
    )
    bounded_pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=bounded_pool)


def client_from_url(url: str, timeout: float) -> redis.Redis:
    return bounded_client(redis.Redis.from_url(url), timeout)


def marker_key(job_id: str) -> str:
    return f"{MARKER_PREFIX}{job_id}"


def probe_write(client: redis.Redis) -> None:
    """A write, because PING succeeds on a read-only replica and during OOM."""
    from .settings import PROBE_KEY

    client.set(PROBE_KEY, b"1", px=60_000)


def load_script(name: str) -> str:
    return resources.files("spillover").joinpath("lua", name).read_text(encoding="utf-8")


__all__ = [
    "RedisError",
    "bounded_client",
    "client_from_url",
    "is_ambiguous",
    "is_outage",
    "load_script",
    "marker_key",
    "probe_write",
]
