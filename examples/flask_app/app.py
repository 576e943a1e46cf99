"""A Flask app that enqueues through spillover.

The pattern: one Redis client and one ``Queue`` per process, made when the app is
created (after gunicorn forks its workers, or before with ``--preload``: spillover
renews its database pool and locks in each forked child). Every request reuses
them, so the outbox engine and its connection pool are shared by the threads of
the process.

    SPILLOVER_DATABASE_URL=postgresql+psycopg://... REDIS_URL=redis://... \\
        gunicorn -w 4 --threads 8 'examples.flask_app.app:create_app()'
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request
from redis import Redis

from spillover import BacklogFull, OutboxUnavailable, Queue, was_spilled


def create_app(redis_url: str | None = None, database_url: str | None = None) -> Flask:
    app = Flask(__name__)
    connection = Redis.from_url(redis_url or os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    emails = Queue("emails", connection=connection, outbox=database_url)  # outbox: SPILLOVER_DATABASE_URL

    @app.post("/signup")
    def signup():  # type: ignore[no-untyped-def]
        address = request.get_json(force=True)["email"]
        try:
            job = emails.enqueue("examples.flask_app.tasks.send_welcome_email", address, job_timeout=30)
        except (OutboxUnavailable, BacklogFull) as exc:
            # Redis and the outbox both failed: the job is NOT queued; say so, never pretend.
            return jsonify(error=str(exc)), 503
        return jsonify(job_id=job.id, spilled=was_spilled(job)), 202

    return app
