"""The contract every backend implements, in the manner of lm-evaluation-harness's ``LM``.

A backend is given a batch of validated specs and returns one :class:`ProbeOutput`
(or the exception that job failed with) per spec, in order. It never touches
Celery or the database: tasks route, persistence stores, backends compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from api_client.results import SequenceResult
from api_client.specs import GenerateSpec, ScoreSpec

AnySpec = ScoreSpec | GenerateSpec


@dataclass
class ProbeOutput:
    """What one job produced.

    ``sequences``: one for a score probe, ``num_return_sequences`` for generation.
    ``loss`` / ``sum_logprob`` / ``num_scored_tokens``: score probes only (the mean
    and the sum of the scored tokens' logprobs, and their count).
    ``provenance``: values for the job row's provenance columns (model_revision,
    dtype, device, device_name, seed, deterministic, batch_size, *_version,
    system_fingerprint, request_params, prompt_tokens, completion_tokens).
    ``logits``: the full-logits array (numpy) when the spec asked for it; the runner
    writes it to the artifact store and moves its reference into ``artifacts``.
    ``artifacts``: rows for the ``artifacts`` table (name, uri, sha256, shape, dtype,
    num_bytes), e.g. the verified uploaded input embedding.
    """

    sequences: list[SequenceResult]
    loss: float | None = None
    sum_logprob: float | None = None
    num_scored_tokens: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    logits: Any | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)


def attach_provenance(exc: BaseException, **values: Any) -> None:
    """Job-row provenance values a job that ends with ``exc`` still records (the
    request an OpenAI job sent before it failed, and its seed)."""
    exc.job_provenance = {**failure_provenance(exc), **values}  # type: ignore[attr-defined]


def failure_provenance(exc: BaseException) -> dict[str, Any]:
    """The values :func:`attach_provenance` put on ``exc`` (empty if none)."""
    return dict(getattr(exc, "job_provenance", None) or {})


#: ``on_ready(indices, outputs)``: outputs of ``specs[i]`` for ``i`` in ``indices``.
OutputsReady = Callable[[Sequence[int], Sequence[ProbeOutput | Exception]], None]


class Backend(ABC):
    """One kind of model server. Instances live as long as their worker process."""

    name: str

    @abstractmethod
    def run(self, specs: Sequence[AnySpec], on_ready: OutputsReady | None = None
            ) -> list[ProbeOutput | Exception]:
        """Run a batch of probes; one output or exception per spec, in order.

        ``on_ready``, if given, is called with ``(indices into specs, their outputs)``
        as soon as some outputs are final, while the rest still run (a backend that
        has them only at the end may never call it); ``run`` returns every output
        anyway. The worker stores those outputs meanwhile.

        Score probes: per-token logprobs where token *i* gets
        ``log_softmax(logits[i-1])[token_i]`` in float32, and ``loss`` = their mean
        (``model(ids, labels=ids).loss``). Generate probes: the generated tokens'
        logprobs as ``compute_transition_scores(..., normalize_logits=True)``.
        """

    def identity(self, spec: AnySpec) -> dict[str, Any] | None:
        """The job-row values besides the spec that decide this probe's result
        (``model_revision``, ``dtype``, ``deterministic``), for result reuse; None
        (the default) means results of this backend are never reused."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models and connections."""
