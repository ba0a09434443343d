"""The one Celery task: run a list of probe jobs. No model math here."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure

from api_client.constants import TASK_RUN_PROBES

from .db_retry import DatabaseUnavailable
from .runner import fail_unfinished, run_jobs

log = logging.getLogger(__name__)


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_RUN_PROBES, bind=True)
    def run_probes(self: Task, payload: dict[str, Any]) -> None:
        """``payload = {"jobs": [{"id": job_id, "spec": {...}, "time_limit": s}, ...]}``."""
        try:
            run_jobs(payload["jobs"], worker_name=self.request.hostname or "worker")
        except DatabaseUnavailable as exc:
            # Results could not be written: put the message back so the jobs run again
            # once the database is back, instead of acknowledging and losing them.
            raise Reject(str(exc), requeue=True) from exc


@task_failure.connect
def _on_time_limit(sender: Any = None, exception: BaseException | None = None,
                   args: Any = None, **_: Any) -> None:
    """Celery's own (backstop) time limits stopped the task outside the job's own
    checks: mark its still-unfinished jobs failed, so they do not stay 'running'."""
    if getattr(sender, "name", None) != TASK_RUN_PROBES:
        return
    if not isinstance(exception, TimeLimitExceeded | SoftTimeLimitExceeded):
        return
    try:
        jobs = (args or [{}])[0].get("jobs", [])
        fail_unfinished(jobs)
    except Exception:  # never break the worker's failure handling
        log.exception("could not mark timed-out jobs failed")
