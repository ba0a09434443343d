"""HF generate probes: greedy or seeded sampling with per-token transition scores."""

from __future__ import annotations

import contextlib
import secrets
import threading
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from api_client.errors import ProbeInputError
from api_client.results import SequenceResult, TokenLogprob
from api_client.specs import GenerateSpec

from ..control import control_for
from .base import ProbeOutput
from .hf_common import alternatives_from_topk, check_ids, decode_each, text_logprobs
from .hf_embeddings import build_embedding
from .hf_interrupt import all_should_stop, stop_when
from .hf_logits import check_logits_rows, forward_logits, logits_array, position_tokens
from .hf_models import LoadedModel
from .hf_step_scores import StepScores
from .hf_stopping import job_stopping_criteria

#: Sampling draws from torch's global generator, which every thread of the process
#: shares: two sampled generations at once (``--pool threads``) would take each other's
#: random numbers and neither would replay from its seed. One at a time, from the seed
#: to the last step.
_SAMPLING = threading.Lock()


def pick_seed() -> int:
    """A fresh seed for a sampled job that named none (recorded so it can be replayed)."""
    return secrets.randbelow(2**31)


def generation_config(lm: LoadedModel, spec: GenerateSpec) -> GenerationConfig:
    """Exactly the decoding the spec asks for, ignoring the model's own defaults
    (Llama-2's generation_config.json turns sampling on, for instance; the loader set
    the model's file aside, so nothing this leaves unset comes from it), stopping at
    any of the model's EOS ids."""
    stop_ids = list(lm.stop_token_ids)
    options: dict[str, Any] = {
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": spec.do_sample,
        "num_return_sequences": spec.num_return_sequences,
        "eos_token_id": stop_ids or None,
        "pad_token_id": lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None
        else lm.eos_token_id,
        "bos_token_id": lm.bos_token_id,
        "output_scores": True,  # the processed scores of each step, for StepScores
        "output_logits": spec.return_logits,
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
    artifacts: list[dict[str, Any]] = []
    control = control_for(spec)  # progress, cancel flag, time limit of the running job
    # The prompt's forward passes stop between layers when the job is cancelled or out
    # of time; once decoding runs, the stopping criteria stop it at the next step with
    # the tokens so far (hf_interrupt, hf_stopping).
    before_decoding = all_should_stop([control])
    if spec.embedding is not None:  # inputs_embeds: generate() returns only new tokens
        built = build_embedding(lm, spec.embedding, "generate", spec.max_new_tokens)
        artifacts = built.artifacts
        n_prompt, offset = built.length, 0
        targets: list[int | None] = list(built.ids) if built.ids else [None] * n_prompt
        with stop_when(before_decoding):
            prompt_logits = forward_logits(lm, inputs_embeds=built.embeds)
        prompt_tokens = tuple(position_tokens(lm, prompt_logits, targets, spec.top_logprobs))
        model_inputs = {"inputs_embeds": built.embeds,
                        "attention_mask": torch.ones(built.embeds.shape[:2], dtype=torch.long,
                                                     device=lm.device)}
    else:
        assert spec.prompt is not None
        prompt_ids = lm.tokenizer(spec.prompt)["input_ids"]
        if not prompt_ids:
            raise ProbeInputError("the prompt encodes to no tokens; pass a non-empty prompt")
        check_ids(lm, prompt_ids, "the prompt", extra=spec.max_new_tokens)
        with stop_when(before_decoding):
            prompt_tokens = tuple(text_logprobs(lm, prompt_ids, spec.top_logprobs))
        input_ids = torch.tensor([prompt_ids], device=lm.device)
        model_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        n_prompt = offset = len(prompt_ids)
    if spec.return_logits:
        steps = min(spec.max_new_tokens, spec.logits_last_n or spec.max_new_tokens)
        check_logits_rows(lm, spec, steps * spec.num_return_sequences, exact=False)
    seed = (spec.seed if spec.seed is not None else pick_seed()) if spec.do_sample else None

    config = generation_config(lm, spec)
    # = compute_transition_scores(sequences, scores, normalize_logits=True), step by
    # step as generate runs, in float64 (float32 on MPS: hf_step_scores.score_precision).
    step_scores = StepScores(spec.top_logprobs, release_scores=not spec.return_logits)
    criteria = StoppingCriteriaList([
        step_scores, *(job_stopping_criteria(control, offset, spec.max_new_tokens) or [])])
    with _SAMPLING if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode(), stop_when(
                lambda: step_scores.steps == 0 and before_decoding()):  # the prefill only
            out = lm.model.generate(**model_inputs, generation_config=config,
                                    stopping_criteria=criteria)
    kept = out.sequences.shape[1] - offset
    # More steps scored than kept is fine: on MPS, generate learns that every sequence
    # has ended one step late and undoes that step (transformers' DeferredStopCheck).
    if step_scores.steps < kept:
        raise RuntimeError(f"generate took {kept} steps but scored {step_scores.steps}: "
                           "was a stopping criterion skipped?")

    stop_ids = set(lm.stop_token_ids)
    sequences = []
    for r in range(out.sequences.shape[0]):
        generated = out.sequences[r, offset:].tolist()
        finish = "length"
        end = next((t for t, token_id in enumerate(generated) if token_id in stop_ids), None)
        if end is not None:
            generated = generated[: end + 1]
            finish = "stop"
        elif control is not None and control.stop_reason is not None:
            finish = control.stop_reason  # "cancelled" or "time_limit": a partial result
        steps = len(generated)
        logprobs = step_scores.logprobs(r, steps)
        top_values, top_ids = step_scores.top(r, steps)
        step_alternatives = alternatives_from_topk(
            top_values, top_ids, decode_each(lm, [i for row in top_ids for i in row]))
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
    logits = None
    if spec.return_logits:  # raw logits of each step: [sequences, steps, vocab]
        logits = logits_array(torch.stack([s.float() for s in out.logits], dim=1), spec)
    return ProbeOutput(
        sequences=sequences,
        provenance={**lm.provenance(), "seed": seed, "batch_size": 1},
        logits=logits,
        artifacts=artifacts,
    )
