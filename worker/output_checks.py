"""Refusing outputs that no database can store faithfully: NaN logprobs.

A float16 model whose activations or logits overflow (float16 holds at most 65,504)
yields NaN logprobs. SQLite would store NaN as NULL (refused where the column is
NOT NULL), PostgreSQL as NaN, with the job marked succeeded: instead the job fails
on both, saying what to change. ``-inf`` (a token the model deems impossible) is a
legitimate logprob and is stored.

The check is one comparison per stored value (NaN is the only float unequal to
itself), a small part of building the rows that are stored anyway.
"""

from __future__ import annotations

from api_client.errors import ProbeInputError

from .backends.base import ProbeOutput


class NaNLogprobs(ProbeInputError):
    """The model computed NaN logprobs: its dtype overflowed, or its weights are broken."""


def _first_nan(output: ProbeOutput) -> str | None:
    """Where ``output`` first has a NaN logprob (or loss), None if nowhere."""
    for sequence in output.sequences:
        for token in (*sequence.prompt_tokens, *sequence.tokens):
            logprob = token.logprob
            if logprob != logprob:
                return f"sequence {sequence.index}, position {token.position}"
            for alternative in token.top_logprobs:
                if alternative.logprob != alternative.logprob:
                    return (f"sequence {sequence.index}, position {token.position}, "
                            "top alternatives")
    loss = output.loss
    if loss is not None and loss != loss:
        return "loss"
    return None


def nan_logprobs_error(output: ProbeOutput) -> NaNLogprobs | None:
    """The error to fail a job with whose ``output`` has NaN logprobs; None if it has none."""
    where = _first_nan(output)
    if where is None:
        return None
    dtype = output.provenance.get("dtype")
    if dtype == "float16":
        cause = ("the model's float16 activations or logits overflowed (float16 holds at "
                 "most 65,504); submit it with dtype=bfloat16 or float32")
    else:
        cause = (f"the model computes NaN in {dtype or 'its dtype'} (an overflow, or NaN in "
                 "its weights); submit it with dtype=float32, or check the model's weights")
    return NaNLogprobs(f"the model's output has NaN logprobs ({where}): {cause}")
