"""The one Celery task: run a list of probe jobs. No model math here."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from api_client.constants import TASK_RUN_PROBES

from .runner import run_jobs


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK_RUN_PROBES, bind=True)
    def run_probes(self: Task, payload: dict[str, Any]) -> None:
        """``payload = {"jobs": [{"id": job_id, "spec": {...}}, ...]}``."""
        run_jobs(payload["jobs"], worker_name=self.request.hostname or "worker")
