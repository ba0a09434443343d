"""Logits in, rows out: forward passes on ids or embeddings, per-position tokens,
and the full-logits array a probe may return (shape and cap in ``api_client.logits``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from api_client.errors import ProbeInputError
from api_client.logits import too_big_message
from api_client.results import TokenLogprob
from api_client.settings import Settings
from api_client.specs import GenerateSpec, ScoreSpec

from .hf_common import decode_each, top_alternatives
from .hf_models import LoadedModel


def forward_logits(lm: LoadedModel, *, input_ids: Sequence[int] | None = None,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """``[seq, vocab]`` float32 logits of one sequence given as ids or ``[1, seq, hidden]``."""
    with torch.inference_mode():
        if inputs_embeds is not None:
            out = lm.model(inputs_embeds=inputs_embeds)
        else:
            out = lm.model(torch.tensor([list(input_ids or [])], device=lm.device))
        return out.logits[0].float()


def position_tokens(lm: LoadedModel, logits: torch.Tensor, targets: Sequence[int | None],
                    top_k: int) -> list[TokenLogprob]:
    """One row per input position: position *i* gets ``log_softmax(logits[i-1])[target_i]``
    (None at position 0 or where the target is unknown) and the top-k of ``logits[i-1]``.

    Positions without a target id (an uploaded embedding scored without
    ``token_ids``) have ``token_id=None`` and ``token=""``.
    """
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    alternatives = [(), *top_alternatives(lm, logprobs, top_k)]
    known = [t for t in targets if t is not None]
    texts = iter(decode_each(lm, known))
    index = torch.tensor([t if t is not None else 0 for t in targets[1:]], dtype=torch.long,
                         device=logprobs.device)
    picked = [None, *logprobs.gather(1, index[:, None])[:, 0].tolist()]
    rows = []
    for i, target in enumerate(targets):
        logprob = None if i == 0 or target is None else picked[i]
        rows.append(TokenLogprob(
            position=i, token_id=target, token="" if target is None else next(texts),
            logprob=logprob, generated=False, top_logprobs=alternatives[i],
        ))
    return rows


def max_logits_bytes() -> int:
    return Settings.from_env().max_logits_bytes


def check_logits_rows(lm: LoadedModel, spec: ScoreSpec | GenerateSpec, rows: int,
                      exact: bool) -> None:
    """Refuse before running when the logits would exceed the cap."""
    cap = max_logits_bytes()
    itemsize = 4 if spec.logits_dtype == "float32" else 2
    if rows * lm.vocab_size * itemsize > cap:
        raise ProbeInputError(too_big_message(spec, rows, lm.vocab_size, cap, exact=exact))


def logits_array(values: torch.Tensor, spec: ScoreSpec | GenerateSpec) -> np.ndarray:
    """The last ``logits_last_n`` entries of the position/step axis, in ``logits_dtype``."""
    axis = values.dim() - 2  # [positions, vocab] or [sequences, steps, vocab]
    if spec.logits_last_n is not None:
        values = values.narrow(axis, max(0, values.shape[axis] - spec.logits_last_n),
                               min(spec.logits_last_n, values.shape[axis]))
    dtype = torch.float16 if spec.logits_dtype == "float16" else torch.float32
    return values.to(dtype).cpu().contiguous().numpy()
