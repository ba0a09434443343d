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

from api_client.database import make_engine, make_sessionmaker
from api_client.errors import SpecError
from api_client.reuse import reuse_allowed, spec_hash
from api_client.settings import Settings
from api_client.specs import parse_spec

from .backends import get_backend
from .backends.base import AnySpec, Backend, ProbeOutput
from .bulk_persistence import claim_many, store_outputs
from .config import WorkerOptions
from .persistence import store_failure
from .result_reuse import copy_results, find_sources

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
    """Claim a message's jobs together, answer what can be reused from SQL, run the
    rest through their backend in one batch per backend, store each batch at once."""
    state = process_state()
    items = list(items)
    with state.session() as session:
        claimed_ids = set(claim_many(session, [item["id"] for item in items], worker_name,
                                     state.options.max_attempts))
    skipped = len(items) - len(claimed_ids)
    if skipped:
        log.info("%d job(s) finished or given up already; skipping", skipped)
    claimed: dict[str, list[tuple[str, AnySpec]]] = defaultdict(list)
    for item in items:
        job_id = item["id"]
        if job_id not in claimed_ids:
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
        except Exception as exc:
            log.exception("backend %s failed to start", backend_name)
            for job_id, _ in jobs:
                with state.session() as session:
                    store_failure(session, job_id, exc)
            continue
        run_batch(state, backend, jobs)


def run_batch(state: ProcessState, backend: Backend, jobs: list[tuple[str, AnySpec]]) -> None:
    hashes = {job_id: spec_hash(spec) for job_id, spec in jobs}
    # Identical probes: answered from an earlier job, or from the first of this batch.
    reusable = [(job_id, spec) for job_id, spec in jobs if reuse_allowed(spec)]
    duplicates: dict[str, str] = {}
    if reusable:
        identities = _identities(backend, reusable)
        with state.session() as session:
            sources = find_sources(session, [(job_id, hashes[job_id], identities[job_id])
                                             for job_id, _ in reusable
                                             if identities[job_id] is not None])
        if sources:
            with state.session() as session:
                copied = set(copy_results(session, sources))
            jobs = [(job_id, spec) for job_id, spec in jobs if job_id not in copied]
        first: dict[str, str] = {}
        for job_id, spec in jobs:
            if reuse_allowed(spec) and identities.get(job_id) is not None:
                key = hashes[job_id]
                if key in first:
                    duplicates[job_id] = first[key]
                else:
                    first[key] = job_id
        jobs = [(job_id, spec) for job_id, spec in jobs if job_id not in duplicates]
    try:
        outputs = backend.run([spec for _, spec in jobs])
    except Exception as exc:  # the backend itself broke: fail its jobs, keep serving
        log.exception("backend %s failed", backend.name)
        outputs = [exc] * len(jobs)
    done: list[tuple[str, ProbeOutput]] = []
    for (job_id, _), output in zip(jobs, outputs, strict=True):
        if isinstance(output, Exception):
            with state.session() as session:
                store_failure(session, job_id, output)
        else:
            done.append((job_id, output))
    _store(state, done, {job_id: {"spec_hash": hashes[job_id]} for job_id, _ in done})
    if duplicates:
        failed = {job_id for (job_id, _), out in zip(jobs, outputs, strict=True)
                  if isinstance(out, Exception)}
        with state.session() as session:
            copy_results(session, {d: s for d, s in duplicates.items() if s not in failed})
        for dup, source in duplicates.items():
            if source in failed:
                with state.session() as session:
                    store_failure(session, dup, f"an identical job in the same batch "
                                                f"({source}) failed; see its error")


def _store(state: ProcessState, done: list[tuple[str, ProbeOutput]],
           extra: dict[str, dict[str, Any]]) -> None:
    """Store a batch in one transaction; if that fails, job by job, so one job whose
    rows the database refuses fails alone (with the reason) instead of the batch
    staying 'running'."""
    try:
        with state.session() as session:
            store_outputs(session, done, extra)
        return
    except Exception:
        log.exception("storing a batch of %d failed; storing job by job", len(done))
    for item in done:
        try:
            with state.session() as session:
                store_outputs(session, [item], extra)
        except Exception as exc:
            log.exception("storing job %s failed", item[0])
            with state.session() as session:
                store_failure(session, item[0], f"the worker could not store this job's "
                                                f"result: {type(exc).__name__}: {exc}")


def _identities(backend: Backend,
                jobs: list[tuple[str, AnySpec]]) -> dict[str, dict[str, Any] | None]:
    """The backend's identity per job (None where it has none or cannot tell now)."""
    by_model: dict[tuple[Any, ...], dict[str, Any] | None] = {}
    result: dict[str, dict[str, Any] | None] = {}
    for job_id, spec in jobs:
        key = (spec.model, getattr(spec, "revision", None), getattr(spec, "dtype", None),
               getattr(spec, "device", None))
        if key not in by_model:
            try:
                by_model[key] = backend.identity(spec)
            except Exception:  # e.g. the model does not load: the run reports it
                by_model[key] = None
        result[job_id] = by_model[key]
    return result
