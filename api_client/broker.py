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
    broker_url, ssl_options = split_ssl_options(broker_url)
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
    if ssl_options is not None:
        config["broker_use_ssl"] = ssl_options
    return config


#: ``rediss://`` URL query parameters that configure TLS (the names redis-py uses).
_SSL_QUERY_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
                   "ssl_check_hostname")


def split_ssl_options(url: str) -> tuple[str, dict[str, Any] | None]:
    """Split a broker URL into the URL Celery gets and its TLS options.

    For ``rediss://`` URLs the ``ssl_*`` query parameters (``ssl_cert_reqs=required|
    optional|none``, ``ssl_ca_certs=/path/ca.pem``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_check_hostname=true|false``) become kombu's ``broker_use_ssl`` dict and are
    removed from the URL. The certificate is verified unless the URL says otherwise,
    against the system's CAs or ``ssl_ca_certs``. The same URL, unsplit, works with
    ``redis.Redis.from_url``. Other URLs come back unchanged, with ``None``.
    """
    import ssl
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    from .errors import ConfigError

    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url, None
    query = parse_qsl(parts.query, keep_blank_values=True)
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for key, value in query:
        if key == "ssl_cert_reqs":
            levels = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
                      "none": ssl.CERT_NONE}
            name = value.lower().removeprefix("cert_")
            if name not in levels:
                raise ConfigError(f"ssl_cert_reqs={value!r} in the Redis URL: use one of "
                                  "required, optional, none")
            options[key] = levels[name]
        elif key == "ssl_check_hostname":
            options[key] = value.lower() not in ("false", "0", "no")
        elif key in _SSL_QUERY_KEYS:
            options[key] = value
    rest = [(k, v) for k, v in query if k not in _SSL_QUERY_KEYS]
    return urlunsplit(parts._replace(query=urlencode(rest))), options


def make_celery(broker_url: str, name: str = "logprobe", **overrides: Any) -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(broker_url, **overrides))
    return app
