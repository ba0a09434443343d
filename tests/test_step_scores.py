"""Generation logprobs computed step by step (``StepScores``), in-process on the tiny
GPT-2: equal to ``compute_transition_scores`` over the scores ``generate`` kept, while
each step's scores are released once read."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from worker.backends.hf_step_scores import StepScores, score_precision

PROMPT = "The quick brown fox"
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=40, top_p=1.0,
                num_return_sequences=3, max_new_tokens=40)


def _generate(model, inputs, criteria=None):
    torch.manual_seed(7)
    with torch.inference_mode():
        return model.generate(**inputs, **SAMPLING, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=50256,
                              stopping_criteria=criteria)


@pytest.mark.parametrize("release", [True, False])
def test_step_scores_match_transition_scores_and_free_each_step(tiny_gpt2: str,
                                                                release: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    inputs = AutoTokenizer.from_pretrained(tiny_gpt2)(PROMPT, return_tensors="pt")
    reference = _generate(model, inputs)
    expected = model.compute_transition_scores(reference.sequences, reference.scores,
                                               normalize_logits=True)

    steps = StepScores(top_k=3, release_scores=release)
    out = _generate(model, inputs, StoppingCriteriaList([steps]))
    assert torch.equal(out.sequences, reference.sequences)  # same draws: nothing perturbed
    n = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert steps.steps == n == SAMPLING["max_new_tokens"]
    for r in range(3):
        assert steps.logprobs(r, n) == pytest.approx(expected[r].tolist(), abs=1e-5)
    # The scores generate kept: released (empty) once read, or all there.
    kept = sum(s.numel() for s in out.scores)
    assert kept == (0 if release else n * 3 * model.config.vocab_size)


def test_float32_where_the_device_has_no_float64(tiny_gpt2: str) -> None:
    """Apple's MPS has no float64: there the step's log-softmax runs in float32 (run
    here on the CPU), still ``compute_transition_scores`` within float32 rounding."""
    assert score_precision(torch.device("mps")) is torch.float32
    assert score_precision(torch.device("cpu")) is torch.float64
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    inputs = AutoTokenizer.from_pretrained(tiny_gpt2)(PROMPT, return_tensors="pt")
    reference = _generate(model, inputs)
    expected = model.compute_transition_scores(reference.sequences, reference.scores,
                                               normalize_logits=True)
    steps = StepScores(top_k=3, precision=torch.float32)
    out = _generate(model, inputs, StoppingCriteriaList([steps]))
    assert torch.equal(out.sequences, reference.sequences)
    n = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert steps._chosen[0].dtype is torch.float32
    for r in range(3):
        assert steps.logprobs(r, n) == pytest.approx(expected[r].tolist(), abs=1e-5)
