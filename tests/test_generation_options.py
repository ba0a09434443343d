"""Generation decodes exactly as the spec says, in-process on tiny models: a model's
``generation_config.json`` changes nothing, every EOS id it lists ends a sequence as
in ``model.generate``, and more alternatives than the vocabulary holds give them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from api_client.specs import GenerateSpec, ScoreSpec
from worker.backends.hf_generate import generate
from worker.backends.hf_models import load_model
from worker.backends.hf_score import BatchBudget, score, score_batch

PROMPT = "the cat sat on the mat, the cat sat on the mat"
END_OF_TURN = 13  # "." plays Llama-3-Instruct's <|eot_id|>; 50256 its <|end_of_text|>


def peaked_copy(tiny_gpt2: str, path: Path, generation_config: dict) -> str:
    """The tiny GPT-2 with peaked next-token distributions (like a trained model's, so
    a repetition penalty moves logprobs visibly) and the given generation_config.json."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(40.0)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_gpt2) / name, path)
    (path / "generation_config.json").write_text(json.dumps(generation_config))
    return str(path)


@pytest.mark.parametrize("sampling", [False, True])
def test_the_models_generation_config_changes_nothing(tiny_gpt2: str, tmp_path: Path,
                                                      sampling: bool) -> None:
    # A Qwen2.5-Instruct-style file, plus options that change greedy decoding.
    model_dir = peaked_copy(tiny_gpt2, tmp_path / "m", {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 12})
    lm = load_model(model_dir, None, None, "cpu")
    options = dict(do_sample=True, seed=3) if sampling else {}
    out = generate(lm, GenerateSpec(prompt=PROMPT, model=model_dir, max_new_tokens=12,
                                    top_logprobs=1, **options))
    prompt = lm.tokenizer(PROMPT)["input_ids"]
    generated = [t.token_id for t in out.sequences[0].tokens]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + generated])).logits[0].float()
    rows = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    # Temperature 1, no top-k, top-p 1: each logprob is the raw distribution's.
    expected = rows.gather(1, torch.tensor(generated)[:, None])[:, 0]
    got = torch.tensor([t.logprob for t in out.sequences[0].tokens])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    if not sampling:  # greedy is the argmax at every step
        assert generated == rows.argmax(-1).tolist()
        assert [t.top_logprobs[0].token_id for t in out.sequences[0].tokens] == generated


def test_every_eos_id_ends_a_sequence(tiny_gpt2: str, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_gpt2, model_dir)
    (model_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 50256, "eos_token_id": [50256, END_OF_TURN]}))
    spec = GenerateSpec(prompt="Finn writes code", model=str(model_dir), max_new_tokens=12,
                        do_sample=True, seed=11, num_return_sequences=4)

    def favour_end_of_turn(model: torch.nn.Module) -> None:
        model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, out: out + 9.0 * torch.nn.functional.one_hot(
                torch.tensor(END_OF_TURN), out.shape[-1]))

    lm = load_model(str(model_dir), None, None, "cpu")
    assert lm.stop_token_ids == (50256, END_OF_TURN)
    favour_end_of_turn(lm.model)
    out = generate(lm, spec)

    reference_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    favour_end_of_turn(reference_model)
    ids = torch.tensor([lm.tokenizer("Finn writes code")["input_ids"]])
    torch.manual_seed(11)
    with torch.inference_mode():  # generate with the model's own file: stops on both ids
        reference = reference_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=12,
            num_return_sequences=4, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=50256)
    stopped = 0
    for sequence, row in zip(out.sequences, reference[:, ids.shape[1]:].tolist(), strict=True):
        ends = [t for t, token in enumerate(row) if token in (50256, END_OF_TURN)]
        expected = row[: ends[0] + 1] if ends else row
        assert [t.token_id for t in sequence.tokens] == expected
        assert sequence.finish_reason == ("stop" if ends else "length")
        stopped += bool(ends and row[ends[0]] == END_OF_TURN)
    assert stopped >= 1  # the second EOS id did end a sequence


def test_more_alternatives_than_the_vocabulary(tmp_path: Path) -> None:
    from tests.tiny_models import gpt2_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=11, eos_token_id=11)).save_pretrained(tmp_path)
    gpt2_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), None, None, "cpu")
    spec = ScoreSpec(token_ids=[1, 2, 3, 4], model=str(tmp_path), top_logprobs=20)
    alone, batched = score(lm, spec), score_batch(lm, [spec], BatchBudget())[0]
    assert not isinstance(batched, Exception)
    for output in (alone, batched):
        for token in output.sequences[0].tokens[1:]:
            assert sorted(a.token_id for a in token.top_logprobs) == list(range(12))
    out = generate(lm, GenerateSpec(prompt="!#", model=str(tmp_path), max_new_tokens=2,
                                    top_logprobs=20))  # ids 0, 2: within the vocabulary
    sequence = out.sequences[0]
    assert [len(t.top_logprobs) for t in (*sequence.prompt_tokens[1:], *sequence.tokens)] \
        == [12, 12, 12]


class _HostEvent:
    """``torch.Event`` for the CPU, where work is done when the call returns."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def test_a_stop_found_a_step_late_is_undone(tiny_gpt2: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On MPS, ``generate`` learns a step late that every sequence has ended (its
    ``DeferredStopCheck``), runs one more step and undoes it; the CPU plays MPS here."""
    from transformers.generation.utils import DeferredStopCheck

    monkeypatch.setattr(DeferredStopCheck, "is_supported", staticmethod(lambda *_a, **_k: True))
    monkeypatch.setattr(torch, "Event", _HostEvent)

    def favour_eos(model: torch.nn.Module) -> None:
        model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, out: out + 10.0 * torch.nn.functional.one_hot(
                torch.tensor(50256), out.shape[-1]))

    lm = load_model(tiny_gpt2, None, None, "cpu")
    favour_eos(lm.model)
    spec = GenerateSpec(prompt="Finn writes code", model=tiny_gpt2, max_new_tokens=12,
                        do_sample=True, seed=11, num_return_sequences=3)
    out = generate(lm, spec)

    reference_model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    favour_eos(reference_model)
    ids = torch.tensor([lm.tokenizer("Finn writes code")["input_ids"]])
    torch.manual_seed(11)
    with torch.inference_mode():
        reference = reference_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=12,
            num_return_sequences=3, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=50256,
            output_scores=True, return_dict_in_generate=True)
    expected = reference_model.compute_transition_scores(
        reference.sequences, reference.scores, normalize_logits=True)
    assert reference.sequences.shape[1] - ids.shape[1] < 12  # every sequence stopped early
    for r, sequence in enumerate(out.sequences):
        row = reference.sequences[r, ids.shape[1]:].tolist()
        end = row.index(50256) + 1
        assert [t.token_id for t in sequence.tokens] == row[:end]
        assert sequence.logprobs == pytest.approx(expected[r, :end].tolist(), abs=1e-5)
        assert sequence.finish_reason == "stop"


def test_sampled_generations_in_two_threads_replay_from_their_seeds(tiny_gpt2: str) -> None:
    """``--pool threads`` runs two jobs of one process at once, and sampling draws from
    torch's one global generator: each sampled generation must still give exactly what
    it gives alone from its seed. The model pauses in each forward pass (releasing the
    GIL) so that, unguarded, the threads' steps would interleave."""
    import threading
    import time

    lm = load_model(tiny_gpt2, None, None, "cpu")
    specs = [GenerateSpec(prompt=PROMPT, model=tiny_gpt2, max_new_tokens=16, do_sample=True,
                          seed=seed) for seed in (5, 6)]
    alone = [[t.token_id for t in generate(lm, spec).sequences[0].tokens] for spec in specs]
    assert alone[0] != alone[1]

    pause = lm.model.register_forward_pre_hook(lambda *_: time.sleep(0.002))
    together: dict[int, list[int]] = {}

    def run(i: int) -> None:
        together[i] = [t.token_id for t in generate(lm, specs[i]).sequences[0].tokens]

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        pause.remove()
    assert [together.get(0), together.get(1)] == alone
