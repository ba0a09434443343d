"""Job handles: a job id plus the means to watch it in SQL."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select, update

from .artifacts import ArtifactRef, load_array
from .constants import LIVE_KEY_TTL, cancel_key
from .errors import ArtifactError, JobCancelled, JobFailed, JobNotFound, JobTimeout
from .progress import JobProgress, read_progress, wait_with_bar
from .results import ProbeResult, read_result
from .schema import Artifact, Job, JobStatus

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    from matplotlib.figure import Figure

    from .client import Client

#: Polling starts fast (tiny probes finish in milliseconds) and backs off to this.
_MAX_POLL_INTERVAL = 0.5


class JobHandle:
    """A submitted job. Cheap to create; every query goes to SQL, the system of record."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _row(self) -> Job:
        with self.client.session() as session:
            job = session.get(Job, self.id)
            if job is None:
                raise JobNotFound(f"no job with id {self.id!r} in {self.client.database_url_safe}")
            return job

    def status(self) -> JobStatus:
        return self._row().status

    def info(self) -> dict[str, Any]:
        """The job row as a dict (status, provenance, error, timestamps, ...)."""
        job = self._row()
        return {attr.key: getattr(job, attr.key) for attr in sa_inspect(Job).column_attrs}

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job has finished (succeeded, failed or cancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.01
        while True:
            status = self.status()
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(
                    f"job {self.id} is still {status.value} after {timeout:g}s; "
                    "call result() again with a longer timeout, or check that a worker "
                    "serves its queue (`logprobe status JOB`)"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, _MAX_POLL_INTERVAL)

    def progress(self) -> JobProgress:
        """Live progress: tokens done / total, rate and ETA (from Redis), status (SQL)."""
        return read_progress(self.client.redis, self.id, self.status())

    def cancel(self) -> JobStatus:
        """Ask for the job to stop; returns its status right after asking.

        A queued job is cancelled at once (it never starts). A running job gets a
        cancel flag in Redis: its worker stops it at the next decoding step and
        stores what it computed, marked ``partial``, with status ``cancelled``
        (``wait()`` for it). A finished job stays as it is. Nothing is ever killed.
        """
        status = self.status()
        if status.finished:
            return status
        # The flag first: a worker claiming the job from now on sees it.
        self.client.redis.set(cancel_key(self.id), "1", ex=LIVE_KEY_TTL)
        with self.client.session() as session, session.begin():
            session.execute(
                update(Job)
                .where(Job.id == self.id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.CANCELLED, error="cancelled before it started",
                        error_type="Cancelled", finished_at=datetime.now(timezone.utc))
            )
        return self.status()

    def result(self, timeout: float | None = None, *, progress: bool = False,
               allow_partial: bool = False) -> ProbeResult:
        """Wait for the job and return its result.

        ``progress=True`` draws a progress bar (tokens done / total, rate, ETA) on
        stderr while waiting. Raises :class:`JobFailed` (carrying the worker's error)
        if it failed, :class:`JobCancelled` if it was cancelled, :class:`JobTimeout`
        on timeout; with ``allow_partial=True``, a job that was cancelled or ran out
        of time while running returns what it had computed (``result.partial``).
        """
        if progress:
            wait_with_bar(self, timeout)
        else:
            self.wait(timeout)
        with self.client.session() as session:
            job = session.get(Job, self.id)
            assert job is not None
            if allow_partial and job.partial:
                return read_result(session, job)
            if job.status is JobStatus.FAILED:
                raise JobFailed(job.id, job.error)
            if job.status is JobStatus.CANCELLED:
                raise JobCancelled(job.id, job.error)
            return read_result(session, job)

    def plot(self, path: str | Path | None = None, *, sequence: int = 0,
             timeout: float | None = 0, **options: Any) -> Path | Figure:
        """Draw this job's per-token logprobs (see :mod:`api_client.plot`).

        With ``path`` (``.png`` or ``.html``), writes the file and returns its path;
        without, returns a matplotlib figure (a notebook shows it). ``options``:
        ``width`` / ``height`` in pixels.
        """
        from . import plot

        result = self.result(timeout=timeout)
        if path is None:
            return plot.figure([result], sequence=sequence, **options)
        return plot.write_plot([result], path, sequence=sequence, **options)

    def artifacts(self) -> dict[str, ArtifactRef]:
        """The job's files in the artifact store, by name (``logits``, ``input_embeds``)."""
        with self.client.session() as session:
            rows = session.scalars(select(Artifact).where(Artifact.job_id == self.id)).all()
        return {r.name: ArtifactRef(r.uri, r.sha256, tuple(r.shape), r.dtype, r.num_bytes)
                for r in rows}

    def logits(self, timeout: float | None = None, *, as_torch: bool = False) -> np.ndarray:
        """The full logits the job stored (``return_logits=True``), checked against their
        sha256: a numpy array, or a torch tensor with ``as_torch=True``.

        Score probes: ``[positions, vocab]``; generate probes: ``[sequences, steps, vocab]``.
        """
        self.result(timeout)  # raises if the job failed
        ref = self.artifacts().get("logits")
        if ref is None:
            raise ArtifactError(
                f"job {self.id} stored no logits; submit it with return_logits=True"
            )
        array = load_array(ref.uri, ref.sha256)
        if tuple(array.shape) != ref.shape or str(array.dtype) != ref.dtype:
            raise ArtifactError(
                f"logits of job {self.id} at {ref.uri} are {array.dtype} {list(array.shape)}, "
                f"not the recorded {ref.dtype} {list(ref.shape)}"
            )
        if as_torch:
            import torch  # only when asked: the client does not need torch

            return torch.from_numpy(array.copy())  # type: ignore[return-value]
        return array
