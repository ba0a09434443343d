"""HF score probes: loss and per-token logprobs of a text."""

from __future__ import annotations

import torch

from api_client.errors import ProbeInputError
from api_client.results import SequenceResult
from api_client.specs import ScoreSpec

from ..control import control_for
from .base import ProbeOutput
from .hf_common import check_ids, text_logprobs
from .hf_models import LoadedModel


def score_ids(lm: LoadedModel, spec: ScoreSpec) -> list[int]:
    if spec.token_ids is not None:
        ids = list(spec.token_ids)
    else:
        ids = lm.tokenizer(spec.text, add_special_tokens=False)["input_ids"]
    if spec.prepend_bos:
        bos = lm.bos_token_id
        if bos is None:
            raise ProbeInputError(
                f"model {lm.name!r} has no BOS or EOS token to prepend; set prepend_bos=False"
            )
        ids = [bos, *ids]
    if len(ids) < 2:
        raise ProbeInputError(
            "the text is a single token, which has nothing before it to be scored "
            "against; pass prepend_bos=True or a longer text"
        )
    return ids


def score(lm: LoadedModel, spec: ScoreSpec) -> ProbeOutput:
    ids = score_ids(lm, spec)
    check_ids(lm, ids, "the scored text")
    control = control_for(spec)
    if control is not None:
        control.begin(len(ids), "tokens")
    tokens = text_logprobs(lm, ids, spec.top_logprobs)
    if control is not None:
        control.advance(len(ids))
    scored = [t.logprob for t in tokens[1:]]
    total = float(torch.tensor(scored, dtype=torch.float64).sum())
    return ProbeOutput(
        sequences=[SequenceResult(index=0, text=spec.text, tokens=tuple(tokens))],
        loss=-total / len(scored),
        sum_logprob=total,
        num_scored_tokens=len(scored),
        provenance={**lm.provenance(), "batch_size": 1},
    )
