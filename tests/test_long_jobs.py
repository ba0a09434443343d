"""Long jobs on a real worker: progress, cancellation, time limits, out-of-memory, routing.

One worker per database (SQLite, PostgreSQL) serves the module. It runs under
``prlimit --data`` (3 GB), so a probe too big for it really runs out of memory,
and has an ``HF_TOKEN`` in its environment that must never reach SQL or its log.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import cache
from itertools import pairwise
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_client import Client, JobStatus, SpecError
from api_client.constants import ENV_MAX_LOGITS_BYTES, model_queue
from tests.faults import LimitedWorkerProcess, wait_until
from tests.helpers import logprobe_command, subprocess_env

PROMPT = "Once upon a time"
SECRET = "hf_testsecret_doNotStore_4242"
MEMORY_LIMIT = 3_000_000_000  # bytes of data segment for the worker processes
MAX_LOGITS_BYTES = 8_000_000_000  # above MEMORY_LIMIT: the out-of-memory probe asks for more


@cache
def reference(path: str) -> tuple[object, object]:
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@cache
def reference_greedy_logprobs(path: str, prompt: str, n: int) -> tuple[list[int], list[float]]:
    """Hugging Face's own greedy generation of ``n`` tokens and their transition scores."""
    model, tok = reference(path)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the worker's OMP_NUM_THREADS below
    try:
        out = _greedy(model, tok, ids, n)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        scores = model.compute_transition_scores(out.sequences, out.scores,
                                                 normalize_logits=True)
    return out.sequences[0, ids.shape[1]:].tolist(), scores[0].tolist()


def _greedy(model: Any, tok: Any, ids: torch.Tensor, n: int) -> Any:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=tok.eos_token_id)


@pytest.fixture(scope="module")
def lj_worker(module_database_url: str, redis_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedWorkerProcess]:
    queue = model_queue(f"test-long-{uuid.uuid4().hex[:8]}")
    worker = LimitedWorkerProcess(
        backend="hf", queue=queue, redis_url=redis_url, database_url=module_database_url,
        log_dir=tmp_path_factory.mktemp("worker-logs"),
        # One intra-op thread: on a small, shared CI machine, OpenMP threads spinning
        # against other processes make a 0.1 s tensor op take seconds at random.
        env={"HF_TOKEN": SECRET, "OMP_NUM_THREADS": "1",
             ENV_MAX_LOGITS_BYTES: str(MAX_LOGITS_BYTES)},
        prefix=["prlimit", f"--data={MEMORY_LIMIT}:"],
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def lj_client(lj_worker: LimitedWorkerProcess) -> Iterator[Client]:
    with lj_worker.client() as client:
        yield client


def _cli(client: Client, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        logprobe_command("--redis-url", client.settings.redis_url or "",
                         "--database-url", client.settings.database_url or "", *args),
        capture_output=True, text=True, check=check, env=subprocess_env(), timeout=60,
    )


def test_progress_and_cancel_of_a_10000_token_generation(lj_client: Client,
                                                         long_gpt2: str) -> None:
    job = lj_client.generate(PROMPT, model=long_gpt2, max_new_tokens=10_000)
    behind = lj_client.generate(PROMPT, model=long_gpt2, max_new_tokens=5)

    first = wait_until(lambda: (p := job.progress()).done is not None and p.done >= 50 and p,
                       120, "the generation to report 50 tokens")
    assert first.status is JobStatus.RUNNING and first.total == 10_000
    later = wait_until(lambda: (p := job.progress()).done > first.done + 20 and p, 30,
                       "more progress")
    assert later.rate is not None and later.rate > 0
    assert later.eta_seconds is not None and later.eta_seconds > 0
    assert "/10000 tokens" in _cli(lj_client, "status", job.id).stdout

    # A queued job is cancelled before it ever starts (here with `logprobe cancel`).
    assert behind.status() is JobStatus.QUEUED
    assert _cli(lj_client, "cancel", behind.id).stdout.strip() == f"{behind.id} cancelled"
    assert behind.status() is JobStatus.CANCELLED

    # The running one stops at its next decoding step; what it computed is kept.
    done_before = job.progress().done
    asked = datetime.now(timezone.utc)
    assert job.cancel() is JobStatus.RUNNING
    assert job.wait(timeout=30) is JobStatus.CANCELLED
    info = job.info()
    latency = (info["finished_at"] - asked.replace(
        tzinfo=info["finished_at"].tzinfo)).total_seconds()
    print(f"cancel -> job stored as cancelled: {latency * 1000:.0f} ms")
    assert latency < 1.0
    assert info["partial"] is True and info["error_type"] == "Cancelled"

    result = job.result(timeout=5, allow_partial=True)
    assert result.partial and result.sequences[0].finish_reason == "cancelled"
    generated = result.tokens
    assert done_before <= len(generated) < 10_000
    ref_ids, ref_logprobs = reference_greedy_logprobs(long_gpt2, PROMPT, len(generated))
    assert [t.token_id for t in generated] == ref_ids
    assert [t.logprob for t in generated] == pytest.approx(ref_logprobs, abs=1e-4)

    # The cancelled-while-queued job was skipped by the worker: never claimed.
    wait_until(lambda: lj_client.redis.llen(lj_client.job(behind.id).info()["queue"]) == 0,
               30, "the worker to take the cancelled job's message")
    time.sleep(0.5)
    assert behind.info()["attempts"] == 0 and behind.status() is JobStatus.CANCELLED
    waited = _cli(lj_client, "wait", job.id, "--no-progress", check=False)
    assert waited.returncode == 1
    assert waited.stdout.startswith(f"{job.id} cancelled: cancelled by request after ")


def test_result_with_progress_bar(lj_client: Client, long_gpt2: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    job = lj_client.generate(PROMPT, model=long_gpt2, max_new_tokens=120)
    result = job.result(timeout=120, progress=True)
    assert len(result.tokens) == 120 and not result.partial
    err = capsys.readouterr().err
    assert f"job {job.id[:8]}" in err and "120/120" in err and "succeeded" in err
    final = job.progress()
    assert (final.done, final.total, final.fraction) == (120, 120, 1.0)


def test_time_limit_stops_the_job_with_a_clear_error(lj_client: Client, long_gpt2: str) -> None:
    with pytest.raises(SpecError, match="time_limit"):
        lj_client.generate(PROMPT, model=long_gpt2, time_limit=10**9)

    job = lj_client.generate(PROMPT, model=long_gpt2, max_new_tokens=10_000, time_limit=3)
    assert job.wait(timeout=60) is JobStatus.FAILED
    info = job.info()
    assert info["error_type"] == "TimeLimitExceeded"
    assert "time limit of 3 s" in info["error"] and "of 10000 tokens" in info["error"]
    assert info["partial"] is True and info["time_limit"] == 3
    partial = job.result(timeout=1, allow_partial=True)
    assert 0 < len(partial.tokens) < 10_000
    assert (info["finished_at"] - info["started_at"]).total_seconds() < 3 + 3


def test_each_job_of_a_message_has_its_own_time_limit(lj_client: Client,
                                                     long_gpt2: str) -> None:
    """Eight generations of ~0.6 s each in one message, 3 s each: all fit their own
    limit, though together they take longer than one limit."""
    from api_client.specs import make_spec

    tag = uuid.uuid4().hex[:6]
    specs = [make_spec("generate", prompt=f"Story {i} {tag}", model=long_gpt2,
                       max_new_tokens=400) for i in range(8)]
    jobs = lj_client.submit_many(specs, time_limit=3)
    assert [job.wait(timeout=120) for job in jobs] == [JobStatus.SUCCEEDED] * 8
    assert all(len(job.result(timeout=1).tokens) == 400 for job in jobs)
    # started_at is when each job's own generation began, once the one before ended.
    starts = [job.info()["started_at"] for job in jobs]
    finished = jobs[-1].info()["finished_at"]
    took = [(later - earlier).total_seconds() for earlier, later in pairwise(starts)]
    assert all(0 < seconds < 3 for seconds in took), took
    assert (finished - starts[0]).total_seconds() > 3  # one clock for all would have run out


def _twins(client: Client, model: str, n_tokens: int) -> list[Any]:
    """Two identical greedy generations in one message, once both run."""
    from api_client.specs import make_spec

    spec = make_spec("generate", prompt=f"Twins {uuid.uuid4().hex[:6]}", model=model,
                     max_new_tokens=n_tokens)
    twins = client.submit_many([spec, spec])
    wait_until(lambda: (p := twins[0].progress()).done is not None and p.done >= 20, 120,
               "the first twin to generate 20 tokens")
    return twins


def test_a_twin_runs_itself_when_the_first_is_cancelled(lj_client: Client,
                                                        long_gpt2: str) -> None:
    first, twin = _twins(lj_client, long_gpt2, 2000)
    first.cancel()
    assert first.wait(timeout=60) is JobStatus.CANCELLED
    assert twin.wait(timeout=120) is JobStatus.SUCCEEDED
    info = twin.info()
    assert info["error"] is None and info["reused_from"] is None and not info["partial"]
    partial = [t.token_id for t in first.result(timeout=1, allow_partial=True).tokens]
    full = [t.token_id for t in twin.result(timeout=1).tokens]
    assert len(full) == 2000 and 0 < len(partial) < 2000
    assert full[:len(partial)] == partial  # greedy: the same tokens, carried to the end


def test_a_waiting_twin_can_be_cancelled(lj_client: Client, long_gpt2: str) -> None:
    first, twin = _twins(lj_client, long_gpt2, 1000)
    assert twin.cancel() is JobStatus.RUNNING
    assert twin.wait(timeout=60) is JobStatus.CANCELLED
    assert first.wait(timeout=60) is JobStatus.SUCCEEDED
    assert len(first.result(timeout=1).tokens) == 1000
    info = twin.info()
    assert info["error_type"] == "Cancelled" and info["reused_from"] is None
    assert lj_client.sql("SELECT COUNT(*) AS n FROM tokens WHERE job_id = :id",
                         {"id": twin.id}).iloc[0]["n"] == 0


def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(
        lj_client: Client, long_gpt2: str, lj_worker: LimitedWorkerProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    long_ids = [(i * 7919) % 50000 for i in range(16000)]
    # Scoring never holds [tokens, vocabulary] logits (the output layer runs a chunk of
    # rows at a time): 16,000 tokens fit in the worker's 3 GB.
    fits = lj_client.score(token_ids=long_ids, model=long_gpt2)
    assert fits.wait(timeout=120) is JobStatus.SUCCEEDED, fits.info()["error"]
    assert fits.info()["num_scored_tokens"] == 15_999
    # Asking for all the logits does hold them: 16,000 x 50,257 float32 = 3.2 GB.
    monkeypatch.setenv(ENV_MAX_LOGITS_BYTES, str(MAX_LOGITS_BYTES))
    with lj_worker.client() as client:
        huge = client.score(token_ids=long_ids, model=long_gpt2, return_logits=True)
        assert huge.wait(timeout=120) is JobStatus.FAILED
    info = huge.info()
    assert info["error_type"] == "OutOfMemory", info["error"]
    assert info["error"].startswith("out of memory on this machine")
    assert "Lower the input length" in info["error"]

    small = lj_client.score("The worker is still here", model=long_gpt2)
    model, tok = reference(long_gpt2)
    ids = torch.tensor([tok("The worker is still here")["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert small.result(timeout=120).loss == pytest.approx(loss, abs=1e-5)
    assert lj_worker.alive()
    assert "WorkerLostError" not in lj_worker.log_text()


def test_device_map_auto_and_recorded_device(lj_client: Client, tiny_gpt2: str) -> None:
    with pytest.raises(SpecError, match="device_map"):
        lj_client.score("x y", model=tiny_gpt2, device="cpu", device_map="auto")
    plain = lj_client.score("Finn writes code", model=tiny_gpt2)
    mapped = lj_client.score("Finn writes code", model=tiny_gpt2, device_map="auto")
    assert mapped.result(timeout=120).loss == pytest.approx(plain.result(timeout=120).loss,
                                                            abs=1e-6)
    assert plain.info()["device"] == "cpu"
    assert mapped.info()["device"] == "auto:cpu"


def test_hf_token_is_never_stored_or_logged(lj_client: Client,
                                            lj_worker: LimitedWorkerProcess) -> None:
    job = lj_client.score("hello there", model="meta-llama/Llama-2-7b-hf")
    assert job.wait(timeout=120) is JobStatus.FAILED
    info = job.info()
    assert info["error_type"] == "ModelLoadError"
    frame = lj_client.sql("SELECT * FROM jobs")
    assert SECRET not in frame.to_csv()
    assert SECRET not in lj_worker.log_text()


def test_celerys_backstop_allows_for_loading_the_model(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """A job's own limit counts from its start; Celery's limits count from the message's,
    model loading included: they allow LOGPROBE_MODEL_LOAD_SECONDS more (600 s), less
    where the hard limit would reach the visibility timeout."""
    from api_client.broker import backstop_limits, max_job_time_limit
    from api_client.errors import ConfigError

    monkeypatch.delenv("LOGPROBE_MODEL_LOAD_SECONDS", raising=False)
    monkeypatch.delenv("LOGPROBE_VISIBILITY_TIMEOUT", raising=False)
    assert backstop_limits(60) == (60 + 6 + 600, 60 + 12 + 600)
    longest = max_job_time_limit()
    soft, hard = backstop_limits(longest)
    assert hard == 7 * 3600 - 1 and soft < hard  # capped below the visibility timeout
    monkeypatch.setenv("LOGPROBE_MODEL_LOAD_SECONDS", "0")
    assert backstop_limits(1) == (1 + 3, 1 + 6)
    monkeypatch.setenv("LOGPROBE_MODEL_LOAD_SECONDS", "-5")
    with pytest.raises(ConfigError, match="LOGPROBE_MODEL_LOAD_SECONDS"):
        backstop_limits(1)
