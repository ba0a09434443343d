"""Names shared by the producer (client) and the consumer (worker).

Every Celery task name, queue name and Redis key the two sides agree on lives
here, so neither side has to import the other.
"""

from __future__ import annotations

#: The one Celery task a client sends: ``run_probes({"jobs": [{"id": ..., "spec": {...}}]})``.
TASK_RUN_PROBES = "logprobe.run_probes"

#: Queue name prefix; the default queue of a backend is ``logprobe.<backend>``.
QUEUE_PREFIX = "logprobe"

#: Redis key prefix for live state (progress, cancel flags, rate limits).
REDIS_PREFIX = "logprobe"

#: Environment variables read by :class:`api_client.settings.Settings`.
ENV_REDIS_URL = "LOGPROBE_REDIS_URL"
ENV_DATABASE_URL = "LOGPROBE_DATABASE_URL"
ENV_HOME = "LOGPROBE_HOME"
ENV_ARTIFACTS_URL = "LOGPROBE_ARTIFACTS_URL"
ENV_MAX_LOGITS_BYTES = "LOGPROBE_MAX_LOGITS_BYTES"

#: Default cap on one job's full-logits artifact (``return_logits=True``): 1 GiB.
DEFAULT_MAX_LOGITS_BYTES = 1 << 30


def default_queue(backend: str) -> str:
    """The queue that workers of ``backend`` consume unless told otherwise."""
    return f"{QUEUE_PREFIX}.{backend}"


# --- long jobs: routing, live progress, cancellation, time limits -----------------

#: Seconds Redis waits before redelivering an unacked message (must exceed every
#: job's time limit); the default is ``broker.VISIBILITY_TIMEOUT``.
ENV_VISIBILITY_TIMEOUT = "LOGPROBE_VISIBILITY_TIMEOUT"
#: Default per-job time limit in seconds (jobs may ask for less or more, up to the cap).
ENV_JOB_TIME_LIMIT = "LOGPROBE_JOB_TIME_LIMIT"
#: Seconds a message's Celery backstop limits allow for loading its model, on top of
#: its jobs' own limits (which count from each job's start); default
#: ``broker.MODEL_LOAD_ALLOWANCE``.
ENV_MODEL_LOAD_SECONDS = "LOGPROBE_MODEL_LOAD_SECONDS"


def model_queue(group: str, backend: str = "hf") -> str:
    """The queue of the workers serving one model or model group: ``logprobe.<backend>.<group>``.

    Start the workers with ``logprobe worker --backend hf --queues logprobe.hf.<group>``
    and submit with ``Client(queue=model_queue(group))`` or ``Client(routes={model: queue})``.
    """
    return f"{QUEUE_PREFIX}.{backend}.{group}"


def progress_key(job_id: str) -> str:
    """Redis hash of a running job's progress: done, total, unit, started, updated, pid, worker."""
    return f"{REDIS_PREFIX}:progress:{job_id}"


def cancel_key(job_id: str) -> str:
    """Redis key whose existence asks the worker running the job to stop it."""
    return f"{REDIS_PREFIX}:cancel:{job_id}"


#: How long progress hashes and cancel flags outlive their last update (seconds).
LIVE_KEY_TTL = 7 * 24 * 3600
