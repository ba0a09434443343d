"""Per-token logprobs of a generation, computed step by step while it runs.

``compute_transition_scores(sequences, scores, normalize_logits=True)`` (no beams)
is ``score[token] - logsumexp(score)`` for each step's processed scores. Computing
it as each step is taken, instead of over all steps once ``generate`` returns,
keeps the work after a cancel or time limit independent of how many tokens were
generated (a few hundred ms per thousand GPT-2 steps otherwise), and never makes a
[steps, vocabulary] copy of the scores.

``generate`` keeps every step's scores (``output_scores=True``, which hands them to
the criterion): [sequences, vocabulary] float32 a step, 200 KB for GPT-2 and one
sequence, 2 GB over 10,000 tokens, on the model's device. Once a step is read its
memory is released (``Tensor.set_()``: the tuple keeps an empty tensor), unless the
raw logits are kept too: with no logits processor the step's scores are the very
tensor ``output_logits`` returns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria


def score_precision(device: torch.device) -> torch.dtype:
    """The dtype a step's log-softmax is computed in on ``device``: float64 (the float32
    scores' logprobs exact to the bit), float32 where the device has no float64
    (Apple's MPS; there they agree with ``compute_transition_scores`` within float32
    rounding)."""
    return torch.float32 if device.type == "mps" else torch.float64


class StepScores(StoppingCriteria):
    """A stopping criterion that never stops: at each step, in float64
    (:func:`score_precision`), the logprob of the token each sequence just took, and
    (for ``top_k`` > 0) the ``top_k`` best logprobs and their ids in float32 (the
    rounding of the stored top-k rows).

    ``transformers`` calls every criterion once per step, after appending the step's
    tokens to ``input_ids``, with the processed scores of all steps so far (this
    needs ``output_scores=True``). ``release_scores``: empty each step's scores once
    read (False when ``output_logits`` returns the same tensors). ``precision``:
    the dtype of the log-softmax, by default :func:`score_precision` of the scores'
    device.
    """

    def __init__(self, top_k: int, *, release_scores: bool = True,
                 precision: torch.dtype | None = None) -> None:
        self.top_k = top_k
        self.release_scores = release_scores
        self.precision = precision
        self._chosen: list[torch.Tensor] = []  # [sequences] float64, one per step
        self._top_values: list[torch.Tensor] = []  # [sequences, top_k] float32
        self._top_ids: list[torch.Tensor] = []  # [sequences, top_k] long

    def __call__(self, input_ids: torch.LongTensor, scores: Any,
                 **kwargs: Any) -> torch.BoolTensor:
        step = scores[-1].to(self.precision or score_precision(scores[-1].device))
        log_norm = torch.logsumexp(step, dim=-1)
        self._chosen.append(step.gather(1, input_ids[:, -1:])[:, 0] - log_norm)
        if self.top_k:
            values, ids = torch.topk((step - log_norm[:, None]).float(),
                                     min(self.top_k, step.shape[-1]), dim=-1)
            self._top_values.append(values)
            self._top_ids.append(ids)
        if self.release_scores:  # read: free its memory (generate chose the token before)
            scores[-1].set_()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool,  # type: ignore[return-value]
                           device=input_ids.device)

    @property
    def steps(self) -> int:
        return len(self._chosen)

    def logprobs(self, sequence: int, steps: int) -> list[float]:
        """The chosen tokens' logprobs of ``sequence`` over its first ``steps`` steps."""
        if not steps:
            return []
        return torch.stack(self._chosen[:steps])[:, sequence].tolist()

    def top(self, sequence: int, steps: int) -> tuple[list[list[float]], list[list[int]]]:
        """Top-k logprobs and token ids of ``sequence`` at each of its first ``steps``
        steps (best first)."""
        if not self.top_k or not steps:
            return [[] for _ in range(steps)], [[] for _ in range(steps)]
        values = torch.stack(self._top_values[:steps])[:, sequence].tolist()
        ids = torch.stack(self._top_ids[:steps])[:, sequence].tolist()
        return values, ids
