"""The one Celery task: run a list of probe jobs. No model math here."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure

from api_client.broker import message_limits
from api_client.constants import TASK_RUN_PROBES
from api_client.sweeps import chunk_messages

from .db_retry import DatabaseUnavailable
from .runner import fail_unfinished, run_jobs

log = logging.getLogger(__name__)


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_RUN_PROBES, bind=True)
    def run_probes(self: Task, payload: dict[str, Any]) -> None:
        """``payload = {"jobs": [{"id": job_id, "spec": {...}, "time_limit": s}, ...]}``."""
        try:
            run_jobs(payload["jobs"], worker_name=self.request.hostname or "worker",
                     resend=partial(send_alone, self.app))
        except DatabaseUnavailable as exc:
            # Results could not be written: put the message back so the jobs run again
            # once the database is back, instead of acknowledging and losing them.
            raise Reject(str(exc), requeue=True) from exc
        except SoftTimeLimitExceeded:
            # Celery's backstop struck (a model that never finishes loading, a step
            # that never returns): fail the jobs still unfinished, then leave this pool
            # process for a fresh one. The limit can strike anywhere, an import half
            # done among the places, and a process left so fails every later job
            # ("module 'sympy' has no attribute 'printing'"). billiard reports a task's
            # own SystemExit as its failed result and replaces the process.
            fail_unfinished(payload["jobs"])
            log.warning("Celery's soft time limit ended a message of %d jobs; replacing "
                        "this pool process", len(payload["jobs"]))
            raise SystemExit("replacing the pool process after Celery's soft time limit"
                             ) from None


def send_alone(app: Celery, jobs: list[tuple[str, dict[str, Any]]]) -> None:
    """Send each of ``jobs`` (``(queue, {"id", "spec", "time_limit"})``) as a message of
    its own, with the limits the client gives such a message (``Client._send``).

    The message that held them is acknowledged only after this returns: a worker that
    dies while sending leaves it to be delivered, and split, again. The copies sent
    before are harmless: a claim skips a finished job, and a running one has a
    heartbeat (``worker.control.live_state``)."""
    rows = [{"id": item["id"], "spec": item["spec"], "time_limit": item.get("time_limit"),
             "queue": queue, "model": item["spec"].get("model", "")} for queue, item in jobs]
    with app.producer_or_acquire() as producer:
        for queue, items in chunk_messages(rows, 1):
            soft, hard = message_limits([items[0]["time_limit"]])
            app.send_task(TASK_RUN_PROBES, args=[{"jobs": items}], queue=queue,
                          producer=producer, soft_time_limit=soft, time_limit=hard)


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
