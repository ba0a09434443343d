"""The Hugging Face backend: score and generate with any ``AutoModelForCausalLM``.

The math follows ``shared/DESIGN.md``: token *i*'s logprob is
``log_softmax(logits[i-1])[token_i]`` in float32; the loss is their mean, i.e.
``model(ids, labels=ids).loss``; generated tokens' logprobs are
``compute_transition_scores(sequences, scores, normalize_logits=True)``.
Score math lives in ``hf_score``, generation in ``hf_generate``, model loading in
``hf_models``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from api_client.specs import ScoreSpec

from ..control import control_for
from .base import AnySpec, Backend, OutputsReady, ProbeOutput
from .hf_generate import generate
from .hf_interrupt import all_should_stop, stop_when
from .hf_models import ModelCache, auto_device
from .hf_score import BatchBudget, score, score_batch
from .hf_tensor_score import score_tensors

log = logging.getLogger(__name__)


def enable_determinism() -> None:
    """Deterministic kernels, no TF32: the same inputs give bit-identical outputs on
    the same hardware (``CUBLAS_WORKSPACE_CONFIG`` is set before torch loads)."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


class HFBackend(Backend):
    name = "hf"

    def __init__(self, *, max_models: int = 1, deterministic: bool = False,
                 fused_activations: bool = True) -> None:
        if deterministic:
            enable_determinism()
        self.models = ModelCache(max_models, fused_activations=fused_activations)
        #: Score probes on the same model run batched within this budget (padded tokens,
        #: texts a batch).
        self.batch_budget = BatchBudget.for_device(auto_device().split(":")[0])

    def run(self, specs: Sequence[AnySpec], on_ready: OutputsReady | None = None
            ) -> list[ProbeOutput | Exception]:
        """Score probes batched per model (``on_ready`` after each forward pass's
        batch), then the other probes one by one (``on_ready`` after each)."""
        outputs: list[ProbeOutput | Exception | None] = [None] * len(specs)
        score_groups: dict[tuple[Any, ...], list[int]] = {}
        for index, spec in enumerate(specs):
            if (isinstance(spec, ScoreSpec) and self.batch_budget.tokens > 0
                    and spec.embedding is None and not spec.return_logits):
                key = (spec.model, spec.revision, spec.dtype, spec.device, spec.device_map)
                score_groups.setdefault(key, []).append(index)
        for indices in score_groups.values():
            group = [specs[i] for i in indices]
            done: dict[int, ProbeOutput | Exception] = {}  # group index -> final output

            def batch_ready(local: Sequence[int], results: Sequence[ProbeOutput | Exception],
                            indices: list[int] = indices,
                            done: dict[int, ProbeOutput | Exception] = done) -> None:
                done.update(zip(local, results, strict=True))
                if on_ready is not None:
                    on_ready([indices[i] for i in local], results)

            try:
                lm = self.models.get(group[0].model, group[0].revision, group[0].dtype,
                                     group[0].device, device_map=group[0].device_map)
                results = score_batch(lm, group, self.batch_budget,  # type: ignore[arg-type]
                                      on_batch=batch_ready)
            except Exception as exc:  # e.g. the model does not load: fail the group
                log.info("jobs failed: %s: %s", type(exc).__name__, exc)
                # (batches handed on before it broke keep their outputs)
                results = [done.get(i, exc) for i in range(len(group))]
            for i, result in zip(indices, results, strict=True):
                outputs[i] = result
        for index, spec in enumerate(specs):
            if outputs[index] is not None:
                continue
            try:
                outputs[index] = self.run_one(spec)
            except Exception as exc:  # one bad job must not sink the others
                log.info("job failed: %s: %s", type(exc).__name__, exc)
                outputs[index] = exc
            if on_ready is not None:
                on_ready([index], [outputs[index]])  # type: ignore[list-item]
        return [out for out in outputs if out is not None]

    def identity(self, spec: AnySpec) -> dict[str, Any] | None:
        """What besides the spec decides the result: resolved revision, dtype, the device
        it runs on (a CPU's or GPU's kernels round differently) and determinism."""
        lm = self.models.get(spec.model, spec.revision, spec.dtype, spec.device,
                             device_map=spec.device_map)
        return {"model_revision": lm.revision, "dtype": lm.dtype,
                "device_name": lm.fixed_provenance["device_name"],
                "deterministic": torch.are_deterministic_algorithms_enabled()}

    def run_one(self, spec: AnySpec) -> ProbeOutput:
        lm = self.models.get(spec.model, spec.revision, spec.dtype, spec.device,
                             device_map=spec.device_map)
        control = control_for(spec)
        if control is not None:
            control.start()  # its time limit counts from here, not from the claim
        if isinstance(spec, ScoreSpec):  # one forward pass: stoppable between layers
            with stop_when(all_should_stop([control])):
                if spec.embedding is not None or spec.return_logits:
                    return score_tensors(lm, spec)
                return score(lm, spec)
        return generate(lm, spec)

    def close(self) -> None:
        self.models.clear()
