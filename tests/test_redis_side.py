"""The bounded client keeps what the user's client says about the server, and drops its patience."""

from __future__ import annotations

import pytest
import redis
from redis.connection import SSLConnection, UnixDomainSocketConnection

from spillover import ConfigurationError, redis_from_url
from spillover.redis_side import bounded_client, is_outage, server_key

pytestmark = pytest.mark.rq_facing  # CI runs it under both RQ majors


def test_tls_and_unix_socket_clients_stay_tls_and_unix():
    tls = bounded_client(redis.Redis.from_url("rediss://:pw@cache.internal:6380/2?ssl_cert_reqs=required"), 0.5)
    pool = tls.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["host"] == "cache.internal" and pool.connection_kwargs["port"] == 6380
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["socket_timeout"] == 0.5
    unix = bounded_client(redis.Redis.from_url("unix:///run/redis.sock?db=1"), 0.5)
    assert unix.connection_pool.connection_class is UnixDomainSocketConnection


def test_the_bounded_client_never_retries():
    client = bounded_client(redis.Redis(), 0.25)
    connection = client.connection_pool.make_connection()
    assert connection.retry.get_retries() == 0
    assert connection.socket_timeout == 0.25 and connection.socket_connect_timeout == 0.25


def test_sentinel_urls():
    client = redis_from_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/mymaster/3")
    key = server_key(client)
    assert key[0] == "sentinel" and key[1] == "mymaster" and key[3] == 3
    assert key[2] == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    with pytest.raises(ConfigurationError):
        redis_from_url("redis+sentinel://10.0.0.1:26379")


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (redis.ConnectionError("refused"), True),
        (redis.TimeoutError("slow"), True),
        (redis.exceptions.BusyLoadingError("loading"), True),
        (redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."), True),
        (redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"), True),
        (redis.AuthenticationError("invalid password"), False),
        (redis.exceptions.NoPermissionError("NOPERM"), False),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), False),
    ],
)
def test_what_counts_as_an_outage(error, outage):
    assert is_outage(error) is outage


def test_rq_key_names_are_rqs():
    """The layout the replayer writes (without importing rq) is the installed rq's, key by key."""
    from rq.job import Job
    from rq.queue import Queue as RQQueue
    from rq.registry import DeferredJobRegistry, ScheduledJobRegistry

    from spillover.rq_keys import KeyLayout, environment_prefix

    keys = KeyLayout(environment_prefix())
    assert RQQueue.redis_queue_namespace_prefix == keys.queue_prefix
    assert RQQueue.redis_queues_keys == keys.queues
    assert Job.redis_job_namespace_prefix == keys.job_prefix
    assert ScheduledJobRegistry(queue=RQQueue("q", connection=redis.Redis())).key == keys.scheduled("q")
    assert DeferredJobRegistry(queue=RQQueue("q", connection=redis.Redis())).key == keys.deferred("q")
    try:
        from rq.group import Group
    except ImportError:  # pragma: no cover - RQ without groups
        return
    assert keys.group_prefix == Group.REDIS_GROUP_NAME_PREFIX and keys.groups == Group.REDIS_GROUP_KEY
    try:
        from rq.rate_limit import RateLimitRegistry
    except ImportError:  # RQ 2 has no rate limits
        return
    limit = RateLimitRegistry("k", connection=redis.Redis())
    assert limit.config_key == keys.rate_limit_prefix + "k" and RateLimitRegistry.rl_keys_key == keys.rate_limit_keys
