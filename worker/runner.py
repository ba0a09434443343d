"""The life of a job inside a worker: claim it, run its backend, store the outcome.

Per-process state (the database engine, the backends and their loaded models)
is created on first use in the process that runs tasks, after any fork.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api_client.artifacts import ArtifactStore
from api_client.database import make_engine, make_sessionmaker
from api_client.errors import SpecError
from api_client.settings import Settings
from api_client.specs import parse_spec

from .artifact_output import write_logits
from .backends import get_backend
from .backends.base import AnySpec
from .config import WorkerOptions
from .persistence import claim, store_failure, store_output

log = logging.getLogger(__name__)


class ProcessState:
    """What one worker process keeps between tasks."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.options = WorkerOptions.from_env()
        self.settings = Settings.from_env()
        self._sessions: sessionmaker[Session] | None = None

    def session(self) -> Session:
        if self._sessions is None:
            engine = make_engine(self.settings.resolved_database_url())
            self._sessions = make_sessionmaker(engine)
        return self._sessions()

    @property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore.from_settings(self.settings)

    def backend_options(self, name: str) -> dict[str, Any]:
        if name == "hf":
            return {"max_models": self.options.max_models,
                    "deterministic": self.options.deterministic}
        return {}


_state: ProcessState | None = None


def process_state() -> ProcessState:
    global _state
    if _state is None or _state.pid != os.getpid():  # never reuse a parent's connections
        _state = ProcessState()
    return _state


def run_jobs(items: Iterable[dict[str, Any]], worker_name: str) -> None:
    state = process_state()
    claimed: dict[str, list[tuple[str, AnySpec]]] = defaultdict(list)
    for item in items:
        job_id = item["id"]
        with state.session() as session:
            if not claim(session, job_id, worker_name, state.options.max_attempts):
                log.info("job %s is finished or given up; skipping", job_id)
                continue
        try:
            spec = parse_spec(item["spec"])
        except SpecError as exc:
            with state.session() as session:
                store_failure(session, job_id, exc)
            continue
        claimed[spec.backend].append((job_id, spec))

    for backend_name, jobs in claimed.items():
        try:
            backend = get_backend(backend_name, **state.backend_options(backend_name))
            outputs = backend.run([spec for _, spec in jobs])
        except Exception as exc:  # the backend itself broke: fail its jobs, keep serving
            log.exception("backend %s failed", backend_name)
            outputs = [exc] * len(jobs)
        for (job_id, _), output in zip(jobs, outputs, strict=True):
            if not isinstance(output, Exception) and output.logits is not None:
                output = write_logits(output, job_id, state.artifacts)
            with state.session() as session:
                if isinstance(output, Exception):
                    store_failure(session, job_id, output)
                else:
                    store_output(session, job_id, output)
