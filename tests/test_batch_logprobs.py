"""The batched scoring math in-process (no worker): packed rows, chunked log-softmax and
top-k, on the tiny GPT-2 and LLaMA, against a plain forward pass per text alone.
``tests/test_throughput.py`` checks the same through a real worker."""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from api_client.specs import ScoreSpec
from worker.backends.hf_batch_logprobs import (
    RowLogits,
    chunked_scores,
    default_chunk_rows,
    head_only_applies,
    launch_token_logprobs,
    padding_mask,
    tile_log_sum,
)
from worker.backends.hf_common import alternatives_from_topk
from worker.backends.hf_models import LoadedModel, load_model
from worker.backends.hf_prefix_rows import PrefixRows, distinct_prefix_rows
from worker.backends.hf_score import BatchBudget, score_batch

TOL = 1e-5
TEXTS = [
    "Hi there",
    "A " + "very " * 30 + "long sentence, longer than a chunk on its own.",
    "Finn writes code",
    "The quick brown fox jumps over the lazy dog while the farmer watches.",
    "Short one.",
    "Logprobs, losses and top-k alternatives: all of them per token, in float32.",
    "ok then",  # two tokens: a single scored row
    "Then " + "really " * 50 + "long, so that the texts fill more than one default chunk.",
    *(f"Text {n}: " + "and so on " * 30 for n in range(4)),  # 4 x ~95 more distinct rows
]
TOP_K = [5 if i % 2 else 0 for i in range(len(TEXTS))]
#: Texts that begin alike (a template, a text and its extension, a duplicate), each
#: asking for a different number of alternatives, so that rows shared between texts
#: need top-k for some of them and not for others.
SHARED_PREFIX_TEXTS = [
    "The old lighthouse keeper quietly watched item 1.",
    "The old lighthouse keeper quietly watched item 22.",
    "The old lighthouse keeper argued about the bridge.",
    "The old lighthouse keeper quietly watched item 1. Then he slept.",
    "The old lighthouse keeper quietly watched item 1.",
    "A young engineer measured item 3.",
    "A young engineer measured item 3 twice.",
]
SHARED_PREFIX_TOP_K = [0, 3, 5, 0, 2, 0, 4]


@cache
def loaded(path: str) -> LoadedModel:
    return load_model(path, None, None, "cpu")


@pytest.fixture(params=["gpt2", "llama"])
def model_path(request: pytest.FixtureRequest, tiny_models: dict) -> str:
    return str(tiny_models[request.param])


def alone(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """``log_softmax`` of one text's own forward pass: [len(ids) - 1, vocabulary]."""
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize(("head_only", "vocabulary_tile"), [
    (None, None),  # on this CPU: the packed head, in tiles
    (None, 999),  # tiles of an odd size, the last one short
    (None, 10**6),  # the packed head in one tile, as on a GPU
    (False, None),  # the full forward
], ids=["packed-head", "packed-head-999-id-tiles", "packed-head-one-tile", "full-forward"])
@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["default-chunks", "7-row-chunks"])
@pytest.mark.parametrize("texts", ["distinct", "shared-prefixes"])
def test_batch_matches_each_text_alone(model_path: str, head_only: bool | None,
                                       vocabulary_tile: int | None,
                                       chunk_rows: int | None, texts: str) -> None:
    lm = loaded(model_path)
    assert head_only_applies(lm.model)  # so head_only=None takes the packed-head path
    batch, top_k = ((TEXTS, TOP_K) if texts == "distinct"
                    else (SHARED_PREFIX_TEXTS, SHARED_PREFIX_TOP_K))
    specs = [ScoreSpec(model=model_path, text=text, top_logprobs=k)
             for text, k in zip(batch, top_k, strict=True)]
    outputs = score_batch(lm, specs, BatchBudget(tokens=10_000), chunk_rows=chunk_rows,
                          head_only=head_only, vocabulary_tile=vocabulary_tile)
    all_ids = [[t.token_id for t in out.sequences[0].tokens] for out in outputs]
    prefixes = distinct_prefix_rows(all_ids, max(map(len, all_ids)))
    if texts == "shared-prefixes":  # the output layer ran on fewer rows than scored
        assert prefixes.distinct < 0.6 * len(prefixes.row_of)
    for spec, out in zip(specs, outputs, strict=True):
        assert not isinstance(out, Exception), out
        assert out.provenance["batch_size"] == len(batch)  # one forward pass for all
        tokens = out.sequences[0].tokens
        ids = [t.token_id for t in tokens]
        logprobs = alone(lm, ids)
        got = torch.tensor([t.logprob for t in tokens[1:]])
        want = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert tokens[0].logprob is None and tokens[0].top_logprobs == ()
        assert torch.allclose(got, want, atol=TOL, rtol=0)
        assert out.loss == pytest.approx(-want.double().mean().item(), abs=TOL)
        for row, token in zip(logprobs, tokens[1:], strict=True):
            if spec.top_logprobs == 0:
                assert token.top_logprobs == ()
                continue
            top = torch.topk(row, spec.top_logprobs)
            assert [a.token_id for a in token.top_logprobs] == top.indices.tolist()
            assert [a.logprob for a in token.top_logprobs] == pytest.approx(
                top.values.tolist(), abs=TOL)
            assert [a.token for a in token.top_logprobs] == lm.tokenizer.batch_decode(
                [[i] for i in top.indices.tolist()])
    if texts == "distinct":
        # More than one chunk even at the CPU default.
        assert prefixes.distinct > default_chunk_rows(lm.model.get_output_embeddings())


def test_packed_head_runs_the_base_model_without_a_mask(model_path: str) -> None:
    """The packed-head path passes no attention mask (right padding, causal attention):
    each text's own positions get the hidden states the masked call gives them, bit
    for bit, and the scores are the batch's (``test_batch_matches_each_text_alone``)."""
    lm = loaded(model_path)
    batch = [lm.tokenizer(text).input_ids for text in TEXTS]
    assert len({len(ids) for ids in batch}) > 1  # padded
    calls: list[tuple[dict, torch.Tensor]] = []
    handle = lm.model.base_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output.last_hidden_state)),
        with_kwargs=True)
    try:
        launch_token_logprobs(lm, batch, [0] * len(batch)).result()
    finally:
        handle.remove()
    (kwargs, hidden), = calls
    assert kwargs["attention_mask"] is None
    with torch.inference_mode():
        masked = lm.model.base_model(input_ids=kwargs["input_ids"],
                                     attention_mask=padding_mask(lm, batch),
                                     use_cache=False).last_hidden_state
    assert not torch.equal(hidden, masked)  # padded positions differ, and are never read
    for row, ids in enumerate(batch):
        assert torch.equal(hidden[row, :len(ids)], masked[row, :len(ids)])


def test_packed_head_skips_the_packed_sequence_check_and_only_it(
        model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' check of its position ids for packed sequences (a host-side read,
    a GPU wait) does not run in the packed-head path, whose rows are one text each;
    it still runs for every other call, and in other threads meanwhile."""
    from transformers import masking_utils

    from worker.backends import hf_packed_check

    lm = loaded(model_path)
    batch = [lm.tokenizer(text).input_ids for text in TEXTS]
    launch_token_logprobs(lm, batch, [0] * len(batch)).result()  # installs the switch
    checked: list[torch.Tensor] = []
    original = hf_packed_check._original
    assert original is not None

    def spy(position_ids: torch.Tensor) -> torch.Tensor | None:
        checked.append(position_ids)
        return original(position_ids)

    monkeypatch.setattr(hf_packed_check, "_original", spy)
    scored = launch_token_logprobs(lm, batch, [0] * len(batch)).result()
    assert checked == []
    # The same math as with the check: each text alone (the masked reference above).
    for ids, text in zip(batch, scored, strict=True):
        want = alone(lm, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(text.token_logprobs), want, atol=TOL, rtol=0)
    with torch.inference_mode():
        lm.model(torch.tensor([batch[0]]), use_cache=False)  # any other such call: checked
    assert len(checked) == 1
    # Two sequences packed in one row: found outside the switch, in any thread.
    packed = torch.tensor([[0, 1, 2, 0, 1]])
    with hf_packed_check.without_packed_check():
        assert masking_utils.find_packed_sequence_indices(packed) is None
        seen: list[object] = []
        thread = threading.Thread(
            target=lambda: seen.append(masking_utils.find_packed_sequence_indices(packed)))
        thread.start()
        thread.join()
    assert seen[0].tolist() == [[0, 0, 0, 1, 1]]  # type: ignore[attr-defined]
    assert masking_utils.find_packed_sequence_indices(packed).tolist() == [[0, 0, 0, 1, 1]]


@pytest.mark.parametrize("tile", [7, 64], ids=["tiles", "one-tile"])
def test_chunked_scores_equal_log_softmax(tile: int) -> None:
    """The tiles' maxima and log-sums combined equal ``torch.log_softmax`` of the whole
    row, top-k included, also where a row's logits are -inf in a whole tile (masked
    ids: that tile adds nothing) and across chunks (3 rows each)."""
    generator = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(10, 64, generator=generator) - 100  # GPT-2-like magnitudes
    logits[2, :7] = -torch.inf  # the first tile of row 2
    logits[5, 20:] = -torch.inf
    targets = torch.randint(0, 64, (10,), generator=generator)
    targets[2], targets[5] = 30, 3
    row_top_k = torch.tensor([0, 3, 5, 0, 1, 4, 0, 0, 2, 3])
    row_logits = RowLogits(lambda start, stop, first, last: logits[start:stop, first:last]
                           .clone(), vocabulary=64, tile=tile)
    prefixes = PrefixRows(positions=torch.arange(10), row_of=torch.arange(10))
    scores = chunked_scores(row_logits, prefixes, targets, row_top_k, chunk_rows=3)
    want = torch.log_softmax(logits.double(), dim=1)
    assert torch.allclose(scores.token_logprobs.double(),
                          want.gather(1, targets[:, None])[:, 0], atol=TOL, rtol=0)
    assert scores.top_values is not None and scores.top_ids is not None
    for row, k in enumerate(row_top_k.tolist()):
        top = torch.topk(want[row], k)
        assert scores.top_ids[row, :k].tolist() == top.indices.tolist()
        assert torch.allclose(scores.top_values[row, :k].double(), top.values, atol=TOL,
                              rtol=0)


@pytest.mark.parametrize("kernel", [True, False], ids=["log-softmax-kernel", "exp-and-sum"])
def test_tile_log_sum_both_ways(kernel: bool) -> None:
    """Both ways of a tile's log-sum-exp (the log-softmax kernel, a CPU's; ``exp_`` and
    a sum, a GPU's) give each row's maximum and ``log(sum(exp(x - max)))``."""
    logits = 8 * torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) - 100
    logits[3, ::2] = -torch.inf
    most, log_sum = tile_log_sum(logits.clone(), kernel=kernel)
    assert torch.equal(most, logits.amax(1))
    want = torch.logsumexp(logits.double() - most.double()[:, None], dim=1)
    assert torch.allclose(log_sum.double(), want, atol=1e-6, rtol=0)


def test_padding_stays_inside_a_smaller_vocabulary(tmp_path: Path) -> None:
    """A model whose vocabulary is smaller than its tokenizer's (the tokenizer's EOS,
    50256, is no id of the model) is padded with an id it has: texts of different
    lengths in one batch score as each alone (before: "index out of range in self")."""
    from tests.tiny_models import gpt2_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    gpt2_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), None, None, "cpu")
    assert lm.eos_token_id is not None and lm.eos_token_id >= lm.vocab_size
    id_lists = [[5, 17, 400, 999, 3], [7, 8], [900, 1, 2, 3, 4, 5, 6, 7]]
    specs = [ScoreSpec(model=str(tmp_path), token_ids=ids) for ids in id_lists]
    outputs = score_batch(lm, specs, BatchBudget(tokens=1000))
    for ids, out in zip(id_lists, outputs, strict=True):
        assert not isinstance(out, Exception), out
        assert out.provenance["batch_size"] == len(id_lists)
        got = torch.tensor([t.logprob for t in out.sequences[0].tokens[1:]])
        want = alone(lm, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(got, want, atol=TOL, rtol=0)


def test_distinct_prefix_rows() -> None:
    """One row per distinct prefix, numbered in order of first appearance; every
    scored row (positions 0..n-2 of each text) points at the prefix it ends."""
    batch = [[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 8], [6, 5], [5, 6, 7, 8, 1], [4]]
    prefixes = distinct_prefix_rows(batch, width=5)
    # distinct prefixes: (5) (5 6) (5 6 7) (6) (5 6 7 8); [4] has no scored row
    assert prefixes.positions.tolist() == [0, 1, 2, 15, 23]
    assert prefixes.row_of.tolist() == [0, 1, 2,  0, 1,  0, 1, 2,  3,  0, 1, 2, 4]
    assert prefixes.distinct == 5
    empty = distinct_prefix_rows([[1]], width=1)
    assert empty.distinct == 0 and empty.row_of.tolist() == []


def test_only_plain_heads_take_the_packed_path() -> None:
    config = GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    assert head_only_applies(GPT2LMHeadModel(config))

    class Subclass(GPT2LMHeadModel):  # may post-process logits in its own forward
        pass

    assert not head_only_applies(Subclass(config))
    config.final_logit_softcapping = 30.0
    assert not head_only_applies(GPT2LMHeadModel(config))


def test_alternatives_from_topk_rows_of_any_length() -> None:
    rows = alternatives_from_topk([[-0.5, float("-inf")], [], [-1.0]], [[7, 8], [], [9]],
                                  ["seven", "eight", "nine"])
    assert [[(a.token_id, a.token, a.logprob) for a in row] for row in rows] == [
        [(7, "seven", -0.5)], [], [(9, "nine", -1.0)]]


def test_fused_activations_match_the_stock_model(tiny_models: dict) -> None:
    """The worker loads GPT-2 with the fused tanh-GELU kernel; its logprobs equal the
    stock transformers model's within float32 rounding, and with fused activations
    off the model is the stock one, bit for bit."""
    from transformers.activations import GELUTanh, NewGELUActivation

    path = str(tiny_models["gpt2"])
    stock = GPT2LMHeadModel.from_pretrained(path).eval()
    fused = load_model(path, None, None, "cpu")
    plain = load_model(path, None, None, "cpu", fused_activations=False)
    assert {type(block.mlp.act) for block in stock.transformer.h} == {NewGELUActivation}
    assert {type(block.mlp.act) for block in fused.model.transformer.h} == {GELUTanh}
    assert {type(block.mlp.act) for block in plain.model.transformer.h} == {NewGELUActivation}
    ids = fused.tokenizer(TEXTS[1])["input_ids"]
    with torch.inference_mode():
        want = torch.log_softmax(stock(torch.tensor([ids])).logits[0], dim=-1)
    assert torch.equal(alone(plain, ids), want[:-1])
    assert torch.allclose(alone(fused, ids), want[:-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_keep_the_stock_activation(tiny_models: dict, dtype: str
                                                         ) -> None:
    """In half precision the fused kernel rounds once where the stock module rounds
    after every operation, and logprobs move by up to 5e-2: a half-precision model is
    served as transformers builds it, its logprobs the stock model's bit for bit."""
    from transformers.activations import NewGELUActivation

    path = str(tiny_models["gpt2"])
    stock = GPT2LMHeadModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    served = load_model(path, None, dtype, "cpu")
    assert {type(block.mlp.act) for block in served.model.transformer.h} == {NewGELUActivation}
    ids = served.tokenizer(TEXTS[1])["input_ids"]
    with torch.inference_mode():
        want = torch.log_softmax(stock(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert torch.equal(alone(served, ids), want[:-1])


# --- lookahead: the next batch queued before the last one is collected ------------------

def scores_of(outputs: list) -> list[tuple[float, ...]]:
    """Each output's token logprobs, alternatives' ids and logprobs, flat."""
    return [tuple(v for t in out.sequences[0].tokens[1:]
                  for v in (t.logprob, *(x for a in t.top_logprobs
                                         for x in (a.token_id, a.logprob))))
            for out in outputs]


def forward_events(lm: LoadedModel, events: list[str], fail: object = None
                   ) -> torch.utils.hooks.RemovableHandle:
    """Log ``"forward"`` as each forward pass of ``lm`` starts; ``fail(batch_rows)``
    may raise instead (a fault injected into the model, not into logprobe)."""
    def before(_module: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
        if callable(fail):
            fail(kwargs["input_ids"].shape[0])
        events.append("forward")

    return lm.model.base_model.register_forward_pre_hook(before, with_kwargs=True)


def test_lookahead_queues_the_next_batch_before_handing_on_the_last(model_path: str) -> None:
    """With ``lookahead`` each batch's forward pass starts before the batch before it
    is collected and handed on (on a GPU, the GPU computes it meanwhile); the outputs
    are those of one batch at a time, bit for bit on this CPU."""
    lm = loaded(model_path)
    specs = [ScoreSpec(model=model_path, text=text, top_logprobs=k)
             for text, k in zip(TEXTS, TOP_K, strict=True)]
    runs = {}
    for lookahead in (False, True):
        events: list[str] = []
        handle = forward_events(lm, events)
        try:
            outputs = score_batch(
                lm, specs, BatchBudget(tokens=200), lookahead=lookahead,
                on_batch=lambda indices, outs, events=events: events.append(
                    f"ready {sorted(indices)}"))
        finally:
            handle.remove()
        runs[lookahead] = (events, outputs)
    (plain_events, plain), (ahead_events, ahead) = runs[False], runs[True]
    handed_on = [e for e in plain_events if e != "forward"]
    n = len(handed_on)
    assert n >= 3
    assert plain_events == [e for ready in handed_on for e in ("forward", ready)]
    assert ahead_events == ["forward", *(e for ready in handed_on[:-1]
                                         for e in ("forward", ready)), handed_on[-1]]
    assert scores_of(ahead) == scores_of(plain)
    assert [o.provenance["batch_size"] for o in ahead] == [
        o.provenance["batch_size"] for o in plain]


def test_lookahead_backs_off_on_out_of_memory(model_path: str) -> None:
    """A batch that runs out of memory as it is queued (here: any of more than two
    texts) is retried in halves once the batch in flight is collected: every text is
    scored, in batches of at most two, as it scores in the large batches."""
    lm = loaded(model_path)
    specs = [ScoreSpec(model=model_path, text=text, top_logprobs=k)
             for text, k in zip(TEXTS, TOP_K, strict=True)]
    want = scores_of(score_batch(lm, specs, BatchBudget(tokens=400), lookahead=False))

    def fail(rows: int) -> None:
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handed_on: list[int] = []
    budget = BatchBudget(tokens=400)
    handle = forward_events(lm, [], fail)
    try:
        outputs = score_batch(lm, specs, budget, lookahead=True,
                              on_batch=lambda indices, outs: handed_on.extend(indices))
    finally:
        handle.remove()
    assert sorted(handed_on) == list(range(len(specs)))
    assert budget.tokens < 400
    assert max(o.provenance["batch_size"] for o in outputs) <= 2
    for got, expected in zip(scores_of(outputs), want, strict=True):
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=TOL, rtol=0)


def test_lookahead_hands_on_the_batch_in_flight_when_a_later_one_breaks(
        model_path: str) -> None:
    """Any other error queuing a batch ends the scoring, but the batches computed
    before it, the one in flight included, are handed on first."""
    lm = loaded(model_path)
    specs = [ScoreSpec(model=model_path, text=text) for text in TEXTS]
    forwards = []

    def fail(rows: int) -> None:
        forwards.append(rows)
        if len(forwards) == 3:
            raise ValueError("the third forward pass breaks (injected)")

    handed_on: list[list[int]] = []
    handle = forward_events(lm, [], fail)
    try:
        with pytest.raises(ValueError, match="third forward"):
            score_batch(lm, specs, BatchBudget(tokens=200), lookahead=True,
                        on_batch=lambda indices, outs: handed_on.append(sorted(indices)))
    finally:
        handle.remove()
    plan = BatchBudget(tokens=200).plan([len(lm.tokenizer(t)["input_ids"]) for t in TEXTS])
    assert handed_on == [sorted(batch) for batch in plan[:2]]
