"""``spillover.Group``: ``rq.group.Group`` whose jobs and Group keys survive an outage together.

RQ's ``Group.enqueue_many`` writes the jobs through the queue and then adds their ids to the
group's keys in a pipeline of its own, which a spilling queue cannot take: with Redis down it
raises after the jobs were spilled. Through a ``spillover.Queue`` this Group hands the group
to the push instead, so the Group keys are written with each job, directly or at replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.client import Pipeline
from rq.group import Group as RQGroup
from rq.job import Job
from rq.queue import EnqueueData

from .queue import Queue
from .transaction import TransactionalQueue

__all__ = ["Group"]


class Group(RQGroup):
    """Drop-in ``rq.group.Group`` (``Group.create(connection=...)``, ``group.enqueue_many(queue, datas)``)."""

    def enqueue_many(self, queue: Any, job_datas: Iterable[EnqueueData], pipeline: Pipeline | None = None) -> list[Job]:
        if isinstance(queue, (Queue, TransactionalQueue)) and pipeline is None:
            return queue.enqueue_many_into(job_datas, self.name, join_group=True)
        return list(super().enqueue_many(queue, job_datas, pipeline=pipeline))
