"""Kill Redis under live requests: every committed order gets exactly one receipt, and nothing else does."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "tests"))

from helpers import post_json, replay_once, run_worker, wait_for
from werkzeug.serving import make_server

from examples.orders_app.app import Order, create_app, db
from spillover import Outbox


def test_redis_killed_under_live_requests(make_redis, sqlite_url, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATABASE_URL", sqlite_url)  # for the worker's receipt job
    redis_server = make_redis(aof=True)
    app = create_app(sqlite_url, redis_server.url)
    with app.app_context():
        db.create_all()
    http = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    outbox = Outbox(sqlite_url)
    client = redis_server.client()

    accepted: list[str] = []
    lock = threading.Lock()

    def customer(n: int) -> None:
        for i in range(50):
            reply = post_json(http.server_port, "/orders", {"email": f"c{n}-{i}@example.com"}, 201)
            with lock:
                accepted.append(f"{reply['order_id']}:c{n}-{i}@example.com")

    customers = [threading.Thread(target=customer, args=(n,)) for n in range(4)]
    for thread in customers:
        thread.start()
    wait_for(lambda: client.llen("rq:queue:receipts") >= 20, timeout=30)  # pushed at each commit
    redis_server.kill()
    wait_for(lambda: outbox.pending_count("receipts") >= 20, timeout=30)  # committed while Redis is down
    redis_server.start()
    for thread in customers:
        thread.join(120)
    http.shutdown()

    assert len(accepted) == 200
    replay_once(sqlite_url, redis_server.url)
    run_worker(redis_server.url, "receipts")
    sent = [x.decode() for x in redis_server.client().lrange("example:receipts", 0, -1)]
    assert sorted(sent) == sorted(accepted), "every committed order's receipt sent exactly once"
    with app.app_context():
        assert db.session.query(Order).count() == 200
