"""logprobe's client side: job specs, the SQL schema, settings, ``Client`` and the CLI.

Light by design: importing it never imports torch, transformers, openai or ``worker``.
"""

from .client import Client
from .embedding_specs import ArtifactEmbedding, InterpolateEmbedding, NoiseEmbedding
from .errors import (
    ArtifactError,
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
    "ArtifactEmbedding",
    "ArtifactError",
    "Client",
    "ConfigError",
    "GenerateSpec",
    "InterpolateEmbedding",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobProgress",
    "JobStatus",
    "JobTimeout",
    "LogprobeError",
    "NoiseEmbedding",
    "ProbeResult",
    "ScoreSpec",
    "SequenceResult",
    "SpecError",
    "TokenLogprob",
    "parse_spec",
]
