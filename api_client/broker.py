"""The Celery configuration both sides use: the client sends with it, workers consume.

The client only ever calls ``send_task`` by name (``constants.TASK_RUN_PROBES``),
so it needs this configuration but none of the worker's code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celery import Celery

from .constants import ENV_JOB_TIME_LIMIT, ENV_MODEL_LOAD_SECONDS, ENV_VISIBILITY_TIMEOUT
from .errors import ConfigError
from .settings import mask_url

if TYPE_CHECKING:
    import redis

#: Longest a job may run before the worker stops it (seconds); jobs may ask for less.
DEFAULT_JOB_TIME_LIMIT = 6 * 3600
#: Redis redelivers an unacked message after this long, even if it is still running:
#: it must stay above the longest job's time limit, or a long job runs twice.
VISIBILITY_TIMEOUT = DEFAULT_JOB_TIME_LIMIT + 3600
#: After a job's own (cooperative) time limit, Celery's soft and hard limits follow
#: a little later (at most this many seconds), as a backstop for a step that never returns.
SOFT_LIMIT_GRACE = 30
HARD_LIMIT_GRACE = 90


#: A job's own time limit counts from its start, after its model is loaded; a cold
#: worker loading Llama-2-7B takes a minute or two, a 70B model from a slow disk more.
#: Celery's backstop limits, which count from the message's start, allow this much
#: more (``LOGPROBE_MODEL_LOAD_SECONDS``), so a short job on a cold worker is not
#: killed while its model loads.
MODEL_LOAD_ALLOWANCE = 600


def soft_limit_grace(limit: int) -> int:
    """Seconds after the job's own limit before Celery's soft limit interrupts it
    (enough to store what a stopped job computed)."""
    return min(SOFT_LIMIT_GRACE, max(3, limit // 10))


def hard_limit_grace(limit: int) -> int:
    return min(HARD_LIMIT_GRACE, max(6, limit // 5))


def backstop_limits(limit: int) -> tuple[int, int]:
    """Celery's soft and hard time limits for a message whose jobs' limits add up to
    ``limit`` (at most :func:`max_job_time_limit`): the limit, its grace and the model
    load allowance, which shrinks where the hard limit would reach the visibility
    timeout (a message still running then would be delivered twice)."""
    hard = limit + hard_limit_grace(limit)
    allowance = min(_env_seconds(ENV_MODEL_LOAD_SECONDS, MODEL_LOAD_ALLOWANCE, minimum=0),
                    max(0, broker_visibility_timeout() - 1 - hard))
    return limit + soft_limit_grace(limit) + allowance, hard + allowance


def message_limits(time_limits: Iterable[int]) -> tuple[int, int]:
    """Celery's soft and hard time limits for a message whose jobs have ``time_limits``
    (each checked by the job itself; the message's backstop covers them all)."""
    return backstop_limits(min(sum(time_limits), max_job_time_limit()))


def _env_seconds(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of seconds") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum} second"
                          + ("s" if minimum != 1 else ""))
    return value


def broker_visibility_timeout() -> int:
    """The broker's visibility timeout: ``LOGPROBE_VISIBILITY_TIMEOUT`` or the default."""
    return _env_seconds(ENV_VISIBILITY_TIMEOUT, VISIBILITY_TIMEOUT)


def max_job_time_limit() -> int:
    """The longest time limit a job may have: its hard limit (limit + grace) must end
    before Redis would redeliver its message to another worker."""
    budget = broker_visibility_timeout() - 1
    limit = budget - HARD_LIMIT_GRACE
    if limit >= 5 * HARD_LIMIT_GRACE:
        return limit
    limit = max(1, budget * 5 // 6)
    while limit > 1 and limit + hard_limit_grace(limit) > budget:
        limit -= 1
    return limit


def default_job_time_limit() -> int:
    """``LOGPROBE_JOB_TIME_LIMIT``, else 6 h, capped by :func:`max_job_time_limit`."""
    if os.environ.get(ENV_JOB_TIME_LIMIT, "").strip():
        value = _env_seconds(ENV_JOB_TIME_LIMIT, DEFAULT_JOB_TIME_LIMIT)
        if value > max_job_time_limit():
            raise ConfigError(
                f"{ENV_JOB_TIME_LIMIT}={value} is not below the visibility timeout "
                f"({broker_visibility_timeout()} s) minus a grace period (at most "
                f"{max_job_time_limit()} s); lower it or raise {ENV_VISIBILITY_TIMEOUT}, "
                "or a long job would be delivered twice"
            )
        return value
    return min(DEFAULT_JOB_TIME_LIMIT, max_job_time_limit())


#: Seconds a broker connection may take to open, and any one read or write on it.
BROKER_CONNECT_TIMEOUT_S = 10
BROKER_SOCKET_TIMEOUT_S = 10


def celery_config(
    broker_url: str, *, visibility_timeout: int | None = None
) -> dict[str, Any]:
    if visibility_timeout is None:
        visibility_timeout = broker_visibility_timeout()
    transport = {
        "visibility_timeout": visibility_timeout,
        # How often a worker looks for unacked messages whose worker died: every
        # `interval` seconds (the default, interval 10 x throttle 10, is 100 s).
        "unacked_restore_interval": max(1, min(60, visibility_timeout // 5)),
        "unacked_restore_throttle": 1,
        # No blocking read waits forever: a TLS handshake with a plain-text port (a
        # rediss:// URL for a redis:// server) or a publish on a connection the broker
        # dropped silently gives up, with an error, instead of hanging the process
        # (it would not even stop on SIGTERM). BRPOP replies every second.
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT_S,
        "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
    }
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
        # Each message carries its job's limits (client.submit); these are the fallback.
        "task_time_limit": min(DEFAULT_JOB_TIME_LIMIT, max(2, visibility_timeout - 1)),
        "task_soft_time_limit": min(DEFAULT_JOB_TIME_LIMIT, max(2, visibility_timeout - 1)) - 1,
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
#: ``ssl_cert_reqs`` as redis-py spells it; the URL may also say ``CERT_REQUIRED`` etc.
_CERT_REQS = ("required", "optional", "none")
_BOOLEANS = {"true": "true", "1": "true", "yes": "true",
             "false": "false", "0": "false", "no": "false"}


def _canonical_tls_value(key: str, value: str) -> str:
    """``ssl_cert_reqs`` as required|optional|none and ``ssl_check_hostname`` as
    true|false (the only spellings redis-py and kombu read alike), however the URL
    wrote them (any case, a ``cert_`` prefix, 1/0, yes/no); other parameters unchanged."""
    if key == "ssl_cert_reqs":
        name = value.lower().removeprefix("cert_")
        if name not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs={value!r} in the Redis URL: use one of "
                              "required, optional, none")
        return name
    if key == "ssl_check_hostname":
        if value.lower() not in _BOOLEANS:
            raise ConfigError(f"ssl_check_hostname={value!r} in the Redis URL: use true "
                              "or false")
        return _BOOLEANS[value.lower()]
    return value


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL whose password no parser reads as written.

    A ``/``, ``?`` or ``#`` before the URL's last ``@`` (unencoded in the password)
    ends the host part early: redis-py and kombu then take the password's start for
    a host and port, and their errors ("Port could not be cast to integer value as
    'RPW'") would show it. Both :func:`celery_config` and :func:`redis_client` call this.
    """
    _scheme, sep, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    if any(char in userinfo for char in "/?#"):
        raise ConfigError(
            f"the Redis URL {mask_url(url)} has a '/', '?' or '#' before its last '@', so "
            "its password cannot be read: percent-encode them in the password (/ as %2F, "
            "? as %3F, # as %23, @ as %40), and an '@' in a query value as %40")


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url`` (live state: progress, cancel flags, heartbeats,
    rate limits), through :func:`redis_py_url`; ``kwargs`` go to ``Redis.from_url``.
    Every redis-py connection of the client and the workers is made here."""
    import redis

    return redis.Redis.from_url(redis_py_url(url), **kwargs)


def split_ssl_options(url: str) -> tuple[str, dict[str, Any] | None]:
    """Split a broker URL into the URL Celery gets and its TLS options.

    For ``rediss://`` URLs the ``ssl_*`` query parameters (``ssl_cert_reqs=required|
    optional|none``, ``ssl_ca_certs=/path/ca.pem``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_check_hostname=true|false``) become kombu's ``broker_use_ssl`` dict and are
    removed from the URL. The certificate is verified unless the URL says otherwise,
    against the system's CAs or ``ssl_ca_certs``. redis-py reads the same options from
    :func:`redis_py_url`. Other URLs come back unchanged, with ``None``.
    """
    import ssl
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    check_redis_url(url)
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url, None
    query = parse_qsl(parts.query, keep_blank_values=True)
    levels = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for key, value in query:
        if key not in _SSL_QUERY_KEYS:
            continue
        canonical = _canonical_tls_value(key, value)
        if key == "ssl_cert_reqs":
            options[key] = levels[canonical]
        elif key == "ssl_check_hostname":
            options[key] = canonical == "true"
        else:
            options[key] = canonical
    rest = [(k, v) for k, v in query if k not in _SSL_QUERY_KEYS]
    return urlunsplit(parts._replace(query=urlencode(rest))), options


def redis_py_url(url: str) -> str:
    """``url`` as ``redis.Redis.from_url`` must get it to connect as Celery does: for
    ``rediss://``, ``ssl_cert_reqs`` and ``ssl_check_hostname`` spelled canonically
    (redis-py refuses ``CERT_REQUIRED`` and reads ``f`` as false); refuses what
    :func:`split_ssl_options` refuses."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    check_redis_url(url)
    parts = urlsplit(url)
    if parts.scheme != "rediss" or not parts.query:
        return url
    query = [(key, _canonical_tls_value(key, value))
             for key, value in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def make_celery(broker_url: str, name: str = "logprobe", **overrides: Any) -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(broker_url, **overrides))
    return app
