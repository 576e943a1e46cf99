"""Fault 10: random sequences of enqueues, Redis faults, replays and replayer crashes, against a model.

The model is a list: the ids of the jobs whose enqueue returned, in order. Whatever
happened, after Redis is back and the outbox is replayed, RQ's queue must equal it:
every job exactly once, in the order it was enqueued (one producer, one thread).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import jobs
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from spillover import Outbox, Queue, migrate
from spillover.faultproxy import FaultProxy
from spillover.redis_side import bounded_client
from spillover.replayer import ReplayConfig, Replayer

QUEUE = "model"
_examples = itertools.count()


class ReplayerCrashed(Exception):
    """Stands for a SIGKILL between the Redis write and the outbox commit."""


class CrashingOutbox(Outbox):
    def mark_delivered(self, ids: Any, keep: bool) -> None:
        raise ReplayerCrashed


class SpilloverModel(RuleBasedStateMachine):
    redis_port: int
    workdir: Path

    def __init__(self) -> None:
        super().__init__()
        self.redis = redis.Redis(port=self.redis_port)
        self.redis.flushall()
        self.url = f"sqlite:///{self.workdir}/model-{next(_examples)}.db"
        migrate.upgrade(self.url)
        self.outbox = Outbox(self.url, max_backlog=0)
        self.proxy = FaultProxy("127.0.0.1", self.redis_port)
        self.queue = Queue(QUEUE, connection=redis.Redis(port=self.proxy.port), outbox=self.outbox, redis_timeout=0.1)
        self.expected: list[str] = []
        self.next_id = 0

    def replayer(self, outbox: Outbox) -> Replayer:
        replayer = Replayer(outbox, bounded_client(self.redis, 2.0), ReplayConfig(batch_size=3, queues=[QUEUE]))
        replayer.holder = "model-replayer"  # a restarted replayer is the same holder
        return replayer

    @rule(count=st.integers(1, 4), many=st.booleans())
    def enqueue(self, count: int, many: bool) -> None:
        ids = [f"j{self.next_id + i:05d}" for i in range(count)]
        self.next_id += count
        if many:
            self.queue.enqueue_many([self.queue.prepare_data(jobs.noop, job_id=job_id) for job_id in ids])
        else:
            for job_id in ids:
                self.queue.enqueue(jobs.noop, job_id=job_id)
        self.expected += ids

    @rule(mode=st.sampled_from(["refuse", "stall", "drop_replies", "hold", "pass", "pass"]))
    def redis_fault(self, mode: str) -> None:
        """ "hold" delays requests: they reach Redis when late_requests_arrive, if ever."""
        self.proxy.set_mode(mode)

    @rule()
    def late_requests_arrive(self) -> None:
        self.proxy.deliver_held()

    @rule()
    def time_passes(self) -> None:
        """Long enough for the producer's prober to see Redis back (if it is)."""
        deadline = time.monotonic() + 0.3
        while not self.queue.health.is_up and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.11)  # past the producer's resume-check interval

    @rule()
    def replay(self) -> None:
        self.replayer(self.outbox).drain()

    @rule()
    def replayer_crashes_after_its_redis_write(self) -> None:
        crashing = self.replayer(CrashingOutbox(self.outbox.engine, max_backlog=0))
        with contextlib.suppress(ReplayerCrashed):
            crashing.drain()

    @invariant()
    def never_twice_never_out_of_order(self) -> None:
        ids = [x.decode() for x in self.redis.lrange(f"rq:queue:{QUEUE}", 0, -1)]
        assert len(ids) == len(set(ids)), "a job reached RQ twice"
        assert ids == sorted(ids), "jobs reached RQ out of order"

    def teardown(self) -> None:
        self.proxy.set_mode("pass")
        self.proxy.deliver_held()
        self.replayer(self.outbox).drain()
        ids = [x.decode() for x in self.redis.lrange(f"rq:queue:{QUEUE}", 0, -1)]
        self.proxy.close()
        self.outbox.engine.dispose()
        assert ids == self.expected
        assert self.outbox.pending_count() == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_random_faults_against_the_model(redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SPILLOVER_PROBE_INTERVAL", "0.02")
    SpilloverModel.redis_port = redis_server.port
    SpilloverModel.workdir = tmp_path
    run_state_machine_as_test(
        SpilloverModel,
        settings=settings(
            max_examples=50,  # each a fresh Redis state and up to 25 steps: ~1 min on 2 cores
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        ),
    )
