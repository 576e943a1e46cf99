"""spillover against plain RQ and raw SQL inserts, measured in the same run.

    python bench/run.py [--quick] [--large] [--postgres URL]

Starts its own redis-server. The machine is shared and noisy, so A and B are
alternated round by round and the medians compared. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import redis
import rq
from sqlalchemy import insert

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import jobs  # noqa: E402
from helpers import redis_up_metric  # noqa: E402
from servers import RedisServer, free_port  # noqa: E402
from timing import alternate, per_op_us  # noqa: E402

from spillover import Outbox, Queue, migrate, settings  # noqa: E402
from spillover.outbox import create_outbox_engine  # noqa: E402
from spillover.schema import outbox as outbox_table  # noqa: E402
from spillover.settings import LEGACY_MARKER_PREFIX, MARKER_PREFIX  # noqa: E402
from spillover.stored_job import new_delivery_id  # noqa: E402

ROWS: list[tuple[str, str, str, str, str]] = []


def row(figure: str, ours: float, theirs: float, unit: str, against: str, aim: str, higher_is_better: bool) -> None:
    ratio = ours / theirs if theirs else float("nan")
    ROWS.append((figure, f"{ours:,.1f} {unit}", f"{theirs:,.1f} {unit} ({against})", f"{ratio:.2f}x", aim))
    print(f"  {figure}: {ours:,.1f} vs {theirs:,.1f} {unit} -> {ratio:.2f}x", flush=True)


def fresh_outbox(workdir: Path, name: str, pg: str | None = None) -> str:
    if pg:
        from servers import create_database

        url = create_database(pg)
    else:
        url = f"sqlite:///{workdir / name}.db"
    migrate.upgrade(url)
    return url


def bench_healthy(server: RedisServer, workdir: Path, n: int, rounds: int) -> None:
    conn = server.client()
    plain = rq.Queue("plain", connection=conn)
    ours = Queue("ours", connection=conn, outbox=fresh_outbox(workdir, "healthy"))
    plain.enqueue(jobs.noop)
    ours.enqueue(jobs.noop)

    def run(q: rq.Queue) -> float:
        conn.flushdb()
        return per_op_us(lambda i: q.enqueue(jobs.noop, i), n)

    a, b = alternate(lambda: run(ours), lambda: run(plain), rounds)
    row("healthy enqueue, time per job", a, b, "µs", "rq.Queue.enqueue", "<= 0.7x", False)


def bench_healthy_many(server: RedisServer, workdir: Path, batches: int, rounds: int) -> None:
    """Direct enqueue_many of 500 jobs: one marker-guarded script call against RQ's pipeline."""
    conn = server.client()
    plain = rq.Queue("plain-many", connection=conn)
    ours = Queue("ours-many", connection=conn, outbox=fresh_outbox(workdir, "healthy-many"))

    def run(q: rq.Queue) -> float:
        conn.flushdb()
        datas = [rq.Queue.prepare_data(jobs.noop, (i,)) for i in range(500)]
        started = time.perf_counter()
        for _ in range(batches):
            q.enqueue_many(datas)
        return batches * 500 / (time.perf_counter() - started)

    a, b = alternate(lambda: run(ours), lambda: run(plain), rounds)
    row("healthy enqueue_many, 500 per call", a, b, "jobs/s", "rq.Queue.enqueue_many", ">= 1.5x", True)


def count_markers(conn: redis.Redis) -> int:
    """Delivery markers in Redis: this release's (by delivery id) and the job-id keys kept for 0.3 replayers."""
    return len(conn.keys(MARKER_PREFIX + "*")) + len(conn.keys(LEGACY_MARKER_PREFIX + "*"))


def markers_left(server: RedisServer, workdir: Path, n: int) -> None:
    """Delivery markers left in Redis 5 s after ``n`` healthy enqueues (they were all confirmed)."""
    conn = server.client()
    conn.flushdb()
    q = Queue("markers", connection=conn, outbox=fresh_outbox(workdir, "markers"))
    for i in range(n):
        q.enqueue(jobs.noop, i)
    time.sleep(5)
    left = count_markers(conn)
    ROWS.append((f"markers left 5 s after {n:,} healthy enqueues", f"{left:,}", "-", f"{left / n:.1%}", "<= 1%"))
    print(f"  markers left: {left} of {n}", flush=True)


def transaction_markers_left(server: RedisServer, workdir: Path, n: int) -> None:
    """Markers left 40 s after ``n`` transactional commits (pushed at commit; their rows deleted, markers settled)."""
    from orders import Base, Order
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    conn = server.client()
    conn.flushdb()
    url = fresh_outbox(workdir, "tx-markers")
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    q = Queue("tx-markers", connection=conn, outbox=url)
    for i in range(n):
        with Session(engine) as session:
            session.add(Order(item=f"order {i}"))
            q.within(session).enqueue(jobs.noop, i)
            session.commit()
    assert conn.llen("rq:queue:tx-markers") == n
    time.sleep(40)
    left = count_markers(conn)
    ROWS.append((f"markers left 40 s after {n:,} transactional commits", f"{left:,}", "-", f"{left / n:.1%}", "<= 1%"))
    print(f"  markers left: {left} of {n}", flush=True)
    engine.dispose()


def bytes_per_marker(server: RedisServer, n: int = 100_000) -> float:
    """Redis memory of one delivery in doubt: its marker and its job-id key, each with an expiry (INFO used_memory)."""
    conn = server.client()
    conn.flushdb()
    before = int(conn.info("memory")["used_memory"])
    pipe = conn.pipeline(transaction=False)
    for _ in range(n):
        delivery = new_delivery_id()
        pipe.set(MARKER_PREFIX + delivery, "1", px=604_800_000)
        pipe.set(LEGACY_MARKER_PREFIX + str(uuid.uuid4()), delivery, px=604_800_000)  # RQ's job ids: uuid4
    pipe.execute()
    per = (int(conn.info("memory")["used_memory"]) - before) / n
    conn.flushdb()
    ROWS.append(("Redis memory per delivery in doubt (marker + job-id key)", f"{per:,.0f} bytes", "-", "-", "measured"))
    return per


def raw_insert_rate(url: str, n: int) -> float:
    """SQLite: SQLAlchemy Core insert + commit per row (WAL, FULL). Postgres: raw psycopg insert + commit."""
    if url.startswith("postgresql"):
        return raw_psycopg_rate(url, n)
    engine = create_outbox_engine(url)
    payload = {"target": "bench", "queue": "raw", "job_id": "x" * 36, "job_hash": b"h" * 600, "producer": "bench"}
    started = time.perf_counter()
    for _ in range(n):
        with engine.begin() as conn:
            conn.execute(insert(outbox_table), payload)
    engine.dispose()
    return n / (time.perf_counter() - started)


def raw_psycopg_rate(url: str, n: int) -> float:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        started = time.perf_counter()
        for _ in range(n):
            conn.execute(
                "INSERT INTO spillover_outbox (target, queue, job_id, job_hash, producer) VALUES (%s, %s, %s, %s, %s)",
                ("bench", "raw", "x" * 36, b"h" * 600, "bench"),
            )
            conn.commit()
        return n / (time.perf_counter() - started)


def spill_rate(url: str, n: int) -> float:
    q = Queue("spill", connection=redis.Redis(port=free_port()), outbox=Outbox(url, max_backlog=0))
    q.enqueue(jobs.noop)
    started = time.perf_counter()
    for i in range(n):
        q.enqueue(jobs.noop, i)
    return n / (time.perf_counter() - started)


def bench_spill(workdir: Path, n: int, rounds: int, pg: str | None = None) -> None:
    url = fresh_outbox(workdir, "spill", pg)
    a, b = alternate(lambda: spill_rate(url, n), lambda: raw_insert_rate(url, n), rounds)
    label = "Postgres" if pg else "SQLite"
    raw = "raw psycopg insert+commit" if pg else "raw insert+commit, WAL, FULL"
    row(f"spill enqueue rate, 1 process ({label})", a, b, "jobs/s", raw, ">= 0.9x", True)


def bench_transaction(server: RedisServer, workdir: Path, n: int, rounds: int, pg: str | None = None) -> None:
    """An application transaction (insert one order, commit) with and without a job enqueued within it.

    Then the time from the database commit (the session's first after-commit listener) to
    the job being in RQ, seen by polling the queue's length from the committing thread.
    """
    from orders import Base, Order
    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import Session

    url = fresh_outbox(workdir, "transaction", pg)
    engine = create_engine(url)  # the application's own engine, as it would make it
    Base.metadata.create_all(engine)
    conn = server.client()
    conn.flushdb()
    q = Queue("tx", connection=conn, outbox=url)
    committed_at: list[float] = []
    event.listen(Session, "after_commit", lambda _session: committed_at.append(time.perf_counter()), insert=True)

    row_size = {"target": "bench", "queue": "floor", "job_id": "x" * 36, "job_hash": b"h" * 400, "producer": "bench"}

    plain = rq.Queue("plain-after-commit", connection=conn)

    def order(i: int, with_job: bool = False, with_raw_row: bool = False, rq_after: bool = False) -> None:
        with Session(engine) as session:
            session.add(Order(item=f"order {i}"))
            if with_job:
                q.within(session).enqueue(jobs.noop, i)
            if with_raw_row:
                session.execute(insert(outbox_table), row_size)
            session.commit()
        if rq_after:  # the usual "enqueue after commit": lost if the process dies or Redis is down
            plain.enqueue(jobs.noop, i)

    order(-1, with_job=True)  # connections, schema check, script loaded
    times: dict[str, list[float]] = {"job": [], "none": [], "raw": [], "rq": []}
    for _ in range(rounds):
        times["job"].append(per_op_us(lambda i: order(i, with_job=True), n))
        times["none"].append(per_op_us(lambda i: order(i), n))
        times["raw"].append(per_op_us(lambda i: order(i, with_raw_row=True), n))
        times["rq"].append(per_op_us(lambda i: order(i, rq_after=True), n))
    job, none, raw, after = (statistics.median(times[key]) for key in ("job", "none", "raw", "rq"))
    label = "Postgres" if pg else "SQLite"
    row(f"transaction: insert a row + enqueue a job ({label})", job, none, "µs", "without the job", "<= 1.5x", False)
    row(f"floor: insert a row + a bare job-sized row ({label})", raw, none, "µs", "without that row", "-", False)
    row(f"insert a row + enqueue within it ({label})", job, after, "µs", "rq.enqueue after commit", "<= 1.0x", False)

    # What the commit pays for its two guarantees: the read-back (only committed rows are pushed:
    # rolled-back savepoints never are) and the push (the job in RQ when commit() returns).
    template = q._row(q.create_job(jobs.noop, args=(0,)))
    readback = per_op_us(lambda i: q.outbox.present([i + 1]), n)
    push = per_op_us(lambda i: q._pusher.push("tx-parts", [replace(template, delivery=new_delivery_id())]), n)
    parts = f"{readback:,.1f} / {push:,.1f} µs"
    ROWS.append((f"within(): its read-back / its push, inside commit() ({label})", parts, "-", "-", "measured"))

    latencies = []
    for i in range(n):
        expected = conn.llen("rq:queue:tx") + 1
        order(i, True)
        while conn.llen("rq:queue:tx") < expected:
            pass
        latencies.append(time.perf_counter() - committed_at[-1])
    latencies.sort()
    p50, p99 = (latencies[int(q * (len(latencies) - 1))] * 1000 for q in (0.5, 0.99))
    ROWS.append((f"commit -> job in RQ, p50 / p99 ({label})", f"{p50:.2f} / {p99:.2f} ms", "-", "-", "milliseconds"))
    print(f"  commit -> RQ: p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
    engine.dispose()


PRODUCER = """
import sys, time, redis
sys.path.insert(0, sys.argv[4])
import jobs
from spillover import Outbox, Queue
q = Queue("crowd", connection=redis.Redis(port=int(sys.argv[2])), outbox=Outbox(sys.argv[1], max_backlog=0))
q.enqueue(jobs.noop)
n, start_at = int(sys.argv[3]), float(sys.argv[5])
time.sleep(max(0.0, start_at - time.time()))  # all producers start together, imports done
for i in range(n):
    q.enqueue(jobs.noop, i)
print(time.time())
"""


def bench_many_producers(workdir: Path, n: int, pg: str | None = None) -> None:
    url = fresh_outbox(workdir, "crowd", pg)
    port = free_port()
    start_at = time.time() + 3.0  # every producer has imported and connected by then
    args = [sys.executable, "-c", PRODUCER, url, str(port), str(n), str(HERE), str(start_at)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    errors, ended = 0, []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0 or "locked" in err:
            errors += 1
            print(err[-2000:], file=sys.stderr)
        else:
            ended.append(float(out))
    aggregate = 8 * n / (max(ended) - start_at) if ended else 0.0
    single = raw_insert_rate(url, n)
    label = "Postgres" if pg else "SQLite"
    row(
        f"spill rate, 8 processes, aggregate ({label}; {errors} errors)",
        aggregate,
        single,
        "jobs/s",
        "raw insert, 1 process",
        ">= 1x, zero lock errors",
        True,
    )


def fill_outbox(url: str, rows: int, queue: str = "replay") -> None:
    """Spill ``rows`` jobs fast: one transaction per 5,000 via enqueue_many."""
    q = Queue(queue, connection=redis.Redis(port=free_port()), outbox=Outbox(url, max_backlog=0))
    for start in range(0, rows, 5000):
        q.enqueue_many([q.prepare_data(jobs.noop, (i,)) for i in range(start, min(rows, start + 5000))])


def replay_process(url: str, redis_url: str) -> tuple[float, int]:
    """Seconds for the whole `spillover-replay --once` process, and its peak RSS (KiB)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, sys\n"
            "from spillover.cli import replay_main\n"
            "try:\n    replay_main()\n"
            "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
            "--once",
            "--database-url",
            url,
            "--redis-url",
            redis_url,
            "--log-level",
            "WARNING",
            "--batch-size",
            "500",
        ],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return elapsed, int(proc.stderr.strip().splitlines()[-1])


def enqueue_many_rate(conn: redis.Redis, rows: int) -> float:
    q = rq.Queue("native", connection=conn)
    datas = [rq.Queue.prepare_data(jobs.noop, (i,)) for i in range(rows)]
    started = time.perf_counter()
    for start in range(0, rows, 500):
        q.enqueue_many(datas[start : start + 500])
    return rows / (time.perf_counter() - started)


def bench_replay(
    server: RedisServer, workdir: Path, rows: int, rounds: int, pg: str | None = None, label: str = ""
) -> float:
    conn = server.client()
    ours, theirs, rss = [], [], []
    for r in range(rounds):
        url = fresh_outbox(workdir, f"replay-{rows}-{r}", pg)
        fill_outbox(url, rows)
        conn.flushdb()
        elapsed, peak = replay_process(url, server.url)
        assert conn.llen("rq:queue:replay") == rows, "every row replayed"
        ours.append(rows / elapsed)
        rss.append(peak)
        conn.flushdb()
        theirs.append(enqueue_many_rate(conn, rows))
        conn.flushdb()
        if not pg:
            Path(url.removeprefix("sqlite:///")).unlink()
    a, b = statistics.median(ours), statistics.median(theirs)
    if not pg and rows == 20_000:  # the last round's markers, once the delivery window has passed
        fill_outbox(url := fresh_outbox(workdir, "replay-markers"), rows)
        replay_process(url, server.url)
        time.sleep(settings.DEFAULT_DELIVERY_WINDOW + 5)
        left = count_markers(conn)
        conn.flushdb()
        ROWS.append(
            (
                f"markers left {settings.DEFAULT_DELIVERY_WINDOW + 5:.0f} s after replaying {rows:,} rows",
                f"{left:,}",
                "-",
                f"{left / rows:.1%}",
                "<= 1%",
            )
        )
    row(
        f"replay {rows:,} rows, whole --once process{label} (peak RSS {max(rss) / 1024:.0f} MiB)",
        a,
        b,
        "jobs/s",
        "rq enqueue_many, 500/call",
        ">= 3x (moonshot 5x)",
        True,
    )
    return a


def start_waiting_replayers(url: str, server: RedisServer, count: int) -> list[tuple[subprocess.Popen[bytes], int]]:
    """``count`` long-running replayers, started while Redis is down; returns once each has seen it down."""
    started = []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "spillover.cli_replay", "--database-url", url, "--redis-url", server.url]
        cmd += ["--log-level", "WARNING", "--metrics-port", str(port)]
        started.append((subprocess.Popen(cmd, stderr=subprocess.DEVNULL), port))

    for proc, port in started:
        while redis_up_metric(port) != 0.0:  # None until it serves metrics
            if proc.poll() is not None:
                raise RuntimeError(f"a waiting replayer exited ({proc.returncode})")
            time.sleep(0.05)
    return started


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def drain_time(workdir: Path, tmp: Path, queues: int, replayers: int, rows: int, name: str) -> tuple[float, int]:
    """Seconds from redis-server starting to the last of ``rows`` spilled jobs in RQ; the replayers' peak RSS."""
    server = RedisServer(tmp)
    url = fresh_outbox(workdir, name)
    for n in range(queues):
        fill_outbox(url, rows // queues, queue=f"drain{n}")
    server.kill()
    procs = start_waiting_replayers(url, server, replayers)
    started = time.perf_counter()
    server.start(wait=False)
    conn = redis.Redis(port=server.port)
    keys = [f"rq:queue:drain{n}" for n in range(queues)]
    landed = 0
    while landed < rows:
        time.sleep(0.002)
        with contextlib.suppress(redis.ConnectionError), conn.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            landed = sum(pipe.execute())
    elapsed = time.perf_counter() - started
    rss = max(peak_rss_kib(proc.pid) for proc, _ in procs)
    for proc, _ in procs:
        proc.terminate()
        proc.wait()
    server.stop()
    Path(url.removeprefix("sqlite:///")).unlink()
    return elapsed, rss


def bench_drain(server: RedisServer, workdir: Path, tmp: Path, rows: int, rounds: int) -> None:
    """The drain rate users feel: a replayer already waiting, Redis comes back with a backlog behind it."""
    conn = server.client()
    for queues, replayers in ((1, 1), (4, 2)):
        ours, theirs, rss = [], [], []
        for r in range(rounds):
            elapsed, peak = drain_time(workdir, tmp, queues, replayers, rows, f"drain-{queues}-{r}")
            ours.append(rows / elapsed)
            rss.append(peak)
            conn.flushdb()
            theirs.append(enqueue_many_rate(conn, rows))
            conn.flushdb()
        setup = "1 replayer, 1 queue" if queues == 1 else f"{replayers} replayers, {queues} queues"
        row(
            f"drain {rows:,} rows, redis-server start -> last job in RQ, {setup} (peak RSS {max(rss) / 1024:.0f} MiB)",
            statistics.median(ours),
            statistics.median(theirs),
            "jobs/s",
            "rq enqueue_many, 500/call",
            ">= 5x",
            True,
        )


def bench_outage_latency(workdir: Path, server: RedisServer) -> None:
    url = fresh_outbox(workdir, "latency")
    from spillover.faultproxy import FaultProxy

    for mode in ("refuse", "stall"):
        proxy = FaultProxy("127.0.0.1", server.port)
        q = Queue(f"lat-{mode}", connection=redis.Redis(port=proxy.port), outbox=Outbox(url, max_backlog=0))
        q.enqueue(jobs.noop)
        proxy.set_mode(mode)
        started = time.perf_counter()
        q.enqueue(jobs.noop)
        first = time.perf_counter() - started
        samples = []
        for i in range(500):
            t = time.perf_counter()
            q.enqueue(jobs.noop, i)
            samples.append(time.perf_counter() - t)
        samples.sort()
        raw = Outbox(url)
        writes = []
        from spillover.stored_job import SpilledJob

        for _ in range(500):
            t = time.perf_counter()
            raw.append([SpilledJob("bench", "raw", "x", b"\xdd\x00\x00\x00\x00")])
            writes.append(time.perf_counter() - t)
        writes.sort()
        default = redis.Redis(port=proxy.port)
        t = time.perf_counter()
        with contextlib.suppress(redis.RedisError):
            default.set("k", "v")
        default_time = time.perf_counter() - t
        proxy.close()
        ROWS.append(
            (
                f"first enqueue after Redis {'refuses' if mode == 'refuse' else 'stalls'}",
                f"{first * 1000:,.0f} ms",
                f"{default_time * 1000:,.0f} ms (default redis.Redis)",
                f"{first / default_time:.3f}x",
                "< 1 s",
            )
        )
        ROWS.append(
            (
                f"p99 enqueue while Redis {mode}s (vs p99 outbox write)",
                f"{samples[494] * 1000:.2f} ms",
                f"{writes[494] * 1000:.2f} ms (outbox write alone)",
                f"+{(samples[494] - writes[494]) * 1000:.2f} ms",
                "< 5 ms above the write",
            )
        )
        print(f"  first {mode}: {first * 1000:.0f} ms (default client {default_time * 1000:.0f} ms)", flush=True)


def bench_recovery(workdir: Path, tmp: Path) -> None:
    server = RedisServer(tmp)
    url = fresh_outbox(workdir, "recovery")
    fill_outbox(url, 100)
    server.kill()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spillover.cli_replay",
            "--database-url",
            url,
            "--redis-url",
            server.url,
            "--poll-interval",
            "0.5",
            "--log-level",
            "WARNING",
        ]
    )
    time.sleep(3)
    server.start()
    back = time.perf_counter()
    conn = server.client()
    while not conn.llen("rq:queue:replay"):
        time.sleep(0.005)
    recovered = time.perf_counter() - back
    proc.terminate()
    proc.wait()
    server.stop()
    ROWS.append(("Redis healthy again -> first replayed job", f"{recovered * 1000:,.0f} ms", "-", "-", "about 1 s"))
    print(f"  recovery: {recovered * 1000:.0f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and rows")
    parser.add_argument("--large", action="store_true", help="also replay 1,000,000 rows (several minutes)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("SPILLOVER_TEST_POSTGRES_URL"),
        help="server URL to create throwaway databases on (repeat the figures on Postgres)",
    )
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    os.environ["SPILLOVER_TARGET"] = "bench"  # spilled through dead ports, replayed into the bench server
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        server = RedisServer(tmp)
        try:
            print("healthy path", flush=True)
            bench_healthy(server, tmp, 1000 if args.quick else 3000, rounds)
            bench_healthy_many(server, tmp, 4 if args.quick else 10, rounds)
            markers_left(server, tmp, 2000)
            per_marker = bytes_per_marker(server)
            print("spill", flush=True)
            bench_spill(tmp, 1000 if args.quick else 2000, rounds)
            bench_many_producers(tmp, 500 if args.quick else 1000)
            print("transaction", flush=True)
            bench_transaction(server, tmp, 300 if args.quick else 1000, rounds)
            transaction_markers_left(server, tmp, 2000)
            print("replay", flush=True)
            rate_20k = bench_replay(server, tmp, 20_000, rounds)
            outage_memory(server, per_marker, rate_20k)
            print("drain", flush=True)
            bench_drain(server, tmp, tmp, 20_000 if args.quick else 100_000, 1 if args.quick else 3)
            if args.large:
                rate_1m = bench_replay(server, tmp, 1_000_000, 1)
                ROWS.append(("1M-row replay rate / 20k-row rate", f"{rate_1m / rate_20k:.2f}", "-", "-", ">= 0.9"))
            print("outage", flush=True)
            bench_outage_latency(tmp, server)
            bench_recovery(tmp, tmp)
            if args.postgres:
                print("postgres", flush=True)
                bench_spill(tmp, 500 if args.quick else 1000, rounds, pg=args.postgres)
                bench_many_producers(tmp, 300 if args.quick else 500, pg=args.postgres)
                bench_transaction(server, tmp, 300 if args.quick else 1000, rounds, pg=args.postgres)
                bench_replay(server, tmp, 20_000, max(1, rounds // 2), pg=args.postgres, label=" (Postgres)")
                bench_peer(server, args.postgres, 300 if args.quick else 1000, rounds)
        finally:
            server.stop()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(
        f"\nmachine: {os.cpu_count()} cores, {cpu}; redis-server {redis_version()}; Python {sys.version.split()[0]};"
        f" rq {rq.__version__}; peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}"
        " MiB\n"
    )
    print("| figure | spillover | compared with | ratio | aim |")
    print("|---|---|---|---|---|")
    for figure in ROWS:
        print("| " + " | ".join(figure) + " |")


def outage_memory(
    server: RedisServer, per_marker: float, drain_rate: float, rate: int = 1000, hours: float = 1.0
) -> None:
    """Redis memory spillover holds for a one-hour outage at ``rate`` jobs/s: during the drain, markers of
    the last delivery window; after it, the push traces of the replayed rows for SPILLOVER_PUSH_TRACE_TTL
    (so a child replayed after its parent expired knows it was pushed), then nothing but a fence per queue."""
    client = server.client()
    client.set("spillover:pushed:0123456789abcdef012345", "1", px=3_600_000)  # a delivery id's length
    per_trace = float(client.memory_usage("spillover:pushed:0123456789abcdef012345") or 0)
    client.delete("spillover:pushed:0123456789abcdef012345")
    window = settings.DEFAULT_DELIVERY_WINDOW
    peak = per_marker * drain_rate * window
    rows = int(rate * hours * 3600)
    traces = per_trace * rows
    ttl_h = settings.DEFAULT_PUSH_TRACE_TTL / 3600
    ROWS.append(
        (
            f"Redis memory, {rows:,}-row outage backlog: markers at the drain's peak / push traces"
            f" ({per_trace:.0f} bytes each) for {ttl_h:g} h after / then",
            f"{peak / 2**20:,.0f} MiB / {traces / 2**20:,.0f} MiB / 0",
            f"{per_marker * rows / 2**20:,.0f} MiB (one marker per row, as with a 7-day TTL)",
            "-",
            "computed: bytes per key (MEMORY USAGE) x rows or drain rate x window",
        )
    )


def bench_peer(server: RedisServer, pg: str, n: int, rounds: int) -> None:
    """within() against procrastinate's transactional defer on the caller's own connection (bench/peers.py)."""
    try:
        from peers import bench_procrastinate
    except ImportError:
        print("  procrastinate not installed (pip install -e '.[bench]'): skipped", flush=True)
        return
    ours, theirs = bench_procrastinate(pg, server.client(), n, rounds)
    row("insert a row + enqueue within it (Postgres)", ours, theirs, "µs", "procrastinate 3.10 defer", "<= 1.0x", False)


def redis_version() -> str:
    out = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True, text=True)
    return out.stdout.split()[2].removeprefix("v=") if out.stdout else "?"


if __name__ == "__main__":
    main()
