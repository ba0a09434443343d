"""Throughput features through a real worker: batched scoring, sweeps, result reuse,
bulk writes. Each worker test runs on SQLite and PostgreSQL (the module's worker is
parametrized), on tiny GPT-2 and LLaMA models built offline. Benchmarks live in
``bench/``, not here.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sqlite3
import time
import uuid
from datetime import datetime
from functools import cache
from pathlib import Path

import pytest
import torch
from sqlalchemy import event, insert, select
from sqlalchemy import text as sql_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_client import JobNotFound, JobStatus, SpecError
from api_client.database import make_engine, make_sessionmaker
from api_client.messages import chunk_messages
from api_client.results import Alternative, SequenceResult, TokenLogprob
from api_client.schema import Job, Token, TopLogprob
from api_client.schema import Sequence as SequenceRow
from api_client.specs import GenerateSpec, ScoreSpec
from api_client.sweeps import sweep_specs
from tests.conftest import make_database
from tests.helpers import WorkerProcess, add_jobs
from worker.__main__ import THREAD_VARIABLES, available_cpus, pool_math_threads
from worker.backends.base import ProbeOutput
from worker.backends.hf_score import BatchBudget, run_with_backoff
from worker.bulk_persistence import claim_many, store_outputs
from worker.persistence import store_output

TOL = 1e-5
# Different lengths (2 to ~90 tokens) so that batches are padded.
TEXTS = [
    "Hi there",
    "Finn writes code",
    "The quick brown fox jumps over the lazy dog while the farmer watches.",
    "A " + "very " * 40 + "long sentence about nothing in particular, padded on purpose.",
    "Logprobs, losses and top-k alternatives: all of them per token, in float32.",
    "Short one.",
]


@cache
def reference(path: str) -> tuple[object, object]:
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference_logprobs(path: str, text: str) -> tuple[list[int], torch.Tensor]:
    model, tok = reference(path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return ids, torch.log_softmax(logits[:-1], dim=-1)


@pytest.fixture(params=["gpt2", "llama"])
def model_path(request: pytest.FixtureRequest, tiny_models: dict) -> str:
    return str(tiny_models[request.param])


# --- batched scoring ------------------------------------------------------------------

def test_batched_scoring_matches_each_text_alone(client, model_path: str) -> None:
    jobs = client.score_many(TEXTS, model=model_path, top_logprobs=3)
    results = [job.result(timeout=120) for job in jobs]

    batch_sizes = [job.info()["batch_size"] for job in jobs]
    assert max(batch_sizes) > 1, "the texts of one message should share a forward pass"
    assert all(size >= 1 for size in batch_sizes)
    for text, res in zip(TEXTS, results, strict=True):
        ids, logprobs = reference_logprobs(model_path, text)
        assert [t.token_id for t in res.tokens] == ids
        assert res.tokens[0].logprob is None
        got = torch.tensor([t.logprob for t in res.tokens[1:]])
        want = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(got, want, atol=TOL, rtol=0)
        assert res.loss == pytest.approx(-want.double().mean().item(), abs=TOL)
        for i, token in enumerate(res.tokens[1:]):
            top = torch.topk(logprobs[i], 3)
            assert [a.token_id for a in token.top_logprobs] == top.indices.tolist()
            assert [a.logprob for a in token.top_logprobs] == pytest.approx(
                top.values.tolist(), abs=TOL)


def test_pool_processes_share_the_cpus(tmp_path: Path, redis_url: str, tiny_gpt2: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--concurrency 2`` on the hf backend: the pool processes get half the CPUs as
    their math threads (unless the environment sets them; each says so when it loads
    the model), and the jobs score as the reference does."""
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    database = next(make_database("sqlite", tmp_path))
    worker = WorkerProcess(backend="hf", queue=f"logprobe.hf.test-{uuid.uuid4().hex[:8]}",
                           redis_url=redis_url, database_url=database, log_dir=tmp_path,
                           extra_args=["--concurrency", "2"]).start()
    try:
        with worker.client(chunk_size=2) as client:
            jobs = client.score_many(TEXTS, model=tiny_gpt2)
            results = [job.result(timeout=120) for job in jobs]
            ran_in = {job.info()["worker"] for job in jobs}
    finally:
        worker.stop()
    # Each pool process says how many threads torch has when it loads the model.
    loads = re.findall(r"loading model .*; (\d+) CPU threads\)", worker.log_text())
    assert loads and set(loads) == {str(max(1, available_cpus() // 2))}
    assert len(ran_in) == 1  # one worker
    for text, result in zip(TEXTS, results, strict=True):
        ids, logprobs = reference_logprobs(tiny_gpt2, text)
        want = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor([t.logprob for t in result.tokens[1:]]), want,
                              atol=TOL, rtol=0)


def test_a_thread_pool_runs_messages_side_by_side_on_one_model(
        tmp_path: Path, redis_url: str, tiny_gpt2: str) -> None:
    """``--pool threads --concurrency 2`` on the hf backend (one process, one copy of
    the model, one message's CPU work beside the other's forward pass on a GPU): two
    threads load the model once, and score and generate jobs from many small messages,
    stored concurrently into one SQLite file, come out as the reference says."""
    database = next(make_database("sqlite", tmp_path))
    worker = WorkerProcess(backend="hf", queue=f"logprobe.hf.test-{uuid.uuid4().hex[:8]}",
                           redis_url=redis_url, database_url=database, log_dir=tmp_path,
                           extra_args=["--pool", "threads", "--concurrency", "2"]).start()
    texts = [f"{text} ({n})" for n in range(4) for text in TEXTS]
    try:
        with worker.client(chunk_size=2) as client:
            scored = client.score_many(texts, model=tiny_gpt2, top_logprobs=2)
            generated = [client.generate(text, model=tiny_gpt2, max_new_tokens=8)
                         for text in TEXTS[:4]]
            results = [job.result(timeout=120) for job in scored]
            continuations = [job.result(timeout=120) for job in generated]
    finally:
        worker.stop()
    log = worker.log_text()
    assert len(re.findall(r"loading model ", log)) == 1  # one load for both threads
    assert "Traceback" not in log
    # Two messages ran at once (the first two both wait for that one load).
    spans = sorted((end - seconds, end) for end, seconds in (
        (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), float(seconds))
        for stamp, seconds in re.findall(
            r"\[([\d-]+ [\d:,]+): INFO/\w+\] Task \S+ succeeded in ([\d.]+)s", log)))
    assert any(later[0] < earlier[1] - 0.1 for earlier, later in itertools.pairwise(spans))
    for text, result in zip(texts, results, strict=True):
        ids, logprobs = reference_logprobs(tiny_gpt2, text)
        assert [t.token_id for t in result.tokens] == ids
        want = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor([t.logprob for t in result.tokens[1:]]), want,
                              atol=TOL, rtol=0)
        assert [[a.token_id for a in t.top_logprobs] for t in result.tokens[1:]] == (
            torch.topk(logprobs, 2).indices.tolist())
    model, tok = reference(tiny_gpt2)
    for text, result in zip(TEXTS[:4], continuations, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
            scores = model.compute_transition_scores(out.sequences, out.scores,
                                                     normalize_logits=True)[0]
        assert [t.token_id for t in result.tokens] == out.sequences[0, ids.shape[1]:].tolist()
        assert [t.logprob for t in result.tokens] == pytest.approx(scores.tolist(), abs=TOL)


@pytest.mark.parametrize("early", [True, False], ids=["store-while-computing", "at-the-end"])
def test_batches_are_stored_while_the_next_computes(
        tmp_path: Path, redis_url: str, tiny_gpt2: str, early: bool) -> None:
    """A message of 12 texts in batches of a few (a 96-token budget): with the store
    thread on (the default) a batch's jobs are committed while later batches compute,
    so some job finished before another began, as the job rows' own times say; with
    ``--store-at-end`` (``LOGPROBE_STORE_WHILE_COMPUTING=0``) every job is stored once
    the message's last batch is done. Either way the rows are the reference's."""
    database = next(make_database("sqlite", tmp_path))
    worker = WorkerProcess(backend="hf", queue=f"logprobe.hf.test-{uuid.uuid4().hex[:8]}",
                           redis_url=redis_url, database_url=database, log_dir=tmp_path,
                           env={"LOGPROBE_BATCH_TOKENS": "96"},
                           extra_args=[] if early else ["--store-at-end"]).start()
    texts = [f"{TEXTS[n % len(TEXTS)]} (text {n})" for n in range(12)]
    try:
        with worker.client(chunk_size=len(texts)) as client:
            client.score("load the model first", model=tiny_gpt2).result(timeout=120)
            jobs = client.score_many(texts, model=tiny_gpt2)
            results = [job.result(timeout=120) for job in jobs]
            infos = [job.info() for job in jobs]
    finally:
        worker.stop()
    assert max(info["batch_size"] for info in infos) < len(texts)  # several batches
    first_finish = min(info["finished_at"] for info in infos)
    last_start = max(info["started_at"] for info in infos)
    assert (first_finish < last_start) is early
    for text, result in zip(texts, results, strict=True):
        ids, logprobs = reference_logprobs(tiny_gpt2, text)
        want = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor([t.logprob for t in result.tokens[1:]]), want,
                              atol=TOL, rtol=0)


def test_math_threads_are_left_alone_where_set_or_not_split() -> None:
    assert pool_math_threads("hf", "prefork", 2, {}, cpus=16) == 8
    assert pool_math_threads("hf", "prefork", 3, {}, cpus=2) == 1
    assert pool_math_threads("hf", "prefork", 2, {"OMP_NUM_THREADS": "4"}, cpus=16) is None
    assert pool_math_threads("hf", "prefork", 2, {"MKL_NUM_THREADS": "4"}, cpus=16) is None
    assert pool_math_threads("hf", "prefork", 1, {}, cpus=16) is None  # torch's default
    assert pool_math_threads("hf", "solo", 2, {}, cpus=16) is None
    assert pool_math_threads("openai", "threads", 8, {}, cpus=16) is None


def test_out_of_memory_halves_the_batch() -> None:
    calls: list[int] = []

    def forward(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > 2 or 99 in items:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [i * 10 for i in items]

    budget = BatchBudget(tokens=1024)
    parts = run_with_backoff([1, 2, 3, 4, 5, 99], forward, budget)
    assert calls[0] == 6 and budget.tokens < 1024
    done = {i: r for items, res in parts if not isinstance(res, BaseException)
            for i, r in zip(items, res, strict=True)}
    assert done == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    failed = [items for items, res in parts if isinstance(res, BaseException)]
    assert failed == [[99]]
    with pytest.raises(ValueError):  # anything else is not retried
        run_with_backoff([1], lambda items: (_ for _ in ()).throw(ValueError("bad")), budget)


def test_budget_plans_length_buckets() -> None:
    lengths = [50, 3, 48, 4, 100, 5]
    plan = BatchBudget(tokens=150, max_batch=8).plan(lengths)
    assert sorted(i for batch in plan for i in batch) == list(range(6))
    for batch in plan:
        assert len(batch) * max(lengths[i] for i in batch) <= 150 or len(batch) == 1
    assert plan[0] == [1, 3, 5]  # the short texts together


def test_the_worker_budget_follows_its_device_and_environment() -> None:
    """On CUDA short texts go up to 256 a batch within 8,192 padded tokens; on a CPU
    (and a device type the defaults do not list) 64 within 1,024; the environment
    overrides either, and a budget that cannot run is refused with its variable."""
    assert BatchBudget.for_device("cpu", {}) == BatchBudget(tokens=1024, max_batch=64)
    assert BatchBudget.for_device("xpu", {}) == BatchBudget(tokens=1024, max_batch=64)
    cuda = BatchBudget.for_device("cuda", {})
    assert cuda == BatchBudget(tokens=8192, max_batch=256)
    assert [len(b) for b in cuda.plan([40] * 300)] == [204, 96]  # the tokens bind
    assert [len(b) for b in cuda.plan([8] * 600)] == [256, 256, 88]  # the texts bind
    assert BatchBudget.for_device("cuda", {"LOGPROBE_MAX_BATCH": "64",
                                           "LOGPROBE_BATCH_TOKENS": "0"}) == BatchBudget(0, 64)
    with pytest.raises(ValueError, match="LOGPROBE_MAX_BATCH must be at least 1"):
        BatchBudget.for_device("cuda", {"LOGPROBE_MAX_BATCH": "0"})


# --- sweeps -----------------------------------------------------------------------------

def test_sweep_cross_product_in_sql(client, tiny_gpt2: str, tiny_llama: str) -> None:
    texts = ["alpha beta gamma", "one two three four", "the end"]
    sweep = client.sweep(texts, models=[tiny_gpt2, tiny_llama], top_logprobs=2)
    assert len(sweep) == 6
    progress = sweep.wait(timeout=120)
    assert progress["total"] == 6 and progress["succeeded"] == 6
    frame = client.sql("SELECT model, spec, status FROM jobs WHERE sweep_id = :s",
                       {"s": sweep.id})
    assert len(frame) == 6
    specs = [row.spec if isinstance(row.spec, dict) else json.loads(row.spec)
             for row in frame.itertuples()]
    pairs = {(model, spec["text"]) for model, spec in zip(frame["model"], specs, strict=True)}
    assert pairs == {(m, t) for m in (tiny_gpt2, tiny_llama) for t in texts}
    results = sweep.results()
    assert all(r is not None and r.loss > 0 for r in results)
    assert [r.model for r in results] == [tiny_gpt2] * 3 + [tiny_llama] * 3
    # Read back later, a sweep keeps its order: results and rows line up with the texts
    # (every job of one submission has the same created_at; sweep_index orders them).
    again = client.get_sweep(sweep.id)
    assert again.job_ids == sweep.job_ids
    assert again.progress()["finished"] == 6
    assert [r.loss for r in again.results()] == [r.loss for r in results]
    rows = again.frame()
    assert list(rows["sweep_index"]) == list(range(6))
    assert list(rows["id"]) == sweep.job_ids
    assert list(zip(rows["model"], rows["input"], strict=True)) == [
        (m, t) for m in (tiny_gpt2, tiny_llama) for t in texts]
    with pytest.raises(JobNotFound, match="no jobs with sweep id"):
        client.get_sweep("0" * 32).wait(timeout=1)


def test_generate_sweep_over_seeds(client, tiny_gpt2: str) -> None:
    sweep = client.sweep(["Once upon", "In the"], models=[tiny_gpt2], seeds=[1, 2, 3],
                         max_new_tokens=3)
    results = sweep.results(timeout=120)
    assert len(results) == 6
    assert [r.seed for r in results] == [1, 2, 3, 1, 2, 3]
    count = client.sql("SELECT COUNT(*) AS n FROM jobs WHERE sweep_id = :s AND kind = 'generate'",
                       {"s": sweep.id}).iloc[0]["n"]
    assert count == 6


def test_sweep_refuses_bad_input(tiny_gpt2: str) -> None:
    with pytest.raises(SpecError, match="seeds"):
        sweep_specs(["x y"], models=[tiny_gpt2], seeds=[1], kind="score")
    with pytest.raises(SpecError, match="models"):
        sweep_specs(["x y"], models=[])
    with pytest.raises(SpecError, match="top_logprobs"):
        sweep_specs(["x y"], models=[tiny_gpt2], top_logprobs=99)


def test_jobs_are_chunked_per_queue_and_model() -> None:
    rows = [{"id": str(i), "spec": {}, "queue": "q", "model": "a" if i % 3 else "b"}
            for i in range(130)]
    messages = list(chunk_messages(rows, 32))
    assert sum(len(items) for _, items in messages) == 130
    assert all(len(items) <= 32 for _, items in messages)
    assert len(messages) == 3 + 2  # 86 jobs of model a, 44 of model b
    ids = [item["id"] for _, items in messages for item in items]
    assert sorted(ids, key=int) == [str(i) for i in range(130)]


def test_messages_hold_jobs_of_similar_input_length() -> None:
    rng = random.Random(0)
    texts = ["word " * rng.randrange(1, 200) for _ in range(100)]
    rows = [{"id": f"t{i}", "spec": ScoreSpec(model="m", text=text), "queue": "q",
             "model": "m"} for i, text in enumerate(texts)]
    ids = [[3] * rng.randrange(1, 50) for _ in range(40)]  # JSON specs, as requeue sends
    rows += [{"id": f"i{i}", "spec": {"kind": "score", "model": "m", "token_ids": ids[i]},
              "queue": "q", "model": "m"} for i in range(40)]
    messages = [items for _, items in chunk_messages(rows, 16)]
    assert sum(map(len, messages)) == 140 and all(len(items) <= 16 for items in messages)
    sent = [item["spec"] for items in messages for item in items]
    # token ids first (fewest first), then texts (shortest first): each message is a
    # run of similar lengths, so its batches pad little
    assert [len(spec["token_ids"]) for spec in sent[:40]] == sorted(map(len, ids))
    assert [len(spec.text) for spec in sent[40:]] == sorted(map(len, texts))
    # all in one message: submission order kept
    one = [item["id"] for _, items in chunk_messages(rows, 200) for item in items]
    assert one == [row["id"] for row in rows]



def _score_rows(id_lengths: list[int], **spec: object) -> list[dict[str, object]]:
    return [{"id": str(i), "queue": "q", "model": "m",
             "spec": ScoreSpec(model="m", token_ids=[5] * n, **spec)}
            for i, n in enumerate(id_lengths)]


def test_default_messages_grow_for_short_score_jobs_only() -> None:
    def sizes(rows: list[dict[str, object]]) -> list[int]:
        return [len(items) for _, items in chunk_messages(rows)]

    # Short texts: up to MAX_MESSAGE_JOBS a message (2,000 paragraphs of ~44 tokens).
    assert sizes(_score_rows([44] * 2000)) == [512, 512, 512, 464]
    # 100 tokens: closed once MESSAGE_TOKENS are in (328 x 100 >= 32,768 > 327 x 100).
    assert sizes(_score_rows([100] * 700)) == [328, 328, 44]
    # Long texts never go below 64 a message; a last message of fewer than 16 joins the
    # one before (the two halved past 512).
    assert sizes(_score_rows([512] * 130)) == [64, 66]
    assert sizes(_score_rows([512] * 144)) == [64, 64, 16]
    assert sizes(_score_rows([44] * 1032)) == [512, 260, 260]
    # Characters count a token per CHARS_PER_TOKEN: 20-character texts are 5 tokens.
    texts = [{"id": str(i), "queue": "q", "model": "m",
              "spec": ScoreSpec(model="m", text="abcd " * 4)} for i in range(600)]
    assert sizes(texts) == [512, 88]
    # Not a batched forward pass: 64 a message however short.
    assert sizes(_score_rows([10] * 130, return_logits=True)) == [64, 64, 2]
    embeddings = [{"id": str(i), "queue": "q", "model": "m",
                   "spec": {"kind": "score", "model": "m", "text": "a b",
                            "embedding": {"kind": "noise", "text": "a b", "scale": 0.1}}}
                  for i in range(130)]
    assert sizes(embeddings) == [64, 64, 2]
    generations = [{"id": str(i), "queue": "q", "model": "m",
                    "spec": GenerateSpec(model="m", prompt="a b", max_new_tokens=2)}
                   for i in range(130)]
    assert sizes(generations) == [64, 64, 2]
    openai = [{"id": str(i), "queue": "q", "model": "m",
               "spec": {"kind": "score", "backend": "openai", "model": "m", "text": "a b"}}
              for i in range(130)]
    assert sizes(openai) == [64, 64, 2]
    # An explicit chunk size is exact, for every kind.
    assert [len(items) for _, items in chunk_messages(_score_rows([44] * 300), 64)] == [
        64, 64, 64, 64, 44]


def test_default_messages_are_sorted_and_lose_no_job() -> None:
    rng = random.Random(1)
    lengths = [rng.randrange(2, 400) for _ in range(900)]
    rows = _score_rows(lengths)
    messages = [items for _, items in chunk_messages(rows)]
    sent = [item["id"] for items in messages for item in items]
    assert sorted(sent, key=int) == [row["id"] for row in rows]
    assert [lengths[int(i)] for i in sent] == sorted(lengths)
    assert all(16 <= len(items) <= 512 for items in messages)
    for items in messages[:-1]:
        tokens = sum(lengths[int(item["id"])] for item in items)
        assert len(items) == 512 or tokens >= 32_768
        assert len(items) == 64 or tokens - lengths[int(items[-1]["id"])] < 32_768


# --- result reuse -----------------------------------------------------------------------

def test_identical_score_is_reused_not_recomputed(client, tiny_gpt2: str) -> None:
    text = f"reuse me {uuid.uuid4().hex[:6]}"
    first = client.score(text, model=tiny_gpt2, top_logprobs=2)
    original = first.result(timeout=120)
    # Mark the stored result: a recomputation could not produce this loss.
    with client.session() as session, session.begin():
        session.get(Job, first.id).loss = 123.0

    second = client.score(text, model=tiny_gpt2, top_logprobs=2)
    reused = second.result(timeout=120)
    assert second.info()["reused_from"] == first.id
    assert reused.loss == 123.0
    assert reused.tokens == original.tokens
    # hf jobs have no request parameters: SQL NULL in the copy too, not JSON null.
    assert client.sql("SELECT COUNT(*) AS n FROM jobs WHERE id IN (:a, :b) AND "
                      "request_params IS NULL", {"a": first.id, "b": second.id}
                      ).iloc[0]["n"] == 2

    fresh = client.score(text, model=tiny_gpt2, top_logprobs=2, reuse=False)
    recomputed = fresh.result(timeout=120)
    assert fresh.info()["reused_from"] is None
    assert recomputed.loss == pytest.approx(original.loss, abs=TOL)


def test_reuse_defaults_for_sampling(client, tiny_gpt2: str) -> None:
    prompt = f"Sample {uuid.uuid4().hex[:6]}"
    opts = dict(model=tiny_gpt2, max_new_tokens=4, do_sample=True)
    seeded = [client.generate(prompt, seed=7, **opts) for _ in range(2)]
    for job in seeded:
        job.result(timeout=120)
    assert seeded[1].info()["reused_from"] == seeded[0].id
    unseeded = [client.generate(prompt, **opts) for _ in range(2)]
    for job in unseeded:
        job.result(timeout=120)
    assert [job.info()["reused_from"] for job in unseeded] == [None, None]
    # The same probe twice in one message: computed once.
    twins = client.score_many([prompt, prompt], model=tiny_gpt2)
    results = [job.result(timeout=120) for job in twins]
    assert twins[1].info()["reused_from"] == twins[0].id
    assert results[0].tokens == results[1].tokens


# --- bulk writes ------------------------------------------------------------------------

def _refuse_sequences_containing(client, marker: str) -> None:
    """A trigger that refuses (IntegrityError, not a connection error) the sequence row
    of any text containing ``marker``: a job result the database will not store."""
    with client.engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql(
                f"CREATE TRIGGER refuse_{marker} BEFORE INSERT ON sequences "
                f"WHEN instr(NEW.text, '{marker}') > 0 "
                f"BEGIN SELECT RAISE(ABORT, 'refused row {marker}'); END")
        else:
            connection.exec_driver_sql(
                f"CREATE FUNCTION refuse_{marker}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF strpos(NEW.text, '{marker}') > 0 THEN RAISE EXCEPTION "
                f"'refused row {marker}' USING ERRCODE = 'check_violation'; END IF; "
                "RETURN NEW; END $$")
            connection.exec_driver_sql(
                f"CREATE TRIGGER refuse_{marker} BEFORE INSERT ON sequences "
                f"FOR EACH ROW EXECUTE FUNCTION refuse_{marker}()")


def _row_counts(client, job_id: str) -> tuple[int, int]:
    frame = client.sql("SELECT (SELECT COUNT(*) FROM sequences WHERE job_id = :id) AS s, "
                       "(SELECT COUNT(*) FROM tokens WHERE job_id = :id) AS t", {"id": job_id})
    return int(frame.iloc[0]["s"]), int(frame.iloc[0]["t"])


def _reference_loss(path: str, text: str) -> float:
    model, tok = reference(path)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_a_result_the_database_refuses_fails_that_job_and_the_rest_are_stored(
        client, tiny_gpt2: str) -> None:
    marker = f"refuse{uuid.uuid4().hex[:8]}"
    _refuse_sequences_containing(client, marker)
    texts = [f"Before it {marker[-4:]}", f"The {marker} text", f"After it {marker[-4:]}"]
    jobs = client.score_many(texts, model=tiny_gpt2)  # one message, one bulk store
    statuses = [job.wait(timeout=60) for job in jobs]
    assert statuses == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]
    refused = jobs[1].info()
    # SQLAlchemy's class on both (PostgreSQL's COPY errors are wrapped as its own are).
    assert refused["error_type"] == "IntegrityError"
    assert refused["error"].startswith("the job's result could not be stored: ")
    assert f"refused row {marker}" in refused["error"]
    assert _row_counts(client, jobs[1].id) == (0, 0)
    _, tok = reference(tiny_gpt2)
    for job, text in ((jobs[0], texts[0]), (jobs[2], texts[2])):
        n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        assert _row_counts(client, job.id) == (1, n_tokens)
        assert job.info()["loss"] == pytest.approx(_reference_loss(tiny_gpt2, text), abs=TOL)


def test_nan_logprobs_fail_the_job_with_what_to_change(client, overflow_gpt2: str) -> None:
    from api_client.specs import make_spec

    text = f"hello world {uuid.uuid4().hex[:6]}"
    options = {"model": overflow_gpt2, "top_logprobs": 2}
    half, full, generated = client.submit_many([
        make_spec("score", text=text, dtype="float16", **options),
        make_spec("score", text=text, dtype="float32", **options),
        make_spec("generate", prompt=text, dtype="float16", max_new_tokens=3, **options),
    ])
    for job in (half, generated):
        assert job.wait(timeout=60) is JobStatus.FAILED
        info = job.info()
        assert info["error_type"] == "NaNLogprobs" and info["loss"] is None
        assert "float16" in info["error"] and "bfloat16 or float32" in info["error"]
        assert _row_counts(client, job.id) == (0, 0)
    assert full.wait(timeout=60) is JobStatus.SUCCEEDED
    # float32 holds these huge logits: the loss is Hugging Face's, not NaN.
    assert full.info()["loss"] == pytest.approx(_reference_loss(overflow_gpt2, text), rel=1e-5)


def test_only_nan_counts_as_a_broken_output() -> None:
    from worker.output_checks import nan_logprobs_error

    minus_inf = _output(4, 2, salt=0)
    token = minus_inf.sequences[0].tokens[2]
    tokens = list(minus_inf.sequences[0].tokens)
    tokens[2] = TokenLogprob(position=2, token_id=token.token_id, token=token.token,
                             logprob=float("-inf"), top_logprobs=token.top_logprobs)
    minus_inf.sequences[0] = SequenceResult(index=0, text="x", tokens=tuple(tokens))
    assert nan_logprobs_error(minus_inf) is None  # impossible tokens are legitimate
    broken = _output(4, 2, salt=0)
    token = broken.sequences[0].tokens[3]
    tokens = list(broken.sequences[0].tokens)
    tokens[3] = TokenLogprob(position=3, token_id=token.token_id, token=token.token,
                             logprob=-1.0, top_logprobs=(
                                 token.top_logprobs[0],
                                 Alternative(token_id=9, token="x", logprob=float("nan"))))
    broken.sequences[0] = SequenceResult(index=0, text="x", tokens=tuple(tokens))
    error = nan_logprobs_error(broken)
    assert error is not None and "position 3" in str(error)
    assert "dtype=float32" in str(error)

def _output(n_tokens: int, top_k: int, salt: int) -> ProbeOutput:
    tokens = tuple(
        TokenLogprob(position=i, token_id=salt + i, token=f"tok'\t\\{i}\n\x00",
                     logprob=None if i == 0 else -0.125 * i - salt, top_logprobs=tuple(
                         Alternative(token_id=r, token=f"alt{r}", logprob=-1.5 * r)
                         for r in range(top_k)))
        for i in range(n_tokens)
    )
    return ProbeOutput(sequences=[SequenceResult(index=0, text=f"text {salt}", tokens=tokens)],
                       loss=1.0 + salt, sum_logprob=-2.0, num_scored_tokens=n_tokens - 1,
                       provenance={"batch_size": 3, "dtype": "float32"})


def test_bulk_store_writes_exactly_the_rows(database_url: str) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    ids = add_jobs(sessions, 3)
    with sessions() as session:
        assert claim_many(session, ids, "w") == ids
    outputs = [(ids[0], _output(5, 2, 0)), (ids[1], _output(7, 0, 1)),
               (ids[2], _output(3, 3, 2))]
    # Columns of every type the job row has: set on one job (its own UPDATE), and
    # NULL on every job of the other UPDATE (no value there to tell their type).
    nulls = {"spec_hash": None, "request_params": None, "seed": None, "deterministic": None,
             "prompt_tokens": None}
    extra = {ids[0]: nulls, ids[2]: nulls,
             ids[1]: {"spec_hash": "h" * 64, "request_params": {"seed": 5, "n": [1, 2]},
                      "seed": 2**40 + 1, "deterministic": True, "prompt_tokens": 7,
                      "system_fingerprint": "fp_1"}}
    with sessions() as session:
        assert store_outputs(session, outputs, extra) == ids
    with sessions() as session:  # idempotent: finished jobs are not written again
        assert store_outputs(session, outputs) == []
        assert claim_many(session, ids, "w") == []

    with sessions() as session:
        got = session.execute(select(Token.job_id, Token.position, Token.token_id, Token.token,
                                     Token.logprob, Token.generated)
                              .order_by(Token.job_id, Token.position)).all()
        # PostgreSQL text cannot hold NUL: stored as U+FFFD everywhere.
        want = sorted((job_id, t.position, t.token_id, t.token.replace("\x00", "\ufffd"),
                       t.logprob, False)
                      for job_id, out in outputs for t in out.sequences[0].tokens)
        assert [tuple(r) for r in got] == want
        alts = session.execute(select(TopLogprob.job_id, TopLogprob.position, TopLogprob.rank,
                                      TopLogprob.token, TopLogprob.logprob)
                               .order_by(TopLogprob.job_id, TopLogprob.position,
                                         TopLogprob.rank)).all()
        assert [tuple(r) for r in alts] == sorted(
            (job_id, t.position, r, a.token, a.logprob) for job_id, out in outputs
            for t in out.sequences[0].tokens for r, a in enumerate(t.top_logprobs))
        assert session.scalar(select(SequenceRow.num_tokens).where(
            SequenceRow.job_id == ids[1])) == 7
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        assert [jobs[i].status for i in ids] == [JobStatus.SUCCEEDED] * 3
        assert [jobs[i].loss for i in ids] == [1.0, 2.0, 3.0]
        assert [jobs[i].num_scored_tokens for i in ids] == [4, 6, 2]
        assert {(jobs[i].batch_size, jobs[i].dtype, jobs[i].sum_logprob, jobs[i].partial,
                 jobs[i].error) for i in ids} == {(3, "float32", -2.0, False, None)}
        assert all(jobs[i].finished_at >= jobs[i].started_at for i in ids)
        assert len({jobs[i].output_hash for i in ids}) == 3
        assert [(jobs[i].spec_hash, jobs[i].request_params, jobs[i].seed,
                 jobs[i].deterministic, jobs[i].prompt_tokens, jobs[i].system_fingerprint)
                for i in ids] == [(None,) * 6, tuple(extra[ids[1]].values()), (None,) * 6]
    engine.dispose()


def test_strings_a_server_controls_are_stored_alike_on_both_databases(database_url: str
                                                                      ) -> None:
    """An OpenAI-compatible server decides the ``system_fingerprint``, the
    ``finish_reason`` and token texts; SQLite stores any string, PostgreSQL refuses one
    longer than its column, a NUL or (like every database) a lone surrogate. Each is
    stored the same on both: cut to the column, U+FFFD for what cannot be stored."""
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    ids = add_jobs(sessions, 2)
    with sessions() as session:
        assert claim_many(session, ids, "w") == ids
    odd = TokenLogprob(position=1, token_id=None, token="a\ud83d", logprob=-0.5,
                       generated=True)
    output = ProbeOutput(
        sequences=[SequenceResult(index=0, text="x\ud83d", finish_reason="s" * 40 + "\x00",
                                  tokens=(odd,))],
        provenance={"system_fingerprint": "fp_" + "9" * 200 + "\x00", "dtype": "float32"})
    with sessions() as session:
        assert store_outputs(session, [(ids[0], output)]) == [ids[0]]
        assert store_output(session, ids[1], output) is True
    with sessions() as session:
        jobs = session.execute(select(Job.status, Job.system_fingerprint)
                               .where(Job.id.in_(ids))).all()
        assert [tuple(j) for j in jobs] == [(JobStatus.SUCCEEDED, "fp_" + "9" * 125)] * 2
        rows = session.execute(select(SequenceRow.text, SequenceRow.finish_reason)
                               .where(SequenceRow.job_id.in_(ids))).all()
        assert [tuple(r) for r in rows] == [("x\ufffd", "s" * 32)] * 2
        assert session.scalars(select(Token.token).where(Token.job_id.in_(ids))).all() == \
            ["a\ufffd"] * 2
    engine.dispose()


def test_claim_many_claims_runnable_jobs_and_gives_up_on_crash_loops(database_url: str
                                                                     ) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    queued, rerun, crashed, done = (uuid.uuid4().hex for _ in range(4))
    with sessions() as session, session.begin():
        session.execute(insert(Job), [
            {"id": i, "kind": "score", "backend": "hf", "model": "m", "status": status,
             "attempts": attempts, "spec": {}, "queue": "q"}
            for i, status, attempts in ((queued, JobStatus.QUEUED, 0),
                                        (rerun, JobStatus.RUNNING, 1),
                                        (crashed, JobStatus.RUNNING, 2),
                                        (done, JobStatus.SUCCEEDED, 1))])
    with sessions() as session:
        assert claim_many(session, [done, crashed, rerun, queued], "w9",
                          max_attempts=2) == [rerun, queued]
    with sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job))}
    assert [(jobs[i].status, jobs[i].attempts, jobs[i].worker) for i in (queued, rerun)] == [
        (JobStatus.RUNNING, 1, "w9"), (JobStatus.RUNNING, 2, "w9")]
    assert jobs[crashed].status == JobStatus.FAILED and jobs[crashed].attempts == 2
    assert jobs[crashed].error_type == "WorkerLost" and "stopped 2 times" in jobs[crashed].error
    assert (jobs[done].status, jobs[done].attempts, jobs[done].worker) == (
        JobStatus.SUCCEEDED, 1, None)
    engine.dispose()


@pytest.mark.postgres
def test_claims_plan_for_the_jobs_table_as_it_is_now(tmp_path: Path) -> None:
    """A worker's claims find their jobs by primary key however much the table grew
    since its connection's statements were first planned (PostgreSQL with autovacuum
    off or behind: no fresh statistics). With cached generic plans, the plan made on a
    small table (a scan of the table) stayed, and each claim read every job row:
    PostgreSQL's CPU per tiny probe grew 0.57 -> 1.17 ms over three 3,000-probe sweeps."""
    database = make_database("postgres", tmp_path)
    url = next(database)
    engine = make_engine(url, pool_size=1, max_overflow=0)  # one connection: plans cached
    sessions = make_sessionmaker(engine)
    observer = make_engine(url)

    def scans() -> tuple[int, int]:
        with observer.connect() as connection:
            return tuple(connection.execute(sql_text(
                "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'jobs'"
            )).one())

    def flushed_scans(previous: tuple[int, int]) -> tuple[int, int]:
        """The counters once the claiming connection's statistics reached the server."""
        with sessions() as session:
            session.execute(sql_text("SELECT pg_stat_force_next_flush()"))
            session.commit()
        deadline = time.monotonic() + 10
        while (now := scans()) == previous and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    try:
        small = add_jobs(sessions, 8 * 12)
        for start in range(0, len(small), 8):  # psycopg prepares after 5 executions;
            with sessions() as session:  # PostgreSQL may go generic after 5 more
                assert claim_many(session, small[start:start + 8], "w") == small[
                    start:start + 8]
        add_jobs(sessions, 5_000)  # no ANALYZE: the statistics still describe ~100 rows
        before = flushed_scans(scans())
        batch = add_jobs(sessions, 8)
        with sessions() as session:
            assert claim_many(session, batch, "w") == batch
        after = flushed_scans(before)
        assert after[0] == before[0], "a claim scanned the whole jobs table"
        assert after[1] > before[1]  # its statements went through an index
    finally:
        engine.dispose()
        observer.dispose()
        next(database, None)  # drops the database


@pytest.mark.parametrize("value_limit", [None, 64])
def test_sqlite_stores_a_batch_in_few_statements(tmp_path: Path,
                                                 value_limit: int | None) -> None:
    """A batch's token rows and job updates go to SQLite in a few statements of many
    rows (sqlite3 gives up the GIL for every statement, and waits to get it back while
    the thread queuing the next batch runs Python), not one per row or job; and in
    smaller ones where SQLite allows fewer bound values (64 here), the same rows."""
    url = next(make_database("sqlite", tmp_path))
    plain = make_engine(url)
    ids = add_jobs(make_sessionmaker(plain), 64)
    with make_sessionmaker(plain)() as session:
        assert claim_many(session, ids, "w") == ids
    plain.dispose()
    engine = make_engine(url)  # its connections: traced, and the limit set
    statements: list[str] = []

    @event.listens_for(engine, "connect")
    def trace(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.set_trace_callback(statements.append)
        if value_limit is not None:
            dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, value_limit)

    sessions = make_sessionmaker(engine)
    outputs = [(job_id, _output(45, 0, n)) for n, job_id in enumerate(ids)]
    with sessions() as session:
        assert store_outputs(session, outputs, {job_id: {"seed": n}
                                                for n, job_id in enumerate(ids)}) == ids
    inserts = [s for s in statements if s.startswith("INSERT INTO tokens")]
    updates = [s for s in statements if s.startswith("UPDATE jobs")]
    if value_limit is None:  # 2,880 rows: 1024 + 1024 + 512 + 256 + 64; 64 jobs: one
        assert (len(inserts), len(updates)) == (5, 1)
    else:  # 64 values: 8 token rows (7 columns) a statement, 4 jobs (13 columns)
        assert (len(inserts), len(updates)) == (360, 16)
    with sessions() as session:
        got = session.execute(select(Token.job_id, Token.position, Token.token_id,
                                     Token.logprob).order_by(Token.job_id, Token.position)
                              ).all()
        assert [tuple(r) for r in got] == sorted(
            (job_id, t.position, t.token_id, t.logprob)
            for job_id, out in outputs for t in out.sequences[0].tokens)
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        assert [(jobs[i].status, jobs[i].loss, jobs[i].seed, jobs[i].num_scored_tokens)
                for i in ids] == [(JobStatus.SUCCEEDED, 1.0 + n, n, 44)
                                  for n in range(64)]
    engine.dispose()


def _stored_tokens(session, job_id: str) -> list[tuple]:
    return [tuple(r) for r in session.execute(
        select(Token.position, Token.token_id, Token.token, Token.logprob)
        .where(Token.job_id == job_id).order_by(Token.position)).all()]


def test_one_job_store_and_retries_write_the_same_rows(database_url: str) -> None:
    """The one-job path (failures, stopped jobs, logits) writes the rows the batch path
    writes, NUL included; a retried job's leftover rows are replaced, never doubled."""
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    single, batched, retried = add_jobs(sessions, 3)
    with sessions() as session:
        assert claim_many(session, [single, batched, retried], "w") == [single, batched, retried]
    output = _output(6, 2, 4)
    with sessions() as session:
        assert store_output(session, single, output)
        assert store_outputs(session, [(batched, output)]) == [batched]
    # The retried job: its first attempt left rows (as an interrupted writer might), and a
    # second worker claims and stores it.
    with sessions() as session, session.begin():
        session.execute(insert(Token), [
            {"job_id": retried, "sequence_index": 0, "position": p, "token_id": 1,
             "token": "stale", "logprob": -9.0, "generated": False} for p in range(9)])
    with sessions() as session:
        assert claim_many(session, [retried], "w2") == [retried]
        assert store_outputs(session, [(retried, output)]) == [retried]
    with sessions() as session:
        want = [(t.position, t.token_id, t.token.replace("\x00", "\ufffd"), t.logprob)
                for t in output.sequences[0].tokens]
        assert _stored_tokens(session, single) == want
        assert _stored_tokens(session, batched) == want
        assert _stored_tokens(session, retried) == want
        assert session.get(Job, retried).attempts == 2
    engine.dispose()
