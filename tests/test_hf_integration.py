"""Score and generate through a real worker process, checked against Hugging Face.

Each test runs on SQLite and PostgreSQL (the module's worker is parametrized),
on tiny GPT-2 and LLaMA models built offline.
"""

from __future__ import annotations

import importlib.metadata
import math
from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_client import JobStatus

TEXT = "Finn writes code"
TOL = 1e-5


@cache
def reference(path: str) -> tuple[object, object]:
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=["gpt2", "llama"])
def model_path(request: pytest.FixtureRequest, tiny_models: dict) -> str:
    return str(tiny_models[request.param])


def test_score_matches_hf_loss_and_logprobs(client, model_path: str) -> None:
    res = client.score(TEXT, model=model_path, top_logprobs=5).result(timeout=120)

    model, tok = reference(model_path)
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert abs(res.loss - out.loss.item()) <= TOL
    logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)

    assert [t.token_id for t in res.tokens] == ids[0].tolist()
    assert res.tokens[0].logprob is None
    for i, token in enumerate(res.tokens[1:], start=1):
        assert token.token == tok.decode([token.token_id])
        assert abs(token.logprob - logprobs[i - 1, ids[0, i]].item()) <= TOL
        top = torch.topk(logprobs[i - 1], 5)
        assert [a.token_id for a in token.top_logprobs] == top.indices.tolist()
        assert [a.logprob for a in token.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                        abs=TOL)
        assert token.prob == pytest.approx(math.exp(token.logprob))


def test_prepend_bos_scores_every_token(client, model_path: str) -> None:
    res = client.score(TEXT, model=model_path, prepend_bos=True).result(timeout=120)

    model, tok = reference(model_path)
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.eos_token_id, *text_ids]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    loglik = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).sum().item()

    assert [t.token_id for t in res.tokens] == ids[0].tolist()
    assert sum(t.logprob for t in res.tokens[1:]) == pytest.approx(loglik, abs=TOL)
    assert res.loss == pytest.approx(-loglik / len(text_ids), abs=TOL)
    row = client.sql("SELECT SUM(logprob) AS s, COUNT(logprob) AS n FROM tokens "
                     "WHERE job_id = :j", {"j": res.job_id}).iloc[0]
    assert row["s"] == pytest.approx(loglik, abs=TOL)
    assert row["n"] == len(text_ids)


def test_greedy_generation_matches_hf_generate(client, model_path: str) -> None:
    res = client.generate(TEXT, model=model_path, max_new_tokens=5, do_sample=False,
                          top_logprobs=3).result(timeout=120)

    model, tok = reference(model_path)
    inputs = tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=5, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    scores = model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True)
    n_prompt = inputs["input_ids"].shape[1]

    seq = res.sequences[0]
    assert [t.token_id for t in seq.tokens] == ref.sequences[0, n_prompt:].tolist()
    assert [t.logprob for t in seq.tokens] == pytest.approx(scores[0].tolist(), abs=TOL)
    assert seq.text == tok.decode(ref.sequences[0, n_prompt:], skip_special_tokens=True)
    assert [t.position for t in seq.tokens] == list(range(n_prompt, n_prompt + 5))
    # Greedy: the chosen token is the top alternative at every step.
    assert all(t.top_logprobs[0].token_id == t.token_id for t in seq.tokens)
    assert [t.token_id for t in seq.prompt_tokens] == inputs["input_ids"][0].tolist()
    assert res.seed is None


def test_seeded_sampling_replays_and_records_seed(client, tiny_gpt2: str) -> None:
    opts = dict(model=tiny_gpt2, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=40,
                num_return_sequences=3)
    first = client.generate(TEXT, seed=1234, **opts).result(timeout=120)
    again = client.generate(TEXT, seed=1234, **opts).result(timeout=120)
    other = client.generate(TEXT, seed=99, **opts).result(timeout=120)
    unseeded = client.generate(TEXT, **opts).result(timeout=120)

    ids = [s.token_ids for s in first.sequences]
    assert len(ids) == 3
    assert ids == [s.token_ids for s in again.sequences]
    assert [s.logprobs for s in first.sequences] == [s.logprobs for s in again.sequences]
    assert ids != [s.token_ids for s in other.sequences]
    assert first.seed == 1234
    # The worker picked a seed, recorded it, and the seed replays the sequences.
    assert unseeded.seed is not None
    replay = client.generate(TEXT, seed=unseeded.seed, **opts).result(timeout=120)
    assert [s.token_ids for s in replay.sequences] == [s.token_ids for s in unseeded.sequences]

    # Reference: HF sampling with the same seed and settings.
    model, tok = reference(tiny_gpt2)
    inputs = tok(TEXT, return_tensors="pt")
    torch.manual_seed(1234)
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=True, temperature=0.9, top_k=40, top_p=1.0,
                             max_new_tokens=8, num_return_sequences=3, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    scores = model.compute_transition_scores(ref.sequences, ref.scores, normalize_logits=True)
    n_prompt = inputs["input_ids"].shape[1]
    for r, seq in enumerate(first.sequences):
        assert seq.token_ids == ref.sequences[r, n_prompt:].tolist()
        assert seq.logprobs == pytest.approx(scores[r].tolist(), abs=TOL)


def test_gpt2_tokenizer_ids_in_tokens_table(client, tiny_gpt2: str) -> None:
    job = client.score(" to make it easier to", model=tiny_gpt2)
    job.result(timeout=120)
    frame = client.sql("SELECT position, token_id, token, logprob, generated FROM tokens "
                       "WHERE job_id = :j ORDER BY position", {"j": job.id})
    assert frame["token_id"].tolist() == [284, 787, 340, 4577, 284]
    assert frame["token"].tolist() == [" to", " make", " it", " easier", " to"]
    assert not frame["generated"].astype(bool).any()


def test_job_row_records_provenance(client, tiny_gpt2: str) -> None:
    job = client.score(TEXT, model=tiny_gpt2)
    job.result(timeout=120)
    info = job.info()
    assert info["status"] is JobStatus.SUCCEEDED
    assert info["model_revision"].startswith("sha256:")
    assert info["dtype"] == "float32"
    assert info["device"] == "cpu"
    assert info["torch_version"] == torch.__version__
    import transformers

    assert info["transformers_version"] == transformers.__version__
    assert info["openai_version"] == importlib.metadata.version("openai")
    assert info["device_name"]
    assert info["deterministic"] is False
    assert info["batch_size"] == 1
    assert info["worker"].startswith("hf")
    assert info["attempts"] == 1
    assert info["started_at"] <= info["finished_at"]
    assert info["spec"]["text"] == TEXT and info["spec"]["kind"] == "score"


def test_score_many_and_sql(client, tiny_gpt2: str) -> None:
    texts = [f"Sentence number {i} is here." for i in range(6)]
    jobs = client.score_many(texts, model=tiny_gpt2)
    results = [j.result(timeout=120) for j in jobs]
    frame = client.sql(
        "SELECT j.id, j.loss, COUNT(t.position) AS n FROM jobs j JOIN tokens t ON t.job_id = j.id "
        "WHERE j.id IN (" + ",".join(f"'{j.id}'" for j in jobs) + ") GROUP BY j.id, j.loss"
    )
    by_id = {row.id: row for row in frame.itertuples()}
    for job, res in zip(jobs, results, strict=True):
        assert by_id[job.id].loss == pytest.approx(res.loss)
        assert by_id[job.id].n == len(res.tokens)
