"""Run under RQ_KEY_PREFIX (RQ 3): every form natively, directly and spilled-then-replayed, compared.

A process of its own, because RQ reads the prefix once, at import. The replayer it starts runs
without RQ_KEY_PREFIX: the prefix must come with the rows. Prints one JSON line of findings.
"""

from __future__ import annotations

import json
import sys

import redis
from forms import FORMS, prepare
from helpers import LAYOUT, replay_once, snapshot
from rq import Queue as RQQueue
from servers import free_port

from spillover import Outbox, Queue


def main(redis_url: str, database_url: str) -> None:
    server = redis_url.rsplit("/", 1)[0]
    names = {"native": 1, "direct": 2, "replayed": 3}
    clients = {name: redis.Redis.from_url(f"{server}/{db}") for name, db in names.items()}
    dead = redis.Redis(host="127.0.0.1", port=free_port())
    found: dict[str, list[str]] = {"differ": [], "unprefixed": [], "stored_targets": []}
    keys = 0
    for form_name, form in FORMS.items():  # each form on empty databases, as in test_producer.py
        for client in clients.values():
            client.flushdb()
            prepare(form, client)
        form(RQQueue("q", connection=clients["native"]))
        form(Queue("q", connection=clients["direct"], outbox=database_url))
        form(Queue("q", connection=dead, outbox=database_url, target="prefixed"))
        found["stored_targets"] += [str(target) for target in Outbox(database_url).pending_by_target()]
        replay_once(database_url, f"{server}/{names['replayed']}", "--target", "prefixed", without=("RQ_KEY_PREFIX",))
        snapshots = {name: snapshot(client, relative_schedule=True) for name, client in clients.items()}
        native = snapshots["native"]
        keys += len(native)
        for name, taken in snapshots.items():
            found["differ"] += [
                f"{form_name} {name}: {key}"
                for key in taken.keys() | native.keys()
                if taken.get(key) != native.get(key)
            ]
        found["unprefixed"] += [  # every key in Redis, spillover's markers too (only the replayer's probe is its own)
            f"{form_name}: {key.decode()}"
            for client in clients.values()
            for key in client.keys("*")
            if not key.decode().startswith(LAYOUT.prefix + ":") and key != b"spillover:probe"
        ]
    print(json.dumps({**found, "keys": keys, "left": Outbox(database_url).pending_count()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
