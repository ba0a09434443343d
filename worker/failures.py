"""Turning what went wrong in a job into the message stored on its row.

Out-of-memory errors (CUDA's ``torch.OutOfMemoryError``, the CPU allocator's
``RuntimeError``, Python's ``MemoryError``) fail the job with a message that says
what to change; the worker frees what it can and goes on serving. A job stopped
by its time limit says which limit and how far it got.
"""

from __future__ import annotations

import gc
import sys

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from .control import JobControl

_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory",
                "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def release_memory() -> None:
    """Free what a failed job left behind (Python garbage, CUDA's cached blocks)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _progress(control: JobControl | None) -> str:
    if control is None or control.total is None:
        return ""
    return f" after {control.done} of {control.total} {control.unit}"


def time_limit_message(limit: float, control: JobControl | None = None, *,
                       when: str | None = None) -> str:
    """The error of a job past its limit; ``when`` for one stopped with nothing to store
    (``JobStopped.when``, e.g. "while its OpenAI request was unanswered")."""
    if when is None:
        what = (f"{_progress(control)} and was stopped; what it had computed is stored "
                "with partial=true")
    else:
        what = f" {when} and was stopped; nothing was stored"
    return (
        f"the job ran past its time limit of {limit:g} s{what}. Submit it with a larger "
        "time_limit (it must stay below the broker's visibility timeout, "
        "LOGPROBE_VISIBILITY_TIMEOUT) or make the job smaller"
    )


def cancel_message(control: JobControl | None) -> str:
    return f"cancelled by request{_progress(control)}"


def describe_failure(exc: BaseException, control: JobControl | None = None) -> tuple[str, str]:
    """(error_type, message) for a job that raised ``exc``."""
    if is_out_of_memory(exc):
        where = "the GPU" if "cuda" in str(exc).lower() or type(exc).__name__ == \
            "OutOfMemoryError" else "this machine"
        first_line = (str(exc) or type(exc).__name__).splitlines()[0][:300]
        return "OutOfMemory", (
            f"out of memory on {where}{_progress(control)}: {first_line}. Lower the input "
            "length, max_new_tokens, num_return_sequences or top_logprobs, load the model "
            "in float16/bfloat16, or route the job to a worker with more memory"
        )
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        limit = control.time_limit if control is not None else float("nan")
        return "TimeLimitExceeded", time_limit_message(limit, control)
    return type(exc).__name__, str(exc) or type(exc).__name__
