"""The receipt job: it reads the order its request committed. Workers need DATABASE_URL."""

from __future__ import annotations

import os
from functools import cache

from rq import get_current_job
from sqlalchemy import Engine, create_engine, text


@cache
def _engine() -> Engine:
    return create_engine(os.environ["DATABASE_URL"])


def send_receipt(order_id: int) -> str:
    with _engine().connect() as conn:
        email = conn.execute(text("SELECT email FROM orders WHERE id = :id"), {"id": order_id}).scalar_one()
    job = get_current_job()
    if job is not None:  # record delivery so the example's test can count it
        job.connection.rpush("example:receipts", f"{order_id}:{email}")
    return f"receipt for order {order_id} sent to {email}"
