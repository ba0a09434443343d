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

import torch

from api_client.specs import ScoreSpec

from .base import AnySpec, Backend, ProbeOutput
from .hf_generate import generate
from .hf_models import ModelCache
from .hf_score import score
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

    def __init__(self, *, max_models: int = 1, deterministic: bool = False) -> None:
        if deterministic:
            enable_determinism()
        self.models = ModelCache(max_models)

    def run(self, specs: Sequence[AnySpec]) -> list[ProbeOutput | Exception]:
        outputs: list[ProbeOutput | Exception] = []
        for spec in specs:
            try:
                outputs.append(self.run_one(spec))
            except Exception as exc:  # one bad job must not sink the others
                log.info("job failed: %s: %s", type(exc).__name__, exc)
                outputs.append(exc)
        return outputs

    def run_one(self, spec: AnySpec) -> ProbeOutput:
        lm = self.models.get(spec.model, spec.revision, spec.dtype, spec.device,
                             device_map=spec.device_map)
        if isinstance(spec, ScoreSpec):
            if spec.embedding is not None or spec.return_logits:
                return score_tensors(lm, spec)
            return score(lm, spec)
        return generate(lm, spec)

    def close(self) -> None:
        self.models.clear()
