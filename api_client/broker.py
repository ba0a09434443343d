"""The Celery configuration both sides use: the client sends with it, workers consume.

The client only ever calls ``send_task`` by name (``constants.TASK_RUN_PROBES``),
so it needs this configuration but none of the worker's code.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

#: Longest a job may run before the worker stops it (seconds); jobs may ask for less.
DEFAULT_JOB_TIME_LIMIT = 6 * 3600
#: Redis redelivers an unacked message after this long, even if it is still running:
#: it must stay above the longest job's time limit, or a long job runs twice.
VISIBILITY_TIMEOUT = DEFAULT_JOB_TIME_LIMIT + 3600


def celery_config(
    broker_url: str, *, visibility_timeout: int = VISIBILITY_TIMEOUT
) -> dict[str, Any]:
    transport = {"visibility_timeout": visibility_timeout}
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": visibility_timeout,
        # SQL is the system of record; Celery keeps no results.
        "task_ignore_result": True,
        "result_backend": None,
        # JSON only: a message is a job id and a JSON spec, never a pickle.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Long GPU jobs: ack after the job, requeue if the worker dies, take one at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": DEFAULT_JOB_TIME_LIMIT,
        "task_soft_time_limit": DEFAULT_JOB_TIME_LIMIT - 60,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_create_missing_queues": True,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
    }
    if broker_url.startswith("rediss://"):
        import ssl

        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def make_celery(broker_url: str, name: str = "logprobe", **overrides: Any) -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(broker_url, **overrides))
    return app
