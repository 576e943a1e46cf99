"""Capacity planning from this release's benchmark figures: what an outage costs, and which layout fits.

    python bench/capacity.py --producers N --rate R --outage T [--job-bytes B] [--per-host P]

N producer processes enqueueing R jobs/s each, Redis down T minutes. Prints, as a Markdown table:
the backlog, the outbox on disk (bytes per row measured here, on a real SQLite outbox, for jobs of
B argument bytes), the drain time once Redis is back, the Redis memory spillover itself adds
(markers during the drain, push traces after it), and whether a per-host SQLite outbox with a
sidecar replayer or one shared Postgres outbox fits, against the write rates measured by
`bench/run.py` (the README's Benchmarks table, repeated below: re-measure on your hardware).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))

import jobs  # noqa: E402
import redis  # noqa: E402

from spillover import Outbox, Queue, migrate, settings  # noqa: E402
from spillover.stored_job import SpilledJob, encode_hash, new_delivery_id  # noqa: E402

# The README's Benchmarks table (bench/run.py, 2 cores; see there for what each compares with).
#: "spill enqueue rate, 1 process (SQLite)": one process spilling into its SQLite outbox.
SQLITE_ONE_PROCESS = 3_423.3
#: "spill rate, 8 processes, aggregate (SQLite; 0 errors)": one SQLite file's ceiling, many writers.
SQLITE_ONE_FILE = 2_768.9
#: "spill enqueue rate, 1 process (Postgres)": measured from one process only, so a lower bound of
#: what one Postgres takes from a fleet (connections write in parallel there).
POSTGRES_ONE_PROCESS = 2_623.2
#: "drain 100,000 rows ... 1 replayer, 1 queue" and "... 2 replayers, 4 queues".
DRAIN_ONE_REPLAYER = 39_200.9
DRAIN_TWO_REPLAYERS = 41_220.2
#: "Redis memory per delivery in doubt (marker + job-id key)".
MARKER_BYTES = 330
#: a push trace, `MEMORY USAGE` of one (bench/run.py, outage_memory).
TRACE_BYTES = 88


def row_bytes_on_disk(job_bytes: int, rows: int = 5_000) -> float:
    """Bytes one spilled row takes in a real SQLite outbox (table, indexes, WAL checkpointed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db"
        url = f"sqlite:///{path}"
        migrate.upgrade(url)
        empty = path.stat().st_size
        never_asked = redis.Redis(host="127.0.0.1", port=1)  # the queue only builds jobs here
        queue = Queue("capacity", connection=never_asked, outbox=url, target="cache-a:6379/0")
        outbox = Outbox(url, max_backlog=0)
        argument = os.urandom(job_bytes // 2).hex()  # incompressible: RQ zlibs job data
        for start in range(0, rows, 500):
            batch = []
            for n in range(start, min(start + 500, rows)):
                job = queue.create_job(jobs.noop, args=(argument,), job_id=f"capacity-{n:08d}")
                batch.append(
                    SpilledJob(
                        target=queue._stored_target,
                        queue=queue.name,
                        job_id=job.id,
                        job_hash=encode_hash(job.to_dict()),
                        delivery=new_delivery_id(),
                    )
                )
            outbox.append(batch)
        outbox.engine.dispose()
        with sqlite3.connect(path) as conn:  # the WAL into the file: its size is what the rows take
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return (path.stat().st_size - empty) / rows


def mib(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"


def duration(seconds: float) -> str:
    return f"{seconds / 60:,.1f} min" if seconds >= 90 else f"{seconds:,.1f} s"


def drain(rows: float, rate: float, fleet: float) -> str:
    """Producers keep spilling behind a backlog of their own (more than 500 rows) until the replayer is
    through it: the backlog shrinks at the drain rate less the fleet's."""
    if rate <= fleet:
        return f"never: the fleet ({fleet:,.0f} jobs/s) outruns the drain ({rate:,.0f} rows/s)"
    return duration(rows / (rate - fleet))


def plan(producers: int, rate: float, outage_min: float, per_row: float, per_host: int) -> list[tuple[str, str]]:
    fleet = producers * rate
    host_rate = rate * per_host
    rows = fleet * outage_min * 60
    window = settings.DEFAULT_DELIVERY_WINDOW
    trace_h = settings.DEFAULT_PUSH_TRACE_TTL / 3600
    markers_peak = MARKER_BYTES * min(rows, DRAIN_ONE_REPLAYER * window)
    traces = TRACE_BYTES * rows
    sqlite_fit = (
        "fits" if host_rate <= SQLITE_ONE_FILE else "does NOT fit (one host spills faster than one SQLite file takes)"
    )
    shared = (
        f"fits ({fleet:,.0f} of at least {POSTGRES_ONE_PROCESS:,.0f} jobs/s measured from one process)"
        if fleet <= POSTGRES_ONE_PROCESS
        else f"measure first: {fleet:,.0f} jobs/s is over the {POSTGRES_ONE_PROCESS:,.0f} jobs/s measured from one"
        " process (a lower bound: run bench/run.py --postgres against your server with your fleet's concurrency)"
    )
    return [
        ("fleet", f"{producers} producer processes x {rate:g} jobs/s = {fleet:,.0f} jobs/s"),
        ("outage", f"{outage_min:g} min"),
        ("backlog", f"{rows:,.0f} rows"),
        ("outbox on disk", f"{mib(rows * per_row)} ({per_row:,.0f} bytes per row, measured here)"),
        (
            f"per-host SQLite outbox, {per_host} producer process(es) per host",
            f"{mib(host_rate * outage_min * 60 * per_row)} per host",
        ),
        ("drain after Redis returns, 1 replayer", drain(rows, DRAIN_ONE_REPLAYER, fleet)),
        ("drain, 2 replayers on 4+ queues", drain(rows, DRAIN_TWO_REPLAYERS, fleet)),
        ("Redis memory spillover adds: markers at the drain's peak", mib(markers_peak)),
        (f"... push traces, for {trace_h:g} h after the drain", mib(traces)),
        ("... after that", "0 (one fence key per queue)"),
        (
            "layout: per-host SQLite outbox + sidecar replayer (scales with the fleet)",
            f"{sqlite_fit}: {host_rate:g} jobs/s per host against {SQLITE_ONE_FILE:,.0f} jobs/s for one file",
        ),
        ("layout: one shared Postgres outbox (its insert rate is the ceiling)", shared),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--producers", type=int, required=True, help="producer processes in the fleet")
    parser.add_argument("--rate", type=float, required=True, help="jobs per second per producer process")
    parser.add_argument("--outage", type=float, required=True, help="minutes Redis is down")
    parser.add_argument("--job-bytes", type=int, default=200, help="argument bytes per job (default 200)")
    parser.add_argument("--per-host", type=int, default=4, help="producer processes per host (default 4)")
    args = parser.parse_args()
    per_row = row_bytes_on_disk(args.job_bytes)
    print("| quantity | value |\n|---|---|")
    for name, value in plan(args.producers, args.rate, args.outage, per_row, args.per_host):
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
