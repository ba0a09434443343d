"""The one exception tree of logprobe.

Every error a user can cause says what to change. Errors raised in a worker
are stored as text on the job row; :class:`JobFailed` carries that text back.
"""

from __future__ import annotations


class LogprobeError(Exception):
    """Base of every error logprobe raises on purpose."""


class ConfigError(LogprobeError):
    """A setting (URL, path, environment variable) is missing or malformed."""


class SpecError(LogprobeError, ValueError):
    """A probe spec was refused at submit; the message names the field to change."""


class ArtifactError(LogprobeError):
    """An artifact (uploaded embedding, stored logits) is missing, unreadable or altered."""


class JobNotFound(LogprobeError, KeyError):
    """No job row has this id."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence.
        return str(self.args[0]) if self.args else "job not found"


class JobTimeout(LogprobeError, TimeoutError):
    """A job did not finish within the time the caller was willing to wait."""


class JobFailed(LogprobeError):
    """The worker could not complete the job; ``error`` is what it stored in SQL."""

    def __init__(self, job_id: str, error: str | None, status: str = "failed") -> None:
        self.job_id = job_id
        self.error = error or "(no error message was stored)"
        self.status = status
        super().__init__(f"job {job_id} {status}: {self.error}")


class JobCancelled(JobFailed):
    """The job was cancelled before it completed."""

    def __init__(self, job_id: str, error: str | None = None) -> None:
        super().__init__(job_id, error or "cancelled by request", status="cancelled")


# --- raised inside workers, stored on the job row --------------------------------


class ProbeInputError(LogprobeError, ValueError):
    """The probe cannot run on this model as given (too long, no BOS token, ...)."""


class ModelLoadError(LogprobeError):
    """The worker could not load the named model (unknown name, missing files, ...)."""


class BackendError(LogprobeError):
    """A backend failed in a way that is not the input's fault (API error after retries)."""
