"""Live progress of a job: what the worker reports in Redis, read back for humans.

While a job runs, its worker keeps a Redis hash (``constants.progress_key``) with
the units done and in total (tokens scored or generated), when compute began and
when the hash was last written (a heartbeat, every ~0.5 s). SQL stays the system
of record for the status; this is only the live view.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .constants import progress_key
from .schema import JobStatus

if TYPE_CHECKING:
    from .jobs import JobHandle


@dataclass(frozen=True)
class JobProgress:
    """A snapshot of a job's progress. ``done``/``total`` are None before the worker
    reports (queued, loading the model) or when Redis holds nothing for it."""

    job_id: str
    status: JobStatus
    done: int | None = None
    total: int | None = None
    unit: str = "tokens"
    started_at: float | None = None  # epoch seconds when compute began
    updated_at: float | None = None  # epoch seconds of the worker's last report
    worker: str | None = None
    pid: int | None = None

    @property
    def fraction(self) -> float | None:
        if self.status is JobStatus.SUCCEEDED:
            return 1.0
        if self.done is None or not self.total:
            return None
        return min(1.0, self.done / self.total)

    @property
    def rate(self) -> float | None:
        """Units per second since compute began."""
        if self.done is None or self.started_at is None or self.updated_at is None:
            return None
        elapsed = self.updated_at - self.started_at
        return self.done / elapsed if elapsed > 0 and self.done > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current rate (an upper bound for generation, which may
        stop at an end-of-sequence token before ``total``)."""
        rate = self.rate
        if rate is None or self.total is None or self.done is None or self.status.finished:
            return None
        return max(0.0, (self.total - self.done) / rate)

    @property
    def heartbeat_age(self) -> float | None:
        """Seconds since the worker last reported (None: it never did)."""
        return None if self.updated_at is None else max(0.0, time.time() - self.updated_at)

    def describe(self) -> str:
        """``1200/10000 tokens (12.0%), 410.5 tokens/s, ETA 21s``, or the status."""
        if self.done is None or self.total is None:
            return self.status.value
        parts = [f"{self.done}/{self.total} {self.unit} ({100 * (self.fraction or 0):.1f}%)"]
        if self.rate is not None:
            parts.append(f"{self.rate:.1f} {self.unit}/s")
        if self.eta_seconds is not None:
            parts.append(f"ETA {self.eta_seconds:.0f}s")
        return ", ".join(parts)


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def read_progress(redis: Any, job_id: str, status: JobStatus) -> JobProgress:
    """The job's progress hash (if Redis has one) with its SQL ``status``."""
    try:
        fields = _decode(redis.hgetall(progress_key(job_id)))
    except Exception:  # Redis unreachable: the status from SQL is still true
        fields = {}

    def number(name: str, kind: type = float) -> Any:
        value = fields.get(name)
        return None if value in (None, "") else kind(float(value))

    return JobProgress(
        job_id=job_id,
        status=status,
        done=number("done", int),
        total=number("total", int),
        unit=fields.get("unit") or "tokens",
        started_at=number("started"),
        updated_at=number("updated"),
        worker=fields.get("worker") or None,
        pid=number("pid", int),
    )


def wait_with_bar(job: JobHandle, timeout: float | None = None, *, file: Any = None,
                  interval: float = 0.25) -> JobStatus:
    """Wait for ``job`` like :meth:`JobHandle.wait`, drawing a progress bar (tqdm)."""
    from tqdm import tqdm

    from .errors import JobTimeout

    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=None, desc=f"job {job.id[:8]}", unit="tok", file=file or sys.stderr,
               dynamic_ncols=True, leave=True)
    try:
        while True:
            progress = job.progress()
            if progress.total is not None and bar.total != progress.total:
                bar.total = progress.total
            if progress.done is not None and progress.done != bar.n:
                bar.n = progress.done
            bar.set_postfix_str(progress.status.value, refresh=False)
            bar.refresh()
            if progress.status.finished:
                return progress.status
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(
                    f"job {job.id} is still {progress.status.value} after {timeout:g}s "
                    f"({progress.describe()}); wait longer, or check `logprobe status {job.id}`"
                )
            time.sleep(interval)
    finally:
        bar.close()
