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
