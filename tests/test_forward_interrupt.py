"""A forward pass stops between decoder layers once every job it serves is cancelled
or out of time, in-process on the tiny models with real job controls (the monitor
thread sets a job's cancel flag when it sees the Redis key; here a hook on the first
layer sets it, as if the flag arrived mid-forward)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from api_client.specs import GenerateSpec, ScoreSpec
from worker.backends.hf import HFBackend
from worker.backends.hf_interrupt import DURING_FORWARD, decoder_layers
from worker.control import CANCELLED, TIME_LIMIT, JobControl, JobStopped, monitoring

TEXT = "Finn writes code in the evening, and the code runs all night"


@contextmanager
def counting_layers(model: torch.nn.Module, first_layer_does=None) -> Iterator[list[int]]:
    """Count each decoder layer's runs; ``first_layer_does()`` runs inside the first."""
    layers = decoder_layers(model)
    runs = [0] * len(layers)
    handles = []
    for n, layer in enumerate(layers):
        def count(_m, _a, _o, n=n):
            runs[n] += 1
            if n == 0 and first_layer_does is not None:
                first_layer_does()
        handles.append(layer.register_forward_hook(count))
    try:
        yield runs
    finally:
        for handle in handles:
            handle.remove()


def run(backend: HFBackend, specs: list, controls: list[JobControl]) -> list:
    with monitoring(list(zip(specs, controls, strict=True))):
        return backend.run(specs)


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    return HFBackend()


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_tokens", [1024, 0])  # score_batch, and score() alone
def test_a_cancelled_score_stops_after_the_layer_it_is_in(
        backend: HFBackend, tiny_models: dict, model_name: str, batch_tokens: int) -> None:
    backend.batch_budget.tokens = batch_tokens
    spec = ScoreSpec(text=TEXT, model=str(tiny_models[model_name]))
    lm = backend.models.get(spec.model, None, spec.dtype, None)
    assert len(decoder_layers(lm.model)) == lm.model.config.num_hidden_layers == 2
    control = JobControl("a" * 32, time_limit=600)
    with counting_layers(lm.model, control._cancel.set) as runs:
        [output] = run(backend, [spec], [control])
    assert isinstance(output, JobStopped) and output.when == DURING_FORWARD
    assert control.stop_reason == CANCELLED
    assert runs == [1, 0]  # the second layer never ran

    # Past its time limit: the same, as a time-limit stop.
    late = JobControl("b" * 32, time_limit=600)
    with counting_layers(lm.model, lambda: setattr(late, "deadline", time.monotonic())):
        [output] = run(backend, [spec], [late])
    assert isinstance(output, JobStopped) and late.stop_reason == TIME_LIMIT

    # Not cancelled: scored as before, equal to the reference forward pass.
    free = JobControl("c" * 32, time_limit=600)
    with counting_layers(lm.model) as runs:
        [output] = run(backend, [spec], [free])
    ids = torch.tensor([lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected = float(lm.model(ids, labels=ids).loss)
    assert output.loss == pytest.approx(expected, abs=1e-5)
    assert runs[1] >= 1 and free.stop_reason is None
    backend.batch_budget.tokens = 1024


def test_a_batch_stops_only_when_all_its_jobs_should(backend: HFBackend,
                                                     tiny_gpt2: str) -> None:
    specs = [ScoreSpec(text=f"{TEXT}, take {n}", model=tiny_gpt2) for n in range(2)]
    lm = backend.models.get(tiny_gpt2, None, specs[0].dtype, None)
    one, other = JobControl("d" * 32, time_limit=600), JobControl("e" * 32, time_limit=600)
    with counting_layers(lm.model, one._cancel.set):
        outputs = run(backend, specs, [one, other])
    assert [type(o).__name__ for o in outputs] == ["ProbeOutput", "ProbeOutput"]
    assert one.stop_reason is None and other.stop_reason is None  # stored as usual

    both = [JobControl("f" * 32, time_limit=600), JobControl("0" * 32, time_limit=600)]
    with counting_layers(lm.model, lambda: [c._cancel.set() for c in both]):
        outputs = run(backend, specs, both)
    assert all(isinstance(o, JobStopped) for o in outputs)
    assert [c.stop_reason for c in both] == [CANCELLED, CANCELLED]


def test_generation_stops_in_its_prompt_but_keeps_decoded_tokens(backend: HFBackend,
                                                                  tiny_gpt2: str) -> None:
    spec = GenerateSpec(prompt=TEXT, model=tiny_gpt2, max_new_tokens=40)
    lm = backend.models.get(tiny_gpt2, None, spec.dtype, None)
    control = JobControl("1" * 32, time_limit=600)
    with counting_layers(lm.model, control._cancel.set) as runs:
        [output] = run(backend, [spec], [control])
    assert isinstance(output, JobStopped) and control.stop_reason == CANCELLED
    assert runs == [1, 0]  # the prompt's forward stopped; nothing was decoded

    # Cancelled while decoding: the stopping criterion ends it at the next step, with
    # the tokens so far (the layer checks are off once decoding has begun).
    decoding = JobControl("2" * 32, time_limit=600)
    calls = [0]

    def cancel_on_the_fifth_step() -> None:
        calls[0] += 1
        if calls[0] == 6:  # 1 prompt forward + prefill + 4 decoding steps
            decoding._cancel.set()

    with counting_layers(lm.model, cancel_on_the_fifth_step):
        [output] = run(backend, [spec], [decoding])
    assert not isinstance(output, Exception), output
    assert decoding.stop_reason == CANCELLED
    sequence = output.sequences[0]
    assert sequence.finish_reason == "cancelled" and 0 < len(sequence.tokens) < 40
