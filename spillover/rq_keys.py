"""RQ's key layout under a key prefix, and spillover's own keys beside it.

RQ 3 names every key ``<RQ_KEY_PREFIX>:...`` (default ``rq``; RQ 2 always ``rq``); with a hash
tag (``{app}``) all of them share one Redis Cluster slot. Spillover's keys (delivery markers,
fences, the health probe) live under the same prefix, so that one push script call touches
one slot. Under the default prefix they keep the names of releases before 0.5
(``spillover:...``), which a previous release running beside this one (a deploy) must see.

Spelled out here, so the replayer does not import rq at all: it needs RQ's key layout, not its
code. tests/test_redis_side.py checks the layout against the installed rq.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ConfigurationError

DEFAULT_PREFIX = "rq"
#: What RQ 3 accepts as a prefix (rq/defaults.py): it is spliced into templates and Lua source.
_VALID_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]+")
#: Stored targets carry RQ's key prefix after this separator (no prefix and no target name has it).
TARGET_PREFIX_SEPARATOR = "#"
#: The outbox's target column.
STORED_TARGET_MAX_LENGTH = 255


def validate_prefix(prefix: str, source: str = "RQ_KEY_PREFIX") -> str:
    """``prefix`` if RQ would accept it, else ConfigurationError naming where it came from."""
    if not _VALID_PREFIX.fullmatch(prefix):
        raise ConfigurationError(
            f"invalid {source} {prefix!r}: only letters, digits, and _ . : - {{ }} are allowed (as in RQ)"
        )
    return prefix


def environment_prefix() -> str:
    """The prefix RQ reads from the environment at import (RQ 3), validated as RQ validates it."""
    return validate_prefix(os.environ.get("RQ_KEY_PREFIX", DEFAULT_PREFIX))


@dataclass(frozen=True)
class KeyLayout:
    """Every key name spillover writes into RQ's Redis, for one key prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def queue_prefix(self) -> str:
        return f"{self.prefix}:queue:"

    @property
    def queues(self) -> str:
        return f"{self.prefix}:queues"

    @property
    def job_prefix(self) -> str:
        return f"{self.prefix}:job:"

    def queue(self, name: str) -> str:
        return f"{self.prefix}:queue:{name}"

    def scheduled(self, queue: str) -> str:
        return f"{self.prefix}:scheduled:{queue}"

    def deferred(self, queue: str) -> str:
        return f"{self.prefix}:deferred:{queue}"

    @property
    def rate_limit_prefix(self) -> str:
        """``<prefix>:rl:<key>`` (the concurrency), ``...:allowed`` and ``...:rate_limited`` (RQ 3)."""
        return f"{self.prefix}:rl:"

    @property
    def rate_limit_keys(self) -> str:
        return f"{self.prefix}:rl-keys"

    @property
    def group_prefix(self) -> str:
        return f"{self.prefix}:group:"

    @property
    def groups(self) -> str:
        return f"{self.prefix}:groups"

    @property
    def _ours(self) -> str:
        return "spillover:" if self.prefix == DEFAULT_PREFIX else f"{self.prefix}:spillover:"

    @property
    def marker_prefix(self) -> str:
        """``<delivery id>`` -> '1': this delivery is in Redis (0.4 and later)."""
        return self._ours + "delivery:"

    @property
    def legacy_marker_prefix(self) -> str:
        """``<job id>``: the job-id marker of releases before 0.4, kept for deploys beside them."""
        return self._ours + "delivered:"

    @property
    def pushed_prefix(self) -> str:
        """``<delivery id>`` -> '1': this outbox row was pushed (lives for the backstop, past its marker), so
        that its dependents pushed later know it is not still to come."""
        return self._ours + "pushed:"

    @property
    def fence_prefix(self) -> str:
        return self._ours + "fence:"

    @property
    def probe(self) -> str:
        """The key the health probe writes (a write: PING succeeds on a read-only replica)."""
        return self._ours + "probe"


DEFAULT_LAYOUT = KeyLayout()


def layout_of_queue(queue_prefix: str, job_prefix: str, queues_key: str, rq_prefix: str) -> KeyLayout:
    """The layout an ``rq.Queue`` (class or instance) and its job class write, or ConfigurationError.

    RQ 3 derives every key from one prefix (``rq_prefix``, RQ_KEY_PREFIX): its registries, rate limits
    and groups always do. A class that overrides a namespace writes a layout spillover cannot
    reproduce key by key, so it is refused rather than spilled wrongly.
    """
    layout = KeyLayout(validate_prefix(rq_prefix))
    if (layout.queue_prefix, layout.job_prefix, layout.queues) != (queue_prefix, job_prefix, queues_key):
        raise ConfigurationError(
            "spillover writes RQ's keys under one prefix; this queue and job class use "
            f"{queue_prefix!r}, {job_prefix!r}, {queues_key!r} (set RQ_KEY_PREFIX instead of overriding them)"
        )
    return layout


def stored_target(target: str, layout: KeyLayout) -> str:
    """The target a row records: the Redis, then RQ's key prefix (``redis:6379/0#rq``).

    The prefix travels with the row, so the replayer writes it under the producer's prefix. Always
    present, the default one too: a replayer of a release before 0.5 (which knows no prefix, nor the
    RQ options a row may carry, nor RQ 3's rate limits) finds no Redis of its own in such a name and
    leaves the row to this release's replayer.
    """
    stored = f"{target}{TARGET_PREFIX_SEPARATOR}{layout.prefix}"
    if len(stored) > STORED_TARGET_MAX_LENGTH:
        raise ConfigurationError(
            f"target and key prefix must fit {STORED_TARGET_MAX_LENGTH} characters together: {stored!r}"
        )
    return stored


def display_target(stored: str | None) -> str | None:
    """A stored target (or a lease name, ``target@host``) as people name it: without the default prefix,
    which every row of this release carries; with any other prefix, as stored."""
    if stored is None:
        return None
    default = TARGET_PREFIX_SEPARATOR + DEFAULT_PREFIX
    if stored.endswith(default):
        return stored[: -len(default)]
    return stored.replace(default + "@", "@", 1)


def server_part(stored: str) -> str:
    """The Redis a stored target names, without the key prefix it carries (not validated)."""
    return stored.rpartition(TARGET_PREFIX_SEPARATOR)[0] or stored


def split_target(stored: str) -> tuple[str, KeyLayout]:
    """(the Redis a row is meant for, the key layout to write it with); ConfigurationError for a bad prefix."""
    target, separator, prefix = stored.rpartition(TARGET_PREFIX_SEPARATOR)
    if not separator:
        return stored, DEFAULT_LAYOUT
    return target, KeyLayout(validate_prefix(prefix, f"key prefix of target {stored!r}"))
