"""The baseline for tiny probes: a trivial Celery task, one task per probe.

Same broker settings as logprobe (``api_client.broker.celery_config``: JSON, acks
late, prefetch 1); the task only counts itself in Redis so the sender can tell
when all are done. Started by the benchmark as
``celery -A bench.celery_noop worker -Q bench.noop -c 1``.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from api_client.broker import make_celery

QUEUE = "bench.noop"
TASK = "bench.noop"
COUNTER_KEY = "bench:noop:count"

app: Celery = make_celery(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/4"),
                          name="bench-noop")
_redis: redis.Redis | None = None


@app.task(name=TASK)
def noop(job_id: str) -> None:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(app.conf.broker_url)
    _redis.incr(COUNTER_KEY)
