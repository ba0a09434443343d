"""The life of a job inside a worker: claim it, run its backend, store the outcome.

Per-process state (the database engine, the backends and their loaded models)
is created on first use in the process that runs tasks, after any fork.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeGuard, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from api_client.artifacts import ArtifactStore
from api_client.broker import default_job_time_limit, redis_client
from api_client.constants import progress_key
from api_client.database import make_engine, make_sessionmaker
from api_client.errors import SpecError
from api_client.reuse import reuse_allowed, spec_hash
from api_client.schema import JobStatus
from api_client.settings import Settings
from api_client.specs import parse_spec

from .artifact_output import write_logits
from .backends import get_backend
from .backends.base import AnySpec, Backend, ProbeOutput, failure_provenance
from .bulk_persistence import claim_message, store_outputs
from .config import WorkerOptions
from .control import (
    CANCELLED,
    TIME_LIMIT,
    JobControl,
    JobStopped,
    Monitor,
    live_owner,
    live_state,
    monitoring,
    running_here,
)
from .db_retry import DatabaseUnavailable, with_db_retry
from .failures import cancel_message, describe_failure, release_memory, time_limit_message
from .output_checks import nan_logprobs_error
from .persistence import claims_of, store_cancelled, store_failure, store_output
from .result_reuse import copy_results, find_sources

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A claimed job: its id, its spec and its control (time limit, cancel flag, progress).
ClaimedJob = tuple[str, AnySpec, JobControl]


class ProcessState:
    """What one worker process keeps between tasks."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.options = WorkerOptions.from_env()
        self.settings = Settings.from_env()
        self._sessions: sessionmaker[Session] | None = None
        self._redis: Any | None = None

    def session(self) -> Session:
        if self._sessions is None:
            engine = make_engine(self.settings.resolved_database_url())
            self._sessions = make_sessionmaker(engine)
        return self._sessions()

    @property
    def artifacts(self) -> ArtifactStore:
        return ArtifactStore.from_settings(self.settings)

    @property
    def redis(self) -> Any:
        """This process's Redis client (progress, cancel flags); created on first use."""
        if self._redis is None:
            self._redis = redis_client(self.settings.resolved_redis_url(),
                                       socket_timeout=5, socket_connect_timeout=5,
                                       health_check_interval=10)
        return self._redis

    def backend_options(self, name: str) -> dict[str, Any]:
        if name == "hf":
            return {"max_models": self.options.max_models,
                    "deterministic": self.options.deterministic,
                    "fused_activations": self.options.fused_activations}
        return {}


_state: ProcessState | None = None


def process_state() -> ProcessState:
    global _state
    if _state is None or _state.pid != os.getpid():  # never reuse a parent's connections
        _state = ProcessState()
    return _state


def _with_session(state: ProcessState, what: str, action: Callable[[Session], T]) -> T:
    """Run one SQL action in a fresh session, retried while the database is unreachable."""

    def attempt() -> T:
        with state.session() as session:
            return action(session)

    return with_db_retry(attempt, what)


def _store(state: ProcessState, what: str, action: Callable[[Session], object]) -> None:
    _with_session(state, what, action)


def _finish(state: ProcessState, job_id: str, output: ProbeOutput | Exception,
            control: JobControl) -> None:
    """Store one job's outcome: its rows, its partial rows, or its error."""
    if not isinstance(output, Exception) and output.logits is not None:
        output = write_logits(output, job_id, state.artifacts)
    started_at = _started_at(control)
    if isinstance(output, JobStopped) and control.stop_reason is not None:
        _store_stopped(state, job_id, output, control, started_at)
    elif isinstance(output, Exception):
        error_type, message = describe_failure(output, control)
        log.info("job %s failed: %s", job_id, message)
        # The traceback's frames hold the failed job's tensors; drop them before freeing.
        output.__traceback__ = None
        if error_type == "OutOfMemory":
            release_memory()
        _store(state, f"store the failure of job {job_id}",
               lambda s: store_failure(s, job_id, message, error_type=error_type,
                                       started_at=started_at,
                                       provenance=failure_provenance(output)))
    elif control.stop_reason == CANCELLED:
        _store(state, f"store cancelled job {job_id}",
               lambda s: store_output(s, job_id, output, status=JobStatus.CANCELLED,
                                      partial=True, error=cancel_message(control),
                                      error_type="Cancelled", started_at=started_at))
    elif control.stop_reason == TIME_LIMIT:
        _store(state, f"store timed-out job {job_id}",
               lambda s: store_output(s, job_id, output, status=JobStatus.FAILED,
                                      partial=True,
                                      error=time_limit_message(control.time_limit, control),
                                      error_type="TimeLimitExceeded", started_at=started_at))
    else:
        _store(state, f"store the result of job {job_id}",
               lambda s: store_output(s, job_id, output, started_at=started_at))


def _store_stopped(state: ProcessState, job_id: str, stopped: JobStopped,
                   control: JobControl, started_at: datetime | None) -> None:
    """A job its backend stopped before it had anything to store: no rows, not partial."""
    sent = failure_provenance(stopped)  # e.g. the request an OpenAI job had sent
    if control.stop_reason == CANCELLED:
        _store(state, f"store cancelled job {job_id}", lambda s: store_cancelled(
            s, job_id, f"cancelled {stopped.when}", started_at=started_at, provenance=sent))
        return
    message = time_limit_message(control.time_limit, when=stopped.when)
    _store(state, f"store timed-out job {job_id}", lambda s: store_failure(
        s, job_id, message, error_type="TimeLimitExceeded", started_at=started_at,
        provenance=sent))


#: Sends jobs of a message again, one message each: ``[(queue, item)]`` with ``item``
#: as in :func:`run_jobs` (see ``tasks.send_alone``).
Resend = Callable[[list[tuple[str, dict[str, Any]]]], None]


def run_jobs(items: Iterable[dict[str, Any]], worker_name: str,
             resend: Resend | None = None) -> None:
    """Claim the jobs, run the claimed ones on their backend, store every outcome.

    ``items`` are ``{"id", "spec", "time_limit"?}``. Claiming reads heartbeats and
    cancel flags in Redis (:func:`live_state`: jobs another live process, or another
    thread of this one, is running are left to it; a job whose flag is set is
    cancelled without running) and is one SQL transaction. From the claim until
    their outcomes are stored the jobs have a heartbeat (:class:`Monitor`).

    ``resend``: a message delivered again after its worker stopped (some of its
    unfinished jobs ran before) is not run but sent again one message per job
    (:func:`~worker.bulk_persistence.claim_message`), so that a job that kills its
    worker uses up its own attempts, not its message mates'.
    """
    state = process_state()
    items = list(items)
    ids = [item["id"] for item in items]
    live = live_state(state.redis, ids)
    elsewhere = dict(live.running_elsewhere)
    mine = running_here.reserve([job_id for job_id in ids if job_id not in elsewhere])
    try:
        for job_id in ids:  # taken by another thread since live_state read
            if job_id not in mine and job_id not in elsewhere:
                elsewhere[job_id] = f"this process (pid {os.getpid()}, another thread)"
        for job_id, owner in elsewhere.items():  # a redelivered message; stored once by owner
            log.info("job %s is running in %s; not running it twice", job_id, owner)
        _claim_and_run(state, [item for item in items if item["id"] in mine],
                       live.cancelled, worker_name, resend)
    finally:
        running_here.release(mine)


def _claim_and_run(state: ProcessState, candidates: list[dict[str, Any]],
                   cancelled: set[str], worker_name: str, resend: Resend | None) -> None:
    claim = _with_session(
        state, f"claim {len(candidates)} jobs",
        lambda s: claim_message(s, [item["id"] for item in candidates], worker_name,
                                state.options.max_attempts, split=resend is not None))
    if claim.alone:
        assert resend is not None
        log.info("a message of %d jobs delivered again after its worker stopped: sending "
                 "them again one a message, so that each counts its own attempts",
                 len(claim.alone))
        resend([(claim.alone[item["id"]], item) for item in candidates
                if item["id"] in claim.alone])
        return
    runnable = set(claim.claimed)
    for item in candidates:
        if item["id"] not in runnable:
            log.info("job %s is finished or given up; skipping", item["id"])
    controls = {item["id"]: JobControl(item["id"], time_limit=float(
                    item.get("time_limit") or default_job_time_limit()),
                    redis=state.redis, worker=worker_name)
                for item in candidates if item["id"] in runnable}
    # Every claimed job has a heartbeat from now until its outcome is stored.
    monitor = Monitor(list(controls.values()))
    monitor.announce()
    monitor.start()
    try:
        _run_claimed(state, candidates, controls, cancelled, monitor)
    finally:
        monitor.stop()


def _run_claimed(state: ProcessState, candidates: list[dict[str, Any]],
                 controls: dict[str, JobControl], cancelled: set[str],
                 monitor: Monitor) -> None:
    claimed: dict[str, list[ClaimedJob]] = defaultdict(list)
    for item in candidates:
        job_id = item["id"]
        if job_id not in controls:
            continue
        if job_id in cancelled:
            _store(state, f"cancel job {job_id}",
                   lambda s, job_id=job_id: store_cancelled(s, job_id,
                                                            "cancelled before it started"))
            continue
        try:
            spec = parse_spec(item["spec"])
        except SpecError as exc:
            _store(state, f"store the failure of job {job_id}",
                   lambda s, job_id=job_id, exc=exc: store_failure(s, job_id, exc))
            continue
        claimed[spec.backend].append((job_id, spec, controls[job_id]))

    for backend_name, jobs in claimed.items():
        twins: dict[str, str] = {}
        try:
            backend = get_backend(backend_name, **state.backend_options(backend_name))
            jobs, twins = _reuse(state, backend, jobs)
        except SoftTimeLimitExceeded:
            raise  # Celery's backstop: the message ends here (tasks.run_probes)
        except Exception:  # reuse is an optimisation: on any trouble, just run the jobs
            log.exception("result reuse failed; running the jobs")
        waiting = [job for job in claimed[backend_name] if job[0] in twins]
        while jobs:  # a twin whose first did not succeed runs in the next round
            _run_and_store(state, backend_name, jobs, waiting, monitor)
            jobs, waiting, twins = _settle_twins(state, waiting, twins)


class EarlyStore:
    """Stores the plain successes of each batch the backend hands on (``on_ready``) on
    one background thread, in one transaction a batch, while the backend computes the
    next: on a GPU the next forward pass runs while the last batch's rows are written.
    :meth:`stored` waits for the writes and returns the ids written; a batch whose
    write the database refused is left to the caller (job by job, as at the end); a
    database that stayed unreachable is re-raised there."""

    def __init__(self, state: ProcessState, jobs: list[ClaimedJob]) -> None:
        self.state = state
        self.jobs = jobs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._writes: list[Future[set[str]]] = []

    def __call__(self, indices: Sequence[int],
                 outputs: Sequence[ProbeOutput | Exception]) -> None:
        plain = []
        values = {}
        for index, output in zip(indices, outputs, strict=True):
            job_id, spec, control = self.jobs[index]
            output = _refuse_nan(output)
            if _is_plain(output, control):
                plain.append((job_id, output))
                values[job_id] = _job_values(spec, control)
        if plain:
            self._writes.append(self._pool.submit(_store_batch, self.state, plain, values))

    def stored(self) -> set[str]:
        self._pool.shutdown(wait=True)
        written: set[str] = set()
        unavailable: DatabaseUnavailable | None = None
        for write in self._writes:
            try:
                written |= write.result()
            except DatabaseUnavailable as exc:
                unavailable = exc
        if unavailable is not None:
            raise unavailable
        return written


def _is_plain(output: ProbeOutput | Exception, control: JobControl
              ) -> TypeGuard[ProbeOutput]:
    """A success stored in bulk: not failed, not stopped, no logits artifact to write."""
    return (not isinstance(output, Exception) and control.stop_reason is None
            and output.logits is None and not output.artifacts)


def _run_and_store(state: ProcessState, backend_name: str, jobs: list[ClaimedJob],
                   waiting: list[ClaimedJob], monitor: Monitor) -> None:
    """Run ``jobs`` on their backend and store every outcome, batches the backend hands
    on early while it computes the rest (:class:`EarlyStore`). The cancel flags of the
    ``waiting`` twins are watched meanwhile (and their heartbeats written) by
    ``monitor``, the message's, which the caller started and stops."""
    outputs: list[ProbeOutput | Exception]
    early = EarlyStore(state, jobs) if state.options.store_while_computing else None
    try:
        with monitoring([(spec, control) for _, spec, control in (*jobs, *waiting)], monitor):
            try:
                backend = get_backend(backend_name, **state.backend_options(backend_name))
                outputs = backend.run([spec for _, spec, _ in jobs], on_ready=early)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # the backend itself broke: fail its jobs, keep serving
                log.exception("backend %s failed", backend_name)
                outputs = [exc] * len(jobs)
    finally:
        stored_early = early.stored() if early is not None else set()
    returned = time.monotonic()
    # (the early store checked its own outputs already)
    outputs = [output if job_id in stored_early else _refuse_nan(output)
               for (job_id, _, _), output in zip(jobs, outputs, strict=True)]
    # Plain successes in one bulk transaction; failures, stopped and logits jobs alone.
    plain = [(job_id, output) for (job_id, _, control), output in zip(jobs, outputs,
                                                                      strict=True)
             if job_id not in stored_early and _is_plain(output, control)]
    plain_ids = {job_id for job_id, _ in plain}
    stored = stored_early | _store_batch(state, plain, {job_id: _job_values(spec, control)
                                                        for job_id, spec, control in jobs
                                                        if job_id in plain_ids})
    for (job_id, _, control), output in zip(jobs, outputs, strict=True):
        if job_id in stored:
            continue
        try:
            _finish(state, job_id, output, control)
        except (DatabaseUnavailable, SoftTimeLimitExceeded):
            raise  # the message goes back to the queue (see tasks.run_probes) / ends
        except Exception as exc:  # the database refused this job's outcome
            _fail_unstorable(state, job_id, exc)
            continue
        if control.stopped_at is not None:
            log.info("job %s stopped (%s) at %d/%s %s; results ready %.0f ms and stored "
                     "%.0f ms later", job_id, control.stop_reason, control.done,
                     control.total, control.unit, 1000 * (returned - control.stopped_at),
                     1000 * (time.monotonic() - control.stopped_at))
    # A backend fails the job it was on when Celery's soft limit strikes, and may go
    # on; the message ends here, its other jobs failed by the backstop.
    expired = next((o for o in outputs if isinstance(o, SoftTimeLimitExceeded)), None)
    if expired is not None:
        raise expired


def _refuse_nan(output: ProbeOutput | Exception) -> ProbeOutput | Exception:
    if isinstance(output, Exception):
        return output
    return nan_logprobs_error(output) or output


def _started_at(control: JobControl) -> datetime | None:
    """When the job's own compute began (None: it never began)."""
    if control.begun_at is None:
        return None
    return datetime.fromtimestamp(control.begun_at, timezone.utc)


def _job_values(spec: AnySpec, control: JobControl) -> dict[str, Any]:
    """Job-row values a bulk store sets besides the output's."""
    values: dict[str, Any] = {"spec_hash": spec_hash(spec)}
    started_at = _started_at(control)
    if started_at is not None:
        values["started_at"] = started_at
    return values


def _fail_unstorable(state: ProcessState, job_id: str, exc: Exception) -> None:
    """Fail a job whose outcome the database refused (a constraint, a value it cannot
    hold), in a fresh session, with the database's reason."""
    log.exception("job %s: its outcome could not be stored; failing it", job_id)
    reason = getattr(exc, "orig", None) or exc
    first_line = (str(reason).strip().splitlines() or [type(exc).__name__])[0][:500]
    message = f"the job's result could not be stored: {first_line}"
    try:
        _store(state, f"fail job {job_id}", lambda s: store_failure(
            s, job_id, message, error_type=type(exc).__name__))
    except (DatabaseUnavailable, SoftTimeLimitExceeded):
        raise
    except Exception:
        log.exception("job %s: not even its failure could be stored", job_id)


def _reuse(state: ProcessState, backend: Backend, jobs: list[ClaimedJob]
           ) -> tuple[list[ClaimedJob], dict[str, str]]:
    """Answer jobs identical to finished ones from SQL; of identical jobs within this
    batch keep the first. Returns the jobs left to run and ``{duplicate: first}``."""
    candidates = [(job_id, spec) for job_id, spec, _ in jobs
                  if reuse_allowed(spec) and not getattr(spec, "return_logits", False)
                  and getattr(spec, "embedding", None) is None]  # artifacts are not copied
    if not candidates:
        return jobs, {}
    identities = _identities(backend, candidates)
    hashes = {job_id: spec_hash(spec) for job_id, spec in candidates}
    wanted = [(job_id, hashes[job_id], identities[job_id]) for job_id, _ in candidates
              if identities[job_id] is not None]
    sources = _with_session(state, "find reusable results",
                            lambda s: find_sources(s, wanted))  # type: ignore[arg-type]
    copied: set[str] = set()
    if sources:
        copied = set(_with_session(state, "copy reused results",
                                   lambda s: copy_results(s, sources)))
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for job_id, _ in candidates:
        if job_id in copied or identities[job_id] is None:
            continue
        if hashes[job_id] in first:
            duplicates[job_id] = first[hashes[job_id]]
        else:
            first[hashes[job_id]] = job_id
    left = [job for job in jobs if job[0] not in copied and job[0] not in duplicates]
    return left, duplicates


def _identities(backend: Backend,
                jobs: list[tuple[str, AnySpec]]) -> dict[str, dict[str, Any] | None]:
    """The backend's identity per job (None where it has none or cannot tell now)."""
    by_model: dict[tuple[Any, ...], dict[str, Any] | None] = {}
    result: dict[str, dict[str, Any] | None] = {}
    for job_id, spec in jobs:
        key = (spec.model, getattr(spec, "revision", None), getattr(spec, "dtype", None),
               getattr(spec, "device", None), getattr(spec, "device_map", None))
        if key not in by_model:
            try:
                by_model[key] = backend.identity(spec)
            except SoftTimeLimitExceeded:
                raise  # not a model that does not load: loading it again would not end
            except Exception:  # e.g. the model does not load: the run reports it
                by_model[key] = None
        result[job_id] = by_model[key]
    return result


def _settle_twins(state: ProcessState, waiting: list[ClaimedJob], twins: dict[str, str]
                  ) -> tuple[list[ClaimedJob], list[ClaimedJob], dict[str, str]]:
    """After a round: end the waiting twins that were cancelled, give the others their
    first twin's rows where it succeeded. Those whose first did not succeed (cancelled,
    out of time, failed) are run themselves: returns the jobs of the next round, the
    twins that wait on them, and ``{twin: first}`` for those."""
    for job_id, _, control in waiting:
        if control.cancel_requested:
            _store(state, f"cancel job {job_id}", lambda s, job_id=job_id: store_cancelled(
                s, job_id, "cancelled before it started (it was waiting for an identical "
                "job of its message)"))
    sources = {job_id: twins[job_id] for job_id, _, control in waiting
               if not control.cancel_requested}
    copied: set[str] = set()
    if sources:
        try:
            copied = set(_with_session(state, "copy results to identical jobs",
                                       lambda s: copy_results(s, sources)))
        except (DatabaseUnavailable, SoftTimeLimitExceeded):
            raise
        except Exception:  # then the twins run themselves
            log.exception("copying results to identical jobs failed")
    run: list[ClaimedJob] = []
    replaced: dict[str, str] = {}  # first twin that did not succeed -> its stand-in
    next_twins: dict[str, str] = {}
    for job in waiting:
        job_id = job[0]
        if job_id not in sources or job_id in copied:
            continue
        source = sources[job_id]
        if source in replaced:
            next_twins[job_id] = replaced[source]
        else:
            log.info("job %s: its identical job %s did not succeed; running it", job_id,
                     source)
            replaced[source] = job_id
            run.append(job)
    return run, [job for job in waiting if job[0] in next_twins], next_twins


def _store_batch(state: ProcessState, done: list[tuple[str, ProbeOutput]],
                 extra: dict[str, dict[str, Any]]) -> set[str]:
    """Store a batch of plain successes in one transaction; returns the ids it handled.
    If the batch fails, returns none of them: each is then stored alone by ``_finish``.
    A database that stayed unreachable for the whole retry window is not tried again
    job by job (a window each): the message goes back to the queue at once."""
    if not done:
        return set()
    try:
        _with_session(state, f"store a batch of {len(done)} results",
                      lambda s: store_outputs(s, done, extra))
    except (DatabaseUnavailable, SoftTimeLimitExceeded):
        raise
    except Exception:
        log.exception("storing a batch of %d failed; storing job by job", len(done))
        return set()
    return {job_id for job_id, _ in done}


#: How a job Celery's backstop stopped is described (it stores no rows).
BACKSTOP_STOP = ("when Celery's time limit for its message (the sum of its jobs' limits) "
                 "stopped the worker")

#: Seconds a claim's time (``jobs.started_at``, the claiming process's clock) may read
#: before the task's start as Celery's main process reckons it (``Request.time_start``).
CLAIM_CLOCK_SLACK = 1.0


@dataclass(frozen=True)
class TaskProcess:
    """Where and when a Celery task ran: the worker's name (``jobs.worker`` of the jobs
    it claims), the pid of the process that ran it (its jobs' heartbeats name it) and
    when it began (epoch seconds; its claim comes after)."""

    worker: str
    pid: int
    started: float


def fail_unfinished(items: Iterable[dict[str, Any]], task: TaskProcess
                    ) -> list[tuple[str, dict[str, Any]]]:
    """Fail the jobs of a message Celery's backstop stopped (its soft or hard time limit)
    that ``task`` claimed; return ``(queue, item)`` of its unfinished jobs no one runs.

    A message's jobs are not all its task's: a job another process runs (a redelivered
    copy of a message whose jobs a split spread over workers, a job the claim left to
    the live process running it: :func:`live_state`) must go on and store its result.
    So a job is failed (``TimeLimitExceeded``) only if its row says ``task`` claimed it
    (``running``, ``jobs.worker`` = the task's worker, ``jobs.started_at``, the claim's
    time, not before the task began) and its heartbeat, if it has one, is the task
    process's (another pool process of the same worker has the same name): one
    ``UPDATE`` a job, conditional on that claim (``store_failure(claim=...)``).

    The others are left as they are. Those a live process runs (a fresh heartbeat, not
    final, of another process) store their own outcome. Those no one runs (``queued``
    jobs the task never claimed: its claim was stuck or split the message; jobs whose
    runner died) are returned: the caller gets them delivered again (Celery requeues
    a message whose pool process the soft limit ended; after the hard limit, which
    acknowledges it, ``tasks.send_alone`` sends them one a message). A job never
    claimed has spent no attempt, and a claim is all a stuck message did to it.
    """
    state = process_state()
    by_id = {item["id"]: item for item in items}
    if not by_id:
        return []
    rows = _with_session(state, f"read the claims of {len(by_id)} timed-out jobs",
                         lambda s: claims_of(s, list(by_id)))
    beats = _heartbeats(state, list(by_id))
    host = socket.gethostname()
    failed: list[str] = []
    elsewhere: list[str] = []
    orphans: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        if row.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            continue  # finished meanwhile (stored by this task or another)
        beat = beats.get(row.id, {})
        task_beat = (beat.get("host") == host and beat.get("pid") == str(task.pid))
        if (row.status is JobStatus.RUNNING and row.worker == task.worker
                and row.started_at is not None
                and row.started_at.timestamp() >= task.started - CLAIM_CLOCK_SLACK
                and (not beat or task_beat)):
            if _fail_claimed(state, by_id[row.id], (task.worker, row.attempts)):
                failed.append(row.id)
        elif not task_beat and live_owner(beat) is not None:
            elsewhere.append(row.id)
        else:
            orphans.append((row.queue, by_id[row.id]))
    log.warning("Celery's time limit stopped a message of %d jobs (its task: pid %d of %s, "
                "began %s): failed the %d its task claimed (%s); %d run elsewhere (%s), %d "
                "to be delivered again (%s)", len(by_id), task.pid, task.worker,
                datetime.fromtimestamp(task.started, timezone.utc).isoformat(timespec="seconds"),
                len(failed), " ".join(failed) or "-", len(elsewhere),
                " ".join(elsewhere) or "-", len(orphans),
                " ".join(item["id"] for _, item in orphans) or "-")
    return orphans


def _fail_claimed(state: ProcessState, item: dict[str, Any], claim: tuple[str, int]) -> bool:
    """Fail ``item``'s job as stopped by Celery's backstop if it still runs under
    ``claim`` (``(worker, attempts)``)."""
    limit = float(item.get("time_limit") or default_job_time_limit())
    message = time_limit_message(limit, when=BACKSTOP_STOP)
    return _with_session(state, f"fail job {item['id']}", lambda s: store_failure(
        s, item["id"], message, error_type="TimeLimitExceeded", claim=claim))


def _heartbeats(state: ProcessState, job_ids: list[str]) -> dict[str, dict[str, str]]:
    """The jobs' heartbeats (:class:`Monitor`), in one round trip; none if Redis cannot
    be read (then the rows alone tell whose the jobs are)."""
    try:
        pipe = state.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(progress_key(job_id))
        replies = pipe.execute()
    except Exception as exc:
        log.warning("could not read the heartbeats of %d timed-out jobs: %s", len(job_ids),
                    exc)
        return {}
    return {job_id: {k.decode(): v.decode() for k, v in raw.items()}
            for job_id, raw in zip(job_ids, replies, strict=True) if raw}
