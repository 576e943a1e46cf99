"""Command line: ``spillover-replay`` (the long-running replayer) and ``spillover`` (admin).

Every option has an environment variable, shown in ``--help``, as in RQ's CLI.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click
import redis
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from . import progress, registry, settings
from .endpoints import serve
from .errors import SpilloverError
from .lease import live_leases
from .metrics import register_backlog
from .outbox import Outbox
from .redis_side import client_from_url, is_outage, probe_write, resolve_target
from .replayer import ReplayConfig, Replayer
from .rq_keys import display_target, server_part
from .stop_signals import stop_on_signals
from .targets import UNTARGETED, TargetMatcher, is_host_local_name, setting_for

_ctx = {"auto_envvar_prefix": "SPILLOVER", "show_default": True}


def explain(exc: Exception, params: dict[str, Any]) -> str | None:
    """One line saying what is wrong and what to do, for errors of input or of services; None for bugs."""
    database = settings.redact(str(params.get("database_url") or settings.database_url()))
    if isinstance(exc, SpilloverError):
        return str(exc)
    if isinstance(exc, (NoSuchModuleError, ArgumentError)):
        return (
            f"cannot use database URL {database!r} ({_first_line(exc)}); "
            "give sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        )
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("psycopg", "psycopg2"):
        return f"the PostgreSQL driver is missing ({exc.name}): pip install 'spillover[postgres]'"
    if isinstance(exc, DBAPIError):
        problem = _first_line(exc.orig or exc)
        if "unable to open database file" in problem:
            return f"cannot open the SQLite outbox {database}: does its directory exist, and may this user write it?"
        return f"outbox database {database} is not usable: {problem}; is it running, and is the URL right?"
    if isinstance(exc, redis.RedisError):
        url = settings.redact(str(params.get("redis_url") or settings.redis_url()))
        return f"redis {url}: {exc.__class__.__name__}: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__


class Command(click.Command):
    """A command whose errors of input and of services end as one line and exit 1 (click's 2 for usage).

    The traceback is printed too with ``--log-level DEBUG``; errors that are bugs keep theirs.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if isinstance(exc, click.ClickException):
                raise
            message = explain(exc, ctx.params)
            if message is None:
                raise
            if logging.getLogger("spillover").isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            raise click.ClickException(message) from None


class Group(click.Group):
    command_class = Command
    group_class = type


F = TypeVar("F", bound=Callable[..., Any])


def env_option(*names: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option backed by an environment variable, shown in --help (as in RQ's CLI)."""
    return click.option(*names, envvar=env, show_envvar=True, **kwargs)


def redis_option(f: Any) -> Any:
    return env_option(
        "--redis-url",
        env="SPILLOVER_REDIS_URL",
        default=settings.DEFAULT_REDIS_URL,
        help="Redis that RQ uses.",
    )(f)


def target_option(f: Any) -> Any:
    return env_option(
        "--target",
        env="SPILLOVER_TARGET",
        default=None,
        help="Name of the Redis whose rows to handle. Default: host:port/db of --redis-url.",
    )(f)


def log_level_option(default: str) -> Callable[[F], F]:
    return env_option(
        "--log-level",
        default=default,
        env="SPILLOVER_LOG_LEVEL",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        help="DEBUG also prints the traceback of an error.",
    )


def database_option(f: Any) -> Any:
    return env_option(
        "--database-url",
        env="SPILLOVER_DATABASE_URL",
        default=settings.DEFAULT_DATABASE_URL,
        help="SQLAlchemy URL of the outbox.",
    )(f)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        # On a terminal a log line first clears the line a progress bar may be on (it is redrawn after).
        clear = "\r\x1b[K" if sys.stderr.isatty() else ""
        handler.setFormatter(logging.Formatter(clear + "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


@click.command(cls=Command, context_settings=_ctx)
@redis_option
@database_option
@target_option
@env_option(
    "--queue",
    "queues",
    multiple=True,
    env="SPILLOVER_QUEUES",
    help="Queue to replay (repeatable; env: space-separated). Default: every queue in the outbox.",
)
@env_option(
    "--once",
    is_flag=True,
    env="SPILLOVER_ONCE",
    help="Drain what is pending, then exit (non-zero if Redis is unreachable).",
)
@env_option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=500,
    env="SPILLOVER_BATCH_SIZE",
    help="Rows per Redis call and per outbox transaction.",
)
@env_option(
    "--batch-bytes",
    type=click.IntRange(1024, 256 * 1024 * 1024),
    default=8 * 1024 * 1024,
    env="SPILLOVER_BATCH_BYTES",
    help="Job-hash bytes per Redis call at most (a larger row goes alone).",
)
@env_option(
    "--batch-time",
    type=click.FloatRange(0.001, 4.0),
    default=0.05,
    env="SPILLOVER_BATCH_TIME",
    help="Seconds a batch's script may run in Redis; batches are sized to it (Redis serves no one else meanwhile).",
)
@env_option(
    "--poll-interval",
    type=click.FloatRange(0.01),
    default=1.0,
    env="SPILLOVER_POLL_INTERVAL",
    help="Seconds between looks at an empty outbox.",
)
@env_option(
    "--marker-ttl",
    type=click.IntRange(60),
    default=settings.DEFAULT_MARKER_TTL,
    env="SPILLOVER_MARKER_TTL",
    help="Seconds a delivery marker lives while its row is in the outbox (the backstop; keep equal on producers).",
)
@env_option(
    "--delivery-window",
    type=click.FloatRange(1),
    default=settings.DEFAULT_DELIVERY_WINDOW,
    env="SPILLOVER_DELIVERY_WINDOW",
    help="Seconds a push may take to reach Redis (later, it writes nothing), and a settled marker lives.",
)
@env_option(
    "--retention",
    type=click.FloatRange(0),
    default=0.0,
    env="SPILLOVER_RETENTION",
    help="Seconds to keep replayed rows as 'done' (0: delete at once).",
)
@env_option(
    "--max-attempts",
    type=click.IntRange(1),
    default=3,
    env="SPILLOVER_MAX_ATTEMPTS",
    help="Failed replays of a row before it is marked dead.",
)
@env_option(
    "--lease-ttl",
    type=click.FloatRange(1),
    default=10.0,
    env="SPILLOVER_LEASE_TTL",
    help="Seconds before a dead replayer's lease passes to a standby.",
)
@env_option(
    "--redis-timeout",
    type=click.FloatRange(0.1),
    default=5.0,
    env="SPILLOVER_REPLAY_REDIS_TIMEOUT",
    help="Seconds the replayer waits on Redis (connect, reply) before it counts Redis as down.",
)
@env_option(
    "--adopt-untargeted/--no-adopt-untargeted",
    default=True,
    env="SPILLOVER_ADOPT_UNTARGETED",
    help="Drain rows that name no Redis (written by 0.1 producers or into a 0.1 schema, when an outbox had one Redis).",
)
@env_option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    env="SPILLOVER_METRICS_PORT",
    help="Serve /metrics, /healthz and /readyz on this port (default: off).",
)
@env_option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    env="SPILLOVER_LOG_FORMAT",
)
@log_level_option("INFO")
def replay_main(
    redis_url: str,
    database_url: str,
    target: str | None,
    queues: tuple[str, ...],
    once: bool,
    batch_size: int,
    batch_bytes: int,
    batch_time: float,
    poll_interval: float,
    marker_ttl: int,
    delivery_window: float,
    retention: float,
    max_attempts: int,
    lease_ttl: float,
    redis_timeout: float,
    adopt_untargeted: bool,
    metrics_port: int | None,
    log_format: str,
    log_level: str,
) -> None:
    """Move spilled jobs from the outbox into RQ, in order, exactly once."""
    log = logging.getLogger("spillover.replay")
    stopping = threading.Event()
    if not once:  # first thing: a stop request during start-up is honoured too
        stop_on_signals(stopping, log)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every thread's stack, to stderr
    _setup_logging(log_level, log_format)
    names = [name for value in queues for name in value.split()]
    config = ReplayConfig(
        batch_size=batch_size,
        batch_bytes=batch_bytes,
        batch_time=batch_time,
        poll_interval=poll_interval,
        marker_ttl=marker_ttl,
        delivery_window=delivery_window,
        retention=retention,
        max_attempts=max_attempts,
        lease_ttl=lease_ttl,
        outbox_timeout=settings.outbox_timeout(),
        queues=names,
        target=target,
        adopt_untargeted=adopt_untargeted,
        redis_url=settings.redact(redis_url),
    )
    outbox = Outbox(database_url, max_backlog=0)
    replayer = Replayer(outbox, client_from_url(redis_url, timeout=redis_timeout), config)
    replayer.stopping = stopping
    log.info("replaying %s -> %s (target %s)", outbox.url, settings.redact(redis_url), replayer.target)
    if metrics_port is not None:
        register_backlog(outbox.queue_stats, outbox.identity)
        serve(metrics_port, replayer.heartbeat, replayer.ready)
        log.info("serving /metrics, /healthz, /readyz on port %d", metrics_port)
    if once:
        replayer.progress = progress.for_once(log_format)
        stats = replayer.run_once()
        log.info(
            "done: %d replayed, %d duplicates skipped, %d unique skipped, %d dead",
            stats.replayed,
            stats.duplicates,
            stats.skipped,
            stats.dead,
        )
        return
    replayer.run()


@click.group(cls=Group, context_settings=_ctx)
@log_level_option("WARNING")
def main(log_level: str) -> None:
    """Administer the spillover outbox."""
    _setup_logging(log_level)


@main.command()
@redis_option
@database_option
@target_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--watch",
    type=click.FloatRange(0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Redraw every SECONDS (default 2) until Ctrl-C.",
)
def status(redis_url: str, database_url: str, target: str | None, as_json: bool, watch: float | None) -> None:
    """Per target and queue: pending rows, age of the oldest, dead rows, who drains it; Redis health."""
    if watch is None:
        _show_status(redis_url, database_url, target, as_json)
        return
    on_terminal = sys.stdout.isatty() and not as_json
    try:
        while True:
            if on_terminal:
                click.echo("\x1b[H\x1b[2J", nl=False)  # home, clear: the table is redrawn in place
            if not as_json:  # JSON: one report per line, per interval, nothing between
                click.echo(f"{time.strftime('%H:%M:%S')}, every {watch:g} s (Ctrl-C stops)")
            try:
                _show_status(redis_url, database_url, target, as_json, one_line=True)
            except (SQLAlchemyError, redis.RedisError, SpilloverError) as exc:  # an outage: keep watching
                click.echo(f"cannot read the status now: {str(exc).splitlines()[0] if str(exc) else exc!r}", err=True)
            time.sleep(watch)
    except KeyboardInterrupt:
        return


def _show_status(redis_url: str, database_url: str, target: str | None, as_json: bool, one_line: bool = False) -> None:
    client = client_from_url(redis_url, timeout=1.0)
    outbox = Outbox(database_url, max_backlog=0)
    try:
        _report_status(client, outbox, redis_url, target, as_json, one_line)
    finally:  # --watch makes one per redraw
        outbox.engine.dispose()
        client.close()


def _report_status(
    client: redis.Redis, outbox: Outbox, redis_url: str, target: str | None, as_json: bool, one_line: bool
) -> None:
    mine = resolve_target(target, client)
    outbox.check_schema()
    queues = outbox.queue_stats()
    # by lease name as people name it: a Redis's leases of 0.4 ("tests") and of 0.5 ("tests#rq") alike
    drainers = {(str(display_target(lease.target)), lease.queue): lease.holder for lease in live_leases(outbox.engine)}
    targets: dict[str, dict[str, Any]] = {}
    for entry in queues:
        name = entry["target"] or UNTARGETED
        entry["drainer"] = drainers.get((name, entry["queue"])) or next(  # a host-local target: per host
            (
                holder
                for (lease, queue), holder in drainers.items()
                if queue == entry["queue"] and lease.startswith(name + "@")
            ),
            None,
        )
        totals = targets.setdefault(entry["target"], {"target": entry["target"], "pending": 0, "dead": 0})
        totals["pending"] += entry["pending"]
        totals["dead"] += entry["dead"]
    redis_state = _redis_state(client)
    same_redis = TargetMatcher(mine)  # other spellings of this Redis count as this one
    replayers = registry.live(outbox.engine)
    claimed: set[registry.Claim] = set().union(*(r.claims for r in replayers))
    pending = outbox.pending_groups(by_host=is_host_local_name)
    stranded = registry.with_ages(registry.unclaimed(pending, claimed), outbox.oldest_age)
    report: dict[str, Any] = {
        "outbox": outbox.url,
        "redis": {"url": settings.redact(redis_url), "state": redis_state},
        "target": mine,
        "targets": [
            {**totals, "this": name is not None and same_redis.same_server(server_part(name))}
            for name, totals in sorted(targets.items(), key=_by_name)
        ],
        "queues": queues,
        "replayers": [
            {"holder": r.holder, "target": r.target, "host": r.host, "redis_url": r.redis_url} for r in replayers
        ],
        "unclaimed": [
            {
                "target": display_target(u.group.target),
                "host": u.group.host,
                "queues": list(u.queues),
                "pending": u.rows,
                "oldest_age_s": round(u.oldest_seconds, 1),
                "would_drain": setting_for(u.group),
            }
            for u in stranded
        ],
    }
    if as_json:
        click.echo(json.dumps(report, indent=None if one_line else 2))
        return
    click.echo(f"outbox: {report['outbox']}")
    click.echo(f"redis:  {report['redis']['url']} ({redis_state}), target {mine}")
    click.echo(f"replayers running: {len(replayers)}")
    for r in replayers:
        click.echo(f"  {r.holder}: target {r.target}, redis {r.redis_url or '?'}")
    for entry in report["targets"]:
        if entry["target"] is None:
            click.echo(
                f"rows with no target (0.1 producers): {entry['pending']} pending, {entry['dead']} dead "
                "(adopted by a replayer alone on this outbox)"
            )
        elif not entry["this"]:
            click.echo(
                f"other target {entry['target']}: {entry['pending']} pending, {entry['dead']} dead (not this Redis)"
            )
    for u in stranded:
        name = display_target(u.group.target) or "(no target)"
        host = f" written on host {u.group.host}" if u.group.host else ""
        click.echo(
            f"UNCLAIMED: {u.rows} pending row(s) of target {name}{host} in {', '.join(u.queues)} "
            f"(oldest {u.oldest_seconds:.0f} s): no running replayer drains them; start {setting_for(u.group)}"
        )
    click.echo(f"{'target':<22} {'queue':<20} {'pending':>9} {'oldest (s)':>11} {'dead':>6} {'skipped':>8}  drained by")
    for entry in queues:
        oldest = "-" if entry["oldest_age_s"] is None else f"{entry['oldest_age_s']:.1f}"
        target_name = entry["target"] or "(no target)"
        row = f"{target_name:<22} {entry['queue']:<20} {entry['pending']:>9} {oldest:>11} {entry['dead']:>6}"
        row += f" {entry['skipped']:>8}"
        click.echo(f"{row}  {entry['drainer'] or '-'}")


def _by_name(item: tuple[str | None, Any]) -> str:
    return item[0] or ""


def _redis_state(client: redis.Redis) -> str:
    try:
        probe_write(client)
    except redis.RedisError as exc:
        return f"down: {exc.__class__.__name__}" if is_outage(exc) else f"error: {exc}"
    return "up"


@main.group()
def db() -> None:
    """Outbox schema."""


@db.command()
@database_option
@click.option("--revision", default="head", help="Target revision.")
def upgrade(database_url: str, revision: str) -> None:
    """Create or update the outbox tables (the same migrations as `alembic upgrade head`).

    Safe while producers spill (expand-only migrations) and from several hosts at once (one upgrade
    at a time: a lock in the database, or beside an SQLite file; SPILLOVER_UPGRADE_LOCK_WAIT bounds the wait).
    """
    from .migrate import upgrade as run_upgrade

    run_upgrade(database_url, revision)
    click.echo(f"outbox schema at {revision} in {settings.redact(database_url)}")


@main.group()
def dead() -> None:
    """Rows the replayer gave up on."""


@dead.command("list")
@database_option
@click.option("--limit", default=100, type=click.IntRange(1))
def dead_list(database_url: str, limit: int) -> None:
    """Dead rows with their last error."""
    rows = Outbox(database_url, max_backlog=0).dead_rows(limit)
    for row in rows:
        click.echo(f"{row['id']}\t{row['queue']}\t{row['job_id']}\tattempts={row['attempts']}\t{row['last_error']}")
    if not rows:
        click.echo("no dead rows")


@dead.command("retry")
@database_option
@click.argument("row_id", type=int, required=False)
@click.option("--all", "all_rows", is_flag=True, help="Every dead row.")
def dead_retry(database_url: str, row_id: int | None, all_rows: bool) -> None:
    """Put a dead row (or --all) back in line for replay."""
    _need_target(row_id, all_rows)
    count = Outbox(database_url, max_backlog=0).retry_dead(None if all_rows else row_id)
    click.echo(f"{count} row(s) back to pending")


@dead.command("purge")
@database_option
@click.argument("row_id", type=int, required=False)
@click.option("--all", "all_rows", is_flag=True, help="Every dead row.")
def dead_purge(database_url: str, row_id: int | None, all_rows: bool) -> None:
    """Delete a dead row (or --all) for good."""
    _need_target(row_id, all_rows)
    count = Outbox(database_url, max_backlog=0).purge_dead(None if all_rows else row_id)
    click.echo(f"{count} row(s) deleted")


@main.command()
@database_option
@click.argument("old")
@click.argument("new")
@click.option(
    "--host", default=None, help="Only rows whose producer ran on this host (for loopback and socket targets)."
)
def retarget(database_url: str, old: str, new: str, host: str | None) -> None:
    """Give pending rows of target OLD ('(no target)': rows without one) the target NEW.

    For rows that no replayer recognises: written on a host that is gone, or given a wrong target by
    0.2.0's migration. `spillover status` lists them as UNCLAIMED. A replayer draining them meanwhile
    is harmless: the delivery markers keep each job once.
    """
    outbox = Outbox(database_url, max_backlog=0)
    outbox.check_schema()
    count = outbox.retarget(None if old == "(no target)" else old, new, host)
    click.echo(f"{count} pending row(s) now meant for {new}")


@main.command()
@env_option(
    "--redis-url",
    env="SPILLOVER_REDIS_URL",
    default=None,
    help="Redis to rehearse against (through a proxy; nothing is cut on the real server). "
    "Default: a throwaway redis-server.",
)
@env_option(
    "--database-url",
    env="SPILLOVER_DATABASE_URL",
    default=None,
    help="Outbox to use. Default: a SQLite file in a temporary directory.",
)
@click.option("--jobs", default=300, type=click.IntRange(3), help="Jobs to enqueue.")
def drill(redis_url: str | None, database_url: str | None, jobs: int) -> None:
    """Rehearse a Redis outage: enqueue, cut Redis, spill, restore, replay, execute, count."""
    import tempfile
    from contextlib import ExitStack
    from pathlib import Path

    from .drill import default_database_url, format_report, run_drill, throwaway_redis

    _setup_logging("WARNING")
    with ExitStack() as stack:
        if redis_url is None:
            redis_url = stack.enter_context(throwaway_redis())
        if database_url is None:
            database_url = default_database_url(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        click.echo(f"drill: redis {settings.redact(redis_url)}, outbox {settings.redact(database_url)}")
        with click.progressbar(length=jobs, label="enqueueing (redis cut a third of the way in)") as bar:
            report = run_drill(
                redis_url, database_url, jobs, lambda stage, n: bar.update(n) if stage == "enqueue" else None
            )
        click.echo(format_report(report))
    if not report.ok:
        raise SystemExit(1)


def _need_target(row_id: int | None, all_rows: bool) -> None:
    if (row_id is None) == (not all_rows):
        raise click.UsageError("give exactly one of ROW_ID or --all")


if __name__ == "__main__":  # pragma: no cover
    main()
