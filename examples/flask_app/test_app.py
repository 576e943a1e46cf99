"""Kill Redis under live HTTP requests: every accepted signup's email is sent exactly once."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "tests"))

from helpers import post_json, replay_once, run_worker, wait_for
from werkzeug.serving import make_server

from examples.flask_app.app import create_app


def test_redis_killed_under_live_requests(make_redis, sqlite_url):
    redis_server = make_redis(aof=True)
    app = create_app(redis_server.url, sqlite_url)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    port = http.server_port
    threading.Thread(target=http.serve_forever, daemon=True).start()

    accepted: list[str] = []
    spilled: list[bool] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(60):
            address = f"user{n}-{i}@example.com"
            reply = post_json(port, "/signup", {"email": address}, 202)
            with lock:
                accepted.append(address)
                spilled.append(bool(reply["spilled"]))
            time.sleep(0.005)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    wait_for(lambda: len(accepted) >= 20, timeout=30)  # requests went straight into Redis
    redis_server.kill()
    wait_for(lambda: sum(spilled) >= 20, timeout=30)  # and now into the outbox
    redis_server.start()
    for thread in clients:
        thread.join(60)
    http.shutdown()

    assert len(accepted) == 240 and any(spilled) and not all(spilled)
    replay_once(sqlite_url, redis_server.url)
    run_worker(redis_server.url, "emails")
    sent = [x.decode() for x in redis_server.client().lrange("example:sent", 0, -1)]
    assert sorted(sent) == sorted(accepted), "every accepted signup's email sent exactly once"
