"""How a job is kept in the outbox: the RQ job hash, byte for byte.

The producer builds the hash with RQ's own ``Job.to_dict()`` and redis-py's
encoder, so the replayer writes back exactly what a direct enqueue would have
written, without importing the job's function or unpickling its arguments.
"""

from __future__ import annotations

import base64
import calendar
import json
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

    queue: str
    job_id: str
    job_hash: str
    at_front: bool = False
    scheduled_at: int | None = None
    ambiguous: bool = False


def encode_hash(mapping: dict[str, Any]) -> str:
    """JSON of a job hash as redis-py would send it; binary values base64-encoded."""
    text: dict[str, str] = {}
    binary: dict[str, str] = {}
    for field, value in mapping.items():
        raw = encode_value(value)
        try:
            text[field] = raw.decode("utf-8")
        except UnicodeDecodeError:
            binary[field] = base64.b64encode(raw).decode("ascii")
    return json.dumps({"s": text, "b": binary}, separators=(",", ":"))


def decode_hash(job_hash: str) -> dict[str, bytes]:
    """The job hash as the field -> bytes mapping Redis will hold."""
    parsed = json.loads(job_hash)
    fields = {field: value.encode("utf-8") for field, value in parsed["s"].items()}
    fields.update({field: base64.b64decode(value) for field, value in parsed["b"].items()})
    return fields


def schedule_timestamp(when: datetime) -> int:
    """The score RQ's ScheduledJobRegistry gives ``when`` (naive means local time, as in RQ)."""
    if not when.tzinfo:
        offset = -(time.timezone if time.daylight == 0 else time.altzone)
        when = when.replace(tzinfo=timezone(timedelta(seconds=offset)))
    return calendar.timegm(when.utctimetuple())
