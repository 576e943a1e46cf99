"""Defaults and the environment variables behind them, in one place.

Every knob has an environment variable so that a producer (which has no command
line) and the replayer read the same configuration.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigurationError
from .rq_keys import DEFAULT_LAYOUT

DEFAULT_DATABASE_URL = "sqlite:///spillover.db"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"

#: Seconds a producer waits on Redis (connect and reply) before it spills.
DEFAULT_REDIS_TIMEOUT = 0.5
#: Seconds between background write-probes while Redis is marked down.
DEFAULT_PROBE_INTERVAL = 0.25
#: Seconds a delivery marker lives while its row is still in the outbox (the backstop): bounds how
#: late an ambiguous job may replay. Once the row is gone its marker lives only the delivery window.
DEFAULT_MARKER_TTL = 7 * 24 * 3600
#: Seconds the trace of a replayed row's push lives (88 bytes each): while it does, a child replayed after
#: its parent finished and expired knows the parent was pushed (RQ's "done"), not still in an outbox.
DEFAULT_PUSH_TRACE_TTL = 3600
#: Seconds a request into Redis may take to arrive (its deadline, checked by Redis) and so how long a
#: marker outlives its row.
DEFAULT_DELIVERY_WINDOW = 30.0
#: Pending rows the outbox may hold before enqueue raises BacklogFull (0: no bound).
DEFAULT_MAX_BACKLOG = 1_000_000
#: Seconds an enqueue may spend on the outbox database in all (connect, lock waits, the INSERT, the
#: commit's read-back) before it raises OutboxUnavailable; also each replayer call's bound.
DEFAULT_OUTBOX_TIMEOUT = 5.0
#: Seconds an upgrade waits for another upgrade of the same outbox (and for a table lock) before failing.
DEFAULT_UPGRADE_LOCK_WAIT = 600.0

# Spillover's keys under RQ's default prefix (rq_keys.KeyLayout names them for any prefix):
#: Delivery markers: one per enqueue (its delivery id), while that delivery is in doubt.
MARKER_PREFIX = DEFAULT_LAYOUT.marker_prefix
#: Markers of releases before 0.4, keyed by job id; still read and written for a replayer of such a release.
LEGACY_MARKER_PREFIX = DEFAULT_LAYOUT.legacy_marker_prefix
#: Per target's queue: the fencing token of its lease holder.
FENCE_PREFIX = DEFAULT_LAYOUT.fence_prefix
PROBE_KEY = DEFAULT_LAYOUT.probe


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def database_url() -> str:
    return env_str("SPILLOVER_DATABASE_URL", DEFAULT_DATABASE_URL)


def redis_url() -> str:
    return env_str("SPILLOVER_REDIS_URL", DEFAULT_REDIS_URL)


def target() -> str | None:
    """The name a deployment gives its Redis (SPILLOVER_TARGET); None: derive it from the connection."""
    return os.environ.get("SPILLOVER_TARGET") or None


def redis_timeout() -> float:
    return env_float("SPILLOVER_REDIS_TIMEOUT", DEFAULT_REDIS_TIMEOUT)


def probe_interval() -> float:
    return env_float("SPILLOVER_PROBE_INTERVAL", DEFAULT_PROBE_INTERVAL)


def marker_ttl() -> int:
    return env_int("SPILLOVER_MARKER_TTL", DEFAULT_MARKER_TTL)


def push_trace_ttl() -> int:
    return env_int("SPILLOVER_PUSH_TRACE_TTL", DEFAULT_PUSH_TRACE_TTL)


def delivery_window() -> float:
    window = env_float("SPILLOVER_DELIVERY_WINDOW", DEFAULT_DELIVERY_WINDOW)
    if window < 1:
        raise ConfigurationError(f"SPILLOVER_DELIVERY_WINDOW must be at least 1 (seconds), not {window}")
    return window


def max_backlog() -> int:
    return env_int("SPILLOVER_MAX_BACKLOG", DEFAULT_MAX_BACKLOG)


def outbox_timeout() -> float:
    timeout = env_float("SPILLOVER_OUTBOX_TIMEOUT", DEFAULT_OUTBOX_TIMEOUT)
    if timeout <= 0:
        raise ConfigurationError(f"SPILLOVER_OUTBOX_TIMEOUT must be above 0 (seconds), not {timeout}")
    return timeout


#: SQLite's default wait on a locked database, as a share of the outbox limit: an enqueue reaches the
#: outbox with a little of its budget spent (on Redis refusing), and a wait this much shorter still fits
#: in what is left, so the usual spill need not shorten it first (two statements per spill).
BUSY_SHARE_OF_LIMIT = 0.95


def busy_timeout() -> float:
    """SQLite's wait on a locked database when no budget is shorter: 95% of the outbox limit by default."""
    return env_float("SPILLOVER_BUSY_TIMEOUT", outbox_timeout() * BUSY_SHARE_OF_LIMIT)


def upgrade_lock_wait() -> float:
    return env_float("SPILLOVER_UPGRADE_LOCK_WAIT", DEFAULT_UPGRADE_LOCK_WAIT)


_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@]*:)[^@/]*@", re.IGNORECASE)


def redact(url: str) -> str:
    """Hide the password of a URL, for logs, status output and errors."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***@", url)
