"""HF generate probes: greedy or seeded sampling with per-token transition scores."""

from __future__ import annotations

import secrets
from typing import Any

import torch
from transformers import GenerationConfig

from api_client.errors import ProbeInputError
from api_client.results import SequenceResult, TokenLogprob
from api_client.specs import GenerateSpec

from ..control import control_for
from .base import ProbeOutput
from .hf_common import check_ids, decode_each, text_logprobs, top_alternatives
from .hf_models import LoadedModel
from .hf_stopping import job_stopping_criteria


def pick_seed() -> int:
    """A fresh seed for a sampled job that named none (recorded so it can be replayed)."""
    return secrets.randbelow(2**31)



def generation_config(lm: LoadedModel, spec: GenerateSpec) -> GenerationConfig:
    """Exactly the decoding the spec asks for, ignoring the model's own defaults
    (Llama-2's generation_config.json turns sampling on, for instance)."""
    eos = lm.eos_token_id
    options: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": spec.do_sample,
        "num_return_sequences": spec.num_return_sequences,
        "eos_token_id": eos,
        "pad_token_id": lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None
        else eos,
        "bos_token_id": lm.bos_token_id,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    if spec.do_sample:
        options.update(
            temperature=spec.temperature if spec.temperature is not None else 1.0,
            top_k=spec.top_k if spec.top_k is not None else 0,
            top_p=spec.top_p if spec.top_p is not None else 1.0,
        )
    return GenerationConfig(**options)


def generate(lm: LoadedModel, spec: GenerateSpec) -> ProbeOutput:
    prompt_ids = lm.tokenizer(spec.prompt)["input_ids"]
    if not prompt_ids:
        raise ProbeInputError("the prompt encodes to no tokens; pass a non-empty prompt")
    check_ids(lm, prompt_ids, "the prompt", extra=spec.max_new_tokens)
    seed = (spec.seed if spec.seed is not None else pick_seed()) if spec.do_sample else None
    prompt_tokens = tuple(text_logprobs(lm, prompt_ids, spec.top_logprobs))

    input_ids = torch.tensor([prompt_ids], device=lm.device)
    config = generation_config(lm, spec)
    control = control_for(spec)  # progress, cancel flag, time limit of the running job
    criteria = job_stopping_criteria(control, len(prompt_ids), spec.max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
            stopping_criteria=criteria,
        )
        # = compute_transition_scores(sequences, scores, normalize_logits=True) (no beams),
        # as score[token] - logsumexp(score), one step at a time: no [steps, vocab]
        # copies of the scores (2 GB each for 10,000 steps of GPT-2), which transformers'
        # version makes and normalizes along a strided axis (seconds per few hundred steps).
        scores = out.scores  # one [sequences, vocab] tensor per step
        chosen = out.sequences[:, out.sequences.shape[1] - len(scores):]
        log_norm = torch.stack([torch.logsumexp(s.float(), dim=-1) for s in scores], dim=1)
        picked = torch.stack([s.float().gather(1, chosen[:, t, None])[:, 0]
                              for t, s in enumerate(scores)], dim=1)
        transition = picked - log_norm  # [sequences, steps]

    n_prompt = len(prompt_ids)
    eos = lm.eos_token_id
    sequences = []
    for r in range(out.sequences.shape[0]):
        generated = out.sequences[r, n_prompt:].tolist()
        finish = "length"
        if eos is not None and eos in generated:
            generated = generated[: generated.index(eos) + 1]
            finish = "stop"
        elif control is not None and control.stop_reason is not None:
            finish = control.stop_reason  # "cancelled" or "time_limit": a partial result
        steps = len(generated)
        logprobs = transition[r, :steps].tolist()
        step_logprobs = (
            torch.stack([scores[t][r].float() - log_norm[r, t] for t in range(steps)])
            if spec.top_logprobs and steps else torch.empty(steps, 0)
        )
        step_alternatives = top_alternatives(lm, step_logprobs, spec.top_logprobs)
        texts = decode_each(lm, generated)
        tokens = tuple(
            TokenLogprob(
                position=n_prompt + t,
                token_id=generated[t],
                token=texts[t],
                logprob=logprobs[t],
                generated=True,
                top_logprobs=step_alternatives[t],
            )
            for t in range(steps)
        )
        sequences.append(
            SequenceResult(
                index=r,
                text=lm.tokenizer.decode(generated, skip_special_tokens=True),
                tokens=tokens,
                prompt_tokens=prompt_tokens,
                finish_reason=finish,
            )
        )
    return ProbeOutput(
        sequences=sequences,
        provenance={**lm.provenance(), "seed": seed, "batch_size": 1},
    )
