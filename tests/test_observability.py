"""Issue 19: the Grafana dashboard and the Prometheus rules use only metrics and labels that exist.

A real replayer (draining, holding a lease, with a dead row and rows of a Redis nobody drains) and
a real producer process (direct, transactional, spilled, and two enqueues that raised) are scraped;
every metric and label in the dashboard's queries and the rules' expressions must be there. The
rules pass promtool's check and its unit tests (deploy/prometheus/spillover-rules.test.yaml).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jobs
import pytest
import redis
import yaml
from helpers import IN_CI, env_with_tests, http_get, stop_replayer, wait_for
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port
from sqlalchemy import create_engine, text

from spillover import Queue

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "spillover.json"
RULES = ROOT / "deploy" / "prometheus" / "spillover-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "spillover-rules.test.yaml"
#: Labels Prometheus adds at scrape time, and the histogram bucket's.
SCRAPE_LABELS = {"job", "instance", "le"}


def start_replayer(database_url: str, redis_url: str, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "spillover.cli_replay", "--database-url", database_url, "--redis-url", redis_url]
    cmd += ["--poll-interval", "0.1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_tests())


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in board["templating"]["list"] if var.get("definition")]
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def used(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names an expression uses."""
    names = set(re.findall(r"\b(spillover_[a-z_]+|process_start_time_seconds)\b", expr))
    labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    labels |= set(re.findall(r"label_values\([a-z_]+,\s*([a-z_]+)\)", expr))
    return names, labels


def scrape(port: int) -> dict[str, set[str]]:
    """Sample name -> the label names it carries, from a real /metrics."""
    status, body = http_get(port, "/metrics")
    if status == 0:
        raise OSError(f"nothing listens on {port} yet")
    assert status == 200, body
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def test_every_metric_and_label_the_dashboard_and_rules_use_is_exported(redis_server, sqlite_url, tmp_path):
    client = redis_server.client()
    producer = Queue("replayed", connection=redis.Redis(port=free_port()), outbox=sqlite_url, target=redis_server.url)
    producer.enqueue_many([Queue.prepare_data(jobs.noop, job_id=f"r{n:05d}") for n in range(20_000)])
    bad = producer.enqueue(jobs.noop, job_id="corrupt")
    Queue("stranded", connection=redis.Redis(port=free_port()), outbox=sqlite_url, target="nobody:6379/0").enqueue(
        jobs.noop
    )
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:  # a row the replayer will mark dead
        conn.execute(
            text("UPDATE spillover_outbox SET job_hash = :bad WHERE job_id = :id"), {"bad": b"\xc1", "id": bad.id}
        )
    engine.dispose()

    ready = tmp_path / "producer.ready"
    producer_port, replayer_port = free_port(), free_port()
    script = str(Path(__file__).parent / "metrics_producer.py")
    producer_proc = subprocess.Popen(
        [sys.executable, script, sqlite_url, redis_server.url, str(producer_port), str(ready)],
        env=env_with_tests(),
        stderr=subprocess.PIPE,
        text=True,
    )
    replayer = start_replayer(
        sqlite_url,
        redis_server.url,
        "--target",
        redis_server.url,
        "--metrics-port",
        str(replayer_port),
        "--batch-size",
        "100",
    )
    seen: dict[str, set[str]] = {}

    def scrape_replayer(*wanted: str) -> bool:
        try:
            for name, labels in scrape(replayer_port).items():
                seen.setdefault(name, set()).update(labels)
        except OSError:
            return False  # not serving yet
        return all(name in seen for name in wanted)

    try:
        # mid-drain (a lease held, a backlog left), then drained (the corrupt row dead, the stranded one waiting)
        wait_for(
            lambda: scrape_replayer("spillover_lease_holder", "spillover_backlog_rows"), timeout=120, interval=0.05
        )
        wait_for(lambda: client.llen("rq:queue:replayed") >= 20_000, timeout=120)
        wait_for(lambda: scrape_replayer("spillover_dead_rows", "spillover_unclaimed_rows"), timeout=60)
        wait_for(ready.exists, timeout=60)
        from_producer = scrape(producer_port)
        for name, labels in from_producer.items():
            seen.setdefault(name, set()).update(labels)
        # "no replayer running" is told by these gauges' absence: a producer must never export them
        replayer_only = {"spillover_lease_held", "spillover_lease_holder", "spillover_redis_up"}
        assert not replayer_only & set(from_producer), sorted(replayer_only & set(from_producer))
        assert from_producer["spillover_enqueue_failed_total"] >= {"queue", "reason"}
    finally:
        ready.with_name(ready.name + ".stop").touch()
        producer_proc.communicate(timeout=30)
        stop_replayer(replayer)

    for where, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        assert exprs, f"no queries read from the {where}"
        for expr in exprs:
            names, labels = used(expr)
            assert names, f"{where}: no metric in {expr!r}"
            missing = [name for name in names if name not in seen]
            assert not missing, f"{where}: {missing} not exported (by {expr!r}); exported: {sorted(seen)}"
            carried = set().union(*(seen[name] for name in names)) | SCRAPE_LABELS
            assert labels <= carried, f"{where}: labels {sorted(labels - carried)} not on {sorted(names)} ({expr!r})"


def test_the_dashboard_is_grafana_json_with_a_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(panel["title"] for panel in board["panels"]).lower()
    for wanted in ("by path", "redis up", "backlog", "oldest", "replay rate", "dead", "lease holder", "restarts"):
        assert wanted in titles, wanted


def test_the_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("CI must check the Prometheus rules: install Debian's prometheus package (promtool)")
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
