"""The one Celery task: run a list of probe jobs. No model math here."""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from api_client.broker import message_limits
from api_client.constants import TASK_RUN_PROBES
from api_client.messages import chunk_messages

from .db_retry import DatabaseUnavailable
from .runner import TaskProcess, fail_unfinished, run_jobs

log = logging.getLogger(__name__)


class ProbesRequest(Request):  # type: ignore[misc]
    """A ``run_probes`` message in the worker's main process: after Celery's hard time
    limit (the pool process is killed right after this handler), fails the jobs the
    message's task claimed and sends again the ones no one runs
    (:func:`~worker.runner.fail_unfinished`). The request knows which pool process ran
    the task and when it began, which tells its jobs from those of other processes."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft or worker_state.should_terminate:  # (Celery's cold shutdown: not a limit)
            return
        try:
            jobs = (self.args or [{}])[0].get("jobs", [])
            # The hard limit counts from the task's start: time_start (epoch seconds in
            # Celery 5.7, its pool's clock in some earlier versions) or, if it does
            # not read as a time within that limit, the limit back from now.
            now = time.time()
            started = self.time_start
            if not isinstance(started, int | float) or not (
                    now - timeout - 60 <= started <= now):
                started = now - timeout
            task = TaskProcess(self.hostname or "worker", int(self.worker_pid or 0),
                               float(started))
            orphans = fail_unfinished(jobs, task)
            if orphans:
                send_alone(self.task.app, orphans)
        except Exception:  # never break the worker's timeout handling
            log.exception("could not settle the jobs of a message Celery's hard time "
                          "limit stopped")


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_RUN_PROBES, bind=True, Request=ProbesRequest)
    def run_probes(self: Task, payload: dict[str, Any]) -> None:
        """``payload = {"jobs": [{"id": job_id, "spec": {...}, "time_limit": s}, ...]}``."""
        started = time.time()
        worker_name = self.request.hostname or "worker"
        try:
            run_jobs(payload["jobs"], worker_name=worker_name,
                     resend=partial(send_alone, self.app))
        except DatabaseUnavailable as exc:
            # Results could not be written: put the message back so the jobs run again
            # once the database is back, instead of acknowledging and losing them.
            raise Reject(str(exc), requeue=True) from exc
        except SoftTimeLimitExceeded:
            # Celery's backstop struck (a model that never finishes loading, a step
            # that never returns): fail the jobs this process claimed for this message
            # and has not finished (not its jobs that other processes run), then leave
            # this pool process for a fresh one. The limit can strike anywhere, an
            # import half done among the places, and a process left so fails every
            # later job ("module 'sympy' has no attribute 'printing'"). billiard
            # reports a task's own SystemExit as a lost worker, which puts the message
            # back (task_reject_on_worker_lost): its jobs no one runs are delivered
            # again, the ones failed here are skipped then.
            fail_unfinished(payload["jobs"], TaskProcess(worker_name, os.getpid(), started))
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
