"""How a job is kept in the outbox: the RQ job hash, byte for byte.

The producer builds the hash with RQ's own ``Job.to_dict()`` and redis-py's
encoder, so the replayer writes back exactly what a direct enqueue would have
written, without importing the job's function or unpickling its arguments.
"""

from __future__ import annotations

import calendar
import itertools
import os
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any


def encode_value(value: Any) -> bytes:
    """A hash value as redis-py sends it (its ``Encoder``): bytes as is, numbers by repr, str as UTF-8."""
    if isinstance(value, (bytes, memoryview)):
        return bytes(value)
    if isinstance(value, bool):
        raise TypeError(f"invalid job hash value {value!r}: redis does not take booleans")
    if isinstance(value, (int, float)):
        return repr(value).encode()
    if isinstance(value, str):
        return value.encode("utf-8")  # a str Enum (JobStatus) gives its value, as in redis-py
    raise TypeError(f"invalid job hash value of type {type(value).__name__}")


@dataclass(frozen=True)
class SpilledJob:
    """One outbox row to write: a job that could not (or must not yet) go to Redis."""

    target: str  # the Redis it is meant for (redis_side.target_of)
    queue: str
    job_id: str
    job_hash: bytes
    at_front: bool = False
    scheduled_at: int | None = None
    ambiguous: bool = False
    delivery: str | None = None  # new_delivery_id(); None: a row of a release before 0.4
    options: str | None = None  # JSON of the RQ options the push script applies (push.lua); None: none


class _Deliveries:
    """Delivery ids: a random per-process prefix and a counter, new in a forked child.

    Unique across processes and hosts without a round trip, and cheaper than a uuid4 per job.
    """

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = os.urandom(10).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_deliveries = _Deliveries()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_deliveries.renew)


def delivery_prefix() -> str:
    """What every delivery id this process makes starts with (the drill removes its markers by it)."""
    return _deliveries.prefix


def new_delivery_id() -> str:
    """The id of one enqueue (at most 40 characters): its delivery marker in Redis is keyed by it."""
    return _deliveries.next()


def encode_hash(mapping: dict[str, Any]) -> bytes:
    """The job hash as redis-py would send it: field, value, ... as one MessagePack array.

    Every item is a MessagePack str32 holding raw bytes, so binary values (pickled
    data, meta) are kept as they are and the replay script unpacks a whole job with
    one ``cmsgpack.unpack`` call: the replayer passes the stored bytes through untouched.
    """
    parts = [msgpack_array_header(2 * len(mapping))]
    append, header = parts.append, _TYPE_AND_LENGTH.pack  # the healthy path's hot loop: no copies, no calls
    for field, value in mapping.items():
        key = field.encode()
        raw = value.encode() if type(value) is str else encode_value(value)
        append(header(0xDB, len(key)))
        append(key)
        append(header(0xDB, len(raw)))
        append(raw)
    return b"".join(parts)


# MessagePack array32 (0xDD) and str32 (0xDB) headers: a type byte and a 32-bit length.
_TYPE_AND_LENGTH = struct.Struct(">BI")


def msgpack_array_header(length: int) -> bytes:
    return _TYPE_AND_LENGTH.pack(0xDD, length)


def msgpack_str(raw: bytes) -> bytes:
    """A MessagePack str32 carrying raw bytes (Lua strings are bytes; cmsgpack has no bin type)."""
    return _TYPE_AND_LENGTH.pack(0xDB, len(raw)) + raw


def schedule_timestamp(when: datetime) -> int:
    """The score RQ's ScheduledJobRegistry gives ``when`` (naive means local time, as in RQ)."""
    if not when.tzinfo:
        offset = -(time.timezone if time.daylight == 0 else time.altzone)
        when = when.replace(tzinfo=timezone(timedelta(seconds=offset)))
    return calendar.timegm(when.utctimetuple())
