"""HF score probes that need tensors: an ``embedding`` input, or ``return_logits``.

Same semantics as ``hf_score``: position *i* gets ``log_softmax(logits[i-1])[target_i]``
and the loss is the mean negative logprob of the scored positions, i.e.
``model(inputs_embeds=E, labels=targets).loss``. For an embedding input the targets
are ``token_ids`` if given, else the ids of the noise source's text, else none
(every position stored with ``token_id`` NULL, ``token`` "" and no logprob;
``loss`` NULL). The text path's ``hf_score.score`` stays the fast default.
"""

from __future__ import annotations

import torch

from api_client.errors import ProbeInputError
from api_client.results import SequenceResult
from api_client.specs import ScoreSpec

from .base import ProbeOutput
from .hf_common import check_ids
from .hf_embeddings import build_embedding
from .hf_logits import check_logits_rows, forward_logits, logits_array, position_tokens
from .hf_models import LoadedModel
from .hf_score import score_ids


def score_tensors(lm: LoadedModel, spec: ScoreSpec) -> ProbeOutput:
    artifacts: list[dict] = []
    embeds = None
    if spec.embedding is None:
        ids = score_ids(lm, spec)
        check_ids(lm, ids, "the scored text")
        targets: list[int | None] = list(ids)
        length = len(ids)
    else:
        built = build_embedding(lm, spec.embedding, "score")
        embeds, artifacts, length = built.embeds, built.artifacts, built.length
        given = spec.token_ids if spec.token_ids is not None else built.ids
        if given is not None:
            if len(given) != length:
                raise ProbeInputError(
                    f"token_ids has {len(given)} ids but the embedding has {length} "
                    "positions; give one target id per position"
                )
            check_ids(lm, given, "token_ids")
            targets = list(given)
        else:
            targets = [None] * length
    if spec.return_logits:
        check_logits_rows(lm, spec, min(length, spec.logits_last_n or length), exact=True)

    if embeds is not None:
        logits = forward_logits(lm, inputs_embeds=embeds)
    else:
        logits = forward_logits(lm, input_ids=[t for t in targets if t is not None])
    tokens = position_tokens(lm, logits, targets, spec.top_logprobs)
    scored = [t.logprob for t in tokens[1:] if t.logprob is not None]
    total = float(torch.tensor(scored, dtype=torch.float64).sum()) if scored else None
    return ProbeOutput(
        sequences=[SequenceResult(index=0, text=spec.text, tokens=tuple(tokens))],
        loss=None if total is None else -total / len(scored),
        sum_logprob=total,
        num_scored_tokens=len(scored),
        provenance={**lm.provenance(), "batch_size": 1},
        logits=logits_array(logits, spec) if spec.return_logits else None,
        artifacts=artifacts,
    )
