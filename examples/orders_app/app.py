"""A Flask-SQLAlchemy app that creates an order and enqueues its receipt in one transaction.

The order and its job commit together or not at all: a request that fails after the
enqueue rolls the job back with the order, and the worker never runs before the order
is committed. When Redis is down at the commit the job waits in the outbox, in the
app's own database, and ``spillover-replay`` delivers it.

    spillover db upgrade --database-url "$DATABASE_URL"   # the outbox table, next to the app's
    DATABASE_URL=postgresql+psycopg://... REDIS_URL=redis://... \\
        gunicorn -w 4 --threads 8 'examples.orders_app.app:create_app()'
    DATABASE_URL=... spillover-replay --database-url "$DATABASE_URL" --redis-url "$REDIS_URL"
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from redis import Redis
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from spillover import Queue


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200))


def create_app(database_url: str | None = None, redis_url: str | None = None) -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url or os.environ["DATABASE_URL"]
    db.init_app(app)
    connection = Redis.from_url(redis_url or os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    # outbox= the app's own database: the rows written within a transaction are there anyway,
    # and plain spills (if the app has any) land where the same replayer looks.
    receipts = Queue("receipts", connection=connection, outbox=app.config["SQLALCHEMY_DATABASE_URI"])

    @app.post("/orders")
    def create_order():  # type: ignore[no-untyped-def]
        order = Order(email=request.get_json(force=True)["email"])
        db.session.add(order)
        db.session.flush()  # the order's id, for its job
        job = receipts.within(db.session).enqueue("examples.orders_app.tasks.send_receipt", order.id)
        db.session.commit()  # the order and its receipt job: both, or neither
        return jsonify(order_id=order.id, job_id=job.id), 201

    return app
