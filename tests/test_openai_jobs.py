"""OpenAI jobs as jobs: cancellation, time limits, requests in flight, call timeouts.

A real ``logprobe worker --backend openai`` process (SQLite and PostgreSQL) runs
against the fake server of ``tests/openai_server.py`` through the real ``openai``
client; the tests assert on job rows and on the requests the server saw. Latency
and limits are scaled down to fractions of a second so the module stays short.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib

from api_client import Client, JobStatus
from api_client.constants import REDIS_PREFIX
from tests.helpers import WorkerProcess, max_in_rolling_window
from tests.openai_server import FakeOpenAI, Fault, RecordedRequest

API_KEY = "sk-test-" + uuid.uuid4().hex
LIMIT_NAME = uuid.uuid4().hex
CONCURRENCY = 4  # LOGPROBE_OPENAI_CONCURRENCY: requests in flight per message
RPM, WINDOW_S = 6, 1.0  # a shared limit of 6 requests per 1 s window (+0.25 s pad)
TIMEOUT_S, TIMEOUT_PER_TOKEN_S = 1.0, 0.02


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _calm_server(server: FakeOpenAI, redis_url: str) -> Iterator[None]:
    """Each test starts with a fast, complete server and no shared 429 pause."""
    yield
    server.release()
    server.latency_s = server.latency_per_token_s = 0.0
    server.text_offsets = True
    server.clear()
    connection = redis_lib.Redis.from_url(redis_url)
    connection.delete(f"{REDIS_PREFIX}:openai:ratelimit:{{{LIMIT_NAME}}}:pause_until")
    connection.close()


@pytest.fixture(scope="module")
def worker(module_database_url: str, redis_url: str, server: FakeOpenAI,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        backend="openai", queue=f"logprobe.openai.test-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url, database_url=module_database_url,
        log_dir=tmp_path_factory.mktemp("openai-jobs-logs"), extra_args=["-c", "2"],
        env={"OPENAI_API_KEY": API_KEY, "LOGPROBE_OPENAI_BASE_URL": server.url,
             "LOGPROBE_OPENAI_LIMIT_NAME": LIMIT_NAME, "LOGPROBE_OPENAI_RPM": str(RPM),
             "LOGPROBE_OPENAI_WINDOW_S": str(WINDOW_S),
             "LOGPROBE_OPENAI_CONCURRENCY": str(CONCURRENCY),
             "LOGPROBE_OPENAI_MAX_ATTEMPTS": "3", "LOGPROBE_OPENAI_BACKOFF_S": "0.1",
             "LOGPROBE_OPENAI_TIMEOUT_S": str(TIMEOUT_S),
             "LOGPROBE_OPENAI_TIMEOUT_PER_TOKEN_S": str(TIMEOUT_PER_TOKEN_S),
             "LOGPROBE_OPENAI_SCORE_MAX_TOKENS": "1"},
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> Iterator[Client]:
    with worker.client() as c:
        yield c


def generate_specs(prompts: list[str], max_new_tokens: int = 2) -> list[dict]:
    return [{"kind": "generate", "prompt": p, "model": "davinci-002", "backend": "openai",
             "max_new_tokens": max_new_tokens} for p in prompts]


def sent(server: FakeOpenAI, prompts: list[str]) -> list[RecordedRequest]:
    return [r for r in server.recorded() if r.body.get("prompt") in prompts]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def rows_of(client: Client, job_id: str) -> tuple[int, int]:
    frame = client.sql("SELECT (SELECT COUNT(*) FROM sequences WHERE job_id = :j) AS s, "
                       "(SELECT COUNT(*) FROM tokens WHERE job_id = :j) AS t", {"j": job_id})
    return int(frame.iloc[0]["s"]), int(frame.iloc[0]["t"])


def job_row(client: Client, job_id: str) -> dict:
    return client.sql("SELECT * FROM jobs WHERE id = :j", {"j": job_id}).iloc[0].to_dict()


def max_in_flight(requests: list[RecordedRequest]) -> int:
    return max(sum(1 for r in requests if r.time <= x.time < r.done) for x in requests)


def test_a_message_runs_its_requests_concurrently_under_the_shared_limit(
        client: Client, server: FakeOpenAI) -> None:
    server.latency_s = 0.3
    tag = uuid.uuid4().hex[:6]
    prompts = [f"p{i} {tag}" for i in range(12)]
    jobs = client.submit_many(generate_specs(prompts), chunk_size=64)  # one message
    results = [job.result(timeout=60) for job in jobs]

    requests = sent(server, prompts)
    assert len(requests) == 12
    assert max_in_flight(requests) == CONCURRENCY  # concurrent, and bounded
    assert max_in_rolling_window([r.time for r in requests], WINDOW_S) <= RPM
    by_prompt = {r.body["prompt"]: r.response for r in requests}
    for prompt, result in zip(prompts, results, strict=True):  # outputs in spec order
        assert result.status is JobStatus.SUCCEEDED
        assert result.text == by_prompt[prompt]["choices"][0]["text"]
        assert prompt in str(job_row(client, result.job_id)["request_params"])


def test_jobs_cancelled_while_they_wait_their_turn_are_never_sent(
        client: Client, server: FakeOpenAI) -> None:
    # The server holds the requests it gets, so the pool stays busy with the first
    # CONCURRENCY jobs, all of them on the wire, until the others are cancelled: no
    # timing decides which job is in flight or waiting. (Which of the first jobs the
    # rate limit admits first is up to their threads: the test waits for all of them.)
    # 300 tokens each: a 7 s call timeout, for a hold of one rate-limit window (the
    # last of the first jobs may wait for a slot) and a few cancels.
    max_new_tokens = 300
    assert TIMEOUT_S + TIMEOUT_PER_TOKEN_S * max_new_tokens >= 7.0
    server.hold()
    tag = uuid.uuid4().hex[:6]
    prompts = [f"c{i} {tag}" for i in range(CONCURRENCY + 2)]
    jobs = client.submit_many(generate_specs(prompts, max_new_tokens), chunk_size=64)
    wait_for(lambda: len(sent(server, prompts)) >= CONCURRENCY)  # one message
    waiting = jobs[CONCURRENCY:]  # the pool is busy with the first CONCURRENCY
    for job in waiting:
        job.cancel()
    in_flight = jobs[0]
    in_flight.cancel()  # already on the wire: billed, so its answer is stored
    server.release()  # only now can a thread of the pool take a waiting job
    for job in jobs:
        job.wait(timeout=60)

    requests = sent(server, prompts)
    assert sorted(r.body["prompt"] for r in requests) == prompts[:CONCURRENCY]
    assert [r.status for r in requests] == [200] * CONCURRENCY  # each sent once
    for job in waiting:
        row = job_row(client, job.id)
        assert (row["status"], row["error_type"]) == ("cancelled", "Cancelled")
        assert "before its OpenAI request was sent" in row["error"]
        assert not row["partial"] and rows_of(client, job.id) == (0, 0)
    for job in jobs[:CONCURRENCY]:
        assert job.status() is JobStatus.SUCCEEDED
        assert rows_of(client, job.id) == (1, max_new_tokens)


def test_a_job_cancelled_during_a_429_pause_is_not_resent(
        client: Client, server: FakeOpenAI) -> None:
    server.inject(Fault(429, retry_after=5, message="slow down"))
    prompt = f"paused {uuid.uuid4().hex[:6]}"
    job = client.submit(generate_specs([prompt])[0])
    wait_for(lambda: len(sent(server, [prompt])) == 1)
    time.sleep(0.3)  # the job now waits out the shared pause
    asked = time.monotonic()
    job.cancel()
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    assert time.monotonic() - asked < 2.0  # not the 5 s pause
    assert [r.status for r in sent(server, [prompt])] == [429]
    row = job_row(client, job.id)
    assert row["error_type"] == "Cancelled" and "rate limit" in row["error"]
    assert rows_of(client, job.id) == (0, 0)


def test_a_time_limit_stops_a_request_that_runs_past_it(
        client: Client, server: FakeOpenAI) -> None:
    server.latency_per_token_s = 0.01  # 300 tokens: 3 s at the server
    prompt = f"slow {uuid.uuid4().hex[:6]}"
    submitted = time.monotonic()
    job = client.submit(generate_specs([prompt], max_new_tokens=300)[0], time_limit=1)
    assert job.wait(timeout=60) is JobStatus.FAILED
    assert time.monotonic() - submitted < 2.8  # stopped at its limit, not the server's 3 s
    row = job_row(client, job.id)
    assert row["error_type"] == "TimeLimitExceeded"
    assert "time limit of 1 s" in row["error"] and "nothing was stored" in row["error"]
    assert not row["partial"] and rows_of(client, job.id) == (0, 0)
    assert len(sent(server, [prompt])) == 1  # out of time: not resent


def test_call_timeouts_grow_with_the_tokens_asked_and_timeouts_are_resent_once(
        client: Client, server: FakeOpenAI) -> None:
    # 200 tokens at 10 ms each: 2 s at the server, past the 1 s base timeout but
    # within 1 s + 200 x 20 ms.
    server.latency_per_token_s = 0.01
    prompt = f"long {uuid.uuid4().hex[:6]}"
    result = client.submit(generate_specs([prompt], max_new_tokens=200)[0]).result(timeout=60)
    assert result.status is JobStatus.SUCCEEDED
    assert len(result.tokens) == 200
    assert [r.status for r in sent(server, [prompt])] == [200]

    # A stalled server (6 s for 40 tokens; timeouts 1.8 s, then 3.6 s): sent twice, no more.
    server.latency_per_token_s = 0.15
    prompt = f"stalled {uuid.uuid4().hex[:6]}"
    job = client.submit(generate_specs([prompt], max_new_tokens=40)[0])
    assert job.wait(timeout=60) is JobStatus.FAILED
    row = job_row(client, job.id)
    assert row["error"].startswith("OpenAI request timed out 2 times")
    assert "not resent again" in row["error"]
    assert len(sent(server, [prompt])) == 2


def test_score_without_text_offsets_drops_the_generated_token(
        client: Client, server: FakeOpenAI) -> None:
    server.text_offsets = False  # optional in openai's Logprobs type
    text = f"The cat sat on the mat {uuid.uuid4().hex[:6]}"
    result = client.score(text, model="davinci-002", backend="openai",
                          top_logprobs=2).result(timeout=60)

    (request,) = sent(server, [text])
    assert request.body["max_tokens"] == 1  # LOGPROBE_OPENAI_SCORE_MAX_TOKENS=1
    logprobs = request.response["choices"][0]["logprobs"]
    assert logprobs["text_offset"] is None
    n_prompt = request.response["usage"]["prompt_tokens"]
    assert len(logprobs["tokens"]) == n_prompt + 1  # the prompt, then one generated token
    assert [t.token for t in result.tokens] == logprobs["tokens"][:n_prompt]
    scored = logprobs["token_logprobs"][1:n_prompt]
    assert job_row(client, result.job_id)["num_scored_tokens"] == n_prompt - 1
    assert result.loss == pytest.approx(-math.fsum(scored) / len(scored), abs=1e-12)
    assert rows_of(client, result.job_id) == (1, n_prompt)
