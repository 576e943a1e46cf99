"""django-rq's queue class with spillover underneath.

``RQ_QUEUES[name]["QUEUE_CLASS"] = "spillover.django_rq.Queue"`` (or ``RQ["QUEUE_CLASS"]`` for every
queue). django-rq's own class, ``DjangoRQ``, holds a job back until Django's database transaction
commits (``RQ["COMMIT_MODE"] = "on_db_commit"``, its default) or until the request ends
(``"request_finished"``); ``"spillover.Queue"`` as the class enqueues at once instead (django-rq's
``"auto"``). This class keeps DjangoRQ's commit modes, and when the held job is finally enqueued
and Redis cannot take it, it spills to the outbox (``SPILLOVER_DATABASE_URL``) like any
``spillover.Queue`` enqueue. Import it only where Django's settings are configured (django-rq reads
them on import).
"""

from __future__ import annotations

from django_rq.queues import DjangoRQ  # type: ignore[import-untyped,import-not-found,unused-ignore]

from . import queue


class Queue(DjangoRQ, queue.Queue):  # type: ignore[misc,unused-ignore]
    """DjangoRQ's commit modes (``commit_mode``, ``COMMIT_MODE``) over ``spillover.Queue``."""
