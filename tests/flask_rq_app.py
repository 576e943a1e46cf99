"""A Flask app using Flask-RQ 1.0 (pallets-eco), its queues made spillover's, for tests/test_adoption.py.

Flask-RQ builds its queues itself (rq.Queue) with no class setting: after ``init_app``, replace
them with ``spillover.Queue.from_rq``, which keeps each queue's name, connection, job class
(Flask-RQ's FlaskJob), serializer and ``is_async``.

usage: flask_rq_app.py REDIS_URL  (prints JSON: whether the enqueue spilled)
"""

import json
import sys

import jobs
from flask import Flask
from flask_rq import RQ

from spillover import Queue, was_spilled

app = Flask(__name__)
app.config["RQ_CONNECTION"] = sys.argv[1]
app.config["RQ_ASYNC"] = True
rq = RQ(app)
with app.app_context():
    rq.queues.update({name: Queue.from_rq(queue) for name, queue in rq.queues.items()})

with app.app_context():
    job = rq.queue.enqueue(jobs.record, "flask", job_id="flask")
    print(json.dumps({"spilled": was_spilled(job), "class": type(rq.queue).__module__}))
