"""A stale writer lands nothing, whatever the marker lifetime: deadlines and fences checked by Redis.

A replayer's batch held in the network while the replayer is paused, a standby that drains
everything and whose markers are gone by the time the held request reaches Redis; a paused
holder that wakes with a batch in hand after its markers were evicted. Each job once, in order.
"""

from __future__ import annotations

import signal

import redis
from checks import start_replayer, wait_for
from helpers import LEGACY_MARKER_PREFIX, MARKER_PREFIX, stop_replayer
from test_queue_leases import _state, assert_each_once_in_order, drained, spill_queues, start_stalling_replayer

from spillover import Outbox
from spillover.faultproxy import FaultProxy


def markers(client: redis.Redis) -> int:
    return len(client.keys(MARKER_PREFIX + "*")) + len(client.keys(LEGACY_MARKER_PREFIX + "*"))


def test_a_batch_held_in_the_network_past_its_deadline_lands_nothing(redis_server, outbox_url):
    made = spill_queues(outbox_url, ["held"], 1000)
    client = redis_server.client()
    proxy = FaultProxy("127.0.0.1", redis_server.port)
    stalled = start_stalling_replayer(outbox_url, proxy.url, "--delivery-window", "3", "--marker-ttl", "60")
    wait_for(lambda: _state(stalled.pid) == "T", timeout=30)  # its first 100 rows read, not yet sent
    proxy.set_mode("hold")
    stalled.send_signal(signal.SIGCONT)
    wait_for(lambda: proxy.held_bytes() > 16 * 1024, timeout=10, interval=0.001)  # the batch is in the network
    stalled.send_signal(signal.SIGSTOP)  # and its sender paused

    window = ("--delivery-window", "3")
    standby = start_replayer(outbox_url, redis_server.url, "--batch-size", "100", "--lease-ttl", "1", *window)
    wait_for(lambda: drained(outbox_url, client, made), timeout=60, interval=0.05)
    wait_for(lambda: markers(client) == 0, timeout=30, interval=0.1)  # the standby's markers are gone
    assert proxy.held_bytes() > 16 * 1024
    assert proxy.deliver_held() > 16 * 1024  # the held batch reaches Redis now, long after its deadline
    assert client.llen("rq:queue:held") == len(made["held"]), "the late batch wrote nothing"
    assert markers(client) == 0, "not even a marker"

    stalled.send_signal(signal.SIGCONT)
    stop_replayer(standby)
    stop_replayer(stalled)
    proxy.close()
    assert_each_once_in_order(client, made)
    assert Outbox(outbox_url, max_backlog=0).dead_rows() == [], "a refused batch is not a failed attempt"


def test_a_paused_holder_that_wakes_with_a_batch_in_hand_is_fenced_off(redis_server, outbox_url):
    made = spill_queues(outbox_url, ["woken"], 1000)
    client = redis_server.client()
    stalled = start_stalling_replayer(outbox_url, redis_server.url)  # a window of 30 s: its batch is in time
    wait_for(lambda: _state(stalled.pid) == "T", timeout=30)
    standby = start_replayer(outbox_url, redis_server.url, "--batch-size", "100", "--lease-ttl", "1")
    wait_for(lambda: drained(outbox_url, client, made), timeout=60, interval=0.05)
    client.delete(*client.keys(MARKER_PREFIX + "*"), *client.keys(LEGACY_MARKER_PREFIX + "*"))  # evicted, say
    stalled.send_signal(signal.SIGCONT)  # wakes and sends the batch it had in hand, with its old token
    stop_replayer(standby)
    err = stop_replayer(stalled)
    assert "refused this replayer's fencing token" in err, err[-3000:]
    assert_each_once_in_order(client, made)
    assert Outbox(outbox_url, max_backlog=0).dead_rows() == [], "a refused batch is not a failed attempt"
