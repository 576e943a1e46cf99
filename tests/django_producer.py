"""A Django process using django-rq 4.2 with spillover's queue class, for tests/test_adoption.py.

usage: django_producer.py REDIS_URL DATABASE_FILE QUEUE_CLASS
Prints JSON: how each enqueue went (spilled or not, in Redis before the commit or not).
"""

import json
import sys

import django
from django.conf import settings

redis_url, database, queue_class = sys.argv[1], sys.argv[2], sys.argv[3]
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": database}},
    INSTALLED_APPS=["django_rq"],
    RQ_QUEUES={"default": {"URL": redis_url, "QUEUE_CLASS": queue_class}},
    RQ={"COMMIT_MODE": "on_db_commit"},
)
django.setup()

import django_rq  # noqa: E402
import jobs  # noqa: E402
import redis  # noqa: E402
from django.db import transaction  # noqa: E402

from spillover import was_spilled  # noqa: E402

report: dict[str, object] = {"class": type(django_rq.get_queue("default")).__module__}
client = redis.Redis.from_url(redis_url)


def in_redis(job_id: str) -> bool:
    try:
        return bool(client.exists(f"rq:job:{job_id}"))
    except redis.ConnectionError:
        return False


job = django_rq.enqueue(jobs.record, "plain", job_id="plain")
report["plain_spilled"] = was_spilled(job)
with transaction.atomic():
    django_rq.enqueue(jobs.record, "committed", job_id="committed")
    report["committed_in_redis_before_commit"] = in_redis("committed")
report["committed_in_redis_after_commit"] = in_redis("committed")
try:
    with transaction.atomic():
        django_rq.enqueue(jobs.record, "rolled-back", job_id="rolled-back")
        raise RuntimeError("roll back")
except RuntimeError:
    pass
report["rolled_back_in_redis"] = in_redis("rolled-back")
print(json.dumps(report))
