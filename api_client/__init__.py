"""logprobe's client side: job specs, the SQL schema, settings, ``Client`` and the CLI.

Light by design: importing it never imports torch, transformers, openai or ``worker``.
"""

from .client import Client
from .errors import (
    ConfigError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    LogprobeError,
    SpecError,
)
from .jobs import JobHandle
from .progress import JobProgress
from .results import Alternative, ProbeResult, SequenceResult, TokenLogprob
from .schema import JobStatus
from .specs import GenerateSpec, ScoreSpec, parse_spec

__all__ = [
    "Alternative",
    "Client",
    "ConfigError",
    "GenerateSpec",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobProgress",
    "JobStatus",
    "JobTimeout",
    "LogprobeError",
    "ProbeResult",
    "ScoreSpec",
    "SequenceResult",
    "SpecError",
    "TokenLogprob",
    "parse_spec",
]
