"""Pieces the HF score and generate paths share: input checks, token texts, top-k."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from api_client.errors import ProbeInputError
from api_client.results import Alternative, TokenLogprob

from .hf_models import LoadedModel


def check_ids(lm: LoadedModel, ids: Sequence[int], what: str, extra: int = 0) -> None:
    bad = [i for i in ids if i >= lm.vocab_size]
    if bad:
        raise ProbeInputError(
            f"{what} has token id {bad[0]}, outside the vocabulary of {lm.name!r} "
            f"(size {lm.vocab_size}); pass ids below {lm.vocab_size}"
        )
    if lm.context_length is not None and len(ids) + extra > lm.context_length:
        needed = f"{len(ids)} tokens" + (f" + max_new_tokens {extra}" if extra else "")
        raise ProbeInputError(
            f"{what} needs {needed}, more than the {lm.context_length}-token context of "
            f"{lm.name!r}; shorten the input" + (" or lower max_new_tokens" if extra else "")
        )


def decode_each(lm: LoadedModel, ids: Sequence[int]) -> list[str]:
    """Each token's text exactly as ``tokenizer.decode([id])`` gives it."""
    return lm.tokenizer.batch_decode([[i] for i in ids])


def top_alternatives(
    lm: LoadedModel, logprobs: torch.Tensor, k: int
) -> list[tuple[Alternative, ...]]:
    """The ``k`` most likely tokens of each row of ``logprobs`` ([rows, vocab])."""
    if k == 0 or logprobs.shape[0] == 0:
        return [() for _ in range(logprobs.shape[0])]
    values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
    values_list, indices_list = values.tolist(), indices.tolist()
    texts = decode_each(lm, [i for row in indices_list for i in row])
    return alternatives_from_topk(values_list, indices_list, texts)


def alternatives_from_topk(values: Sequence[Sequence[float]], ids: Sequence[Sequence[int]],
                           texts: Sequence[str]) -> list[tuple[Alternative, ...]]:
    """Rows of top-k ``values`` and token ``ids`` (rows may differ in length) as
    ``Alternative``s; ``texts`` are the token texts of ``ids`` flattened row by row.
    Entries at ``-inf`` (masked by top-k/top-p sampling) are left out."""
    result = []
    start = 0
    for row_values, row_ids in zip(values, ids, strict=True):
        row_texts = texts[start : start + len(row_ids)]
        start += len(row_ids)
        result.append(
            tuple(
                Alternative(token_id=i, token=t, logprob=v)
                for i, t, v in zip(row_ids, row_texts, row_values, strict=True)
                if v != float("-inf")
            )
        )
    return result


def input_tokens(ids: Sequence[int], texts: Sequence[str], token_lp: Sequence[float],
                 alternatives: Sequence[tuple[Alternative, ...]] | None) -> list[TokenLogprob]:
    """The tokens of an input: token *i* has ``token_lp[i-1]`` and ``alternatives[i]``;
    the first has no logprob (nothing precedes it)."""
    return [
        TokenLogprob(
            position=i,
            token_id=tid,
            token=texts[i],
            logprob=None if i == 0 else token_lp[i - 1],
            generated=False,
            top_logprobs=alternatives[i] if alternatives is not None else (),
        )
        for i, tid in enumerate(ids)
    ]


def text_logprobs(lm: LoadedModel, ids: list[int], top_k: int) -> list[TokenLogprob]:
    """Every token of ``ids`` with its logprob given the ones before (None for the first)."""
    input_ids = torch.tensor([ids], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    token_lp = logprobs.gather(1, input_ids[0, 1:, None])[:, 0].tolist()
    alternatives = [(), *top_alternatives(lm, logprobs, top_k)]
    return input_tokens(ids, decode_each(lm, ids), token_lp, alternatives)
