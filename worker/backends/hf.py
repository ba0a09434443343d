"""The Hugging Face backend: score and generate with any ``AutoModelForCausalLM``.

The math follows ``shared/DESIGN.md``: token *i*'s logprob is
``log_softmax(logits[i-1])[token_i]`` in float32; the loss is their mean, i.e.
``model(ids, labels=ids).loss``; generated tokens' logprobs are
``compute_transition_scores(sequences, scores, normalize_logits=True)``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from api_client.errors import ProbeInputError
from api_client.results import Alternative, SequenceResult, TokenLogprob
from api_client.specs import GenerateSpec, ScoreSpec

from .base import AnySpec, Backend, ProbeOutput
from .hf_models import LoadedModel, ModelCache

log = logging.getLogger(__name__)


def pick_seed() -> int:
    """A fresh seed for a sampled job that named none (recorded so it can be replayed)."""
    return secrets.randbelow(2**31)


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
        lm = self.models.get(spec.model, spec.revision, spec.dtype, spec.device)
        if isinstance(spec, ScoreSpec):
            return score(lm, spec)
        return generate(lm, spec)

    def close(self) -> None:
        self.models.clear()


# --- shared pieces ------------------------------------------------------------------


def _check_ids(lm: LoadedModel, ids: Sequence[int], what: str, extra: int = 0) -> None:
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


def _decode_each(lm: LoadedModel, ids: Sequence[int]) -> list[str]:
    """Each token's text exactly as ``tokenizer.decode([id])`` gives it."""
    return lm.tokenizer.batch_decode([[i] for i in ids])


def _alternatives(
    lm: LoadedModel, logprobs: torch.Tensor, k: int
) -> list[tuple[Alternative, ...]]:
    """The ``k`` most likely tokens of each row of ``logprobs`` ([rows, vocab])."""
    if k == 0 or logprobs.shape[0] == 0:
        return [() for _ in range(logprobs.shape[0])]
    values, indices = torch.topk(logprobs, k, dim=-1)
    values_list, indices_list = values.tolist(), indices.tolist()
    texts = _decode_each(lm, [i for row in indices_list for i in row])
    result = []
    for r, (row_values, row_ids) in enumerate(zip(values_list, indices_list, strict=True)):
        row_texts = texts[r * k : (r + 1) * k]
        result.append(
            tuple(
                Alternative(token_id=i, token=t, logprob=v)
                for i, t, v in zip(row_ids, row_texts, row_values, strict=True)
                if v != float("-inf")  # masked by top-k/top-p sampling
            )
        )
    return result


def _prompt_tokens(lm: LoadedModel, ids: list[int], top_k: int) -> list[TokenLogprob]:
    """Every token of ``ids`` with its logprob given the ones before (None for the first)."""
    input_ids = torch.tensor([ids], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    token_lp = logprobs.gather(1, input_ids[0, 1:, None])[:, 0].tolist()
    alternatives = [(), *_alternatives(lm, logprobs, top_k)]
    texts = _decode_each(lm, ids)
    return [
        TokenLogprob(
            position=i,
            token_id=tid,
            token=texts[i],
            logprob=None if i == 0 else token_lp[i - 1],
            generated=False,
            top_logprobs=alternatives[i],
        )
        for i, tid in enumerate(ids)
    ]


# --- score --------------------------------------------------------------------------


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
    _check_ids(lm, ids, "the scored text")
    tokens = _prompt_tokens(lm, ids, spec.top_logprobs)
    scored = [t.logprob for t in tokens[1:]]
    total = float(torch.tensor(scored, dtype=torch.float64).sum())
    return ProbeOutput(
        sequences=[SequenceResult(index=0, text=spec.text, tokens=tuple(tokens))],
        loss=-total / len(scored),
        sum_logprob=total,
        num_scored_tokens=len(scored),
        provenance={**lm.provenance(), "batch_size": 1},
    )


# --- generate -----------------------------------------------------------------------


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
    _check_ids(lm, prompt_ids, "the prompt", extra=spec.max_new_tokens)
    seed = (spec.seed if spec.seed is not None else pick_seed()) if spec.do_sample else None
    prompt_tokens = tuple(_prompt_tokens(lm, prompt_ids, spec.top_logprobs))

    input_ids = torch.tensor([prompt_ids], device=lm.device)
    config = generation_config(lm, spec)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
        scores = tuple(s.float() for s in out.scores)
        transition = lm.model.compute_transition_scores(
            out.sequences, scores, normalize_logits=True
        )
        step_logprobs = [torch.log_softmax(s, dim=-1) for s in scores]

    n_prompt = len(prompt_ids)
    eos = lm.eos_token_id
    sequences = []
    for r in range(out.sequences.shape[0]):
        generated = out.sequences[r, n_prompt:].tolist()
        finish = "length"
        if eos is not None and eos in generated:
            generated = generated[: generated.index(eos) + 1]
            finish = "stop"
        steps = len(generated)
        logprobs = transition[r, :steps].tolist()
        alternatives = _alternatives(
            lm, torch.stack([step_logprobs[t][r] for t in range(steps)]), spec.top_logprobs
        ) if steps else []
        texts = _decode_each(lm, generated)
        tokens = tuple(
            TokenLogprob(
                position=n_prompt + t,
                token_id=generated[t],
                token=texts[t],
                logprob=logprobs[t],
                generated=True,
                top_logprobs=alternatives[t],
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
