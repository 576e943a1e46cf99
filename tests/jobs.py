"""Job functions the tests enqueue; workers import them from tests/ (PYTHONPATH)."""

from __future__ import annotations

from rq import get_current_job


def record(tag: str) -> str:
    """Append ``tag`` to the list ``executed`` in the worker's Redis: proof it ran, and how often."""
    job = get_current_job()
    assert job is not None
    job.connection.rpush("executed", tag)
    return tag


def noop(*args: object, **kwargs: object) -> None:
    return None


def on_success(job: object, connection: object, result: object) -> None:
    return None


def on_failure(job: object, connection: object, *exc_info: object) -> None:
    return None


def read_order(database_url: str, order_id: int) -> str:
    """Read the order the enqueueing transaction inserted, and record what was found (or "missing")."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        item = conn.execute(text("SELECT item FROM orders WHERE id = :id"), {"id": order_id}).scalar()
    engine.dispose()
    return record(item or "missing")


def append_line(path: str, line: str) -> None:
    """Append ``line`` to the file at ``path``: the order jobs ran in, readable after the worker exits."""
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def fail(path: str, line: str) -> None:
    """Append ``line`` to ``path``, then fail: a parent whose dependents must wait, or not."""
    append_line(path, line)
    raise RuntimeError(f"{line} fails, as the test wants")
